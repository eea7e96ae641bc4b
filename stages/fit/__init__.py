"""Stage two: LoRA-adapted heads and a Mixture-of-Experts gate, trained from cached features."""

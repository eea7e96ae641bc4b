"""The report stage: metrics/ and predictions/ of every task -> summary.md and plots."""

"""A backbone's input contract: which leads, how many samples, what normalisation.

Applied on the CPU (in the prefetch thread) to signals from the store, so the model only
ever sees inputs in the form its authors trained it on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

from pipeline.leads import STANDARD_LEADS

NORMALISATIONS = ("none", "zscore")


@dataclass(frozen=True)
class InputContract:
    """``length`` samples per lead covering the whole record (10 s -> length)."""

    length: int
    leads: tuple[str, ...] = STANDARD_LEADS
    normalise: str = "none"

    def __post_init__(self) -> None:
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}")
        unknown = [lead for lead in self.leads if lead not in STANDARD_LEADS]
        if unknown:
            raise ValueError(f"unknown lead(s) {unknown}")

    def describe(self) -> dict:
        return {**asdict(self), "leads": list(self.leads)}

    def apply(self, signals: np.ndarray, store_leads: tuple[str, ...]) -> np.ndarray:
        """(B, 12, L) mV from the store -> (B, len(leads), length) float32."""
        x = signals[:, [store_leads.index(lead) for lead in self.leads]]
        if x.shape[-1] != self.length:
            ratio = Fraction(self.length, x.shape[-1])
            x = resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
            x = x[..., : self.length]
        if self.normalise == "zscore":
            mean = x.mean(axis=-1, keepdims=True)
            std = x.std(axis=-1, keepdims=True)
            x = (x - mean) / np.maximum(std, 1e-3)
        return np.ascontiguousarray(x, dtype=np.float32)

    def resampler(self, n_in: int) -> np.ndarray:
        """The (n_in, length) matrix of ``apply``'s resampling: it is linear, so this is it."""
        if n_in == self.length:
            return np.eye(n_in, dtype=np.float32)
        ratio = Fraction(self.length, n_in)
        return resample_poly(np.eye(n_in), ratio.numerator, ratio.denominator,
                             axis=-1)[:, : self.length].astype(np.float32)

    def apply_torch(self, signals, store_leads: tuple[str, ...], resampler=None):
        """``apply`` on a (B, 12, L) tensor, differentiable (saliency through the contract);
        pass ``resampler(L)`` as a tensor to reuse it."""
        import torch

        x = signals[:, [store_leads.index(lead) for lead in self.leads]]
        if x.shape[-1] != self.length:
            matrix = resampler if resampler is not None else torch.from_numpy(
                self.resampler(x.shape[-1]))
            x = x @ matrix.to(x)
        if self.normalise == "zscore":
            std = x.std(dim=-1, keepdim=True, unbiased=False).clamp_min(1e-3)
            x = (x - x.mean(dim=-1, keepdim=True)) / std
        return x

"""Subject-level splits: every ECG of a patient lands in the same split, so no test patient
was seen in training (the leakage the paper's cross-validation code allowed)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def assign_splits(subjects: pd.Series, seed: int,
                  fractions: tuple[float, float, float] = (0.7, 0.2, 0.1)) -> pd.Series:
    """Map each row's subject to train/val/test; the same subjects and seed give the same split.

    Subjects are ordered by a seeded hash of their id rather than by position, and each
    split takes its exact share of that order: adding or removing patients moves only the
    subjects near the two boundaries (``tests/test_splits_classes.py`` measures how many),
    never a subject's ECGs apart.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                         f"got {fractions}")
    unique = pd.Series(subjects.astype(str).unique())
    keys = unique.map(lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    order = unique.iloc[np.argsort(keys.to_numpy(), kind="stable")].to_numpy()
    bounds = np.round(np.cumsum(fractions)[:2] * len(order)).astype(int)
    labels = np.empty(len(order), dtype=object)
    labels[: bounds[0]] = "train"
    labels[bounds[0]: bounds[1]] = "val"
    labels[bounds[1]:] = "test"
    mapping = dict(zip(order, labels, strict=True))
    return subjects.astype(str).map(mapping)

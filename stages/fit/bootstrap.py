"""Confidence intervals over test ECGs for the headline metrics (MAE, F1, accuracy).

The seed spread says how much a result moves with the training seed; on a 20-ECG test set
the sampling error of the test set itself is far larger. Intervals resample *subjects*
(an ECG's errors correlate with its subject's other ECGs) with replacement, recompute the
metric of each seed on the resample and average over seeds, so one interval covers both.
Each metric is a ratio of per-row sums, so a resample is a matrix product of subject counts
with per-subject sums: thousands of resamples cost milliseconds.
"""

from __future__ import annotations

import numpy as np

HEADLINE = ("mae", "f1", "accuracy")


def _row_stats(metric: str, y: np.ndarray, decision: np.ndarray) -> np.ndarray:
    """Per-row summands (n, c) from which ``_finish`` makes the metric."""
    if metric == "mae":
        return np.stack([np.abs(decision - y), np.ones(len(y))], axis=1)
    if metric == "accuracy":
        return np.stack([(decision == y).astype(float), np.ones(len(y))], axis=1)
    if metric == "f1":
        d, t = decision.astype(bool), y.astype(bool)
        return np.stack([d & t, d & ~t, ~d & t], axis=1).astype(float)
    raise ValueError(f"no bootstrap for metric {metric!r}; have {', '.join(HEADLINE)}")


def _finish(metric: str, totals: np.ndarray) -> np.ndarray:
    if metric == "f1":
        tp, fp, fn = totals[..., 0], totals[..., 1], totals[..., 2]
        denominator = 2 * tp + fp + fn
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)
    return totals[..., 0] / np.maximum(totals[..., 1], 1e-12)


def metric_value(metric: str, y: np.ndarray, decision: np.ndarray) -> float:
    return float(_finish(metric, _row_stats(metric, y, decision).sum(axis=0)))


def resample_counts(subjects: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """(counts (B, S): how often each subject is drawn per resample, row -> subject index)."""
    unique, index = np.unique(subjects, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unique), size=(n_boot, len(unique)))
    counts = np.zeros((n_boot, len(unique)))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts, index


def replicates(metric: str, y: np.ndarray, decisions: np.ndarray, counts: np.ndarray,
               index: np.ndarray) -> np.ndarray:
    """The seed-averaged metric on every resample: (B,). ``decisions`` is (seeds, n)."""
    values = []
    for decision in decisions:
        stats = _row_stats(metric, y, decision)
        per_subject = np.zeros((counts.shape[1], stats.shape[1]))
        np.add.at(per_subject, index, stats)
        values.append(_finish(metric, counts @ per_subject))
    return np.mean(values, axis=0)


def intervals(metric: str, y: np.ndarray, decisions: dict[str, np.ndarray],
              subjects: np.ndarray, reference: str, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> dict[str, dict]:
    """Per method: the percentile interval of its metric, and of its difference to
    ``reference`` (paired: the same resamples), over subjects resampled with replacement."""
    counts, index = resample_counts(subjects, n_boot, seed)
    tail = (1 - level) / 2 * 100
    draws = {name: replicates(metric, y, d, counts, index) for name, d in decisions.items()}
    out = {}
    for name, values in draws.items():
        lo, hi = np.percentile(values, [tail, 100 - tail])
        delta = values - draws[reference]
        d_lo, d_hi = np.percentile(delta, [tail, 100 - tail])
        out[name] = {"ci": [float(lo), float(hi)],
                     "vs_" + reference: {"mean": float(np.mean([
                         metric_value(metric, y, a) - metric_value(metric, y, b)
                         for a, b in zip(decisions[name], decisions[reference], strict=True)])),
                         "ci": [float(d_lo), float(d_hi)]}}
    return out

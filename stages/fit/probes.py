"""Linear fits on one expert's features: the linear probe (the standard protocol of MOMENT
and ECG-FM), and the robust linear map a regression head starts from (``robust_linear``).

A ridge regression (penalty by generalised cross-validation on training rows) or a
logistic regression (C by validation loss) on the expert's standardised cached features.
Closed-form and hard to overfit, it is the baseline an FFN head has to beat on small
cohorts. Needs the features in memory.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import QuantileRegressor
from sklearn.model_selection import GroupKFold, KFold

from stages.fit.combine import Linear, ridge_gcv, ridge_gcv_targets
from stages.fit.features import FeatureSource
from stages.fit.train import Objective


def linear_probe(name: str, source: FeatureSource, objective: Objective,
                 rows: dict[str, np.ndarray], n_classes: int, balanced: bool,
                 evaluated: tuple[str, ...] = ("val", "test")) -> tuple[Linear, dict]:
    """The probe fitted on ``rows['train']`` (C chosen on ``rows['val']``) and its outputs
    in head space on the ``evaluated`` row sets: standardised values (n, 1) or class
    probabilities (n, C)."""
    x = {s: source.take(rows[s], [name])[name] for s in {"train", "val", *evaluated}}
    y = objective.y
    linear = Linear.fit(x["train"], y[rows["train"]], x["val"], y[rows["val"]], objective,
                        n_classes, balanced)
    return linear, {s: linear.predict(x[s]) for s in evaluated}


# L1 penalties of the sparse median fit, for standardised features and target: on the 200-ECG
# cohort's regression tasks each expert's best penalty lay in this range (1e-4 and 1e-3 were worse).
LAD_ALPHAS = (0.01, 0.03, 0.1)
# Above this many rows x features the clipped ridge alone (set when each sparse fit was a linear
# program taking seconds; measured on the 200-ECG cohort, not re-tuned).
LAD_MAX_CELLS = 60_000
SELECT_FOLDS = 3
# The widest expert the sparse fit is tried on: the rhythm (17) and TimesNet (32) experts.
SPARSE_MAX_FEATURES = 64


Fit = tuple[np.ndarray, float]  # (coef, intercept)


@dataclass
class LinearStart:
    """A member's linear start (``robust``) and the plain ridge fit of its rows (the
    cross-fitted linear probe's fold fit, read off the same decomposition)."""

    robust: Fit
    plain: Fit


def robust_linear(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> Fit:
    """The linear map (coef, intercept) a regression head's linear path starts from: the
    better, by subject-grouped inner cross-validation of absolute error, of two robust
    linear fits on its training rows.

    * Ridge on the labels clipped to median ± 3 robust SD, penalty by generalised
      cross-validation (a fixed small one overfitted 768 features from 128 ECGs); the clip
      keeps a grossly wrong label from pulling the map or buying a penalty that zeroes it.
    * A sparse median fit (absolute loss + L1 penalty, ``LAD_ALPHAS``), on experts of a few
      features (``sparse_fits``). Where one feature already measures the target (the
      rhythm expert's mean RR) but is far off on a few ECGs (where beat detection and
      label disagree), ridge spreads weight over the 16 other features: 19.5 ms MAE on
      the 200-ECG cohort, against 7.3 for the sparse fit and 7.2 for the feature read off.

    Huber regression was used before: on that cohort within 2 % of the clipped ridge or
    worse for every expert and task but rr on rhythm, where the sparse fit beats both; and
    seconds per fit on wide embeddings.
    """
    return robust_linears(x, y, groups, [np.arange(len(y))])[0].robust


def robust_linears(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None,
                   members: list[np.ndarray]) -> list[LinearStart]:
    """``robust_linear`` on each of several row subsets (``members``, sorted indices) of
    one design: a split's cross-fitting heads; with each, the plain ridge fit of its rows,
    which the split's linear probe fits on the same folds (on wide experts the
    eigendecomposition is most of either fit, and one serves both). The sparse fits of the
    subsets taller than wide are solved as one batch (``median_lasso``): they run to its
    iteration limit, and nine problems per call spent that time on per-iteration overhead
    (9 of a cross-validated 200-ECG ``rr`` fit's 26 s of heads)."""
    d = x.shape[1]
    fits: list[Fit | None] = [None] * len(members)
    plain: list[Fit | None] = [None] * len(members)
    tall: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # inner splits, design rows
    for i, rows in enumerate(members):
        if not sparse_fits(len(rows), d):
            fits[i], plain[i] = ridge_gcv_targets(
                x[rows], np.stack([_clip_outliers(y[rows]), y[rows]], axis=1))
            continue
        plain[i] = ridge_gcv(x[rows], y[rows])
        g = None if groups is None else groups[rows]
        folds = (GroupKFold(SELECT_FOLDS) if g is not None
                 and len(np.unique(g)) >= SELECT_FOLDS
                 else KFold(SELECT_FOLDS, shuffle=True, random_state=0))
        splits = list(folds.split(x[rows], y[rows], g))
        if len(rows) <= d:  # wide: the linear programs, on the member's own rows
            fits[i] = _sparse_or_ridge(x[rows], y[rows], [np.arange(len(rows))], [splits])[0]
        else:
            tall[i] = [(rows[a], rows[b]) for a, b in splits]
    batch = _sparse_or_ridge(x, y, [members[i] for i in tall], list(tall.values()))
    for i, fit in zip(tall, batch, strict=True):
        fits[i] = fit
    return [LinearStart(robust, own) for robust, own in zip(fits, plain, strict=True)]


def _sparse_or_ridge(x: np.ndarray, y: np.ndarray, members: list[np.ndarray],
                     splits: list[list[tuple[np.ndarray, np.ndarray]]]
                     ) -> list[tuple[np.ndarray, float]]:
    """Each member's choice between the sparse fit (its penalty too) and the clipped ridge
    by held-out absolute error over its inner ``splits``, then the choice fitted on its
    rows; the sparse fits of every member are one ``median_lasso`` batch on ``x``."""
    if not members:
        return []
    masks, alphas = [], []
    for member_splits in splits:
        for train, _ in member_splits:
            mask = np.zeros(len(y), dtype=bool)
            mask[train] = True
            masks += [mask] * len(LAD_ALPHAS)
            alphas += LAD_ALPHAS
    coefs, intercepts = median_lasso(x, y, np.array(masks), np.array(alphas))
    fits: list[tuple[np.ndarray, float] | None] = [None] * len(members)
    chosen, at = {}, 0
    for k, (rows, member_splits) in enumerate(zip(members, splits, strict=True)):
        best = _best_of(x, y, member_splits, coefs[at:], intercepts[at:])
        at += len(member_splits) * len(LAD_ALPHAS)
        if best is None:
            fits[k] = _clipped_ridge(x[rows], y[rows])
        else:
            chosen[k] = best
    if chosen:
        masks = np.zeros((len(chosen), len(y)), dtype=bool)
        for row, k in enumerate(chosen):
            masks[row, members[k]] = True
        coefs, intercepts = median_lasso(x, y, masks, np.array(list(chosen.values())))
        for row, k in enumerate(chosen):
            fits[k] = (coefs[row], float(intercepts[row]))
    return fits


def _best_of(x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
             coefs: np.ndarray, intercepts: np.ndarray) -> float | None:
    """The sparse fit's penalty of lowest held-out absolute error over ``splits`` (fits
    split by split, penalty by penalty, in ``coefs``), or None where the clipped ridge
    does better."""
    errors = np.zeros(1 + len(LAD_ALPHAS))  # absolute errors: ridge, then each penalty
    for k, (train, held) in enumerate(splits):
        coef, intercept = _clipped_ridge(x[train], y[train])
        errors[0] += np.abs(x[held] @ coef + intercept - y[held]).sum()
        for a in range(len(LAD_ALPHAS)):
            at = k * len(LAD_ALPHAS) + a
            errors[1 + a] += np.abs(x[held] @ coefs[at] + intercepts[at] - y[held]).sum()
    best = int(np.argmin(errors))
    return None if best == 0 else LAD_ALPHAS[best - 1]


def sparse_fits(n: int, d: int) -> bool:
    """Whether ``robust_linear`` tries the sparse median fit on an n x d design: on experts
    of at most ``SPARSE_MAX_FEATURES`` features, designs of at most ``LAD_MAX_CELLS``.

    The sparse fit earns its place where one of a few features measures the target (the
    rhythm expert's mean RR): on the 50 real records (5-fold CV, a few dozen ECGs per
    head, so the inner fits are wider than tall) the ensemble's RR MAE was 0.006 ms with
    it and 1.08 ms with the clipped ridge alone. On wide experts it bought nothing
    measurable and cost a linear program per fit: DLinear's 384 features on a
    cross-validated 200-ECG cohort took 30 of the 54 s of `rr`'s heads, for the same MAE
    (5.945 ms either way)."""
    return n >= 2 * SELECT_FOLDS and n * d <= LAD_MAX_CELLS and d <= SPARSE_MAX_FEATURES


def _clipped_ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    return ridge_gcv(x, _clip_outliers(y))


def median_lasso(x: np.ndarray, y: np.ndarray, masks: np.ndarray, alphas: np.ndarray,
                 iterations: int = 300, tolerance: float = 1e-7
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Sparse median fits, one per problem: problem ``p`` minimises
    ``mean over its rows (masks[p]) of |y - x·b - c| / 2 + alphas[p]·|b|_1``, the objective of
    scikit-learn's ``QuantileRegressor(quantile=0.5)``.

    Designs taller than wide are solved together by iteratively reweighted least squares
    (each step one weighted ridge system per problem, all problems' systems one matrix
    product; a problem stops when its coefficients move by less than ``tolerance``): a
    linear program per problem took 0.17 s for 2,300 ECGs x 17 features and a head needs
    nine; the IRLS objective is within 0.1 % of the linear program's optimum
    (``tests/test_select.py``), a starting point for gradient descent. Wider designs (a
    few dozen ECGs x 17 or 32 features), where IRLS converges slowly and the linear
    program is small, use the linear program, the problems solved side by side on the
    machine's cores.
    Returns (coefs (P, d), intercepts (P,)).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, d = x.shape
    if d >= n:  # independent programs; HiGHS releases the GIL, so threads share the cores
        def solve(problem: tuple[np.ndarray, float]) -> QuantileRegressor:
            mask, alpha = problem
            return QuantileRegressor(quantile=0.5, alpha=alpha, solver="highs").fit(x[mask],
                                                                                     y[mask])
        workers = min(len(masks), len(os.sched_getaffinity(0)))
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            fits = list(pool.map(solve, zip(masks, alphas, strict=True)))
        return (np.array([f.coef_ for f in fits]),
                np.array([float(f.intercept_) for f in fits]))
    design = np.hstack([x, np.ones((n, 1))])
    # each row's outer product, so every problem's weighted system is one matrix product
    outer = (design[:, :, None] * design[:, None, :]).reshape(n, -1)
    weights = masks.astype(np.float64)
    counts = np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    alphas = np.asarray(alphas, dtype=np.float64)
    beta = np.zeros((len(masks), d + 1))
    beta[:, d] = [np.median(y[m]) if m.any() else 0.0 for m in masks]
    diagonal = np.arange(d)
    active = np.arange(len(masks))  # problems still moving by more than ``tolerance``
    for _ in range(iterations):
        residual = y[None] - beta[active] @ design.T
        u = weights[active] * 0.5 / (counts[active] * np.maximum(np.abs(residual), 1e-6))
        system = (u @ outer).reshape(len(active), d + 1, d + 1)
        system[:, diagonal, diagonal] += (alphas[active, None]
                                          / np.maximum(np.abs(beta[active, :d]), 1e-6))
        update = np.linalg.solve(system, ((u * y[None]) @ design)[..., None])[..., 0]
        moving = np.abs(update - beta[active]).max(axis=1) >= tolerance
        beta[active] = update
        active = active[moving]
        if not len(active):
            break
    return beta[:, :d], beta[:, d]


def _clip_outliers(y: np.ndarray, k: float = 3.0) -> np.ndarray:
    median = np.median(y)
    spread = 1.4826 * np.median(np.abs(y - median))  # MAD scaled to the SD of a normal
    return np.clip(y, median - k * spread, median + k * spread) if spread > 0 else y

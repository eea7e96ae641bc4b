"""Linear fits on one expert's features: the linear probe (the standard protocol of MOMENT
and ECG-FM), and the robust linear map a regression head starts from (``warm_start``).

A ridge regression (penalty by generalised cross-validation on training rows) or a
logistic regression (C by validation loss) on the expert's standardised cached features.
Closed-form and hard to overfit, it is the baseline an FFN head has to beat on small
cohorts. Needs the features in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import QuantileRegressor, RidgeCV
from sklearn.model_selection import GroupKFold, KFold

from stages.fit.combine import ALPHAS, Linear
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
# Above this many rows x features the linear program takes seconds per fit, and a head is fit
# (folds + 1) x seeds times: the clipped ridge alone.
LAD_MAX_CELLS = 60_000
SELECT_FOLDS = 3


def warm_start(skip: torch.nn.Linear, x: np.ndarray, y: np.ndarray,
               groups: np.ndarray | None = None) -> None:
    """Set a regression head's linear path to the better, by subject-grouped inner
    cross-validation of absolute error, of two robust linear fits on its training rows.

    * Ridge on the labels clipped to median ± 3 robust SD, penalty by generalised
      cross-validation (a fixed small one overfitted 768 features from 128 ECGs); the clip
      keeps a grossly wrong label from pulling the map or buying a penalty that zeroes it.
    * A sparse median fit (absolute loss + L1 penalty, ``LAD_ALPHAS``), on designs small
      enough for its linear program. Where one feature already measures the target (the
      rhythm expert's mean RR) but is far off on a few ECGs (where beat detection and
      label disagree), ridge spreads weight over the 16 other features: 19.5 ms MAE on
      the 200-ECG cohort, against 7.3 for the sparse fit and 7.2 for the feature read off.

    Huber regression was used before: on that cohort within 2 % of the clipped ridge or
    worse for every expert and task but rr on rhythm, where the sparse fit beats both; and
    seconds per fit on wide embeddings.
    """
    candidates = [_clipped_ridge]
    if x.size <= LAD_MAX_CELLS:
        candidates += [_median_lasso(alpha) for alpha in LAD_ALPHAS]
    fit = candidates[0]
    if len(candidates) > 1 and len(y) >= 2 * SELECT_FOLDS:
        fit = min(candidates, key=lambda f: _inner_mae(f, x, y, groups))
    coef, intercept = fit(x, y)
    with torch.no_grad():
        skip.weight.copy_(torch.from_numpy(coef[None].astype(np.float32)))
        skip.bias.fill_(float(intercept))


LinearFit = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, float]]


def _clipped_ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    model = RidgeCV(alphas=ALPHAS).fit(x, _clip_outliers(y))
    return model.coef_, float(model.intercept_)


def _median_lasso(alpha: float) -> LinearFit:
    def fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        model = QuantileRegressor(quantile=0.5, alpha=alpha, solver="highs").fit(x, y)
        return model.coef_, float(model.intercept_)
    return fit


def _inner_mae(fit: LinearFit, x: np.ndarray, y: np.ndarray,
               groups: np.ndarray | None) -> float:
    folds = (GroupKFold(SELECT_FOLDS) if groups is not None
             and len(np.unique(groups)) >= SELECT_FOLDS
             else KFold(SELECT_FOLDS, shuffle=True, random_state=0))
    total = 0.0
    for train, held in folds.split(x, y, groups):
        coef, intercept = fit(x[train], y[train])
        total += float(np.abs(x[held] @ coef + intercept - y[held]).sum())
    return total / len(y)


def _clip_outliers(y: np.ndarray, k: float = 3.0) -> np.ndarray:
    median = np.median(y)
    spread = 1.4826 * np.median(np.abs(y - median))  # MAD scaled to the SD of a normal
    return np.clip(y, median - k * spread, median + k * spread) if spread > 0 else y

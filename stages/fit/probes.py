"""The linear probe per expert: the standard protocol of MOMENT and ECG-FM.

A ridge regression (penalty by generalised cross-validation on training rows) or a
logistic regression (C by validation loss) on the expert's standardised cached features.
Closed-form and hard to overfit, it is the baseline an FFN head has to beat on small
cohorts. Needs the features in memory.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import HuberRegressor, RidgeCV

from stages.fit.combine import ALPHAS, fit_logistic, probabilities
from stages.fit.features import FeatureSource
from stages.fit.train import Objective


def linear_probe(name: str, source: FeatureSource, objective: Objective,
                 rows: dict[str, np.ndarray], n_classes: int, balanced: bool
                 ) -> dict[str, np.ndarray]:
    """Outputs in head space on the val and test rows: standardised values (n, 1) or class
    probabilities (n, C)."""
    def x(split: str) -> np.ndarray:
        return source.take(rows[split], [name])[name]

    y = objective.y
    if not objective.classification:
        model = RidgeCV(alphas=ALPHAS).fit(x("train"), y[rows["train"]])
        return {s: model.predict(x(s))[:, None].astype(np.float32) for s in ("val", "test")}
    model = fit_logistic(x("train"), y[rows["train"]], x("val"), y[rows["val"]], n_classes,
                         balanced, objective)
    return {s: probabilities(model, x(s), n_classes) for s in ("val", "test")}


def warm_start(skip: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> None:
    """Set a regression head's linear path to a Huber fit on its training rows (robust: a
    least-squares fit lets the few ECGs whose labels are far off pull the map), with the
    L2 penalty generalised cross-validation picks for ridge on the same rows (a fixed
    small one overfitted 768 features from 128 ECGs). GCV scores squared error, so it sees
    the labels clipped to median ± 3 robust SD: one label far off otherwise buys a penalty
    that shrinks the map to nothing."""
    alpha = RidgeCV(alphas=ALPHAS).fit(x, _clip_outliers(y)).alpha_
    with warnings.catch_warnings():  # a starting point: training goes on from it
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = HuberRegressor(alpha=float(alpha), max_iter=1000).fit(x, y)
    with torch.no_grad():
        skip.weight.copy_(torch.from_numpy(model.coef_[None]))
        skip.bias.fill_(float(model.intercept_))


def _clip_outliers(y: np.ndarray, k: float = 3.0) -> np.ndarray:
    median = np.median(y)
    spread = 1.4826 * np.median(np.abs(y - median))  # MAD scaled to the SD of a normal
    return np.clip(y, median - k * spread, median + k * spread) if spread > 0 else y

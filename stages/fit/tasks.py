"""The five tasks: how a cohort column becomes targets, and how predictions are scored.

Metrics: the EnECG paper's headline metric first (MAE for rr/age, F1 for sex/ka,
accuracy for ad) and the ones a reader needs beside it (median AE and R² for regression;
AUROC, and AUPRC for the rare ``ka``; macro-F1 and balanced accuracy for ``ad``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning


@dataclass(frozen=True)
class Task:
    """``kind`` is regression, binary or multiclass; ``unit`` labels regression plots."""

    name: str
    kind: str
    metric: str
    unit: str = ""
    positive: object = 1
    balance_classes: bool = False
    extra_metrics: tuple[str, ...] = ()

    @property
    def trivial_name(self) -> str:
        return "mean_predictor" if self.kind == "regression" else "majority"


TASKS: dict[str, Task] = {
    "rr": Task("rr", "regression", "mae", unit="ms"),
    "age": Task("age", "regression", "mae", unit="years"),
    "sex": Task("sex", "binary", "f1", positive="M"),
    "ka": Task("ka", "binary", "f1", positive=1, balance_classes=True,
               extra_metrics=("auprc",)),
    "ad": Task("ad", "multiclass", "accuracy"),
}


@dataclass
class Targets:
    """Encoded labels: ``y`` is float (regression) or class index; ``labelled`` masks nulls."""

    y: np.ndarray
    labelled: np.ndarray
    classes: list[str]


def encode(task: Task, column: pd.Series, train: np.ndarray) -> Targets:
    """Targets for every cohort row; classes are those present in the training split."""
    labelled = column.notna().to_numpy()
    if task.kind == "regression":
        return Targets(column.astype(float).fillna(0).to_numpy(np.float32), labelled, [])
    if task.kind == "binary":
        positive = column.astype(object) == task.positive
        return Targets(positive.to_numpy().astype(np.int64), labelled, ["0", "1"])
    values = column.astype(object)
    classes = sorted({str(v) for v in values[train & labelled]})
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(str(v), -1) for v in values], dtype=np.int64)
    return Targets(y, labelled & (y >= 0), classes)


def best_f1_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold maximising F1, chosen on validation (never on test)."""
    if y.sum() == 0 or y.sum() == len(y):
        return 0.5
    precision, recall, thresholds = skm.precision_recall_curve(y, score)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _safe(fn, *args, **kwargs) -> float | None:
    """A metric, or None where it is undefined (AUROC or R² with one class or one value
    present: scikit-learn raises, or warns and returns NaN, by version)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            value = float(fn(*args, **kwargs))
    except ValueError:
        return None
    return None if np.isnan(value) else value


def score(task: Task, y: np.ndarray, prediction: np.ndarray,
          probability: np.ndarray | None = None) -> dict[str, float | None]:
    """Metrics of one method on one split. ``prediction`` is a value or a class index;
    ``probability`` the positive-class score (binary)."""
    if task.kind == "regression":
        error = np.abs(prediction - y)
        return {"mae": float(error.mean()), "median_ae": float(np.median(error)),
                "r2": _safe(skm.r2_score, y, prediction)}
    if task.kind == "binary":
        out = {"f1": float(skm.f1_score(y, prediction, zero_division=0)),
               "auroc": _safe(skm.roc_auc_score, y, probability)}
        if "auprc" in task.extra_metrics:
            out["auprc"] = _safe(skm.average_precision_score, y, probability)
        return out
    with warnings.catch_warnings():  # classes absent from a small test split are expected
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(skm.balanced_accuracy_score(y, prediction))
    return {"accuracy": float(skm.accuracy_score(y, prediction)),
            "macro_f1": float(skm.f1_score(y, prediction, average="macro", zero_division=0)),
            "balanced_accuracy": balanced}

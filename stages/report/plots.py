"""One PNG per question a reader asks of a fitted task: how close are the predictions, how
well are the classes separated, which classes get confused, and which backbone the gate trusts.

Figures are drawn on the Agg canvas directly (no pyplot), so the stage never needs a display
and never changes matplotlib's global backend for the rest of the process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.staging import staged_file

DPI = 110
UNITS = {"rr": "ms", "age": "years"}
NAMES = {"rr": "RR interval", "age": "age", "sex": "sex", "ka": "potassium abnormality",
         "ad": "rhythm/diagnosis"}
_MAX_LABEL = 40  # longer class names are cut so 15 classes still fit on one axis


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip("."))
    return path


def first_seed(frame: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The smallest seed and its rows: one run's predictions, not a blend of several runs."""
    if frame.empty:
        raise ValueError("the predictions file has no rows")
    seed = int(frame["seed"].min())
    return seed, frame[frame["seed"] == seed]


def plot_pred_vs_true(frame: pd.DataFrame, task: str, path: Path) -> Path:
    """Regression: the ensemble's test predictions against the truth, identity line, MAE."""
    seed, rows = first_seed(frame)
    truth = rows["truth"].to_numpy(dtype=float)
    pred = rows["prediction"].to_numpy(dtype=float)
    keep = np.isfinite(truth) & np.isfinite(pred)
    truth, pred = truth[keep], pred[keep]
    if truth.size == 0:
        raise ValueError(f"seed {seed} has no finite truth/prediction pair")
    mae = float(np.mean(np.abs(pred - truth)))
    unit = UNITS.get(task, "")
    name = NAMES.get(task, task)
    fig = _figure(5.5, 5.5)
    ax = fig.add_subplot()
    ax.scatter(truth, pred, s=10, alpha=0.5, label=f"ensemble (n={truth.size})")
    low = float(min(truth.min(), pred.min()))
    high = float(max(truth.max(), pred.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1, linestyle="--",
            label="identity (perfect prediction)")
    suffix = f" ({unit})" if unit else ""
    ax.set_xlabel(f"true {name}{suffix}")
    ax.set_ylabel(f"predicted {name}{suffix}")
    ax.set_title(f"{task}: ensemble on test, seed {seed}\nMAE = {mae:.3g} {unit}".rstrip())
    ax.legend(loc="upper left")
    return _save(fig, path)


def roc_curve_points(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0,0) to (1,1)."""
    truth = np.asarray(truth).astype(bool)
    score = np.asarray(score, dtype=float)
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC needs both classes in the test split")
    order = np.argsort(-score, kind="mergesort")
    score, truth = score[order], truth[order]
    # Tied scores share a threshold, so only the last row of each tie is a point on the curve.
    last_of_tie = np.r_[np.flatnonzero(np.diff(score)), truth.size - 1]
    true_pos = np.cumsum(truth)[last_of_tie]
    false_pos = last_of_tie + 1 - true_pos
    return np.r_[0.0, false_pos / negatives], np.r_[0.0, true_pos / positives]


def area_under(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under a ROC curve (numpy-version independent)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def plot_roc(frame: pd.DataFrame, task: str, path: Path) -> Path:
    """Binary: ROC of the ensemble's probability of class 1, with AUROC in the legend."""
    seed, rows = first_seed(frame)
    truth = rows["truth"].to_numpy(dtype=float)
    score = rows["score"].to_numpy(dtype=float)
    keep = np.isfinite(truth) & np.isfinite(score)
    try:
        fpr, tpr = roc_curve_points(truth[keep], score[keep])
    except ValueError as err:
        raise ValueError(f"seed {seed}: {err}") from err
    fig = _figure(5.5, 5.5)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, linewidth=2, label=f"ensemble (AUROC = {area_under(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"{task}: ROC of the ensemble on test, seed {seed} (n={int(keep.sum())})")
    ax.legend(loc="lower right")
    return _save(fig, path)


def confusion_matrix(truth: np.ndarray, prediction: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Class names (sorted, "Other" last) and the row-normalised matrix: row = true class,
    column = predicted."""
    truth = np.asarray(truth).astype(str)
    prediction = np.asarray(prediction).astype(str)
    classes = sorted(set(truth) | set(prediction), key=lambda name: (name == "Other", name))
    index = {name: i for i, name in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)))
    np.add.at(counts, ([index[t] for t in truth], [index[p] for p in prediction]), 1)
    totals = counts.sum(axis=1, keepdims=True)
    return classes, np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "…"


def plot_confusion(frame: pd.DataFrame, task: str, path: Path) -> Path:
    """Multiclass: where each true class ends up, as a share of that class's test ECGs."""
    seed, rows = first_seed(frame)
    rows = rows.dropna(subset=["truth", "prediction"])
    if rows.empty:
        raise ValueError(f"seed {seed} has no labelled rows")
    classes, matrix = confusion_matrix(rows["truth"].to_numpy(), rows["prediction"].to_numpy())
    side = max(5.0, 0.55 * len(classes) + 3.5)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [_short(name) for name in classes]
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    for (i, j), share in np.ndenumerate(matrix):
        if share > 0:
            ax.text(j, i, f"{share:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if share > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{task}: confusion of the ensemble on test, seed {seed} "
                 f"(n={len(rows)}, rows sum to 1)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(fig, path)


def plot_gate_weights(frame: pd.DataFrame, task: str, backbones: list[str], path: Path) -> Path:
    """How much the gate trusts each backbone, over every test row of every seed."""
    columns = [f"gate_{b}" for b in backbones]
    missing = [c for c in columns if c not in frame.columns]
    if not backbones or missing:
        raise ValueError(f"no gate weight column(s) {missing or columns}")
    data = [frame[c].dropna().to_numpy(dtype=float) for c in columns]
    if not any(values.size for values in data):
        raise ValueError("the gate weight columns are empty")
    fig = _figure(max(4.5, 1.3 * len(backbones) + 2.0), 4.5)
    ax = fig.add_subplot()
    ax.boxplot(data)
    ax.set_xticks(np.arange(1, len(backbones) + 1), backbones)
    ax.axhline(1 / len(backbones), color="grey", linewidth=1, linestyle="--",
               label=f"uniform (1/{len(backbones)})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("backbone")
    ax.set_ylabel("gate weight (share of the ensemble, 0-1)")
    n_seeds = frame["seed"].nunique()
    ax.set_title(f"{task}: gate weights on test ({len(frame)} rows, {n_seeds} seed(s))")
    ax.legend(loc="best")
    return _save(fig, path)

"""Subject-grouped folds and cross-fitted expert heads.

Stacked generalisation: a combiner may only learn from expert outputs on rows the expert
was not fitted on. ``cross_fit`` trains each head K times on the training split, each time
without one fold of subjects, and keeps its predictions on the left-out fold
(out-of-fold, OOF); then it refits the head on the whole training split for validation,
test and deployment. A gate trained on in-sample outputs learns to trust the heads that
memorise training rows best, which on 200 real ECGs made the ensemble ~8x worse than its
best expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.params import FitParams
from stages.fit.combine import Linear
from stages.fit.features import FeatureSource
from stages.fit.model import Ensemble, ModelConfig
from stages.fit.probes import warm_start
from stages.fit.train import Objective, predict, train


def group_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold index per row, every subject in exactly one fold, folds of similar size.

    Subjects are dealt largest first (ties in a seeded random order) to the fold with the
    fewest rows so far.
    """
    subjects, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    k = max(1, min(k, len(subjects)))
    order = np.random.default_rng(seed).permutation(len(subjects))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes, fold_of = np.zeros(k, dtype=np.int64), np.empty(len(subjects), dtype=np.int64)
    for s in order:
        fold_of[s] = int(np.argmin(sizes))
        sizes[fold_of[s]] += counts[s]
    return fold_of[inverse]


@dataclass
class ExpertFit:
    """One expert's outputs in head space, indexed by cohort row (N, k): out-of-fold on
    the training rows, from the refitted head elsewhere; and the refitted head itself."""

    outputs: np.ndarray
    head: torch.nn.Module


def _fit_head(name: str, dim: int, source: FeatureSource, objective: Objective,
              fit_rows: np.ndarray, val_rows: np.ndarray, d_out: int, config: ModelConfig,
              params: FitParams, seed: int, subjects: np.ndarray | None = None) -> Ensemble:
    torch.manual_seed(seed)
    model = Ensemble({name: dim}, 1, d_out, objective.classification, config)
    skip = model.heads[name].skip
    if skip is not None and not objective.classification and source.in_memory:
        warm_start(skip, source.take(fit_rows, [name])[name], objective.y[fit_rows],
                   None if subjects is None else subjects[fit_rows])
    train(model, source, objective, fit_rows, val_rows, params, seed)
    return model


def cross_fit(name: str, dim: int, source: FeatureSource, objective: Objective,
              rows: dict[str, np.ndarray], subjects: np.ndarray, d_out: int,
              config: ModelConfig, params: FitParams, seed: int) -> ExpertFit:
    """OOF outputs on ``rows['train']`` over ``params.oof_folds`` subject folds, then the
    head refitted on all of them; ``rows['val']`` drives early stopping throughout."""
    train_rows, val_rows = rows["train"], rows["val"]
    outputs = np.zeros((source.n_rows, d_out), dtype=np.float32)
    folds = group_folds(subjects[train_rows], params.oof_folds, seed)
    for fold in range(folds.max() + 1):
        held, fit_rows = train_rows[folds == fold], train_rows[folds != fold]
        if len(fit_rows) == 0:
            continue
        model = _fit_head(name, dim, source, objective, fit_rows, val_rows, d_out, config,
                          params, seed * 1000 + fold, subjects)
        outputs[held] = predict(model, source, held, params.batch_size)[1][:, 0]
    model = _fit_head(name, dim, source, objective, train_rows, val_rows, d_out, config,
                      params, seed * 1000 + 999, subjects)
    others = np.concatenate([r for s, r in rows.items() if s != "train"])
    outputs[others] = predict(model, source, others, params.batch_size)[1][:, 0]
    return ExpertFit(outputs, model.heads[name])


@dataclass
class ProbeFit:
    """A linear probe's outputs indexed by cohort row, out-of-fold on the training rows as
    for the heads, and the probe fitted on all of them."""

    outputs: np.ndarray
    linear: Linear


def cross_fit_probe(name: str, source: FeatureSource, objective: Objective,
                    rows: dict[str, np.ndarray], subjects: np.ndarray, n_classes: int,
                    balanced: bool, folds: int, seed: int) -> ProbeFit:
    """The linear probe cross-fitted like a head, so a combiner may choose it.

    The expert's features are taken (copied and scaled) once for all rows, not once per fold.
    """
    train_rows, val_rows = rows["train"], rows["val"]
    every = np.unique(np.concatenate(list(rows.values())))
    x_all = source.take(every, [name])[name]

    def x(r: np.ndarray) -> np.ndarray:
        return x_all[np.searchsorted(every, r)]

    def fit(fit_rows: np.ndarray) -> Linear:
        return Linear.fit(x(fit_rows), objective.y[fit_rows], x(val_rows),
                          objective.y[val_rows], objective, n_classes, balanced)

    outputs = np.zeros((source.n_rows, n_classes), dtype=np.float32)
    fold_of = group_folds(subjects[train_rows], folds, seed)
    for fold in range(fold_of.max() + 1):
        held, fit_rows = train_rows[fold_of == fold], train_rows[fold_of != fold]
        if len(fit_rows):
            outputs[held] = fit(fit_rows).predict(x(held))
    linear = fit(train_rows)
    others = np.setdiff1d(every, train_rows)
    outputs[others] = linear.predict(x(others))
    return ProbeFit(outputs, linear)

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
from stages.fit.bank import Banks, HeadBank, Reader, predict_banks, train_banks
from stages.fit.combine import Linear
from stages.fit.features import FeatureSource
from stages.fit.model import ModelConfig
from stages.fit.probes import robust_linear
from stages.fit.train import Objective


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


def cross_fit(jobs: list[tuple[str, int]], source: FeatureSource, objective: Objective,
              rows: dict[str, np.ndarray], subjects: np.ndarray, d_out: int,
              config: ModelConfig, params: FitParams, seed: int, device: torch.device
              ) -> dict[tuple[str, int], ExpertFit]:
    """For each job (expert, seed): OOF outputs on ``rows['train']`` over ``params.oof_folds``
    subject folds, then the head refitted on all of them; ``rows['val']`` drives early
    stopping throughout.

    Every job's (folds + 1) heads are members of one ``Banks`` (a bank per expert, holding
    that expert's jobs) trained in one pass over the training rows (``stages.fit.bank``).
    A job's folds and its heads' initialisation come from its own seed; ``seed`` shuffles
    the pass's batches.
    """
    train_rows, val_rows = rows["train"], rows["val"]
    others = np.concatenate([r for s, r in rows.items() if s != "train"])
    members: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, job_seed in jobs:  # (rows fitted on, rows predicted) per member
        folds = group_folds(subjects[train_rows], params.oof_folds, job_seed)
        members[name, job_seed] = [(train_rows[folds != f], train_rows[folds == f])
                                   for f in range(folds.max() + 1) if (folds != f).any()]
        members[name, job_seed].append((train_rows, others))
    names = list(dict.fromkeys(name for name, _ in jobs))
    by_expert = {b: [job for job in jobs if job[0] == b] for b in names}
    dims = source.dims()
    banks = Banks({b: HeadBank(dims[b], d_out, config, [
        job_seed * 1000 + (m if m < len(members[b, job_seed]) - 1 else 999)
        for _, job_seed in by_expert[b] for m in range(len(members[b, job_seed]))])
        for b in names})
    order = [job for b in names for job in by_expert[b]]  # the members' order in ``banks``
    fitted = [f for job in order for f, _ in members[job]]
    if config.skip and not objective.classification and source.in_memory:
        start, starts = 0, {}  # (expert, rows) -> its linear map: a refit's rows recur
        for name, job_seed in order:
            x = source.take(train_rows, [name])[name]
            for m, (rows_m, _) in enumerate(members[name, job_seed]):
                key = (name, rows_m.tobytes())
                if key not in starts:
                    at = np.searchsorted(train_rows, rows_m)
                    starts[key] = robust_linear(x[at], objective.y[rows_m], subjects[rows_m])
                banks.banks[name].set_skip(start + m - banks.offsets()[name], *starts[key])
            start += len(members[name, job_seed])
    banks.to(device)
    reader = Reader(source, names, device)
    if reader.resident is not None:
        for b in names:
            banks.banks[b].precompute(reader.resident[b])
    train_banks(banks, reader, objective.criterion(device), fitted,
                [val_rows] * len(fitted), lr=params.lr, weight_decay=params.weight_decay,
                batch_size=params.batch_size, max_epochs=params.max_epochs,
                patience=params.patience, seed=seed)
    every = np.unique(np.concatenate(list(rows.values())))
    out = predict_banks(banks, reader, every, params.batch_size)
    if objective.classification:
        out = out.softmax(dim=-1)
    out = out.float().cpu().numpy()
    banks.cpu()
    result, start = {}, 0
    for name, job_seed in order:
        outputs = np.zeros((source.n_rows, d_out), dtype=np.float32)
        for m, (_, predicted) in enumerate(members[name, job_seed]):
            outputs[predicted] = out[start + m, np.searchsorted(every, predicted)]
        last = start + len(members[name, job_seed]) - 1 - banks.offsets()[name]
        result[name, job_seed] = ExpertFit(outputs, banks.banks[name].export(last))
        start += len(members[name, job_seed])
    return result


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

    The expert's features are taken (copied and scaled) once for all rows, and the folds'
    fits and the refit are solved together (``Linear.fit_many``).
    """
    train_rows, val_rows = rows["train"], rows["val"]
    every = np.unique(np.concatenate(list(rows.values())))
    x_all = source.take(every, [name])[name]

    def x(r: np.ndarray) -> np.ndarray:
        return x_all[np.searchsorted(every, r)]

    fold_of = group_folds(subjects[train_rows], folds, seed)
    held = [fold_of == fold for fold in range(fold_of.max() + 1) if (fold_of != fold).any()]
    masks = np.array([~h for h in held] + [np.ones(len(train_rows), dtype=bool)])
    *fold_fits, linear = Linear.fit_many(x(train_rows), objective.y[train_rows], masks,
                                         x(val_rows), objective.y[val_rows], objective,
                                         n_classes, balanced)
    outputs = np.zeros((source.n_rows, n_classes), dtype=np.float32)
    for h, fitted in zip(held, fold_fits, strict=True):
        outputs[train_rows[h]] = fitted.predict(x(train_rows[h]))
    others = np.setdiff1d(every, train_rows)
    outputs[others] = linear.predict(x(others))
    return ProbeFit(outputs, linear)

"""Subject-grouped folds and cross-fitted expert heads.

Stacked generalisation: a combiner may only learn from expert outputs on rows the expert
was not fitted on. ``cross_fit`` trains each head K times on the training split, each time
without one fold of subjects, and keeps its predictions on the left-out fold
(out-of-fold, OOF); the K heads together (``model.Bag``, their outputs averaged) answer
for validation, test and deployment. A gate trained on in-sample outputs learns to trust
the heads that memorise training rows best, which on 200 real ECGs made the ensemble ~8x
worse than its best expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.params import FitParams
from stages.fit.bank import (
    Banks,
    HeadBank,
    Reader,
    input_affine,
    predict_banks,
    train_banks,
)
from stages.fit.combine import Linear, PathGroup
from stages.fit.features import FeatureSource
from stages.fit.model import Bag, Head, ModelConfig
from stages.fit.probes import robust_linears
from stages.fit.train import JointObjective, Objective, activate, heads_criterion, linear_targets


def group_folds(groups: np.ndarray, k: int, seed: int, strata: np.ndarray | None = None
                ) -> np.ndarray:
    """A fold index per row, every subject in exactly one fold, folds of similar size.

    Subjects are dealt largest first (ties in a seeded random order) to the fold with the
    fewest rows so far. With ``strata`` (a class per row) a subject counts as its rarest
    class, subjects of rarer classes are dealt first, and each goes to the fold holding
    fewest of its class (then fewest rows): a rare class reaches as many folds as it has
    subjects. Early stopping on a validation fold without positives rewards a head for
    predicting the negative class ever more surely, and it trained to the epoch limit.
    """
    subjects, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    k = max(1, min(k, len(subjects)))
    order = np.random.default_rng(seed).permutation(len(subjects))
    order = order[np.argsort(-counts[order], kind="stable")]
    stratum = np.zeros(len(subjects), dtype=np.int64)
    if strata is not None:
        _, coded, frequency = np.unique(strata, return_inverse=True, return_counts=True)
        rank = np.argsort(np.argsort(frequency, kind="stable"), kind="stable")  # 0: rarest
        stratum[:] = len(frequency)
        np.minimum.at(stratum, inverse, rank[coded])
        order = order[np.argsort(stratum[order], kind="stable")]
    sizes, fold_of = np.zeros(k, dtype=np.int64), np.empty(len(subjects), dtype=np.int64)
    held = np.zeros((k, stratum.max() + 1), dtype=np.int64)
    for s in order:
        fold_of[s] = (int(np.argmin(sizes)) if strata is None
                      else int(np.lexsort((sizes, held[:, stratum[s]]))[0]))
        sizes[fold_of[s]] += counts[s]
        held[fold_of[s], stratum[s]] += 1
    return fold_of[inverse]


@dataclass
class ExpertFit:
    """One expert's outputs in head space, indexed by cohort row (N, k): out-of-fold on
    the training rows, from the folds' heads together elsewhere; and those heads. A
    regression head's linear starts come with the plain ridge fits of its folds' rows
    (``fold_ridges``, in fold order), which are its linear probe's fold fits."""

    outputs: np.ndarray
    head: Head | Bag
    fold_ridges: list[Linear] | None = None


@dataclass
class Split:
    """Rows heads are fitted on (``train``, with ``val`` for early stopping, the rest only
    predicted), the objective they fit there, and the feature scaling of its training rows."""

    rows: dict[str, np.ndarray]
    objective: Objective | JointObjective
    scaling: dict[str, tuple[np.ndarray, np.ndarray]]


Job = tuple[str, int, int]  # (expert, seed, index of its split)


def cross_fit(jobs: list[Job], splits: list[Split], source: FeatureSource,
              subjects: np.ndarray, d_out: int, config: ModelConfig, params: FitParams,
              seed: int, device: torch.device) -> dict[Job, ExpertFit]:
    """For each job (expert, seed, split): OOF outputs on the split's training rows over
    ``params.oof_folds`` subject folds, and the folds' heads together (``Bag``) on the
    split's other rows; the split's validation rows drive early stopping throughout. (A
    training split of one subject has no folds: one head fits it, without OOF outputs.)

    Every job's fold heads are members of one ``Banks`` (a bank per expert, holding
    that expert's jobs) trained in one pass over the training rows of every split
    (``stages.fit.bank``): the seeds of a fixed split, and the folds of cross-validation
    with them. Batches are scaled with ``source.scaling``; a member whose split scales
    otherwise corrects it inside its products (``HeadBank.set_input_scaling``). A job's folds
    and its heads' initialisation come from its own seed; ``seed`` shuffles the batches.
    """
    members: dict[Job, list[tuple[np.ndarray, np.ndarray]]] = {}
    for job in jobs:  # (rows fitted on, its out-of-fold rows) per member
        train_rows = splits[job[2]].rows["train"]
        folds = group_folds(subjects[train_rows], params.oof_folds, job[1])
        members[job] = [(train_rows[folds != f], train_rows[folds == f])
                        for f in range(folds.max() + 1) if (folds != f).any()]
        members[job] = members[job] or [(train_rows, train_rows[:0])]
    names = list(dict.fromkeys(job[0] for job in jobs))
    by_expert = {b: [job for job in jobs if job[0] == b] for b in names}
    dims = source.dims()
    banks = Banks({b: HeadBank(dims[b], d_out, config, [
        job[1] * 1000 + m for job in by_expert[b] for m in range(len(members[job]))])
        for b in names}, bf16=params.bf16)
    order = [job for b in names for job in by_expert[b]]  # the members' order in ``banks``
    fitted = [f for job in order for f, _ in members[job]]
    groups = np.array([job[2] for job in order for _ in members[job]])
    affine = {b: [input_affine(source.scaling[b], splits[job[2]].scaling[b])
                  for job in by_expert[b] for _ in members[job]] for b in names}
    for b in names:
        if any(c.any() or (a != 1).any() for a, c in affine[b]):
            banks.banks[b].set_input_scaling(np.stack([a for a, _ in affine[b]]),
                                             np.stack([c for _, c in affine[b]]))
    objectives = [split.objective for split in splits]
    ridges = (_start_linear_paths(banks, order, members, splits, source, subjects)
              if config.skip and source.in_memory else {})
    banks.to(device)
    reader = Reader(source, names, device)
    if reader.resident is not None:
        for b in names:
            banks.banks[b].precompute(reader.resident[b])
    train_banks(banks, reader, heads_criterion(objectives, groups, device), fitted,
                [splits[g].rows["val"] for g in groups], lr=params.lr,
                weight_decay=params.weight_decay, batch_size=params.batch_size,
                max_epochs=params.max_epochs, patience=params.patience, seed=seed)
    every = np.unique(np.concatenate([r for split in splits for r in split.rows.values()]))
    raw = predict_banks(banks, reader, every, params.batch_size).float().cpu()
    banks.cpu()
    result, start = {}, 0
    for job in order:
        n, first = len(members[job]), start - banks.offsets()[job[0]]
        outputs = np.zeros((source.n_rows, d_out), dtype=np.float32)
        for m, (_, held) in enumerate(members[job]):
            outputs[held] = activate(objectives[0], raw[start + m, np.searchsorted(every, held)])
        others = np.concatenate([r for s, r in splits[job[2]].rows.items() if s != "train"])
        outputs[others] = activate(objectives[0], raw[start: start + n,
                                                      np.searchsorted(every, others)].mean(0))
        heads = [banks.banks[job[0]].export(first + m) for m in range(n)]
        result[job] = ExpertFit(outputs, heads[0] if n == 1 else Bag(heads).eval(),
                                ridges.get(job))
        start += n
    return result


def _start_linear_paths(banks: Banks, order: list[Job],
                        members: dict[Job, list[tuple[np.ndarray, np.ndarray]]],
                        splits: list[Split], source: FeatureSource, subjects: np.ndarray
                        ) -> dict[Job, list[Linear]]:
    """Start every regression output's linear path at ``robust_linears``' map of its
    member's training rows, scaled as its split scales them. The members of one expert
    and split (the folds of every seed) are fitted in one call on the split's design.
    Returns, per job of a single regression target, the plain ridge fits of its members'
    rows (``ExpertFit.fold_ridges``)."""
    position, at = {}, dict.fromkeys(banks.banks, 0)  # (job, m) -> member of its bank
    for job in order:
        for m in range(len(members[job])):
            position[job, m] = at[job[0]]
            at[job[0]] += 1
    ridges: dict[Job, list[Linear]] = {}
    for name, index in dict.fromkeys((job[0], job[2]) for job in order):
        jobs = [job for job in order if job[0] == name and job[2] == index]
        a, c = input_affine(source.scaling[name], splits[index].scaling[name])
        targets = linear_targets(splits[index].objective)
        for column, y, labelled in targets:
            sets = {}  # a row set recurring across seeds is fitted once
            for job in jobs:
                for rows, _ in members[job]:
                    rows = rows if labelled is None else rows[labelled[rows]]
                    sets.setdefault(rows.tobytes(), rows)
            design = np.unique(np.concatenate(list(sets.values())))
            x = source.take(design, [name])[name] * a + c
            fits = dict(zip(sets, robust_linears(
                x, y[design], subjects[design],
                [np.searchsorted(design, rows) for rows in sets.values()]), strict=True))
            for job in jobs:
                for m, (rows, _) in enumerate(members[job]):
                    rows = rows if labelled is None else rows[labelled[rows]]
                    banks.banks[name].set_skip(position[job, m], *fits[rows.tobytes()].robust,
                                               column=column)
                if len(targets) == 1 and labelled is None:
                    ridges[job] = [Linear({"coef": fits[rows.tobytes()].plain[0].tolist(),
                                           "intercept": [fits[rows.tobytes()].plain[1]]},
                                          False, 1) for rows, _ in members[job]]
    return ridges


@dataclass
class ProbeFit:
    """A linear probe's outputs indexed by cohort row, out-of-fold on the training rows as
    for the heads, and the probe fitted on all of them."""

    outputs: np.ndarray
    linear: Linear


@dataclass
class ProbeJob:
    """One linear probe to cross-fit: the expert, its split's rows and objective, and the
    seed of its folds. Its features are scaled on its training rows."""

    name: str
    rows: dict[str, np.ndarray]
    objective: Objective
    seed: int
    folds: list[Linear] | None = None  # its fold fits, when already made (``fold_ridges``)


def cross_fit_probes(jobs: list[ProbeJob], source: FeatureSource, subjects: np.ndarray,
                     n_classes: int, balanced: bool, folds: int) -> list[ProbeFit]:
    """Each job's linear probe cross-fitted like a head, so a combiner may choose it: one
    fit per subject fold of its training rows (for the out-of-fold outputs) and one on all
    of them, C chosen on its validation rows.

    An expert's jobs are solved together (``Linear.fit_groups``), one design per distinct
    (training, validation) rows: the seeds of a fixed split share one, and the folds of
    cross-validation each have their own. Each design is taken (copied and scaled) once.
    """
    saved, scalings = source.scaling, {}
    designs: dict[tuple[str, bytes], _ProbeDesign] = {}
    try:
        for job in jobs:
            rows = job.rows["train"].tobytes() + b"|" + job.rows["val"].tobytes()
            if (job.name, rows) not in designs:
                if rows not in scalings:
                    scalings[rows] = source.scaling_of(job.rows["train"])
                source.scaling = scalings[rows]
                designs[job.name, rows] = _ProbeDesign(job, source)
            designs[job.name, rows].add(job, subjects, folds)
    finally:
        source.scaling = saved
    fitted: dict[int, ProbeFit] = {}
    for name in dict.fromkeys(job.name for job in jobs):
        own = [design for (expert, _), design in designs.items() if expert == name]
        for design, linears in zip(own, Linear.fit_groups([d.group() for d in own],
                                                          n_classes, balanced), strict=True):
            for job, held, at, given in design.jobs:
                *fold_fits, linear = given + linears[at: at + len(held) + 1 - len(given)]
                fitted[id(job)] = design.outputs(job, held, fold_fits, linear,
                                                 source.n_rows, n_classes)
    return [fitted[id(job)] for job in jobs]


class _ProbeDesign:
    """One expert's features on one split's rows, scaled on its training rows, and the
    probes' row masks on them (each job's folds, then all its training rows)."""

    def __init__(self, job: ProbeJob, source: FeatureSource):
        self.rows, self.objective = job.rows, job.objective
        self.every = np.unique(np.concatenate(list(job.rows.values())))
        self.x = source.take(self.every, [job.name])[job.name]
        self.masks: list[np.ndarray] = []
        # (job, its folds, its first mask, its fold fits already made)
        self.jobs: list[tuple[ProbeJob, list[np.ndarray], int, list[Linear]]] = []

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.x[np.searchsorted(self.every, rows)]

    def add(self, job: ProbeJob, subjects: np.ndarray, folds: int) -> None:
        train_rows = self.rows["train"]
        fold_of = group_folds(subjects[train_rows], folds, job.seed)
        held = [fold_of == f for f in range(fold_of.max() + 1) if (fold_of != f).any()]
        given = job.folds if job.folds is not None and len(job.folds) == len(held) else []
        self.jobs.append((job, held, len(self.masks), given))
        self.masks += ([] if given else [~h for h in held]) + [np.ones(len(train_rows),
                                                                       dtype=bool)]

    def group(self) -> PathGroup:
        y = self.objective.y
        return PathGroup(self.take(self.rows["train"]), y[self.rows["train"]],
                         np.array(self.masks), self.take(self.rows["val"]),
                         y[self.rows["val"]], self.objective)

    def outputs(self, job: ProbeJob, held: list[np.ndarray], fold_fits: list[Linear],
                linear: Linear, n_rows: int, n_classes: int) -> ProbeFit:
        train_rows = self.rows["train"]
        outputs = np.zeros((n_rows, n_classes), dtype=np.float32)
        for h, fold_fit in zip(held, fold_fits, strict=True):
            outputs[train_rows[h]] = fold_fit.predict(self.take(train_rows[h]))
        others = np.setdiff1d(self.every, train_rows)
        outputs[others] = linear.predict(self.take(others))
        return ProbeFit(outputs, linear)

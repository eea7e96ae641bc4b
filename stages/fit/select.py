"""The ensemble's combiner, chosen per task by cross-validated loss (a discrete super learner).

No single way of combining experts won everywhere we measured: the MoE gate on RR, stacking
on the demo's age and diagnosis, one expert or its linear probe where the others only add
noise (see the README's results). So the gate is the default (``fit.combiner: select``)
and the other candidates may replace it: every expert's head alone, its linear probe
(cross-fitted like the heads, when the features fit in memory), the uniform average,
greedy selection, stacking and, for regression, the training median. Each is refitted K
times on the training rows' out-of-fold expert outputs, each time without one subject
fold, and scored on that fold with the training loss (van der Laan, Polley & Hubbard,
2007); the best replaces the gate only if clearly better (``choose``), and is then
refitted on all training rows. The choice uses training rows only, so the test rows that
score it never influenced it. ``combiner: gate`` always uses the gate, as EnECG and ECG-MoE
do."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch

from stages.fit.bank import Banks
from stages.fit.combine import (
    Linear,
    PathGroup,
    Stacker,
    Weighting,
    WeightingInput,
    apply_weightings,
    fit_weightings,
    fixed_mixture,
    greedy_weights,
    loss_per_row,
)
from stages.fit.crossfit import ProbeFit, group_folds
from stages.fit.features import GATE, FeatureSource
from stages.fit.head_store import array_digest
from stages.fit.model import Gate, ModelConfig
from stages.fit.train import Objective

GATE_NAME, MEDIAN, UNIFORM, PROBE, STACKING = "gate", "median", "uniform", "probe_", "stacking"


@dataclass
class Fitted:
    """One combiner fitted on some rows: the plain data a saved model needs to combine its
    heads' outputs (``spec``), its outputs on the requested rows and, for the gate, the
    network and its weights on the last row set."""

    spec: dict
    outputs: list[np.ndarray]
    gate: Gate | None = None
    weights: np.ndarray | None = None


Job = tuple[np.ndarray, Sequence[np.ndarray]]  # (rows to fit on, row sets to output)
Learner = Callable[[Sequence[Job]], list[Fitted]]


def job_key(job: Job) -> str:
    """A job's rows and the row sets it outputs, as a key (``Combiners.prefit``)."""
    rows, targets = job
    return array_digest(rows, *targets)


def _each(learn: Callable[[np.ndarray, Sequence[np.ndarray]], Fitted]) -> Learner:
    """A learner whose fits are cheap and independent: one after the other."""
    return lambda jobs: [learn(rows, targets) for rows, targets in jobs]


@dataclass
class Combiners:
    """Every candidate combiner over ``stacked`` (N, E, k): expert outputs indexed by cohort
    row, out-of-fold on the training rows. A learner fits a list of jobs at once, so the
    gate's fits (one per selection fold, and the one kept) train as one bank; ``prefit``
    holds gates and stackers already fitted with other splits' (``fit_gates``,
    ``fit_stackers``), by learner and ``job_key``."""

    stacked: np.ndarray
    experts: list[str]
    objective: Objective
    source: FeatureSource
    val_rows: np.ndarray
    config: ModelConfig
    gate_fit: dict  # fit_weightings' training settings
    seed: int
    batch_size: int = 256
    balanced: bool = False
    probes: dict[str, ProbeFit] = field(default_factory=dict)  # cross-fitted, by expert
    device: torch.device | str = "cpu"
    prefit: dict[str, dict[str, Fitted]] = field(default_factory=dict)
    learners: dict[str, Learner] = field(init=False)

    def __post_init__(self) -> None:
        learners: dict[str, Learner] = {}
        if not self.objective.classification:
            learners[MEDIAN] = _each(self._median)
        for i, name in enumerate(self.experts):
            learners[name] = _each(self._fixed(np.eye(len(self.experts))[i], name))
        for name, probe in self.probes.items():
            learners[PROBE + name] = _each(self._probe(name, probe))
        if len(self.experts) > 1:
            learners[UNIFORM] = _each(self._fixed(
                np.full(len(self.experts), 1 / len(self.experts)), UNIFORM))
            learners["greedy"] = _each(self._greedy)
            learners[STACKING] = self._stacking
            learners[GATE_NAME] = self._gate
        self.learners = learners

    def _fixed(self, weights: np.ndarray, name: str
               ) -> Callable[[np.ndarray, Sequence[np.ndarray]], Fitted]:
        def learn(_: np.ndarray, targets: Sequence[np.ndarray]) -> Fitted:
            return Fitted({"name": name, "weights": weights.tolist()},
                          [fixed_mixture(self.stacked[r], weights) for r in targets])
        return learn

    @staticmethod
    def _probe(expert: str, probe: ProbeFit
               ) -> Callable[[np.ndarray, Sequence[np.ndarray]], Fitted]:
        def learn(_: np.ndarray, targets: Sequence[np.ndarray]) -> Fitted:
            return Fitted({"name": PROBE + expert, "expert": expert,
                           "linear": probe.linear.state},
                          [probe.outputs[r] for r in targets])
        return learn

    def _median(self, rows: np.ndarray, targets: Sequence[np.ndarray]) -> Fitted:
        y = self.objective.y[rows]
        value = float(np.median(y) if self.objective.loss == "l1" else y.mean())
        return Fitted({"name": MEDIAN, "constant": [value]},
                      [np.full((len(r), 1), value, dtype=np.float32) for r in targets])

    def _greedy(self, rows: np.ndarray, targets: Sequence[np.ndarray]) -> Fitted:
        weights = greedy_weights(self.stacked[rows], self.objective.y[rows], self.objective)
        return Fitted({"name": "greedy", "weights": weights.tolist()},
                      [fixed_mixture(self.stacked[r], weights) for r in targets])

    def _prefitted(self, name: str, jobs: Sequence[Job]) -> list[Fitted] | None:
        kept = self.prefit.get(name, {})
        keys = [job_key(job) for job in jobs]
        return [kept[key] for key in keys] if all(key in kept for key in keys) else None

    def _stacking(self, jobs: Sequence[Job]) -> list[Fitted]:
        return self._prefitted(STACKING, jobs) or fit_stackers(
            [Stacking(self.stacked, self.objective, self.val_rows, jobs)], self.balanced)[0]

    def _gate(self, jobs: Sequence[Job]) -> list[Fitted]:
        prefitted = self._prefitted(GATE_NAME, jobs)
        if prefitted is not None:
            return prefitted
        weighting = Weighting(self.stacked, self.objective, [rows for rows, _ in jobs],
                              self.val_rows, self.seed)
        return fit_gates(self.source, [(weighting, jobs)], self.config, self.gate_fit,
                         self.batch_size, self.device)[0][0]


GATE_INPUT = WeightingInput(0, lambda data: data[GATE], [GATE])  # d_in: the source's


def fit_gates(source: FeatureSource, requests: list[tuple[Weighting, Sequence[Job]]],
              config: ModelConfig, settings: dict, batch_size: int,
              device: torch.device | str,
              also: dict[str, tuple[WeightingInput, list[Weighting]]] | None = None
              ) -> tuple[list[list[Fitted]], Banks]:
    """The MoE gates of several splits (each a ``Weighting`` of its jobs' rows, and the
    jobs), trained as one bank (``fit_weightings``), with ``also``'s networks (the weight
    generator) as further banks of the same pass: per split, a ``Fitted`` per job, the
    last with its network and its weights on its last row set (the kept gate); and the
    banks."""
    gate_input = dataclasses.replace(GATE_INPUT, d_in=source.dims()[GATE])
    banks = fit_weightings({GATE_NAME: (gate_input, [w for w, _ in requests]), **(also or {})},
                           source, config, device=device, **settings)
    applied, start = [], 0
    for weighting, jobs in requests:
        applied.append([[apply_weightings(banks, GATE_NAME, gate_input, source,
                                          weighting.outputs, r,
                                          weighting.objective.classification, batch_size,
                                          slice(start + m, start + m + 1))
                         for r in targets] for m, (_, targets) in enumerate(jobs)])
        start += len(jobs)
    bank = banks.banks[GATE_NAME].cpu()
    out, start = [], 0
    for (_, jobs), per_job in zip(requests, applied, strict=True):
        last = len(jobs) - 1
        out.append([Fitted({"name": GATE_NAME}, [mixtures[0] for mixtures, _ in sets],
                           bank.export(start + m) if m == last else None, sets[-1][1][0])
                    for m, sets in enumerate(per_job)])
        start += len(jobs)
    return out, banks


@dataclass
class Stacking:
    """One split's stackers for ``fit_stackers``: the experts' outputs (N, E, k) and the
    objective, indexed by cohort row, the validation rows that choose a logistic
    stacker's penalty, and the jobs."""

    stacked: np.ndarray
    objective: Objective
    val_rows: np.ndarray
    jobs: Sequence[Job]


def fit_stackers(requests: list[Stacking], balanced: bool) -> list[list[Fitted]]:
    """The stackers of several splits, a ``Fitted`` per job, fitted together: the logistic
    ones as one batched solve (one design per split), where a cross-validated 200-ECG
    ``ad`` fit solved its 18 splits' one after another (a third of its time)."""
    first = requests[0]
    classification, n_classes = first.objective.classification, first.stacked.shape[2]
    groups, unions = [], []
    for r in requests:
        y = r.objective.y
        union = np.unique(np.concatenate([rows for rows, _ in r.jobs]))
        unions.append(union)
        groups.append(PathGroup(Stacker.design(r.stacked[union], classification), y[union],
                                np.array([np.isin(union, rows) for rows, _ in r.jobs]),
                                Stacker.design(r.stacked[r.val_rows], classification),
                                y[r.val_rows], r.objective))
    out = []
    for r, linears in zip(requests, Linear.fit_groups(groups, n_classes, balanced),
                          strict=True):
        stackers = [Stacker.from_state(linear.state, classification, n_classes)
                    for linear in linears]
        out.append([Fitted({"name": STACKING, "stacker": stacker.state},
                           [stacker.predict(r.stacked[rows]) for rows in targets])
                    for stacker, (_, targets) in zip(stackers, r.jobs, strict=True)])
    return out


def cross_validated_losses(learners: dict[str, Learner], train_rows: np.ndarray,
                           subjects: np.ndarray, objective: Objective, folds: int, seed: int,
                           also: dict[str, Job] | None = None
                           ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Fitted]]:
    """Each learner's training loss per row on subject folds of ``train_rows`` it was not
    fitted on, and those rows (folds with no rows left to fit on are skipped); with
    ``also``, one more job per named learner fitted in the same call (the gate or the
    stacker kept)."""
    jobs = selection_jobs(train_rows, subjects, folds, seed)
    rows = np.concatenate([targets[0] for _, targets in jobs])
    y = objective.y[rows]
    losses, extra = {}, {}
    for name, learn in learners.items():
        more = [also[name]] if also and name in also else []
        fitted = learn(jobs + more)
        losses[name] = loss_per_row(np.concatenate([f.outputs[0] for f in fitted[:len(jobs)]]),
                                    y, objective)
        if more:
            extra[name] = fitted[-1]
    return losses, rows, extra


def selection_jobs(train_rows: np.ndarray, subjects: np.ndarray, folds: int, seed: int
                   ) -> list[Job]:
    """The fits ``cross_validated_losses`` scores a learner by: on ``train_rows`` without
    one subject fold, output on that fold."""
    fold_of = group_folds(subjects[train_rows], folds, seed)
    jobs: list[Job] = []
    for fold in range(fold_of.max() + 1):
        held, fit_rows = train_rows[fold_of == fold], train_rows[fold_of != fold]
        if len(fit_rows):
            jobs.append((fit_rows, [held]))
    return jobs


def choose(losses: dict[str, np.ndarray], subjects: np.ndarray, default: str,
           alpha: float) -> str:
    """The candidate of lowest mean loss if it beats ``default`` clearly, else ``default``.

    Clearly: a one-sided paired z-test of their loss difference per subject (a subject's
    ECGs share their errors) at level ``alpha``, Bonferroni-corrected for the number of
    candidates that could have replaced the default. On a few dozen training ECGs every
    candidate's cross-validated loss is noisy, and the plain minimum picks whichever was
    lucky on those rows: on 50 real ECGs with no age signal it did worse than every
    candidate it chose from, and so did a one-standard-error rule, since among 14
    candidates one usually looks a standard error better by chance. On large cohorts the
    errors are small and the rule takes the minimum.
    """
    best = min(losses, key=lambda name: (losses[name].mean(), list(losses).index(name)))
    if best == default or default not in losses:
        return best
    _, group = np.unique(subjects, return_inverse=True)
    per_subject = np.bincount(group, losses[best] - losses[default]) / np.bincount(group)
    if len(per_subject) < 2:
        return default
    error = per_subject.std(ddof=1) / np.sqrt(len(per_subject))
    z = NormalDist().inv_cdf(1 - alpha / (len(losses) - 1))
    return best if per_subject.mean() + z * error < 0 else default


def apply_spec(spec: dict, outputs: np.ndarray, gate_mixture: np.ndarray | None,
               classification: bool, features: dict[str, np.ndarray] | None = None
               ) -> np.ndarray:
    """A saved combiner applied to heads' outputs (n, E, k) in head space. The gate's own
    mixture is passed in, since the gate needs its input features; a chosen linear probe
    reads its expert's standardised ``features``."""
    if spec["name"] == GATE_NAME:
        if gate_mixture is None:
            raise ValueError("this ensemble combines with its gate: pass the gate's mixture")
        return gate_mixture
    if "weights" in spec:
        return fixed_mixture(outputs, np.asarray(spec["weights"]))
    if "constant" in spec:
        return np.full((len(outputs), 1), spec["constant"][0], dtype=np.float32)
    if "linear" in spec:
        if features is None or spec["expert"] not in features:
            raise ValueError(f"this ensemble is {spec['name']}: pass {spec['expert']}'s "
                             "standardised features")
        return Linear(spec["linear"], classification, outputs.shape[2]).predict(
            features[spec["expert"]])
    return Stacker.from_state(spec["stacker"], classification,
                              outputs.shape[2]).predict(outputs)

"""The fit stage for one task: the ensemble and its baselines, over seeds, from the cache.

Per seed, from the same cached features and the same subject-level rows:
* every expert's head is cross-fitted (``stages.fit.crossfit``): out-of-fold outputs on
  the training rows, the fold heads averaged (``Bag``) on the others;
* ``ensemble``: the combiner chosen by cross-validated loss on those out-of-fold outputs
  (``stages.fit.select``: an expert, an average, stacking or the MoE gate; with
  ``combiner: gate`` always the gate), mixing the experts' bags; ``gate``: the MoE gate;
* baselines (EnECG's Table 3 and the usual ones): each expert alone (``<backbone>``), its
  linear probe (``probe_<backbone>``), ``uniform`` average, ``greedy`` selection on
  validation, ``confidence`` weighting (classification), the sample-aware
  ``weight_generator``, ``stacking`` (ridge/logistic meta-model) and the trivial predictor.

Evaluation is the cohort's fixed test split, or, for cohorts of at most ``cv_max_ecgs``
labelled ECGs (``evaluation: auto``), subject-grouped K-fold cross-validation over the
whole cohort: every ECG is predicted once, by models that never saw its subject. Metrics are
mean ± std over seeds, and each headline metric carries a subject-bootstrap interval and its
paired difference to the ensemble.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline.device import resolve_device
from pipeline.feature_cache import CacheError, feature_differences
from pipeline.params import FitParams
from pipeline.staging import staged_dir, staged_file
from stages.fit.bank import input_affine
from stages.fit.bootstrap import intervals
from stages.fit.combine import (
    Weighting,
    WeightingInput,
    apply_weightings,
    confidence_weights,
    fixed_mixture,
    greedy_weights,
)
from stages.fit.crossfit import (
    ExpertFit,
    ProbeFit,
    ProbeJob,
    Split,
    cross_fit,
    cross_fit_probes,
    group_folds,
)
from stages.fit.features import GATE, FeatureSource, load_features
from stages.fit.head_store import FOLDER, HeadMemo, array_digest, head_key
from stages.fit.model import Ensemble, ModelConfig, bag_size, renamed_from_peft
from stages.fit.probes import linear_probe
from stages.fit.select import (
    GATE_NAME,
    PROBE,
    STACKING,
    Combiners,
    Fitted,
    Job,
    Stacking,
    choose,
    cross_validated_losses,
    fit_gates,
    fit_stackers,
    job_key,
    selection_jobs,
)
from stages.fit.tasks import TASKS, Targets, Task, best_f1_threshold, encode, score
from stages.fit.train import JointObjective, Objective

ENSEMBLE, UNIFORM = "ensemble", "uniform"
VAL_FRACTION = 0.2  # of a cross-validation fold's training subjects, for early stopping


class TaskSkipped(Exception):
    """The task cannot be fitted on this cohort (e.g. no labels); the message says why."""


def cohort_digest(path: Path) -> str:
    meta = pq.read_schema(path).metadata or {}
    return meta.get(b"cohort_digest", b"").decode()


def _model_config(params: FitParams) -> ModelConfig:
    return ModelConfig(hidden=params.hidden, adapter=params.adapter, lora_r=params.lora_r,
                       lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                       gate_hidden=params.gate_hidden, gate_mode=params.gate_mode,
                       skip=params.head_skip)


def _objective(task: Task, targets: Targets, train_rows: np.ndarray, params: FitParams
               ) -> tuple[Objective, dict]:
    if task.kind == "regression":
        mean, std = float(targets.y[train_rows].mean()), float(targets.y[train_rows].std())
        std = std or 1.0
        return Objective(((targets.y - mean) / std).astype(np.float32), False, params.loss,
                         expert_weight=params.expert_loss_weight), {"mean": mean, "std": std}
    weight = None
    if task.balance_classes:
        counts = np.bincount(targets.y[train_rows], minlength=len(targets.classes))
        weight = torch.tensor(len(train_rows) / (len(counts) * np.maximum(counts, 1)),
                              dtype=torch.float32)
    return Objective(targets.y, True, class_weight=weight,
                     expert_weight=params.expert_loss_weight), {}


class _Method:
    """Outputs of one method on validation and test (head space), turned into values,
    a validated threshold (binary) and decisions."""

    def __init__(self, task: Task, val: np.ndarray, test: np.ndarray, y_val: np.ndarray,
                 y_test: np.ndarray, scale: dict):
        self.task, self.scale = task, scale
        self.val, self.test = self._values(val), self._values(test)
        self.threshold = (best_f1_threshold(y_val, self.val) if task.kind == "binary"
                          else None)
        self.y_test = y_test

    def _values(self, output: np.ndarray) -> np.ndarray:
        if self.task.kind == "regression":
            return output[:, 0] * self.scale["std"] + self.scale["mean"]
        if self.task.kind == "binary":
            return output[:, 1]
        return output

    def prediction(self) -> np.ndarray:
        if self.task.kind == "regression":
            return self.test
        if self.task.kind == "binary":
            return (self.test >= self.threshold).astype(np.int64)
        return self.test.argmax(axis=1)

    def metrics(self) -> dict:
        probability = self.test if self.task.kind == "binary" else None
        return score(self.task, self.y_test, self.prediction(), probability)


def _aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for key in per_seed[0]:
        values = [m[key] for m in per_seed if m[key] is not None]
        out[key] = ({"mean": float(np.mean(values)), "std": float(np.std(values))}
                    if values else None)
    return out


@dataclass
class SplitFit:
    """One fit on (train, val, test) rows: every method's outputs, and the ensemble."""

    rows: dict[str, np.ndarray]
    methods: dict[str, _Method]
    experts: np.ndarray  # the experts' (bagged heads') outputs on test, (n_test, E, k)
    gate: np.ndarray  # the gate's weights on test, (n_test, E)
    model: Ensemble
    scale: dict
    scaling: dict[str, tuple[np.ndarray, np.ndarray]]
    combiner: dict  # the chosen combiner as plain data (``stages.fit.select.apply_spec``)
    losses: dict[str, float]  # every candidate's cross-validated loss (combiner: select)


@dataclass
class Prefit:
    """What ``fit_split`` reads instead of fitting: its feature scaling, its gates and
    stackers (by learner and ``select.job_key``), its weight generator's mixtures on val
    and test and its experts' linear probes (the combiner's candidates), fitted with
    every other split's of the task together (``prefit_splits``)."""

    scaling: dict[str, tuple[np.ndarray, np.ndarray]]
    combiners: dict[str, dict[str, Fitted]]
    weight_generator: dict[str, np.ndarray] | None
    probes: dict[str, ProbeFit]


@dataclass
class SplitRequest:
    """One ``fit_split`` to come: its seed, rows, cross-fitted experts, the rows its
    features are scaled on (None: its training rows) and whether it fits the baselines."""

    seed: int
    rows: dict[str, np.ndarray]
    fits: dict[str, ExpertFit]
    scaled_on: np.ndarray | None
    baselines: bool


def _gate_jobs(rows: dict[str, np.ndarray], subjects: np.ndarray, params: FitParams,
               seed: int) -> list[Job]:
    """The gates ``fit_split`` fits: one per selection fold (``combiner: select``), and the
    one kept, on every training row, with outputs on val and test."""
    kept = (rows["train"], [rows["val"], rows["test"]])
    if params.combiner != "select":
        return [kept]
    return [*selection_jobs(rows["train"], subjects, params.oof_folds, seed * 100 + 70), kept]


def _affine(base: tuple[np.ndarray, np.ndarray], own: tuple[np.ndarray, np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray] | None:
    same = np.array_equal(base[0], own[0]) and np.array_equal(base[1], own[1])
    return None if same else input_affine(base, own)


def prefit_splits(task: Task, targets: Targets, source: FeatureSource,
                  requests: list[SplitRequest], subjects: np.ndarray, params: FitParams,
                  memo: HeadMemo) -> list[Prefit]:
    """The gates, weight generators, stackers and linear probes of every split of a task
    (its seeds and the folds of cross-validation), each kind fitted together: the networks
    as one bank (alone, each was a few hundred steps of a network too small to keep the
    cores busy, and a cross-validated fit has eighteen), the logistic fits as one batched
    solve (per expert for the probes). Each split's networks read its own feature scaling
    (corrected inside the bank, as ``cross_fit`` does for heads)."""
    names = list(params.backbones)
    scaled = [r.rows["train"] if r.scaled_on is None else r.scaled_on for r in requests]
    digests = [array_digest(rows) for rows in scaled]
    by_digest = {d: source.scaling_of(rows) for d, rows in zip(digests, scaled, strict=True)}
    scalings = [by_digest[d] for d in digests]
    if len(names) < 2:
        return [Prefit(scaling, {}, None, {}) for scaling in scalings]
    probes = ([{}] * len(requests) if not source.in_memory or params.combiner != "select"
              else _probes(task, targets, source, requests, subjects, params, memo))
    base = (scalings[0] if len(by_digest) == 1
            else source.scaling_of(np.unique(np.concatenate(scaled))))
    config, settings = _model_config(params), _gate_settings(params)
    device = resolve_device(params.device)
    saved = source.scaling
    source.scaling = base
    try:
        stacked = [np.stack([r.fits[b].outputs for b in names], axis=1) for r in requests]
        objectives = [_objective(task, targets, r.rows["train"], params)[0] for r in requests]
        jobs = [_gate_jobs(r.rows, subjects, params, r.seed) for r in requests]
        generator = _weight_generators(source, requests, stacked, objectives, base, scalings,
                                       params)
        gates, banks = fit_gates(source, [
            (Weighting(out, objective, [rows for rows, _ in own], r.rows["val"],
                       r.seed * 100 + 50, _affine(base[GATE], scaling[GATE])), own)
            for r, out, objective, own, scaling in zip(requests, stacked, objectives, jobs,
                                                      scalings, strict=True)],
            config, settings, params.batch_size, device,
            also={GENERATOR: generator[:2]} if generator else None)
        generated = {} if not generator else {
            i: {s: apply_weightings(banks, GENERATOR, generator[0], source, stacked[i],
                                    requests[i].rows[s], objectives[i].classification,
                                    params.batch_size, slice(m, m + 1))[0][0]
                for s in ("val", "test")} for m, i in enumerate(generator[2])}
    finally:
        source.scaling = saved
    stacking = [i for i, r in enumerate(requests) if params.combiner == "select" or r.baselines]
    stackers = dict(zip(stacking, fit_stackers(
        [Stacking(stacked[i], objectives[i], requests[i].rows["val"], jobs[i])
         for i in stacking], task.balance_classes), strict=True)) if stacking else {}
    return [Prefit(scaling, {GATE_NAME: _by_job(own, gates[i]),
                             STACKING: _by_job(own, stackers[i]) if i in stackers else {}},
                   generated.get(i), probes[i])
            for i, (scaling, own) in enumerate(zip(scalings, jobs, strict=True))]


def _by_job(jobs: list[Job], fitted: list[Fitted]) -> dict[str, Fitted]:
    return {job_key(job): fit for job, fit in zip(jobs, fitted, strict=True)}


GENERATOR = "weight_generator"


def _weight_generators(source: FeatureSource, requests: list[SplitRequest],
                       stacked: list[np.ndarray], objectives: list[Objective], base: dict,
                       scalings: list[dict], params: FitParams
                       ) -> tuple[WeightingInput, list[Weighting], list[int]] | None:
    """EnECG's sample-aware weight generator of each split that fits the baselines (the
    gate's network fed the experts' own features, fitted on out-of-fold outputs), trained
    as a bank of the gates' pass: its input, its weightings, and their requests."""
    names = list(params.backbones)
    wanted = [i for i, r in enumerate(requests) if r.baselines]
    if not wanted:
        return None

    def joined(scaling: dict) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([scaling[b][0] for b in names]),
                np.concatenate([scaling[b][1] for b in names]))

    def inputs(data: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([data[b] for b in names], axis=1)

    width = sum(source.dims()[b] for b in names)
    return WeightingInput(width, inputs, names), [
        Weighting(stacked[i], objectives[i], [requests[i].rows["train"]],
                  requests[i].rows["val"], requests[i].seed * 100 + 60,
                  _affine(joined(base), joined(scalings[i]))) for i in wanted], wanted


def _rows_digest(rows: dict[str, np.ndarray]) -> str:
    """One split's train, val and test rows, as a key (each array's shape with its rows, so
    moving a row from one set to the next is another key)."""
    return array_digest(*(rows[s] for s in ("train", "val", "test")))


def _head_key(task: str, targets: str, fingerprint: dict, name: str, seed: int,
              rows: dict[str, np.ndarray], params: FitParams) -> str:
    """Everything a cross-fitted expert depends on (``stages.fit.head_store``): the same
    key, the same fit."""
    return head_key(task, targets, fingerprint, name, seed, _rows_digest(rows),
                    params.inputs.get(name, "features"), params.hidden, params.adapter,
                    params.lora_r, params.lora_alpha, params.lora_dropout, params.head_skip,
                    params.loss, params.lr, params.weight_decay, params.batch_size,
                    params.max_epochs, params.patience, params.oof_folds, params.bf16)


# The heads' batches are shuffled with this seed over the union of their members' rows (the
# split's training rows, or under cross-validation every labelled ECG), whichever experts
# and seeds a pass holds, so a head is the same whether trained alone or with others (and a
# stored head is the one a fresh fit trains).
SHUFFLE_SEED = 0


def labels_digest(targets: Targets) -> str:
    return array_digest(targets.y, targets.labelled, np.array(targets.classes, dtype=str))


def _task_heads(task: Task, targets: Targets, source: FeatureSource,
                requests: list[tuple[int, dict[str, np.ndarray]]], subjects: np.ndarray,
                params: FitParams, memo: HeadMemo) -> list[dict[str, ExpertFit]]:
    """``heads`` of one task."""
    return heads(task.name, labels_digest(targets),
                 lambda train: _objective(task, targets, train, params)[0], source, requests,
                 subjects, _d_out(task, targets), params, memo)


def _d_out(task: Task, targets: Targets) -> int:
    return 1 if task.kind == "regression" else len(targets.classes)


def heads(task: str, labels: str,
          objective_of: Callable[[np.ndarray], Objective | JointObjective],
          source: FeatureSource, requests: list[tuple[int, dict[str, np.ndarray]]],
          subjects: np.ndarray, d_out: int, params: FitParams, memo: HeadMemo
          ) -> list[dict[str, ExpertFit]]:
    """Every expert's cross-fitted head for each (seed, rows) request, fitting
    ``objective_of(training rows)`` (``labels``: a digest of its targets): those not in
    ``memo`` trained together in one pass (``cross_fit``; the folds of cross-validation with
    their own target and feature scaling), then kept in ``memo``."""
    names = list(params.backbones)
    config = _model_config(params)
    keys = [{b: _head_key(task, labels, source.fingerprints.get(b, {}), b, seed * 100 + k,
                          rows, params) for k, b in enumerate(names)}
            for seed, rows in requests]
    found: dict[str, ExpertFit] = {}
    missing: dict[str, tuple[str, int, int]] = {}  # key -> (expert, seed, request)
    for i, (seed, _) in enumerate(requests):
        for k, b in enumerate(names):
            key = keys[i][b]
            if key in found or key in missing:
                continue
            fit = memo.get(key, config)
            if fit is not None:
                found[key] = fit
            else:
                missing[key] = (b, seed * 100 + k, i)
    if missing:
        by_rows: dict[str, int] = {}  # one Split per distinct row sets
        split_at: dict[int, int] = {}  # request -> its Split
        splits: list[Split] = []
        for _, _, i in missing.values():
            rows = requests[i][1]
            digest = _rows_digest(rows)
            if digest not in by_rows:
                by_rows[digest] = len(splits)
                splits.append(Split(rows, objective_of(rows["train"]),
                                    source.scaling_of(rows["train"])))
            split_at[i] = by_rows[digest]
        jobs = {key: (b, seed, split_at[i]) for key, (b, seed, i) in missing.items()}
        saved = source.scaling
        source.scaling = (splits[0].scaling if len(splits) == 1 else source.scaling_of(
            np.unique(np.concatenate([split.rows["train"] for split in splits]))))
        try:
            fitted = cross_fit(list(jobs.values()), splits, source, subjects, d_out, config,
                               params, SHUFFLE_SEED, resolve_device(params.device))
        finally:
            source.scaling = saved
        dims = source.dims()
        for key, job in jobs.items():
            memo.put(key, fitted[job], dims[job[0]])
            found[key] = fitted[job]
    return [{b: found[keys[i][b]] for b in names} for i in range(len(requests))]


def head_memo(params: FitParams, cache_dir: Path) -> HeadMemo:
    """Where a fit keeps its cross-fitted heads (``fit.head_store``): beside the features
    (``true``), nowhere (``false``), or in a given folder. The folder is for `dvc exp run
    --queue`: each queued experiment runs in a copy of the workspace whose ``cache/``
    holds the features but not the heads, so a shared folder lets it reuse them."""
    if params.head_store is True:
        return HeadMemo(Path(cache_dir) / FOLDER)
    return HeadMemo(Path(params.head_store) if params.head_store else None)


def fit_split(task: Task, targets: Targets, source: FeatureSource, rows: dict[str, np.ndarray],
              subjects: np.ndarray, params: FitParams, seed: int, baselines: bool,
              memo: HeadMemo | None = None, fits: dict[str, ExpertFit] | None = None,
              scaled_on: np.ndarray | None = None, prefit: Prefit | None = None) -> SplitFit:
    """Cross-fit every expert on ``rows['train']``, fit the gate on their out-of-fold
    outputs and, with ``baselines``, every other combiner; outputs on val and test.

    ``memo`` keeps cross-fitted experts across calls (``pipeline compare``: variants that
    differ only in their gate or expert list share the same heads, fitted once). ``fits``:
    cross-fitted experts given instead (from ``fit_task``'s one pass, or a multi-task
    head's columns of this task), whose
    features were scaled on ``scaled_on`` (default ``rows['train']``). ``prefit``: this
    split's part of ``prefit_splits`` (fitted here when not given)."""
    memo = memo if memo is not None else HeadMemo()
    if fits is None:
        fits = _task_heads(task, targets, source, [(seed, rows)], subjects, params, memo)[0]
    if prefit is None:
        prefit = prefit_splits(task, targets, source, [
            SplitRequest(seed, rows, fits, scaled_on, baselines)], subjects, params, memo)[0]
    source.scaling = prefit.scaling
    objective, scale = _objective(task, targets, rows["train"], params)
    config = _model_config(params)
    names = list(params.backbones)
    dims = {b: source.dims()[b] for b in names}
    d_out = _d_out(task, targets)
    device = resolve_device(params.device)
    stacked = np.stack([fits[b].outputs for b in names], axis=1)  # (N, E, k)
    raw = {b: {s: stacked[rows[s], i] for s in ("val", "test")} for i, b in enumerate(names)}
    probes = prefit.probes
    learners = Combiners(stacked, names, objective, source, rows["val"], config,
                         _gate_settings(params), seed * 100 + 50, params.batch_size,
                         task.balance_classes, probes, device, prefit.combiners).learners
    losses: dict[str, float] = {}
    evaluated = [rows["val"], rows["test"]]
    fitted: dict = {}
    if len(names) == 1:
        choice = names[0]
    elif params.combiner == "select":
        per_row, scored, fitted = cross_validated_losses(
            learners, rows["train"], subjects, objective, params.oof_folds, seed * 100 + 70,
            # the kept fits of the combiners reported anyway join their selection folds'
            # solve (the stacker's logistic path is one batched solve either way)
            also={name: (rows["train"], evaluated) for name in
                  [GATE_NAME, *([STACKING] if baselines else [])] if name in learners})
        choice = choose(per_row, subjects[scored], GATE_NAME, params.combiner_alpha)
        losses = {name: float(loss.mean()) for name, loss in per_row.items()}
    else:
        choice = GATE_NAME
    if choice not in fitted:
        fitted[choice] = learners[choice]([(rows["train"], evaluated)])[0]
    shown = [GATE_NAME] if len(names) > 1 else []  # the gate's weights are always reported
    if baselines and len(names) > 1:
        shown.append(STACKING)
    for name in shown:
        if name not in fitted:
            fitted[name] = learners[name]([(rows["train"], evaluated)])[0]
        if baselines and (name != GATE_NAME or params.combiner != GATE_NAME):
            raw[name] = dict(zip(("val", "test"), fitted[name].outputs, strict=True))
    raw[ENSEMBLE] = dict(zip(("val", "test"), fitted[choice].outputs, strict=True))
    gate = fitted[GATE_NAME] if len(names) > 1 else None
    gate_test = (gate.weights if gate is not None
                 else np.ones((len(rows["test"]), 1), dtype=np.float32))
    if baselines:
        raw.update(_baselines(task, source, objective, stacked, rows, names, params,
                              prefit.weight_generator))
        raw.update({PROBE + b: {s: probe.outputs[rows[s]] for s in ("val", "test")}
                    for b, probe in probes.items()})
    y = targets.y
    methods = {name: _Method(task, out["val"], out["test"], y[rows["val"]], y[rows["test"]],
                             scale) for name, out in raw.items()}
    model = Ensemble(dims, source.dims()[GATE], d_out, objective.classification, config)
    for b in names:
        model.heads[b] = fits[b].head
    model.gate = gate.gate if gate is not None else None
    return SplitFit(rows, methods, stacked[rows["test"]], gate_test, model.eval(), scale,
                    dict(source.scaling), fitted[choice].spec, losses)


def _probes(task: Task, targets: Targets, source: FeatureSource,
            requests: list[SplitRequest], subjects: np.ndarray, params: FitParams,
            memo: HeadMemo) -> list[dict[str, ProbeFit]]:
    """Every expert's cross-fitted linear probe (``cross_fit_probes``) for each request,
    the candidates a combiner may choose: those not in ``memo`` fitted together (a
    regression probe's fold fits read off its heads' linear starts where the heads were
    just trained, ``ExpertFit.fold_ridges``), then kept there like heads (the fits of
    other head or gate settings, and the multi-task fit, reuse them)."""
    names, d_out = list(params.backbones), _d_out(task, targets)
    labels = labels_digest(targets)
    found: dict[str, ProbeFit] = {}
    missing: dict[str, ProbeJob] = {}
    keys = []
    for request in requests:
        seed, rows = request.seed, request.rows
        keys.append({})
        objective = _objective(task, targets, rows["train"], params)[0]
        for k, b in enumerate(names):
            key = keys[-1][b] = head_key(
                "probe", task.name, labels, source.fingerprints.get(b, {}), b, seed * 100 + k,
                _rows_digest(rows), params.inputs.get(b, "features"), params.loss,
                params.oof_folds)
            if key in found or key in missing:
                continue
            fit = memo.get_probe(key, objective.classification, d_out)
            if fit is not None:
                found[key] = fit
            else:
                missing[key] = ProbeJob(b, rows, objective, seed * 100 + k,
                                        request.fits[b].fold_ridges)
    if missing:
        fitted = cross_fit_probes(list(missing.values()), source, subjects, d_out,
                                  task.balance_classes, params.oof_folds)
        for key, fit in zip(missing, fitted, strict=True):
            memo.put_probe(key, fit)
            found[key] = fit
    return [{b: found[key] for b, key in own.items()} for own in keys]


def _gate_settings(params: FitParams) -> dict:
    return {"lr": params.gate_lr, "weight_decay": params.weight_decay,
            "batch_size": params.batch_size, "max_epochs": params.max_epochs,
            "patience": params.patience, "prior": params.gate_prior,
            "expected": params.gate_loss == "expected", "bf16": params.bf16}


def _baselines(task: Task, source: FeatureSource, objective: Objective, stacked: np.ndarray,
               rows: dict[str, np.ndarray], names: list[str], params: FitParams,
               weight_generator: dict[str, np.ndarray] | None
               ) -> dict[str, dict[str, np.ndarray]]:
    raw: dict[str, dict[str, np.ndarray]] = {}
    y = objective.y
    val, test = stacked[rows["val"]], stacked[rows["test"]]
    if source.in_memory and (len(names) == 1 or params.combiner != "select"):
        for b in names:  # (else cross-fitted as candidates of the combiner)
            raw[PROBE + b] = linear_probe(b, source, objective, rows, stacked.shape[2],
                                          task.balance_classes)[1]
    if len(names) == 1:
        return raw
    raw[UNIFORM] = {"val": val.mean(axis=1), "test": test.mean(axis=1)}
    weights = greedy_weights(val, y[rows["val"]], objective)
    raw["greedy"] = {"val": fixed_mixture(val, weights), "test": fixed_mixture(test, weights)}
    if objective.classification:
        raw["confidence"] = {s: np.einsum("ne,nek->nk", confidence_weights(o), o)
                             for s, o in (("val", val), ("test", test))}
    if weight_generator is not None:
        raw["weight_generator"] = weight_generator
    return raw


def _trivial(task: Task, targets: Targets, rows: dict[str, np.ndarray]) -> _Method:
    """Train mean, or train majority class, as a method (it gets intervals like the rest)."""
    y_train, n_val, n_test = targets.y[rows["train"]], len(rows["val"]), len(rows["test"])
    if task.kind == "regression":
        value = np.array([[float(y_train.mean())]], dtype=np.float32)
        scale = {"mean": 0.0, "std": 1.0}
    else:
        value = np.zeros((1, len(targets.classes)), dtype=np.float32)
        value[0, int(np.bincount(y_train, minlength=len(targets.classes)).argmax())] = 1.0
        scale = {}
    method = _Method(task, np.repeat(value, n_val, 0), np.repeat(value, n_test, 0),
                     targets.y[rows["val"]], targets.y[rows["test"]], scale)
    if task.kind == "binary":
        method.threshold = 0.5
    return method


# Fit settings that cannot change a result: where outputs go, and where it runs (a GPU
# gives the CPU's result within float tolerance; streaming gives the in-memory batches).
NEUTRAL_SETTINGS = ("metrics", "models", "predictions", "device", "max_memory_gb", "head_store")


def fit_settings(params: FitParams) -> dict:
    """Every ``fit:`` setting a result depends on, as saved beside it in the metrics, so a
    result is reused only by a fit with the same settings (``pipeline compare``)."""
    return {k: v for k, v in dataclasses.asdict(params).items() if k not in NEUTRAL_SETTINGS}


def evaluation_mode(params: FitParams, n_labelled: int) -> str:
    if params.evaluation != "auto":
        return params.evaluation
    return "cv" if n_labelled <= params.cv_max_ecgs else "split"


def cv_rows(labelled: np.ndarray, subjects: np.ndarray, k: int, seed: int,
            strata: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """K subject-grouped folds over ``labelled`` rows; each fold's training subjects lose
    a subject-grouped ``VAL_FRACTION`` to validation. ``strata`` (a class per cohort row,
    for classification) spreads each class over the test folds and the validation sets."""
    def of(rows: np.ndarray) -> np.ndarray | None:
        return None if strata is None else strata[rows]

    folds = group_folds(subjects[labelled], k, seed, of(labelled))
    out = []
    for fold in range(folds.max() + 1):
        pool = labelled[folds != fold]
        inner = group_folds(subjects[pool], round(1 / VAL_FRACTION), seed + 7919 + fold,
                            of(pool))
        out.append({"train": pool[inner != 0], "val": pool[inner == 0],
                    "test": labelled[folds == fold]})
    return out


@dataclass
class _Pooled:
    """One method's decisions (and binary scores) on the evaluated rows of one seed."""

    decision: np.ndarray
    score: np.ndarray | None


def _pool(task: Task, fits: list[SplitFit], trivial: list[_Method], order: np.ndarray
          ) -> dict[str, _Pooled]:
    """Every method's test decisions, folds put back in cohort-row order ``order``."""
    test_rows = np.concatenate([f.rows["test"] for f in fits])
    position = np.argsort(test_rows)[np.searchsorted(np.sort(test_rows), order)]
    pooled = {}
    for name in fits[0].methods:
        methods = [f.methods[name] for f in fits]
        pooled[name] = _pooled(task, methods, position)
    pooled[task.trivial_name] = _pooled(task, trivial, position)
    return pooled


def _pooled(task: Task, methods: list[_Method], position: np.ndarray) -> _Pooled:
    decision = np.concatenate([m.prediction() for m in methods])[position]
    binary = task.kind == "binary"
    return _Pooled(decision, np.concatenate([m.test for m in methods])[position]
                   if binary else None)


def fit_task(task_name: str, params: FitParams, cohort_path: Path, cache_dir: Path,
             seeds: int | None = None, baselines: bool = True, memo: HeadMemo | None = None
             ) -> FitResult:
    """Fit and evaluate one task (the ensemble, and with ``baselines`` every baseline);
    the caller writes the result. ``memo``: see ``fit_split``; by default the heads stored
    under ``cache_dir`` (``fit.head_store``)."""
    task = TASKS[task_name]
    cohort = pd.read_parquet(cohort_path)
    split = cohort["split"].to_numpy()
    subjects = cohort["subject_id"].astype(str).to_numpy()
    labelled_any = cohort[task_name].notna().to_numpy()
    mode = evaluation_mode(params, int(labelled_any.sum()))
    targets = encode(task, cohort[task_name], split == "train" if mode == "split"
                     else labelled_any)
    fixed = {s: np.flatnonzero((split == s) & targets.labelled) for s in ("train", "val", "test")}
    n = {s: len(r) for s, r in fixed.items()}
    labelled = np.flatnonzero(targets.labelled)
    empty = [s for s, count in n.items() if count == 0]
    if mode == "split" and empty:
        raise TaskSkipped(f"no {task_name} labels in the {', '.join(empty)} split(s) of "
                          f"{cohort_path}")
    if mode == "cv" and len(np.unique(subjects[labelled])) < max(params.cv_folds, 2):
        raise TaskSkipped(f"{len(np.unique(subjects[labelled]))} labelled subjects for "
                          f"{task_name} in {cohort_path}: too few for {params.cv_folds}-fold "
                          "cross-validation")
    source = load_features(cache_dir, params.backbones, cohort_digest(cohort_path), len(cohort),
                           params.max_memory_gb, params.inputs, params.gate_inputs)
    seeds_list = list(range(params.seeds if seeds is None else seeds))
    evaluated = fixed["test"] if mode == "split" else labelled
    memo = head_memo(params, cache_dir) if memo is None else memo
    strata = None if task.kind == "regression" else targets.y
    folds = {seed: [fixed] if mode == "split" else cv_rows(labelled, subjects, params.cv_folds,
                                                          seed, strata)
             for seed in seeds_list}
    requests = [(seed, rows) for seed in seeds_list for rows in folds[seed]]
    evaluating = len(requests)
    if not empty and mode == "cv":  # the saved model's, fitted on the fixed split
        requests += [(seed, fixed) for seed in seeds_list]
    experts = _task_heads(task, targets, source, requests, subjects, params,  # one pass
                          memo)
    planned = [SplitRequest(seed, rows, fits, None, baselines and i < evaluating)
               for i, ((seed, rows), fits) in enumerate(zip(requests, experts, strict=True))]
    fitted = iter([fit_split(task, targets, source, plan.rows, subjects, params, plan.seed,
                             plan.baselines, memo, plan.fits, prefit=ready)
                   for plan, ready in zip(planned, prefit_splits(
                       task, targets, source, planned, subjects, params, memo), strict=True)])
    fold_fits = {seed: [next(fitted) for _ in folds[seed]] for seed in seeds_list}
    finals = {seed: next(fitted) for seed in seeds_list} if len(requests) > evaluating else {}
    per_seed: list[dict[str, _Pooled]] = []
    predictions, models, gate_means = [], {}, []
    choices: list[str] = []
    losses: list[dict[str, float]] = []
    final: SplitFit | None = None
    for seed in seeds_list:
        fits = fold_fits[seed]
        per_seed.append(_pool(task, fits, [_trivial(task, targets, r) for r in folds[seed]],
                              evaluated))
        gate_means.append(np.concatenate([f.gate for f in fits]).mean(axis=0))
        predictions.append(_prediction_rows(task, targets, cohort, fits, seed))
        final = fits[0] if mode == "split" else finals.get(seed)
        if final is not None:
            models[seed] = {"model": final.model, "combiner": final.combiner,
                            "threshold": final.methods[ENSEMBLE].threshold}
        choices.extend(fit.combiner["name"] for fit in fits)
        losses.extend(fit.losses for fit in fits if fit.losses)
    y = targets.y[evaluated]
    methods = {}
    for name in per_seed[0]:
        methods[name] = _aggregate([score(task, y, p[name].decision, p[name].score)
                                    for p in per_seed])
    level = _intervals(task, y, per_seed, subjects[evaluated], params)
    for name, extra in level.items():
        methods[name][task.metric] = {**methods[name][task.metric], "ci": extra["ci"]}
    names = list(params.backbones)
    order = [ENSEMBLE, task.trivial_name, *names, *(m for m in methods
                                                   if m not in (ENSEMBLE, task.trivial_name,
                                                                *names))]
    metrics = {
        "task": task_name, "kind": task.kind, "metric": task.metric, "n": n,
        "evaluation": {"mode": mode, "folds": params.cv_folds if mode == "cv" else None,
                       "n_evaluated": len(evaluated), "bootstrap": params.bootstrap,
                       "level": 0.95, "resampled": "subjects",
                       "subjects": len(np.unique(subjects[evaluated]))},
        "sources": _sources(cohort, evaluated),
        "seeds": seeds_list, "backbones": names,
        "random_weights": {b: bool(source.fingerprints[b].get("random_weights"))
                           for b in names},
        "methods": {m: methods[m] for m in order},
        "vs_ensemble": {m: level[m]["vs_" + ENSEMBLE] for m in order if m in level},
        "gate_weights": {b: {"mean": float(np.mean([g[i] for g in gate_means])),
                             "std": float(np.std([g[i] for g in gate_means]))}
                         for i, b in enumerate(names)} if len(names) > 1 else {},
        "gate_inputs": list(params.gate_inputs),
        "adapter": params.adapter, "head_skip": params.head_skip,
        "oof_folds": params.oof_folds, "gate_prior": params.gate_prior,
        "gate_loss": params.gate_loss,
        "combiner": {"setting": params.combiner,
                     "chosen": {c: choices.count(c) for c in dict.fromkeys(choices)},
                     "cv_loss": _aggregate(losses) if losses else {}},
        "inputs": {b: params.inputs.get(b, "features") for b in names},
        "trainable": final.model.trainable() if final is not None else {},
        "classes": targets.classes if task.kind == "multiclass" else None,
        "settings": fit_settings(params),
    }
    dims = {b: source.dims()[b] for b in names}
    config = _model_config(params)
    if final is not None:  # heads per expert: the bag of its cross-fitting folds
        config = dataclasses.replace(config, bag=bag_size(final.model.heads[names[0]]))
    scale = final.scale if final is not None else {}
    scaling = final.scaling if final is not None else {}
    return FitResult(metrics, pd.concat(predictions, ignore_index=True), models, scale,
                     targets.classes, source.fingerprints, config, dims,
                     source.dims()[GATE], scaling)


def _sources(cohort: pd.DataFrame, rows: np.ndarray) -> dict[str, int]:
    """Evaluated ECGs per source archive, so a report can say when they are synthetic."""
    if "source" not in cohort:
        return {}
    counts = cohort["source"].iloc[rows].astype(str).value_counts()
    return {str(k): int(v) for k, v in counts.items()}


def _intervals(task: Task, y: np.ndarray, per_seed: list[dict[str, _Pooled]],
               subjects: np.ndarray, params: FitParams) -> dict[str, dict]:
    if not params.bootstrap:
        return {}
    decisions = {name: np.stack([p[name].decision for p in per_seed]) for name in per_seed[0]}
    return intervals(task.metric, y, decisions, subjects, ENSEMBLE, n_boot=params.bootstrap)


def _prediction_rows(task: Task, targets: Targets, cohort: pd.DataFrame, fits: list[SplitFit],
                     seed: int) -> pd.DataFrame:
    frames = []
    names = list(fits[0].model.experts)
    for fold, fit in enumerate(fits):
        rows, method = fit.rows["test"], fit.methods[ENSEMBLE]
        frame = pd.DataFrame({"record_id": cohort["record_id"].to_numpy()[rows], "seed": seed,
                              "fold": fold})
        y, prediction = targets.y[rows], method.prediction()
        if task.kind == "regression":
            frame["truth"], frame["prediction"] = y.astype(float), prediction.astype(float)
            values = fit.experts[:, :, 0] * fit.scale["std"] + fit.scale["mean"]
        elif task.kind == "binary":
            frame["truth"], frame["prediction"] = y, prediction
            frame["score"] = method.test
            values = fit.experts[:, :, 1]
        else:
            classes = np.array(targets.classes)
            frame["truth"], frame["prediction"] = classes[y], classes[prediction]
            values = classes[fit.experts.argmax(axis=-1)]
        gate = (fit.gate if fit.gate.shape[1] == len(names)
                else np.ones((len(rows), len(names)), dtype=np.float32))
        for i, name in enumerate(names):
            frame[f"expert_{name}"] = values[:, i]
            frame[f"gate_{name}"] = gate[:, i]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)



@dataclass
class FitResult:
    metrics: dict
    predictions: pd.DataFrame
    models: dict[int, dict]
    scale: dict
    classes: list[str]
    fingerprints: dict[str, dict]
    config: ModelConfig
    dims: dict[str, int]
    gate_dim: int
    feature_scaling: dict[str, tuple[np.ndarray, np.ndarray]]

    def write(self, params: FitParams) -> None:
        """models/<task>/seed<k>.pt, predictions/<task>.parquet, then metrics/<task>.json.

        Each output is swapped in whole (``pipeline.staging``), metrics last: a killed fit
        leaves every file either as the previous run wrote it or as this one did.
        """
        task = self.metrics["task"]
        with staged_dir(Path(params.models) / task) as folder:
            for seed, saved in self.models.items():
                torch.save({"task": task, "classes": self.classes, "target_scale": self.scale,
                            "threshold": saved["threshold"], "combiner": saved["combiner"],
                            "model_config": self.config.describe(),
                            "dims": self.dims, "gate_dim": self.gate_dim,
                            "fingerprints": self.fingerprints,
                            "feature_scaling": {k: (torch.from_numpy(m), torch.from_numpy(s))
                                                for k, (m, s) in self.feature_scaling.items()},
                            "state_dict": saved["model"].state_dict()},
                           folder / f"seed{seed}.pt")
        _write_predictions(Path(params.predictions) / f"{task}.parquet", self.predictions)
        write_metrics(Path(params.metrics) / f"{task}.json", self.metrics)


def write_metrics(path: Path, metrics: dict) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")


def _write_predictions(path: Path, frame: pd.DataFrame) -> None:
    with staged_file(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_skipped(task_name: str, reason: str, params: FitParams, n: dict | None = None) -> dict:
    """A task that cannot be fitted leaves a metrics file saying why, and empty outputs,
    so the report lists it and DVC finds every declared output."""
    metrics = {"task": task_name, "skipped": reason,
               "n": n or {"train": 0, "val": 0, "test": 0}}
    with staged_dir(Path(params.models) / task_name):
        pass
    _write_predictions(Path(params.predictions) / f"{task_name}.parquet",
                       pd.DataFrame({"record_id": pd.Series(dtype=str)}))
    write_metrics(Path(params.metrics) / f"{task_name}.json", metrics)
    return metrics


def load_model(path: Path, fingerprints: dict[str, dict]) -> tuple[Ensemble, dict]:
    """A saved ensemble, refused unless ``fingerprints`` match the features it learnt from."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    check_model_features(saved, fingerprints)
    classification = bool(saved["classes"]) and TASKS[saved["task"]].kind != "regression"
    d_out = len(saved["classes"]) if classification else 1
    model = Ensemble(saved["dims"], saved["gate_dim"], d_out, classification,
                     ModelConfig(**saved["model_config"]))
    model.load_state_dict(renamed_from_peft(saved["state_dict"]))
    return model.eval(), saved


def check_model_features(saved: dict, fingerprints: dict[str, dict]) -> None:
    """Refuse to use heads with features other than the ones they were trained on (the
    cohort they are computed on may differ: that is what a model is for)."""
    for name, want in saved["fingerprints"].items():
        have = fingerprints.get(name)
        differences = (["no features"] if have is None
                       else feature_differences(want, have))
        if differences:
            raise CacheError(
                f"this model was trained on {name} features that differ from the ones given "
                f"({'; '.join(differences)}); re-run `pipeline fit-ensemble` on the current "
                "cache, or extract with the model's backbone settings"
            )

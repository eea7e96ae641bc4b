"""One model for all tasks (ECG-MoE's multi-task fusion), fitted from the cache as the
single-task ensembles are.

Per expert one head whose trunk (``Linear(D,h)-ReLU-Linear(h,h)-ReLU``, LoRA-adapted like
the single-task heads) every task shares, with an output layer and linear path per task:
trained on every row labelled for any task, each task's loss counting only its own labelled
rows (``stages.fit.train.JointObjective``), so a partly labelled cohort trains one model.
These heads are cross-fitted in one batched pass like the single-task heads (out-of-fold
outputs on the training rows, the fold heads averaged elsewhere; kept in the head store),
and each task then gets from its columns what a single-task fit gets from its own heads
(``stages.fit.run.fit_split``): its combiner chosen by cross-validated loss (the gate,
stacking, one expert, ...), evaluated on the fixed test split or, on cohorts of at most
``cv_max_ecgs`` ECGs labelled for any task, by subject-grouped cross-validation. Rows and
folds are those of the ECGs labelled for any task, shared by every task, so one task's
test rows are never another's training rows.

Before (2026-11-30 to 12-07) the heads and the gates were trained jointly on the same rows,
without cross-fitting or a combiner choice: on the demo its RR error was twice the
single-task ensemble's, since a gate fitted on the rows its heads memorised trusts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.params import TASKS as TASK_IDS
from pipeline.params import FitParams
from stages.fit.crossfit import ExpertFit
from stages.fit.features import FeatureSource, load_features
from stages.fit.head_store import HeadMemo
from stages.fit.model import head_columns
from stages.fit.run import (
    ENSEMBLE,
    SplitRequest,
    _aggregate,
    _d_out,
    _intervals,
    _objective,
    _pool,
    _trivial,
    cohort_digest,
    cv_rows,
    evaluation_mode,
    fit_split,
    head_memo,
    heads,
    labels_digest,
    prefit_splits,
)
from stages.fit.tasks import TASKS, Targets, encode, score
from stages.fit.train import JointObjective, TaskColumns

Rows = dict[str, np.ndarray]


def _columns(targets: dict[str, Targets]) -> dict[str, slice]:
    """Each task's output columns in the multi-task heads, in task order."""
    out, start = {}, 0
    for name, encoded in targets.items():
        width = _d_out(TASKS[name], encoded)
        out[name], start = slice(start, start + width), start + width
    return out


def _joint_objective(targets: dict[str, Targets], columns: dict[str, slice], train: np.ndarray,
                     params: FitParams) -> JointObjective:
    """Every task's objective on its labelled rows among ``train``; unlabelled rows get a
    placeholder target (class 0, or 0) that their mask keeps out of the loss."""
    parts = []
    for name, encoded in targets.items():
        filled = Targets(np.where(encoded.labelled, encoded.y, 0).astype(encoded.y.dtype),
                         encoded.labelled, encoded.classes)
        objective = _objective(TASKS[name], filled, train[encoded.labelled[train]], params)[0]
        parts.append(TaskColumns(name, columns[name], objective, encoded.labelled))
    return JointObjective(parts)


def _task_part(fit: ExpertFit, columns: slice) -> ExpertFit:
    return ExpertFit(fit.outputs[:, columns], head_columns(fit.head, columns))


def _rarest_class(targets: dict[str, Targets]) -> np.ndarray:
    """Per row, the rarest (task, class) among the classification tasks that label it ("-"
    where none does): the multi-task fit's folds are stratified by it, so a rare class of
    any task (potassium's positives) reaches every validation set, as in its own fit."""
    n = len(next(iter(targets.values())).y)
    frequency, stratum = np.full(n, np.inf), np.full(n, "-", dtype=object)
    for name, encoded in targets.items():
        if TASKS[name].kind == "regression":
            continue
        y = encoded.y.astype(np.int64)
        counts = np.bincount(y[encoded.labelled], minlength=y.max() + 1)
        rarer = encoded.labelled & (counts[y] < frequency)
        frequency[rarer] = counts[y[rarer]]
        stratum[rarer] = [f"{name}:{c}" for c in y[rarer]]
    return stratum.astype(str)


def _skip_reason(name: str, encoded: Targets, rows: list[Rows], subjects: np.ndarray,
                 mode: str, folds: int) -> str | None:
    if mode == "cv" and len(np.unique(subjects[encoded.labelled])) < max(folds, 2):
        return f"too few labelled subjects for {folds}-fold cross-validation"
    for r in rows:
        empty = [s for s, part in r.items() if not encoded.labelled[part].any()]
        if empty:
            return f"no {name} labels in the {', '.join(empty)} rows of a fold or split"
    return None


def fit_multitask(params: FitParams, cohort_path: Path, cache_dir: Path,
                  tasks: list[str] | None = None, seeds: int | None = None,
                  memo: HeadMemo | None = None) -> dict:
    """Fit one multi-task model for ``tasks`` (default all five) and evaluate each task;
    returns metrics per task (the ensemble's under ``multitask``, every method's under
    ``methods``) and the tasks skipped with why. ``memo``: where cross-fitted heads are
    kept (default the head store)."""
    cohort = pd.read_parquet(cohort_path)
    split = cohort["split"].to_numpy()
    subjects = cohort["subject_id"].astype(str).to_numpy()
    names = list(tasks or TASK_IDS)
    any_label = np.any([cohort[t].notna().to_numpy() for t in names], axis=0)
    mode = evaluation_mode(params, int(any_label.sum()))
    fitted_on = split == "train" if mode == "split" else any_label  # classes come from here
    targets = {t: encode(TASKS[t], cohort[t], fitted_on) for t in names}
    seeds_list = list(range(params.seeds if seeds is None else seeds))
    labelled = np.flatnonzero(any_label)
    fixed = {s: np.flatnonzero((split == s) & any_label) for s in ("train", "val", "test")}
    strata = _rarest_class(targets)
    folds = {seed: [fixed] if mode == "split" else cv_rows(labelled, subjects, params.cv_folds,
                                                          seed, strata)
             for seed in seeds_list}
    every_rows = [r for seed in seeds_list for r in folds[seed]]
    skipped = {t: reason for t in names if (reason := _skip_reason(
        t, targets[t], every_rows, subjects, mode, params.cv_folds))}
    targets = {t: encoded for t, encoded in targets.items() if t not in skipped}
    if not targets:
        raise ValueError(f"no task can be fitted on {cohort_path}: "
                         + "; ".join(f"{t}: {r}" for t, r in skipped.items()))
    source = load_features(cache_dir, params.backbones, cohort_digest(cohort_path), len(cohort),
                           params.max_memory_gb, params.inputs, params.gate_inputs)
    columns = _columns(targets)
    requests = [(seed, rows) for seed in seeds_list for rows in folds[seed]]
    memo = head_memo(params, cache_dir) if memo is None else memo
    fitted = heads("+".join(targets), "+".join(labels_digest(t) for t in targets.values()),
                   lambda train: _joint_objective(targets, columns, train, params), source,
                   requests, subjects, columns[list(targets)[-1]].stop, params, memo)
    result: dict = {"seeds": seeds_list, "backbones": list(params.backbones),
                    "gate_inputs": list(params.gate_inputs), "evaluation": mode,
                    "tasks": {}, "skipped": skipped}
    for name, encoded in targets.items():
        result["tasks"][name] = _evaluate(name, encoded, columns[name], source, folds, fitted,
                                          subjects, params, memo)
    return result


def _evaluate(name: str, encoded: Targets, columns: slice, source: FeatureSource,
              folds: dict[int, list[Rows]], fitted: list[dict[str, ExpertFit]],
              subjects: np.ndarray, params: FitParams, memo: HeadMemo) -> dict:
    """One task's ensemble from its columns of the multi-task heads (``fitted``: one per
    seed and rows of ``folds``, in order), as ``fit_task`` evaluates a single-task fit
    (without baselines). Its linear probes are the single-task fit's, read from ``memo``
    when the rows are the same (the fixed split)."""
    task = TASKS[name]
    per_seed, choices = [], []
    evaluated = np.sort(np.concatenate([r["test"] for r in next(iter(folds.values()))]))
    evaluated = evaluated[encoded.labelled[evaluated]]
    planned = [SplitRequest(seed, {s: r[encoded.labelled[r]] for s, r in rows.items()},
                            {b: _task_part(f, columns) for b, f in experts.items()},
                            rows["train"], False)
               for (seed, rows), experts in zip(
                   ((seed, rows) for seed, rows_list in folds.items() for rows in rows_list),
                   fitted, strict=True)]
    prefits = prefit_splits(task, encoded, source, planned, subjects, params, memo)
    ready = iter(zip(planned, prefits, strict=True))
    for rows_list in folds.values():
        plans = [next(ready) for _ in rows_list]
        fits = [fit_split(task, encoded, source, plan.rows, subjects, params, plan.seed, False,
                          memo=memo, fits=plan.fits, scaled_on=plan.scaled_on, prefit=prefit)
                for plan, prefit in plans]
        trivial = [_trivial(task, encoded, plan.rows) for plan, _ in plans]
        per_seed.append(_pool(task, fits, trivial, evaluated))
        choices.extend(fit.combiner["name"] for fit in fits)
    y = encoded.y[evaluated]
    methods = {m: _aggregate([score(task, y, p[m].decision, p[m].score) for p in per_seed])
               for m in per_seed[0]}
    for m, extra in _intervals(task, y, per_seed, subjects[evaluated], params).items():
        methods[m][task.metric] = {**methods[m][task.metric], "ci": extra["ci"]}
    return {"metric": task.metric, "n_test": len(evaluated),
            "multitask": methods[ENSEMBLE], "methods": methods,
            "combiner": {c: choices.count(c) for c in dict.fromkeys(choices)}}


def compare_with_single_task(result: dict, metrics_dir: Path) -> dict:
    """Add each task's single-task ensemble from ``metrics/<task>.json`` when it was fitted
    with the same experts, gate inputs, seeds and evaluation (else say why it is not
    comparable)."""
    for task, entry in result["tasks"].items():
        path = Path(metrics_dir) / f"{task}.json"
        single = json.loads(path.read_text()) if path.exists() else {}
        same = (all(single.get(k) == result[k] for k in ("backbones", "seeds", "gate_inputs"))
                and single.get("evaluation", {}).get("mode") == result["evaluation"])
        if single.get("methods") and same:
            entry["single_task"] = single["methods"]["ensemble"]
        else:
            entry["single_task"] = None
            entry["single_task_note"] = (f"{path} missing, or fitted with other experts, "
                                         "gate inputs, seeds or evaluation; run "
                                         f"`pipeline fit-ensemble --task {task}` with the "
                                         "same settings")
    return result

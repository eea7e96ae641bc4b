"""The fit stage for one task: the ensemble and its baselines, over seeds, from the cache.

Per seed, from the same cached features and the same subject-level splits:
* ``ensemble``: every expert's head + the gate (EnECG);
* ``<backbone>``: that expert's head alone (same head, same training);
* ``uniform``: the plain average of those single-expert models;
* the trivial predictor (train mean, or majority class).
Regression targets are standardised on train; ``ka`` uses balanced class weights; the F1
threshold of every binary method is chosen on validation. Metrics are on test, reported as
mean ± std over seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline.feature_cache import CacheError
from pipeline.params import FitParams
from stages.fit.features import GATE, load_features
from stages.fit.model import Ensemble, ModelConfig
from stages.fit.tasks import TASKS, Targets, Task, best_f1_threshold, encode, score
from stages.fit.train import Objective, predict, train

ENSEMBLE, UNIFORM = "ensemble", "uniform"


class TaskSkipped(Exception):
    """The task cannot be fitted on this cohort (e.g. no labels); the message says why."""


def cohort_digest(path: Path) -> str:
    meta = pq.read_schema(path).metadata or {}
    return meta.get(b"cohort_digest", b"").decode()


def _model_config(params: FitParams) -> ModelConfig:
    return ModelConfig(hidden=params.hidden, adapter=params.adapter, lora_r=params.lora_r,
                       lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                       gate_hidden=params.gate_hidden, gate_mode=params.gate_mode)


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
    """Outputs of one method on validation and test, turned into metrics."""

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


def _trivial(task: Task, targets: Targets, rows: dict[str, np.ndarray]) -> dict:
    y_train, y_test = targets.y[rows["train"]], targets.y[rows["test"]]
    if task.kind == "regression":
        prediction = np.full(len(y_test), y_train.mean())
        return score(task, y_test, prediction)
    majority = int(np.bincount(y_train).argmax())
    prediction = np.full(len(y_test), majority)
    return score(task, y_test, prediction, np.full(len(y_test), float(majority)))


def _aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for key in per_seed[0]:
        values = [m[key] for m in per_seed if m[key] is not None]
        out[key] = ({"mean": float(np.mean(values)), "std": float(np.std(values))}
                    if values else None)
    return out


def fit_task(task_name: str, params: FitParams, cohort_path: Path, cache_dir: Path,
             seeds: int | None = None, baselines: bool = True) -> FitResult:
    """Fit and evaluate one task (the ensemble, and with ``baselines`` each expert alone and
    their uniform average); the caller writes the result."""
    task = TASKS[task_name]
    cohort = pd.read_parquet(cohort_path)
    split = cohort["split"].to_numpy()
    targets = encode(task, cohort[task_name], split == "train")
    rows = {s: np.flatnonzero((split == s) & targets.labelled) for s in ("train", "val", "test")}
    n = {s: len(r) for s, r in rows.items()}
    empty = [s for s, count in n.items() if count == 0]
    if empty:
        raise TaskSkipped(f"no {task_name} labels in the {', '.join(empty)} split(s) of "
                          f"{cohort_path}")
    source = load_features(cache_dir, params.backbones, cohort_digest(cohort_path), len(cohort),
                           params.max_memory_gb, params.inputs, params.gate_inputs)
    source.fit_scaling(rows["train"])
    objective, scale = _objective(task, targets, rows["train"], params)
    config = _model_config(params)
    dims = {b: d for b, d in source.dims().items() if b != GATE}
    d_out = 1 if task.kind == "regression" else len(targets.classes)
    seeds_list = list(range(params.seeds if seeds is None else seeds))
    per_method: dict[str, list[dict]] = {}
    predictions, models, gate_means, trainable = [], {}, [], {}
    for seed in seeds_list:
        methods = {}
        for k, name in enumerate([*params.backbones, ENSEMBLE]):
            if not baselines and name != ENSEMBLE:
                continue  # same seeds either way, so the ensemble is the same
            torch.manual_seed(seed * 1000 + k)  # a fresh model and optimiser per seed/method
            members = dims if name == ENSEMBLE else {name: dims[name]}
            model = Ensemble(members, source.dims()[GATE], d_out, task.kind != "regression",
                             config)
            train(model, source, objective, rows["train"], rows["val"], params, seed)
            val_out, _, _ = predict(model, source, rows["val"], params.batch_size)
            test_out, test_experts, test_gate = predict(model, source, rows["test"],
                                                        params.batch_size)
            methods[name] = _Method(task, val_out, test_out, targets.y[rows["val"]],
                                    targets.y[rows["test"]], scale)
            if name == ENSEMBLE:
                models[seed] = {"model": model, "threshold": methods[name].threshold}
                trainable = model.trainable()
                gate_means.append(test_gate.mean(axis=0))
                predictions.append(_prediction_rows(task, targets, cohort, rows["test"], seed,
                                                    methods[name], test_experts, test_gate,
                                                    list(dims), scale))
        if baselines:
            singles = [methods[b] for b in params.backbones]
            uniform_val = np.mean([_raw(m, "val") for m in singles], axis=0)
            uniform_test = np.mean([_raw(m, "test") for m in singles], axis=0)
            methods[UNIFORM] = _Method(task, uniform_val, uniform_test,
                                       targets.y[rows["val"]], targets.y[rows["test"]],
                                       {"mean": 0.0, "std": 1.0})
        for name, method in methods.items():
            per_method.setdefault(name, []).append(method.metrics())
    trivial = _trivial(task, targets, rows)
    metrics = {
        "task": task_name, "kind": task.kind, "metric": task.metric, "n": n,
        "seeds": seeds_list, "backbones": list(params.backbones),
        "random_weights": {b: bool(source.fingerprints[b].get("random_weights"))
                           for b in params.backbones},
        "methods": {ENSEMBLE: _aggregate(per_method[ENSEMBLE]),
                    task.trivial_name: {k: {"mean": v, "std": 0.0} if v is not None else None
                                        for k, v in trivial.items()},
                    **{name: _aggregate(values) for name, values in per_method.items()
                       if name != ENSEMBLE}},
        "gate_weights": {b: {"mean": float(np.mean([g[i] for g in gate_means])),
                             "std": float(np.std([g[i] for g in gate_means]))}
                         for i, b in enumerate(dims)},
        "gate_inputs": list(params.gate_inputs),
        "adapter": params.adapter, "inputs": {b: params.inputs.get(b, "features")
                                              for b in params.backbones},
        "trainable": trainable,
        "classes": targets.classes if task.kind == "multiclass" else None,
    }
    return FitResult(metrics, pd.concat(predictions, ignore_index=True), models, scale,
                     targets.classes, source.fingerprints, config, dims,
                     source.dims()[GATE], source.scaling)


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
        """metrics/<task>.json, predictions/<task>.parquet, models/<task>/seed<k>.pt."""
        task = self.metrics["task"]
        write_metrics(Path(params.metrics) / f"{task}.json", self.metrics)
        _write_predictions(Path(params.predictions) / f"{task}.parquet", self.predictions)
        folder = Path(params.models) / task
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("seed*.pt"):
            stale.unlink()
        for seed, saved in self.models.items():
            torch.save({"task": task, "classes": self.classes, "target_scale": self.scale,
                        "threshold": saved["threshold"], "model_config": self.config.describe(),
                        "dims": self.dims, "gate_dim": self.gate_dim,
                        "fingerprints": self.fingerprints,
                        "feature_scaling": {k: (torch.from_numpy(m), torch.from_numpy(s))
                                            for k, (m, s) in self.feature_scaling.items()},
                        "state_dict": saved["model"].state_dict()},
                       folder / f"seed{seed}.pt")


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(path)


def _write_predictions(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def write_skipped(task_name: str, reason: str, params: FitParams, n: dict | None = None) -> dict:
    """A task that cannot be fitted leaves a metrics file saying why, and empty outputs,
    so the report lists it and DVC finds every declared output."""
    metrics = {"task": task_name, "skipped": reason,
               "n": n or {"train": 0, "val": 0, "test": 0}}
    write_metrics(Path(params.metrics) / f"{task_name}.json", metrics)
    _write_predictions(Path(params.predictions) / f"{task_name}.parquet",
                       pd.DataFrame({"record_id": pd.Series(dtype=str)}))
    folder = Path(params.models) / task_name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("seed*.pt"):
        stale.unlink()
    return metrics


def load_model(path: Path, fingerprints: dict[str, dict]) -> tuple[Ensemble, dict]:
    """A saved ensemble, refused unless ``fingerprints`` match the features it learnt from."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    check_model_features(saved, fingerprints)
    classification = bool(saved["classes"]) and TASKS[saved["task"]].kind != "regression"
    d_out = len(saved["classes"]) if classification else 1
    model = Ensemble(saved["dims"], saved["gate_dim"], d_out, classification,
                     ModelConfig(**saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def _raw(method: _Method, which: str) -> np.ndarray:
    """A method's outputs in a form that can be averaged across methods."""
    values = method.val if which == "val" else method.test
    if method.task.kind == "regression":
        return values[:, None]
    if method.task.kind == "binary":
        return np.stack([1 - values, values], axis=1)
    return values


def _prediction_rows(task: Task, targets: Targets, cohort: pd.DataFrame, rows: np.ndarray,
                     seed: int, method: _Method, experts: np.ndarray, gate: np.ndarray,
                     names: list[str], scale: dict) -> pd.DataFrame:
    frame = pd.DataFrame({"record_id": cohort["record_id"].to_numpy()[rows], "seed": seed})
    y = targets.y[rows]
    prediction = method.prediction()
    if task.kind == "regression":
        frame["truth"], frame["prediction"] = y.astype(float), prediction.astype(float)
        values = experts[:, :, 0] * scale["std"] + scale["mean"]
    elif task.kind == "binary":
        frame["truth"], frame["prediction"] = y, prediction
        frame["score"] = method.test
        values = experts[:, :, 1]
    else:
        classes = np.array(targets.classes)
        frame["truth"], frame["prediction"] = classes[y], classes[prediction]
        values = classes[experts.argmax(axis=-1)]
    for i, name in enumerate(names):
        frame[f"expert_{name}"] = values[:, i]
        frame[f"gate_{name}"] = gate[:, i]
    return frame


def check_model_features(saved: dict, fingerprints: dict[str, dict]) -> None:
    """Refuse to use heads with features other than the ones they were trained on."""
    for name, want in saved["fingerprints"].items():
        have = fingerprints.get(name)
        if have != want:
            raise CacheError(
                f"this model was trained on {name} features with fingerprint "
                f"{json.dumps(want, sort_keys=True)[:200]}..., but the cache now holds "
                f"{'none' if have is None else json.dumps(have, sort_keys=True)[:200]}...; "
                f"re-run `pipeline fit-ensemble` on the current cache"
            )

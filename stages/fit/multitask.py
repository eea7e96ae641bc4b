"""One model for all five tasks (ECG-MoE's multi-task fusion), trained from the cache.

Per expert one shared trunk, ``Linear(D,h)-ReLU-Linear(h,h)-ReLU``, adapted as the
single-task heads are (LoRA on both layers, or fully); per task and expert an output layer
(trained fully) and per task a gate. Each task's loss counts only the ECGs labelled for
it, so partly labelled cohorts train one model; the objective is the mean of the tasks'
losses (each on standardised targets or class probabilities, plus the per-expert term as
in single-task training). Early stopping watches the summed validation losses.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from pipeline.params import TASKS as TASK_IDS
from pipeline.params import FitParams
from stages.fit.features import GATE, FeatureSource, load_features
from stages.fit.model import HIDDEN_LAYERS, Gate, ModelConfig
from stages.fit.run import _aggregate, _Method, _model_config, _objective, cohort_digest
from stages.fit.tasks import TASKS, Targets, encode
from stages.fit.train import BestState, Objective


def make_trunk(d_in: int, config: ModelConfig) -> nn.Module:
    trunk = nn.Sequential(nn.Linear(d_in, config.hidden), nn.ReLU(),
                          nn.Linear(config.hidden, config.hidden), nn.ReLU())
    if config.adapter == "full":
        return trunk
    return get_peft_model(trunk, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                            lora_dropout=config.lora_dropout,
                                            target_modules=HIDDEN_LAYERS))


class MultiTaskEnsemble(nn.Module):
    def __init__(self, dims: dict[str, int], gate_dim: int, outputs: dict[str, int],
                 classification: dict[str, bool], config: ModelConfig):
        super().__init__()
        self.experts, self.tasks = list(dims), list(outputs)
        self.classification = classification
        self.trunks = nn.ModuleDict({b: make_trunk(d, config) for b, d in dims.items()})
        self.outs = nn.ModuleDict({f"{b}__{t}": nn.Linear(config.hidden, n)
                                   for b in dims for t, n in outputs.items()})
        self.gates = nn.ModuleDict({t: Gate(gate_dim, len(dims), n, config)
                                    for t, n in outputs.items()})

    def forward(self, features: dict[str, torch.Tensor], gate_input: torch.Tensor
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        hidden = {b: self.trunks[b](features[b]) for b in self.experts}
        result = {}
        for t in self.tasks:
            outputs = torch.stack([self.outs[f"{b}__{t}"](hidden[b]) for b in self.experts], 1)
            if self.classification[t]:
                outputs = outputs.softmax(dim=-1)
            weights = self.gates[t](gate_input)
            mixture = (weights * outputs).sum(dim=1)
            if self.classification[t] and weights.shape[-1] > 1:
                mixture = mixture / mixture.sum(dim=-1, keepdim=True)
            result[t] = (mixture, outputs, weights)
        return result


def _loss(model, data, chunk, objectives, targets) -> torch.Tensor:
    out = model({b: torch.from_numpy(data[b]) for b in model.experts},
                torch.from_numpy(data[GATE]))
    losses = []
    for t, (mixture, outputs, _) in out.items():
        mask = torch.from_numpy(targets[t].labelled[chunk])
        if mask.any():
            y = torch.from_numpy(objectives[t].y[chunk])[mask]
            losses.append(objectives[t].total(mixture[mask], outputs[mask], y))
    return torch.stack(losses).mean() if losses else torch.zeros((), requires_grad=True)


def _train(model, source: FeatureSource, objectives, targets, rows, params: FitParams,
           seed: int) -> None:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=params.lr, weight_decay=params.weight_decay)
    rng = np.random.default_rng(seed)
    keeper = BestState(model, params.patience)
    for _ in range(params.max_epochs):
        model.train()
        for chunk, data in source.batches(rows["train"], params.batch_size, rng):
            loss = _loss(model, data, chunk, objectives, targets)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            parts = [float(_loss(model, data, chunk, objectives, targets)) * len(chunk)
                     for chunk, data in source.batches(rows["val"], params.batch_size, None)]
        if keeper.stop(model, sum(parts) / max(len(rows["val"]), 1)):
            break
    keeper.restore(model)


def _predict(model, source: FeatureSource, rows: np.ndarray, batch_size: int
             ) -> dict[str, np.ndarray]:
    order = np.sort(rows)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in model.tasks}
    with torch.no_grad():
        for _, data in source.batches(order, batch_size, None):
            out = model({b: torch.from_numpy(data[b]) for b in model.experts},
                        torch.from_numpy(data[GATE]))
            for t, (mixture, _, _) in out.items():
                parts[t].append(mixture.numpy())
    position = np.searchsorted(order, rows)
    return {t: np.concatenate(v)[position] for t, v in parts.items()}


def compare_with_single_task(result: dict, metrics_dir) -> dict:
    """Add each task's single-task ensemble from ``metrics/<task>.json`` when it was fitted
    with the same experts, gate inputs and seeds (else say why it is not comparable)."""
    import json
    from pathlib import Path

    for task, entry in result["tasks"].items():
        path = Path(metrics_dir) / f"{task}.json"
        single = json.loads(path.read_text()) if path.exists() else {}
        same = (all(single.get(k) == result[k] for k in ("backbones", "seeds", "gate_inputs"))
                and single.get("evaluation", {}).get("mode") == "split")
        if single.get("methods") and same:
            entry["single_task"] = single["methods"]["ensemble"]
        else:
            entry["single_task"] = None
            entry["single_task_note"] = (f"{path} missing, cross-validated, or fitted with "
                                         "other experts, gate inputs or seeds; run "
                                         f"`pipeline fit-ensemble --task {task}` with the "
                                         "same settings and fit.evaluation: split")
    return result


def fit_multitask(params: FitParams, cohort_path, cache_dir, tasks: list[str] | None = None,
                  seeds: int | None = None) -> dict:
    """Train one model for ``tasks`` (default all five); returns metrics per task."""
    cohort = pd.read_parquet(cohort_path)
    split = cohort["split"].to_numpy()
    train = split == "train"
    targets: dict[str, Targets] = {}
    for t in tasks or list(TASK_IDS):
        encoded = encode(TASKS[t], cohort[t], train)
        if (encoded.labelled & train).any() and (encoded.labelled & (split == "test")).any():
            targets[t] = encoded
    if not targets:
        raise ValueError(f"no task has labels in both train and test of {cohort_path}")
    any_label = np.any([tg.labelled for tg in targets.values()], axis=0)
    rows = {s: np.flatnonzero((split == s) & any_label) for s in ("train", "val", "test")}
    source = load_features(cache_dir, params.backbones, cohort_digest(cohort_path), len(cohort),
                           params.max_memory_gb, params.inputs, params.gate_inputs)
    source.fit_scaling(rows["train"])
    objectives: dict[str, Objective] = {}
    scales: dict[str, dict] = {}
    for t, tg in targets.items():
        labelled_train = np.flatnonzero(train & tg.labelled)
        objectives[t], scales[t] = _objective(TASKS[t], tg, labelled_train, params)
    dims = {b: d for b, d in source.dims().items() if b != GATE}
    outputs = {t: 1 if TASKS[t].kind == "regression" else len(tg.classes)
               for t, tg in targets.items()}
    kinds = {t: TASKS[t].kind != "regression" for t in targets}
    per_task: dict[str, list[dict]] = {t: [] for t in targets}
    seeds_list = list(range(params.seeds if seeds is None else seeds))
    for seed in seeds_list:
        torch.manual_seed(seed * 1000 + 999)
        model = MultiTaskEnsemble(dims, source.dims()[GATE], outputs, kinds,
                                  _model_config(params))
        _train(model, source, objectives, targets, rows, params, seed)
        val = _predict(model, source, rows["val"], params.batch_size)
        test = _predict(model, source, rows["test"], params.batch_size)
        for t, tg in targets.items():
            v_mask, t_mask = tg.labelled[rows["val"]], tg.labelled[rows["test"]]
            method = _Method(TASKS[t], val[t][v_mask], test[t][t_mask],
                             tg.y[rows["val"]][v_mask], tg.y[rows["test"]][t_mask], scales[t])
            per_task[t].append(method.metrics())
    return {"seeds": seeds_list, "backbones": list(params.backbones),
            "gate_inputs": list(params.gate_inputs),
            "tasks": {t: {"metric": TASKS[t].metric,
                          "n_test": int(tg.labelled[rows["test"]].sum()),
                          "multitask": _aggregate(per_task[t])}
                      for t, tg in targets.items()}}

"""Training one model from cached features: AdamW, early stopping on validation.

Every call builds nothing itself: the caller passes a freshly built model, so no state
crosses seeds or methods (the paper's code kept one model and optimiser across folds).
Batches index the same rows of every expert's features and of the labels, so no expert
ever sees another ECG than the label belongs to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.params import FitParams
from stages.fit.features import GATE, FeatureSource
from stages.fit.model import Ensemble


@dataclass
class Objective:
    """What the model fits: standardised targets, or classes with optional weights.

    ``expert_weight`` adds each expert's own loss (averaged) to the mixture's: trained on the
    mixture alone, a head's gradient is scaled by its gate weight, so heads the gate
    down-weights early stop learning and the ensemble ends below its own experts.
    """

    y: np.ndarray
    classification: bool
    loss: str = "mse"
    class_weight: torch.Tensor | None = None
    expert_weight: float = 0.0

    def total(self, mixture: torch.Tensor, outputs: torch.Tensor, y: torch.Tensor
              ) -> torch.Tensor:
        loss = self(mixture, y)
        if self.expert_weight and outputs.shape[1] > 1:
            experts = [self(outputs[:, i], y) for i in range(outputs.shape[1])]
            loss = loss + self.expert_weight * torch.stack(experts).mean()
        return loss

    def __call__(self, mixture: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return F.nll_loss(mixture.clamp_min(1e-8).log(), y, weight=self.class_weight)
        if self.loss == "l1":
            return F.l1_loss(mixture[:, 0], y)
        return F.mse_loss(mixture[:, 0], y)


MIN_STEPS = 10  # optimiser steps per epoch, at least, however small the training set


def batch_size_for(n_rows: int, batch_size: int) -> int:
    """``batch_size``, shrunk so an epoch has ``MIN_STEPS`` steps: with 128 training ECGs
    and batches of 256 an epoch is one step, and early stopping ends training before the
    heads or the gate have moved from their initialisation."""
    return max(8, min(batch_size, -(-n_rows // MIN_STEPS)))


def _inputs(model: Ensemble) -> list[str]:
    """The arrays ``model`` reads: its experts' features, and the gate's input if gated."""
    return [*model.experts, GATE] if model.gate is not None else list(model.experts)


def _tensors(model: Ensemble, data: dict[str, np.ndarray]
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    return ({name: torch.from_numpy(data[name]) for name in model.experts},
            torch.from_numpy(data[GATE]) if GATE in data else None)


def _val_loss(model: Ensemble, source: FeatureSource, objective: Objective, rows: np.ndarray,
              batch_size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk, data in source.batches(rows, batch_size, None, _inputs(model)):
            mixture, _, _ = model(*_tensors(model, data))
            total += float(objective(mixture, torch.from_numpy(objective.y[chunk]))) * len(chunk)
            count += len(chunk)
    return total / max(count, 1)


class BestState:
    """The state with the lowest validation loss so far; early stopping after ``patience``
    epochs without improvement."""

    def __init__(self, model: torch.nn.Module, patience: int, loss: float = float("inf")):
        self.patience, self.loss, self.stale = patience, loss, 0
        self.state = copy.deepcopy(model.state_dict())

    def stop(self, model: torch.nn.Module, loss: float) -> bool:
        if loss < self.loss - 1e-6:
            self.loss, self.state, self.stale = loss, copy.deepcopy(model.state_dict()), 0
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.state)
        model.eval()


def train(model: Ensemble, source: FeatureSource, objective: Objective, train_rows: np.ndarray,
          val_rows: np.ndarray, params: FitParams, seed: int) -> dict:
    """Fit ``model`` in place, restore its best validation state; returns a short history."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=params.lr, weight_decay=params.weight_decay)
    rng = np.random.default_rng(seed)
    batch_size = batch_size_for(len(train_rows), params.batch_size)
    source.hold(val_rows)  # read once, not once per epoch, when the features stream
    model.eval()  # the starting point competes too (a warm-started head may be best)
    keeper = BestState(model, params.patience,
                       _val_loss(model, source, objective, val_rows, params.batch_size))
    epochs = 0
    while epochs < params.max_epochs:
        epochs += 1
        model.train()
        for chunk, data in source.batches(train_rows, batch_size, rng, _inputs(model)):
            mixture, outputs, _ = model(*_tensors(model, data))
            loss = objective.total(mixture, outputs, torch.from_numpy(objective.y[chunk]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        if keeper.stop(model, _val_loss(model, source, objective, val_rows, params.batch_size)):
            break
    keeper.restore(model)
    return {"epochs": epochs, "best_val_loss": keeper.loss}


def predict(model: Ensemble, source: FeatureSource, rows: np.ndarray, batch_size: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mixture, expert outputs, gate weights averaged over outputs) for ``rows`` in order."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    order = np.sort(rows)
    with torch.no_grad():
        for _, data in source.batches(order, batch_size, None, _inputs(model)):
            mixture, outputs, weights = model(*_tensors(model, data))
            parts.append((mixture.numpy(), outputs.numpy(), weights.mean(-1).numpy()))
    mixture, outputs, weights = (np.concatenate(p) for p in zip(*parts, strict=True))
    position = np.searchsorted(order, rows)  # back to the caller's row order
    return mixture[position], outputs[position], weights[position]

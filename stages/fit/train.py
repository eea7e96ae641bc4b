"""What stage two fits (``Objective``), and running a fitted ensemble over cached rows.

The heads and gates themselves train in banks (``stages.fit.bank``); batches index the same
rows of every expert's features and of the labels, so no expert ever sees another ECG than
the label belongs to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from stages.fit.bank import Criterion
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

    def rows(self, prediction: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss of predictions (..., B, k) (values, or class probabilities), and
        the rows' weights (B,): the class weights, else ones."""
        if self.classification:
            log_p = prediction.clamp_min(1e-8).log()
            index = y[..., None].expand(*log_p.shape[:-1], 1)
            loss = -log_p.gather(-1, index)[..., 0]
            weight = (self.class_weight.to(y.device)[y] if self.class_weight is not None
                      else torch.ones_like(y, dtype=loss.dtype))
            return loss, weight
        error = prediction[..., 0] - y  # y (B,), or (M, B): a target per member
        loss = error.abs() if self.loss == "l1" else error ** 2
        return loss, torch.ones_like(y)

    def criterion(self, device: torch.device) -> Criterion:
        """The loss of a bank of heads fitting this objective (``heads_criterion``)."""
        return heads_criterion([self], np.zeros(0, dtype=np.int64), device)

    def __call__(self, mixture: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss over rows (class-weighted as ``F.nll_loss`` weighs)."""
        loss, weight = self.rows(mixture, y)
        return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


@dataclass
class TaskColumns:
    """One task's share of a multi-task head: its output columns, what they fit, and the
    cohort rows labelled for it (the others do not count in its loss)."""

    name: str
    columns: slice
    objective: Objective
    labelled: np.ndarray  # (N,) bool


@dataclass
class JointObjective:
    """Several tasks fitted by one head, each on its own output columns (ECG-MoE's
    multi-task fusion: a trunk per expert shared by every task, an output layer per task).

    A row's loss is the mean over tasks of the task's (class-weighted) loss where the row is
    labelled for it, so a partly labelled cohort trains one head; each task's targets are
    standardised, or its classes weighted, on its own labelled training rows.
    """

    tasks: list[TaskColumns]


def activate(objective: Objective | JointObjective, out: torch.Tensor) -> torch.Tensor:
    """Raw head outputs (..., k) in head space: values, or class probabilities (per task)."""
    if isinstance(objective, Objective):
        return out.softmax(dim=-1) if objective.classification else out
    return torch.cat([activate(t.objective, out[..., t.columns]) for t in objective.tasks],
                     dim=-1)


def linear_targets(objective: Objective | JointObjective
                   ) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """The regression outputs a head's linear path can start fitted on: (column, standardised
    target, rows labelled for it or None for every row)."""
    if isinstance(objective, Objective):
        return [] if objective.classification else [(0, objective.y, None)]
    return [(t.columns.start, t.objective.y, t.labelled) for t in objective.tasks
            if not t.objective.classification]


def heads_criterion(objectives: list[Objective] | list[JointObjective], groups: np.ndarray,
                    device: torch.device) -> Criterion:
    """The loss of a bank of heads (``stages.fit.bank``) whose member ``m`` fits
    ``objectives[groups[m]]`` (all the first when ``groups`` is empty): the cross-validation
    folds' heads standardise the target, or weigh the classes, by their own training rows.
    Raw outputs (M, B, k) are values, or logits turned into probabilities as ``Ensemble``
    does."""
    first = objectives[0]
    if isinstance(first, JointObjective):
        return _joint_criterion(objectives, groups, device)
    group = torch.as_tensor(groups, dtype=torch.long, device=device)

    def of(members: torch.Tensor) -> torch.Tensor:
        return group[members] if len(group) else torch.zeros_like(members)

    if not first.classification:
        y = torch.from_numpy(np.stack([o.y for o in objectives])).to(device)

        def values(out: torch.Tensor, chunk: np.ndarray, members: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.from_numpy(chunk).to(device)
            return first.rows(out, y[of(members)[:, None], index[None, :]])
        return Criterion(values)
    labels = torch.from_numpy(first.y).to(device)
    weights = (torch.stack([o.class_weight for o in objectives]).to(device)
               if first.class_weight is not None else None)

    def classes(out: torch.Tensor, chunk: np.ndarray, members: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels[torch.from_numpy(chunk).to(device)]
        loss, weight = first.rows(out.softmax(dim=-1), y)
        if weights is not None:
            weight = weights[of(members)][:, y]
        return loss, weight
    return Criterion(classes)


def _joint_criterion(objectives: list[JointObjective], groups: np.ndarray,
                     device: torch.device) -> Criterion:
    parts = [(task.columns, torch.tensor(task.labelled, device=device),
              heads_criterion([o.tasks[t].objective for o in objectives], groups, device))
             for t, task in enumerate(objectives[0].tasks)]

    def rows(out: torch.Tensor, chunk: np.ndarray, members: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(chunk).to(device)
        total = None
        for columns, labelled, criterion in parts:
            loss, weight = criterion.rows(out[..., columns], chunk, members)
            term = torch.where(labelled[index], loss * weight, 0.0)
            total = term if total is None else total + term
        return total / len(parts), torch.ones(len(chunk), dtype=out.dtype, device=device)
    return Criterion(rows)


def _inputs(model: Ensemble) -> list[str]:
    """The arrays ``model`` reads: its experts' features, and the gate's input if gated."""
    return [*model.experts, GATE] if model.gate is not None else list(model.experts)


def _tensors(model: Ensemble, data: dict[str, np.ndarray]
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    return ({name: torch.from_numpy(data[name]) for name in model.experts},
            torch.from_numpy(data[GATE]) if GATE in data else None)


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

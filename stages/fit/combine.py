"""Ways to combine fitted experts' outputs: the MoE gate and the paper's Table 3 baselines.

Every combiner here sees expert *outputs* that were not fitted on the rows it learns from:
out-of-fold outputs on the training split (see ``stages.fit.crossfit``) and the fold
heads' averaged outputs on validation. Outputs are in the heads' space: standardised values
(n, E, 1) for regression, class probabilities (n, E, C) for classification.

* ``fit_weightings``: softmax weighting networks trained on those outputs. Fed the cached
  lead subset (``gate_inputs``) it is the EnECG/ECG-MoE gate; fed the experts' own
  features it is the sample-aware weight generator. ``prior`` adds KL(w ‖ uniform).
* ``confidence_weights``: per ECG, each expert weighted by its top class probability
  (zero-shot, classification only).
* ``greedy_weights``: Caruana et al.'s forward selection with replacement on validation
  (training-free): fixed weights = how often each expert was picked.
* ``Stacker``: a ridge (regression) or logistic (classification) meta-model over the
  out-of-fold outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stages.fit.bank import Banks, Criterion, GateBank, Reader, predict_banks, train_banks
from stages.fit.features import FeatureSource
from stages.fit.logistic import LogisticFits, fit_together
from stages.fit.model import ModelConfig, mix
from stages.fit.train import Objective

ALPHAS = np.logspace(-3, 4, 15)
CS = (0.01, 0.1, 1.0, 10.0)


@dataclass
class Weighting:
    """One split's weighting networks for ``fit_weightings``: the experts' outputs they mix
    (N, E, k) and the objective, both indexed by cohort row; the row sets they fit (a
    network each), the validation rows that stop them, the seed network ``m`` starts from
    (``seed + m``), and the correction (a, c) from the batch's input scaling to the split's
    own (``bank.input_affine``; None where they agree)."""

    outputs: np.ndarray
    objective: Objective
    train_sets: list[np.ndarray]
    val_rows: np.ndarray
    seed: int
    affine: tuple[np.ndarray, np.ndarray] | None = None


def _weighting_criterion(weightings: list[Weighting], groups: torch.Tensor, n_experts: int,
                         expected: bool, prior: float, device: torch.device) -> Criterion:
    """The loss of a bank of weighting networks whose outputs are weights (M, B, E, d), member
    ``m`` mixing the outputs of ``weightings[groups[m]]`` for its objective.

    With ``expected`` (regression) the loss is the competitive MoE loss Σ w_i·loss(ŷ_i)
    (Jacobs et al., 1991) instead of the loss of the mixture: it moves weight off an expert
    that is worse on a sample, where with the mixture's loss errors of opposite sign hide.
    ``prior`` adds KL(w ‖ uniform).
    """
    first = weightings[0].objective
    outputs = torch.stack([torch.from_numpy(w.outputs) for w in weightings]).to(device)
    y_all = torch.from_numpy(np.stack([w.objective.y for w in weightings])).to(device)
    class_weight = (torch.stack([w.objective.class_weight for w in weightings]).to(device)
                    if first.classification and first.class_weight is not None else None)

    def rows(weights: torch.Tensor, chunk: np.ndarray, members: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(chunk).to(device)
        group = groups[members][:, None]
        out, y = outputs[group, index[None, :]], y_all[group, index[None, :]]
        if expected and not first.classification:
            error = out[..., 0] - y[..., None]
            per_expert = error.abs() if first.loss == "l1" else error ** 2
            return (weights.mean(-1) * per_expert).sum(-1), torch.ones_like(y)
        loss, weight = first.rows(mix(weights, out, first.classification), y)
        if class_weight is not None:
            weight = class_weight[group, y]
        return loss, weight

    def kl(weights: torch.Tensor) -> torch.Tensor:
        return prior * (weights * (weights.clamp_min(1e-8) * n_experts).log()).sum(2).mean(-1)

    return Criterion(rows, kl if prior else None)


Inputs = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class WeightingInput:
    """What a bank of weighting networks reads: the arrays ``reads`` of a feature batch
    (scaled with ``source.scaling``), turned by ``inputs`` into a ``d_in``-wide input."""

    d_in: int
    inputs: Inputs
    reads: list[str]


def _reader(kinds: dict[str, WeightingInput], source: FeatureSource, device: torch.device
            ) -> Reader:
    reads = list(dict.fromkeys(r for kind in kinds.values() for r in kind.reads))
    return Reader(source, reads, device,
                  lambda data: {name: kind.inputs(data) for name, kind in kinds.items()})


def fit_weightings(kinds: dict[str, tuple[WeightingInput, list[Weighting]]],
                   source: FeatureSource, config: ModelConfig, *, lr: float,
                   weight_decay: float, batch_size: int, max_epochs: int, patience: int,
                   prior: float, expected: bool = False, bf16: bool = False,
                   device: torch.device | str = "cpu") -> Banks:
    """Weighting networks, one per row set of each ``Weighting``, trained so Σ w(x)·outputs[x]
    fits its target (early stopping on its validation rows); each starts from its own
    seed, and its best validation state is restored. One bank per kind of input (the
    gate's, the weight generator's), members in the order given, all trained in one pass:
    one at a time, each was a few hundred steps of a network too small to keep the cores
    busy, and a bank of a few networks was a pass of per-step overhead. Batches shuffle the
    union of the members' rows with the first weighting's seed.
    """
    device = torch.device(device)
    every = [w for _, weightings in kinds.values() for w in weightings]
    groups = [g for g, w in enumerate(every) for _ in w.train_sets]
    first = every[0].outputs
    banks: dict[str, GateBank] = {}
    for name, (given, weightings) in kinds.items():
        bank = banks[name] = GateBank(
            given.d_in, first.shape[1], first.shape[2], config,
            [w.seed + m for w in weightings for m in range(len(w.train_sets))])
        if any(w.affine is not None for w in weightings):
            identity = (np.ones(given.d_in, dtype=np.float32),
                        np.zeros(given.d_in, dtype=np.float32))
            affine = [w.affine or identity for w in weightings for _ in w.train_sets]
            bank.set_input_scaling(np.stack([a for a, _ in affine]),
                                   np.stack([c for _, c in affine]))
    trained = Banks(banks, bf16=bf16).to(device)
    criterion = _weighting_criterion(every, torch.tensor(groups, device=device),
                                     first.shape[1], expected, prior, device)
    train_banks(trained, _reader({n: given for n, (given, _) in kinds.items()}, source, device),
                criterion, [rows for w in every for rows in w.train_sets],
                [every[g].val_rows for g in groups], lr=lr, weight_decay=weight_decay,
                batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                seed=every[0].seed)
    return trained


def apply_weightings(banks: Banks, kind: str, given: WeightingInput, source: FeatureSource,
                     outputs: np.ndarray, rows: np.ndarray, classification: bool,
                     batch_size: int, members: slice = slice(None)
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(mixtures (M, n, k), weights averaged over outputs (M, n, E)) for ``rows`` in order,
    for ``members`` (default all) of the ``kind`` bank from ``fit_weightings`` mixing
    ``outputs``."""
    device = next(banks.banks[kind].parameters()).device
    start = banks.offsets()[kind]
    index = torch.arange(start, start + banks.banks[kind].n_members, device=device)[members]
    weights = predict_banks(banks, _reader({kind: given}, source, device), rows, batch_size,
                            index)
    mixtures = mix(weights, torch.from_numpy(outputs[rows]).to(device), classification)
    return mixtures.float().cpu().numpy(), weights.mean(-1).float().cpu().numpy()


def fixed_mixture(outputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_i w_i outputs[:, i] with one weight per expert (uniform, greedy)."""
    return np.einsum("e,nek->nk", weights, outputs)


def confidence_weights(probabilities: np.ndarray) -> np.ndarray:
    """Per-ECG weights (n, E) proportional to each expert's top class probability."""
    confidence = probabilities.max(axis=-1)
    return confidence / confidence.sum(axis=1, keepdims=True)


def loss_per_row(outputs: np.ndarray, y: np.ndarray, objective: Objective) -> np.ndarray:
    """The training objective's loss per row (squared/absolute error, or weighted NLL)."""
    if objective.classification:
        picked = np.take_along_axis(outputs, y[:, None], axis=1)[:, 0]
        weight = (objective.class_weight.numpy()[y] if objective.class_weight is not None
                  else np.ones(len(y)))
        return -np.log(np.clip(picked, 1e-8, None)) * weight / weight.mean()
    error = outputs[:, 0] - y
    return np.abs(error) if objective.loss == "l1" else error ** 2


def greedy_weights(outputs: np.ndarray, y: np.ndarray, objective: Objective,
                   rounds: int = 25) -> np.ndarray:
    """Forward selection with replacement: each round adds the expert whose inclusion
    lowers the validation loss of the running average most (ties: the first)."""
    n_experts = outputs.shape[1]
    counts = np.zeros(n_experts)
    total = np.zeros_like(outputs[:, 0])
    for step in range(1, rounds + 1):
        losses = [loss_per_row((total + outputs[:, e]) / step, y, objective).mean()
                  for e in range(n_experts)]
        pick = int(np.argmin(losses))
        counts[pick] += 1
        total = total + outputs[:, pick]
    return counts / counts.sum()


def ridge_gcv(x: np.ndarray, y: np.ndarray, alphas: np.ndarray = ALPHAS
              ) -> tuple[np.ndarray, float]:
    """Ridge regression (unpenalised intercept) with the penalty of lowest leave-one-out
    squared error, as ``RidgeCV(alphas)`` chooses it, from one eigendecomposition.

    ``RidgeCV`` recomputed the hat matrix's diagonal for every penalty: 1.1 s for 2,800
    ECGs x 768 features, against 0.1 s here, and a fit refits it (folds + 1) x experts
    times per seed. With Q = Xc·V over the eigenvectors V of the smaller Gram matrix, the
    diagonal for a penalty a is 1/n + Σ_j Q_ij² / (λ_j + a) (n ≥ p; the n < p case uses
    X·Xᵀ). Returns (coef, intercept).
    """
    return ridge_gcv_targets(x, np.asarray(y)[:, None], alphas)[0]


def ridge_gcv_targets(x: np.ndarray, ys: np.ndarray, alphas: np.ndarray = ALPHAS
                      ) -> list[tuple[np.ndarray, float]]:
    """``ridge_gcv`` of each column of ``ys`` (n, t) on one design, each with its own
    penalty, from one eigendecomposition (most of a fit's cost on wide features)."""
    x, ys = np.asarray(x, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    n = len(ys)
    x_mean, y_mean = x.mean(axis=0), ys.mean(axis=0)
    xc, yc = x - x_mean, ys - y_mean
    wide = n < x.shape[1]
    eigenvalues, vectors = np.linalg.eigh(xc @ xc.T if wide else xc.T @ xc)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    q = vectors if wide else xc @ vectors  # (n, k): the data in the eigenbasis
    q_y = q.T @ yc  # (k, t)
    alphas = np.asarray(alphas, dtype=np.float64)
    shrink = (eigenvalues[:, None] / (eigenvalues[:, None] + alphas) if wide
              else 1.0 / (eigenvalues[:, None] + alphas))  # (k, alphas)
    leverage = 1.0 / n + (q ** 2) @ shrink  # (n, alphas)
    fitted = np.einsum("nk,kat->nat", q, shrink[:, :, None] * q_y[:, None, :])
    residual = (yc[:, None, :] - fitted) / np.maximum(1.0 - leverage, 1e-12)[..., None]
    chosen = alphas[np.argmin(np.mean(residual ** 2, axis=0), axis=0)]  # (t,)
    out = []
    for t, alpha in enumerate(chosen):
        inverse = 1.0 / (eigenvalues + alpha)
        coef = (xc.T @ (vectors @ (inverse * q_y[:, t])) if wide
                else vectors @ (inverse * q_y[:, t]))
        out.append((coef, float(y_mean[t] - x_mean @ coef)))
    return out


@dataclass
class PathGroup:
    """Logistic fits on one design: the rows ``masks`` (P, n) of ``x``, each with the C of
    lowest loss (``objective``'s) on ``(x_val, y_val)``."""

    x: np.ndarray
    y: np.ndarray
    masks: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    objective: Objective


class Linear:
    """A fitted linear model kept as plain arrays (``state``), so a saved ensemble needs no
    pickled estimator: ridge (regression) or logistic regression (classification)."""

    def __init__(self, state: dict[str, list], classification: bool, n_classes: int):
        self.state, self.classification, self.n_classes = state, classification, n_classes

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            objective: Objective, n_classes: int, balanced: bool) -> Linear:
        """Ridge with its penalty by generalised CV, or logistic with C by validation loss."""
        return cls.fit_many(x, y, np.ones((1, len(y)), dtype=bool), x_val, y_val, objective,
                            n_classes, balanced)[0]

    @classmethod
    def fit_many(cls, x: np.ndarray, y: np.ndarray, masks: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, objective: Objective, n_classes: int, balanced: bool
                 ) -> list[Linear]:
        """``fit`` on the rows of each mask (P, n) of one design: the logistic fits are
        solved together (``stages.fit.logistic``)."""
        return cls.fit_groups([PathGroup(x, y, masks, x_val, y_val, objective)], n_classes,
                              balanced)[0]

    @classmethod
    def fit_groups(cls, groups: list[PathGroup], n_classes: int, balanced: bool
                   ) -> list[list[Linear]]:
        """``fit_many`` of several designs (each group's objective says which kind); the
        logistic fits of all of them are solved together. A mask a group repeats is fitted
        once: every seed's probe of a fixed split has the same fit on all training rows."""
        unique = [_first_of_each(g.masks) for g in groups]
        groups = [dataclasses.replace(g, masks=g.masks[first])
                  for g, (first, _) in zip(groups, unique, strict=True)]
        if not groups[0].objective.classification:
            fitted = [[cls({"coef": coef.tolist(), "intercept": [intercept]}, False, 1)
                       for coef, intercept in (ridge_gcv(g.x[m], g.y[m]) for m in g.masks)]
                      for g in groups]
        else:
            fitted = [[cls(state, True, n_classes) for state in states]
                      for states in logistic_paths(groups, n_classes, balanced)]
        return [[own[i] for i in inverse]
                for own, (_, inverse) in zip(fitted, unique, strict=True)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Values (n, 1), or probabilities over all ``n_classes`` (absent classes get 0)."""
        x = x.astype(np.float64)
        if not self.classification:
            value = x @ np.asarray(self.state["coef"]) + self.state["intercept"][0]
            return value[:, None].astype(np.float32)
        seen = np.asarray(self.state["classes"])
        if "prior" in self.state:
            p = np.broadcast_to(np.asarray(self.state["prior"]), (len(x), len(seen)))
        else:
            logits = x @ np.asarray(self.state["coef"]).T + np.asarray(self.state["intercept"])
            if len(seen) == 2:  # one column: the log-odds of the second class
                p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
                p = np.stack([1.0 - p1, p1], axis=1)
            else:
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p = p / p.sum(axis=1, keepdims=True)
        out = np.zeros((len(x), self.n_classes), dtype=np.float32)
        out[:, seen] = p
        return out


def _first_of_each(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the index of each distinct mask's first occurrence, in order; each mask's position
    among them)."""
    _, first, inverse = np.unique(masks, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return first[order], np.argsort(order)[inverse.reshape(-1)]


class Stacker:
    """A linear meta-model over experts' outputs (scikit-learn style fit/predict): ridge on
    the standardised outputs, or logistic regression on log-probabilities."""

    def __init__(self, classification: bool, n_classes: int, balanced: bool = False):
        self.classification, self.n_classes, self.balanced = classification, n_classes, balanced
        self.state: dict[str, list] = {}

    @staticmethod
    def design(outputs: np.ndarray, classification: bool) -> np.ndarray:
        """The stacker's inputs: experts' outputs (n, E, k) flattened, as log-probabilities
        for classes."""
        x = np.log(np.clip(outputs, 1e-6, None)) if classification else outputs
        return x.reshape(len(x), -1)

    def fit(self, outputs: np.ndarray, y: np.ndarray, val_outputs: np.ndarray,
            y_val: np.ndarray, objective: Objective) -> Stacker:
        (linear,) = Linear.fit_many(self.design(outputs, self.classification), y,
                                    np.ones((1, len(y)), dtype=bool),
                                    self.design(val_outputs, self.classification), y_val,
                                    objective, self.n_classes, self.balanced)
        self.state = linear.state
        return self

    @classmethod
    def from_state(cls, state: dict, classification: bool, n_classes: int) -> Stacker:
        stacker = cls(classification, n_classes)
        stacker.state = state
        return stacker

    def predict(self, outputs: np.ndarray) -> np.ndarray:
        return Linear(self.state, self.classification, self.n_classes).predict(
            self.design(outputs, self.classification))


def logistic_path(x: np.ndarray, y: np.ndarray, masks: np.ndarray, x_val: np.ndarray,
                  y_val: np.ndarray, n_classes: int, balanced: bool, objective: Objective
                  ) -> list[dict[str, list]]:
    """``logistic_paths`` of one design."""
    return logistic_paths([PathGroup(x, y, masks, x_val, y_val, objective)], n_classes,
                          balanced)[0]


def logistic_paths(groups: list[PathGroup], n_classes: int, balanced: bool
                   ) -> list[list[dict[str, list]]]:
    """Per row mask of each group's design, the logistic regression with the C (from ``CS``)
    of lowest validation loss, as a ``Linear`` state.

    The Cs are fitted in increasing order, each warm-started from the last, and a problem's
    path stops once its validation loss rises: weaker penalties only fit the training rows
    harder, and they are the slow fits. Every problem still on the path, of every group,
    is solved together (``stages.fit.logistic.fit_together``). A problem with one class
    predicts its prior.
    """
    states: list[list[dict[str, list] | None]] = [[None] * len(g.masks) for g in groups]
    going: list[tuple[int, int]] = []  # (group, problem) still on the path
    for i, group in enumerate(groups):
        for p, mask in enumerate(group.masks):
            classes = np.unique(group.y[mask])
            if len(classes) < 2:
                states[i][p] = {"classes": classes.tolist(), "prior": [1.0] * len(classes)}
            else:
                going.append((i, p))
    solving = sorted({i for i, _ in going})
    fits = [LogisticFits(groups[i].x, groups[i].y, n_classes, balanced) for i in solving]
    best = [np.full(len(g.masks), np.inf) for g in groups]
    start = None
    for c in sorted(CS):
        if not going:
            break
        live = sorted({i for i, _ in going})
        per_fit = [[p for i, p in going if i == g] for g in live]
        fitted, coef = fit_together([fits[solving.index(g)] for g in live],
                                    [groups[g].masks[own] for g, own in
                                     zip(live, per_fit, strict=True)],
                                    [np.full(len(own), c) for own in per_fit], start)
        still = []
        at = 0
        for g, own, group_states in zip(live, per_fit, fitted, strict=True):
            group = groups[g]
            for p, state in zip(own, group_states, strict=True):
                predicted = Linear(state, True, n_classes).predict(group.x_val)
                loss = loss_per_row(predicted, group.y_val, group.objective).mean()
                if loss < best[g][p]:
                    best[g][p], states[g][p] = loss, state
                if loss <= best[g][p]:
                    still.append(at)
                at += 1
        order = [(g, p) for g, own in zip(live, per_fit, strict=True) for p in own]
        going, start = [order[at] for at in still], coef[still]
    return states

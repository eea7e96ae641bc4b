"""Ways to combine fitted experts' outputs: the MoE gate and the paper's Table 3 baselines.

Every combiner here sees expert *outputs* that were not fitted on the rows it learns from:
out-of-fold outputs on the training split (see ``stages.fit.crossfit``) and the refitted
heads' outputs on validation. Outputs are in the heads' space: standardised values (n, E, 1)
for regression, class probabilities (n, E, C) for classification.

* ``fit_weighting``: a softmax weighting network trained on those outputs. Fed the cached
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

import copy
from collections.abc import Callable

import numpy as np
import torch
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression, RidgeCV

from stages.fit.features import FeatureSource
from stages.fit.model import Gate, mix
from stages.fit.train import Objective, batch_size_for

ALPHAS = np.logspace(-3, 4, 15)
CS = (0.01, 0.1, 1.0, 10.0)


def fit_weighting(gate: Gate, inputs: Callable[[dict[str, np.ndarray]], np.ndarray],
                  reads: list[str], source: FeatureSource, outputs: np.ndarray,
                  objective: Objective, train_rows: np.ndarray, val_rows: np.ndarray, *,
                  lr: float, weight_decay: float, batch_size: int, max_epochs: int,
                  patience: int, prior: float, seed: int, expected: bool = False) -> Gate:
    """Train ``gate`` so Σ w(x)·outputs[x] fits the target; early stopping on validation.

    ``outputs`` is indexed by cohort row (N, E, k); ``inputs`` turns a feature batch of the
    arrays ``reads`` into the gate's input. With ``expected`` (regression) the loss is the
    competitive MoE loss Σ w_i·loss(ŷ_i) (Jacobs et al., 1991) instead of the loss of the
    mixture: it moves weight off an expert that is worse on a sample, where with the
    mixture's loss errors of opposite sign hide. The best validation state is restored.
    """
    optimiser = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    n_experts = outputs.shape[1]

    def loss_of(chunk: np.ndarray, data: dict[str, np.ndarray]) -> torch.Tensor:
        weights = gate(torch.from_numpy(inputs(data)))
        out, y = torch.from_numpy(outputs[chunk]), torch.from_numpy(objective.y[chunk])
        if expected and not objective.classification:
            error = out[:, :, 0] - y[:, None]
            per_expert = error.abs() if objective.loss == "l1" else error ** 2
            loss = (weights.mean(-1) * per_expert).sum(1).mean()
        else:
            loss = objective(mix(weights, out, objective.classification), y)
        if prior:
            kl = (weights * (weights.clamp_min(1e-8) * n_experts).log()).sum(1).mean()
            loss = loss + prior * kl
        return loss

    best, best_state, stale = float("inf"), copy.deepcopy(gate.state_dict()), 0
    step_batch = batch_size_for(len(train_rows), batch_size)
    for _ in range(max_epochs):
        gate.train()
        for chunk, data in source.batches(train_rows, step_batch, rng, reads):
            loss = loss_of(chunk, data)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        gate.eval()
        with torch.no_grad():
            total = sum(float(loss_of(chunk, data)) * len(chunk)
                        for chunk, data in source.batches(val_rows, batch_size, None, reads))
        current = total / max(len(val_rows), 1)
        if current < best - 1e-6:
            best, best_state, stale = current, copy.deepcopy(gate.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    gate.load_state_dict(best_state)
    return gate.eval()


def apply_weighting(gate: Gate, inputs: Callable[[dict[str, np.ndarray]], np.ndarray],
                    reads: list[str], source: FeatureSource, outputs: np.ndarray,
                    rows: np.ndarray, classification: bool, batch_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(mixture (n, k), weights averaged over outputs (n, E)) for ``rows`` in order."""
    order = np.sort(rows)
    mixtures, weights = [], []
    with torch.no_grad():
        for chunk, data in source.batches(order, batch_size, None, reads):
            w = gate(torch.from_numpy(inputs(data)))
            mixtures.append(mix(w, torch.from_numpy(outputs[chunk]), classification).numpy())
            weights.append(w.mean(-1).numpy())
    position = np.searchsorted(order, rows)
    return np.concatenate(mixtures)[position], np.concatenate(weights)[position]


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


class Linear:
    """A fitted linear model kept as plain arrays (``state``), so a saved ensemble needs no
    pickled estimator: ridge (regression) or logistic regression (classification)."""

    def __init__(self, state: dict[str, list], classification: bool, n_classes: int):
        self.state, self.classification, self.n_classes = state, classification, n_classes

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            objective: Objective, n_classes: int, balanced: bool) -> Linear:
        """Ridge with its penalty by generalised CV, or logistic with C by validation loss."""
        if not objective.classification:
            model = RidgeCV(alphas=ALPHAS).fit(x, y)
            return cls({"coef": model.coef_.tolist(), "intercept": [float(model.intercept_)]},
                       False, 1)
        model = fit_logistic(x, y, x_val, y_val, n_classes, balanced, objective)
        state: dict[str, list] = {"classes": model.classes_.tolist()}
        if isinstance(model, DummyClassifier):
            state["prior"] = model.class_prior_.tolist()
        else:
            state.update(coef=model.coef_.tolist(), intercept=model.intercept_.tolist())
        return cls(state, True, n_classes)

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


class Stacker:
    """A linear meta-model over experts' outputs (scikit-learn style fit/predict): ridge on
    the standardised outputs, or logistic regression on log-probabilities."""

    def __init__(self, classification: bool, n_classes: int, balanced: bool = False):
        self.classification, self.n_classes, self.balanced = classification, n_classes, balanced
        self.state: dict[str, list] = {}

    @staticmethod
    def _design(outputs: np.ndarray, classification: bool) -> np.ndarray:
        x = np.log(np.clip(outputs, 1e-6, None)) if classification else outputs
        return x.reshape(len(x), -1)

    def fit(self, outputs: np.ndarray, y: np.ndarray, val_outputs: np.ndarray,
            y_val: np.ndarray, objective: Objective) -> Stacker:
        self.state = Linear.fit(self._design(outputs, self.classification), y,
                                self._design(val_outputs, self.classification), y_val,
                                objective, self.n_classes, self.balanced).state
        return self

    @classmethod
    def from_state(cls, state: dict, classification: bool, n_classes: int) -> Stacker:
        stacker = cls(classification, n_classes)
        stacker.state = state
        return stacker

    def predict(self, outputs: np.ndarray) -> np.ndarray:
        return Linear(self.state, self.classification, self.n_classes).predict(
            self._design(outputs, self.classification))


def fit_logistic(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 n_classes: int, balanced: bool, objective: Objective
                 ) -> LogisticRegression | DummyClassifier:
    """Logistic regression with the C (from ``CS``) of lowest validation loss."""
    if len(np.unique(y)) < 2:  # one class in training: predict its prior
        return DummyClassifier(strategy="prior").fit(x, y)
    best, chosen = np.inf, None
    for c in CS:
        model = LogisticRegression(C=c, max_iter=500,
                                   class_weight="balanced" if balanced else None).fit(x, y)
        loss = loss_per_row(probabilities(model, x_val, n_classes), y_val, objective).mean()
        if loss < best:
            best, chosen = loss, model
    return chosen


def probabilities(model: LogisticRegression | DummyClassifier, x: np.ndarray, n_classes: int
                  ) -> np.ndarray:
    """predict_proba spread over all ``n_classes`` (classes absent from training get 0)."""
    out = np.zeros((len(x), n_classes), dtype=np.float32)
    out[:, model.classes_] = model.predict_proba(x)
    return out

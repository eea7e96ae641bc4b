"""Many L2-penalised logistic regressions on one design, solved together.

A probe is cross-fitted (one fit per fold, and one on all training rows), along a path of
penalties, on every expert, for every seed: on the demo's 15-class task that was 90 fits of
3,500 ECGs x 768 features per seed, each hundreds of scikit-learn L-BFGS iterations, and
most of the task's time. The fits share their design and differ only in their rows and
penalty, so here they are one problem: every fit's logits come from one matrix product
over the shared rows, and a batched L-BFGS moves each fit on its own.

Each problem ``p`` minimises scikit-learn's ``LogisticRegression`` objective
``C_p Σ_i s_pi ℓ_i(W_p) + ½‖W_p‖²`` (intercept unpenalised; ``s``: the problem's sample
weights, 0 off its rows, times balanced class weights of its own rows), with a binary
log-odds for two classes and the multinomial softmax over the classes present otherwise, so
it has the same unique solution (``tests/test_logistic.py`` checks the probabilities
against scikit-learn's). Two things make it converge in tens of iterations rather than
hundreds: the design is rotated onto its principal axes, and L-BFGS starts each step from a
diagonal approximation of the Hessian there (π(1-π)·λ_j + the penalty per axis, per class).
"""

from __future__ import annotations

import numpy as np
import torch

HISTORY = 10  # L-BFGS curvature pairs kept per problem
TOLERANCE = 1e-4  # largest gradient entry of the mean-scaled objective (sklearn's default)
# Tolerances from here up are met with the design's products in float32: their rounding
# (about 1e-7 of a gradient entry) is far below them, and the products, most of a fit's
# time, run about twice as fast. Tighter ones (the tests' exact comparisons) use float64.
FLOAT32_TOLERANCE = 1e-6
MAX_ITER = 1000
SPANNED = 1e-10  # an axis of variance below this share of the largest is not in the data
ARMIJO = 1e-4
# A trial step may raise the objective by this many units of the products' rounding (of its
# value): with float32 products the value carries ~1e-7 relative noise, and near the
# optimum a step's true decrease is smaller, so Armijo's test failed on noise and the line
# search halved the step of every problem in the batch up to 40 times (six objective
# evaluations per iteration on a stacker's five problems, against one now).
ROUNDING_SLACK = 10


class _Problems:
    """The objective of P logistic regressions over one rotated design (n, D + 1).

    Per-row quantities are kept rows first, (n, P, k), the layout of the design's product,
    and in the design's type: permuted to (P, n, k) and in float64 they cost as much as the
    product itself (a third of the demo's ``ad`` fit was log-softmax, exp and masking). Only
    the per-problem sums are float64."""

    def __init__(self, design: torch.Tensor, y: np.ndarray, weights: np.ndarray,
                 penalties: np.ndarray, n_classes: int):
        self.x = design
        self.n, self.width = design.shape
        self.binary = n_classes == 2
        self.k = 1 if self.binary else n_classes
        self.problems = len(weights)
        weights = torch.as_tensor((weights / weights.sum(axis=1, keepdims=True)).T)  # (n, P)
        self.w, self.w_rows = weights, weights.to(design.dtype)
        self.labelled = weights > 0
        self.penalty = torch.as_tensor(penalties, dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.target = (torch.as_tensor(y, dtype=design.dtype)[:, None, None] if self.binary
                       else torch.nn.functional.one_hot(self.y, n_classes).to(design.dtype)
                       [:, None, :])  # (n, 1, k)
        present = (weights.numpy().T @ np.eye(n_classes)[y]) > 0  # (P, classes)
        self.present = torch.as_tensor(present[:, 1:] if self.binary else present)
        self.absent = torch.where(self.present, 0.0, -torch.inf).to(design.dtype)  # (P, k)
        self.penalised = torch.ones(self.width, 1, dtype=torch.float64)
        self.penalised[-1] = 0.0  # the intercept

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.problems, self.width, self.k

    def centred(self, step: torch.Tensor) -> torch.Tensor:
        """``step`` without its mean over each problem's classes. The softmax is unchanged by
        adding one vector to every class's weights, so on that direction only the penalty
        curves the objective (the intercept's not at all); the optimum has no component
        there, and steps kept off it need not crawl back."""
        if self.binary:
            return step
        present = self.present[:, None, :].to(step.dtype)
        mean = (step * present).sum(-1, keepdim=True) / present.sum(-1, keepdim=True)
        return (step - mean) * present

    def value_grad(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per problem, the mean-scaled objective Σ w_i ℓ_i + λ/2 ‖W‖² and its gradient, in
        float64 (``coef``'s type) whatever the design's type."""
        p, k = self.problems, self.k
        flat = coef.permute(1, 0, 2).reshape(self.width, p * k).to(self.x.dtype)
        z = (self.x @ flat).view(self.n, p, k)  # (n, P, k) logits of every problem
        if self.binary:
            loss = torch.nn.functional.softplus(z[..., 0]) - self.target[..., 0] * z[..., 0]
            residual = torch.sigmoid(z) - self.target
        else:
            z = z + self.absent
            log_p = z - z.logsumexp(-1, keepdim=True)  # log_softmax: slower in float32
            loss = -log_p.gather(-1, self.y[:, None, None].expand(self.n, p, 1))[..., 0]
            residual = log_p.exp_() - self.target
        loss = torch.where(self.labelled, loss.to(torch.float64), 0.0)  # absent: -inf
        residual = residual * self.w_rows[..., None]
        grad = (self.x.T @ residual.view(self.n, p * k)).to(coef.dtype)
        grad = grad.view(self.width, p, k).permute(1, 0, 2)
        penalised = coef * self.penalised
        value = (self.w * loss).sum(0) + 0.5 * self.penalty * (penalised ** 2).sum((1, 2))
        grad = grad + self.penalty[:, None, None] * penalised
        if not self.binary:
            grad = grad * self.present[:, None, :]
        return value, grad


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((1, 2))


def _lbfgs(problems: _Problems, coef: torch.Tensor, scale: torch.Tensor,
           tolerance: float, max_iter: int) -> tuple[torch.Tensor, int]:
    """Batched L-BFGS from ``coef`` (P, D + 1, k), with ``scale`` (P, D + 1, k) the diagonal
    starting approximation of each inverse Hessian; Armijo backtracking per problem. A
    problem stops when its largest gradient entry is below ``tolerance``."""
    value, grad = problems.value_grad(coef)
    slack = ROUNDING_SLACK * torch.finfo(problems.x.dtype).eps
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    done = grad.abs().amax((1, 2)) <= tolerance
    iterations = 0
    while iterations < max_iter and not bool(done.all()):
        iterations += 1
        q, alphas = grad.clone(), []
        for s, y, rho in reversed(pairs):
            a = rho * _dot(s, q)
            q -= a[:, None, None] * y
            alphas.append(a)
        if pairs:
            s, y, _ = pairs[-1]
            gamma = _dot(s, y) / _dot(y, scale * y).clamp_min(1e-300)
            q = q * scale * gamma[:, None, None]
        else:
            q = q * scale
        for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
            b = rho * _dot(y, q)
            q += (a - b)[:, None, None] * s
        direction = problems.centred(torch.where(done[:, None, None], 0.0, -q))
        slope = _dot(grad, direction)
        uphill = slope >= 0  # a bad curvature estimate: fall back to the scaled gradient
        if bool((uphill & ~done).any()):
            direction = torch.where((uphill & ~done)[:, None, None],
                                    problems.centred(-scale * grad), direction)
            slope = _dot(grad, direction)
        step = torch.ones_like(value)
        for _ in range(40):
            trial = coef + step[:, None, None] * direction
            trial_value, trial_grad = problems.value_grad(trial)
            accepted = done | (trial_value
                               <= value + ARMIJO * step * slope + slack * value.abs())
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step * 0.5)
        moved = ~done & accepted
        s, y = trial - coef, trial_grad - grad
        curvature = _dot(s, y)
        coef = torch.where(moved[:, None, None], trial, coef)
        stalled = ~accepted | (moved & ((value - trial_value).abs()
                                        <= 1e-14 * value.abs().clamp_min(1.0)))
        value = torch.where(moved, trial_value, value)
        grad = torch.where(moved[:, None, None], trial_grad, grad)
        keep = moved & (curvature > 1e-12)
        rho = torch.where(keep, 1.0 / curvature.clamp_min(1e-300), 0.0)
        pairs.append((torch.where(keep[:, None, None], s, 0.0),
                      torch.where(keep[:, None, None], y, 0.0), rho))
        pairs = pairs[-HISTORY:]
        done = done | stalled | (grad.abs().amax((1, 2)) <= tolerance)
    return coef, iterations


class LogisticFits:
    """Logistic regressions of ``y`` on one design ``x`` (n, d) (rows of a cohort), one per
    row mask, solved together; ``fit(masks, cs)`` returns each problem's coefficients in
    scikit-learn's layout: (classes present, coef (k, d), intercept (k,)).

    The principal axes are computed once per design, from all its rows. Axes the rows do
    not span are dropped: the data's gradient along them is zero, so from zero (or a warm
    start of this design) a coefficient there stays zero. A design wider than tall (a
    probe of 1,015 features on 130 ECGs) keeps as many axes as rows, and L-BFGS's
    per-iteration work, over every coefficient, shrinks with it."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, balanced: bool):
        x64 = torch.as_tensor(np.asarray(x, dtype=np.float64))
        gram = x64.T @ x64 / max(len(x64), 1)
        eigenvalues, axes = torch.linalg.eigh(gram)
        spanned = eigenvalues > SPANNED * eigenvalues.max().clamp_min(1e-300)
        self.eigenvalues, self.axes = eigenvalues[spanned], axes[:, spanned]
        self.design = torch.cat([x64 @ self.axes, torch.ones(len(x64), 1, dtype=torch.float64)],
                                dim=1)
        self.y, self.n_classes, self.balanced = np.asarray(y), n_classes, balanced

    def _weights(self, masks: np.ndarray) -> np.ndarray:
        """Sample weights per problem: 0 off its rows, balanced class weights on them."""
        weights = masks.astype(np.float64)
        if self.balanced:
            counts = weights @ np.eye(self.n_classes)[self.y]  # (P, classes)
            present = (counts > 0).sum(1, keepdims=True)
            per_class = np.where(counts > 0, weights.sum(1, keepdims=True)
                                 / (present * np.maximum(counts, 1)), 0.0)
            weights = weights * per_class[:, self.y]
        return weights

    def _scale(self, problems: _Problems, weights: np.ndarray) -> torch.Tensor:
        """Diagonal inverse-Hessian guess per problem, axis and class: 1 / (π(1-π)·λ_j + C⁻¹/S)
        with π the problem's weighted class frequency, λ_j the design's variance on axis j."""
        prior = weights @ np.eye(self.n_classes)[self.y]
        prior = prior / prior.sum(1, keepdims=True)
        spread = torch.as_tensor(prior * (1 - prior))  # (P, classes)
        if problems.binary:
            spread = spread[:, 1:]
        spread = spread.clamp_min(1e-3)
        variance = torch.cat([self.eigenvalues, torch.ones(1, dtype=torch.float64)])
        curvature = (spread[:, None, :] * variance[None, :, None]
                     + problems.penalty[:, None, None] * problems.penalised[None])
        return 1.0 / curvature

    def fit(self, masks: np.ndarray, cs: np.ndarray, start: torch.Tensor | None = None,
            tolerance: float = TOLERANCE) -> tuple[list[dict[str, list]], torch.Tensor]:
        """Problem ``p`` on the rows ``masks[p]`` with penalty ``cs[p]``, from ``start``
        (coefficients a previous ``fit`` returned) or zeros. Returns each problem's state
        (``classes``, ``coef``, ``intercept``) and the raw coefficients for a warm start."""
        weights = self._weights(masks)
        total = weights.sum(1)
        design = self.design if tolerance < FLOAT32_TOLERANCE else self.design.float()
        problems = _Problems(design, self.y, weights, 1.0 / (np.asarray(cs) * total),
                             self.n_classes)
        coef = (torch.zeros(problems.shape, dtype=torch.float64) if start is None
                else start.clone())
        coef, _ = _lbfgs(problems, coef, self._scale(problems, weights), tolerance, MAX_ITER)
        return [self._state(coef[p], problems.present[p]) for p in range(len(coef))], coef

    def _state(self, coef: torch.Tensor, present: torch.Tensor) -> dict[str, list]:
        weights = (self.axes @ coef[:-1]).T.numpy()  # (k, d) in the original features
        intercept = coef[-1].numpy()
        if self.n_classes == 2:
            return {"classes": [0, 1], "coef": weights.tolist(),
                    "intercept": intercept.tolist()}
        seen = np.flatnonzero(present.numpy())
        weights, intercept = weights[seen], intercept[seen]
        if len(seen) == 2:  # scikit-learn's layout for two classes: the second's log-odds
            weights, intercept = weights[1:] - weights[:1], intercept[1:] - intercept[:1]
        return {"classes": seen.tolist(), "coef": weights.tolist(),
                "intercept": intercept.tolist()}

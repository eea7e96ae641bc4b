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
PADDING = 1.25  # problem slots per problem, at most, when designs are batched (``_per_group``)


class _Problems:
    """The objective of P logistic regressions over G rotated designs (G, n, A + 1), padded
    to a common height and width: problem ``p`` reads design ``p // Pg`` (``Pg`` problems per
    design, the shorter lists padded with frozen copies). A padded row has weight 0 and a
    padded axis a zero column, so neither moves a coefficient; one design (G = 1) is the
    plain case, one matrix product per evaluation.

    Per-row quantities are kept rows first, (G, n, Pg, k), the layout of the design's
    product, and in the design's type: permuted to problems first and in float64 they cost
    as much as the product itself (a third of the demo's ``ad`` fit was log-softmax, exp
    and masking). Only the per-problem sums are float64."""

    def __init__(self, design: torch.Tensor, y: np.ndarray, weights: np.ndarray,
                 penalties: np.ndarray, n_classes: int):
        self.x = design
        self.groups, self.n, self.width = design.shape
        self.per_group = weights.shape[1]
        self.binary = n_classes == 2
        self.k = 1 if self.binary else n_classes
        self.problems = self.groups * self.per_group
        weights = weights / weights.sum(axis=2, keepdims=True)  # (G, Pg, n)
        self.w = torch.as_tensor(weights.transpose(0, 2, 1))  # (G, n, Pg)
        self.w_rows = self.w.to(design.dtype)
        self.labelled = self.w > 0
        self.penalty = torch.as_tensor(penalties.reshape(-1), dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.long)  # (G, n)
        self.target = (torch.as_tensor(y, dtype=design.dtype)[..., None, None] if self.binary
                       else torch.nn.functional.one_hot(self.y, n_classes).to(design.dtype)
                       [:, :, None, :])  # (G, n, 1, k)
        present = np.einsum("gpn,gnc->gpc", weights, np.eye(n_classes)[y]) > 0
        present = present.reshape(self.problems, n_classes)
        self.present = torch.as_tensor(present[:, 1:] if self.binary else present)
        self.absent = torch.where(self.present, 0.0, -torch.inf).to(design.dtype).view(
            self.groups, 1, self.per_group, -1)
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
        g, n, pg, k, width = self.groups, self.n, self.per_group, self.k, self.width
        flat = coef.view(g, pg, width, k).permute(0, 2, 1, 3).reshape(g, width, pg * k)
        z = torch.bmm(self.x, flat.to(self.x.dtype)).view(g, n, pg, k)  # every logit
        if self.binary:
            loss = torch.nn.functional.softplus(z[..., 0]) - self.target[..., 0] * z[..., 0]
            residual = torch.sigmoid(z) - self.target
        else:
            z = z + self.absent
            log_p = z - z.logsumexp(-1, keepdim=True)  # log_softmax: slower in float32
            loss = -log_p.gather(-1, self.y[:, :, None, None].expand(g, n, pg, 1))[..., 0]
            residual = log_p.exp_() - self.target
        loss = torch.where(self.labelled, loss.to(torch.float64), 0.0)  # absent: -inf
        residual = residual * self.w_rows[..., None]
        grad = torch.bmm(self.x.transpose(1, 2), residual.view(g, n, pg * k))
        grad = grad.to(coef.dtype).view(g, width, pg, k).permute(0, 2, 1, 3).reshape(
            self.problems, width, k)
        penalised = coef * self.penalised
        value = ((self.w * loss).sum(1).reshape(-1)
                 + 0.5 * self.penalty * (penalised ** 2).sum((1, 2)))
        grad = grad + self.penalty[:, None, None] * penalised
        if not self.binary:
            grad = grad * self.present[:, None, :]
        return value, grad


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((1, 2))


def _lbfgs(problems: _Problems, coef: torch.Tensor, scale: torch.Tensor,
           tolerance: float, max_iter: int, frozen: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Batched L-BFGS from ``coef`` (P, D + 1, k), with ``scale`` (P, D + 1, k) the diagonal
    starting approximation of each inverse Hessian; Armijo backtracking per problem. A
    problem stops when its largest gradient entry is below ``tolerance``; ``frozen`` ones
    (padding) never move."""
    value, grad = problems.value_grad(coef)
    slack = ROUNDING_SLACK * torch.finfo(problems.x.dtype).eps
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    done = frozen | (grad.abs().amax((1, 2)) <= tolerance)
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
    row mask; ``fit(masks, cs)`` returns each problem's coefficients in scikit-learn's
    layout: (classes present, coef (k, d), intercept (k,)). ``fit_together`` solves the
    problems of several designs (one per split of a cross-validation) as one batch.

    The principal axes are computed once per design, from all its rows. Axes the rows do
    not span are dropped: the data's gradient along them is zero, so from zero (or a warm
    start of this design) a coefficient there stays zero. A design wider than tall (a
    probe of 1,015 features on 130 ECGs) keeps as many axes as rows, found from the rows'
    own n x n Gram matrix (the same nonzero eigenvalues, the axes ``xᵀu / √(nλ)``), and
    L-BFGS's per-iteration work, over every coefficient, shrinks with it."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, balanced: bool):
        x64 = torch.as_tensor(np.asarray(x, dtype=np.float64))
        n = max(len(x64), 1)
        wide = len(x64) < x64.shape[1]
        eigenvalues, vectors = torch.linalg.eigh((x64 @ x64.T if wide else x64.T @ x64) / n)
        spanned = eigenvalues > SPANNED * eigenvalues.max().clamp_min(1e-300)
        self.eigenvalues = eigenvalues[spanned]
        if wide:  # x = Σ √(nλ) u vᵀ: the rotated rows are u √(nλ), the axes xᵀu / √(nλ)
            root = (n * self.eigenvalues).sqrt()
            rotated = vectors[:, spanned] * root
            self.axes = x64.T @ vectors[:, spanned] / root
        else:
            self.axes = vectors[:, spanned]
            rotated = x64 @ self.axes
        # the rotated rows and the intercept's column: (n, A + 1)
        self.design = torch.cat([rotated, torch.ones(len(rotated), 1, dtype=torch.float64)],
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

    def fit(self, masks: np.ndarray, cs: np.ndarray, start: torch.Tensor | None = None,
            tolerance: float = TOLERANCE) -> tuple[list[dict[str, list]], torch.Tensor]:
        """Problem ``p`` on the rows ``masks[p]`` with penalty ``cs[p]``, from ``start``
        (coefficients a previous ``fit`` returned) or zeros. Returns each problem's state
        (``classes``, ``coef``, ``intercept``) and the raw coefficients for a warm start."""
        (states,), coef = fit_together([self], [masks], [np.asarray(cs)], start, tolerance)
        return states, coef

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


def fit_together(fits: list[LogisticFits], masks: list[np.ndarray], cs: list[np.ndarray],
                 start: torch.Tensor | None = None, tolerance: float = TOLERANCE
                 ) -> tuple[list[list[dict[str, list]]], torch.Tensor]:
    """``LogisticFits.fit`` of each design (``masks[g]``, ``cs[g]`` for ``fits[g]``), solved
    as one batch: a cross-validated 200-ECG fit has 16 designs per expert, each of a few
    problems on ~160 rows, and one after another their iterations were Python overhead.
    ``start``: the raw coefficients a previous call on these designs returned (of some of
    them: a design's axes are kept whatever the call's widest), problem by problem in order.
    Returns the states per design, and the raw coefficients."""
    per_group = _per_group([len(m) for m in masks])
    chunks = [(g, j) for g, own in enumerate(masks) for j in range(0, len(own), per_group)]
    rows, axes = max(len(f.design) for f in fits), max(f.design.shape[1] - 1 for f in fits)
    # one design is used as it is (no padded copy: at 800 k rows it is gigabytes)
    design = (fits[0].design[None] if len(chunks) == 1
              else torch.zeros(len(chunks), rows, axes + 1, dtype=torch.float64))
    y = np.zeros((len(chunks), rows), dtype=np.int64)
    weights = np.zeros((len(chunks), per_group, rows))
    penalties = np.ones((len(chunks), per_group))
    variance = torch.ones(len(chunks), axes + 1, dtype=torch.float64)
    frozen = torch.zeros(len(chunks), per_group, dtype=torch.bool)
    for at, (g, j) in enumerate(chunks):
        fit, (n, a) = fits[g], (len(fits[g].design), fits[g].design.shape[1] - 1)
        if len(chunks) > 1:
            design[at, :n, :a], design[at, :n, -1] = fit.design[:, :-1], 1.0
        y[at, :n] = fit.y
        w, c = fit._weights(masks[g][j: j + per_group]), cs[g][j: j + per_group]
        short = per_group - len(w)  # frozen copies of the chunk's first problem fill it
        w, c = np.concatenate([w, w[:1].repeat(short, 0)]), np.concatenate([c, c[:1].repeat(short)])
        weights[at, :, :n], penalties[at] = w, 1.0 / (c * w.sum(1))
        variance[at, :a] = fit.eigenvalues
        frozen[at, per_group - short:] = True
    float64 = tolerance < FLOAT32_TOLERANCE
    problems = _Problems(design if float64 else design.float(), y, weights, penalties,
                         fits[0].n_classes)
    real = ~frozen.reshape(-1)
    coef = torch.zeros(problems.shape, dtype=torch.float64)
    if start is not None:  # padded to its call's widest design: the axes that fit here
        kept = min(start.shape[1], axes + 1) - 1
        coef[real, :kept], coef[real, -1] = start[:, :kept], start[:, -1]
    scale = _scale(problems, weights, y, variance, fits[0].n_classes)
    coef, _ = _lbfgs(problems, coef, scale, tolerance, MAX_ITER, frozen.reshape(-1))
    solved, present = coef[real], problems.present[real]
    states, p = [], 0
    for fit, own in zip(fits, masks, strict=True):
        a = fit.design.shape[1] - 1
        states.append([fit._state(torch.cat([solved[p + j, :a], solved[p + j, -1:]]),
                                  present[p + j]) for j in range(len(own))])
        p += len(own)
    return states, solved


def _per_group(counts: list[int]) -> int:
    """Problems per batched design: a design with more is split into several (its rows
    copied), one with fewer padded with frozen problems. The largest size that pads at
    most ``PADDING`` more slots than there are problems: padded to the largest count, the
    6 probes of each fold of cross-validation beside the fixed split's 18 (three seeds)
    took 2.7 slots per problem, while splitting every design into single problems copies
    the rows of each as often as it has problems."""
    return max(size for size in set(counts)
               if sum(-(-count // size) * size for count in counts) <= PADDING * sum(counts))


def _scale(problems: _Problems, weights: np.ndarray, y: np.ndarray, variance: torch.Tensor,
           n_classes: int) -> torch.Tensor:
    """Diagonal inverse-Hessian guess per problem, axis and class: 1 / (π(1-π)·λ_j + C⁻¹/S)
    with π the problem's weighted class frequency, λ_j its design's variance on axis j."""
    prior = np.einsum("gpn,gnc->gpc", weights, np.eye(n_classes)[y]).reshape(
        problems.problems, n_classes)
    prior = prior / prior.sum(1, keepdims=True)
    spread = torch.as_tensor(prior * (1 - prior))  # (P, classes)
    if problems.binary:
        spread = spread[:, 1:]
    spread = spread.clamp_min(1e-3)
    variance = variance.repeat_interleave(problems.per_group, dim=0)  # (P, A + 1)
    curvature = (spread[:, None, :] * variance[:, :, None]
                 + problems.penalty[:, None, None] * problems.penalised[None])
    return 1.0 / curvature

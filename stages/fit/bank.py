"""Many small models trained as one: stacked weights, one pass over the cached rows for all.

Stage two fits dozens of small models per task (each expert's head once per cross-fitting
fold and once on all training rows; the gate once per selection fold and once more).
Trained one after another, batch by batch, their cost was Python and optimiser overhead,
not arithmetic: five times the rows cost 1.2 times the time. Here the models of one kind
are *members* of a bank: every weight carries a leading member axis, a layer is one
batched matmul for all members, and each batch of rows is read once for every member.

A member learns only from its own rows: a batch's loss is, per member, the (class-)weighted
mean over the batch rows that belong to it, and each member has its own AdamW state and
step count (``BatchedAdamW``), so a member's trajectory does not depend on the others in the
bank: it is the one it would follow alone on the same batches restricted to its rows (the
test ``test_bank.py`` checks this against the deployed head and ``torch.optim.AdamW``). Early
stopping is per member: a member whose validation loss stopped improving for ``patience``
epochs stops updating, and its best state is restored at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.fit.features import FeatureSource
from stages.fit.model import Gate, Head, ModelConfig

FIRST_LAYER_CACHE_GB = 1.0  # per bank, for HeadBank.precompute
MIN_STEPS = 10  # optimiser steps per epoch, at least, however small the training set
EVAL_MEMBER_ROWS = 2**14  # members x rows per batch when measuring validation losses
EVAL_MAX_ROWS = 4096
ROWS_PER_OUTPUT = 3  # below, input scaling is applied to the rows (``_Stacked._project``)


def batch_size_for(n_rows: int, batch_size: int) -> int:
    """``batch_size``, shrunk so an epoch has ``MIN_STEPS`` steps: with 128 training ECGs
    and batches of 256 an epoch is one step, and early stopping ends training before the
    heads or the gate have moved from their initialisation."""
    return max(8, min(batch_size, -(-n_rows // MIN_STEPS)))


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """``nn.Linear``'s default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(shape, generator=generator) * (2 * bound) - bound


def _linear(d_in: int, d_out: int, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (d_in, d_out), bias (d_out,)) initialised as ``nn.Linear(d_in, d_out)``."""
    return _uniform((d_in, d_out), d_in, generator), _uniform((d_out,), d_in, generator)


def input_affine(base: tuple[np.ndarray, np.ndarray], own: tuple[np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) with ``(x - own_mean) / own_std = x_base * a + c`` for features scaled with
    ``base``."""
    (base_mean, base_std), (mean, std) = base, own
    return ((base_std / std).astype(np.float32),
            ((base_mean - mean) / std).astype(np.float32))


class _Gathered(dict):
    """Some members' weights: the trainable ones given, a frozen one gathered from all
    members' ``frozen`` view when first read. A head's frozen first layer (D x h per member)
    is not read once its output is cached, and gathering it for the members still training
    cost more than their step on wide experts (33 against 9 ms a step for 90 of 108 heads
    of 1,015 features at 20 rows)."""

    def __init__(self, members: torch.Tensor, frozen: dict[str, torch.Tensor],
                 gathered: dict[str, torch.Tensor]):
        super().__init__(gathered)
        self.members, self.frozen = members, frozen

    def __missing__(self, name: str) -> torch.Tensor:
        value = self[name] = self.frozen[name][self.members]
        return value


class _Stacked(nn.Module):
    """Weights of M members kept flat: every trainable weight in one (M, P) parameter and
    every frozen one in one (M, Q) buffer, so an optimiser step is a few tensor operations
    per bank, not per weight (it was a third of a step's time). ``weights(members)`` gives
    each weight as a view (members, *shape) of the flat storage."""

    def __init__(self, per_member: list[dict[str, torch.Tensor]], frozen: set[str]):
        super().__init__()
        self.layout = {name: (name not in frozen, tuple(value.shape))  # in storage order
                       for name, value in per_member[0].items()}

        def flat(trainable: bool) -> torch.Tensor:
            names = self._names(trainable)
            return torch.stack([torch.cat([m[n].reshape(-1) for n in names])
                                if names else torch.zeros(0) for m in per_member])

        self.flat = nn.Parameter(flat(True))
        self.register_buffer("fixed", flat(False))
        self.register_buffer("in_scale", None, persistent=False)
        self.register_buffer("in_shift", None, persistent=False)

    @property
    def n_members(self) -> int:
        return int(self.flat.shape[0])

    def _names(self, trainable: bool) -> list[str]:
        return [n for n, (t, _) in self.layout.items() if t == trainable]

    def weights(self, members: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each weight as a view (members, *shape). The storage is split in one operation:
        a slice per weight made backward write a zero gradient of the whole storage per
        weight (fill, copy, sum), half of a small network's step. Of ``members``, the
        trainable weights are gathered at once and a frozen one when first read
        (``_Gathered``)."""
        out: dict[str, torch.Tensor] = {}
        for trainable, storage in ((True, self.flat), (False, self.fixed)):
            names = self._names(trainable)
            if not names:
                continue
            if trainable and members is not None:
                storage = storage[members]
            sizes = [math.prod(self.layout[n][1]) for n in names]
            for name, part in zip(names, storage.split(sizes, dim=1), strict=True):
                out[name] = part.view(len(storage), *self.layout[name][1])
        if members is None:
            return out
        return _Gathered(members, {n: v for n, v in out.items() if not self.layout[n][0]},
                         {n: v for n, v in out.items() if self.layout[n][0]})

    def weight(self, name: str) -> torch.Tensor:
        """All members' ``name`` weight, a view of the flat storage (writable in place)."""
        return self.weights()[name]

    def set_input_scaling(self, scale: np.ndarray, shift: np.ndarray) -> None:
        """Member ``m`` reads ``x * scale[m] + shift[m]`` (M, D) instead of the batch's ``x``.

        Members fitted on different training rows (the folds of cross-validation) scale the
        features with their own rows' moments; the batch is scaled once with shared ones,
        and each member's affine correction (near 1 and 0, so nothing cancels in float32)
        is applied inside its products (``_project``)."""
        self.in_scale = torch.as_tensor(scale, dtype=self.flat.dtype, device=self.flat.device)
        self.in_shift = torch.as_tensor(shift, dtype=self.flat.dtype, device=self.flat.device)

    def _project(self, x: torch.Tensor, w: torch.Tensor, members: torch.Tensor | None
                 ) -> torch.Tensor:
        """(B, D) features through each member's (M', D, k) weights -> (M', B, k), with the
        member's input scaling ``x * a + c``: on the rows, (M', B, D), when a batch has at
        most ``ROWS_PER_OUTPUT`` rows per output, else on the weights,
        ``x @ (a * W) + c @ W``, whose (M', D, k) products and their gradients cost
        more than the scaled rows on short batches (a 200-ECG cohort's gates: 16 against
        6 ms a step for 108 gates of 517 inputs, 64 hidden, 20 rows)."""
        if self.in_scale is None:
            return torch.einsum("bd,mdk->mbk", x, w)
        scale, shift = ((self.in_scale, self.in_shift) if members is None
                        else (self.in_scale[members], self.in_shift[members]))
        if len(x) <= ROWS_PER_OUTPUT * w.shape[-1]:
            return torch.bmm(torch.addcmul(shift[:, None], x[None], scale[:, None]), w)
        return (torch.einsum("bd,mdk->mbk", x, scale[..., None] * w)
                + torch.einsum("md,mdk->mk", shift, w)[:, None])


class HeadBank(_Stacked):
    """M heads of one expert (``stages.fit.model.Head``), stacked: (B, D) -> (M, B, k).

    With ``adapter="lora"`` the hidden layers' weights and biases are frozen and each learns
    the update ``(alpha/r) * A @ B`` (A initialised as ``nn.Linear``, B zero: ``LoraLinear``);
    the output layer and the linear skip path train fully. With ``adapter="full"`` every
    weight trains. Member ``m`` is initialised from ``seeds[m]`` alone, so it starts the
    same whichever bank it is in.
    """

    def __init__(self, d_in: int, d_out: int, config: ModelConfig, seeds: list[int]):
        lora = config.adapter == "lora"
        h, r = config.hidden, config.lora_r
        members = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            w1, b1 = _linear(d_in, h, g)
            w2, b2 = _linear(h, h, g)
            w3, b3 = _linear(h, d_out, g)
            if config.skip:  # the head starts as its linear path (see probes.robust_linear)
                w3, b3 = torch.zeros_like(w3), torch.zeros_like(b3)
            member = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}
            if lora:
                member.update(a1=_uniform((d_in, r), d_in, g), l1=torch.zeros(r, h),
                              a2=_uniform((h, r), h, g), l2=torch.zeros(r, h))
            if config.skip:
                member["ws"], member["bs"] = _linear(d_in, d_out, g)
            members.append(member)
        super().__init__(members, {"w1", "b1", "w2", "b2"} if lora else set())
        self.d_in, self.d_out, self.config, self.lora = d_in, d_out, config, lora
        self.scale = config.lora_alpha / config.lora_r if lora else 0.0
        self.first: torch.Tensor | None = None

    def precompute(self, x: torch.Tensor) -> None:
        """Keep the frozen first layer's output (M, N, h) for every row of ``x`` (N, D),
        indexed by cohort row: with LoRA it never changes, and on wide features (768 to 1,015
        for MOMENT per lead and the morphology expert) it was most of a step's arithmetic.
        Skipped (computed per batch) beyond ``FIRST_LAYER_CACHE_GB``."""
        size = self.n_members * len(x) * self.config.hidden * x.element_size()
        if self.lora and size <= FIRST_LAYER_CACHE_GB * 2**30:
            w = self.weights()
            with torch.no_grad():
                self.first = self._project(x, w["w1"], None) + w["b1"][:, None]

    def _adapted(self, x: torch.Tensor, base: torch.Tensor, w: dict[str, torch.Tensor],
                 layer: int, members: torch.Tensor | None) -> torch.Tensor:
        if not self.lora:
            return base
        a, lora_b = w[f"a{layer}"], w[f"l{layer}"]
        if x.dim() == 3:  # a hidden layer's input, already per member
            if self.training and self.config.lora_dropout:
                x = F.dropout(x, self.config.lora_dropout)
            down = torch.bmm(x, a)
        elif self.training and self.config.lora_dropout:  # the features, scaled per member
            keep = F.dropout(torch.ones_like(x), self.config.lora_dropout)
            down = self._project(x * keep, a, members)
            if self.in_shift is not None:  # the shift is dropped with its feature too
                shift = self.in_shift if members is None else self.in_shift[members]
                down = down + torch.einsum("bd,mdk->mbk", keep - 1, shift[..., None] * a)
        else:
            down = self._project(x, a, members)
        # in place: no copy of (M', B, h); operands in base's type (bf16 under autocast)
        return base.baddbmm_(down.to(base.dtype), lora_b.to(base.dtype), alpha=self.scale)

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) features shared by the members -> (M, B, k) outputs, of ``members`` (an
        index tensor) only when given: members that stopped cost nothing. ``rows`` (the
        batch's cohort rows) reads the first layer from ``precompute``'s cache."""
        w = self.weights(members)
        if self.first is not None and rows is not None:
            base = (self.first[:, rows] if members is None
                    else self.first[members[:, None], rows[None, :]])
        else:
            base = self._project(x, w["w1"], members) + w["b1"][:, None]
        hidden = torch.relu_(self._adapted(x, base, w, 1, members))
        # the low-rank update stays a low-rank path: merged into W2 (M, h, h) first, it made
        # steps of few rows slower (the 200-ECG heads 19.2 against 16.9 s) and others no faster
        base = torch.baddbmm(w["b2"][:, None], hidden, w["w2"])
        hidden = torch.relu_(self._adapted(hidden, base, w, 2, members))
        out = torch.baddbmm(w["b3"][:, None], hidden, w["w3"])
        if self.config.skip:
            out = out + self._project(x, w["ws"], members) + w["bs"][:, None]
        return out

    def set_skip(self, member: int, coef: np.ndarray, intercept: float, column: int = 0
                 ) -> None:
        """Start output ``column`` of member ``member``'s linear path at a fitted linear map
        (a regression output)."""
        with torch.no_grad():
            self.weight("ws")[member, :, column] = torch.as_tensor(coef, dtype=self.flat.dtype)
            self.weight("bs")[member, column] = float(intercept)

    def export(self, member: int) -> Head:
        """Member ``member`` as the deployed ``Head``, weight for weight."""
        head = Head(self.d_in, self.d_out, self.config)
        w = {name: value[member] for name, value in self.weights().items()}
        with torch.no_grad():
            for i, layer in enumerate([head.mlp[0], head.mlp[2], head.mlp[4]], start=1):
                target = layer.base if self.lora and i < 3 else layer
                target.weight.copy_(w[f"w{i}"].T)
                target.bias.copy_(w[f"b{i}"])
                if self.lora and i < 3:
                    layer.lora_a.weight.copy_(w[f"a{i}"].T)
                    layer.lora_b.weight.copy_(w[f"l{i}"].T)
            if self.config.skip:
                head.skip.weight.copy_(w["ws"].T)
                head.skip.bias.copy_(w["bs"])
        return head.eval()


class GateBank(_Stacked):
    """M weighting networks (``stages.fit.model.Gate``), stacked: (B, D) -> (M, B, E, d)
    softmax weights over the E experts."""

    def __init__(self, d_in: int, n_experts: int, d_out: int, config: ModelConfig,
                 seeds: list[int]):
        per_output = d_out if config.gate_mode == "per_output" else 1
        members = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            w1, b1 = _linear(d_in, config.gate_hidden, g)
            w2, b2 = _linear(config.gate_hidden, n_experts * per_output, g)
            members.append({"w1": w1, "b1": b1, "w2": w2, "b2": b2})
        super().__init__(members, set())
        self.d_in, self.n_experts, self.config = d_in, n_experts, config
        self.d_out, self.full_out = per_output, d_out

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weights(members)
        hidden = torch.relu(self._project(x, w["w1"], members) + w["b1"][:, None])
        logits = torch.bmm(hidden, w["w2"]) + w["b2"][:, None]
        return logits.view(len(logits), len(x), self.n_experts, self.d_out).softmax(dim=2)

    def export(self, member: int) -> Gate:
        gate = Gate(self.d_in, self.n_experts, self.full_out, self.config)
        w = {name: value[member] for name, value in self.weights().items()}
        with torch.no_grad():
            gate.net[0].weight.copy_(w["w1"].T)
            gate.net[0].bias.copy_(w["b1"])
            gate.net[2].weight.copy_(w["w2"].T)
            gate.net[2].bias.copy_(w["b2"])
        return gate.eval()


class Banks(nn.Module):
    """Banks over different inputs trained in one pass (each expert's heads read its own
    features): their members side by side, in order, along one member axis.

    With ``bf16`` the products run under bf16 autocast (weights, optimiser state and
    losses stay float32; outputs come back as float32)."""

    def __init__(self, banks: dict[str, nn.Module], bf16: bool = False):
        super().__init__()
        self.banks = nn.ModuleDict(banks)
        self.bf16 = bf16

    @property
    def n_members(self) -> int:
        return sum(b.n_members for b in self.banks.values())

    def offsets(self) -> dict[str, int]:
        """Each bank's first member on the shared axis."""
        starts, at = {}, 0
        for name, bank in self.banks.items():
            starts[name], at = at, at + bank.n_members
        return starts

    def forward(self, x: dict[str, torch.Tensor], members: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs of every member, or of ``members`` (sorted indices on the shared axis);
        ``rows``: the batch's cohort rows."""
        if not self.bf16:
            return self._outputs(x, members, rows)
        with torch.autocast(next(self.parameters()).device.type, dtype=torch.bfloat16):
            return self._outputs(x, members, rows).float()

    def _outputs(self, x: dict[str, torch.Tensor], members: torch.Tensor | None,
                 rows: torch.Tensor | None) -> torch.Tensor:
        if members is None:
            return torch.cat([bank(x[name], None, rows) for name, bank in self.banks.items()],
                             dim=0)
        parts = []
        for name, start in self.offsets().items():
            bank = self.banks[name]
            local = members[(members >= start) & (members < start + bank.n_members)] - start
            if len(local):  # all of a bank's members: no copy of its weights to index them
                parts.append(bank(x[name], local if len(local) < bank.n_members else None,
                                  rows))
        return torch.cat(parts, dim=0)

    def member_params(self) -> list[tuple[str, nn.Parameter, slice]]:
        """Every trainable weight, with the members it holds on the shared axis."""
        out = []
        for name, start in self.offsets().items():
            bank = self.banks[name]
            span = slice(start, start + bank.n_members)
            out += [(f"{name}.{n}", p, span) for n, p in bank.named_parameters()
                    if p.requires_grad]
        return out


def _per_member(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(members,) values shaped to broadcast over a weight with leading member axis."""
    return values.view((-1,) + (1,) * (p.dim() - 1))


class BatchedAdamW:
    """``torch.optim.AdamW`` (its fused kernel) with one state and step count per member:
    ``step(active)`` updates only the active members, so a member that stopped, or had no
    rows in a batch, keeps its weights and moments.

    Each member's rows of the flat weights are handed to torch's fused AdamW kernel as
    tensors of their own, with their own step counts: one pass over the weights, where
    the same update in tensor operations was a dozen, and most of a small network's step.
    """

    def __init__(self, banks: Banks, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [(p, span) for _, p, span in banks.member_params()]
        self.lr, self.weight_decay, (self.beta1, self.beta2), self.eps = (
            lr, weight_decay, betas, eps)
        self.m = [torch.zeros_like(p) for p, _ in self.params]
        self.v = [torch.zeros_like(p) for p, _ in self.params]
        # one step count per member, as the kernel reads it (a float32 0-d tensor each)
        self.steps = torch.zeros(banks.n_members, device=self.params[0][0].device)
        self.step_counts = list(self.steps.unbind(0))

    def step(self, active: torch.Tensor) -> None:
        """Update the active members' rows only: a bank of hundreds of heads (the folds of
        cross-validation) where a few still train pays for those few."""
        self.steps += active.to(self.steps.dtype)
        on = active.nonzero()[:, 0].tolist()
        with torch.no_grad():
            for (p, span), m, v in zip(self.params, self.m, self.v, strict=True):
                rows = [i - span.start for i in on if span.start <= i < span.stop]
                if p.grad is not None and rows:
                    tensors = [t.unbind(0) for t in (p, p.grad, m, v)]
                    steps = self.step_counts[span]
                    torch._fused_adamw_(
                        *([t[i] for i in rows] for t in tensors), [],
                        [steps[i] for i in rows], lr=self.lr, beta1=self.beta1,
                        beta2=self.beta2, weight_decay=self.weight_decay, eps=self.eps,
                        amsgrad=False, maximize=False)
                p.grad = None


@dataclass
class Criterion:
    """Per-row loss of the members computed, ``rows(out, chunk, members)`` ->
    ``(loss (M', B), weight (M', B) or (B,))`` (``members``: their indices, as members may
    have their own targets), and an optional per-row penalty (M', B) averaged without
    weights (the gate's prior).

    A member's loss on some rows is Σ weight·loss / Σ weight (+ mean penalty) over them:
    ``F.nll_loss``'s weighted mean, or a plain mean when every weight is 1.
    """

    rows: Callable[[torch.Tensor, np.ndarray, torch.Tensor],
                   tuple[torch.Tensor, torch.Tensor]]
    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None

    def sums(self, out: torch.Tensor, chunk: np.ndarray, mask: torch.Tensor,
             members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
        """(Σ w·loss, Σ w, Σ penalty, Σ 1) per member over the masked rows of a batch."""
        loss, weight = self.rows(out, chunk, members)
        weight = mask * weight
        counted = mask.to(loss.dtype)
        penalty = ((self.penalty(out) * counted).sum(1) if self.penalty is not None
                   else torch.zeros_like(counted[:, 0]))
        return (weight * loss).sum(1), weight.sum(1), penalty, counted.sum(1)

    @staticmethod
    def mean(sums: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss, weight, penalty, count = sums
        return loss / weight.clamp_min(1e-12) + penalty / count.clamp_min(1)


class _Best:
    """Per member: the lowest validation loss so far, its weights, and the epochs since."""

    def __init__(self, banks: Banks, loss: torch.Tensor, patience: int):
        self.patience, self.loss = patience, loss.clone()
        self.stale = torch.zeros_like(loss, dtype=torch.long)
        self.state = {n: p.detach().clone() for n, p, _ in banks.member_params()}

    def update(self, banks: Banks, loss: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Record this epoch's losses; returns the members still training."""
        better = active & (loss < self.loss - 1e-6)
        self.loss = torch.where(better, loss, self.loss)
        self.stale = torch.where(better, 0, self.stale + active.long())
        with torch.no_grad():
            for n, p, span in banks.member_params():
                self.state[n] = torch.where(_per_member(better[span], p), p, self.state[n])
        return active & (self.stale < self.patience)

    def restore(self, banks: Banks) -> None:
        with torch.no_grad():
            for n, p, _ in banks.member_params():
                p.copy_(self.state[n])
        banks.eval()


Inputs = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Reader:
    """How banks read the cache: the arrays a batch holds, and each bank's input from them
    (by default the array of the bank's own name), on ``device``.

    When the source is in memory its standardised features are put on the device once
    (``resident``) and batches are cut there; else each batch is read (streamed by block)
    and moved. The batch order is the source's either way.
    """

    source: FeatureSource
    names: list[str]
    device: torch.device
    inputs: Inputs | None = None
    resident: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.source.in_memory:
            every = np.arange(self.source.n_rows)
            self.resident = self._tensors(self.source.take(every, self.names))

    def _tensors(self, data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        data = self.inputs(data) if self.inputs is not None else data
        return {name: torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
                for name, x in data.items()}

    def batches(self, rows: np.ndarray, batch_size: int, rng: np.random.Generator | None
                ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        if self.resident is None:
            for chunk, data in self.source.batches(rows, batch_size, rng, self.names):
                yield chunk, self._tensors(data)
            return
        order = rng.permutation(rows) if rng is not None else np.sort(rows)
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            yield chunk, _Rows(self.resident, torch.from_numpy(chunk).to(self.device))


class _Rows(dict):
    """A batch's rows of the resident arrays, each cut when a bank first reads it: once
    a bank's members have all stopped, its expert's features are not copied for every
    batch (in the demo's diagnosis fit, the tail of epochs where a few heads of one expert
    still trained spent a quarter of its time on those copies)."""

    def __init__(self, arrays: dict[str, torch.Tensor], index: torch.Tensor):
        super().__init__()
        self.arrays, self.index = arrays, index

    def __missing__(self, name: str) -> torch.Tensor:
        value = self[name] = self.arrays[name][self.index]
        return value


def _membership(rows: list[np.ndarray], n_rows: int, device: torch.device) -> torch.Tensor:
    """(M, N) bool: member m owns row r."""
    mask = np.zeros((len(rows), n_rows), dtype=bool)
    for m, r in enumerate(rows):
        mask[m, r] = True
    return torch.from_numpy(mask).to(device)


def _index(chunk: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(chunk).to(device)


def _columns(owned: torch.Tensor, chunk: np.ndarray) -> torch.Tensor:
    return owned[:, _index(chunk, owned.device)]


def _evaluate(banks: Banks, reader: Reader, criterion: Criterion, owned: torch.Tensor,
              rows: np.ndarray, batch_size: int, active: torch.Tensor) -> torch.Tensor:
    """Every active member's loss over its own rows among ``rows`` (M,; inf elsewhere)."""
    members = active.nonzero()[:, 0]
    loss = torch.full((banks.n_members,), float("inf"), device=owned.device)
    totals = None
    # no gradients: batches as large as the training step's activations, so the epochs
    # where a few members still train do not pay per-batch overhead on their few products
    # (at most EVAL_MAX_ROWS rows: a batch copies every feature of its rows)
    batch_size = max(batch_size, min(EVAL_MAX_ROWS, EVAL_MEMBER_ROWS // max(len(members), 1)))
    with torch.no_grad():
        for chunk, x in reader.batches(rows, batch_size, None):
            sums = criterion.sums(banks(x, members, _index(chunk, owned.device)), chunk,
                                  _columns(owned[members], chunk), members)
            totals = sums if totals is None else tuple(
                a + b for a, b in zip(totals, sums, strict=True))
    if totals is not None:
        loss[members] = Criterion.mean(totals).to(loss.dtype)
    return loss


def train_banks(banks: Banks, reader: Reader, criterion: Criterion, train: list[np.ndarray],
                val: list[np.ndarray], *, lr: float, weight_decay: float, batch_size: int,
                max_epochs: int, patience: int, seed: int) -> dict:
    """Train member ``m`` of ``banks`` on its rows ``train[m]``, early-stopped on ``val[m]``.

    Each epoch shuffles the union of the members' training rows (``seed``) into batches of
    ``batch_size_for`` that union; a member steps on the batches that hold any of its rows.
    The starting point competes too (a warm-started head may be best). Returns a short
    history: epochs run and each member's best validation loss.
    """
    with _denormals_flushed():
        return _train(banks, reader, criterion, train, val, lr=lr, weight_decay=weight_decay,
                      batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                      seed=seed)


@contextmanager
def _denormals_flushed() -> Iterator[None]:
    """Subnormal floats read as zero while banks train (on this thread: torch's worker
    threads keep their own setting). Adam's second moments of weights whose gradients
    have died out decay into the subnormal range, where x86 arithmetic is many times
    slower: the weight generator's epochs took 4x as long after ten epochs (5.0 against
    1.5 s on the demo's ``ad``, the same weights to the last digit)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _train(banks: Banks, reader: Reader, criterion: Criterion, train: list[np.ndarray],
           val: list[np.ndarray], *, lr: float, weight_decay: float, batch_size: int,
           max_epochs: int, patience: int, seed: int) -> dict:
    device = reader.device
    n_rows = reader.source.n_rows
    owned_train = _membership(train, n_rows, device)
    owned_val = _membership(val, n_rows, device)
    union_train = np.unique(np.concatenate(train))
    union_val = np.unique(np.concatenate(val))
    reader.source.hold(union_val)  # read once, not once per epoch, when features stream
    step_batch = batch_size_for(len(union_train), batch_size)
    active = torch.ones(banks.n_members, dtype=torch.bool, device=device)
    banks.eval()
    best = _Best(banks, _evaluate(banks, reader, criterion, owned_val, union_val, batch_size,
                                  active), patience)
    optimiser = BatchedAdamW(banks, lr, weight_decay)
    rng = np.random.default_rng(seed)
    epochs = 0
    while epochs < max_epochs and bool(active.any()):
        epochs += 1
        banks.train()
        for chunk, x in reader.batches(union_train, step_batch, rng):
            mask = _columns(owned_train, chunk) & active[:, None]
            stepping = mask.any(1)
            members = stepping.nonzero()[:, 0]
            if not len(members):
                continue
            out = banks(x, members, _index(chunk, device))
            Criterion.mean(criterion.sums(out, chunk, mask[members], members)).sum().backward()
            optimiser.step(stepping)
        banks.eval()
        loss = _evaluate(banks, reader, criterion, owned_val, union_val, batch_size, active)
        active = best.update(banks, loss, active)
    best.restore(banks)
    return {"epochs": epochs, "best_val_loss": best.loss.tolist()}


def predict_banks(banks: Banks, reader: Reader, rows: np.ndarray, batch_size: int,
                  members: torch.Tensor | None = None) -> torch.Tensor:
    """Every member's output on ``rows`` (in the order given): (M, n, ...); of ``members``
    (sorted indices) only when given."""
    order = np.unique(rows)
    parts = []
    with torch.no_grad():
        for chunk, x in reader.batches(order, batch_size, None):
            parts.append(banks(x, members, _index(chunk, reader.device)))
    out = torch.cat(parts, dim=1)
    return out[:, torch.from_numpy(np.searchsorted(order, rows)).to(out.device)]

"""The EnECG ensemble: one FFN head per frozen expert, mixed per ECG by a gate.

Heads are ``Linear(D,h)-ReLU-Linear(h,h)-ReLU-Linear(h,out)``. With ``adapter="lora"``
(EnECG) the hidden layers stay at their seeded initialisation and learn a rank-``r`` LoRA
update (``LoraLinear``: peft's LoRA for these layers, checked against peft in the tests),
and the output layer is trained fully: a LoRA-only head whose output layer stays random
maps everything through a random projection, a known pitfall. With
``adapter="full"`` every head weight trains. With ``skip`` a linear map ``Linear(D,out)``
is added to the head's output, so a feature that already measures the target reaches the
output through a straight line the MLP need not learn (on real ECGs the MLP alone lost
to the rhythm expert's own mean-RR read off directly). The trainable parameter names are
recorded.

The gate reads the cached lead subset and gives softmax weights over experts, either one
per expert or one per expert and output. Regression mixes the experts' (standardised)
outputs; classification mixes their class probabilities, so the mixture is a proper
distribution and its log is the loss input.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 128
    adapter: str = "lora"  # lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    gate_hidden: int = 64
    gate_mode: str = "per_expert"  # per_expert | per_output
    skip: bool = True
    bag: int = 1  # heads averaged per expert: its cross-fitting folds' (``Bag``)

    def __post_init__(self) -> None:
        if self.adapter not in ("lora", "full"):
            raise ValueError(f"adapter must be lora or full, got {self.adapter!r}")
        if self.gate_mode not in ("per_expert", "per_output"):
            raise ValueError(f"gate_mode must be per_expert or per_output, got "
                             f"{self.gate_mode!r}")

    def describe(self) -> dict:
        return asdict(self)


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trained low-rank update, ``base(x) + (alpha/r) ·
    B(A(dropout(x)))`` with A initialised as ``nn.Linear`` and B at zero (Hu et al., 2021;
    peft's ``LoraConfig`` defaults). Written here rather than wrapped with peft: importing
    peft imports transformers, 2.7 of the 6.3 s every fit spent before its first step, for
    a layer of three matrices (``tests/test_bank.py`` checks it against peft)."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_a = nn.Linear(d_in, r, bias=False)
        self.lora_b = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.dropout(x))) * self.scale


class Head(nn.Module):
    """The FFN head, plus the optional linear skip path."""

    def __init__(self, d_in: int, d_out: int, config: ModelConfig):
        super().__init__()
        h = config.hidden

        def hidden(d: int) -> nn.Module:
            return (LoraLinear(d, h, config.lora_r, config.lora_alpha, config.lora_dropout)
                    if config.adapter == "lora" else nn.Linear(d, h))

        self.mlp = nn.Sequential(hidden(d_in), nn.ReLU(), hidden(h), nn.ReLU(),
                                 nn.Linear(h, d_out))
        if config.skip:  # the head starts as its linear path (see probes.robust_linear)
            nn.init.zeros_(self.mlp[4].weight)
            nn.init.zeros_(self.mlp[4].bias)
        self.skip = nn.Linear(d_in, d_out) if config.skip else None
        self.d_in, self.d_out, self.config = d_in, d_out, config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out if self.skip is None else out + self.skip(x)


# Saved before ``LoraLinear``, a LoRA head was peft's: its weights under peft's names.
_PEFT_NAMES = [(re.compile(r"(^|\.)mlp\.base_model\.model\.(\d)\.base_layer\."), r"\1mlp.\2.base."),
               (re.compile(r"(^|\.)mlp\.base_model\.model\.(\d)\.lora_A\.default\."),
                r"\1mlp.\2.lora_a."),
               (re.compile(r"(^|\.)mlp\.base_model\.model\.(\d)\.lora_B\.default\."),
                r"\1mlp.\2.lora_b."),
               (re.compile(r"(^|\.)mlp\.base_model\.model\.4\.modules_to_save\.default\."),
                r"\1mlp.4.")]


def renamed_from_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ensemble's saved weights under today's names: a model saved while the heads were
    peft's loads as it was trained (peft's copy of the untrained output layer dropped)."""
    out = {}
    for name, value in state.items():
        if ".original_module." in name:
            continue
        for pattern, replacement in _PEFT_NAMES:
            name = pattern.sub(replacement, name)
        out[name] = value
    return out


class Bag(nn.Module):
    """One expert's heads deployed together, their raw outputs (values, or logits) averaged:
    the heads of its cross-fitting folds, each fitted without one fold of subjects. They
    are trained anyway for the out-of-fold outputs; a further head refitted on every
    training row cost a sixth more training, and on the demo the fold heads' average had
    the lower test loss for 17 of 20 experts and seeds."""

    def __init__(self, heads: list[Head]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads]).mean(0)


def make_head(d_in: int, d_out: int, config: ModelConfig) -> Head | Bag:
    """An expert's head as ``config`` describes it: one, or a ``Bag`` of ``config.bag``."""
    if config.bag == 1:
        return Head(d_in, d_out, config)
    return Bag([Head(d_in, d_out, replace(config, bag=1)) for _ in range(config.bag)])


def bag_size(head: Head | Bag) -> int:
    return len(head.heads) if isinstance(head, Bag) else 1


def head_columns(head: Head | Bag, columns: slice) -> Head | Bag:
    """The head answering only outputs ``columns`` (one task's of a multi-task head): the
    same trunk, its output layer and linear path cut to those rows."""
    if isinstance(head, Bag):
        return Bag([head_columns(h, columns) for h in head.heads]).eval()
    part = Head(head.d_in, columns.stop - columns.start, head.config)
    shapes = {name: value.shape for name, value in part.state_dict().items()}
    state = {name: value if value.shape == shapes[name] else value[columns]
             for name, value in head.state_dict().items()}
    part.load_state_dict(state)
    return part.eval()


class Gate(nn.Module):
    def __init__(self, d_in: int, n_experts: int, d_out: int, config: ModelConfig):
        super().__init__()
        self.n_experts = n_experts
        self.d_out = d_out if config.gate_mode == "per_output" else 1
        self.net = nn.Sequential(nn.Linear(d_in, config.gate_hidden), nn.ReLU(),
                                 nn.Linear(config.gate_hidden, n_experts * self.d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_in) -> weights (B, experts, d_out or 1), summing to 1 over experts."""
        return self.net(x).view(len(x), self.n_experts, self.d_out).softmax(dim=1)


def mix(weights: torch.Tensor, outputs: torch.Tensor, classification: bool) -> torch.Tensor:
    """Σ_i w_i ŷ_i over experts (the second-to-last axis: weights (..., B, E, 1 or k),
    outputs (B, E, k)); per-output weights keep a class mixture a distribution by
    renormalising."""
    mixture = (weights * outputs).sum(dim=-2)
    if classification and weights.shape[-1] > 1:
        mixture = mixture / mixture.sum(dim=-1, keepdim=True)
    return mixture


class Ensemble(nn.Module):
    """Σ_i w_i(x) ŷ_i(x) over the experts in ``dims`` (one expert: just its head)."""

    def __init__(self, dims: dict[str, int], gate_dim: int, d_out: int, classification: bool,
                 config: ModelConfig):
        super().__init__()
        self.experts = list(dims)
        self.classification = classification
        self.heads = nn.ModuleDict({name: make_head(d, d_out, config)
                                    for name, d in dims.items()})
        self.gate = Gate(gate_dim, len(dims), d_out, config) if len(dims) > 1 else None

    def forward(self, features: dict[str, torch.Tensor], gate_input: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (mixture, per-expert outputs (B, E, out), weights (B, E, out or 1)).

        For classification the mixture and the expert outputs are probabilities.
        """
        outputs = torch.stack([self.heads[name](features[name]) for name in self.experts], 1)
        if self.classification:
            outputs = outputs.softmax(dim=-1)
        if self.gate is None:
            weights = outputs.new_full((len(outputs), len(self.experts), 1),
                                       1.0 / len(self.experts))
        else:
            weights = self.gate(gate_input)
        return mix(weights, outputs, self.classification), outputs, weights

    def trainable(self) -> dict[str, list[str]]:
        """Names of the parameters that learn, per head and for the gate."""
        named = {name: self.heads[name] for name in self.experts}
        if self.gate is not None:
            named["gate"] = self.gate
        return {name: [n for n, p in module.named_parameters() if p.requires_grad]
                for name, module in named.items()}

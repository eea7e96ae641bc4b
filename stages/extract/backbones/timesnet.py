"""TimesNet (Wu et al., 2023): each block finds the dominant periods of its input by FFT,
folds the series into 2-D (cycles x phase) per period and applies Inception-style 2-D
convolutions, so intra- and inter-period variation (beat shape, beat-to-beat change) are
both convolved.

Parameter and buffer names follow the Time-Series-Library layout (``enc_embedding.*``,
``model.<i>.conv.{0,2}.kernels.<j>``, ``layer_norm``, optional ``projection``) so its
checkpoints load with ``strict=True``. One deliberate difference: periods are chosen per
ECG rather than from the batch-averaged spectrum, so an ECG's features never depend on
which other ECGs share its batch (a cache must not depend on batch composition). The
feature is the final layer-normalised encoder output averaged over time; with
``num_class`` > 0 the classification logits are cached too, as ``logits``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import StateDictBackbone, register
from stages.extract.contract import InputContract


class TokenEmbedding(nn.Module):
    def __init__(self, c_in: int, d_model: int):
        super().__init__()
        self.tokenConv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1,
                                   padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.tokenConv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, L, d)
        return self.tokenConv(x.transpose(1, 2)).transpose(1, 2)


class PositionalEmbedding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                        * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe[:, : x.size(1)]


class TimeFeatureEmbedding(nn.Module):
    """Present only so checkpoints that carry it load; ECGs have no calendar features."""

    def __init__(self, d_model: int, n_features: int = 4):
        super().__init__()
        self.embed = nn.Linear(n_features, d_model, bias=False)


class DataEmbedding(nn.Module):
    def __init__(self, c_in: int, d_model: int, dropout: float):
        super().__init__()
        self.value_embedding = TokenEmbedding(c_in, d_model)
        self.position_embedding = PositionalEmbedding(d_model)
        self.temporal_embedding = TimeFeatureEmbedding(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.value_embedding(x) + self.position_embedding(x))


class InceptionBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_kernels: int):
        super().__init__()
        self.kernels = nn.ModuleList(nn.Conv2d(c_in, c_out, kernel_size=2 * i + 1, padding=i)
                                     for i in range(num_kernels))
        for conv in self.kernels:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x) for conv in self.kernels], dim=-1).mean(-1)


class TimesBlock(nn.Module):
    def __init__(self, d_model: int, d_ff: int, top_k: int, num_kernels: int):
        super().__init__()
        self.k = top_k
        self.conv = nn.Sequential(InceptionBlock(d_model, d_ff, num_kernels), nn.GELU(),
                                  InceptionBlock(d_ff, d_model, num_kernels))

    def _fold(self, x: torch.Tensor, period: int) -> torch.Tensor:
        """(b, T, N) -> 2-D over (cycles, phase), convolve, unfold back to (b, T, N)."""
        b, t, n = x.shape
        length = -(-t // period) * period
        if length != t:
            x = torch.cat([x, x.new_zeros(b, length - t, n)], dim=1)
        out = x.reshape(b, length // period, period, n).permute(0, 3, 1, 2)
        out = self.conv(out).permute(0, 2, 3, 1).reshape(b, -1, n)
        return out[:, :t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n = x.shape
        amplitude = torch.fft.rfft(x, dim=1).abs().mean(-1)  # (B, F), per ECG
        amplitude[:, 0] = 0
        weight, freq = torch.topk(amplitude, self.k, dim=1)
        periods = t // freq.clamp(min=1)
        res = x.new_zeros(b, t, n, self.k)
        for rank in range(self.k):
            for period in torch.unique(periods[:, rank]).tolist():
                rows = (periods[:, rank] == period).nonzero().flatten()
                res[rows, :, :, rank] = self._fold(x[rows], int(period))
        mix = F.softmax(weight, dim=1)[:, None, None, :]
        return (res * mix).sum(-1) + x


class TimesNetModel(nn.Module):
    def __init__(self, seq_len: int, enc_in: int, d_model: int, d_ff: int, e_layers: int,
                 top_k: int, num_kernels: int, dropout: float, num_class: int):
        super().__init__()
        self.enc_embedding = DataEmbedding(enc_in, d_model, dropout)
        self.model = nn.ModuleList(TimesBlock(d_model, d_ff, top_k, num_kernels)
                                   for _ in range(e_layers))
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(d_model * seq_len, num_class) if num_class else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, L) -> pooled encoder output (B, d) and logits (B, classes) or None."""
        out = self.enc_embedding(x.transpose(1, 2))
        for block in self.model:
            out = self.layer_norm(block(out))
        logits = None
        if self.projection is not None:
            logits = self.projection(self.dropout(F.gelu(out)).flatten(1))
        return out.mean(dim=1), logits


@register("timesnet")
class TimesNet(StateDictBackbone):
    defaults = {"seq_len": 500, "d_model": 32, "d_ff": 32, "e_layers": 2, "top_k": 3,
                "num_kernels": 3, "dropout": 0.1, "num_class": 0}

    @property
    def contract(self) -> InputContract:
        return InputContract(length=self.config["seq_len"])

    def arrays(self) -> list[ArraySpec]:
        specs = [ArraySpec("features", (self.config["d_model"],))]
        if self.config["num_class"]:
            specs.append(ArraySpec("logits", (self.config["num_class"],)))
        return specs

    def build(self, config: dict[str, Any]) -> nn.Module:
        keys = ("seq_len", "d_model", "d_ff", "e_layers", "top_k", "num_kernels", "dropout",
                "num_class")
        return TimesNetModel(enc_in=len(self.contract.leads), **{k: config[k] for k in keys})

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, logits = self.model(x)
        return {"features": pooled} if logits is None else {"features": pooled,
                                                            "logits": logits}

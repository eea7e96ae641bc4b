"""DLinear (Zeng et al., 2023): moving-average decomposition into trend and seasonal parts,
each mapped by one linear layer over time.

Parameter names follow the Time-Series-Library layout (``Linear_Seasonal``, ``Linear_Trend``;
``.<i>`` per channel when ``individual``), so published checkpoints such as EnECG's load with
``strict=True``. Features are the per-lead seasonal and trend projections (what the linear
maps see), not the 1-number forecast the paper's code fed its heads; that forecast is cached
too, as ``forecast``, so the two designs can be compared from the same cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import StateDictBackbone, register
from stages.extract.contract import InputContract


class MovingAverage(nn.Module):
    """Centred moving average with the series' first/last value repeated at the edges."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.pool = nn.AvgPool1d(kernel_size=kernel, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        pad = (self.kernel - 1) // 2
        x = torch.cat([x[..., :1].expand(-1, -1, pad), x, x[..., -1:].expand(-1, -1, pad)], -1)
        return self.pool(x)


class DLinearModel(nn.Module):
    def __init__(self, seq_len: int, pred_len: int, kernel: int, individual: bool,
                 channels: int):
        super().__init__()
        self.trend_of = MovingAverage(kernel)
        self.individual = individual
        if individual:
            self.Linear_Seasonal = nn.ModuleList(nn.Linear(seq_len, pred_len)
                                                 for _ in range(channels))
            self.Linear_Trend = nn.ModuleList(nn.Linear(seq_len, pred_len)
                                              for _ in range(channels))
        else:
            self.Linear_Seasonal = nn.Linear(seq_len, pred_len)
            self.Linear_Trend = nn.Linear(seq_len, pred_len)

    def _map(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.individual:
            return layer(x)
        return torch.stack([lin(x[:, c]) for c, lin in enumerate(layer)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, L) -> seasonal and trend projections, each (B, C, pred_len)."""
        trend = self.trend_of(x)
        return self._map(self.Linear_Seasonal, x - trend), self._map(self.Linear_Trend, trend)


@register("dlinear")
class DLinear(StateDictBackbone):
    defaults = {"seq_len": 500, "pred_len": 16, "kernel": 25, "individual": False}

    @property
    def contract(self) -> InputContract:
        return InputContract(length=self.config["seq_len"])

    def arrays(self) -> list[ArraySpec]:
        n, p = len(self.contract.leads), self.config["pred_len"]
        specs = [ArraySpec("features", (n * 2 * p,)), ArraySpec("forecast", (n, p))]
        if self.per_lead:
            specs.append(ArraySpec("per_lead", (n, 2 * p)))
        return specs

    def build(self, config: dict[str, Any]) -> nn.Module:
        return DLinearModel(config["seq_len"], config["pred_len"], config["kernel"],
                            config["individual"], channels=len(self.contract.leads))

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        seasonal, trend = self.model(x)
        per_lead = torch.cat([seasonal, trend], dim=-1)
        out = {"features": per_lead.flatten(1), "forecast": seasonal + trend}
        if self.per_lead:
            out["per_lead"] = per_lead
        return out

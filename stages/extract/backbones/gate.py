"""Inputs of the Mixture-of-Experts gate: a cheap lead subset, cached like a backbone.

EnECG's gate weighs the experts from a few raw leads rather than from the experts' own
features, so it stays cheap. By default lead II at 50 Hz (500 samples), z-scored per
record. There are no weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import Backbone, register
from stages.extract.contract import InputContract


@register("gate")
class GateInputs(Backbone):
    defaults = {"leads": ["II"], "length": 500}
    needs_weights = False

    @property
    def contract(self) -> InputContract:
        return InputContract(length=self.config["length"], leads=tuple(self.config["leads"]),
                             normalise="zscore")

    def arrays(self) -> list[ArraySpec]:
        return [ArraySpec("features", (len(self.config["leads"]) * self.config["length"],))]

    def build_random(self, seed: int) -> nn.Module:
        return nn.Identity()

    def save(self, model: nn.Module, folder: Path) -> None:
        """Nothing to save: the gate inputs have no parameters."""

    def load(self, weights: str) -> nn.Module:
        return nn.Identity()

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x.flatten(1)}

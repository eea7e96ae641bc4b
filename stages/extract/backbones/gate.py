"""Inputs of the Mixture-of-Experts gate: a cheap lead subset, cached like a backbone.

EnECG's gate weighs the experts from a few raw leads rather than from the experts' own
features, so it stays cheap. By default lead II at 50 Hz (500 samples), z-scored per
record. There are no weights.
"""

from __future__ import annotations

import torch

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import WeightlessBackbone, register
from stages.extract.contract import InputContract


@register("gate")
class GateInputs(WeightlessBackbone):
    defaults = {"leads": ["II"], "length": 500}

    @property
    def contract(self) -> InputContract:
        return InputContract(length=self.config["length"], leads=tuple(self.config["leads"]),
                             normalise="zscore")

    def arrays(self) -> list[ArraySpec]:
        return [ArraySpec("features", (len(self.config["leads"]) * self.config["length"],))]

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x.flatten(1)}

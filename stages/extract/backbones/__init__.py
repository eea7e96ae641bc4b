"""Frozen feature extractors ("experts"), one module each, found by name.

A backbone declares its input contract and the arrays it caches, builds its model from a
small architecture config with seeded random weights (demo and tests) or loads published
weights, and maps a batch of contract-conformed ECGs to features. Adding one is one new
module that decorates a ``Backbone`` subclass with ``@register("name")``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pipeline.feature_cache import ArraySpec
from pipeline.registry import Registry
from stages.extract.contract import InputContract

RANDOM = "random"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsError(RuntimeError):
    """Weights are missing, unreadable or do not fit the backbone's configuration."""


class Backbone(abc.ABC):
    """Base of all backbones.

    ``model`` is the architecture (``backbones.<name>.model`` in params.yaml): it shapes
    random weights and must match published ones. ``per_lead`` also caches (N, 12, d)
    features where the backbone encodes leads independently.
    """

    name: ClassVar[str] = ""
    revision: ClassVar[int] = 1  # bump when the features change for the same weights
    defaults: ClassVar[dict[str, Any]] = {}
    needs_weights: ClassVar[bool] = True
    zero_row_is_failure: ClassVar[bool] = False  # measured experts: all-zero = not measurable
    # Instance normalisation inside the model with detached statistics (MOMENT's RevIN)
    # hides from gradients how the output depends on a lead's level and scale.
    detached_normalisation: ClassVar[bool] = False
    hub_example: ClassVar[str] = "a local folder"

    def __init__(self, model: dict[str, Any] | None = None, per_lead: bool = False):
        model = dict(model or {})
        unknown = sorted(set(model) - set(self.defaults))
        if unknown:
            raise ValueError(f"backbone {self.name}: unknown model setting(s) "
                             f"{', '.join(unknown)}; known: {', '.join(sorted(self.defaults))}")
        self.config = {**self.defaults, **model}
        self.per_lead = per_lead
        self.model: nn.Module | None = None

    @property
    @abc.abstractmethod
    def contract(self) -> InputContract:
        """The input form the model was trained on."""

    def saliency_contract(self) -> InputContract:
        """The contract for gradients: a model that normalises each lead with detached
        statistics gets z-scored input first (differentiably), which leaves its output
        unchanged and its gradient exact."""
        if self.detached_normalisation and self.contract.normalise == "none":
            return dataclasses.replace(self.contract, normalise="zscore")
        return self.contract

    @abc.abstractmethod
    def arrays(self) -> list[ArraySpec]:
        """The arrays ``features`` returns, with their per-record shapes."""

    @abc.abstractmethod
    def build_random(self, seed: int) -> nn.Module:
        """A model of ``self.config``'s shape with seeded random weights."""

    @abc.abstractmethod
    def save(self, model: nn.Module, folder: Path) -> None:
        """Write ``model`` so that ``load(folder)`` reads it back."""

    @abc.abstractmethod
    def load(self, weights: str) -> nn.Module:
        """Load from a local path or a hub id; raise WeightsError naming what to pass."""

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, leads, length) -> {array name: (B, *shape)}; called under inference_mode."""

    def prepare_weights(self, weights: str, seed: int, cache_dir: Path) -> str:
        """Resolve ``random`` to a saved folder, so random weights take the loading path too."""
        if weights != RANDOM:
            return weights
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        folder = Path(cache_dir) / "weights" / f"{self.name}-random-s{seed}-{digest[:8]}"
        if not (folder / "complete").exists():
            folder.mkdir(parents=True, exist_ok=True)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = self.build_random(seed)
            self.save(model, folder)
            (folder / "complete").touch()
        return str(folder)

    def setup(self, weights: str, device: torch.device) -> None:
        self.model = self.load(weights).to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def weights_digest(self) -> str:
        """Digest of the loaded parameters: identifies the weights whatever their origin."""
        h = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def missing(self, weights: str) -> WeightsError:
        return WeightsError(
            f"weights {weights!r} for backbone {self.name} were not found: pass "
            f"{self.hub_example} with --weights or in params.yaml "
            f"(backbones.{self.name}.weights), or `random` for a random-weight demo"
        )


class WeightlessBackbone(Backbone):
    """Extractors without parameters (gate inputs, measured experts): nothing to build,
    save or load, and nothing to download."""

    needs_weights = False

    def build_random(self, seed: int) -> nn.Module:
        return nn.Identity()

    def save(self, model: nn.Module, folder: Path) -> None:
        """Nothing to save: there are no parameters."""

    def load(self, weights: str) -> nn.Module:
        return nn.Identity()


class BeatBackbone(WeightlessBackbone):
    """Measured ECG-MoE experts: one feature row per record from its consensus R-peaks.

    A row of zeros means nothing could be measured (too few beats, flat line, noise).
    """

    defaults = {"fs": 500}
    zero_row_is_failure = True

    @property
    def contract(self) -> InputContract:
        return InputContract(length=self.config["fs"] * 10)

    @abc.abstractmethod
    def record_features(self, signal: np.ndarray, peaks: np.ndarray, fs: int) -> np.ndarray:
        """The feature row of one (12, L) record in mV given its R-peak indices."""

    @abc.abstractmethod
    def feature_names(self) -> list[str]:
        """A name per feature (what ``explain`` reports contributions of)."""

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from stages.prepare.rpeaks import beat_sequence

        fs = self.config["fs"]
        signals = x.detach().cpu().double().numpy()
        rows = [self.record_features(s, beat_sequence(s, fs), fs) for s in signals]
        return {"features": torch.from_numpy(np.stack(rows)).to(x.device)}


BACKBONES: Registry[Backbone] = Registry("backbone", __name__, ValueError)
register = BACKBONES.register


def create_backbone(name: str, model: dict[str, Any] | None = None,
                    per_lead: bool = False) -> Backbone:
    return BACKBONES.get(name)(model, per_lead=per_lead)


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a .pth/.pt file, unwrapping common checkpoint containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights file {path}: {err}") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load every parameter or say which ones do not fit (missing, unexpected, shape)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"weights {source} do not fit the configured architecture (set "
                           f"backbones.<name>.model to the checkpoint's shape): {err}") from err
    return model


def check_fit(model: nn.Module, state: dict[str, torch.Tensor], origin: dict[str, str],
              source: str, label: str, theirs: dict[str, str] | None = None) -> None:
    """Refuse what does not fit, naming each tensor as the checkpoint spells it.

    ``state`` is keyed by the model's names, ``origin`` maps them back to the checkpoint's;
    ``theirs`` names the checkpoint's spelling of tensors it lacks (default: ours).
    """
    expected, theirs = model.state_dict(), theirs or {}
    problems = [f"unexpected {origin[k]}" for k in state if k not in expected]
    problems += [f"missing {theirs.get(k, k)}" for k in expected if k not in state]
    problems += [f"{origin[k]} has shape {tuple(t.shape)}, expected "
                 f"{tuple(expected[k].shape)}" for k, t in state.items()
                 if k in expected and t.shape != expected[k].shape]
    if problems:
        raise WeightsError(f"{label} checkpoint {source} does not fit the architecture it "
                           f"describes ({len(problems)} problem(s)): " + "; ".join(problems[:8]))


class StateDictBackbone(Backbone):
    """Backbones whose weights are one state-dict file (Time-Series-Library checkpoints).

    ``weights`` is either that ``.pth`` file (architecture from ``model``) or a folder
    written by ``save`` (``config.json`` + ``model.pth``, architecture from the file).
    """

    hub_example = "a checkpoint file (.pth) or a folder saved by this tool"

    @abc.abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """The module for an architecture config (weights left at their init)."""

    def build_random(self, seed: int) -> nn.Module:
        return self.build(self.config)

    def save(self, model: nn.Module, folder: Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.config, indent=2))
        torch.save(model.state_dict(), Path(folder) / "model.pth")

    def load(self, weights: str) -> nn.Module:
        path = Path(weights)
        if path.is_dir():
            if not (path / "model.pth").exists():
                raise WeightsError(f"{path} has no model.pth; pass the checkpoint file itself")
            self.config = {**self.defaults,
                           **json.loads((path / "config.json").read_text())}
            path = path / "model.pth"
        elif not path.is_file():
            raise self.missing(weights)
        return load_strict(self.build(self.config), load_state_dict(path), str(path))

"""``params.yaml`` as plain dataclasses: one section per stage, unknown keys refused.

DVC tracks these sections per stage, so a knob lives in exactly one section and the CLI reads
the same file: `dvc repro` and a hand-typed `pipeline prepare` do the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

TASKS = ("rr", "age", "sex", "ka", "ad")


class ParamsError(ValueError):
    """params.yaml is malformed; the message names the file and the key."""


@dataclass
class SynthParams:
    out: str = "data/raw/synthetic"
    n: int = 5000
    seed: int = 0


@dataclass
class DataParams:
    """One archive (``source``, ``root``, ``labels``, ``options``), or several under
    ``sources`` (a list of mappings with the same keys), combined into one cohort."""

    source: str = "synthetic"
    root: str = "data/raw/synthetic"
    labels: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PrepareParams:
    out: str = "data/prepared"
    fs: int = 500
    seconds: float = 10.0
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)
    n_classes: int = 14
    workers: int = 2
    chunk: int = 32
    max_nan_fraction: float = 0.05
    precordial: str = "impute"
    max_imputed_leads: int = 3


@dataclass
class BackboneParams:
    """One backbone's section under ``backbones:``; ``model`` is its architecture."""

    weights: str = "random"
    seed: int = 0
    batch_size: int = 32
    per_lead: bool = False
    dtype: str = "float32"
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16"):
            raise ParamsError(f"backbones.<name>.dtype must be float32 or float16, got "
                              f"{self.dtype!r}")


@dataclass
class ExtractParams:
    out: str = "cache"
    shard_rows: int = 256
    device: str = "auto"
    bf16: bool = False
    workers: int = 0


@dataclass
class FitParams:
    """Stage two: which experts, the heads and gate, training, and where results go."""

    backbones: list[str] = field(default_factory=lambda: [
        "moment", "timesnet", "dlinear", "rhythm", "morphology"])
    inputs: dict[str, str] = field(default_factory=lambda: {"moment": "per_lead"})
    expert_loss_weight: float = 1.0
    gate_inputs: list[str] = field(default_factory=lambda: ["gate", "rhythm"])
    seeds: int = 3
    hidden: int = 128
    adapter: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    gate_hidden: int = 64
    gate_mode: str = "per_expert"
    gate_prior: float = 0.0
    gate_lr: float = 1e-2
    gate_loss: str = "expected"
    combiner: str = "select"
    combiner_alpha: float = 0.05
    head_skip: bool = True
    oof_folds: int = 5
    loss: str = "l1"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 15
    max_memory_gb: float = 4.0
    device: str = "auto"
    bf16: bool = False
    head_store: bool | str = True  # true: <extract.out>/heads; a folder: there (sweeps)
    evaluation: str = "auto"
    cv_folds: int = 5
    cv_max_ecgs: int = 2000
    bootstrap: int = 2000
    metrics: str = "metrics"
    models: str = "models"
    predictions: str = "predictions"

    CHOICES = {"loss": ("mse", "l1"), "gate_loss": ("expected", "mixture"),
               "combiner": ("select", "gate"),
               "evaluation": ("auto", "split", "cv")}

    def __post_init__(self) -> None:
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ParamsError(f"fit.{key} must be one of {', '.join(allowed)}, got "
                                  f"{getattr(self, key)!r}")
        if not 0 < self.combiner_alpha < 1:
            raise ParamsError(f"fit.combiner_alpha must lie in (0, 1), got "
                              f"{self.combiner_alpha}")
        for key in ("oof_folds", "cv_folds"):  # one fold would hold out nothing
            if getattr(self, key) < 2:
                raise ParamsError(f"fit.{key} must be at least 2, got {getattr(self, key)}")


@dataclass
class Params:
    synth: SynthParams = field(default_factory=SynthParams)
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    backbones: dict[str, BackboneParams] = field(default_factory=dict)
    fit: FitParams = field(default_factory=FitParams)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))


T = TypeVar("T")


def _section(cls: type[T], raw: Any, where: str) -> T:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    values = dict(raw)
    if "split" in values:
        values["split"] = tuple(values["split"])
    return cls(**values)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read params.yaml; a missing file means all defaults (the synthetic demo)."""
    path = Path(path)
    if not path.exists():
        return Params()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    sections = {"synth": SynthParams, "data": DataParams, "prepare": PrepareParams,
                "extract": ExtractParams, "fit": FitParams}
    unknown = sorted(set(raw) - set(sections) - {"tasks", "backbones", "variants"})
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {', '.join(unknown)}")
    tasks = raw.get("tasks", list(TASKS))
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ParamsError(f"{path}: unknown task(s) {', '.join(bad)}; known: {', '.join(TASKS)}")
    backbones = {name: _section(BackboneParams, section, f"{path}:backbones.{name}")
                 for name, section in (raw.get("backbones") or {}).items()}
    variants = raw.get("variants") or {}
    for name, overrides in variants.items():
        _section(FitParams, overrides, f"{path}:variants.{name}")  # same keys as fit:
    return Params(**{name: _section(cls, raw.get(name), f"{path}:{name}")
                     for name, cls in sections.items()}, backbones=backbones,
                  variants={k: dict(v or {}) for k, v in variants.items()}, tasks=list(tasks))

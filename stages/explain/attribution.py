"""Integrated gradients of a bundle's task output with respect to the 12-lead input.

Each expert's output is a differentiable function of the raw (12, L) record in mV: the
backbone's input contract (lead choice, resampling as the exact linear map ``apply`` uses,
normalisation), the frozen backbone, the fit stage's feature standardisation and the LoRA
head. So is the ensemble's: every expert's head, then the saved combiner (the MoE gate on
its own lead subset, a fixed mixture, stacking or a linear probe). Attributions are
integrated gradients (captum, Gauss-Legendre) along the straight path from a baseline to the
record.

The baseline is the record blurred over ``BLUR_S`` (its baseline wander, without P, QRS or
T), not a flat line: a contract that z-scores each lead maps every scaled copy of the record
to the same input, so on the path from zero the output jumps right at the start and the
integral misses it. Steps are doubled from ``STEPS[0]`` until the completeness gap
(|sum of attributions - (F(record) - F(baseline))| over |F(record) - F(baseline)|) is
under ``MAX_GAP``.

The measured experts (rhythm, morphology) are not differentiable: R-peak detection and
fiducial search are discrete. They are explained by their feature contributions instead
(integrated gradients over their standardised features from the training mean, i.e. from
zero), and inside the ensemble their outputs, like a phase-aware gate's rhythm input, are
held at their values on the record.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import uniform_filter1d

from pipeline.feature_cache import feature_differences
from stages.extract.backbones import BeatBackbone, WeightsError, create_backbone
from stages.extract.contract import InputContract
from stages.extract.feature_code import code_digest
from stages.fit.features import GATE
from stages.fit.model import mix
from stages.fit.tasks import TASKS
from stages.predict.bundle import Bundle

BLUR_S = 0.6
STEPS = (32, 64, 128, 256, 512)
MAX_GAP = 0.05
ENSEMBLE = "ensemble"


@dataclass
class Attribution:
    """One explained output: per-sample attributions (12, L), or per-feature ones."""

    name: str
    method: str  # "integrated gradients" | "feature contributions"
    output: float  # F(record)
    baseline_output: float
    values: np.ndarray  # (12, L) or (n_features,)
    gap: float  # completeness gap, relative
    steps: int
    feature_names: list[str] | None = None
    held_fixed: list[str] | None = None


def blur_baseline(signal: np.ndarray, fs: int) -> np.ndarray:
    return uniform_filter1d(signal, size=max(1, round(BLUR_S * fs)), axis=-1, mode="nearest")


def _linear(state: dict, classification: bool, n_classes: int, x: torch.Tensor
            ) -> torch.Tensor:
    """``stages.fit.combine.Linear.predict`` in torch (saved ridge or logistic states)."""
    if not classification:
        coef = torch.tensor(state["coef"], dtype=x.dtype)
        return (x @ coef + state["intercept"][0])[:, None]
    seen = torch.tensor(state["classes"])
    out = x.new_zeros(len(x), n_classes)
    if "prior" in state:
        out[:, seen] = torch.tensor(state["prior"], dtype=x.dtype)
        return out
    logits = x @ torch.tensor(state["coef"], dtype=x.dtype).T + torch.tensor(
        state["intercept"], dtype=x.dtype)
    if len(state["classes"]) == 2:
        p1 = torch.sigmoid(logits[:, 0])
        p = torch.stack([1 - p1, p1], dim=1)
    else:
        p = logits.softmax(dim=1)
    return out.index_copy(1, seen, p)


class Explainer:
    """A task's ensemble from a bundle as functions of the raw record, for captum."""

    def __init__(self, bundle: Bundle, task: str, seed: int, weights: dict[str, str],
                 cache_dir, store_leads: tuple[str, ...], device: str = "cpu"):
        self.task, self.kind = task, TASKS[task].kind
        entry = bundle.task(task)
        self.experts, self.inputs = list(entry["experts"]), dict(entry["inputs"])
        self.gate_inputs = list(entry["gate_inputs"])
        self.store_leads, self.device = store_leads, torch.device(device)
        self.backbones = {}
        fingerprints = {}
        for name in bundle.stores(task):
            params = bundle.backbone_params(name, weights.get(name))
            backbone = create_backbone(name, params.model, params.per_lead)
            path = (backbone.prepare_weights(params.weights, params.seed, cache_dir)
                    if backbone.needs_weights else "none")
            backbone.setup(path, self.device)
            want = bundle.manifest["backbones"][name]["fingerprint"]
            have = {"weights_digest": backbone.weights_digest(), "model": backbone.config,
                    "contract": backbone.contract.describe(),
                    "code_digest": code_digest(backbone)}
            differences = feature_differences({k: want.get(k) for k in have}, have)
            if differences:
                raise WeightsError(f"backbone {name} does not compute the features the model "
                                   f"was trained on: {'; '.join(differences)}")
            self.backbones[name] = backbone
            fingerprints[name] = want
        self.model, self.saved = bundle.model(task, seed, fingerprints)
        self.model.to(self.device).requires_grad_(False)  # outputs need grad only via x
        self.scaling = {k: (m.to(self.device), s.to(self.device))
                        for k, (m, s) in self.saved["feature_scaling"].items()}
        self._fixed: dict[str, torch.Tensor] = {}

    def differentiable(self, name: str) -> bool:
        return not isinstance(self.backbones[name], BeatBackbone)

    def feature_names(self, name: str) -> list[str]:
        return self.backbones[name].feature_names()

    def fix(self, record: torch.Tensor) -> None:
        """Compute and hold the measured (non-differentiable) stores' features of a record."""
        self._fixed = {}
        for name, backbone in self.backbones.items():
            if not self.differentiable(name):
                x = backbone.contract.apply(record[None].cpu().numpy(), self.store_leads)
                self._fixed[name] = backbone.features(torch.from_numpy(x))["features"].to(
                    self.device).float()

    def _store(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Unstandardised features (B, width) of store ``name`` for records ``x``."""
        if not self.differentiable(name):
            return self._fixed[name].expand(len(x), -1)
        backbone = self.backbones[name]
        resampler = (None if x.shape[-1] == backbone.contract.length
                     else _resampler(backbone.contract, x.shape[-1]).to(self.device))
        inputs = backbone.saliency_contract().apply_torch(x, self.store_leads, resampler)
        array = self.inputs.get(name, "features") if name in self.experts else "features"
        return backbone.features(inputs)[array].flatten(1).float()

    def _scaled(self, key: str, values: torch.Tensor) -> torch.Tensor:
        mean, std = self.scaling[key]
        return (values - mean) / std

    def expert_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {b: self._scaled(b, self._store(b, x)) for b in self.experts}

    def head_outputs(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.stack([self.model.heads[b](features[b]) for b in self.experts], 1)
        return out.softmax(dim=-1) if self.model.classification else out

    def combine(self, x: torch.Tensor, features: dict[str, torch.Tensor],
                outputs: torch.Tensor) -> torch.Tensor:
        spec = self.saved["combiner"]
        if spec["name"] == "gate":
            gate_in = torch.cat([self._store(g, x) for g in self.gate_inputs], dim=1)
            return mix(self.model.gate(self._scaled(GATE, gate_in)), outputs,
                       self.model.classification)
        if "weights" in spec:
            return torch.einsum("e,nek->nk", torch.tensor(spec["weights"]).to(outputs),
                                outputs)
        if "constant" in spec:
            return outputs.new_full((len(outputs), 1), spec["constant"][0])
        k = outputs.shape[2]
        if "linear" in spec:
            return _linear(spec["linear"], self.model.classification, k,
                           features[spec["expert"]].double()).float()
        design = (outputs.clamp_min(1e-6).log() if self.model.classification else outputs)
        return _linear(spec["stacker"], self.model.classification, k,
                       design.reshape(len(outputs), -1).double()).float()

    def scalar(self, values: torch.Tensor, target: int | None) -> torch.Tensor:
        """A (B, k) head-space output -> the explained number per record."""
        if self.kind == "regression":
            scale = self.saved["target_scale"]
            return values[:, 0] * scale["std"] + scale["mean"]
        return values[:, 1] if self.kind == "binary" else values[:, target]

    def function(self, which: str, target: int | None):
        """F(x) for ``which`` (an expert or ENSEMBLE) on records x (B, 12, L)."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            features = self.expert_features(x)
            if which != ENSEMBLE:
                head = self.model.heads[which](features[which])
                head = head.softmax(dim=-1) if self.model.classification else head
                return self.scalar(head, target)
            return self.scalar(self.combine(x, features, self.head_outputs(features)), target)
        return forward

    def target(self, record: torch.Tensor) -> int | None:
        """The class explained for a multiclass task: the ensemble's own prediction."""
        if self.kind != "multiclass":
            return None
        with torch.no_grad():
            x = record[None]
            features = self.expert_features(x)
            return int(self.combine(x, features, self.head_outputs(features)).argmax(1)[0])


def integrated_gradients(function, x: torch.Tensor, baseline: torch.Tensor,
                         max_gap: float = MAX_GAP) -> tuple[np.ndarray, float, int, float, float]:
    """(attributions, relative gap, steps, F(x), F(baseline)); steps doubled until the
    completeness gap is under ``max_gap`` (or ``STEPS`` runs out)."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(function)
    with torch.no_grad():
        fx, fb = float(function(x[None])[0]), float(function(baseline[None])[0])
    if not function(x[None].clone().requires_grad_(True)).requires_grad:
        # no path from the input (a constant, or a combiner reading only measured experts)
        return np.zeros(tuple(x.shape), dtype=np.float32), 0.0, 0, fx, fb
    for steps in STEPS:
        values, delta = ig.attribute(x[None], baselines=baseline[None], n_steps=steps,
                                     internal_batch_size=16, return_convergence_delta=True)
        # an output the path does not move (a combiner reading only measured experts) has
        # nothing to attribute: its gap is measured against the output's own size
        gap = abs(float(delta[0])) / max(abs(fx - fb), 1e-6 * max(1.0, abs(fx)))
        if gap < max_gap:
            break
    return values[0].detach().cpu().numpy(), gap, steps, fx, fb


def explain_record(explainer: Explainer, record: np.ndarray, fs: int) -> list[Attribution]:
    """Every expert's and the ensemble's attribution for one (12, L) record in mV."""
    x = torch.from_numpy(np.ascontiguousarray(record, dtype=np.float32)).to(explainer.device)
    base = torch.from_numpy(blur_baseline(record, fs).astype(np.float32)).to(explainer.device)
    explainer.fix(x)
    target = explainer.target(x)
    held = [n for n in explainer.backbones if not explainer.differentiable(n)]
    out = []
    for name in [*explainer.experts, ENSEMBLE]:
        if name != ENSEMBLE and not explainer.differentiable(name):
            out.append(_feature_contributions(explainer, name, x, target))
            continue
        values, gap, steps, fx, fb = integrated_gradients(explainer.function(name, target),
                                                          x, base)
        out.append(Attribution(name, "integrated gradients", fx, fb, values, gap, steps,
                               held_fixed=held if name == ENSEMBLE else None))
    return out


def _feature_contributions(explainer: Explainer, name: str, x: torch.Tensor,
                           target: int | None) -> Attribution:
    """A measured expert: integrated gradients over its standardised features from zero."""
    features = explainer.expert_features(x[None])[name][0].detach()

    def function(f: torch.Tensor) -> torch.Tensor:
        head = explainer.model.heads[name](f)
        head = head.softmax(dim=-1) if explainer.model.classification else head
        return explainer.scalar(head, target)

    values, gap, steps, fx, fb = integrated_gradients(function, features,
                                                      torch.zeros_like(features))
    return Attribution(name, "feature contributions", fx, fb, values, gap, steps,
                       feature_names=explainer.feature_names(name))


@functools.lru_cache(maxsize=8)
def _resampler(contract: InputContract, n_in: int) -> torch.Tensor:
    """The contract's resampling matrix, shared by every task's explainer: resampling an
    identity of 5,000 samples takes half a second, and each explainer asked for it again
    per record (18 times in the demo's ``explain``)."""
    return torch.from_numpy(contract.resampler(n_in))

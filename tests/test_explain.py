"""Saliency: integrated gradients through each backbone, its contract and a head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.leads import STANDARD_LEADS
from pipeline.params import load_params
from pipeline.signal_store import SignalStore
from stages.explain.attribution import _linear, blur_baseline, integrated_gradients
from stages.extract.backbones import create_backbone
from stages.extract.contract import InputContract
from stages.fit.combine import Linear
from tests.conftest import cli_ok

FS = 500
# Time-MoE's sparse top-k routing makes its output jump where the route changes: integrated
# gradients cannot account for jumps, so its dense variant is what can be checked.
DIFFERENTIABLE = {"moment": {}, "timesnet": {}, "dlinear": {}, "ecgfm": {}, "tempo": {},
                  "timemoe": {"use_dense": True}, "gate": {}}


def _record(small_prepared, row: int = 0) -> np.ndarray:
    with SignalStore(small_prepared / "signals.h5") as store:
        return store.read(row, row + 1)[0].astype(np.float32)


def _through(backbone, head: torch.Tensor):
    """A scalar output of raw records: contract, backbone, a fixed linear read-out."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        inputs = backbone.saliency_contract().apply_torch(x, STANDARD_LEADS)
        features = backbone.features(inputs)["features"].flatten(1)
        return torch.tanh(features @ head)
    return forward


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_completeness_gap_is_under_5_percent_at_each_demo_config(name, small_prepared):
    section = load_params().backbones[name]
    backbone = create_backbone(name, {**section.model, **DIFFERENTIABLE[name]},
                               section.per_lead)
    torch.manual_seed(0)
    backbone.model = backbone.build_random(0).eval()
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    width = backbone.arrays()[0].shape[0]
    head = torch.randn(width) / width ** 0.5
    record = _record(small_prepared)
    x = torch.from_numpy(record)
    base = torch.from_numpy(blur_baseline(record, FS))
    values, gap, steps, fx, fb = integrated_gradients(_through(backbone, head), x, base)
    assert values.shape == (12, 5000) and abs(fx - fb) > 1e-4  # something to attribute
    assert gap < 0.05, f"{name}: completeness gap {gap:.3f} after {steps} steps"
    assert abs(values.sum() - (fx - fb)) <= 0.05 * abs(fx - fb)


@pytest.mark.parametrize("normalise", ["none", "zscore"])
def test_attribution_falls_on_the_segment_the_target_depends_on(normalise, small_prepared):
    """A head trained to read lead II's level in 4.0-4.5 s looks there, through the
    contract's resampling (and z-scoring), and nowhere in the other leads. Z-scored, the
    whole lead matters a little (its mean and scale enter every sample), so the segment
    holds most attribution per sample rather than most in total."""
    contract = InputContract(500, leads=("II",), normalise=normalise)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(3000, 12, 5000)).astype(np.float32)
    kernel = np.hanning(41) / np.hanning(41).sum()
    train = np.apply_along_axis(np.convolve, -1, noise, kernel, mode="same")
    inputs = contract.apply(train, STANDARD_LEADS)[:, 0]  # (N, 500): lead II at 50 Hz
    target = inputs[:, 200:225].mean(axis=1)  # 4.0-4.5 s
    design = np.c_[inputs, np.ones(len(inputs))]
    coef = np.linalg.solve(design.T @ design + 1e-3 * np.eye(design.shape[1]),
                           design.T @ target)
    assert np.corrcoef(design @ coef, target)[0, 1] > 0.99  # the head reads the segment
    weights = torch.tensor(coef[:-1], dtype=torch.float32)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return contract.apply_torch(x, STANDARD_LEADS)[:, 0] @ weights + float(coef[-1])

    record = _record(small_prepared, 3)
    values, gap, _, _, _ = integrated_gradients(forward, torch.from_numpy(record),
                                                torch.from_numpy(blur_baseline(record, FS)))
    assert gap < 0.05
    magnitude = np.abs(values)
    lead_ii = STANDARD_LEADS.index("II")
    assert magnitude[lead_ii].sum() == pytest.approx(magnitude.sum())  # only lead II
    segment = np.zeros(5000, dtype=bool)
    segment[1980:2270] = True  # 4.0-4.5 s, +-40 ms for the resampling filter
    inside = magnitude[lead_ii, segment]
    if normalise == "none":
        assert inside.sum() / magnitude.sum() > 0.9
    else:
        assert inside.mean() > 10 * magnitude[lead_ii, ~segment].mean()


def test_an_output_with_no_path_from_the_input_gets_zero_attribution():
    """A combiner reading only measured experts (or a constant) has nothing to attribute."""
    x = torch.randn(12, 100)
    values, gap, steps, fx, fb = integrated_gradients(lambda z: z.new_full((len(z),), 3.0), x,
                                                      torch.zeros_like(x))
    assert not values.any() and gap == 0.0 and steps == 0 and fx == fb == 3.0


@pytest.mark.parametrize("contract", [InputContract(512, normalise="zscore"), InputContract(336),
                                      InputContract(500, leads=("II",), normalise="zscore"),
                                      InputContract(5000, normalise="zscore")])
def test_the_differentiable_contract_is_the_cached_one(contract, small_prepared):
    """Including the saliency contract of a model that normalises inside (same features)."""
    record = np.stack([_record(small_prepared, i) for i in range(2)])
    expected = contract.apply(record, STANDARD_LEADS)
    got = contract.apply_torch(torch.from_numpy(record), STANDARD_LEADS).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_saliency_contract_leaves_moments_features_unchanged(small_prepared):
    section = load_params().backbones["moment"]
    backbone = create_backbone("moment", section.model, section.per_lead)
    backbone.model = backbone.build_random(0).eval()
    record = torch.from_numpy(np.stack([_record(small_prepared, i) for i in range(2)]))
    assert backbone.saliency_contract().normalise == "zscore"
    with torch.no_grad():
        plain = backbone.features(backbone.contract.apply_torch(record, STANDARD_LEADS))
        scored = backbone.features(backbone.saliency_contract().apply_torch(record,
                                                                            STANDARD_LEADS))
    torch.testing.assert_close(scored["features"], plain["features"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("classification", "n_classes"), [(False, 1), (True, 2), (True, 4)])
def test_saved_linear_combiners_compute_the_same_in_torch(classification, n_classes):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    y = (x[:, 0] * 3 + rng.normal(size=50) if not classification
         else rng.integers(0, n_classes - (n_classes > 2), size=50))  # one class unseen
    from stages.fit.train import Objective

    linear = Linear.fit(x, y, x, y, Objective(y, classification), n_classes, False)
    expected = linear.predict(x)
    got = _linear(linear.state, classification, n_classes, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_explain_writes_figures_arrays_and_gaps_for_the_largest_errors(trained_project):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(trained_project)
        output = cli_ok(["explain", "--model", "bundle", "--top", "1", "--task", "rr",
                         "--task", "ad", "--out", "explained"])
    assert "largest completeness gap" in output
    folder = trained_project / "explained"
    summary = json.loads((folder / "explain.json").read_text())
    assert set(summary) == {"rr", "ad"}
    for task, records in summary.items():
        (record, entries), = records.items()
        assert set(entries) == {"dlinear", "tempo", "rhythm", "morphology", "ensemble"}
        assert entries["rhythm"]["method"] == "feature contributions"
        assert entries["ensemble"]["held_fixed"] == ["rhythm", "morphology"]
        for entry in entries.values():
            assert entry["completeness_gap"] < 0.05
        arrays = np.load(folder / task / f"{record}.npz")
        assert arrays["dlinear"].shape == arrays["tempo"].shape == (12, 5000)
        assert arrays["ensemble"].shape == (12, 5000)
        assert arrays["morphology"].shape == (1015,)
        for name in entries:
            assert (folder / task / f"{record}_{name}.png").stat().st_size > 10_000

"""The rhythm expert on hand-made signals with known beat timing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.extract.backbones import create_backbone
from stages.extract.backbones.rhythm import FEATURES, rhythm_features

FS = 500


def _beats(times_s: np.ndarray, n: int = 5000) -> np.ndarray:
    """12 leads of narrow QRS-like spikes at the given times (mV)."""
    t = np.arange(n) / FS
    spikes = sum(np.exp(-((t - b) ** 2) / (2 * 0.010 ** 2)) - 0.2 * np.exp(
        -((t - b - 0.03) ** 2) / (2 * 0.012 ** 2)) for b in times_s)
    return np.tile(spikes, (12, 1)) * np.linspace(0.8, 1.4, 12)[:, None]


def _row(signal: np.ndarray) -> dict[str, float]:
    backbone = create_backbone("rhythm")
    backbone.setup("none", torch.device("cpu"))
    with torch.inference_mode():
        out = backbone.features(torch.from_numpy(signal[None]).float())["features"][0]
    return dict(zip(FEATURES, out.numpy().tolist(), strict=True))


def test_regular_rhythm_gives_its_rr_and_no_variability():
    row = _row(_beats(np.arange(0.3, 9.9, 0.8)))
    assert row["detected"] == 1 and row["n_beats"] in (11, 12)  # edge beat may be missed
    assert row["mean_rr"] == pytest.approx(800, abs=2)
    assert row["heart_rate"] == pytest.approx(75, abs=0.3)
    assert row["sdnn"] < 2 and row["rmssd"] < 3 and row["pnn50"] == 0 and row["ectopic"] == 0


def test_irregular_rhythm_separates_from_regular():
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.gamma(16, 0.75 / 16, 20)) + 0.2
    irregular = _row(_beats(times[times < 9.8]))
    regular = _row(_beats(np.arange(0.3, 9.9, 0.75)))
    assert irregular["nsd"] > 5 * max(regular["nsd"], 0.01)
    assert irregular["sdnn"] > 50 and irregular["pnn50"] > 0.3


def test_ectopic_beats_are_counted():
    times = list(np.arange(0.3, 9.9, 0.8))
    times[5] -= 0.3  # a premature beat followed by a compensatory pause
    row = _row(_beats(np.array(times)))
    assert row["ectopic"] == 1
    assert row["min_rr"] == pytest.approx(500, abs=3) and row["max_rr"] == pytest.approx(1100,
                                                                                          abs=3)


def test_manual_intervals():
    peaks = (np.array([0.0, 0.8, 1.6, 2.5, 3.3]) * FS).astype(int)
    row = dict(zip(FEATURES, rhythm_features(peaks, FS).tolist(), strict=True))
    assert row["mean_rr"] == pytest.approx(825) and row["max_rr"] == pytest.approx(900)
    assert row["rmssd"] == pytest.approx(np.sqrt((0 + 100**2 + 100**2) / 3), rel=1e-5)


@pytest.mark.parametrize("signal", [np.zeros((12, 5000)), _beats(np.array([1.0, 2.0])),
                                    np.random.default_rng(1).normal(0, 0.02, (12, 5000))])
def test_flat_few_beats_and_noise_give_defined_rows(signal):
    row = _row(signal)
    assert all(np.isfinite(v) for v in row.values())
    if row["detected"] == 0:
        assert all(v == 0 for v in row.values())
    else:
        assert 200 <= row["mean_rr"] <= 3000

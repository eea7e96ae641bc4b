"""Backbone implementations: published checkpoints, parameter layouts, batch independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.extract.backbones import create_backbone


def _numpy_dlinear(x: np.ndarray, state: dict, kernel: int) -> np.ndarray:
    """Independent DLinear forecast: edge-replicated moving average, two linear maps."""
    pad = (kernel - 1) // 2
    padded = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], 1)
    cumulative = np.cumsum(np.pad(padded, ((0, 0), (1, 0))), axis=1)
    trend = (cumulative[:, kernel:] - cumulative[:, :-kernel]) / kernel
    seasonal = x - trend
    w_s, b_s = state["Linear_Seasonal.weight"].numpy(), state["Linear_Seasonal.bias"].numpy()
    w_t, b_t = state["Linear_Trend.weight"].numpy(), state["Linear_Trend.bias"].numpy()
    return seasonal @ w_s.T + b_s + trend @ w_t.T + b_t


def test_published_enecg_dlinear_checkpoint(shared_dir):
    path = shared_dir / "fixtures" / "enecg" / "dlinear_checkpoint.pth"
    backbone = create_backbone("dlinear", {"seq_len": 500, "pred_len": 1, "kernel": 1001})
    backbone.setup(str(path), torch.device("cpu"))  # strict=True inside
    state = torch.load(path, map_location="cpu", weights_only=True)
    x = np.random.default_rng(0).normal(size=(3, 12, 500)).astype(np.float32)
    with torch.inference_mode():
        out = backbone.features(torch.from_numpy(x))
    expected = _numpy_dlinear(x.reshape(-1, 500).astype(np.float64), state, 1001)
    np.testing.assert_allclose(out["forecast"].numpy().reshape(-1, 1), expected, rtol=1e-4,
                               atol=1e-5)
    assert out["features"].shape == (3, 24)


def test_a_checkpoint_of_another_shape_is_refused(shared_dir):
    from stages.extract.backbones import WeightsError

    path = shared_dir / "fixtures" / "enecg" / "dlinear_checkpoint.pth"
    backbone = create_backbone("dlinear", {"seq_len": 500, "pred_len": 4})
    with pytest.raises(WeightsError, match="do not fit the configured architecture"):
        backbone.setup(str(path), torch.device("cpu"))


def test_timesnet_uses_the_time_series_library_layout():
    backbone = create_backbone("timesnet", {"e_layers": 2, "num_kernels": 2, "num_class": 5})
    keys = set(backbone.build(backbone.config).state_dict())
    assert {"enc_embedding.value_embedding.tokenConv.weight",
            "enc_embedding.position_embedding.pe",
            "enc_embedding.temporal_embedding.embed.weight",
            "model.0.conv.0.kernels.1.weight", "model.1.conv.2.kernels.0.bias",
            "layer_norm.weight", "projection.weight"} <= keys


def test_timesnet_features_do_not_depend_on_the_batch(tmp_path):
    backbone = create_backbone("timesnet", {"d_model": 8, "d_ff": 8, "e_layers": 1})
    backbone.setup(backbone.prepare_weights("random", 0, tmp_path), torch.device("cpu"))
    t = torch.arange(500) / 50.0
    beats = [torch.sin(2 * torch.pi * f * t) for f in (1.0, 1.7, 2.5)]
    x = torch.stack([b.expand(12, -1) + 0.1 * torch.randn(12, 500) for b in beats])
    with torch.inference_mode():
        together = backbone.features(x)["features"]
        alone = torch.cat([backbone.features(x[i: i + 1])["features"] for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_moment_contract_and_features(tmp_path):
    backbone = create_backbone("moment", {"d_model": 32, "num_layers": 1, "num_heads": 2,
                                          "d_ff": 64}, per_lead=True)
    assert backbone.contract.length == 512 and backbone.contract.normalise == "none"
    backbone.setup(backbone.prepare_weights("random", 0, tmp_path), torch.device("cpu"))
    x = torch.randn(2, 12, 512)
    with torch.inference_mode():
        out = backbone.features(x)
        shifted = backbone.features(x * 3 + 1)  # RevIN inside: scale and offset removed
    assert out["per_lead"].shape == (2, 12, 32)
    torch.testing.assert_close(out["features"], out["per_lead"].mean(1))
    torch.testing.assert_close(out["features"], shifted["features"], rtol=1e-3, atol=1e-3)

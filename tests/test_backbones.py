"""Backbone implementations: published checkpoints, parameter layouts, batch independence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.extract.backbones import WeightsError, create_backbone


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


# --- Time-MoE ---------------------------------------------------------------------------------

def _published_timemoe_keys(layers: int, experts: int, horizons: int) -> set[str]:
    """The key names of the Maple728/TimeMoE-* checkpoints (biases on q/k/v only)."""
    keys = {"model.embed_layer.emb_layer.weight", "model.embed_layer.gate_layer.weight",
            "model.norm.weight", *(f"lm_heads.{j}.out_layer.weight" for j in range(horizons))}
    for n in range(layers):
        p = f"model.layers.{n}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "self_attn.o_proj.weight", p + "ffn_layer.gate.weight",
                 p + "ffn_layer.shared_expert_gate.weight"}
        keys |= {p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}
        keys |= {p + f"ffn_layer.{e}.{m}_proj.weight"
                 for e in ["shared_expert", *(f"experts.{i}" for i in range(experts))]
                 for m in ("gate", "up", "down")}
    return keys


def test_timemoe_writes_and_reads_the_published_checkpoint_layout(tmp_path):
    backbone = create_backbone("timemoe", per_lead=True)
    assert backbone.contract.length == 512 and backbone.contract.normalise == "zscore"
    folder = Path(backbone.prepare_weights("random", 0, tmp_path))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "time_moe" and config["num_experts_per_tok"] == 2
    state = load_file(str(folder / "model.safetensors"))
    assert set(state) == _published_timemoe_keys(2, 4, 2)
    assert state["model.layers.0.ffn_layer.experts.0.up_proj.weight"].shape == (32, 32)
    assert state["model.layers.0.ffn_layer.shared_expert.up_proj.weight"].shape == (64, 32)
    assert state["lm_heads.1.out_layer.weight"].shape == (8, 32)
    # published weights are bfloat16, and the config carries keys the model does not use
    (folder / "model.safetensors").unlink()
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()},
              str(folder / "model.safetensors"))
    fresh = create_backbone("timemoe", per_lead=True)
    fresh.setup(str(folder), torch.device("cpu"))
    x = torch.randn(3, 12, 512)
    with torch.inference_mode():
        out = fresh.features(x)
        alone = fresh.features(x[:1])
    assert out["features"].shape == (3, 32) and out["per_lead"].shape == (3, 12, 32)
    torch.testing.assert_close(out["features"], out["per_lead"].mean(1))
    torch.testing.assert_close(out["features"][:1], alone["features"], rtol=1e-4, atol=1e-5)


def test_timemoe_is_causal_and_its_rotary_positions_are_relative(monkeypatch):
    from stages.extract.backbones.timemoe import Attention, TimeMoE, _rotate_half

    torch.manual_seed(0)
    backbone = create_backbone("timemoe")
    model = backbone.build_random(0).eval()
    assert isinstance(model, TimeMoE)
    seen: dict[str, torch.Tensor] = {}  # the angles the model's attention is given
    real = Attention.forward

    def recording(self, x, cos, sin):
        seen["cos"], seen["sin"] = cos, sin
        return real(self, x, cos, sin)

    monkeypatch.setattr(Attention, "forward", recording)
    x = torch.randn(2, 64)
    changed = x.clone()
    changed[:, 40:] = torch.randn(2, 24)
    with torch.inference_mode():
        a, b = model.model(x), model.model(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40])  # a step never sees later steps
    assert not torch.allclose(a[:, 40:], b[:, 40:])
    # rotary, as the model applies it: the score of a query at i and a key at j depends on
    # i - j only, and on it
    cos, sin = seen["cos"], seen["sin"]
    q, k = torch.randn(cos.shape[-1]), torch.randn(cos.shape[-1])

    def rotate(v, i):
        return v * cos[i] + _rotate_half(v) * sin[i]

    scores = {(i, j): float(rotate(q, i) @ rotate(k, j)) for i in range(20) for j in range(20)}
    by_offset = {}
    for offset in (0, 3, 7):
        same = [s for (i, j), s in scores.items() if i - j == offset]
        assert max(same) - min(same) < 1e-4
        by_offset[offset] = same[0]
    assert len({round(v, 3) for v in by_offset.values()}) == 3


def test_timemoe_routes_to_the_top_experts_without_renormalising():
    from stages.extract.backbones.timemoe import SparseMoE

    torch.manual_seed(1)
    config = {"hidden_size": 16, "intermediate_size": 32, "num_experts": 4,
              "num_experts_per_tok": 2}
    moe = SparseMoE(config).eval()
    tokens = torch.randn(50, 16)
    with torch.inference_mode():
        got = moe(tokens)
        p = moe.gate(tokens).softmax(-1)
        top = p.topk(2, dim=-1).indices
        every = torch.stack([expert(tokens) for expert in moe.experts], 1)  # (T, E, H)
        keep = torch.zeros_like(p).scatter(1, top, 1.0)
        want = (keep * p)[..., None].mul(every).sum(1)  # weights summing to < 1, as published
        want = want + torch.sigmoid(moe.shared_expert_gate(tokens)) * moe.shared_expert(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_timemoe_dense_variant_and_missing_files(tmp_path):
    backbone = create_backbone("timemoe", {"use_dense": True})
    folder = Path(backbone.prepare_weights("random", 0, tmp_path))
    reloaded = create_backbone("timemoe")
    reloaded.setup(str(folder), torch.device("cpu"))
    assert reloaded.config["use_dense"] and "model.layers.0.ffn_layer.up_proj.weight" in \
        reloaded.model.state_dict()
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="lacks model.safetensors"):
        create_backbone("timemoe").load(str(folder))
    with pytest.raises(WeightsError, match="Maple728/TimeMoE-50M"):
        create_backbone("timemoe").load(str(tmp_path / "nothing-here.bin"))


@pytest.mark.parametrize("size,hidden,total", [("50M", 384, 113_352_192),
                                                ("200M", 768, 453_196_800)])
def test_timemoe_at_the_published_shapes_has_the_published_parameter_count(size, hidden, total):
    """TimeMoE-50M/-200M are 113 M / 453 M parameters in all (50 M / 200 M active). With
    H = hidden, I = 4H, 12 layers, 8 experts of width I/2, horizons 1, 8, 32, 64:
    per layer 4H² + 3H (attention) + 2H (norms) + 8H (router) + 8·3·H·I/2 (experts)
    + 3·H·I (shared expert) + H (its gate); plus 2H (embedding), H (final norm) and
    105·H (forecast heads)."""
    from stages.extract.backbones.timemoe import TimeMoE

    config = {**create_backbone("timemoe").config, "hidden_size": hidden,
              "intermediate_size": 4 * hidden, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "num_experts": 8,
              "horizon_lengths": [1, 8, 32, 64]}
    h, i = hidden, 4 * hidden
    per_layer = 4 * h * h + 3 * h + 2 * h + 8 * h + 8 * 3 * h * i // 2 + 3 * h * i + h
    assert 12 * per_layer + 2 * h + h + 105 * h == total
    with torch.device("meta"):
        model = TimeMoE(config)
    assert sum(p.numel() for p in model.parameters()) == total


def test_a_timemoe_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    folder = Path(create_backbone("timemoe").prepare_weights("random", 0, tmp_path))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_experts": 3}))
    with pytest.raises(WeightsError, match="experts.3.gate_proj.weight"):
        create_backbone("timemoe").load(str(folder))

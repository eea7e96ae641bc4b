"""ECG-FM: both published checkpoint layouts load strictly, and the port computes the model.

The reference forward pass below is written from torch.nn.functional and the checkpoint's
own tensor names, following fairseq-signals' ECGTransformerModel, independently of the
transformers modules the port uses.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from stages.extract.backbones import WeightsError, create_backbone
from stages.extract.backbones.ecgfm import ECGFM, PUBLISHED, SEGMENT, WEIGHTS

TINY = {"conv_channels": 16, "embed_dim": 24, "layers": 2, "heads": 3, "ffn_dim": 40,
        "conv_pos": 8, "conv_pos_groups": 4}


def _saved(tmp_path, **model) -> tuple[dict, object]:
    """A random checkpoint written through the backbone's own save (official layout)."""
    backbone = create_backbone("ecgfm", {**TINY, **model})
    folder = backbone.prepare_weights("random", 0, tmp_path)
    return torch.load(f"{folder}/{WEIGHTS}", weights_only=True), backbone


def _write(tmp_path, checkpoint: dict, name: str = "ckpt.pt") -> str:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return str(path)


def _load(path: str, **model):
    backbone = create_backbone("ecgfm", model or None)
    backbone.setup(path, torch.device("cpu"))
    return backbone


def _reference(state: dict, c: dict, x: torch.Tensor) -> torch.Tensor:
    """fairseq-signals' forward from the pretrained layout's tensors: (B, 12, L) -> (B, T, D)."""
    h = x
    for i in range(c["conv_layers"]):
        h = F.conv1d(h, state[f"feature_extractor.conv_layers.{i}.0.weight"],
                     stride=c["conv_stride"])
        if i == 0:
            norm = "feature_extractor.conv_layers.0.2."
            h = F.group_norm(h, c["conv_channels"], state[norm + "weight"], state[norm + "bias"],
                             eps=1e-5)
        h = F.gelu(h)
    h = F.layer_norm(h.transpose(1, 2), (c["conv_channels"],), state["layer_norm.weight"],
                     state["layer_norm.bias"], 1e-5)
    h = F.linear(h, state["post_extract_proj.weight"], state["post_extract_proj.bias"])
    g = state["conv_pos.pos_conv.0.parametrizations.weight.original0"]
    v = state["conv_pos.pos_conv.0.parametrizations.weight.original1"]
    weight = g * v / v.norm(dim=(0, 1), keepdim=True)  # weight norm over the kernel axis
    pos = F.conv1d(h.transpose(1, 2), weight, state["conv_pos.pos_conv.0.bias"],
                   padding=c["conv_pos"] // 2, groups=c["conv_pos_groups"])[..., :-1]
    d = c["embed_dim"]
    h = F.layer_norm(h + F.gelu(pos).transpose(1, 2), (d,), state["encoder.layer_norm.weight"],
                     state["encoder.layer_norm.bias"], 1e-5)
    heads, head_dim = c["heads"], d // c["heads"]
    for n in range(c["layers"]):
        def w(name, n=n):
            prefix = f"encoder.layers.{n}.{name}."
            return state[prefix + "weight"], state[prefix + "bias"]

        b, t, _ = h.shape
        q, k, v_ = (F.linear(h, *w(f"self_attn.{p}_proj")).view(b, t, heads, head_dim)
                    .transpose(1, 2) for p in "qkv")
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        attn = (scores.softmax(-1) @ v_).transpose(1, 2).reshape(b, t, d)
        h = F.layer_norm(h + F.linear(attn, *w("self_attn.out_proj")), (d,),
                         *w("self_attn_layer_norm"), 1e-5)
        ffn = F.linear(F.gelu(F.linear(h, *w("fc1"))), *w("fc2"))
        h = F.layer_norm(h + ffn, (d,), *w("final_layer_norm"), 1e-5)
    return h


def test_the_port_computes_fairseq_signals_forward(tmp_path):
    checkpoint, backbone = _saved(tmp_path)
    loaded = _load(_write(tmp_path, checkpoint))
    x = torch.randn(2, 12, 2 * SEGMENT, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = loaded.features(x)["features"]
        segments = x.view(2, 12, 2, SEGMENT).permute(0, 2, 1, 3).reshape(4, 12, SEGMENT)
        expected = _reference(checkpoint["model"], backbone.config, segments)
    expected = expected.mean(dim=1).view(2, 2, -1).mean(dim=1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_pooled_features_never_depend_on_batch_mates(tmp_path):
    backbone = _load(_write(tmp_path, _saved(tmp_path)[0]))
    x = torch.randn(5, 12, 2 * SEGMENT, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = backbone.features(x)["features"]
        alone = torch.cat([backbone.features(x[i: i + 1])["features"] for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def _respelled(state: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in state.items()}


@pytest.mark.parametrize("spelling", ["parametrizations", "weight_g/weight_v",
                                      "fairseq encoder.pos_conv"])
def test_pretrained_layout_loads_strictly_in_every_published_spelling(tmp_path, spelling):
    checkpoint, _ = _saved(tmp_path)
    state = checkpoint["model"]
    reference = _load(_write(tmp_path, checkpoint, "a.pt"))
    if spelling == "weight_g/weight_v":
        state = _respelled(_respelled(state, "parametrizations.weight.original0", "weight_g"),
                           "parametrizations.weight.original1", "weight_v")
    elif spelling == "fairseq encoder.pos_conv":
        state = _respelled(state, "conv_pos.pos_conv.0.", "encoder.pos_conv.0.")
    d, c = TINY["embed_dim"], TINY["conv_channels"]
    state = {**state, "mask_emb": torch.zeros(d), "quantizer.vars": torch.zeros(1, 640, 8),
             "quantizer.weight_proj.weight": torch.zeros(640, c),
             "project_q.weight": torch.zeros(16, 16), "final_proj.weight": torch.zeros(16, d)}
    loaded = _load(_write(tmp_path, {**checkpoint, "model": state}, "b.pt"))
    assert loaded.weights_digest() == reference.weights_digest()
    assert not any(k.startswith("quantizer") for k in loaded.model.state_dict())


def test_finetuned_layout_loads_and_caches_label_logits(tmp_path):
    checkpoint, _ = _saved(tmp_path, num_labels=5)
    state = checkpoint["model"]
    assert "proj.weight" in state and all(k.startswith(("encoder.", "proj.")) for k in state)
    assert "encoder.encoder.layers.0.fc1.weight" in state
    loaded = _load(_write(tmp_path, checkpoint))
    assert [a.name for a in loaded.arrays()] == ["features", "logits"]
    x = torch.randn(2, 12, 2 * SEGMENT)
    with torch.inference_mode():
        out = loaded.features(x)
        hidden = loaded.model(x.view(2, 12, 2, SEGMENT).permute(0, 2, 1, 3)
                              .reshape(4, 12, SEGMENT))
    logits = loaded.model.proj(hidden.mean(dim=1)).view(2, 2, 5).mean(dim=1)
    torch.testing.assert_close(out["logits"], logits)
    assert out["features"].shape == (2, TINY["embed_dim"])


def test_renamed_or_reshaped_tensors_are_refused_by_their_checkpoint_names(tmp_path):
    checkpoint, _ = _saved(tmp_path)
    renamed = _respelled(checkpoint["model"], "encoder.layers.0.fc1.", "encoder.layers.0.fc_1.")
    with pytest.raises(WeightsError, match=r"unexpected encoder\.layers\.0\.fc_1\.weight.*"
                                           r"missing encoder\.layers\.0\.fc1\.weight"):
        _load(_write(tmp_path, {**checkpoint, "model": renamed}))
    reshaped = {**checkpoint["model"], "post_extract_proj.weight": torch.zeros(24, 17)}
    with pytest.raises(WeightsError, match=r"post_extract_proj\.weight has shape \(24, 17\), "
                                           r"expected \(24, 16\)"):
        _load(_write(tmp_path, {**checkpoint, "model": reshaped}))


def test_missing_or_foreign_weights_name_what_to_pass(tmp_path):
    with pytest.raises(WeightsError, match="mimic_iv_ecg_physionet_pretrained.pt.*wanglab/ecg-fm"):
        _load(str(tmp_path / "absent.pt"))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not a fairseq-signals checkpoint"):
        _load(str(tmp_path / "other.pt"))


def test_parameter_count_at_the_published_shape():
    """ECG-FM's README: 90.9 M parameters, 90,883,072 with the pretraining-only tensors.

    The encoder ported here has 90,373,248; the pretraining head adds the Gumbel quantizer's
    codebook (1 x 2*320 x 256/2) and its projection (256 -> 640, biased), project_q
    (256 -> 256) and final_proj (768 -> 256), both biased, and mask_emb (768).
    """
    with torch.device("meta"):
        model = ECGFM(PUBLISHED)
    encoder = sum(p.numel() for p in model.parameters())
    pretraining_only = 640 * 128 + (256 * 640 + 640) + (256 * 256 + 256) + (768 * 256 + 256) + 768
    assert encoder == 90_373_248
    assert encoder + pretraining_only == 90_883_072

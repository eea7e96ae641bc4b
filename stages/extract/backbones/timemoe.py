"""Time-MoE (Shi et al., ICLR 2025), the time-series MoE baseline of the ECG-MoE paper.

Written from the architecture of the authors' checkpoints (``Maple728/TimeMoE-50M`` and
``-200M``: ``config.json`` + ``model.safetensors``), so no remote code runs:

* every time step is a token, embedded point-wise as ``silu(gate_layer(x)) * emb_layer(x)``;
* decoder layers, pre-norm: ``h + attn(rms(h))`` then ``h + ffn(rms(h))``; causal attention
  with biased q/k/v projections and rotary positions (rotate-half, base ``rope_theta``);
* the feed-forward is sparse: softmax router over ``num_experts``, the top
  ``num_experts_per_tok`` weights kept *without* renormalising them, SwiGLU experts of width
  ``intermediate_size // num_experts_per_tok``, plus a shared SwiGLU expert of width
  ``intermediate_size`` scaled by ``sigmoid(shared_expert_gate(x))`` (``use_dense``: one
  SwiGLU of width ``intermediate_size`` instead);
* RMSNorm computed in float32; a final norm; forecast heads per horizon (loaded, unused).

Input contract: 512 samples per lead (a 10-s ECG at 51.2 Hz, as for MOMENT), each lead
z-scored over the record (the per-series scaling of the authors' examples), leads encoded
independently. Features: the last hidden state averaged over time per lead (``per_lead``,
(12, H)) and then over leads (``features``, (H,)).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import (
    Backbone,
    WeightsError,
    load_strict,
    looks_like_hub_id,
    register,
)
from stages.extract.contract import InputContract

SEQ_LEN = 512
CONFIG, WEIGHTS = "config.json", "model.safetensors"
ARCHITECTURE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts", "num_experts_per_tok", "input_size",
                "horizon_lengths", "rope_theta", "rms_norm_eps", "use_dense")


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, inner, bias=False)
        self.up_proj = nn.Linear(width, inner, bias=False)
        self.down_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        width, k = c["hidden_size"], c["num_experts_per_tok"]
        self.top_k = k
        self.gate = nn.Linear(width, c["num_experts"], bias=False)
        self.experts = nn.ModuleList(SwiGLU(width, c["intermediate_size"] // k)
                                     for _ in range(c["num_experts"]))
        self.shared_expert = SwiGLU(width, c["intermediate_size"])
        self.shared_expert_gate = nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(tokens).float().softmax(-1).topk(self.top_k, dim=-1)
        weights = weights.to(tokens.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if len(rows):
                out.index_add_(0, rows, weights[rows, slot, None] * expert(tokens[rows]))
        out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return out.view_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        width, self.heads = c["hidden_size"], c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = width // self.heads
        self.q_proj = nn.Linear(width, self.heads * self.head_dim)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.heads * self.head_dim, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape

        def split(t: torch.Tensor, heads: int) -> torch.Tensor:
            return t.view(b, length, heads, self.head_dim).transpose(1, 2)

        q, k = split(self.q_proj(x), self.heads), split(self.k_proj(x), self.kv_heads)
        v = split(self.v_proj(x), self.kv_heads)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.ffn_layer = (SwiGLU(c["hidden_size"], c["intermediate_size"]) if c["use_dense"]
                          else SparseMoE(c))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.ffn_layer(self.post_attention_layernorm(h))


class PointEmbedding(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.emb_layer = nn.Linear(c["input_size"], c["hidden_size"], bias=False)
        self.gate_layer = nn.Linear(c["input_size"], c["hidden_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_layer(x)) * self.emb_layer(x)


class Decoder(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.embed_layer = PointEmbedding(c)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.head_dim = c["hidden_size"] // c["num_attention_heads"]
        self.rope_theta = float(c["rope_theta"])

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        """(B, L) -> last hidden states (B, L, H)."""
        h = self.embed_layer(series[..., None])
        steps = torch.arange(series.shape[1], device=series.device, dtype=torch.float32)
        inv_freq = 1.0 / self.rope_theta ** (
            torch.arange(0, self.head_dim, 2, device=series.device).float() / self.head_dim)
        angles = torch.outer(steps, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)


class ForecastHead(nn.Module):
    def __init__(self, width: int, steps: int):
        super().__init__()
        self.out_layer = nn.Linear(width, steps, bias=False)


class TimeMoE(nn.Module):
    """Key names as in the published checkpoints (``model.*``, ``lm_heads.N.*``)."""

    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.model = Decoder(c)
        self.lm_heads = nn.ModuleList(ForecastHead(c["hidden_size"], c["input_size"] * h)
                                      for h in c["horizon_lengths"])


@register("timemoe")
class TimeMoEBackbone(Backbone):
    # the demo's shape; one head keeps the published head width (TimeMoE-50M: 384 / 12)
    defaults = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 1, "num_key_value_heads": 1, "num_experts": 4,
                "num_experts_per_tok": 2, "input_size": 1, "horizon_lengths": [1, 8],
                "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "use_dense": False}
    hub_example = "a hub id (e.g. Maple728/TimeMoE-50M) or a local folder"

    @property
    def contract(self) -> InputContract:
        return InputContract(length=SEQ_LEN, normalise="zscore")

    def arrays(self) -> list[ArraySpec]:
        d = self.config["hidden_size"]
        specs = [ArraySpec("features", (d,))]
        if self.per_lead:
            specs.append(ArraySpec("per_lead", (len(self.contract.leads), d)))
        return specs

    def build_random(self, seed: int) -> nn.Module:
        model = TimeMoE(self.config)
        for module in model.modules():  # the checkpoints' initialiser: N(0, 0.02)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        """The published layout: a Hugging Face ``config.json`` and ``model.safetensors``."""
        from safetensors.torch import save_file

        config = {"architectures": ["TimeMoeForPrediction"], "model_type": "time_moe",
                  "hidden_act": "silu", "max_position_embeddings": 4096,
                  "torch_dtype": "float32", **self.config}
        (Path(folder) / CONFIG).write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(Path(folder) / WEIGHTS))

    def load(self, weights: str) -> nn.Module:
        folder = Path(weights)
        if not folder.is_dir():
            if not looks_like_hub_id(weights):
                raise self.missing(weights)
            folder = self._download(weights)
        missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).exists()]
        if missing:
            raise WeightsError(f"{folder} lacks {', '.join(missing)}: pass a folder holding "
                               f"a Time-MoE checkpoint's {CONFIG} and {WEIGHTS}")
        saved = json.loads((folder / CONFIG).read_text())
        if saved.get("hidden_act", "silu") != "silu":
            raise WeightsError(f"{folder}: hidden_act {saved['hidden_act']!r}; Time-MoE "
                               "checkpoints use silu")
        self.config = {**self.defaults, **{k: saved[k] for k in ARCHITECTURE if k in saved}}
        if isinstance(self.config["horizon_lengths"], int):
            self.config["horizon_lengths"] = [self.config["horizon_lengths"]]
        from safetensors.torch import load_file

        try:
            state = load_file(str(folder / WEIGHTS))
        except Exception as err:
            raise WeightsError(f"cannot read {folder / WEIGHTS}: {err}") from err
        state = {k: v.float() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        return load_strict(TimeMoE(self.config), state, str(folder))

    @staticmethod
    def _download(hub_id: str) -> Path:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(hub_id, allow_patterns=[CONFIG, WEIGHTS]))
        except Exception as err:
            raise WeightsError(
                f"cannot fetch Time-MoE weights {hub_id!r}: {err}; without network, download "
                f"them once elsewhere (`hf download {hub_id} --local-dir DIR`) and pass DIR"
            ) from err

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, leads, length = x.shape
        hidden = self.model.model(x.reshape(b * leads, length))  # (B*12, L, H)
        per_lead = hidden.mean(dim=1).view(b, leads, -1)
        out = {"features": per_lead.mean(dim=1)}
        if self.per_lead:
            out["per_lead"] = per_lead
        return out

"""TEMPO (Cao et al., ICLR 2024), EnECG's prompt-based GPT-2 forecaster expert.

Loads ``TEMPO-80M_v1.pth`` (``huggingface.co/Melady/TEMPO``), a bare state dict, without the
TEMPO package. The forward pass is TEMPO's own inference path, per univariate series of
``seq_len`` samples (leads are encoded independently):

* reversible instance normalisation (``rev_in_trend``: mean and biased std over time, eps
  1e-5, a learned affine);
* the learned decomposition: trend = ``map_trend`` of a 25-sample moving average (edges
  replicated), season = ``map_season(x - trend)`` (an MLP), residual = the rest;
* each component cut into patches (length 16, stride 8, the end replicated 8 samples, so
  42 patches of 336 samples) and embedded by its own ``in_layer``;
* in front of each component, the GPT-2 embeddings of its text prompt ("Predict the future
  time step given the trend" / season / residual, 9 tokens each) through its
  ``prompt_layer``;
* one GPT-2 pass (transformers' ``GPT2Model`` with peft LoRA on ``c_attn``) over the three
  concatenated blocks; each block's patch tokens feed its ``out_layer`` to a ``pred_len``
  forecast; the three are summed and de-normalised.

The upstream ``predict`` helper normalises twice; ``forward`` (ported here) does not. EnECG
fed statsmodels STL components into a modified forward instead of the learned
decomposition; we keep the checkpoint's own decomposition, the one it was trained with.

The architecture is read from the tensors (width, GPT-2 blocks, LoRA rank, lengths), and the
attention heads and LoRA alpha from a ``config.json`` beside the file when there is one
(TEMPO's own, or ours), else GPT-2's 12 heads and TEMPO's alpha 16. Old peft spellings
(``c_attn.weight``, ``lora_A.weight``) load too; the prompt-pool and probabilistic-head
tensors some training runs save are ignored by name, anything else unknown is refused.

Input contract: ``seq_len`` samples per lead (336 for a 10-s ECG: 33.6 Hz), in mV (RevIN
normalises inside the model). Features: GPT-2's last hidden states averaged over the patch
tokens of the three components per lead (``per_lead``) and then over leads (``features``),
plus the de-normalised forecast per lead (``forecast``, what EnECG's heads read).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import (
    Backbone,
    WeightsError,
    check_fit,
    load_strict,
    looks_like_hub_id,
    register,
)
from stages.extract.contract import InputContract

WEIGHTS, CONFIG = "TEMPO-80M_v1.pth", "config.json"
GPT2_VOCAB, GPT2_POSITIONS, GPT2_HEADS = 50257, 1024, 12
MA_KERNEL = 25
COMPONENTS = ("trend", "season", "noise")
# GPT-2 BPE ids of "Predict the future time step given the {trend, season, residual}"
# (TEMPO's prompts, no BOS/EOS); tests/test_tempo.py checks them against GPT-2's vocabulary.
PROMPT_IDS = {
    "trend": (47, 17407, 262, 2003, 640, 2239, 1813, 262, 5182),
    "season": (47, 17407, 262, 2003, 640, 2239, 1813, 262, 1622),
    "noise": (47, 17407, 262, 2003, 640, 2239, 1813, 262, 29598),
}
PEFT_PREFIX = "gpt2_trend.base_model.model."
# Saved by some training runs, never read by TEMPO's forward (prompt pool off, mse loss).
UNUSED = ("prompt_key_dict.", "prompt_value_dict.", "summary_map.", "mu.", "sigma.", "nu.",
          "alpha.")
# Published shape: TEMPO's config.json (seq_len 336, pred_len 96, patch 16, stride 8,
# d_model 768, gpt_layers 6) and its code's LoRA (r 16, alpha 16) on GPT-2's 12 heads.
PUBLISHED = {"d_model": 768, "layers": 6, "heads": 12, "lora_r": 16, "lora_alpha": 16,
             "seq_len": 336, "patch": 16, "stride": 8, "pred_len": 96}


def patch_count(c: dict[str, Any]) -> int:
    return (c["seq_len"] - c["patch"]) // c["stride"] + 2  # + the replicated end's patch


class RevIN(nn.Module):
    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.affine_weight = nn.Parameter(torch.ones(1))
        self.affine_bias = nn.Parameter(torch.zeros(1))

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) -> mean and std over time, (B, 1) each."""
        mean = x.mean(dim=-1, keepdim=True)
        return mean, torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + self.eps)

    def normalise(self, x, mean, std):
        return (x - mean) / std * self.affine_weight + self.affine_bias

    def denormalise(self, y, mean, std):
        return (y - self.affine_bias) / (self.affine_weight + self.eps ** 2) * std + mean


class MultiFourier(nn.Module):
    """Saved by TEMPO, unused by its forward; kept so checkpoints load strictly."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(2, 1)), nn.Parameter(torch.randn(2, 1))


def _gpt2(c: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=GPT2_POSITIONS, n_embd=c["d_model"],
                        n_layer=c["layers"], n_head=c["heads"], activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "sdpa"
    lora = LoraConfig(r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0,
                      bias="lora_only", target_modules=["c_attn"], fan_in_fan_out=True)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(GPT2Model(config), lora)


class TEMPO(nn.Module):
    """TEMPO's modules under the names of its state dict; (N, L) -> (hidden, forecast)."""

    def __init__(self, c: dict[str, Any]):
        super().__init__()
        d, length, patches = c["d_model"], c["seq_len"], patch_count(c)
        self.patch, self.stride = c["patch"], c["stride"]
        self.gpt2_trend = _gpt2(c)
        self.map_trend = nn.Linear(length, length)
        self.map_season = nn.Sequential(nn.Linear(length, 4 * length), nn.ReLU(),
                                        nn.Linear(4 * length, length))
        self.map_resid = nn.Linear(length, length)
        self.mul_season = MultiFourier()
        for name in COMPONENTS:
            setattr(self, f"in_layer_{name}", nn.Linear(c["patch"], d))
            setattr(self, f"out_layer_{name}", nn.Linear(d * patches, c["pred_len"]))
            setattr(self, f"prompt_layer_{name}", nn.Linear(d, d))
            setattr(self, f"rev_in_{name}", RevIN())
        self.register_buffer("prompt_ids", torch.tensor([PROMPT_IDS[n] for n in COMPONENTS]),
                             persistent=False)

    def decompose(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        half = (MA_KERNEL - 1) // 2
        padded = torch.cat([x[:, :1].expand(-1, half), x, x[:, -1:].expand(-1, half)], dim=1)
        trend = self.map_trend(F.avg_pool1d(padded[:, None], MA_KERNEL, stride=1)[:, 0])
        season = self.map_season(x - trend)
        return trend, season, x - trend - season

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, seq_len) -> patch-token hidden states (N, 3, patches, d), forecast (N, pred_len)."""
        n = x.shape[0]
        mean, std = self.rev_in_trend.statistics(x)
        x = self.rev_in_trend.normalise(x, mean, std)
        prompts = self.gpt2_trend.get_input_embeddings()(self.prompt_ids)  # (3, 9, d)
        blocks = []
        for i, (name, part) in enumerate(zip(COMPONENTS, self.decompose(x), strict=True)):
            padded = torch.cat([part, part[:, -1:].expand(-1, self.stride)], dim=1)
            tokens = getattr(self, f"in_layer_{name}")(padded.unfold(1, self.patch, self.stride))
            prompt = getattr(self, f"prompt_layer_{name}")(prompts[i]).expand(n, -1, -1)
            blocks.append(torch.cat([prompt, tokens], dim=1))
        width = blocks[0].shape[1]
        hidden = self.gpt2_trend(inputs_embeds=torch.cat(blocks, dim=1)).last_hidden_state
        prompt_len = self.prompt_ids.shape[1]
        hidden = hidden.view(n, 3, width, -1)[:, :, prompt_len:]
        forecast = sum(getattr(self, f"out_layer_{name}")(hidden[:, i].reshape(n, -1))
                       for i, name in enumerate(COMPONENTS))
        return hidden, self.rev_in_trend.denormalise(forecast, mean, std)


def canonical(key: str) -> str:
    """Modern peft's spelling (``base_layer``, adapter ``default``) of a checkpoint key."""
    key = re.sub(r"\.c_attn\.(weight|bias)$", r".c_attn.base_layer.\1", key)
    return re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key)


def architecture(state: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    """The shape of a checkpoint, from its tensors and (heads, alpha, stride) its config."""
    def tensor(name: str) -> torch.Tensor:
        if name not in state:
            raise WeightsError(f"not a TEMPO checkpoint: it has no tensor {name!r}")
        return state[name]

    blocks = {int(m.group(1)) for k in state if (m := re.match(
        re.escape(PEFT_PREFIX) + r"h\.(\d+)\.", k))}
    lora = [k for k in state if ".lora_A." in k]
    if not lora:
        raise WeightsError("not a TEMPO checkpoint: it has no LoRA tensors (lora_A) on c_attn")
    return {"d_model": int(tensor(PEFT_PREFIX + "wte.weight").shape[1]),
            "layers": len(blocks), "heads": int(saved.get("n_head", GPT2_HEADS)),
            "lora_r": int(state[lora[0]].shape[0]),
            "lora_alpha": float(saved.get("lora_alpha", PUBLISHED["lora_alpha"])),
            "seq_len": int(tensor("map_trend.weight").shape[0]),
            "patch": int(tensor("in_layer_trend.weight").shape[1]),
            "stride": int(saved.get("stride", PUBLISHED["stride"])),
            "pred_len": int(tensor("out_layer_trend.weight").shape[0])}


@register("tempo")
class TEMPOBackbone(Backbone):
    defaults = {"d_model": 32, "layers": 2, "heads": 4, "lora_r": 4, "lora_alpha": 16,
                "seq_len": 336, "patch": 16, "stride": 8, "pred_len": 96}
    hub_example = ("TEMPO's checkpoint TEMPO-80M_v1.pth (huggingface.co/Melady/TEMPO), the "
                   "hub id Melady/TEMPO, or a folder holding it")

    @property
    def contract(self) -> InputContract:
        return InputContract(length=self.config["seq_len"])

    def arrays(self) -> list[ArraySpec]:
        leads, d = len(self.contract.leads), self.config["d_model"]
        specs = [ArraySpec("features", (d,)),
                 ArraySpec("forecast", (leads, self.config["pred_len"]))]
        if self.per_lead:
            specs.append(ArraySpec("per_lead", (leads, d)))
        return specs

    def build_random(self, seed: int) -> nn.Module:
        model = TEMPO(self.config)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; random weights exercise the path
                nn.init.normal_(parameter, std=0.02)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        """TEMPO's layout: a bare state dict ``.pth``, and a ``config.json`` like its own."""
        c = self.config
        config = {"seq_len": c["seq_len"], "pred_len": c["pred_len"], "patch_size": c["patch"],
                  "stride": c["stride"], "d_model": c["d_model"], "gpt_layers": c["layers"],
                  "n_head": c["heads"], "lora_alpha": c["lora_alpha"], "prompt": 1,
                  "pool": False, "use_token": 0}
        (Path(folder) / CONFIG).write_text(json.dumps(config, indent=2))
        torch.save(model.state_dict(), Path(folder) / WEIGHTS)

    def _files(self, weights: str) -> tuple[Path, dict[str, Any]]:
        path = Path(weights)
        if not path.exists() and looks_like_hub_id(weights):
            path = self._download(weights)
        if path.is_dir():
            found = [path / WEIGHTS] if (path / WEIGHTS).exists() else sorted(path.glob("*.pth"))
            if len(found) != 1:
                raise WeightsError(f"{path} holds {len(found)} .pth files and no {WEIGHTS}; "
                                   "pass the TEMPO checkpoint file itself")
            path = found[0]
        if not path.is_file():
            raise self.missing(weights)
        config = path.parent / CONFIG
        return path, json.loads(config.read_text()) if config.exists() else {}

    def load(self, weights: str) -> nn.Module:
        path, saved = self._files(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"cannot read TEMPO checkpoint {path}: {err}") from err
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise WeightsError(f"{path} is not a bare state dict: pass TEMPO's {WEIGHTS}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items()
                 if not k.startswith(UNUSED) and not re.search(r"\.attn\.(masked_)?bias$", k)}
        renamed = {canonical(k): v.float() for k, v in state.items()}
        origin = {canonical(k): k for k in state}
        self.config = architecture(renamed, saved)
        model = TEMPO(self.config)
        check_fit(model, renamed, origin, str(path), "TEMPO")
        return load_strict(model, renamed, str(path))

    @staticmethod
    def _download(hub_id: str) -> Path:
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(hub_id, CONFIG)
            return Path(hf_hub_download(hub_id, WEIGHTS))
        except Exception as err:
            raise WeightsError(
                f"cannot fetch TEMPO weights {hub_id!r}: {err}; without network, download "
                f"{WEIGHTS} and {CONFIG} once elsewhere (`hf download {hub_id} {WEIGHTS} "
                f"{CONFIG} --local-dir DIR`) and pass DIR") from err

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, leads, length = x.shape
        hidden, forecast = self.model(x.reshape(b * leads, length))
        per_lead = hidden.mean(dim=(1, 2)).view(b, leads, -1)
        out = {"features": per_lead.mean(dim=1), "forecast": forecast.view(b, leads, -1)}
        if self.per_lead:
            out["per_lead"] = per_lead
        return out

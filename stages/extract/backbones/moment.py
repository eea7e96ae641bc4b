"""MOMENT (Goswami et al., 2024) through the ``momentfm`` package.

Input contract from its authors: 512 samples per channel (a 10-s ECG becomes 51.2 Hz),
channels encoded independently, RevIN normalisation inside the model (so none here).
Features: the encoder's patch embeddings averaged over patches per lead (``per_lead``,
(12, d)) and then over leads (``features``, (d,)), d = 512/768/1024 for small/base/large.
Weights: a hub id (``AutonLab/MOMENT-1-large``) or a local folder with ``config.json`` and
``model.safetensors``; ``random`` builds a T5 encoder of the configured shape.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import Backbone, WeightsError, looks_like_hub_id, register
from stages.extract.contract import InputContract

SEQ_LEN = 512
PATCH_LEN = 8


def _pipeline_class():
    # momentfm warns about untrained heads on import/construction; the embedding task has none
    logging.getLogger("momentfm").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from momentfm import MOMENTPipeline
    return MOMENTPipeline


@register("moment")
class Moment(Backbone):
    defaults = {"d_model": 64, "num_layers": 2, "num_heads": 4, "d_ff": 128}
    hub_example = "a hub id (e.g. AutonLab/MOMENT-1-large) or a local folder"
    detached_normalisation = True  # momentfm's RevIN detaches its mean and std

    @property
    def contract(self) -> InputContract:
        return InputContract(length=SEQ_LEN)

    def arrays(self) -> list[ArraySpec]:
        d = self.model.config.d_model if self.model is not None else self.config["d_model"]
        specs = [ArraySpec("features", (d,))]
        if self.per_lead:
            specs.append(ArraySpec("per_lead", (len(self.contract.leads), d)))
        return specs

    def _moment_config(self) -> dict:
        c = self.config
        t5 = {"model_type": "t5", "d_model": c["d_model"], "num_layers": c["num_layers"],
              "num_heads": c["num_heads"], "d_ff": c["d_ff"],
              "d_kv": c["d_model"] // c["num_heads"],
              "feed_forward_proj": "gated-gelu", "vocab_size": 32, "dropout_rate": 0.1,
              "layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32,
              "relative_attention_max_distance": 128, "is_encoder_decoder": True}
        return {"task_name": "embedding", "seq_len": SEQ_LEN, "patch_len": PATCH_LEN,
                "patch_stride_len": PATCH_LEN, "d_model": None, "t5_config": t5,
                "transformer_backbone": "google/flan-t5-large",
                "transformer_type": "encoder_only", "revin_affine": False,
                "add_positional_embedding": True, "value_embedding_bias": False,
                "orth_gain": 1.41, "enable_gradient_checkpointing": False}

    def build_random(self, seed: int) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _pipeline_class()(config=self._moment_config(),
                                      model_kwargs={"task_name": "embedding"})
            model.init()
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(str(folder))

    def load(self, weights: str) -> nn.Module:
        if not (Path(weights).is_dir() or looks_like_hub_id(weights)):
            raise self.missing(weights)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = _pipeline_class().from_pretrained(
                    weights, model_kwargs={"task_name": "embedding"})
                model.init()
        except Exception as err:
            hint = ("" if Path(weights).is_dir() else
                    f"; without network, download it once elsewhere (`hf download {weights} "
                    f"--local-dir DIR`) and pass DIR")
            raise WeightsError(f"cannot load MOMENT weights {weights!r}: {err}{hint}") from err
        if model.seq_len != SEQ_LEN or model.patch_len != PATCH_LEN:
            raise WeightsError(f"{weights}: expected seq_len {SEQ_LEN} and patch_len "
                               f"{PATCH_LEN}, got {model.seq_len}/{model.patch_len}")
        return model

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = self.model.embed(x_enc=x, reduction="none").embeddings  # (B, C, P, d)
        per_lead = patches.mean(dim=2)
        out = {"features": per_lead.mean(dim=1)}
        if self.per_lead:
            out["per_lead"] = per_lead
        return out

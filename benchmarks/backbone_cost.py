"""Benchmark (not a test): what each frozen backbone costs per ECG, on this CPU.

For each backbone, at its demo shape (``params.yaml``) and at the shape its authors
published (random weights: cost does not depend on their values): parameters, GFLOP per
10-s ECG counted by ``torch.utils.flop_counter`` on one ECG through the backbone's own
``features`` (matrix products and convolutions; element-wise work is left out), and
ECG/s timed on ``--n`` ECGs in one batch with ``--threads`` torch threads. Prints a
Markdown table; compare ECG/s as ratios within one run (the machine is shared).

    python benchmarks/backbone_cost.py [--n 4] [--threads 1] [--backbones ecgfm tempo]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.params import load_params
from stages.extract.backbones import create_backbone
from stages.extract.backbones.ecgfm import PUBLISHED as ECGFM_PUBLISHED
from stages.extract.backbones.tempo import PUBLISHED as TEMPO_PUBLISHED

# (name of the published model, architecture); TimesNet has no published ECG checkpoint.
PUBLISHED = {
    "moment": ("MOMENT-1-large", {"d_model": 1024, "num_layers": 24, "num_heads": 16,
                                  "d_ff": 2816}),
    "dlinear": ("EnECG's DLinear", {"seq_len": 500, "pred_len": 1, "kernel": 1001}),
    "timemoe": ("TimeMoE-50M", {"hidden_size": 384, "intermediate_size": 1536,
                                "num_hidden_layers": 12, "num_attention_heads": 12,
                                "num_key_value_heads": 12, "num_experts": 8,
                                "horizon_lengths": [1, 8, 32, 64]}),
    "ecgfm": ("ECG-FM", ECGFM_PUBLISHED),
    "tempo": ("TEMPO-80M (config: 6 GPT-2 blocks)", TEMPO_PUBLISHED),
}


def cost(name: str, model: dict, n: int) -> tuple[int, float, float]:
    """(parameters, GFLOP per ECG, ECG/s) of one backbone shape with random weights."""
    backbone = create_backbone(name, model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone.model = backbone.build_random(0).eval()
    contract = backbone.contract
    x = torch.randn(n, len(contract.leads), contract.length)
    params = sum(p.numel() for p in backbone.model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.features(x[:1])
    with torch.inference_mode():
        backbone.features(x[:1])  # warm-up
        started = time.perf_counter()
        backbone.features(x)
        seconds = time.perf_counter() - started
    return params, counter.get_total_flops() / 1e9, n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="ECGs timed per shape")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbones", nargs="+",
                        default=["moment", "timesnet", "dlinear", "timemoe", "ecgfm", "tempo"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = load_params().backbones
    print(f"| backbone | shape | parameters | GFLOP per ECG | CPU ECG/s ({args.threads} "
          f"thread{'s' if args.threads > 1 else ''}, {args.n} ECGs) |")
    print("|---|---|---|---|---|")
    for name in args.backbones:
        shapes = [("demo (params.yaml)", sections[name].model if name in sections else {})]
        if name in PUBLISHED:
            shapes.append(PUBLISHED[name])
        for label, model in shapes:
            params, gflop, rate = cost(name, model, args.n)
            print(f"| {name} | {label} | {params:,} | {gflop:.3g} | {rate:.3g} |", flush=True)


if __name__ == "__main__":
    main()

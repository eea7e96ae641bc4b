"""Benchmark (not a test): extraction ECG/s and peak memory per backbone.

CPU: every backbone at its params.yaml (demo) configuration over a synthetic cohort, each
in a fresh subprocess so its peak resident memory is its own. GPU (only where torch sees
CUDA): MOMENT at the MOMENT-1-large shape (d_model 1024, 24 layers, random weights) in
fp32 and bf16, with GPU memory and achieved FLOP/s as a share of the GPU's bf16 peak.
Prints one line per figure; compare figures as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.params import BackboneParams, ExtractParams, load_params
from pipeline.signal_store import SignalStore
from stages.extract.backbones import create_backbone

LARGE = {"d_model": 1024, "num_layers": 24, "num_heads": 16, "d_ff": 2816}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, vendor sheets


def _measure(name: str, prepared: Path, cache: Path) -> dict:
    """Child process: one extract run; returns its throughput and peak RSS."""
    from stages.extract.run import extract

    section = load_params().backbones.get(name, BackboneParams())
    summary = extract(name, section, ExtractParams(out=str(cache), device="cpu"), prepared)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ecg_per_s": summary["ecg_per_s"], "peak_mb": round(peak_mb)}


def _moment_flops_per_ecg(cfg: dict, leads: int = 12, patches: int = 64) -> float:
    """Forward FLOPs of the T5 encoder over one ECG (matmuls only, 2 per multiply-add)."""
    d, ff, layers, tokens = cfg["d_model"], cfg["d_ff"], cfg["num_layers"], patches
    per_token = 4 * d * d + 3 * d * ff  # q,k,v,o projections + gated FFN (wi_0, wi_1, wo)
    attention = 2 * tokens * d  # scores and weighted sum, per token
    return 2.0 * leads * tokens * layers * (per_token + attention)


def _gpu_moment(n: int, batch: int) -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    backbone = create_backbone("moment", LARGE)
    with tempfile.TemporaryDirectory() as tmp:
        backbone.setup(backbone.prepare_weights("random", 0, Path(tmp)), device)
    x = torch.randn(batch, 12, 512, device=device)
    flops = _moment_flops_per_ecg(LARGE)
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.cuda.reset_peak_memory_stats(device)
        autocast = torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.inference_mode(), autocast:
            backbone.features(x)  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(max(1, n // batch)):
                backbone.features(x)
            torch.cuda.synchronize()
        rate = max(1, n // batch) * batch / (time.perf_counter() - started)
        memory = torch.cuda.max_memory_allocated(device) / 2**30
        share = f", {100 * rate * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16 peak" \
            if peak else ""
        print(f"extract moment-large {label} on {name}: {rate:.0f} ECG/s, "
              f"{memory:.1f} GiB GPU memory, {rate * flops / 1e12:.1f} TFLOP/s{share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="ECGs in the synthetic cohort")
    parser.add_argument("--backbones", nargs="+", default=["moment", "timesnet", "dlinear", "gate"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    from pipeline.params import PrepareParams
    from stages.prepare.run import prepare
    from stages.prepare.synthetic.cohort import write_cohort

    with tempfile.TemporaryDirectory() as tmp:
        root, prepared = Path(tmp) / "raw", Path(tmp) / "prepared"
        write_cohort(root, n=args.n, seed=0)
        prepare("synthetic", root, prepared, PrepareParams(workers=0))
        with SignalStore(prepared / "signals.h5") as store:
            assert len(store) == args.n
        for name in args.backbones:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, str(prepared), str(Path(tmp) / name)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            print(f"extract {name} (cpu, demo config): {result['ecg_per_s']:.0f} ECG/s, "
                  f"peak RSS {result['peak_mb']} MB")
    if torch.cuda.is_available():
        _gpu_moment(n=4096, batch=256)
    else:
        print("extract moment-large (GPU): skipped, torch sees no CUDA device here")
    print(f"hardware: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, Python {platform.python_version()}; "
          f"numpy {np.__version__}")


if __name__ == "__main__":
    main()

"""Benchmark (not a test): stage two at MIMIC-IV-ECG scale, streaming features from disk.

Fabricates feature caches of real widths in the production layout (Zarr v3 shards of 256
rows, written through ``CacheBuilder``) with a planted signal, then trains the ensemble
a whole ``fit-ensemble`` of one task on it (``fit_task``: cross-fitted heads in one
batched pass, the gate, every candidate a streamed source allows, bootstrap; 1 seed, split
evaluation, ``--epochs`` per bank) and prints rows, cache size on disk, the time to read the
cache once, the fit's wall time, peak RSS and the metric reached. Each configuration runs
in its own process, so its peak RSS is its own.

    python benchmarks/fit_scale.py --rows 200000 --dtype float32 float16

Widths: ECG-FM 768, MOMENT-1-large pooled 1024 (``--per-lead``: 12 x 1024), the morphology
expert 1015; the gate reads the lead-subset store (500) and the rhythm store (17).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.feature_cache import ArraySpec, CacheBuilder, write_shard
from pipeline.params import FitParams
from stages.fit.features import GATE, load_features
from stages.fit.run import fit_task

EXPERTS = {"ecgfm": 768, "moment": 1024, "morphology": 1015}
GATE_STORES = {GATE: 500, "rhythm": 17}
STRENGTH = {"ecgfm": 1.0, "moment": 0.6, "morphology": 0.3}  # planted signal per expert
SHARD_ROWS = 256
DIGEST = "fit-scale-bench"


def fabricate(root: Path, rows: int, dtype: str, per_lead: bool, seed: int = 0) -> np.ndarray:
    """Write cohort.parquet and cache/<name>.zarr; returns the target (age, years).

    Age = 60 + 12 z; each expert sees z in 8 of its columns with its own noise, so experts
    differ in quality and the ensemble has something to weigh.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(rows).astype(np.float32)
    subjects = rng.integers(0, rows // 2, rows)
    split = np.array(["train", "val", "test"])[np.digitize(subjects % 10, [8, 9])]
    age = 60 + 12 * z
    cohort = pd.DataFrame({"record_id": np.char.add("r", np.arange(rows).astype(str)),
                           "subject_id": subjects.astype(str), "split": split, "age": age})
    table = pa.Table.from_pandas(cohort, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"cohort_digest": DIGEST.encode()}),
                   root / "cohort.parquet")
    shapes = {name: ((12, d) if per_lead and name == "moment" else (d,))
              for name, d in {**EXPERTS, **GATE_STORES}.items()}
    for name, shape in shapes.items():
        builder = CacheBuilder(root / "cache" / f"{name}.zarr",
                               {"cohort_digest": DIGEST, "backbone": name}, rows,
                               [ArraySpec("features", shape)], SHARD_ROWS, dtype=dtype)
        strength = STRENGTH.get(name, 0.0)
        for shard in builder.pending_shards():
            start, stop = builder.shard_bounds(shard)
            block = rng.standard_normal((stop - start, *shape), dtype=np.float32)
            signal = z[start:stop, None] + rng.standard_normal((stop - start, 8)) * 0.5
            flat = block.reshape(stop - start, -1)
            flat[:, :8] += strength * signal
            write_shard(builder.store_path, builder.done_dir, shard, start, {"features": block})
        builder.publish()
    return age


def _du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def measure(rows: int, dtype: str, per_lead: bool, epochs: int, max_memory_gb: float,
            workdir: Path) -> dict:
    """One whole ``fit-ensemble --task age`` (1 seed, split evaluation, every candidate the
    streamed source allows) on a fabricated cache; at most ``epochs`` epochs per bank."""
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        started = time.perf_counter()
        age = fabricate(root, rows, dtype, per_lead)
        fabricate_s = time.perf_counter() - started
        split = pd.read_parquet(root / "cohort.parquet", columns=["split"])["split"].to_numpy()
        params = FitParams(backbones=list(EXPERTS), gate_inputs=list(GATE_STORES),
                           inputs={},  # each store's one array holds its (12, d) per lead
                           max_epochs=epochs, patience=epochs, seeds=1, evaluation="split",
                           max_memory_gb=max_memory_gb)
        source = load_features(root / "cache", list(EXPERTS), DIGEST, rows,
                               params.max_memory_gb, gate_inputs=params.gate_inputs)
        started = time.perf_counter()
        for start, stop in source.blocks():  # from the stores, also when held in memory
            for array in source.arrays.values():
                array[start:stop]
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        result = fit_task("age", params, root / "cohort.parquet", root / "cache")
        fit_s = time.perf_counter() - started
        train = age[split == "train"]
        test = age[split == "test"]
        return {"rows": rows, "dtype": dtype, "per_lead": per_lead,
                "streamed": not source.in_memory, "block_rows": source.block_rows,
                "cache_gb": round(_du(root / "cache"), 2), "fabricate_s": round(fabricate_s, 1),
                "read_once_s": round(read_s, 1), "fit_s": round(fit_s, 1),
                "test_mae_years": round(result.metrics["methods"]["ensemble"]["mae"]["mean"],
                                        3),
                "chosen": result.metrics["combiner"]["chosen"],
                "mean_predictor_mae": round(float(np.abs(test - train.mean()).mean()), 3),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                     / 2**20, 2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"],
                        choices=["float32", "float16"])
    parser.add_argument("--per-lead", action="store_true",
                        help="MOMENT as 12 x 1024 per-lead embeddings (flattened)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-memory-gb", type=float, default=FitParams.max_memory_gb,
                        help="fit.max_memory_gb: features above it are streamed from disk")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the caches are fabricated (needs the cache size free)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rows, dtype, per_lead = int(args.child[0]), args.child[1], args.child[2] == "1"
        print(json.dumps(measure(rows, dtype, per_lead, args.epochs, args.max_memory_gb,
                                 args.workdir)))
        return
    results = []
    for rows in args.rows:
        for dtype in args.dtype:
            need = rows * (sum(EXPERTS.values()) + sum(GATE_STORES.values())
                           + (11 * 1024 if args.per_lead else 0)) * np.dtype(dtype).itemsize
            free = shutil.disk_usage(args.workdir).free
            if need * 1.2 > free:
                print(f"skipped {rows} rows {dtype}: needs ~{need / 2**30:.1f} GB in "
                      f"{args.workdir}, {free / 2**30:.1f} GB free")
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(rows), dtype,
                 "1" if args.per_lead else "0", "--epochs", str(args.epochs),
                 "--max-memory-gb", str(args.max_memory_gb),
                 "--workdir", str(args.workdir)],
                check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(json.dumps(results[-1]), flush=True)
    print("\n| rows | dtype | held | cache GB | read once s | whole fit s | test MAE (y) | "
          "mean-predictor MAE | peak RSS GB |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['dtype']} | {'streamed' if r['streamed'] else 'in memory'}"
              f" | {r['cache_gb']} | {r['read_once_s']} | {r['fit_s']} | "
              f"{r['test_mae_years']} | {r['mean_predictor_mae']} | {r['peak_rss_gb']} |")


if __name__ == "__main__":
    main()

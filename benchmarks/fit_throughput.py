"""Benchmark (not a test): what the cache buys in stage two, and how stage two scales.

1. One training epoch of the ensemble (heads + gate) from cached features, against the
   same heads trained while the frozen backbones run on every batch (what the paper's
   code does), on the demo cohort (data/prepared + cache/ after `make demo`, else a
   500-ECG cohort built here). Printed as `cached-vs-inloop speedup: <ratio>`.
2. Stage two on 10,000 cached records x 3 backbones x 3 seeds (features of the demo
   shapes, random values with a planted signal; 20 epochs per model, no early stop):
   wall time and peak memory, in a subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.params import FitParams, PrepareParams, load_params
from pipeline.signal_store import SignalStore
from stages.extract.backbones import create_backbone
from stages.extract.run import extract
from stages.fit.features import GATE, load_features
from stages.fit.model import Ensemble, ModelConfig
from stages.fit.run import cohort_digest
from stages.fit.train import Objective

BACKBONES = ["moment", "timesnet", "dlinear"]


def _demo(tmp: Path) -> tuple[Path, Path]:
    params = load_params()
    prepared, cache = Path(params.prepare.out), Path(params.extract.out)
    if all((cache / f"{b}.zarr").exists() for b in [*BACKBONES, GATE]) and prepared.exists():
        return prepared, cache
    from stages.prepare.run import prepare
    from stages.prepare.synthetic.cohort import write_cohort

    write_cohort(tmp / "raw", n=500, seed=0)
    prepared, cache = tmp / "prepared", tmp / "cache"
    prepare("synthetic", tmp / "raw", prepared, PrepareParams(workers=0))
    for name in [*BACKBONES, GATE]:
        extract(name, params.backbones[name], params.extract.__class__(out=str(cache)), prepared)
    return prepared, cache


def _epoch_cached(model, source, objective, rows, batch) -> float:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    started = time.perf_counter()
    for chunk, data in source.batches(rows, batch, np.random.default_rng(0)):
        tensors = {n: torch.from_numpy(data[n]) for n in model.experts}
        mixture, outputs, _ = model(tensors, torch.from_numpy(data[GATE]))
        loss = objective.total(mixture, outputs, torch.from_numpy(objective.y[chunk]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return time.perf_counter() - started


def _epoch_inloop(model, prepared, cache, objective, rows, batch, inputs) -> float:
    """The same epoch, but features come from running every frozen backbone per batch."""
    params = load_params()
    experts = {}
    for name in [*BACKBONES, GATE]:
        section = params.backbones[name]
        backbone = create_backbone(name, section.model, section.per_lead)
        weights = (backbone.prepare_weights(section.weights, section.seed, cache)
                   if backbone.needs_weights else "none")
        backbone.setup(weights, torch.device("cpu"))
        experts[name] = backbone
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    order = np.random.default_rng(0).permutation(rows)
    started = time.perf_counter()
    with SignalStore(prepared / "signals.h5") as store:
        leads = store.contract.leads
        for s in range(0, len(order), batch):
            chunk = np.sort(order[s: s + batch])
            signals = np.stack([store.read(int(i), int(i) + 1)[0] for i in chunk])
            data = {}
            with torch.inference_mode():
                for name, backbone in experts.items():
                    x = torch.from_numpy(backbone.contract.apply(signals, leads))
                    data[name] = backbone.features(x)[inputs.get(name, "features")].flatten(1)
            tensors = {n: data[n].clone() for n in model.experts}
            mixture, outputs, _ = model(tensors, data[GATE].clone())
            loss = objective.total(mixture, outputs, torch.from_numpy(objective.y[chunk]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return time.perf_counter() - started


def cached_vs_inloop() -> None:
    fit = load_params().fit
    with tempfile.TemporaryDirectory() as tmp:
        prepared, cache = _demo(Path(tmp))
        cohort = pd.read_parquet(prepared / "cohort.parquet")
        source = load_features(cache, BACKBONES, cohort_digest(prepared / "cohort.parquet"),
                               len(cohort), inputs=fit.inputs)
        rows = np.flatnonzero((cohort["split"] == "train").to_numpy())
        source.fit_scaling(rows)
        age = cohort["age"].fillna(cohort["age"].mean()).to_numpy(np.float32)
        objective = Objective(((age - age.mean()) / age.std()).astype(np.float32), False,
                              expert_weight=1.0)
        dims = {b: d for b, d in source.dims().items() if b != GATE}
        torch.manual_seed(0)
        model = Ensemble(dims, source.dims()[GATE], 1, False, ModelConfig())
        cached = _epoch_cached(model, source, objective, rows, fit.batch_size)
        inloop = _epoch_inloop(model, prepared, cache, objective, rows, fit.batch_size,
                               fit.inputs)
    print(f"stage-two epoch on {len(rows)} training ECGs: cached {cached:.2f} s, "
          f"backbones in the loop {inloop:.2f} s")
    print(f"cached-vs-inloop speedup: {inloop / cached:.0f}")


def _scale_child(n: int, seeds: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.feature_cache import ArraySpec, CacheBuilder, write_shard
    from stages.fit.run import fit_task

    rng = np.random.default_rng(0)
    dims = {"moment": 12 * 64, "timesnet": 32, "dlinear": 384, GATE: 500}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        latent = rng.normal(size=n)
        subjects = rng.integers(0, n // 2, n)
        cohort = pd.DataFrame({"record_id": [f"r{i}" for i in range(n)],
                               "subject_id": subjects.astype(str),
                               "split": np.array(["train", "val", "test"])[
                                   np.digitize(subjects % 10, [7, 9])],
                               "age": 60 + 12 * latent})
        table = pa.Table.from_pandas(cohort, preserve_index=False)
        pq.write_table(table.replace_schema_metadata({b"cohort_digest": b"bench"}),
                       root / "cohort.parquet")
        for name, d in dims.items():
            values = rng.normal(size=(n, d)).astype(np.float32)
            values[:, 0] += latent
            builder = CacheBuilder(root / "cache" / f"{name}.zarr", {"cohort_digest": "bench"},
                                   n, [ArraySpec("features", (d,))], shard_rows=256)
            for shard in builder.pending_shards():
                start, stop = builder.shard_bounds(shard)
                write_shard(builder.store_path, builder.done_dir, shard, start,
                            {"features": values[start:stop]})
            builder.publish()
        params = FitParams(backbones=BACKBONES, seeds=seeds, max_epochs=20, patience=1000)
        started = time.perf_counter()
        metrics = fit_task("age", params, root / "cohort.parquet", root / "cache").metrics
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024, "mae": metrics["methods"]["ensemble"]["mae"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_scale_child(args.n, args.seeds)))
        return
    cached_vs_inloop()
    out = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n),
                          "--seeds", str(args.seeds)], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    models = args.seeds * (len(BACKBONES) + 1)
    print(f"stage two, {args.n} cached records x {len(BACKBONES)} backbones x {args.seeds} "
          f"seeds ({models} models, 20 epochs each, cpu): {result['seconds']:.1f} s wall, "
          f"peak RSS {result['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()

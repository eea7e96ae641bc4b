"""Benchmark (not a test): what the cache buys in stage two, and how stage two scales.

1. The default ensemble (``fit:`` in params.yaml: its experts, inputs and gate inputs) on
   the demo cohort (data/prepared + cache/ after `make demo`, else a 500-ECG cohort built
   here): one training epoch from cached features, against the same epoch with every
   frozen backbone run on each batch (what the paper's code does). The in-loop side is
   timed twice, with TimesNet choosing periods per ECG (ours: a cached feature must not
   depend on its batch) and from the batch-averaged spectrum as Time-Series-Library does
   (what the paper ran). The one-time extraction of the whole cohort is timed too, and
   the number of stage-two epochs after which caching has paid for it is printed.
2. One whole `fit-ensemble` (task age: cross-fitted heads, gate, every baseline) on
   10,000 cached records x 3 backbones x 3 seeds (features of the demo shapes, random
   values with a planted signal; the lead-II gate; otherwise the default ``fit:``, at most
   20 epochs per model, no early stop): wall time
   and peak memory, in a subprocess so its peak RSS is its own. For 200k-800k rows see
   benchmarks/fit_scale.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.params import ExtractParams, FitParams, PrepareParams, load_params
from pipeline.signal_store import SignalStore
from stages.extract.backbones import create_backbone
from stages.extract.backbones.timesnet import TimesBlock
from stages.extract.run import extract
from stages.fit.features import GATE, load_features
from stages.fit.model import Ensemble
from stages.fit.run import _model_config, cohort_digest
from stages.fit.train import Objective

BACKBONES = ["moment", "timesnet", "dlinear"]


def _stores(fit: FitParams) -> list[str]:
    return list(dict.fromkeys([*fit.backbones, *fit.gate_inputs]))


def _demo(tmp: Path, stores: list[str]) -> tuple[Path, Path]:
    params = load_params()
    prepared, cache = Path(params.prepare.out), Path(params.extract.out)
    if all((cache / f"{b}.zarr").exists() for b in stores) and prepared.exists():
        return prepared, cache
    from stages.prepare.run import prepare
    from stages.prepare.synthetic.cohort import write_cohort

    write_cohort(tmp / "raw", n=500, seed=0)
    prepared, cache = tmp / "prepared", tmp / "cache"
    prepare("synthetic", tmp / "raw", prepared, PrepareParams(workers=0))
    for name in stores:
        extract(name, params.backbones[name], ExtractParams(out=str(cache)), prepared)
    return prepared, cache


def _extraction_seconds(prepared: Path, stores: list[str]) -> float:
    """Stage one as `dvc repro` runs it (read, conform, run, write the Zarr store), every
    store the default fit reads, the whole cohort, into a scratch cache."""
    params = load_params()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        for name in stores:
            extract(name, params.backbones[name], ExtractParams(out=scratch), prepared)
        return time.perf_counter() - started


def _batch_periods(self: TimesBlock, x: torch.Tensor) -> torch.Tensor:
    """TimesBlock.forward with Time-Series-Library's period choice: the top-k frequencies
    of the spectrum averaged over the batch, one fold per rank for the whole batch."""
    t = x.shape[1]
    spectrum = torch.fft.rfft(x, dim=1).abs()
    mean = spectrum.mean(0).mean(-1)
    mean[0] = 0
    top = torch.topk(mean, self.k).indices
    weight = spectrum.mean(-1)[:, top]
    res = torch.stack([self._fold(x, int(t // max(int(f), 1))) for f in top], dim=-1)
    return (res * F.softmax(weight, dim=1)[:, None, None, :]).sum(-1) + x


@contextlib.contextmanager
def _timesnet_periods(style: str):
    if style == "per-ECG":
        yield
        return
    original = TimesBlock.forward
    TimesBlock.forward = _batch_periods
    try:
        yield
    finally:
        TimesBlock.forward = original


def _step(model, optimiser, objective, chunk, experts, gate) -> None:
    mixture, outputs, _ = model(experts, gate)
    loss = objective.total(mixture, outputs, torch.from_numpy(objective.y[chunk]))
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()


def _epoch_cached(model, source, objective, rows, batch) -> float:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    started = time.perf_counter()
    for chunk, data in source.batches(rows, batch, np.random.default_rng(0)):
        _step(model, optimiser, objective, chunk,
              {n: torch.from_numpy(data[n]) for n in model.experts},
              torch.from_numpy(data[GATE]))
    return time.perf_counter() - started


def _epoch_inloop(model, source, prepared, cache, objective, rows, batch, fit) -> float:
    """The same epoch, but features come from running every frozen backbone per batch."""
    params = load_params()
    backbones = {}
    for name in _stores(fit):
        section = params.backbones[name]
        backbone = create_backbone(name, section.model, section.per_lead)
        weights = (backbone.prepare_weights(section.weights, section.seed, cache)
                   if backbone.needs_weights else "none")
        backbone.setup(weights, torch.device("cpu"))
        backbones[name] = backbone
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    order = np.random.default_rng(0).permutation(rows)
    mean = {n: torch.from_numpy(m) for n, (m, _) in source.scaling.items()}
    std = {n: torch.from_numpy(s) for n, (_, s) in source.scaling.items()}
    started = time.perf_counter()
    with SignalStore(prepared / "signals.h5") as store:
        leads = store.contract.leads
        for s in range(0, len(order), batch):
            chunk = np.sort(order[s: s + batch])
            signals = np.stack([store.read(int(i), int(i) + 1)[0] for i in chunk])
            data = {}
            with torch.inference_mode():
                for name, backbone in backbones.items():
                    x = torch.from_numpy(backbone.contract.apply(signals, leads))
                    data[name] = backbone.features(x)[fit.inputs.get(name, "features")]
                    data[name] = data[name].flatten(1).float()
            data = {n: v.clone() for n, v in data.items()}  # usable by autograd
            gate = torch.cat([data[n] for n in fit.gate_inputs], dim=1)
            experts = {n: (data[n] - mean[n]) / std[n] for n in model.experts}
            gate = (gate - mean[GATE]) / std[GATE]
            _step(model, optimiser, objective, chunk, experts, gate)
    return time.perf_counter() - started


def cached_vs_inloop() -> None:
    fit = load_params().fit
    stores = _stores(fit)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, cache = _demo(Path(tmp), stores)
        cohort = pd.read_parquet(prepared / "cohort.parquet")
        source = load_features(cache, fit.backbones, cohort_digest(prepared / "cohort.parquet"),
                               len(cohort), inputs=fit.inputs, gate_inputs=fit.gate_inputs)
        rows = np.flatnonzero((cohort["split"] == "train").to_numpy())
        source.fit_scaling(rows)
        age = cohort["age"].fillna(cohort["age"].mean()).to_numpy(np.float32)
        objective = Objective(((age - age.mean()) / age.std()).astype(np.float32), False,
                              expert_weight=1.0)
        dims = {b: d for b, d in source.dims().items() if b != GATE}

        def fresh() -> Ensemble:
            torch.manual_seed(0)
            return Ensemble(dims, source.dims()[GATE], 1, False, _model_config(fit))

        cached = _epoch_cached(fresh(), source, objective, rows, fit.batch_size)
        inloop = {}
        for style in ("per-ECG", "batch"):
            with _timesnet_periods(style):
                inloop[style] = _epoch_inloop(fresh(), source, prepared, cache, objective,
                                              rows, fit.batch_size, fit)
        once = _extraction_seconds(prepared, stores)
    tsl = inloop["batch"]
    print(f"default ensemble ({', '.join(fit.backbones)}; gate reads "
          f"{', '.join(fit.gate_inputs)}), one stage-two epoch on {len(rows)} training "
          f"ECGs: cached {cached:.2f} s; backbones in the loop {tsl:.1f} s with TimesNet "
          f"periods from the batch spectrum (Time-Series-Library, as the paper ran it), "
          f"{inloop['per-ECG']:.1f} s with per-ECG periods (ours)")
    print(f"one-time extraction of all {len(cohort)} ECGs ({len(stores)} stores): {once:.1f} s")
    print(f"cached-vs-inloop speedup: {tsl / cached:.0f} (TimesNet: Time-Series-Library "
          f"periods; {inloop['per-ECG'] / cached:.0f} with per-ECG periods)")
    print(f"break-even epochs: {math.ceil(once / (tsl - cached))} (extraction of the whole "
          f"cohort vs training-split epochs in the loop, validation passes not counted: "
          f"an upper bound)")


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
        params = FitParams(backbones=BACKBONES, inputs={}, gate_inputs=[GATE], seeds=seeds,
                           max_epochs=20, patience=1000)  # else the defaults (L1 loss)
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
    print(f"fit-ensemble (age; cross-fitted heads, gate, every baseline), {args.n} cached "
          f"records x {len(BACKBONES)} backbones x {args.seeds} seeds, at most 20 epochs per "
          f"model, cpu: {result['seconds']:.1f} s wall, peak RSS {result['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()

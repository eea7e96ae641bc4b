"""The extract stage: run one frozen backbone once over the signal store into its cache.

Work is cut into shards of ``shard_rows`` cohort rows. Each shard is read, conformed to
the backbone's input contract (in a prefetch thread, overlapping the model), run in
batches under ``torch.inference_mode`` in eval mode, and written whole by one writer, then
marked done. Shards and batches are the same whatever runs them, so an interrupted and
resumed run, or one spread over dask workers, gives the same array as a single run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from distributed import as_completed
from tqdm import tqdm

from pipeline.dask_runtime import dask_client
from pipeline.device import resolve_device
from pipeline.feature_cache import (
    CacheBuilder,
    check_published,
    clear_leftovers,
    feature_differences,
    open_features,
    write_shard,
)
from pipeline.params import BackboneParams, ExtractParams
from pipeline.signal_store import SignalStore
from pipeline.staging import recover
from stages.extract.backbones import RANDOM, Backbone, WeightsError, create_backbone
from stages.extract.feature_code import code_digest


@dataclass(frozen=True)
class ExtractJob:
    """Everything a worker needs to compute shards; picklable, holds no model."""

    backbone: str
    model: dict
    per_lead: bool
    weights: str
    device: str
    bf16: bool
    batch_size: int
    signals: str
    store_path: str
    done_dir: str
    shard_rows: int
    n_rows: int
    key: str = field(default="")


_LOADED: dict[str, Backbone] = {}  # one backbone per worker process, loaded once


def _backbone_for(job: ExtractJob) -> Backbone:
    if job.key not in _LOADED:
        backbone = create_backbone(job.backbone, job.model, job.per_lead)
        backbone.setup(job.weights, torch.device(job.device))
        _LOADED.clear()
        _LOADED[job.key] = backbone
    return _LOADED[job.key]


def _inputs(job: ExtractJob, backbone: Backbone, shards: Iterable[int]
            ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (shard, start, conformed inputs), reading the next shard while one computes."""
    with SignalStore(Path(job.signals)) as store, ThreadPoolExecutor(1) as pool:
        leads = store.contract.leads

        def load(shard: int) -> tuple[int, int, np.ndarray]:
            start = shard * job.shard_rows
            stop = min(start + job.shard_rows, job.n_rows)
            return shard, start, backbone.contract.apply(store.read(start, stop), leads)

        pending = None
        for shard in shards:
            future = pool.submit(load, shard)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def run_shards(job: ExtractJob, shards: list[int],
               on_done: Callable[[int], None] | None = None) -> int:
    """Compute and write ``shards``; returns the number of rows written."""
    backbone = _backbone_for(job)
    device = torch.device(job.device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=job.bf16 and device.type == "cuda")
    rows = 0
    for shard, start, x in _inputs(job, backbone, shards):
        parts: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode(), autocast:
            for b in range(0, len(x), job.batch_size):
                batch = torch.from_numpy(x[b: b + job.batch_size]).to(device)
                for name, value in backbone.features(batch).items():
                    parts.setdefault(name, []).append(value.float().cpu().numpy())
        write_shard(Path(job.store_path), Path(job.done_dir), shard, start,
                    {name: np.concatenate(v) for name, v in parts.items()})
        rows += len(x)
        if on_done:
            on_done(len(x))
    return rows


def fingerprint(backbone: Backbone, params: BackboneParams, store: SignalStore) -> dict:
    """What the cached features depend on; any change makes a cache unusable."""
    random = backbone.needs_weights and params.weights == RANDOM
    return {
        "backbone": backbone.name,
        "revision": backbone.revision,
        "random_weights": random,
        "weights_seed": params.seed if random else None,
        "weights_digest": backbone.weights_digest(),
        "model": backbone.config,
        "per_lead": backbone.per_lead,
        "contract": backbone.contract.describe(),
        "cohort_digest": str(store.attrs.get("cohort_digest")),
        "n_rows": len(store),
        "dtype": params.dtype,
        "code_digest": code_digest(backbone),
    }


def extract(name: str, params: BackboneParams, settings: ExtractParams, prepared: Path,
            force: bool = False, scheduler: str | None = None,
            expected: dict | None = None) -> dict:
    """Build ``<settings.out>/<name>.zarr``; returns a summary of what was done.

    ``expected``: a fingerprint the features must match (a trained model's); the backbone
    is refused, before any ECG is computed, with every difference listed.
    """
    started = time.perf_counter()
    cache_dir = Path(settings.out)
    with SignalStore(Path(prepared) / "signals.h5") as store:
        backbone = create_backbone(name, params.model, params.per_lead)
        weights = (backbone.prepare_weights(params.weights, params.seed, cache_dir)
                   if backbone.needs_weights else "none")
        device = resolve_device(settings.device)
        backbone.setup(weights, device)
        fp = fingerprint(backbone, params, store)
        n_rows = len(store)
    differences = feature_differences(expected, fp) if expected is not None else []
    if differences:
        raise WeightsError(f"backbone {name} does not compute the features the model was "
                           f"trained on: {'; '.join(differences)}")
    final = cache_dir / f"{name}.zarr"
    origin = ("random" if fp["random_weights"] else
              "loaded" if backbone.needs_weights else "none")
    summary = {"backbone": name, "rows": n_rows, "weights": origin,
               "weights_digest": fp["weights_digest"], "device": str(device), "path": str(final)}
    recover(final)  # a store a killed publish had moved aside (file systems that can't swap)
    if not force and check_published(final, fp):
        clear_leftovers(final, fp)
        return {**summary, "status": "up to date", "computed_rows": 0, "seconds": 0.0}
    builder = CacheBuilder(final, fp, n_rows, backbone.arrays(), settings.shard_rows, force,
                           dtype=params.dtype)
    pending = builder.pending_shards()
    job = ExtractJob(
        backbone=name, model=backbone.config, per_lead=params.per_lead, weights=weights,
        device=str(device), bf16=settings.bf16, batch_size=params.batch_size,
        signals=str(Path(prepared) / "signals.h5"), store_path=str(builder.store_path),
        done_dir=str(builder.done_dir), shard_rows=settings.shard_rows, n_rows=n_rows,
        key=f"{name}:{fp['weights_digest']}:{device}",
    )
    _LOADED[job.key] = backbone  # the in-process path reuses the model loaded above
    todo = sum(builder.shard_bounds(s)[1] - builder.shard_bounds(s)[0] for s in pending)
    compute_started = time.perf_counter()
    with tqdm(total=todo, unit="ECG", desc=f"extract {name}", disable=None) as bar:
        if settings.workers > 0 or scheduler:
            _run_distributed(job, pending, settings.workers, scheduler, bar.update)
        else:
            run_shards(job, pending, bar.update)
    compute_s = time.perf_counter() - compute_started
    builder.publish()
    if backbone.zero_row_is_failure:
        features, _ = open_features(final)
        summary["failed_rows"] = int((~np.any(features[:] != 0, axis=1)).sum())
    return {**summary, "status": "resumed" if len(pending) < builder.n_shards else "built",
            "computed_rows": todo, "seconds": round(time.perf_counter() - started, 2),
            "ecg_per_s": round(todo / compute_s, 1) if compute_s > 0 else None}


def _run_distributed(job: ExtractJob, shards: list[int], workers: int,
                     scheduler: str | None, progress: Callable[[int], None]) -> None:
    """Spread contiguous shard ranges over dask workers; each loads the backbone once."""
    with dask_client(max(workers, 1), scheduler) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        per_task = max(1, -(-len(shards) // (4 * n_workers)))
        groups = [shards[i: i + per_task] for i in range(0, len(shards), per_task)]
        futures = [client.submit(run_shards, job, group, pure=False) for group in groups]
        for future in as_completed(futures):
            progress(future.result())

"""Cached features for stage two, read through dask with the shards as chunks.

Every store must come from the cohort being fitted (its fingerprint's cohort digest);
anything else is refused, since rows would no longer line up with labels. Features are
held in memory when they fit in ``max_memory_gb``; otherwise they are streamed one block
of shards at a time, and batches are shuffled within the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from pipeline.feature_cache import CacheError, open_features

GATE = "gate"


@dataclass
class FeatureSource:
    """Row-aligned features of the experts and the gate input."""

    arrays: dict[str, da.Array]
    fingerprints: dict[str, dict]
    in_memory: bool
    block_rows: int
    _loaded: dict[str, np.ndarray] | None = None
    scaling: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def n_rows(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def dims(self) -> dict[str, int]:
        return {name: int(a.shape[1]) for name, a in self.arrays.items()}

    def materialise(self) -> None:
        if self.in_memory and self._loaded is None:
            names = list(self.arrays)
            values = dask.compute(*[self.arrays[n] for n in names], scheduler="threads")
            self._loaded = dict(zip(names, values, strict=True))

    def fit_scaling(self, rows: np.ndarray) -> None:
        """Per-feature mean and std on ``rows`` (the training split), applied to every batch.

        Frozen-backbone features vary little across ECGs around large offsets; unscaled, the
        heads start nearly blind and early stopping ends training before they learn.
        """
        index = np.sort(rows)
        stats = dask.compute(*[(a[index].mean(axis=0), a[index].std(axis=0))
                               for a in self.arrays.values()], scheduler="threads")
        self.scaling = {name: (mean.astype(np.float32),
                               np.maximum(std, 1e-6).astype(np.float32))
                        for name, (mean, std) in zip(self.arrays, stats, strict=True)}

    def _scaled(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.scaling is None:
            return data
        return {name: (values - self.scaling[name][0]) / self.scaling[name][1]
                for name, values in data.items()}

    def _names(self, names: list[str] | None) -> list[str]:
        return list(self.arrays) if names is None else names

    def take(self, rows: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Rows in the order given (in-memory sources only), of ``names`` (default all)."""
        return self._scaled({name: self._loaded[name][rows] for name in self._names(names)})

    def blocks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.block_rows, self.n_rows))
                for s in range(0, self.n_rows, self.block_rows)]

    def load(self, start: int, stop: int, names: list[str] | None = None
             ) -> dict[str, np.ndarray]:
        names = self._names(names)
        if self._loaded is not None:
            return {name: self._loaded[name][start:stop] for name in names}
        values = dask.compute(*[self.arrays[n][start:stop] for n in names], scheduler="threads")
        return dict(zip(names, values, strict=True))

    def batches(self, rows: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                names: list[str] | None = None
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(row indices, features) batches over ``rows``; shuffled when ``rng`` is given.

        ``names`` limits a batch to the arrays its consumer reads (a head reads one expert's
        features): reading and standardising every array for every batch was most of the
        work of a small head's training step.
        """
        if self._loaded is not None:
            order = rng.permutation(rows) if rng is not None else np.sort(rows)
            for s in range(0, len(order), batch_size):
                chunk = order[s: s + batch_size]
                yield chunk, self.take(chunk, names)
            return
        blocks = self.blocks()
        if rng is not None:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        for start, stop in blocks:
            inside = rows[(rows >= start) & (rows < stop)]
            if len(inside) == 0:
                continue
            data = self.load(start, stop, names)
            order = rng.permutation(inside) if rng is not None else np.sort(inside)
            for s in range(0, len(order), batch_size):
                chunk = order[s: s + batch_size]
                yield chunk, self._scaled({name: values[chunk - start]
                                           for name, values in data.items()})


def load_features(cache_dir: Path, backbones: list[str], cohort_digest: str, n_rows: int,
                  max_memory_gb: float = 4.0, inputs: dict[str, str] | None = None,
                  gate_inputs: list[str] | None = None) -> FeatureSource:
    """Open the experts' and the gate's stores; refuse any made from another cohort.

    ``inputs`` picks the cached array an expert reads (``per_lead`` arrays are flattened);
    by default ``features``. ``gate_inputs`` are the stores the gate reads, side by side:
    the lead subset (``gate``) by default; adding ``rhythm`` makes the gate phase-aware.
    """
    gate_inputs = list(gate_inputs or [GATE])
    arrays, fingerprints = {}, {}
    for name in dict.fromkeys([*backbones, *gate_inputs]):
        array_name = (inputs or {}).get(name, "features")
        features, fingerprint = open_features(Path(cache_dir) / f"{name}.zarr", array_name)
        if fingerprint.get("cohort_digest") != cohort_digest or features.shape[0] != n_rows:
            raise CacheError(
                f"cache/{name}.zarr was extracted from another cohort (digest "
                f"{fingerprint.get('cohort_digest')}, {features.shape[0]} rows) than the one "
                f"being fitted ({cohort_digest}, {n_rows} rows); re-run `pipeline extract "
                f"--backbone {name}` (or `dvc repro`)"
            )
        chunks = (features.shards or features.chunks)[0]
        array = da.from_array(features, chunks=(chunks, *features.shape[1:]))
        arrays[name] = array.reshape(array.shape[0], -1)
        fingerprints[name] = fingerprint
    gate = da.concatenate([arrays[name] for name in gate_inputs], axis=1)
    for name in gate_inputs:
        if name not in backbones:
            arrays.pop(name)
    arrays[GATE] = gate
    size_gb = sum(a.nbytes for a in arrays.values()) / 2**30
    block = int(next(iter(arrays.values())).chunks[0][0])
    source = FeatureSource(arrays, fingerprints, in_memory=size_gb <= max_memory_gb,
                           block_rows=block)
    source.materialise()
    return source

"""Cached features for stage two, read from the Zarr stores a block of rows at a time.

Every store must come from the cohort being fitted (its fingerprint's cohort digest);
anything else is refused, since rows would no longer line up with labels. Features are
held in memory when they fit in ``max_memory_gb``; otherwise they are streamed a block of
whole shards at a time (about ``STREAM_BLOCK_MB``; blocks in random order, batches shuffled
within the block), and the validation rows, read after every epoch, are held in memory.
Blocks are read with zarr's own slicing, which decodes a block's shards concurrently:
through dask (one task per shard) the same read took 1.6-2x longer. Reading the next block
in a thread while one trains gained nothing on two cores (decoding and training compete for
them) and was left out. Measured with ``benchmarks/fit_scale.py`` (README, "Stage two at
MIMIC scale").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.feature_cache import CacheError, open_features

GATE = "gate"
STREAM_BLOCK_MB = 64  # per streamed block, all arrays together; whole shards only


class Columns:
    """Stores read side by side as one (rows, features) array: per-lead arrays flattened,
    several stores (a phase-aware gate's input) joined along the features."""

    def __init__(self, parts: list[zarr.Array]):
        self.parts = parts
        self.widths = [int(np.prod(p.shape[1:])) for p in parts]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.parts[0].shape[0]), sum(self.widths)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def shard_rows(self) -> int:
        return int((self.parts[0].shards or self.parts[0].chunks)[0])

    def __getitem__(self, rows: slice) -> np.ndarray:
        blocks = [np.asarray(p[rows]).reshape(-1, w) for p, w in zip(self.parts, self.widths,
                                                                      strict=True)]
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)


@dataclass
class FeatureSource:
    """Row-aligned features of the experts and the gate input."""

    arrays: dict[str, Columns | np.ndarray]
    fingerprints: dict[str, dict]
    in_memory: bool
    block_rows: int
    max_memory_gb: float = 4.0
    _loaded: dict[str, np.ndarray] | None = None
    _held: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
    scaling: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def n_rows(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def dims(self) -> dict[str, int]:
        return {name: int(a.shape[1]) for name, a in self.arrays.items()}

    def materialise(self) -> None:
        if self.in_memory and self._loaded is None:
            self._loaded = {name: a[0: self.n_rows] for name, a in self.arrays.items()}

    def fit_scaling(self, rows: np.ndarray) -> None:
        """Per-feature mean and std on ``rows`` (the training split), applied to every batch
        (``scaling_of``)."""
        self.scaling = self.scaling_of(rows)

    def scaling_of(self, rows: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-feature mean and std of every array on ``rows``.

        Frozen-backbone features vary little across ECGs around large offsets; unscaled, the
        heads start nearly blind and early stopping ends training before they learn. One
        pass over the blocks, moments merged in float64 (a float16 store's sums overflow).
        """
        moments: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        for start, stop, data in self._read_blocks(rows, None, None):
            inside = rows[(rows >= start) & (rows < stop)]
            for name, values in data.items():
                x = values[inside - start].astype(np.float64)
                n_b, mean_b = len(x), x.mean(axis=0)
                m2_b = ((x - mean_b) ** 2).sum(axis=0)
                if name not in moments:
                    moments[name] = (n_b, mean_b, m2_b)
                    continue
                n_a, mean_a, m2_a = moments[name]
                n, delta = n_a + n_b, mean_b - mean_a
                moments[name] = (n, mean_a + delta * n_b / n,
                                 m2_a + m2_b + delta ** 2 * n_a * n_b / n)
        return {name: (mean.astype(np.float32),
                       np.maximum(np.sqrt(m2 / n), 1e-6).astype(np.float32))
                for name, (n, mean, m2) in moments.items()}

    def hold(self, rows: np.ndarray) -> None:
        """Keep ``rows`` in memory while streaming the rest (within half of
        ``max_memory_gb``; one set at a time). Validation rows are read after every epoch:
        streamed, they cost a second read of the whole cache per epoch."""
        if self._loaded is not None:
            return
        rows = np.unique(rows)
        if self._held is not None and np.array_equal(self._held[0], rows):
            return
        self._held = None
        if len(rows) * _row_bytes(self.arrays) > self.max_memory_gb * 2**30 / 2:
            return
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        for start, stop, data in self._read_blocks(rows, None, None):
            inside = rows[(rows >= start) & (rows < stop)] - start
            for name, values in data.items():
                parts[name].append(values[inside])
        self._held = (rows, {name: np.concatenate(p) for name, p in parts.items()})

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
        return {name: self.arrays[name][start:stop] for name in names}

    def batches(self, rows: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                names: list[str] | None = None
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(row indices, features) batches over ``rows``; shuffled when ``rng`` is given.

        ``names`` limits a batch to the arrays its consumer reads (a head reads one expert's
        features): reading and standardising every array for every batch was most of the
        work of a small head's training step.
        """
        held = self._held
        if self._loaded is not None or (held is not None and np.isin(rows, held[0]).all()):
            order = rng.permutation(rows) if rng is not None else np.sort(rows)
            for s in range(0, len(order), batch_size):
                chunk = order[s: s + batch_size]
                if self._loaded is not None:
                    yield chunk, self.take(chunk, names)
                else:
                    at = np.searchsorted(held[0], chunk)
                    yield chunk, self._scaled({name: held[1][name][at]
                                               for name in self._names(names)})
            return
        for start, stop, data in self._read_blocks(rows, rng, names):
            inside = rows[(rows >= start) & (rows < stop)]
            order = rng.permutation(inside) if rng is not None else np.sort(inside)
            for s in range(0, len(order), batch_size):
                chunk = order[s: s + batch_size]
                yield chunk, self._scaled({name: values[chunk - start]
                                           for name, values in data.items()})

    def _read_blocks(self, rows: np.ndarray, rng: np.random.Generator | None,
                     names: list[str] | None
                     ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """The blocks holding any of ``rows``, in random order with ``rng``."""
        blocks = self.blocks()
        if rng is not None:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        for start, stop in blocks:
            if np.any((rows >= start) & (rows < stop)):
                yield start, stop, self.load(start, stop, names)


def _row_bytes(arrays: dict[str, Columns | np.ndarray]) -> float:
    """Bytes of one ECG's features across ``arrays``, as stored."""
    return sum(a.nbytes / max(a.shape[0], 1) for a in arrays.values())


def load_features(cache_dir: Path, backbones: list[str], cohort_digest: str, n_rows: int,
                  max_memory_gb: float = 4.0, inputs: dict[str, str] | None = None,
                  gate_inputs: list[str] | None = None) -> FeatureSource:
    """Open the experts' and the gate's stores; refuse any made from another cohort.

    ``inputs`` picks the cached array an expert reads (``per_lead`` arrays are flattened);
    by default ``features``. ``gate_inputs`` are the stores the gate reads, side by side:
    the lead subset (``gate``) by default; adding ``rhythm`` makes the gate phase-aware.
    """
    gate_inputs = list(gate_inputs or [GATE])
    stores, fingerprints = {}, {}
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
        stores[name] = features
        fingerprints[name] = fingerprint
    arrays: dict[str, Columns | np.ndarray] = {name: Columns([stores[name]]) for name in backbones}
    arrays[GATE] = Columns([stores[name] for name in gate_inputs])
    size_gb = sum(a.nbytes for a in arrays.values()) / 2**30
    shard = arrays[GATE].shard_rows
    block = shard * max(1, int(STREAM_BLOCK_MB * 2**20 // (shard * _row_bytes(arrays))))
    source = FeatureSource(arrays, fingerprints, in_memory=size_gb <= max_memory_gb,
                           block_rows=block, max_memory_gb=max_memory_gb)
    source.materialise()
    return source

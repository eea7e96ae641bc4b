"""Zarr v3 feature caches: one store per backbone, rows aligned with the cohort.

Life of a store, and why:

* ``cache/.<name>.partial/`` holds the store being built (``store.zarr``), its fingerprint
  (``fingerprint.json``) and one marker per finished shard (``done/``). Rows are
  pre-allocated from the cohort and written one **whole shard** at a time by exactly one
  writer: zarr cannot merge partial writes into a shard, so two writers of one shard lose
  data. A killed run leaves the partial folder; the next run with the same fingerprint
  resumes at the first unmarked shard.
* When every shard is marked, the store is put at ``cache/<name>.zarr`` in one step (an
  atomic swap with an older store there, see ``pipeline.staging``), with the fingerprint
  and ``complete: true`` in its attributes.
* A store or partial folder whose fingerprint differs from the request (other weights,
  other cohort, other input contract, other code) is never reused silently.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.staging import replace_dir

FINGERPRINT = "fingerprint"


class CacheError(RuntimeError):
    """A feature cache is missing, incomplete or made from something else than requested."""


@dataclass(frozen=True)
class ArraySpec:
    """One cached array: its trailing shape (rows are the cohort's)."""

    name: str
    shape: tuple[int, ...]


def fingerprint_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    keys = sorted(set(have) | set(want))
    return [f"{k}: cached {have.get(k)!r}, requested {want.get(k)!r}"
            for k in keys if have.get(k) != want.get(k)]


def _refusal(path: Path, diff: list[str]) -> CacheError:
    return CacheError(
        f"{path} was made from something else than requested:\n  " + "\n  ".join(diff)
        + "\nIt is not reused silently: pass --force to rebuild it, or restore the settings "
          "it was made with."
    )


def work_dir(final: Path) -> Path:
    """Where the store for ``final`` is built: ``cache/.<name>.partial``."""
    return Path(final).parent / f".{Path(final).name.removesuffix('.zarr')}.partial"


class CacheBuilder:
    """Builds (or resumes) the store for one backbone; ``publish`` makes it visible."""

    def __init__(self, final: Path, fingerprint: dict, n_rows: int, arrays: list[ArraySpec],
                 shard_rows: int, force: bool = False, dtype: str = "float32"):
        self.final = Path(final)
        self.dtype = dtype
        self.work = work_dir(self.final)
        self.store_path = self.work / "store.zarr"
        self.done_dir = self.work / "done"
        self.fingerprint = fingerprint
        self.n_rows, self.shard_rows = n_rows, shard_rows
        if force:
            shutil.rmtree(self.work, ignore_errors=True)
        self._open_or_create(arrays)

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def pending_shards(self) -> list[int]:
        return [s for s in range(self.n_shards) if not (self.done_dir / f"{s:06d}").exists()]

    def _open_or_create(self, arrays: list[ArraySpec]) -> None:
        marker = self.work / "fingerprint.json"
        if marker.exists():
            have = json.loads(marker.read_text())
            diff = fingerprint_diff(have, self.fingerprint)
            if diff:
                raise _refusal(self.work, diff)
            _drop_torn_writes(self.store_path)
            return
        shutil.rmtree(self.work, ignore_errors=True)
        self.done_dir.mkdir(parents=True)
        group = zarr.open_group(self.store_path, mode="w", zarr_format=3)
        for spec in arrays:
            group.create_array(  # one chunk per shard: 64-row inner chunks read 1.4x slower
                spec.name, shape=(self.n_rows, *spec.shape), dtype=self.dtype,
                chunks=(self.shard_rows, *spec.shape), shards=(self.shard_rows, *spec.shape),
                fill_value=np.nan,
            )
        marker.write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True))

    def publish(self) -> Path:
        pending = self.pending_shards()
        if pending:
            raise CacheError(f"{len(pending)} shard(s) of {self.final.name} are not written yet")
        group = zarr.open_group(self.store_path, mode="r+")
        group.attrs.update({FINGERPRINT: self.fingerprint, "complete": True,
                            "n_rows": self.n_rows, "shard_rows": self.shard_rows})
        replace_dir(self.store_path, self.final)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.final


def _drop_torn_writes(store: Path) -> None:
    """Delete the temporary files of chunk writes a killed run left in the store.

    zarr writes each chunk file under a temporary ``*.partial`` name and renames it into
    place, so a killed write leaves that file behind (its shard is unmarked and is written
    again); without this it would be published inside the store.
    """
    for torn in Path(store).rglob("*.partial"):
        torn.unlink()


def clear_leftovers(final: Path, fingerprint: Mapping[str, Any]) -> None:
    """Delete a partial folder that only holds what ``final`` already publishes.

    A run killed after publishing but before its clean-up leaves one behind (with the
    replaced store inside); a partial build of *other* settings is kept for its resume.
    """
    work = work_dir(final)
    marker = work / "fingerprint.json"
    if work.exists() and (not marker.exists()
                          or not fingerprint_diff(json.loads(marker.read_text()), fingerprint)):
        shutil.rmtree(work, ignore_errors=True)


def write_shard(store_path: Path, done_dir: Path, shard: int, start: int,
                arrays: Mapping[str, np.ndarray]) -> None:
    """Write one whole shard of every array, then mark it done (marker last: crash-safe)."""
    group = zarr.open_group(store_path, mode="r+")
    for name, block in arrays.items():
        _check_fits(group[name].dtype, block, f"{store_path}/{name}")
    for name, block in arrays.items():
        group[name][start: start + len(block)] = block
    (Path(done_dir) / f"{shard:06d}").touch()


def _check_fits(dtype: np.dtype, block: np.ndarray, where: str) -> None:
    """Refuse values a narrower storage type would turn into inf (float16 ends at 65504)."""
    if np.dtype(dtype).itemsize >= block.dtype.itemsize or not np.issubdtype(dtype, np.floating):
        return
    largest = float(np.nanmax(np.abs(block), initial=0.0))
    limit = float(np.finfo(dtype).max)
    if np.isfinite(largest) and largest > limit:
        raise CacheError(f"{where}: a feature value of {largest:.4g} does not fit {dtype} "
                         f"(largest {limit:g}); store this backbone as float32 "
                         f"(backbones.<name>.dtype: float32 in params.yaml)")


def published_fingerprint(path: Path) -> dict | None:
    """The fingerprint of a complete store at ``path``, or None when there is none."""
    if not (Path(path) / "zarr.json").exists():
        return None
    attrs = zarr.open_group(path, mode="r").attrs
    return dict(attrs[FINGERPRINT]) if attrs.get("complete") else None


def check_published(path: Path, want: Mapping[str, Any]) -> bool:
    """True if a complete store with this fingerprint exists; raise if a different one does."""
    have = published_fingerprint(path)
    if have is None:
        return False
    diff = fingerprint_diff(have, want)
    if diff:
        raise _refusal(Path(path), diff)
    return True


# What a feature row depends on besides its ECG: the same values, the same features.
FEATURE_KEYS = ("backbone", "revision", "random_weights", "weights_seed", "weights_digest",
                "model", "per_lead", "contract", "dtype", "code_digest")


def feature_differences(want: dict, have: dict) -> list[str]:
    """How features made under fingerprint ``have`` would differ from ``want``'s (whatever
    cohort either was computed on)."""
    return [f"{key}: {json.dumps(want.get(key), sort_keys=True)} expected, "
            f"{json.dumps(have.get(key), sort_keys=True)} here"
            for key in FEATURE_KEYS if want.get(key) != have.get(key)]


def open_features(path: Path, name: str = "features") -> tuple[zarr.Array, dict]:
    """A complete store's array and fingerprint, or a CacheError saying what to run."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise CacheError(f"no feature cache at {path}; run `pipeline extract --backbone "
                         f"{path.name.removesuffix('.zarr')}` first")
    group = zarr.open_group(path, mode="r")
    if not group.attrs.get("complete"):
        raise CacheError(f"feature cache {path} is incomplete; re-run its extract")
    if name not in group:
        raise CacheError(f"feature cache {path} has no array {name!r} "
                         f"(has {', '.join(group.array_keys())})")
    return group[name], dict(group.attrs[FINGERPRINT])

"""The consolidated signal store: one HDF5 file, one (N, 12, L) float array, row i = cohort row i.

Every later stage reads ECGs from here instead of from millions of small WFDB files, so it
is chunked one record per chunk (random access by row is one read) and carries the
contract it was written with (rate, length, lead order, units) in its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.leads import STANDARD_LEADS

SIGNALS = "signals"
RECORD_IDS = "record_id"


class SignalStoreError(RuntimeError):
    """The signal store is missing, unreadable or does not match what the caller expects."""


@dataclass(frozen=True)
class SignalContract:
    """What every row of the store is: rate, length and lead order, in millivolts."""

    fs: int
    n_samples: int
    leads: tuple[str, ...] = STANDARD_LEADS

    @property
    def seconds(self) -> float:
        return self.n_samples / self.fs


class SignalStoreWriter:
    """Append records in cohort order; the file is only valid once ``close`` wrote its attrs."""

    def __init__(self, path: Path, contract: SignalContract, dtype: str = "float32"):
        self.contract = contract
        self._file = h5py.File(path, "w")
        shape = (0, len(contract.leads), contract.n_samples)
        self._signals = self._file.create_dataset(
            SIGNALS, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype,
            chunks=(1, *shape[1:]),
        )
        self._ids = self._file.create_dataset(
            RECORD_IDS, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(4096,)
        )

    def append(self, record_ids: list[str], signals: np.ndarray) -> None:
        if not record_ids:
            return
        start = self._signals.shape[0]
        stop = start + len(record_ids)
        self._signals.resize(stop, axis=0)
        self._signals[start:stop] = signals
        self._ids.resize(stop, axis=0)
        self._ids[start:stop] = record_ids

    @property
    def n_written(self) -> int:
        return int(self._signals.shape[0])

    def close(self, **attrs: str | int | float) -> None:
        meta = self._file.attrs
        meta["fs"] = self.contract.fs
        meta["n_samples"] = self.contract.n_samples
        meta["leads"] = list(self.contract.leads)
        meta["units"] = "mV"
        for key, value in attrs.items():
            meta[key] = value
        meta["complete"] = True
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class SignalStore:
    """Read access to a finished store, validated on open."""

    def __init__(self, path: Path):
        path = Path(path)
        if not path.exists():
            raise SignalStoreError(
                f"signal store {path} does not exist; run `pipeline prepare` (or `dvc repro "
                f"prepare`) first"
            )
        try:
            self._file = h5py.File(path, "r")
        except OSError as err:
            raise SignalStoreError(
                f"signal store {path} is not a readable HDF5 file ({err}); delete it and re-run "
                f"`pipeline prepare`"
            ) from err
        meta = self._file.attrs
        if not meta.get("complete", False) or SIGNALS not in self._file:
            self._file.close()
            raise SignalStoreError(
                f"signal store {path} is incomplete (an interrupted or foreign write); delete it "
                f"and re-run `pipeline prepare`"
            )
        self.path = path
        self.contract = SignalContract(
            fs=int(meta["fs"]), n_samples=int(meta["n_samples"]),
            leads=tuple(str(x) for x in meta["leads"]),
        )
        self.attrs = {k: meta[k] for k in meta}
        self._signals = self._file[SIGNALS]

    def __len__(self) -> int:
        return int(self._signals.shape[0])

    def __enter__(self) -> SignalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def record_ids(self) -> list[str]:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in self._file[RECORD_IDS][:]]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (n, 12, L) float32 in mV."""
        return np.asarray(self._signals[start:stop], dtype=np.float32)

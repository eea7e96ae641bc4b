"""Reading one raw record into memory, with every failure turned into a named reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb

# Bytes per sample of the WFDB storage formats we can size-check before reading.
_BYTES_PER_SAMPLE = {"8": 1.0, "16": 2.0, "61": 2.0, "80": 1.0, "160": 2.0, "212": 1.5,
                     "24": 3.0, "32": 4.0, "310": 4 / 3, "311": 4 / 3}
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "μv": 1e-3, "µv": 1e-3, "v": 1e3}


class RecordError(Exception):
    """A record that cannot be used; the message is the reason shown to the user."""


@dataclass
class RawRecord:
    """A record as stored: (n_samples, n_channels) in mV, its rate and its channel names."""

    signal: np.ndarray
    fs: float
    lead_names: list[str]


def read_wfdb(stem: Path) -> RawRecord:
    """Read a WFDB record (``stem`` without extension), converting to millivolts."""
    stem = Path(stem)
    header_path = stem.with_suffix(".hea")
    if not header_path.exists():
        raise RecordError(f"missing header file: {header_path.name}")
    try:
        header = wfdb.rdheader(str(stem))
    except Exception as err:  # wfdb raises many types for malformed text
        raise RecordError(f"unreadable header: {err}") from err
    if not header.n_sig or not header.sig_len:
        raise RecordError("unreadable header: it declares no signals or zero length")
    _check_data_files(stem.parent, header)
    try:
        record = wfdb.rdrecord(str(stem))
    except Exception as err:
        raise RecordError(f"unreadable signal data: {err}") from err
    signal = record.p_signal
    if signal is None or signal.shape[0] != header.sig_len:
        got = 0 if signal is None else signal.shape[0]
        raise RecordError(f"truncated signal: {got} of {header.sig_len} samples")
    scale = np.ones(signal.shape[1])
    for j, unit in enumerate(record.units or ["mV"] * signal.shape[1]):
        factor = _UNIT_TO_MV.get((unit or "mV").strip().lower())
        if factor is None:
            raise RecordError(f"unknown signal unit: {unit!r} on channel {record.sig_name[j]}")
        scale[j] = factor
    return RawRecord(signal=signal * scale, fs=float(record.fs),
                     lead_names=[str(n) for n in record.sig_name])


def _check_data_files(folder: Path, header: wfdb.Record) -> None:
    """Name a missing or short data file before wfdb fails on it with a reshape error."""
    files: dict[str, list[str]] = {}
    for name, fmt in zip(header.file_name, header.fmt, strict=True):
        files.setdefault(name, []).append(str(fmt))
    for name, fmts in files.items():
        path = folder / name
        if not path.exists():
            raise RecordError(f"missing signal file: {name}")
        per_frame = sum(_BYTES_PER_SAMPLE.get(f, 0.0) for f in fmts)
        if per_frame and all(f in _BYTES_PER_SAMPLE for f in fmts):
            expected = int(np.ceil(per_frame * header.sig_len))
            size = path.stat().st_size
            if size < expected:
                raise RecordError(
                    f"truncated signal file: {name} has {size} of {expected} bytes"
                )

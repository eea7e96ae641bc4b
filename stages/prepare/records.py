"""Reading one raw record into memory, with every failure turned into a named reason.

Most 12-lead archives (MIMIC-IV-ECG, PTB-XL, the PhysioNet/CinC ``.mat`` records) store one
format-16 data file per record. Those are read directly: wfdb's generic header parser costs
~10 ms a record, which is most of an 800k-record prepare. Anything else (other formats,
multi-segment records, several data files, skew) goes through ``wfdb.rdrecord``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb

# Bytes per sample of the WFDB storage formats we can size-check before reading.
_BYTES_PER_SAMPLE = {"8": 1.0, "16": 2.0, "61": 2.0, "80": 1.0, "160": 2.0, "212": 1.5,
                     "24": 3.0, "32": 4.0, "310": 4 / 3, "311": 4 / 3}
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "μv": 1e-3, "µv": 1e-3, "v": 1e3}
_WFDB_INVALID_16 = -32768
_DEFAULT_GAIN = 200.0
_FMT = re.compile(r"^16(?:x1)?(?:\+(\d+))?$")
_GAIN = re.compile(r"^([-+\d.eE]+)(?:\(([-\d]+)\))?(?:/(\S+))?$")


class RecordError(Exception):
    """A record that cannot be used; the message is the reason shown to the user."""


@dataclass
class RawRecord:
    """A record as stored: (n_samples, n_channels) in mV, its rate and its channel names."""

    signal: np.ndarray
    fs: float
    lead_names: list[str]


@dataclass
class _PlainHeader:
    file_name: str
    offset: int
    fs: float
    sig_len: int
    gains: np.ndarray
    baselines: np.ndarray
    units: list[str]
    names: list[str]


def read_wfdb(stem: Path) -> RawRecord:
    """Read a WFDB record (``stem`` without extension), converting to millivolts."""
    stem = Path(stem)
    header_path = stem.with_suffix(".hea")
    if not header_path.exists():
        raise RecordError(f"missing header file: {header_path.name}")
    plain = _parse_plain_header(header_path.read_text(errors="replace"))
    if plain is None:
        return _read_with_wfdb(stem)
    path = stem.parent / plain.file_name
    if not path.exists():
        raise RecordError(f"missing signal file: {plain.file_name}")
    n_sig = len(plain.names)
    expected = plain.offset + 2 * n_sig * plain.sig_len
    size = path.stat().st_size
    if size < expected:
        raise RecordError(f"truncated signal file: {plain.file_name} has {size} of "
                          f"{expected} bytes")
    digital = np.fromfile(path, dtype="<i2", count=n_sig * plain.sig_len, offset=plain.offset)
    digital = digital.reshape(plain.sig_len, n_sig)
    signal = (digital - plain.baselines) / plain.gains
    signal[digital == _WFDB_INVALID_16] = np.nan
    return RawRecord(signal=signal * _mv_scale(plain.units, plain.names), fs=plain.fs,
                     lead_names=plain.names)


def _parse_plain_header(text: str) -> _PlainHeader | None:
    """Parse a single-file, format-16 header; None for anything else (wfdb handles it)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    try:
        name, n_sig, fs, sig_len = lines[0].split()[:4]
        n_sig_i, sig_len_i = int(n_sig), int(sig_len)
        fs_f = float(fs)
    except (IndexError, ValueError):
        return None
    if "/" in name or n_sig_i < 1 or sig_len_i < 1 or len(lines) != n_sig_i + 1:
        return None
    files, offsets, gains, baselines, units, names = set(), set(), [], [], [], []
    for line in lines[1:]:
        fields = line.split(maxsplit=8)
        if len(fields) < 9:
            return None
        fmt, gain = _FMT.match(fields[1]), _GAIN.match(fields[2])
        if fmt is None or gain is None:
            return None
        files.add(fields[0])
        offsets.add(int(fmt.group(1) or 0))
        value = float(gain.group(1)) or _DEFAULT_GAIN
        gains.append(value)
        baselines.append(int(gain.group(2)) if gain.group(2) else int(fields[4]))
        units.append(gain.group(3) or "mV")
        names.append(fields[8])
    if len(files) != 1 or len(offsets) != 1:
        return None
    return _PlainHeader(file_name=files.pop(), offset=offsets.pop(), fs=fs_f, sig_len=sig_len_i,
                        gains=np.array(gains), baselines=np.array(baselines), units=units,
                        names=names)


def _read_with_wfdb(stem: Path) -> RawRecord:
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
    names = [str(n) for n in record.sig_name]
    units = record.units or ["mV"] * signal.shape[1]
    return RawRecord(signal=signal * _mv_scale(units, names), fs=float(record.fs),
                     lead_names=names)


def _mv_scale(units: list[str], names: list[str]) -> np.ndarray:
    scale = np.ones(len(units))
    for j, unit in enumerate(units):
        factor = _UNIT_TO_MV.get((unit or "mV").strip().lower())
        if factor is None:
            raise RecordError(f"unknown signal unit: {unit!r} on channel {names[j]}")
        scale[j] = factor
    return scale


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

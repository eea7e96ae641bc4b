"""A minimal WFDB writer for format 16, the layout MIMIC-IV-ECG uses.

``wfdb.wrsamp`` validates and converts generically and costs ~25 ms a record, three times
the cost of rendering it; the generator writes thousands, so it writes the two files
directly. A test checks the output is byte-identical to ``wfdb.wrsamp``'s.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np


def write_format16(folder: Path, name: str, digital: np.ndarray, fs: int, sig_names: list[str],
                   gain: float, when: dt.datetime | None = None, units: str = "mV") -> None:
    """Write (n_samples, n_signals) int16 as ``name.hea`` + ``name.dat`` in ``folder``."""
    digital = np.ascontiguousarray(digital, dtype="<i2")
    n_samples, n_signals = digital.shape
    record_line = f"{name} {n_signals} {fs:g} {n_samples}"
    if when is not None:
        record_line += f" {when:%H:%M:%S} {when:%d/%m/%Y}"
    checksums = digital.astype(np.int64).sum(axis=0) % 65536
    lines = [record_line] + [
        f"{name}.dat 16 {gain:.1f}(0)/{units} 16 0 {digital[0, j]} {checksums[j]} 0 "
        f"{sig_names[j]}"
        for j in range(n_signals)
    ]
    (Path(folder) / f"{name}.hea").write_text("\n".join(lines) + "\n")
    digital.tofile(Path(folder) / f"{name}.dat")

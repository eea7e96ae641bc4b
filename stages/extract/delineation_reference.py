"""Reference ECG intervals from cardiologists' per-lead wave marks (LUDB's annotation files).

LUDB (Lobachevsky University Electrocardiography Database, PhysioNet, ODC-By 1.0) marks
the onset, peak and offset of every P, QRS and T wave in each of the 12 leads
(``N.i`` ... ``N.v6``, WFDB annotations ``(``, ``p``/``N``/``t``, ``)``). Interval programs
measure globally over the leads (IEC 60601-2-51), so per beat the leads' marks are combined
by their median (robust to one annotator's jitter) or by the earliest onset and latest
offset (the textbook global definition, which adds that jitter: about 30 ms to a normal
QRS). ``benchmarks/delineation_accuracy.py`` and the real-data tests compare the
morphology expert with these references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import wfdb

LEADS = ("i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6")
FS = 500


def waves(record: Path, lead: str) -> list[tuple[str, int, int, int]]:
    """(kind, onset, peak, offset) of every annotated wave of one lead, in sample order."""
    ann = wfdb.rdann(str(record), lead)
    out = []
    symbols, samples = ann.symbol, ann.sample
    for i, symbol in enumerate(symbols):
        if symbol in "Npt" and 0 < i < len(symbols) - 1 \
                and symbols[i - 1] == "(" and symbols[i + 1] == ")":
            out.append(({"N": "qrs", "p": "p", "t": "t"}[symbol], int(samples[i - 1]),
                        int(samples[i]), int(samples[i + 1])))
    return out


def reference(record: Path, combine: str = "median") -> dict[str, float]:
    """Global intervals (ms): median over the beats annotated in lead II."""
    per_lead = {lead: waves(record, lead) for lead in LEADS}
    ms = 1000.0 / FS
    first, last = (np.median, np.median) if combine == "median" else (np.min, np.max)
    beats = [w for w in per_lead["ii"] if w[0] == "qrs"]
    values: dict[str, list[float]] = {"pr": [], "qrs": [], "qt": []}
    for _, _, peak, _ in beats:
        qrs = [w for ws in per_lead.values() for w in ws
               if w[0] == "qrs" and abs(w[2] - peak) < 0.1 * FS]
        onset, offset = first([w[1] for w in qrs]), last([w[3] for w in qrs])
        p = [w for ws in per_lead.values() for w in ws
             if w[0] == "p" and onset - 0.4 * FS < w[2] < onset]
        t = [w for ws in per_lead.values() for w in ws
             if w[0] == "t" and offset < w[2] < offset + 0.7 * FS]
        values["qrs"].append((offset - onset) * ms)
        if p:
            values["pr"].append((onset - first([w[1] for w in p])) * ms)
        if t:
            values["qt"].append((last([w[3] for w in t]) - onset) * ms)
    out = {k: float(np.median(v)) if v else np.nan for k, v in values.items()}
    peaks = np.array([w[2] for w in beats])
    out["rr"] = float(np.diff(peaks).mean() * ms) if len(peaks) > 1 else np.nan
    out["span"] = (int(peaks.min()), int(peaks.max())) if len(peaks) > 1 else None
    return out


def span_rr(peaks: np.ndarray, span: tuple[int, int] | None) -> float:
    """Mean RR (ms) of the R-peaks inside the annotated stretch ``span`` (± 50 ms)."""
    if span is None:
        return np.nan
    inside = np.sort(peaks[(peaks >= span[0] - 0.05 * FS) & (peaks <= span[1] + 0.05 * FS)])
    return float(np.diff(inside).mean() * 1000 / FS) if len(inside) > 1 else np.nan



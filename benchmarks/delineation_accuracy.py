"""The morphology expert's intervals and the R-peak RR against cardiologists' annotations.

Reads LUDB (Lobachevsky University Electrocardiography Database, PhysioNet, ODC-By 1.0):
200 10-s 12-lead ECGs at 500 Hz whose P, QRS and T onsets and offsets were marked by
cardiologists in every lead. Nothing is downloaded: pass the folder that holds the
records (``1.hea``, ``1.dat``, ``1.i`` ... ``1.v6``); ``tests/data/ludb`` holds five.

Reference per beat, global over the 12 leads as interval programs measure (IEC
60601-2-51): per beat, QRS onset and offset, the P onset before it and the T end after it
are combined over the leads that annotate them, either as the median over leads
(``--reference median``, default) or as the earliest onset and latest offset
(``--reference extreme``, the textbook global definition, which on hand-placed per-lead
marks adds every annotator's jitter: about 30 ms to a normal QRS). A record's reference is
the median over its annotated beats (PR only where P waves are annotated). RR is the mean
interval between the annotated QRS peaks of lead II, and each method's RR is taken over
the same stretch (its R-peaks within 50 ms of the first and last annotated ones), since
LUDB leaves the first and last beats unannotated. Ours: the morphology
expert (median beat, all leads) and the rhythm path's consensus R-peaks. Peer: neurokit2's
DWT delineator on lead II (per-beat intervals, median per record).

    python benchmarks/delineation_accuracy.py --ludb DIR [--split all|odd|even]

Prints mean and SD of (measured - reference) per interval for ours and the peer, beside
the IEC 60601-2-51 limits (mean within ±10 ms for PR and QRS, ±25 ms for QT; SD at most
10, 10 and 30 ms).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import wfdb

from stages.extract.backbones.morphology import morphology_features
from stages.extract.delineation_reference import FS, reference, span_rr
from stages.prepare.rpeaks import beat_sequence

IEC = {"pr": (10, 10), "qrs": (10, 10), "qt": (25, 30)}  # |mean| and SD limits, ms


def ours(signal: np.ndarray, span: tuple[int, int] | None) -> dict[str, float]:
    """The morphology expert's pr, qrs and qt of a (12, L) record in mV, and the RR of the
    consensus R-peaks it measures from."""
    peaks = beat_sequence(signal, FS)
    row = morphology_features(signal, peaks, FS)
    rr, pr, qrs, qt, _, p_present = (float(v) for v in row[:6])
    if rr == 0:
        return dict.fromkeys(("rr", "pr", "qrs", "qt"), np.nan)
    return {"rr": span_rr(np.asarray(peaks), span), "pr": pr if p_present else np.nan,
            "qrs": qrs, "qt": qt}


def neurokit(signal: np.ndarray, span: tuple[int, int] | None) -> dict[str, float]:
    """neurokit2's DWT delineation of lead II: median per-beat intervals (ms)."""
    import neurokit2 as nk

    ms = 1000.0 / FS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lead = nk.ecg_clean(signal[1], sampling_rate=FS)
            _, info = nk.ecg_peaks(lead, sampling_rate=FS)
            _, waves_ = nk.ecg_delineate(lead, info["ECG_R_Peaks"], sampling_rate=FS,
                                         method="dwt")
    except Exception:  # a failed record counts as unmeasured
        return dict.fromkeys(("rr", "pr", "qrs", "qt"), np.nan)

    def per_beat(a: str, b: str) -> float:
        x, y = np.asarray(waves_[a], float), np.asarray(waves_[b], float)
        d = (y - x) * ms
        d = d[np.isfinite(d) & (d > 0)]
        return float(np.median(d)) if len(d) else np.nan

    peaks = np.asarray(info["ECG_R_Peaks"])
    return {"rr": span_rr(peaks, span), "pr": per_beat("ECG_P_Onsets", "ECG_R_Onsets"),
            "qrs": per_beat("ECG_R_Onsets", "ECG_R_Offsets"),
            "qt": per_beat("ECG_R_Onsets", "ECG_T_Offsets")}


def records(folder: Path) -> list[Path]:
    return sorted((p.with_suffix("") for p in folder.glob("*.hea")),
                  key=lambda p: int(p.name) if p.name.isdigit() else p.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ludb", type=Path, required=True,
                        help="folder holding LUDB records (N.hea, N.dat, N.i ... N.v6)")
    parser.add_argument("--records", type=int, default=None, help="use the first N only")
    parser.add_argument("--split", choices=("all", "odd", "even"), default="all",
                        help="records by number: the morphology thresholds were chosen on "
                             "the odd ones, so `even` is the held-out half")
    parser.add_argument("--reference", choices=("median", "extreme"), default="median",
                        help="combine the leads' marks by their median, or earliest onset "
                             "and latest offset")
    args = parser.parse_args()
    paths = [p for p in records(args.ludb) if args.split == "all" or not p.name.isdigit()
             or int(p.name) % 2 == (args.split == "odd")][: args.records]
    if not paths:
        raise SystemExit(f"no LUDB records (*.hea) in {args.ludb}")
    rows = {"ours": [], "neurokit2 DWT": []}
    refs = []
    for path in paths:
        signal = wfdb.rdrecord(str(path)).p_signal.T.astype(np.float64)
        refs.append(reference(path, args.reference))
        rows["ours"].append(ours(signal, refs[-1]["span"]))
        rows["neurokit2 DWT"].append(neurokit(signal, refs[-1]["span"]))
    print(f"{len(paths)} LUDB records ({args.split}), {args.reference} over leads; "
          "differences measured - reference (ms)")
    print(f"{'interval':9} {'method':14} {'n':>4} {'mean':>7} {'SD':>6} {'IEC |mean|, SD':>15}")
    for key in ("rr", "pr", "qrs", "qt"):
        for name, measured in rows.items():
            d = np.array([m[key] - r[key] for m, r in zip(measured, refs, strict=True)])
            d = d[np.isfinite(d)]
            limit = f"≤{IEC[key][0]}, ≤{IEC[key][1]}" if key in IEC else "-"
            print(f"{key:9} {name:14} {len(d):4d} {d.mean():7.1f} {d.std(ddof=1):6.1f} "
                  f"{limit:>15}")


if __name__ == "__main__":
    main()

"""Benchmark (not a test): accuracy of RR derived from R-peaks against the synthetic cohort's
exact beat timing (``truth.csv``: ``rr_exact_ms``, the mean of the generator's beat-to-beat
intervals), per rhythm class where the errors differ. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.params import PrepareParams
from pipeline.signal_store import SignalStore
from stages.prepare.rpeaks import derive_rr
from stages.prepare.run import prepare
from stages.prepare.synthetic.cohort import write_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        truth = write_cohort(Path(tmp) / "raw", n=args.n, seed=1)
        prepare("synthetic", Path(tmp) / "raw", Path(tmp) / "out", PrepareParams(workers=0))
        cohort = pd.read_parquet(Path(tmp) / "out" / "cohort.parquet")
        with SignalStore(Path(tmp) / "out" / "signals.h5") as store:
            signals, fs = store.read(0, len(store)), store.contract.fs
    started = time.perf_counter()
    derived = [derive_rr(s.astype(np.float64), fs)[0] for s in signals]
    per_record_ms = (time.perf_counter() - started) / len(signals) * 1000
    frame = cohort[["record_id"]].assign(derived=derived).merge(
        truth.assign(record_id=truth["study_id"].astype(str)), on="record_id")
    error = (frame["derived"] - frame["rr_exact_ms"]).abs()
    failed = int(frame["derived"].isna().sum())
    print(f"rr from R-peaks vs generator truth ({len(frame)} ECGs): MAE {error.mean():.1f} ms, "
          f"median {error.median():.1f} ms, 95th percentile {error.quantile(0.95):.1f} ms, "
          f"no estimate {failed}")
    for diagnosis, part in error.groupby(frame["diagnosis"]):
        if part.mean() > 10:
            print(f"rr error, {diagnosis} ({len(part)} ECGs): MAE {part.mean():.1f} ms")
    jitter = frame["beat_jitter_ms"].mean()
    print(f"generator beat-timing jitter (SD per beat, mean over ECGs): {jitter:.1f} ms")
    print(f"rr derivation cost: {per_record_ms:.1f} ms per ECG (3 leads, one core)")


if __name__ == "__main__":
    main()

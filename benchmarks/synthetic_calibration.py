"""How hard the synthetic cohort is: a strong, simple baseline against real-data levels.

Writes a cohort with ``pipeline synth``'s generator, prepares it with the real reader,
measures every ECG with the rhythm and morphology experts (their 72 scalar features: RR
statistics, intervals, per-lead R, S, T and ST amplitudes), and fits scikit-learn's
histogram gradient boosting per task with cross-validation grouped by subject. The
difficulty was calibrated so these figures land near what simple models reach on real
12-lead ECGs (the ranges printed beside them; issue 13):

    python benchmarks/synthetic_calibration.py [--n 3000] [--seed 1] [--workers 2]

A synthetic figure says how hard the generator made the task, never how an ECG behaves.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, mean_absolute_error, roc_auc_score
from sklearn.model_selection import GroupKFold

from pipeline.params import PrepareParams
from pipeline.signal_store import SignalStore
from stages.extract.backbones.morphology import GLOBAL, PER_LEAD, morphology_features
from stages.extract.backbones.rhythm import rhythm_features
from stages.prepare.rpeaks import beat_sequence
from stages.prepare.run import prepare
from stages.prepare.synthetic.cohort import write_cohort

# task: (metric, target range on real ECGs, higher is better)
TARGETS = {"sex": ("AUROC", (0.80, 0.90)), "age": ("MAE y", (9.0, 12.0)),
           "ka": ("AUROC", (0.70, 0.85)), "ad": ("accuracy", (0.60, 0.80))}
N_SCALAR = len(GLOBAL) + 12 * len(PER_LEAD)


def features(signal: np.ndarray, fs: int = 500) -> np.ndarray:
    """Rhythm features and the morphology expert's scalars of one (12, L) ECG."""
    signal = signal.astype(np.float64)
    peaks = beat_sequence(signal, fs)
    return np.concatenate([rhythm_features(peaks, fs),
                           morphology_features(signal, peaks, fs)[:N_SCALAR]])


def measure_all(signals: np.ndarray, workers: int) -> np.ndarray:
    if workers <= 1:
        return np.stack([features(s) for s in signals])
    with Pool(workers) as pool:
        return np.stack(pool.map(features, list(signals), chunksize=16))


def cross_validate(x: np.ndarray, cohort: pd.DataFrame, task: str, folds: int,
                   seed: int) -> tuple[list[float], list[float]]:
    """Per-fold scores of gradient boosting and of the trivial predictor."""
    known = cohort[task].notna().to_numpy()
    xs, groups = x[known], cohort.loc[known, "subject_id"].to_numpy()
    y = cohort.loc[known, task].to_numpy()
    if task == "sex":
        y = (y == "M").astype(int)
    scores, trivial = [], []
    for train, test in GroupKFold(folds).split(xs, y, groups):
        if task == "age":
            model = HistGradientBoostingRegressor(loss="absolute_error", random_state=seed)
            model.fit(xs[train], y[train].astype(float))
            scores.append(mean_absolute_error(y[test], model.predict(xs[test])))
            trivial.append(mean_absolute_error(y[test], np.full(len(test),
                                                                np.median(y[train]))))
            continue
        model = HistGradientBoostingClassifier(random_state=seed).fit(xs[train], y[train])
        if task == "ad":
            scores.append(accuracy_score(y[test], model.predict(xs[test])))
            values, counts = np.unique(y[train], return_counts=True)
            trivial.append(float(np.mean(y[test] == values[np.argmax(counts)])))
        else:
            scores.append(roc_auc_score(y[test], model.predict_proba(xs[test])[:, 1]))
            trivial.append(0.5)
    return scores, trivial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "raw", n=args.n, seed=args.seed, workers=args.workers)
        prepare("synthetic", Path(tmp) / "raw", Path(tmp) / "out",
                PrepareParams(workers=args.workers))
        cohort = pd.read_parquet(Path(tmp) / "out" / "cohort.parquet")
        with SignalStore(Path(tmp) / "out" / "signals.h5") as store:
            signals = store.read(0, len(store))
    x = measure_all(signals, args.workers)
    subjects = cohort["subject_id"].nunique()
    print(f"{len(cohort)} ECGs of {subjects} subjects, {x.shape[1]} features, "
          f"{args.folds}-fold CV by subject, seed {args.seed}")
    print("| task | metric | gradient boosting (mean ± SD over folds) | trivial | "
          "real-data target | in range |")
    print("|---|---|---|---|---|---|")
    for task, (metric, (lo, hi)) in TARGETS.items():
        scores, trivial = cross_validate(x, cohort, task, args.folds, args.seed)
        mean = float(np.mean(scores))
        extra = f" ({int(cohort[task].sum())} positive)" if task == "ka" else ""
        print(f"| {task}{extra} | {metric} | {mean:.3f} ± {np.std(scores):.3f} | "
              f"{np.mean(trivial):.3f} | {lo:g}–{hi:g} | {'yes' if lo <= mean <= hi else 'no'} |")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

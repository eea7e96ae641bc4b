"""The rhythm expert (ECG-MoE): beat-to-beat timing measured from R-peaks.

General time-series models see a 10-s ECG as a waveform and must infer its periodicity;
this expert states it. R-peaks come from the same consensus detector as derived RR (see
``stages.prepare.rpeaks``). Features, in this order:

====================  ==========================================================
n_beats               beats detected
mean_rr, median_rr    ms
min_rr, max_rr        ms
heart_rate            bpm, from mean_rr
sdnn, rmssd           ms: overall and beat-to-beat variability
pnn50                 share of successive differences above 50 ms
cv                    sdnn / mean_rr
nsd                   mean |successive difference| / mean_rr (irregularity; high in AF)
sd1, sd2, sd1_sd2     Poincaré plot axes (ms) and their ratio
ectopic               beats with RR < 0.8 x median followed by RR > 1.1 x median
ectopic_share         ectopic / intervals
detected              1 when at least 3 beats were found, else 0 (then all else is 0)
====================  ==========================================================

Records with too few beats, flat lines or noise get the defined all-zero row with
``detected`` = 0 rather than NaN, so heads and gates never see missing values.
"""

from __future__ import annotations

import numpy as np

from pipeline.feature_cache import ArraySpec
from stages.extract.backbones import BeatBackbone, register
from stages.prepare.rpeaks import MIN_BEATS

FEATURES = ("n_beats", "mean_rr", "median_rr", "min_rr", "max_rr", "heart_rate", "sdnn",
            "rmssd", "pnn50", "cv", "nsd", "sd1", "sd2", "sd1_sd2", "ectopic", "ectopic_share",
            "detected")


def rhythm_features(peaks: np.ndarray, fs: int) -> np.ndarray:
    """The feature row for one ECG's R-peak indices (see the module table)."""
    out = np.zeros(len(FEATURES), dtype=np.float32)
    if len(peaks) < MIN_BEATS:
        return out
    rr = np.diff(np.sort(peaks)) / fs * 1000.0
    diff = np.diff(rr)
    mean, median = rr.mean(), np.median(rr)
    sd1 = np.sqrt(0.5) * diff.std() if len(diff) > 1 else 0.0
    sd2_sq = max(2 * rr.std() ** 2 - 0.5 * diff.std() ** 2, 0.0) if len(diff) > 1 else 0.0
    sd2 = np.sqrt(sd2_sq)
    ectopic = int(np.sum((rr[:-1] < 0.8 * median) & (rr[1:] > 1.1 * median)))
    values = {
        "n_beats": len(peaks), "mean_rr": mean, "median_rr": median, "min_rr": rr.min(),
        "max_rr": rr.max(), "heart_rate": 60000.0 / mean, "sdnn": rr.std(),
        "rmssd": np.sqrt(np.mean(diff ** 2)) if len(diff) else 0.0,
        "pnn50": np.mean(np.abs(diff) > 50) if len(diff) else 0.0,
        "cv": rr.std() / mean, "nsd": np.mean(np.abs(diff)) / mean if len(diff) else 0.0,
        "sd1": sd1, "sd2": sd2, "sd1_sd2": sd1 / sd2 if sd2 > 0 else 0.0,
        "ectopic": ectopic, "ectopic_share": ectopic / len(rr), "detected": 1.0,
    }
    return np.array([values[name] for name in FEATURES], dtype=np.float32)


@register("rhythm")
class Rhythm(BeatBackbone):
    def arrays(self) -> list[ArraySpec]:
        return [ArraySpec("features", (len(FEATURES),))]

    def record_features(self, signal: np.ndarray, peaks: np.ndarray, fs: int) -> np.ndarray:
        return rhythm_features(peaks, fs)

    def feature_names(self) -> list[str]:
        return list(FEATURES)

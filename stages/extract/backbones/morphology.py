"""The beat-morphology expert (ECG-MoE): a robust median beat per lead and its measurements.

Beats are cut around the consensus R-peaks (``stages.prepare.rpeaks``) from 350 ms before
to 450 ms after R, after a 0.5-Hz high-pass removes baseline wander; the per-lead median
over beats removes noise and ectopic beats. Fiducials are found on the median beat
low-passed at 40 Hz (zero phase): on the raw beat, muscle noise and mains hum in the
derivative outran the onset threshold (on noisy synthetic ECGs the QRS came out 134 ms
long, uncorrelated with the truth; filtered, r = 0.80), and on LUDB's held-out half the
QRS SD fell from 35 to 17 ms. Amplitudes are read on the beat before the 40-Hz low-pass. Global
fiducials come from all 12 leads at once, as computerised ECG programs do, because one
lead can hide a wave's start or end:

* QRS onset/offset: where the spatial velocity (the norm of the 12 leads' derivatives)
  drops below ``QRS_FRACTION`` of its peak, searching outward from R (at most 150 ms);
* the baseline of each lead is its level 10-30 ms before QRS onset (the PR segment);
* T peak: the largest spatial magnitude 80-550 ms after QRS offset; T end: the earlier of
  where the magnitude falls below ``T_END_FRACTION`` of the T peak and where the tangent
  at its steepest descent meets the baseline (the tangent method; the threshold alone ran
  past the T wave on flat or notched T and U waves: on LUDB's held-out half the QT SD fell
  from 44 to 15 ms); P: the largest magnitude
  40-300 ms before QRS onset (and after 40 % of an RR before R, so a fast rate's previous
  T is not taken for P), onset where it falls below ``P_FRACTION`` of that peak (P absent
  when the peak is under 0.03 mV, as in atrial fibrillation).

neurokit2's delineators were tried first; on 10-s records they cost ~50 ms a lead and
left R onsets or most P waves undetected, so these rules are the project's own and are
tested on hand-made beats with known intervals.

Features: rr, pr, qrs, qt, qtc (Fridericia), p_present, t_peakedness (T height over its
half-height width), then per lead r, s, t amplitude and ST level at J+60 ms (48 values),
then the median beats at 100 Hz (12 x 80). Too few beats gives a defined all-zero row.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.signal import butter, sosfiltfilt

from pipeline.feature_cache import ArraySpec
from pipeline.leads import STANDARD_LEADS
from stages.extract.backbones import BeatBackbone, register
from stages.prepare.rpeaks import MIN_BEATS

BEFORE_S, AFTER_S = 0.35, 0.45
# Chosen on LUDB's odd-numbered records (cardiologists' marks, see
# benchmarks/delineation_accuracy.py) from a grid of 5 x 3 x 5 by the sum over PR, QRS and QT
# of |mean difference| / IEC limit + SD / IEC limit; the even-numbered records are held out.
# Chosen again (only T_END_FRACTION moved, from 0.25) once fiducials came from the filtered
# beat and T end from the tangent too. Held-out half, first grid (0.12, 0.15, 0.3) -> now:
# QRS -23.7 +- 20.8 -> -2.6 +- 11.2 ms, PR +35.0 +- 56.8 -> -3.0 +- 32.9, QT +21.2 +- 59.8
# -> -10.2 +- 14.9.
QRS_FRACTION, T_END_FRACTION, P_FRACTION = 0.06, 0.15, 0.5
P_MIN_MV = 0.03
LOWPASS_HZ = 40.0
GLOBAL = ("rr", "pr", "qrs", "qt", "qtc", "p_present", "t_peakedness")
PER_LEAD = ("r", "s", "t", "st")
SHAPE_STEP = 5  # 500 Hz -> 100 Hz


def median_beat(signal: np.ndarray, peaks: np.ndarray, fs: int) -> np.ndarray | None:
    """(12, window) median over the beats that fit inside the record, or None."""
    before, after = round(BEFORE_S * fs), round(AFTER_S * fs)
    usable = [p for p in peaks if p - before >= 0 and p + after <= signal.shape[1]]
    if len(usable) < 2:
        return None
    beats = np.stack([signal[:, p - before: p + after] for p in usable])
    return np.median(beats, axis=0)


@lru_cache(maxsize=4)
def _filters(fs: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline (0.5 Hz high-pass) and fiducial (LOWPASS_HZ low-pass) Butterworth filters."""
    return (butter(2, 0.5, btype="highpass", fs=fs, output="sos"),
            butter(4, LOWPASS_HZ, btype="lowpass", fs=fs, output="sos"))


def _crossing(values: np.ndarray, start: int, stop: int, threshold: float) -> int:
    """First index from ``start`` towards ``stop`` (either direction) below ``threshold``."""
    step = 1 if stop >= start else -1
    for i in range(start, stop, step):
        if values[i] < threshold:
            return i
    return stop


def _tangent_end(magnitude: np.ndarray, peak: int, reach: int) -> int:
    """Where the tangent at the T wave's steepest descent (within ``reach`` samples after
    its peak) meets the baseline: the tangent method of T-end."""
    stop = min(peak + reach, len(magnitude) - 1)
    slope = np.diff(magnitude[peak: stop + 1])
    if not len(slope) or slope.min() >= 0:
        return len(magnitude) - 1
    k = int(np.argmin(slope))
    return peak + k + round(float(magnitude[peak + k] / -slope[k]))


def measure(beat: np.ndarray, fs: int, rr_ms: float | None = None) -> dict:
    """Intervals (ms) and per-lead amplitudes (mV) of a (12, window) median beat.

    With ``rr_ms`` the P search starts no earlier than 40 % of an RR before the R-peak, so
    at fast rates it cannot take the previous beat's T wave for a P wave.
    """
    ms = 1000.0 / fs
    r = round(BEFORE_S * fs)
    smooth = sosfiltfilt(_filters(fs)[1], beat, axis=1)
    velocity = np.sqrt((np.diff(smooth, axis=1, prepend=smooth[:, :1]) ** 2).sum(axis=0))
    reach = round(0.15 * fs)
    lo, hi = max(r - reach, 0), min(r + reach, beat.shape[1] - 1)
    peak = velocity[lo: hi].max()
    # Outward from the steepest point on each side of R: at the R apex itself the smoothed
    # velocity can dip under the threshold.
    up, down = lo + int(np.argmax(velocity[lo: r + 1])), r + int(np.argmax(velocity[r: hi]))
    onset = _crossing(velocity, up, lo, QRS_FRACTION * peak)
    offset = _crossing(velocity, down, hi, QRS_FRACTION * peak)
    base_slice = slice(max(onset - round(0.03 * fs), 0), max(onset - round(0.01 * fs), 1))
    base = beat[:, base_slice]
    x = beat - base.mean(axis=1, keepdims=True)
    magnitude = np.sqrt(((smooth - smooth[:, base_slice].mean(axis=1, keepdims=True)) ** 2)
                        .sum(axis=0))
    t_lo, t_hi = offset + round(0.08 * fs), min(offset + round(0.55 * fs), beat.shape[1])
    t_peak = t_lo + int(np.argmax(magnitude[t_lo:t_hi])) if t_hi > t_lo else offset
    t_height = magnitude[t_peak]
    t_end = min(_crossing(magnitude, t_peak, beat.shape[1] - 1, T_END_FRACTION * t_height),
                _tangent_end(magnitude, t_peak, round(0.25 * fs)))
    left = _crossing(magnitude, t_peak, t_lo, t_height / 2)
    right = _crossing(magnitude, t_peak, t_end, t_height / 2)
    p_lo, p_hi = max(onset - round(0.30 * fs), 0), max(onset - round(0.04 * fs), 1)
    if rr_ms is not None:
        p_lo = min(max(p_lo, r - round(0.4 * rr_ms * fs / 1000.0)), p_hi - 1)
    p_peak = p_lo + int(np.argmax(magnitude[p_lo:p_hi]))
    p_present = magnitude[p_peak] >= P_MIN_MV
    p_onset = _crossing(magnitude, p_peak, 0, P_FRACTION * magnitude[p_peak])
    j60 = min(offset + round(0.06 * fs), beat.shape[1] - 1)
    qrs = x[:, onset: offset + 1]
    return {
        "fiducials": {"p_onset": p_onset if p_present else None, "qrs_onset": onset,
                      "qrs_offset": offset, "t_peak": t_peak, "t_end": t_end},
        "pr": (onset - p_onset) * ms if p_present else 0.0,
        "qrs": (offset - onset) * ms,
        "qt": (t_end - onset) * ms,
        "p_present": float(p_present),
        "t_peakedness": t_height / max((right - left) * ms, ms),
        "r": qrs.max(axis=1), "s": qrs.min(axis=1), "t": x[:, t_peak], "st": x[:, j60],
    }


def delineate(signal: np.ndarray, peaks: np.ndarray, fs: int
              ) -> tuple[np.ndarray, dict, float] | None:
    """(median beat, ``measure``'s result, mean RR in ms) of a (12, L) record, or None when
    too few beats or a NaN leave nothing to measure."""
    if len(peaks) < MIN_BEATS or not np.isfinite(signal).all():
        return None  # a filter would spread one NaN over the lead
    signal = sosfiltfilt(_filters(fs)[0], signal, axis=1)
    beat = median_beat(signal, np.sort(peaks), fs)
    if beat is None:
        return None
    rr = float(np.diff(np.sort(peaks)).mean() * 1000 / fs)
    return beat, measure(beat, fs, rr), rr


def morphology_features(signal: np.ndarray, peaks: np.ndarray, fs: int) -> np.ndarray:
    n_leads = signal.shape[0]
    width = round((BEFORE_S + AFTER_S) * fs)
    size = len(GLOBAL) + len(PER_LEAD) * n_leads + n_leads * -(-width // SHAPE_STEP)
    found = delineate(signal, peaks, fs)
    if found is None:
        return np.zeros(size, dtype=np.float32)
    beat, m, rr = found
    qtc = m["qt"] / (rr / 1000) ** (1 / 3)
    head = [rr, m["pr"], m["qrs"], m["qt"], qtc, m["p_present"], m["t_peakedness"]]
    leads = np.concatenate([m[k] for k in PER_LEAD])
    shape = beat[:, ::SHAPE_STEP].ravel()
    return np.concatenate([head, leads, shape]).astype(np.float32)


@register("morphology")
class Morphology(BeatBackbone):
    def arrays(self) -> list[ArraySpec]:
        fs = self.config["fs"]
        width = round((BEFORE_S + AFTER_S) * fs)
        n = len(GLOBAL) + len(PER_LEAD) * 12 + 12 * -(-width // SHAPE_STEP)
        return [ArraySpec("features", (n,))]

    def record_features(self, signal: np.ndarray, peaks: np.ndarray, fs: int) -> np.ndarray:
        return morphology_features(signal, peaks, fs)

    def feature_names(self) -> list[str]:
        fs = self.config["fs"]
        steps = range(-(-round((BEFORE_S + AFTER_S) * fs) // SHAPE_STEP))
        return [*GLOBAL, *(f"{k}_{lead}" for k in PER_LEAD for lead in STANDARD_LEADS),
                *(f"beat_{lead}_{round(t * SHAPE_STEP * 1000 / fs - BEFORE_S * 1000):+d}ms"
                  for lead in STANDARD_LEADS for t in steps)]

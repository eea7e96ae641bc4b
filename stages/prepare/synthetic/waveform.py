"""Synthetic 10-s, 500 Hz, 12-lead ECGs whose labels leave documented traces in the waveform.

Model
-----
Heart-vector (dipole) model. Every wave of a beat is a 3-D vector (x = patient's left,
y = inferior, z = anterior) times a time course local to the beat: Gaussians for P, Q, R, S
and U, an asymmetric Gaussian for T (slow upstroke, faster downstroke) and a smooth plateau
for the ST segment (from the J point into the T upstroke). Each wave is evaluated only on a
window of +-4 sigma around its centre and accumulated per wave type, so a render is a handful
of small array operations. Eight independent leads are projections of the heart vector:
I = x, II = 0.5x + 0.866y, and V1..V6 are transverse-plane unit vectors at 120, 95, 75, 60,
30 and 0 degrees from +x towards +z, with a small inferior component and a proximity gain.
III, aVR, aVL and aVF are then derived exactly (Einthoven and Goldberger hold to rounding,
with or without noise, because noise is added to the electrodes, see below).

Beat timing: sinus beats have mean RR = 60/heart_rate, respiratory sinus arrhythmia (RSA,
0.15-0.35 Hz, 1-5 % of RR, larger when younger) and independent Gaussian per-beat jitter
(SD 3-20 ms, reported as ``beat_jitter_ms``). Beats start at a random phase well before t=0
and run past the end. QRS onset sits PR after the P onset; QT follows Fridericia per beat,
QT = QTc * RR_prev^(1/3), from QRS onset to T end.

Baseline physiology (before labels): PR 150 ms (SD 18, 120-200) + 0.5 ms/year from age 40;
P 100 ms; QRS 90 ms (80-100); QTc 400 ms (M) / 415 ms (F) + 0.3 ms/year from age 40,
SD 12 ms, 370-460 ms; frontal QRS axis 60 - 0.5*(age - 20) deg, SD 18, clipped -25..95.

Label traces (what a model can learn from)
------------------------------------------
=================================  ===========================================================
label                              trace in the waveform
=================================  ===========================================================
age                                QRS amplitude x(1 - 0.004*(age-40)) above 40 years; frontal
                                   QRS axis -0.5 deg/year; PR +0.5 ms/year; QTc +0.3 ms/year;
                                   RSA amplitude falls with age; rate -0.1 bpm/year
                                   (sample_heart_rate)
sex                                M: precordial QRS x1.2, J-point/ST elevation 0.03-0.10 mV in
                                   V2-V3. F: QTc +15 ms, rate +3 bpm (sample_heart_rate)
potassium high                     T amplitude x2-3 and width x0.55-0.65 (peaked), QRS x1.2-1.4
                                   wider, P amplitude x0.2-0.5 and 20 % wider
potassium low                      T amplitude x0.25-0.35, ST depression ~0.05 mV (against the
                                   T vector), U wave 0.08-0.15 mV peaking 50-90 ms after T end
Sinus rhythm                       rate 60-100, sinus P before every QRS
Sinus bradycardia / tachycardia    rate 40-59 / 101-150
Atrial fibrillation                no P; RR i.i.d. gamma with CV 15-30 %; f-waves 4-9 Hz,
                                   0.05-0.10 mV, largest in V1 and the inferior leads
Atrial flutter                     no P; sawtooth F-waves 250-350/min, 0.15-0.30 mV
                                   peak-to-peak, negative in II/III/aVF, positive in V1;
                                   regular 2:1 (rate >= 125) or 4:1 conduction
Sinus rhythm with PVCs             1-3 premature beats (coupling 55-75 % of RR), no P, QRS
                                   140-180 ms from two broad vectors of one random focus,
                                   discordant ST-T, fully compensatory pause
Left bundle branch block           QRS 130-170 ms, no septal q, two leftward-posterior vectors
                                   35 % of the QRS apart (broad notched R in I/aVL/V5/V6, QS/rS
                                   in V1), ST-T opposite to the QRS vector
Right bundle branch block          QRS 120-150 ms, normal early QRS plus a late right-anterior
                                   vector (rsR' in V1-V2, wide S in I/V6), T inverted in V1-V2
1st degree AV block                PR 210-320 ms
Left ventricular hypertrophy       QRS voltage x1.8-2.5, QRS +10 ms, axis -10 deg, more
                                   posterior R; strain: ST-T opposite to R (T inverted V5-V6)
ST depression                      horizontal ST plateau, deepest lateral/inferior lead
                                   -0.10..-0.25 mV (mirror elevation in aVR)
Low QRS voltage                    QRS x0.30-0.45 (P and T x0.6-0.8)
Sinus arrhythmia                   RSA 10-15 % of RR
Sinus rhythm with PACs             1-3 early beats (coupling 60-80 % of RR), normal QRS, P of an
                                   ectopic focus (axis -90..+30 deg), sinus reset (non-
                                   compensatory pause)
Junctional rhythm                  rate 40-60, almost no RSA; no P, or a retrograde P (axis
                                   -60..-90 deg) 60-100 ms before or 60-120 ms after QRS onset
Left anterior fascicular block     frontal QRS axis -45..-75 deg, inferior-rightward initial
                                   vector (qR in I/aVL, rS in II/III/aVF), QRS +10 ms
Prolonged QT                       QTc 480-560 ms
Right axis deviation               frontal QRS axis +100..+150 deg
=================================  ===========================================================

Individual variability: wave vectors get random rotations (SD 8 deg) and log-normal amplitude
factors (SD ~15-20 %); intervals and axes are drawn per ECG within the ranges above.

Noise (added to the 9 electrodes RA, LA, LL, V1..V6, then referenced as a real recorder does:
I = LA - RA, II = LL - RA, Vi = Vi - Wilson terminal; amplitudes drawn per ECG)
---------------------------------------------------------------------------------------------
* baseline wander: 3 sinusoids 0.05-0.5 Hz plus a cubic-spline random walk, scaled per
  electrode to 0.05-0.3 mV peak;
* mains hum at ``mains_hz``: 0.005-0.03 mV, nearly common phase across electrodes;
* muscle (EMG): Gaussian noise band-passed 20-150 Hz, SD 0.003-0.03 mV, with a 30 % chance of
  a 0.5-2 s burst of x2-5;
* white noise: SD 0.002-0.01 mV.

Determinism: render() consumes ``rng`` in this order: physiology, beat train, atrial activity
(AF/flutter only), then noise (only when ``noise=True``). The clean part of a render is
therefore identical with and without noise for the same generator state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.signal import butter, sosfilt
from scipy.special import ndtr, ndtri

STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)

DIAGNOSES: dict[str, float] = {
    "Sinus rhythm": 0.30,
    "Sinus bradycardia": 0.08,
    "Sinus tachycardia": 0.07,
    "Atrial fibrillation": 0.08,
    "Atrial flutter": 0.04,
    "Sinus rhythm with PVCs": 0.06,
    "Left bundle branch block": 0.04,
    "Right bundle branch block": 0.05,
    "1st degree AV block": 0.05,
    "Left ventricular hypertrophy": 0.06,
    "ST depression": 0.05,
    "Low QRS voltage": 0.048,
    "Sinus arrhythmia": 0.012,
    "Sinus rhythm with PACs": 0.012,
    "Junctional rhythm": 0.012,
    "Left anterior fascicular block": 0.012,
    "Prolonged QT": 0.012,
    "Right axis deviation": 0.012,
}

POTASSIUM_LEVELS: tuple[str, ...] = ("normal", "high", "low")

# Ventricular rate (mean for a 50-year-old man, SD, min, max) in bpm.
_RATE: dict[str, tuple[float, float, float, float]] = {
    "Sinus rhythm": (75.0, 10.0, 60.0, 100.0),
    "Sinus bradycardia": (52.0, 4.5, 40.0, 59.0),
    "Sinus tachycardia": (116.0, 12.0, 101.0, 150.0),
    "Atrial fibrillation": (92.0, 20.0, 50.0, 160.0),
    "Junctional rhythm": (50.0, 5.0, 40.0, 60.0),
}
_DEFAULT_RATE = (74.0, 9.0, 60.0, 100.0)
_FLUTTER_RATE_BPM = (250.0, 350.0)

# Independent leads: I, II, V1..V6. Precordial: angle from +x towards +z, inferior tilt, gain.
_V_ANGLE_DEG = np.array([120.0, 95.0, 75.0, 60.0, 30.0, 0.0])
_V_INFERIOR = np.array([0.10, 0.10, 0.15, 0.20, 0.20, 0.20])
_V_GAIN = np.array([1.2, 1.9, 2.0, 1.9, 1.6, 1.3])
_V_ANGLE = np.deg2rad(_V_ANGLE_DEG)
_LEADS8 = np.vstack([
    [1.0, 0.0, 0.0],
    [0.5, np.sqrt(3.0) / 2.0, 0.0],
    _V_GAIN[:, None] * np.column_stack([np.cos(_V_ANGLE), _V_INFERIOR, np.sin(_V_ANGLE)]),
])
_PRECORDIAL = slice(2, 8)
_LIMB12 = (0, 1, 2, 3, 4, 5)
_ALL_LEADS = (*_LIMB12, 6, 7, 8, 9, 10, 11)

_SINUS, _PAC, _PVC, _NO_P = 0, 1, 2, 3
_MARGIN_S = 1.2  # beats rendered beyond both ends so every wave near the edges is complete


@dataclass(frozen=True)
class Heart:
    """Ground truth of one ECG; render() expresses every field in the waveform."""

    diagnosis: str
    heart_rate: float
    age: float
    sex: str
    potassium: str


@dataclass
class Rendered:
    """A rendered ECG and the beat timing the renderer used."""

    signal: np.ndarray
    r_peaks: np.ndarray
    beat_times: np.ndarray
    rr_ms: float
    beat_jitter_ms: float


@dataclass
class _Wave:
    """One wave: heart vector, centre and sigma.

    Centre and sigma are fractions of the P or QRS duration; for ectopic atrial P waves they
    are seconds from the PAC's P onset or the junctional beat's QRS onset.
    """

    centre: float
    sigma: float
    vector: np.ndarray


@dataclass
class _Physiology:
    """Per-ECG morphology and intervals (seconds, mV, heart-vector space)."""

    pr: float
    p_dur: float
    qrs: float
    qtc: float
    p_waves: list[_Wave]
    qrs_waves: list[_Wave]
    fiducial: float
    t_vector: np.ndarray
    t_width: float
    st_vector: np.ndarray
    u_vector: np.ndarray
    u_delay: float
    precordial_gain: float
    rsa: float
    pvc: _Physiology | None = None
    pac_p: _Wave | None = None
    pac_pr: float = 0.0
    retro_p: _Wave | None = None


@dataclass
class _Beats:
    times: np.ndarray
    kinds: np.ndarray
    prev_rr: np.ndarray
    jitter_s: float


# ----------------------------------------------------------------------------- draws


def _truncnorm(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    """Truncated normal by inverse CDF: exactly one uniform draw, so draw order stays fixed."""
    a, b = ndtr((lo - mean) / sd), ndtr((hi - mean) / sd)
    return float(np.clip(mean + sd * ndtri(a + rng.uniform() * (b - a)), lo, hi))


def sample_heart_rate(diagnosis: str, age: float, sex: str, rng: np.random.Generator) -> float:
    """Draw a ventricular rate (bpm) plausible for the diagnosis.

    Slower with age (-0.1 bpm/year around 50) and faster in women (+3 bpm), within the
    diagnosis range. Flutter rates come from a flutter circuit of 250-350/min conducted 2:1
    (70 %) or 4:1, so render() can recover the conduction ratio from the rate.
    """
    _check_diagnosis(diagnosis)
    if diagnosis == "Atrial flutter":
        flutter = rng.uniform(*_FLUTTER_RATE_BPM)
        return float(flutter / (2.0 if rng.uniform() < 0.7 else 4.0))
    mean, sd, lo, hi = _RATE.get(diagnosis, _DEFAULT_RATE)
    mean += -0.1 * (age - 50.0) + (3.0 if sex == "F" else 0.0)
    return _truncnorm(rng, mean, sd, lo, hi)


def _vec(axis_deg: float, z: float, magnitude: float) -> np.ndarray:
    """Vector of given length whose frontal projection points at axis_deg (ECG convention)."""
    a = np.deg2rad(axis_deg)
    v = np.array([np.cos(a), np.sin(a), z])
    return magnitude * v / np.linalg.norm(v)


def _perturb(v: np.ndarray, rng: np.random.Generator, deg: float = 8.0,
             amp_sd: float = 0.15) -> np.ndarray:
    """Small random rotation (Rodrigues) and log-normal scaling: individual variability."""
    k = rng.normal(size=3)
    k /= np.linalg.norm(k)
    th = np.deg2rad(rng.normal(0.0, deg))
    rotated = v * np.cos(th) + np.cross(k, v) * np.sin(th) + k * (k @ v) * (1 - np.cos(th))
    return rotated * rng.lognormal(0.0, amp_sd)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _leads12(v: np.ndarray) -> np.ndarray:
    """12-lead projection of a heart vector (used to scale vectors to lead amplitudes)."""
    return _derive(_LEADS8 @ v)


def _scaled(direction: np.ndarray, target: float, leads: tuple[int, ...]) -> np.ndarray:
    """Scale a direction so that its largest deflection among ``leads`` equals ``target``."""
    proj = _leads12(direction)[list(leads)]
    peak = proj[np.argmax(np.abs(proj))]
    return direction * (target / peak)


def _frontal_axis(heart: Heart, rng: np.random.Generator) -> float:
    dx = heart.diagnosis
    if dx == "Left anterior fascicular block":
        return rng.uniform(-75.0, -45.0)
    if dx == "Right axis deviation":
        return rng.uniform(100.0, 150.0)
    if dx == "Left bundle branch block":
        return _truncnorm(rng, 15.0, 20.0, -30.0, 75.0)
    axis = _truncnorm(rng, 60.0 - 0.5 * (heart.age - 20.0), 18.0, -25.0, 95.0)
    return max(axis - 10.0, -25.0) if dx == "Left ventricular hypertrophy" else axis


def _qrs_complex(heart: Heart, axis: float, amp: float,
                 rng: np.random.Generator) -> tuple[list[_Wave], float]:
    """QRS waves (centre/sigma as fractions of QRS duration) and the R fiducial fraction."""
    dx = heart.diagnosis
    if dx == "Left bundle branch block":
        # Septum then free wall, both leftward-posterior; the later one dominates every lead.
        z = rng.uniform(-0.9, -0.5)
        r1 = _vec(axis - 10.0, z, rng.uniform(0.6, 0.75) * amp)
        r2 = _vec(axis + 5.0, z, amp)
        initial = _vec(axis, 1.0, amp * rng.uniform(0.0, 0.12))
        return [_Wave(0.10, 0.04, initial), _Wave(0.33, 0.11, r1), _Wave(0.68, 0.11, r2)], 0.68
    lafb = dx == "Left anterior fascicular block"
    q_axis = rng.uniform(110.0, 130.0) if lafb else axis + rng.uniform(90.0, 130.0)
    q = _perturb(_vec(q_axis, rng.uniform(0.6, 1.2), amp * rng.uniform(0.12, 0.22)), rng)
    lvh = dx == "Left ventricular hypertrophy"
    # Apical (left-anterior) then lateral (left-posterior) activation: R-wave progression.
    apex = _vec(axis, rng.uniform(-0.1, 0.15) if lvh else rng.uniform(0.1, 0.4), 0.6 * amp)
    lateral = _vec(axis, rng.uniform(-1.3, -0.9) if lvh else rng.uniform(-0.9, -0.5), 0.6 * amp)
    s = _perturb(_vec(axis + 180.0 + rng.uniform(-25.0, 25.0), -rng.uniform(0.8, 1.4),
                      amp * rng.uniform(0.2, 0.35)), rng)
    if dx == "Right bundle branch block":
        late = _vec(180.0 + rng.uniform(-20.0, 20.0), rng.uniform(0.8, 1.4),
                    amp * rng.uniform(0.45, 0.65))
        return [_Wave(0.12, 0.045, q), _Wave(0.27, 0.07, apex), _Wave(0.35, 0.07, lateral),
                _Wave(0.52, 0.055, 0.7 * s), _Wave(0.80, 0.075, late)], 0.31
    return [_Wave(0.18, 0.07, q), _Wave(0.42, 0.09, apex), _Wave(0.54, 0.09, lateral),
            _Wave(0.76, 0.08, s)], 0.48


def _qrs_duration(heart: Heart, rng: np.random.Generator) -> float:
    dx = heart.diagnosis
    if dx == "Left bundle branch block":
        return rng.uniform(0.130, 0.170)
    if dx == "Right bundle branch block":
        return rng.uniform(0.120, 0.150)
    base = _truncnorm(rng, 0.090, 0.005, 0.080, 0.100)
    wider = dx in ("Left ventricular hypertrophy", "Left anterior fascicular block")
    return base + (0.010 if wider else 0.0)


def _p_waves(rng: np.random.Generator) -> list[_Wave]:
    """Right- then left-atrial vectors: biphasic P in V1, upright P in II."""
    ra = _perturb(_vec(rng.uniform(60.0, 80.0), 0.5, rng.uniform(0.07, 0.10)), rng)
    la = _perturb(_vec(rng.uniform(30.0, 60.0), -0.6, rng.uniform(0.06, 0.09)), rng)
    return [_Wave(0.38, 0.15, ra), _Wave(0.62, 0.15, la)]


def _repolarisation(heart: Heart, axis: float, qrs_waves: list[_Wave],
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """T and ST vectors: concordant normally, opposite to the QRS in LBBB and LVH strain."""
    dx = heart.diagnosis
    mean_qrs = _unit(sum(w.vector * w.sigma for w in qrs_waves))
    t_mag = rng.uniform(0.22, 0.40)
    st = np.zeros(3)
    if dx == "Left bundle branch block":
        t = -mean_qrs * rng.uniform(0.35, 0.6)
        st = -mean_qrs * rng.uniform(0.08, 0.15)
    elif dx == "Left ventricular hypertrophy":
        t = -mean_qrs * rng.uniform(0.15, 0.35)
        st = -mean_qrs * rng.uniform(0.05, 0.12)
    elif dx == "Right bundle branch block":
        t = _perturb(_vec(axis - 10.0, rng.uniform(-0.7, -0.4), t_mag), rng)
        st = -_unit(qrs_waves[-1].vector) * rng.uniform(0.02, 0.06)
    else:
        t_axis = float(np.clip(axis + rng.normal(-10.0, 12.0), -10.0, 90.0))
        t = _perturb(_vec(t_axis, rng.uniform(0.2, 0.6), t_mag), rng)
    if dx == "ST depression":
        a = np.deg2rad(rng.uniform(20.0, 60.0))
        st = st + _scaled(-np.array([np.cos(a), np.sin(a), 0.1]), -rng.uniform(0.10, 0.25),
                          (0, 1, 5, 9, 10, 11))
    if heart.sex == "M":
        st = st + _scaled(np.array([0.3, 0.1, 1.0]), rng.uniform(0.03, 0.10), (7, 8))
    return t, st


def _pvc(amp: float, qtc: float, rng: np.random.Generator) -> _Physiology:
    """Unifocal ventricular ectopic: two broad vectors of a random focus, discordant ST-T."""
    first = _vec(rng.uniform(-180.0, 180.0), rng.uniform(-1.0, 1.0), amp * rng.uniform(1.2, 1.7))
    second = _perturb(first, rng, deg=60.0, amp_sd=0.1) * 0.5
    mean_dir = _unit(first + 0.5 * second)
    waves = [_Wave(0.36, 0.145, first), _Wave(0.70, 0.12, second)]
    return _Physiology(
        pr=0.0, p_dur=0.0, qrs=rng.uniform(0.140, 0.180), qtc=qtc + 0.04, p_waves=[],
        qrs_waves=waves, fiducial=0.36, t_vector=-mean_dir * rng.uniform(0.4, 0.7),
        t_width=1.3, st_vector=-mean_dir * rng.uniform(0.1, 0.2), u_vector=np.zeros(3),
        u_delay=0.07, precordial_gain=1.0, rsa=0.0,
    )


def _draw_physiology(heart: Heart, rng: np.random.Generator) -> _Physiology:
    """All per-ECG morphology: baseline physiology, then age, sex, potassium and diagnosis."""
    dx, older = heart.diagnosis, max(heart.age - 40.0, 0.0)
    pr = _truncnorm(rng, 0.150 + 0.0005 * (heart.age - 40.0), 0.018, 0.120, 0.200)
    if dx == "1st degree AV block":
        pr = rng.uniform(0.210, 0.320)
    qtc_mean = 0.400 + (0.015 if heart.sex == "F" else 0.0) + 0.0003 * (heart.age - 40.0)
    qtc = _truncnorm(rng, qtc_mean, 0.012, 0.370, 0.460)
    if dx == "Prolonged QT":
        qtc = rng.uniform(0.480, 0.560)
    p_dur = _truncnorm(rng, 0.100, 0.010, 0.080, 0.120)
    qrs = _qrs_duration(heart, rng)
    axis = _frontal_axis(heart, rng)
    amp = 1.15 * rng.lognormal(0.0, 0.18) * (1.0 - 0.004 * older)
    amp *= {"Left ventricular hypertrophy": rng.uniform(1.8, 2.5),
            "Low QRS voltage": rng.uniform(0.30, 0.45),
            "Left bundle branch block": 1.2}.get(dx, 1.0)
    qrs_waves, fiducial = _qrs_complex(heart, axis, amp, rng)
    p_waves = _p_waves(rng)
    t, st = _repolarisation(heart, axis, qrs_waves, rng)
    youth = np.clip((95.0 - heart.age) / 77.0, 0.0, 1.0)
    rsa = 0.01 + 0.04 * youth * rng.uniform(0.5, 1.0)
    phys = _Physiology(
        pr=pr, p_dur=p_dur, qrs=qrs, qtc=qtc, p_waves=p_waves, qrs_waves=qrs_waves,
        fiducial=fiducial, t_vector=t, t_width=1.0, st_vector=st, u_vector=np.zeros(3),
        u_delay=rng.uniform(0.05, 0.09), precordial_gain=1.2 if heart.sex == "M" else 1.0,
        rsa=rsa,
    )
    _apply_potassium(phys, heart.potassium, rng)
    _apply_rhythm(phys, heart, amp, rng)
    return phys


def _apply_potassium(phys: _Physiology, potassium: str, rng: np.random.Generator) -> None:
    if potassium == "high":
        phys.t_vector = phys.t_vector * rng.uniform(2.0, 3.0)
        phys.t_width = rng.uniform(0.55, 0.65)
        phys.qrs *= rng.uniform(1.2, 1.4)
        flat = rng.uniform(0.2, 0.5)
        phys.p_waves = [_Wave(w.centre, w.sigma, w.vector * flat) for w in phys.p_waves]
        phys.p_dur *= 1.2
    elif potassium == "low":
        t_dir = _unit(phys.t_vector)
        phys.t_vector = phys.t_vector * rng.uniform(0.25, 0.35)
        depression = _scaled(-t_dir, -rng.uniform(0.04, 0.07), _ALL_LEADS)
        phys.st_vector = phys.st_vector + depression
        phys.u_vector = _scaled(t_dir, rng.uniform(0.08, 0.15), (7, 8, 9))


def _apply_rhythm(phys: _Physiology, heart: Heart, amp: float, rng: np.random.Generator) -> None:
    """Rhythm-specific pieces: RSA strength, ectopic foci, retrograde P, low-voltage P/T."""
    dx = heart.diagnosis
    if dx == "Sinus arrhythmia":
        phys.rsa = rng.uniform(0.10, 0.15)
    elif dx == "Junctional rhythm":
        phys.rsa *= 0.2
        mode = rng.integers(3)
        if mode:
            offset = -rng.uniform(0.06, 0.10) if mode == 1 else rng.uniform(0.06, 0.12)
            vector = _vec(rng.uniform(-90.0, -60.0), rng.uniform(-0.3, 0.3),
                          rng.uniform(0.06, 0.12))
            phys.retro_p = _Wave(offset, 0.018, vector)
    elif dx == "Sinus rhythm with PVCs":
        phys.pvc = _pvc(amp, phys.qtc, rng)
    elif dx == "Sinus rhythm with PACs":
        vector = _vec(rng.uniform(-90.0, 30.0), rng.uniform(-0.8, 0.8), rng.uniform(0.06, 0.12))
        phys.pac_p = _Wave(0.04, 0.016, vector)
        phys.pac_pr = max(0.10, phys.pr * rng.uniform(0.8, 1.1))
    elif dx == "Low QRS voltage":
        scale = rng.uniform(0.6, 0.8)
        phys.t_vector = phys.t_vector * scale
        phys.p_waves = [_Wave(w.centre, w.sigma, w.vector * scale) for w in phys.p_waves]


# ----------------------------------------------------------------------------- beats


def _flutter_ratio(heart_rate: float) -> int:
    """Conduction ratio whose flutter rate is nearest 300/min (inverse of sample_heart_rate)."""
    return min((2, 4), key=lambda k: abs(heart_rate * k - 300.0))


def _beat_train(heart: Heart, phys: _Physiology, rng: np.random.Generator,
                seconds: float) -> _Beats:
    """Ventricular beat times covering [-margin, seconds + margin] and their kinds."""
    dx = heart.diagnosis
    rr0 = 60.0 / heart.heart_rate
    regular = dx in ("Atrial flutter", "Junctional rhythm")
    jitter = rng.uniform(0.002, 0.006) if regular else rng.uniform(0.003, 0.020)
    span = seconds + 2 * _MARGIN_S + 4 * rr0
    count = int(np.ceil(span / rr0 * (2.0 if dx == "Atrial fibrillation" else 1.25))) + 2
    start = -_MARGIN_S - rng.uniform(0.0, rr0)
    if dx == "Atrial fibrillation":
        cv = rng.uniform(0.15, 0.30)
        rr = np.maximum(rng.gamma(1.0 / cv**2, rr0 * cv**2, size=count - 1), 0.33)
    else:
        rsa = 0.0 if dx == "Atrial flutter" else phys.rsa
        nominal = start + rr0 * np.arange(count - 1)
        f_resp, phase = rng.uniform(0.15, 0.35), rng.uniform(0.0, 2 * np.pi)
        rr = rr0 * (1.0 + rsa * np.sin(2 * np.pi * f_resp * nominal + phase))
    times = start + np.concatenate([[0.0], np.cumsum(rr)])
    times += rng.normal(0.0, jitter, size=count)
    kinds = np.full(count, _NO_P if dx in ("Atrial fibrillation", "Atrial flutter",
                                             "Junctional rhythm") else _SINUS)
    if phys.pvc is not None or phys.pac_p is not None:
        _insert_ectopics(times, kinds, rng, seconds, rr0, pvc=phys.pvc is not None)
    keep = times <= seconds + _MARGIN_S
    times, kinds = times[keep], kinds[keep]
    prev_rr = np.diff(times, prepend=times[0] - rr0)
    return _Beats(times, kinds, prev_rr, jitter)


def _insert_ectopics(times: np.ndarray, kinds: np.ndarray, rng: np.random.Generator,
                     seconds: float, rr0: float, pvc: bool) -> None:
    """Make 1-3 non-adjacent beats premature (in place).

    PVC: sinus timing untouched, so the next beat ends a fully compensatory pause.
    PAC: resets the sinus node, so later beats move earlier (non-compensatory pause).
    """
    candidates = np.flatnonzero((times >= 1.5) & (times <= seconds - 0.6))
    candidates = candidates[candidates >= 1][rng.integers(2)::2]
    count = min(int(rng.integers(1, 4)), candidates.size)
    for i in np.sort(rng.choice(candidates, size=count, replace=False)):
        interval = times[i] - times[i - 1]
        early = times[i - 1] + interval * (rng.uniform(0.55, 0.75) if pvc else
                                           rng.uniform(0.60, 0.80))
        if not pvc:
            times[i + 1:] -= times[i] - early - rng.uniform(0.0, 0.12) * rr0
        times[i] = early
        kinds[i] = _PVC if pvc else _PAC


# ----------------------------------------------------------------------------- synthesis


def _gauss(t: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * ((t - c) / s) ** 2)


def _asym_gauss(t: np.ndarray, c: np.ndarray, s_up: np.ndarray,
                s_down: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * ((t - c) / np.where(t < c, s_up, s_down)) ** 2)


def _plateau(t: np.ndarray, a: np.ndarray, b: np.ndarray, wa: np.ndarray,
             wb: np.ndarray) -> np.ndarray:
    return 0.25 * (1.0 + np.tanh((t - a) / wa)) * (1.0 - np.tanh((t - b) / wb))


def _track(n: int, fs: float, lo: np.ndarray, hi: np.ndarray,
           shape: Callable[..., np.ndarray], *params: np.ndarray | float) -> np.ndarray:
    """Sum of one wave type over beats, each evaluated only on its window [lo, hi]."""
    lo, hi = np.broadcast_arrays(lo, hi)
    visible = (hi >= 0.0) & (lo <= (n - 1) / fs)
    if not visible.any():
        return np.zeros(n)
    lo, hi = lo[visible], hi[visible]
    args = [np.broadcast_to(p, visible.shape)[visible][:, None] for p in params]
    start = np.floor(lo * fs).astype(np.int64)
    idx = start[:, None] + np.arange(int(np.ceil((hi - lo).max() * fs)) + 2)
    inside = (idx >= 0) & (idx < n)
    values = shape(idx / fs, *args)
    return np.bincount(idx[inside], weights=values[inside], minlength=n)


def _amp8(vector: np.ndarray, precordial_gain: float = 1.0) -> np.ndarray:
    amp = _LEADS8 @ vector
    amp[_PRECORDIAL] *= precordial_gain
    return amp


def _ventricular(phys: _Physiology, times: np.ndarray, prev_rr: np.ndarray, n: int,
                 fs: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """QRS, ST, T and U tracks of beats sharing one ventricular morphology."""
    if times.size == 0:
        return []
    onset = times - phys.fiducial * phys.qrs
    out = [(_track(n, fs, onset + (w.centre - 4 * w.sigma) * phys.qrs,
                   onset + (w.centre + 4 * w.sigma) * phys.qrs, _gauss,
                   onset + w.centre * phys.qrs, w.sigma * phys.qrs),
            _amp8(w.vector, phys.precordial_gain)) for w in phys.qrs_waves]
    qt = phys.qtc * np.clip(prev_rr, 0.3, 2.0) ** (1.0 / 3.0)
    t_end = onset + qt
    peak = t_end - 0.25 * qt
    s_up, s_down = 0.13 * qt * phys.t_width, 0.10 * qt * phys.t_width
    out.append((_track(n, fs, peak - 4 * s_up, peak + 4 * s_down, _asym_gauss, peak, s_up,
                       s_down), _amp8(phys.t_vector)))
    j_point, st_end, wa = onset + phys.qrs, peak - s_up, 0.006
    out.append((_track(n, fs, j_point - 4 * wa, st_end + 2 * s_up, _plateau, j_point, st_end,
                       wa, 0.5 * s_up), _amp8(phys.st_vector)))
    if phys.u_vector.any():
        centre = t_end + phys.u_delay
        out.append((_track(n, fs, centre - 0.16, centre + 0.16, _gauss, centre, 0.04),
                    _amp8(phys.u_vector)))
    return out


def _atrial(phys: _Physiology, beats: _Beats, n: int,
            fs: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """P-wave tracks: sinus P, ectopic atrial P of PACs, retrograde P of junctional beats."""
    onset = beats.times - phys.fiducial * phys.qrs
    out = []
    sinus = onset[beats.kinds == _SINUS] - phys.pr
    for w in phys.p_waves:
        c, s = sinus + w.centre * phys.p_dur, w.sigma * phys.p_dur
        out.append((_track(n, fs, c - 4 * s, c + 4 * s, _gauss, c, s), _amp8(w.vector)))
    for wave, centre in ((phys.pac_p, onset[beats.kinds == _PAC] - phys.pac_pr),
                         (phys.retro_p, onset[beats.kinds == _NO_P])):
        if wave is not None:
            c = centre + wave.centre
            out.append((_track(n, fs, c - 4 * wave.sigma, c + 4 * wave.sigma, _gauss, c,
                               wave.sigma), _amp8(wave.vector)))
    return out


def _atrial_activity(heart: Heart, beats: _Beats, rng: np.random.Generator, n: int,
                     fs: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Continuous f-waves (AF) or sawtooth F-waves (flutter) over the whole record."""
    t = np.arange(n) / fs
    if heart.diagnosis == "Atrial fibrillation":
        f0, drift, drift_hz = rng.uniform(4.6, 8.4), rng.uniform(0.2, 0.6), rng.uniform(0.05, 0.2)
        p0, p1, p2, p3 = rng.uniform(0.0, 2 * np.pi, size=4)
        freq = f0 + drift * np.sin(2 * np.pi * drift_hz * t + p1)
        phase = 2 * np.pi * np.cumsum(freq) / fs + p0
        envelope = 0.75 + 0.25 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + p2)
        wave = envelope * (np.sin(phase) + 0.25 * np.sin(2 * phase + p3)) / 1.25
        direction = _scaled(np.array([-0.2, 0.5, 1.0]), rng.uniform(0.05, 0.10), _ALL_LEADS)
        return [(wave, _amp8(direction))]
    if heart.diagnosis == "Atrial flutter":
        period = 60.0 / heart.heart_rate / _flutter_ratio(heart.heart_rate)
        rise = rng.uniform(0.6, 0.8)
        ref = beats.times[0] - rng.uniform(0.18, 0.28)
        ph = np.mod((t - ref) / period, 1.0)
        wave = np.where(ph < rise, ph / rise, (1.0 - ph) / (1.0 - rise)) - 0.5
        direction = _scaled(np.array([-0.3, -1.0, 0.5]), -rng.uniform(0.15, 0.30), (1, 2, 5))
        return [(wave, _amp8(direction))]
    return []


# ----------------------------------------------------------------------------- noise


@lru_cache(maxsize=8)
def _emg_filter(fs: float) -> np.ndarray:
    return butter(2, [20.0, min(150.0, 0.45 * fs)], btype="bandpass", fs=fs, output="sos")


_ELECTRODES = 9  # RA, LA, LL, V1..V6
# Recorded leads from electrode potentials: I = LA - RA, II = LL - RA, Vi - Wilson terminal.
_REFERENCE = np.zeros((_ELECTRODES, 8))
_REFERENCE[[1, 0], 0] = 1.0, -1.0
_REFERENCE[[2, 0], 1] = 1.0, -1.0
_REFERENCE[3:, 2:] = np.eye(6)
_REFERENCE[:3, 2:] = -1.0 / 3.0


def _baseline_wander(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Respiration-like sinusoids plus a random walk, built on 0.25-s knots and splined.

    Everything below 0.5 Hz is smooth on that grid, so only the spline touches every sample.
    """
    knots = np.arange(0.0, t[-1] + 0.5, 0.25)
    freqs = rng.uniform(0.05, 0.5, size=(3, _ELECTRODES))
    phases = rng.uniform(0.0, 2 * np.pi, size=(3, _ELECTRODES))
    weights = rng.uniform(0.2, 1.0, size=(3, _ELECTRODES))
    values = np.einsum("ke,nke->ne", weights,
                       np.sin(2 * np.pi * freqs * knots[:, None, None] + phases))
    values += np.cumsum(rng.normal(0.0, 0.25, size=values.shape), axis=0)
    values -= values.mean(axis=0)
    values *= (rng.uniform(0.05, 0.3) * rng.uniform(0.6, 1.0, size=_ELECTRODES)
               / np.abs(values).max(axis=0))
    return CubicSpline(knots, values, axis=0)(t)


def _mains(rng: np.random.Generator, t: np.ndarray, mains_hz: float) -> np.ndarray:
    """Hum of nearly common phase: sin(wt + p) = sin(wt)cos(p) + cos(wt)sin(p)."""
    phase = rng.uniform(0.0, 2 * np.pi) + rng.normal(0.0, 0.3, size=_ELECTRODES)
    amp = rng.uniform(0.005, 0.03) * rng.uniform(0.2, 1.0, size=_ELECTRODES)
    wt = 2 * np.pi * mains_hz * t
    return np.outer(np.sin(wt), amp * np.cos(phase)) + np.outer(np.cos(wt), amp * np.sin(phase))


def _emg(rng: np.random.Generator, t: np.ndarray, fs: float) -> np.ndarray:
    """Band-passed Gaussian muscle noise, sometimes with one burst (e.g. a movement)."""
    emg = sosfilt(_emg_filter(fs), rng.normal(size=(t.size, _ELECTRODES)), axis=0)
    emg *= rng.uniform(0.003, 0.03) * rng.uniform(0.5, 1.0, size=_ELECTRODES) / emg.std(axis=0)
    if rng.uniform() < 0.3:
        centre, half = rng.uniform(0.0, t[-1]), rng.uniform(0.25, 1.0)
        bump = np.sin(0.5 * np.pi * np.clip(1.0 - np.abs(t - centre) / half, 0.0, 1.0)) ** 2
        emg *= (1.0 + (rng.uniform(2.0, 5.0) - 1.0) * bump)[:, None]
    return emg


def _electrode_noise(rng: np.random.Generator, n: int, fs: float, mains_hz: float) -> np.ndarray:
    """Noise of the 9 electrodes, referenced into the 8 recorded leads like a real recorder."""
    t = np.arange(n) / fs
    electrodes = _baseline_wander(rng, t) + _mains(rng, t, mains_hz) + _emg(rng, t, fs)
    electrodes += rng.normal(0.0, rng.uniform(0.002, 0.01), size=electrodes.shape)
    return electrodes @ _REFERENCE


# ----------------------------------------------------------------------------- render


def _derive(s8: np.ndarray) -> np.ndarray:
    """12 standard leads from I, II, V1..V6 (last axis): Einthoven and Goldberger."""
    lead1, lead2 = s8[..., 0], s8[..., 1]
    limb = np.stack([lead1, lead2, lead2 - lead1, -(lead1 + lead2) / 2.0, lead1 - lead2 / 2.0,
                     lead2 - lead1 / 2.0], axis=-1)
    return np.concatenate([limb, s8[..., 2:]], axis=-1)


def _check_diagnosis(diagnosis: str) -> None:
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"unknown diagnosis {diagnosis!r}")


def _check(heart: Heart) -> None:
    _check_diagnosis(heart.diagnosis)
    if heart.sex not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', got {heart.sex!r}")
    if heart.potassium not in POTASSIUM_LEVELS:
        raise ValueError(f"potassium must be one of {POTASSIUM_LEVELS}, got {heart.potassium!r}")
    if not heart.heart_rate > 0:
        raise ValueError(f"heart_rate must be positive, got {heart.heart_rate!r}")


def render(heart: Heart, rng: np.random.Generator, fs: int = 500, seconds: float = 10.0,
           mains_hz: float = 60.0, noise: bool = True) -> Rendered:
    """Render one ECG (mV, columns in STANDARD_LEADS order) expressing ``heart``.

    ``noise=False`` returns the clean heart-vector signal; with the same generator state it
    equals the noisy render minus its noise, because noise is drawn last.
    """
    _check(heart)
    n = round(seconds * fs)
    phys = _draw_physiology(heart, rng)
    beats = _beat_train(heart, phys, rng, seconds)
    is_pvc = beats.kinds == _PVC
    tracks = (_atrial(phys, beats, n, fs)
              + _ventricular(phys, beats.times[~is_pvc], beats.prev_rr[~is_pvc], n, fs)
              + _atrial_activity(heart, beats, rng, n, fs))
    if phys.pvc is not None:
        tracks += _ventricular(phys.pvc, beats.times[is_pvc], beats.prev_rr[is_pvc], n, fs)
    s8 = np.column_stack([track for track, _ in tracks]) @ np.array([amp for _, amp in tracks])
    if noise:
        s8 += _electrode_noise(rng, n, fs, mains_hz)
    index = np.rint(beats.times * fs).astype(np.int64)
    inside = (index >= 0) & (index < n)
    beat_times = beats.times[inside]
    rr_ms = float(np.mean(np.diff(beat_times)) * 1000.0) if beat_times.size > 1 else float("nan")
    return Rendered(signal=_derive(s8), r_peaks=index[inside], beat_times=beat_times,
                    rr_ms=rr_ms, beat_jitter_ms=beats.jitter_s * 1000.0)

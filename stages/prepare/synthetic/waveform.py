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

Baseline physiology (before labels; a subject's ``Body`` adds its own offsets, see
``population``): PR 152 ms + 0.4 ms/year from age 40 (SD 8 per ECG); P 100 ms; QRS 88 ms
(SD 4); QTc 405 ms + 0.25 ms/year (SD 8); frontal QRS axis 60 - 0.5*(age - 20) deg (SD 8).
The body also rotates the heart in the torso and sets each lead's gain, so the same heart
projects differently onto the leads of different people.

Label traces (what a model can learn from; effect sizes and sources in ``population``)
------------------------------------------------------------------------------------
=================================  ===========================================================
label                              trace in the waveform
=================================  ===========================================================
age                                QRS amplitude -0.5 %/year and T -0.4 %/year above 40; axis
                                   -0.5 deg/year; PR +0.4 ms/year; QTc +0.25 ms/year; less
                                   RSA; rate -0.1 bpm/year; more conditions (AF, blocks, LVH)
sex (body traits)                  men: precordial voltage x1.25, QRS +8 ms, PR +4 ms, T
                                   x1.25, J-point elevation in V2-V3 ~0.1 mV falling with age
                                   (women ~0.04); women: QTc +15 ms, rate +3 bpm. All overlap:
                                   between-subject SDs are as large as the differences
potassium (mmol/L, graded)         from 4.8: T taller by x(1 + 1.6..2.4 * dK) and narrower;
                                   from 6.0: wider QRS, flatter, wider P. Below 3.8: T
                                   flatter, ST depression, U wave, longer QT. Scaled by the
                                   subject's sensitivity, 0 (silent) for 20 % of subjects
Sinus rhythm                       rate 54-106 (the cart names brady/tachy by measured rate)
Sinus bradycardia / tachycardia    rate 40-64 / 95-150
Atrial fibrillation                no P; RR i.i.d. gamma with CV 15-30 %; f-waves 4-9 Hz,
                                   0.05-0.10 mV, largest in V1 and the inferior leads
Atrial flutter                     no P; sawtooth F-waves 250-350/min, 0.15-0.30 mV
                                   peak-to-peak, negative in II/III/aVF, positive in V1;
                                   regular 2:1 (rate >= 125) or 4:1 conduction
Sinus rhythm with PVCs             1-3 premature beats (coupling 55-75 % of RR), no P, QRS
                                   140-180 ms from two broad vectors of one random focus,
                                   discordant ST-T, fully compensatory pause
Left bundle branch block           QRS 112-170 ms, no septal q, two leftward-posterior vectors
                                   35 % of the QRS apart (broad notched R in I/aVL/V5/V6, QS/rS
                                   in V1), ST-T opposite to the QRS vector
Right bundle branch block          QRS 106-150 ms, normal early QRS plus a late right-anterior
                                   vector (rsR' in V1-V2, wide S in I/V6), T inverted in V1-V2
1st degree AV block                PR 188 ms + gamma (mean 228 ms, at most 340)
Left ventricular hypertrophy       QRS voltage x1.4-2.3, QRS +10 ms, axis -10 deg, more
                                   posterior R; strain in 60 %: ST-T opposite to R
ST depression                      horizontal ST plateau, deepest lateral/inferior lead
                                   -0.06..-0.25 mV (mirror elevation in aVR)
Low QRS voltage                    QRS x0.30-0.55 (P and T x0.6-0.8)
Sinus arrhythmia                   RSA 10-15 % of RR
Sinus rhythm with PACs             1-3 early beats (coupling 60-80 % of RR), normal QRS, P of an
                                   ectopic focus (axis -90..+30 deg), sinus reset (non-
                                   compensatory pause)
Junctional rhythm                  rate 38-66, almost no RSA; no P, or a retrograde P (axis
                                   -60..-90 deg) 60-100 ms before or 60-120 ms after QRS onset
Left anterior fascicular block     frontal QRS axis -80..-38 deg, inferior-rightward initial
                                   vector (qR in I/aVL, rS in II/III/aVF), QRS +10 ms
Prolonged QT                       QTc 445-540 ms
Right axis deviation               frontal QRS axis +85..+150 deg
=================================  ===========================================================

Conditions other than rhythms may also be secondary findings of an ECG (``Heart.secondary``)
and leave the same traces. Which statement the cart writes first is decided by
``reading`` from noisy measurements, so the drawn ranges above straddle its thresholds.

Individual variability within a subject: wave vectors get random rotations (SD 8 deg) and
log-normal amplitude factors (SD ~15-20 %); intervals and axes are drawn per ECG around
the subject's own values.

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

# Rhythms: only the primary condition sets the rhythm; every other condition may also be
# a secondary finding of an ECG (see Heart.secondary).
RHYTHMS: frozenset[str] = frozenset({
    "Sinus rhythm", "Sinus bradycardia", "Sinus tachycardia", "Atrial fibrillation",
    "Atrial flutter", "Sinus rhythm with PVCs", "Sinus arrhythmia", "Sinus rhythm with PACs",
    "Junctional rhythm",
})
POTASSIUM_RANGE = (1.5, 9.5)  # mmol/L accepted by render()

# Ventricular rate (mean for a 50-year-old man, SD, min, max) in bpm. The sinus ranges
# straddle the 60 and 100 bpm thresholds: the cart names the rate it measures, not the draw.
_RATE: dict[str, tuple[float, float, float, float]] = {
    "Sinus rhythm": (74.0, 10.0, 54.0, 106.0),
    "Sinus bradycardia": (54.0, 4.5, 40.0, 64.0),
    "Sinus tachycardia": (112.0, 11.0, 95.0, 150.0),
    "Atrial fibrillation": (92.0, 20.0, 50.0, 160.0),
    "Junctional rhythm": (50.0, 5.0, 38.0, 66.0),
}
_DEFAULT_RATE = (74.0, 9.0, 54.0, 106.0)
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
_LIMB12 = (0, 1, 2, 3, 4, 5)
_ALL_LEADS = (*_LIMB12, 6, 7, 8, 9, 10, 11)

_SINUS, _PAC, _PVC, _NO_P = 0, 1, 2, 3
_MARGIN_S = 1.2  # beats rendered beyond both ends so every wave near the edges is complete


@dataclass(frozen=True)
class Body:
    """One subject's traits, shared by all of their ECGs (``population.draw_body``).

    The neutral body (the defaults) is the textbook heart in the textbook torso.
    """

    transverse_deg: float = 0.0     # heart rotation about the long (inferior) axis
    tilt_deg: float = 0.0           # rotation about the left-right axis
    limb_gain: float = 1.0          # limb-lead amplitude (torso conductivity, habitus)
    precordial_gain: tuple[float, ...] = (1.0,) * 6  # V1..V6: electrode distance, placement
    rate_offset: float = 0.0        # bpm, on top of the rhythm's own rate
    pr_offset: float = 0.0          # s
    qrs_offset: float = 0.0         # s
    qtc_offset: float = 0.0         # s
    axis_offset: float = 0.0        # deg, frontal QRS axis
    t_gain: float = 1.0             # T-wave amplitude
    j_point: float = 0.0            # mV of J-point/ST elevation in V2-V3
    k_sensitivity: float = 1.0      # 0: potassium leaves no trace in this subject's ECG


@dataclass(frozen=True)
class Heart:
    """Ground truth of one ECG; render() expresses every field in the waveform.

    ``diagnosis`` is the primary condition (it alone sets the rhythm); ``secondary`` holds
    further non-rhythm conditions. ``potassium`` is the serum level in mmol/L.
    """

    diagnosis: str
    heart_rate: float
    age: float
    sex: str
    potassium: float
    body: Body = Body()
    secondary: tuple[str, ...] = ()

    def has(self, condition: str) -> bool:
        return condition == self.diagnosis or condition in self.secondary


@dataclass
class Rendered:
    """A rendered ECG and the beat timing the renderer used."""

    signal: np.ndarray
    r_peaks: np.ndarray
    beat_times: np.ndarray
    rr_ms: float
    beat_jitter_ms: float
    measures: dict[str, float]


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
    leads: np.ndarray
    rsa: float
    st_depression: float = 0.0
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


def sample_heart_rate(diagnosis: str, age: float, sex: str, rng: np.random.Generator,
                      offset: float = 0.0) -> float:
    """Draw a ventricular rate (bpm) plausible for the diagnosis.

    Slower with age (-0.1 bpm/year around 50), faster in women (+3 bpm) and by the subject's
    own ``offset``, within the diagnosis range. Flutter rates come from a flutter circuit of
    250-350/min conducted 2:1 (70 %) or 4:1, so render() can recover the conduction ratio.
    """
    _check_diagnosis(diagnosis)
    if diagnosis == "Atrial flutter":
        flutter = rng.uniform(*_FLUTTER_RATE_BPM)
        return float(flutter / (2.0 if rng.uniform() < 0.7 else 4.0))
    mean, sd, lo, hi = _RATE.get(diagnosis, _DEFAULT_RATE)
    mean += -0.1 * (age - 50.0) + (3.0 if sex == "F" else 0.0) + offset
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
    """Drawn axis; the ranges of axis labels straddle the cart's thresholds (-45, +90)."""
    if heart.has("Left anterior fascicular block"):
        return rng.uniform(-80.0, -38.0)
    if heart.has("Right axis deviation"):
        return rng.uniform(85.0, 150.0)
    offset = heart.body.axis_offset
    if heart.has("Left bundle branch block"):
        return _truncnorm(rng, 15.0 + offset, 20.0, -40.0, 80.0)
    axis = _truncnorm(rng, 60.0 - 0.5 * (heart.age - 20.0) + offset, 8.0, -40.0, 105.0)
    return axis - 10.0 if heart.has("Left ventricular hypertrophy") else axis


def _qrs_complex(heart: Heart, axis: float, amp: float,
                 rng: np.random.Generator) -> tuple[list[_Wave], float]:
    """QRS waves (centre/sigma as fractions of QRS duration) and the R fiducial fraction."""
    if heart.has("Left bundle branch block"):
        # Septum then free wall, both leftward-posterior; the later one dominates every lead.
        z = rng.uniform(-0.9, -0.5)
        r1 = _vec(axis - 10.0, z, rng.uniform(0.6, 0.75) * amp)
        r2 = _vec(axis + 5.0, z, amp)
        initial = _vec(axis, 1.0, amp * rng.uniform(0.0, 0.12))
        return [_Wave(0.10, 0.04, initial), _Wave(0.33, 0.11, r1), _Wave(0.68, 0.11, r2)], 0.68
    lafb = heart.has("Left anterior fascicular block")
    q_axis = rng.uniform(110.0, 130.0) if lafb else axis + rng.uniform(90.0, 130.0)
    q = _perturb(_vec(q_axis, rng.uniform(0.6, 1.2), amp * rng.uniform(0.12, 0.22)), rng)
    lvh = heart.has("Left ventricular hypertrophy")
    # Apical (left-anterior) then lateral (left-posterior) activation: R-wave progression.
    apex = _vec(axis, rng.uniform(-0.1, 0.15) if lvh else rng.uniform(0.1, 0.4), 0.6 * amp)
    lateral = _vec(axis, rng.uniform(-1.3, -0.9) if lvh else rng.uniform(-0.9, -0.5), 0.6 * amp)
    s = _perturb(_vec(axis + 180.0 + rng.uniform(-25.0, 25.0), -rng.uniform(0.8, 1.4),
                      amp * rng.uniform(0.2, 0.35)), rng)
    if heart.has("Right bundle branch block"):
        late = _vec(180.0 + rng.uniform(-20.0, 20.0), rng.uniform(0.8, 1.4),
                    amp * rng.uniform(0.45, 0.65))
        return [_Wave(0.12, 0.045, q), _Wave(0.27, 0.07, apex), _Wave(0.35, 0.07, lateral),
                _Wave(0.52, 0.055, 0.7 * s), _Wave(0.80, 0.075, late)], 0.31
    return [_Wave(0.18, 0.07, q), _Wave(0.42, 0.09, apex), _Wave(0.54, 0.09, lateral),
            _Wave(0.76, 0.08, s)], 0.48


def _qrs_duration(heart: Heart, rng: np.random.Generator) -> float:
    """Blocks straddle the cart's 120-ms threshold (incomplete blocks are read as such)."""
    if heart.has("Left bundle branch block"):
        return rng.uniform(0.112, 0.170)
    if heart.has("Right bundle branch block"):
        return rng.uniform(0.106, 0.150)
    base = _truncnorm(rng, 0.088 + heart.body.qrs_offset, 0.004, 0.070, 0.115)
    wider = heart.has("Left ventricular hypertrophy") or heart.has(
        "Left anterior fascicular block")
    return base + (0.010 if wider else 0.0)


def _p_waves(rng: np.random.Generator) -> list[_Wave]:
    """Right- then left-atrial vectors: biphasic P in V1, upright P in II."""
    ra = _perturb(_vec(rng.uniform(60.0, 80.0), 0.5, rng.uniform(0.07, 0.10)), rng)
    la = _perturb(_vec(rng.uniform(30.0, 60.0), -0.6, rng.uniform(0.06, 0.09)), rng)
    return [_Wave(0.38, 0.15, ra), _Wave(0.62, 0.15, la)]


def _repolarisation(heart: Heart, axis: float, qrs_waves: list[_Wave],
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """T and ST vectors (concordant normally, opposite to the QRS in LBBB and LVH strain)
    and the depth of ischaemic ST depression (mV, 0 when none)."""
    mean_qrs = _unit(sum(w.vector * w.sigma for w in qrs_waves))
    t_mag = rng.uniform(0.22, 0.40) * heart.body.t_gain * (1.0 - 0.004 * max(heart.age - 40, 0))
    st = np.zeros(3)
    if heart.has("Left bundle branch block"):
        t = -mean_qrs * rng.uniform(0.35, 0.6)
        st = -mean_qrs * rng.uniform(0.08, 0.15)
    elif heart.has("Left ventricular hypertrophy") and rng.uniform() < 0.6:  # strain pattern
        t = -mean_qrs * rng.uniform(0.15, 0.35)
        st = -mean_qrs * rng.uniform(0.05, 0.12)
    elif heart.has("Right bundle branch block"):
        t = _perturb(_vec(axis - 10.0, rng.uniform(-0.7, -0.4), t_mag), rng)
        st = -_unit(qrs_waves[-1].vector) * rng.uniform(0.02, 0.06)
    else:
        t_axis = float(np.clip(axis + rng.normal(-10.0, 12.0), -10.0, 90.0))
        t = _perturb(_vec(t_axis, rng.uniform(0.2, 0.6), t_mag), rng)
    depth = 0.0
    if heart.has("ST depression"):
        a = np.deg2rad(rng.uniform(20.0, 60.0))
        depth = rng.uniform(0.06, 0.25)
        st = st + _scaled(-np.array([np.cos(a), np.sin(a), 0.1]), -depth, (0, 1, 5, 9, 10, 11))
    if heart.body.j_point > 0:
        st = st + _scaled(np.array([0.3, 0.1, 1.0]), heart.body.j_point, (7, 8))
    return t, st, depth


def _pvc(amp: float, qtc: float, leads: np.ndarray, rng: np.random.Generator) -> _Physiology:
    """Unifocal ventricular ectopic: two broad vectors of a random focus, discordant ST-T."""
    first = _vec(rng.uniform(-180.0, 180.0), rng.uniform(-1.0, 1.0), amp * rng.uniform(1.2, 1.7))
    second = _perturb(first, rng, deg=60.0, amp_sd=0.1) * 0.5
    mean_dir = _unit(first + 0.5 * second)
    waves = [_Wave(0.36, 0.145, first), _Wave(0.70, 0.12, second)]
    return _Physiology(
        pr=0.0, p_dur=0.0, qrs=rng.uniform(0.140, 0.180), qtc=qtc + 0.04, p_waves=[],
        qrs_waves=waves, fiducial=0.36, t_vector=-mean_dir * rng.uniform(0.4, 0.7),
        t_width=1.3, st_vector=-mean_dir * rng.uniform(0.1, 0.2), u_vector=np.zeros(3),
        u_delay=0.07, leads=leads, rsa=0.0,
    )


def lead_matrix(body: Body) -> np.ndarray:
    """(8, 3) projection of a heart vector onto I, II, V1..V6 for this subject's torso."""
    a, b = np.deg2rad(body.transverse_deg), np.deg2rad(body.tilt_deg)
    about_y = np.array([[np.cos(a), 0.0, -np.sin(a)], [0.0, 1.0, 0.0],
                        [np.sin(a), 0.0, np.cos(a)]])
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)],
                        [0.0, np.sin(b), np.cos(b)]])
    gain = np.array([body.limb_gain, body.limb_gain, *body.precordial_gain])
    return gain[:, None] * (_LEADS8 @ about_y @ about_x)


def _draw_physiology(heart: Heart, rng: np.random.Generator) -> _Physiology:
    """All per-ECG morphology: the subject's body, age, conditions, then potassium."""
    body, older = heart.body, max(heart.age - 40.0, 0.0)
    pr = _truncnorm(rng, 0.152 + 0.0004 * (heart.age - 40.0) + body.pr_offset, 0.008,
                    0.105, 0.230)
    if heart.has("1st degree AV block"):
        pr = min(0.188 + rng.gamma(2.0, 0.02), 0.340)
    qtc = _truncnorm(rng, 0.405 + 0.00025 * (heart.age - 40.0) + body.qtc_offset, 0.008,
                     0.350, 0.480)
    if heart.has("Prolonged QT"):
        qtc = rng.uniform(0.445, 0.540)
    p_dur = _truncnorm(rng, 0.100 + 0.0002 * older, 0.010, 0.080, 0.125)
    qrs = _qrs_duration(heart, rng)
    axis = _frontal_axis(heart, rng)
    amp = 1.15 * rng.lognormal(0.0, 0.08) * (1.0 - 0.005 * older)
    if heart.has("Left ventricular hypertrophy"):
        amp *= rng.uniform(1.4, 2.3)
    elif heart.has("Low QRS voltage"):
        amp *= rng.uniform(0.30, 0.55)
    if heart.has("Left bundle branch block"):
        amp *= 1.2
    qrs_waves, fiducial = _qrs_complex(heart, axis, amp, rng)
    p_waves = _p_waves(rng)
    t, st, depth = _repolarisation(heart, axis, qrs_waves, rng)
    youth = np.clip((95.0 - heart.age) / 77.0, 0.0, 1.0)
    rsa = 0.01 + 0.04 * youth * rng.uniform(0.5, 1.0)
    phys = _Physiology(
        pr=pr, p_dur=p_dur, qrs=qrs, qtc=qtc, p_waves=p_waves, qrs_waves=qrs_waves,
        fiducial=fiducial, t_vector=t, t_width=1.0, st_vector=st, u_vector=np.zeros(3),
        u_delay=rng.uniform(0.05, 0.09), leads=lead_matrix(body), rsa=rsa,
        st_depression=depth,
    )
    _apply_potassium(phys, heart.potassium, body.k_sensitivity, rng)
    _apply_rhythm(phys, heart, amp, rng)
    return phys


def _apply_potassium(phys: _Physiology, potassium: float, sensitivity: float,
                     rng: np.random.Generator) -> None:
    """Graded signs: T peaking from 4.8 mmol/L, wider QRS and flat P from 6.0; below 3.8 T
    flattening, ST depression, U waves and a longer apparent QT (T-U fusion).
    ``sensitivity`` 0 leaves the ECG silent."""
    high = sensitivity * max(potassium - 4.8, 0.0)
    low = sensitivity * max(3.8 - potassium, 0.0)
    if high > 0:
        phys.t_vector = phys.t_vector * (1.0 + rng.uniform(1.6, 2.4) * high)
        phys.t_width = 1.0 / (1.0 + 0.6 * high)
        severe = sensitivity * max(potassium - 6.0, 0.0)
        phys.qrs *= 1.0 + 0.15 * severe
        flat = max(1.0 - 0.5 * severe, 0.2)
        phys.p_waves = [_Wave(w.centre, w.sigma, w.vector * flat) for w in phys.p_waves]
        phys.p_dur *= 1.0 + 0.1 * severe
    elif low > 0:
        t_dir = _unit(phys.t_vector)
        phys.t_vector = phys.t_vector * max(1.0 - rng.uniform(0.9, 1.3) * low, 0.15)
        depression = _scaled(-t_dir, -min(0.08 * low, 0.12), _ALL_LEADS)
        phys.st_vector = phys.st_vector + depression
        phys.u_vector = _scaled(t_dir, min(0.15 * low, 0.25), (7, 8, 9))
        phys.qtc += 0.03 * low


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
        phys.pvc = _pvc(amp, phys.qtc, phys.leads, rng)
    elif dx == "Sinus rhythm with PACs":
        vector = _vec(rng.uniform(-90.0, 30.0), rng.uniform(-0.8, 0.8), rng.uniform(0.06, 0.12))
        phys.pac_p = _Wave(0.04, 0.016, vector)
        phys.pac_pr = max(0.10, phys.pr * rng.uniform(0.8, 1.1))
    if heart.has("Low QRS voltage"):
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


def _amp8(vector: np.ndarray, leads: np.ndarray) -> np.ndarray:
    return leads @ vector


def _ventricular(phys: _Physiology, times: np.ndarray, prev_rr: np.ndarray, n: int,
                 fs: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """QRS, ST, T and U tracks of beats sharing one ventricular morphology."""
    if times.size == 0:
        return []
    onset = times - phys.fiducial * phys.qrs
    out = [(_track(n, fs, onset + (w.centre - 4 * w.sigma) * phys.qrs,
                   onset + (w.centre + 4 * w.sigma) * phys.qrs, _gauss,
                   onset + w.centre * phys.qrs, w.sigma * phys.qrs),
            _amp8(w.vector, phys.leads)) for w in phys.qrs_waves]
    qt = phys.qtc * np.clip(prev_rr, 0.3, 2.0) ** (1.0 / 3.0)
    t_end = onset + qt
    peak = t_end - 0.25 * qt
    s_up, s_down = 0.13 * qt * phys.t_width, 0.10 * qt * phys.t_width
    out.append((_track(n, fs, peak - 4 * s_up, peak + 4 * s_down, _asym_gauss, peak, s_up,
                       s_down), _amp8(phys.t_vector, phys.leads)))
    j_point, st_end, wa = onset + phys.qrs, peak - s_up, 0.006
    out.append((_track(n, fs, j_point - 4 * wa, st_end + 2 * s_up, _plateau, j_point, st_end,
                       wa, 0.5 * s_up), _amp8(phys.st_vector, phys.leads)))
    if phys.u_vector.any():
        centre = t_end + phys.u_delay
        out.append((_track(n, fs, centre - 0.16, centre + 0.16, _gauss, centre, 0.04),
                    _amp8(phys.u_vector, phys.leads)))
    return out


def _atrial(phys: _Physiology, beats: _Beats, n: int,
            fs: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """P-wave tracks: sinus P, ectopic atrial P of PACs, retrograde P of junctional beats."""
    onset = beats.times - phys.fiducial * phys.qrs
    out = []
    sinus = onset[beats.kinds == _SINUS] - phys.pr
    for w in phys.p_waves:
        c, s = sinus + w.centre * phys.p_dur, w.sigma * phys.p_dur
        out.append((_track(n, fs, c - 4 * s, c + 4 * s, _gauss, c, s), _amp8(w.vector, phys.leads)))
    for wave, centre in ((phys.pac_p, onset[beats.kinds == _PAC] - phys.pac_pr),
                         (phys.retro_p, onset[beats.kinds == _NO_P])):
        if wave is not None:
            c = centre + wave.centre
            out.append((_track(n, fs, c - 4 * wave.sigma, c + 4 * wave.sigma, _gauss, c,
                               wave.sigma), _amp8(wave.vector, phys.leads)))
    return out


def _atrial_activity(heart: Heart, beats: _Beats, leads: np.ndarray, rng: np.random.Generator,
                     n: int, fs: float) -> list[tuple[np.ndarray, np.ndarray]]:
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
        return [(wave, _amp8(direction, leads))]
    if heart.diagnosis == "Atrial flutter":
        period = 60.0 / heart.heart_rate / _flutter_ratio(heart.heart_rate)
        rise = rng.uniform(0.6, 0.8)
        ref = beats.times[0] - rng.uniform(0.18, 0.28)
        ph = np.mod((t - ref) / period, 1.0)
        wave = np.where(ph < rise, ph / rise, (1.0 - ph) / (1.0 - rise)) - 0.5
        direction = _scaled(np.array([-0.3, -1.0, 0.5]), -rng.uniform(0.15, 0.30), (1, 2, 5))
        return [(wave, _amp8(direction, leads))]
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
    for condition in heart.secondary:
        _check_diagnosis(condition)
        if condition in RHYTHMS:
            raise ValueError(f"a rhythm ({condition!r}) can only be the primary diagnosis")
    if heart.sex not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', got {heart.sex!r}")
    lo, hi = POTASSIUM_RANGE
    if not (isinstance(heart.potassium, int | float) and lo <= heart.potassium <= hi):
        raise ValueError(f"potassium must be a level in mmol/L within {lo}-{hi}, "
                         f"got {heart.potassium!r}")
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
              + _atrial_activity(heart, beats, phys.leads, rng, n, fs))
    if phys.pvc is not None:
        tracks += _ventricular(phys.pvc, beats.times[is_pvc], beats.prev_rr[is_pvc], n, fs)
    s8 = np.column_stack([track for track, _ in tracks]) @ np.array([amp for _, amp in tracks])
    index = np.rint(beats.times * fs).astype(np.int64)
    inside = (index >= 0) & (index < n)
    beat_times = beats.times[inside]
    rr_ms = float(np.mean(np.diff(beat_times)) * 1000.0) if beat_times.size > 1 else float("nan")
    measures = _measures(phys, s8, index[inside & (beats.kinds != _PVC)], fs, rr_ms)
    if noise:
        s8 += _electrode_noise(rng, n, fs, mains_hz)
    return Rendered(signal=_derive(s8), r_peaks=index[inside], beat_times=beat_times,
                    rr_ms=rr_ms, beat_jitter_ms=beats.jitter_s * 1000.0, measures=measures)


def _measures(phys: _Physiology, s8: np.ndarray, peaks: np.ndarray, fs: int,
              rr_ms: float) -> dict[str, float]:
    """The true values a cart's interpretation reads (``reading.read_statements``).

    Voltages come from the clean signal around each conducted R-peak (+-60 ms), so they
    include what the subject's torso did to the heart's vectors.
    """
    mean_qrs = sum(w.vector * w.sigma for w in phys.qrs_waves)
    lead1, lead2 = phys.leads[:2] @ mean_qrs
    half = round(0.06 * fs)
    windows = [s8[max(p - half, 0): p + half] for p in peaks]
    windows = [w for w in windows if len(w)] or [s8]
    limb = [np.ptp(_derive(w)[:, :6], axis=0).max() for w in windows]
    sokolow = [-w[:, 2].min() + max(w[:, 6].max(), w[:, 7].max()) for w in windows]
    return {
        "rate_bpm": 60000.0 / rr_ms, "pr_ms": phys.pr * 1000.0, "qrs_ms": phys.qrs * 1000.0,
        "qtc_ms": phys.qtc * 1000.0,
        "axis_deg": float(np.degrees(np.arctan2((2 * lead2 - lead1) / np.sqrt(3), lead1))),
        "limb_qrs_mv": float(np.median(limb)), "sokolow_mv": float(np.median(sokolow)),
        "st_depression_mv": phys.st_depression, "rsa": phys.rsa,
    }

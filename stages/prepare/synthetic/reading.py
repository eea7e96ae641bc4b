"""The cart's interpretation: statements read from noisy measurements, most important first.

A real machine statement is a threshold on a measurement (PR > 200 ms, QRS >= 120 ms,
SV1 + RV5 > 3.5 mV, ...), and measurements carry error; so a condition drawn near its
threshold may go unnamed, and a healthy heart near it may be named. The first statement is
the primary one (``report_0``, the ``ad`` label). With ``OVERREAD_SWAP`` probability the
over-reading physician promotes the second statement instead, as readers disagree on what
matters most.
"""

from __future__ import annotations

import numpy as np

from stages.prepare.synthetic.waveform import Heart

# Measurement error of the cart (SD), in the units of ``Rendered.measures``.
ERROR = {"rate_bpm": 1.5, "pr_ms": 10.0, "qrs_ms": 6.0, "qtc_ms": 15.0, "axis_deg": 6.0,
         "st_depression_mv": 0.02}
VOLTAGE_ERROR = 0.06  # log-normal SD of voltage measurements
OVERREAD_SWAP = 0.12
_NO_P = ("Atrial fibrillation", "Atrial flutter", "Junctional rhythm")
_ECTOPY = ("Sinus rhythm with PVCs", "Sinus rhythm with PACs", "Sinus arrhythmia")


def measured(measures: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """The true measures plus the cart's error (drawn in a fixed order)."""
    out = dict(measures)
    for name, sd in ERROR.items():
        out[name] = measures[name] + rng.normal(0.0, sd)
    for name in ("limb_qrs_mv", "sokolow_mv"):
        out[name] = measures[name] * rng.lognormal(0.0, VOLTAGE_ERROR)
    return out


def read_statements(heart: Heart, measures: dict[str, float],
                    rng: np.random.Generator) -> list[str]:
    """Statements for one ECG, primary first (see the module docstring)."""
    m = measured(measures, rng)
    rhythm = heart.diagnosis
    if rhythm not in _NO_P and rhythm not in _ECTOPY:
        rhythm = ("Sinus bradycardia" if m["rate_bpm"] < 60 else
                  "Sinus tachycardia" if m["rate_bpm"] > 100 else "Sinus rhythm")
    findings = []
    for block in ("left", "right"):
        if heart.has(f"{block.capitalize()} bundle branch block"):
            complete = m["qrs_ms"] >= 120
            findings.append(f"{'' if complete else 'Incomplete '}{block} bundle branch block"
                            .capitalize())
    lbbb = heart.has("Left bundle branch block")
    if m["sokolow_mv"] > 3.5 and not lbbb:
        findings.append("Left ventricular hypertrophy")
    if m["st_depression_mv"] >= 0.1:
        findings.append("ST depression")
    if rhythm not in _NO_P and m["pr_ms"] > 200:
        findings.append("1st degree AV block")
    if m["qtc_ms"] > 460:
        findings.append("Prolonged QT")
    if m["axis_deg"] < -45 and heart.has("Left anterior fascicular block"):
        findings.append("Left anterior fascicular block")
    elif m["axis_deg"] < -30:
        findings.append("Left axis deviation")
    elif m["axis_deg"] > 90:
        findings.append("Right axis deviation")
    if m["limb_qrs_mv"] < 0.5:
        findings.append("Low QRS voltage")
    complete = [f for f in findings if not f.startswith(("Incomplete", "Left axis"))]
    minor = [f for f in findings if f not in complete]
    ordered = ([rhythm] if rhythm in _NO_P else []) + complete + \
        ([] if rhythm in _NO_P else [rhythm]) + minor
    if len(ordered) > 1 and rng.uniform() < OVERREAD_SWAP:
        ordered[0], ordered[1] = ordered[1], ordered[0]
    return ordered

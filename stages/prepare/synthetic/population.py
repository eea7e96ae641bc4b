"""Who the synthetic subjects are: body traits, conditions by age and sex, potassium levels.

Everything here is drawn once per subject (``draw_body``) or once per ECG (the rest), before
any waveform exists; ``waveform.render`` then expresses it. Effect sizes follow published
normal ranges and epidemiology; the figures below are the ones taken from them.

* Sex (men minus women): QRS duration +8 ms and precordial QRS voltage x1.25 (Rijnbeek et
  al., J Electrocardiol 2014;47:914, Dutch normal values 16-90 years); QTc -15 ms (women
  longer by 10-20 ms after puberty: Rautaharju et al., AHA/ACCF/HRS recommendations part IV,
  Circulation 2009;119:e241); J-point elevation in V2-V3 about 0.1 mV in young men,
  declining with age, about 0.04 mV in women (the same recommendations set sex- and
  age-specific ST-elevation limits for this reason); PR +4 ms; T amplitude x1.25.
* Age: the waveform adds PR +0.4 ms/year, QTc +0.25 ms/year, frontal axis -0.5 deg/year,
  QRS and T amplitude -0.5 and -0.4 %/year above 40, less respiratory sinus arrhythmia
  (Rijnbeek 2014 for the trends). Conditions become more common with age: atrial
  fibrillation about x1.8 per decade (0.1 % under 55 to 9 % at 80+ in ATRIA: Go et al.,
  JAMA 2001;285:2370), conduction disease, LVH and ectopy less steeply.
* Potassium: serum level in mmol/L, ~2.5 % outside 3.5-5.1 at age 40, more when older.
  Its signs are graded by the
  level and by the subject's ``k_sensitivity``; 20 % of subjects show none at any level,
  and mild abnormalities leave little trace in anyone, because the ECG is insensitive to
  hyperkalaemia (signs in only 34-43 % of cases with K > 6.0 in Montague et al., Clin J Am
  Soc Nephrol 2008;3:324).
* Between subjects (no label): heart rotation (SD 15 deg about the long axis, 8 deg tilt),
  limb and precordial gains (torso, electrode placement: log-normal SD 0.15-0.2),
  rate SD 7 bpm, PR SD 14 ms, QRS SD 6 ms, QTc SD 14 ms, axis SD 15 deg, T amplitude
  log-normal SD 0.2.
"""

from __future__ import annotations

import numpy as np

from stages.prepare.synthetic.waveform import DIAGNOSES, RHYTHMS, Body

# Change of relative prevalence per decade of age from 60 (a factor exp(k)).
_PER_DECADE = {
    "Atrial fibrillation": 0.6, "Atrial flutter": 0.5, "Left bundle branch block": 0.4,
    "Right bundle branch block": 0.3, "1st degree AV block": 0.3,
    "Left ventricular hypertrophy": 0.3, "Left anterior fascicular block": 0.3,
    "Sinus rhythm with PVCs": 0.3, "Low QRS voltage": 0.2, "ST depression": 0.2,
    "Sinus rhythm": -0.1, "Sinus tachycardia": -0.2, "Right axis deviation": -0.4,
    "Sinus arrhythmia": -0.6,
}
_MEN = {"Left ventricular hypertrophy": 1.4, "Right bundle branch block": 1.5,
        "Atrial fibrillation": 1.3}
# Mutually exclusive findings share a group; a secondary finding never joins its group twice.
_GROUP = {"Left bundle branch block": "conduction", "Right bundle branch block": "conduction",
          "Left anterior fascicular block": "axis", "Right axis deviation": "axis",
          "Left ventricular hypertrophy": "voltage", "Low QRS voltage": "voltage",
          "1st degree AV block": "av", "ST depression": "st", "Prolonged QT": "qt"}
_NO_P = ("Atrial fibrillation", "Atrial flutter", "Junctional rhythm")
SECONDARY_RATE = 0.35  # chance of each of up to two extra findings


def condition_weights(age: float, sex: str) -> np.ndarray:
    """Prevalence of each DIAGNOSES entry (in its order) for this age and sex, summing to 1."""
    weights = np.array([p * np.exp(_PER_DECADE.get(dx, 0.0) * (age - 60.0) / 10.0)
                        * (_MEN.get(dx, 1.0) if sex == "M" else 1.0)
                        for dx, p in DIAGNOSES.items()])
    return weights / weights.sum()


def draw_conditions(age: float, sex: str,
                    rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """The primary condition and up to two compatible secondary findings."""
    names = list(DIAGNOSES)
    weights = condition_weights(age, sex)
    primary = names[rng.choice(len(names), p=weights)]
    chosen = [primary]
    for _ in range(2):
        if rng.uniform() >= SECONDARY_RATE:
            break
        taken = {_GROUP.get(c) for c in chosen}
        allowed = [i for i, dx in enumerate(names)
                   if dx not in RHYTHMS and dx not in chosen and _GROUP[dx] not in taken
                   and not (dx == "1st degree AV block" and primary in _NO_P)]
        if not allowed:
            break
        p = weights[allowed] / weights[allowed].sum()
        chosen.append(names[allowed[rng.choice(len(allowed), p=p)]])
    return primary, tuple(chosen[1:])


def draw_body(sex: str, age: float, rng: np.random.Generator) -> Body:
    """One subject's traits (module docstring); ``age`` is the subject's age at baseline."""
    male = sex == "M"
    chest = rng.lognormal(0.0, 0.15) * (1.25 if male else 1.0)
    if male:
        j_point = max(rng.normal(0.10 - 0.0015 * (age - 30.0), 0.04), 0.0)
    else:
        j_point = max(rng.normal(0.04, 0.03), 0.0)
    return Body(
        transverse_deg=float(rng.normal(0.0, 15.0)), tilt_deg=float(rng.normal(0.0, 8.0)),
        limb_gain=float(rng.lognormal(0.0, 0.15)),
        precordial_gain=tuple(float(g) for g in chest * rng.lognormal(0.0, 0.12, size=6)),
        rate_offset=float(rng.normal(0.0, 7.0)),
        pr_offset=float(rng.normal(0.004 if male else 0.0, 0.014)),
        qrs_offset=float(rng.normal(0.008 if male else 0.0, 0.006)),
        qtc_offset=float(rng.normal(0.0 if male else 0.015, 0.014)),
        axis_offset=float(rng.normal(0.0, 15.0)),
        t_gain=float(rng.lognormal(0.0, 0.2) * (1.25 if male else 1.0)),
        j_point=float(j_point),
        k_sensitivity=0.0 if rng.uniform() < 0.2 else float(rng.lognormal(0.0, 0.35)),
    )


def draw_potassium(age: float, rng: np.random.Generator) -> float:
    """Serum potassium (mmol/L): mostly normal, with tails of hyper- and hypokalaemia that
    grow with age (kidney disease, diuretics: x1.35 per decade from 60)."""
    u = rng.uniform() / np.exp(0.3 * (age - 60.0) / 10.0)
    if u < 0.015:
        return float(min(5.2 + rng.gamma(2.0, 0.45), 8.5))
    if u < 0.025:
        return float(max(3.4 - rng.gamma(2.0, 0.18), 2.0))
    return float(np.clip(rng.normal(4.2, 0.3), 3.3, 5.3))

"""Write a synthetic cohort in the MIMIC-IV-ECG layout, with its answer key.

Files written under ``out`` (as MIMIC-IV-ECG and MIMIC-IV ``hosp`` name them):

* ``files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.{hea,dat}`` - WFDB, 12 leads in MIMIC's order
  (I, II, III, aVR, aVF, aVL, V1-V6), 500 Hz, 5000 samples, format 16, 200 adu/mV;
* ``record_list.csv``, ``machine_measurements.csv`` (``rr_interval`` with 29999 and 0 as
  missing values, ``report_0``.. statements);
* ``hosp/patients.csv`` and ``hosp/labevents.csv`` (potassium itemids 50971/50822 with
  ``flag``, plus distractors: potassium outside the 1-h window, other analytes inside it);
* ``truth.csv`` - not part of the MIMIC layout: the labels as written (so tests can check
  that the reader recovers them exactly) beside what lies under them: the drawn conditions,
  the serum potassium, the exact mean RR.

Who the subjects are is drawn by ``population`` (one body per subject, shared by their
ECGs), the waveform by ``waveform.render``, and the statements by ``reading`` from the
rendered heart's measurements. Labels carry measurement noise as real ones do: the cart's
RR is off by a few ms, ages are whole years, potassium labs have assay error, statements
are thresholds on noisy measurements.

ECGs of one subject fall on distinct days between 06:00 and 20:00, and distractor labs sit
2-6 h before or 61-180 min after an ECG, so no lab is ever inside another ECG's window and
the answer key is unambiguous. Every record's waveform uses its own seeded generator, so the
output is identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.dask_runtime import dask_client, map_in_order
from pipeline.leads import STANDARD_LEADS
from pipeline.staging import staged_dir
from stages.prepare.synthetic.population import draw_body, draw_conditions, draw_potassium
from stages.prepare.synthetic.reading import read_statements
from stages.prepare.synthetic.waveform import Heart, render, sample_heart_rate
from stages.prepare.synthetic.wfdb_writer import write_format16

MIMIC_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
FS, SECONDS, GAIN = 500, 10.0, 200.0
N_REPORTS = 18
K_NORMAL = (3.5, 5.1)        # mmol/L: the lab's reference range, outside it is flagged
K_ASSAY_SD = 0.1             # mmol/L between two draws of the same blood
MACHINE_RR_SD_MS = 4.0       # the cart's RR against the exact mean of the beat intervals
_TO_MIMIC = [STANDARD_LEADS.index(name) for name in MIMIC_LEADS]


@dataclass(frozen=True)
class EcgPlan:
    """Everything drawn at cohort level for one ECG; the waveform is drawn from it later."""

    index: int
    study_id: int
    subject_id: int
    ecg_time: dt.datetime
    heart: Heart
    path: str


@dataclass(frozen=True)
class Rendering:
    """What a worker returns for one ECG: the statements are read from its measurements."""

    rr_ms: float
    jitter_ms: float
    statements: list[str]


def write_cohort(out: Path, n: int, seed: int, workers: int = 0) -> pd.DataFrame:
    """Generate ``n`` ECGs into ``out`` (replaced atomically); returns the answer key."""
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = np.random.default_rng(seed)
    patients, plans = plan_cohort(n, rng)
    with staged_dir(Path(out)) as tmp:
        task = functools.partial(_render_chunk, tmp, seed)
        chunks = [plans[s: s + 50] for s in range(0, n, 50)]
        rendered: list[Rendering] = []
        with dask_client(workers) as client, \
                tqdm(total=n, unit="ECG", desc="synth", disable=None) as bar:
            for results in map_in_order(task, chunks, client):
                rendered.extend(results)
                bar.update(len(results))
        truth = _write_tables(tmp, patients, plans, rendered, rng)
        truth.to_csv(tmp / "truth.csv", index=False)
    return truth


def plan_cohort(n: int, rng: np.random.Generator) -> tuple[pd.DataFrame, list[EcgPlan]]:
    """Subjects (with one body each) and their ECGs' hearts; no waveform yet."""
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(int(min(rng.geometric(0.45), 8)))
    counts[-1] -= sum(counts) - n
    n_subjects = len(counts)
    subject_ids = 10_000_000 + np.sort(rng.choice(9_000_000, n_subjects, replace=False))
    patients = pd.DataFrame({
        "subject_id": subject_ids,
        "gender": rng.choice(["M", "F"], n_subjects),
        "anchor_age": np.clip(rng.normal(60, 17, n_subjects), 18, 91).astype(int),
        "anchor_year": rng.integers(2110, 2190, n_subjects),
    })
    study_ids = 40_000_000 + np.sort(rng.choice(9_000_000, n, replace=False))
    plans: list[EcgPlan] = []
    order = rng.permutation(n)  # study ids are not sorted by subject, as in MIMIC
    k = 0
    for subject, count in zip(patients.itertuples(index=False), counts, strict=True):
        sex = str(subject.gender)
        body = draw_body(sex, float(subject.anchor_age), rng)
        days = np.sort(rng.choice(5 * 365, count, replace=False))
        for day in days:
            start = dt.datetime(int(subject.anchor_year), 1, 1)
            when = start + dt.timedelta(days=int(day), minutes=int(rng.integers(360, 1200)))
            # The label is whole years; the heart is somewhere inside that year.
            age = subject.anchor_age + when.year - subject.anchor_year + rng.uniform()
            diagnosis, secondary = draw_conditions(age, sex, rng)
            heart = Heart(
                diagnosis=diagnosis,
                heart_rate=sample_heart_rate(diagnosis, age, sex, rng, body.rate_offset),
                age=age, sex=sex, potassium=draw_potassium(age, rng), body=body,
                secondary=secondary,
            )
            study = int(study_ids[order[k]])
            sid = str(subject.subject_id)
            path = f"files/p{sid[:4]}/p{sid}/s{study}/{study}"
            plans.append(EcgPlan(k, study, int(subject.subject_id), when, heart, path))
            k += 1
    return patients, plans


def _render_chunk(root: Path, seed: int, plans: list[EcgPlan]) -> list[Rendering]:
    """Render and write a chunk of records; returns what the tables need of each."""
    results = []
    for plan in plans:
        rng = np.random.default_rng([seed, plan.index])
        ecg = render(plan.heart, rng, fs=FS, seconds=SECONDS)
        digital = np.clip(np.round(ecg.signal[:, _TO_MIMIC] * GAIN), -32767, 32767)
        folder = root / Path(plan.path).parent
        folder.mkdir(parents=True, exist_ok=True)
        write_format16(folder, str(plan.study_id), digital.astype(np.int16), FS,
                       list(MIMIC_LEADS), GAIN, plan.ecg_time)
        results.append(Rendering(float(ecg.rr_ms), float(ecg.beat_jitter_ms),
                                 read_statements(plan.heart, ecg.measures, rng)))
    return results


def _write_tables(root: Path, patients: pd.DataFrame, plans: list[EcgPlan],
                  rendered: list[Rendering], rng: np.random.Generator) -> pd.DataFrame:
    (root / "hosp").mkdir()
    patients.assign(anchor_year_group="", dod="").to_csv(root / "hosp" / "patients.csv",
                                                         index=False)
    records, measurements, labs, truth = [], [], [], []
    for plan, done in zip(plans, rendered, strict=True):
        when = plan.ecg_time.strftime("%Y-%m-%d %H:%M:%S")
        records.append({"subject_id": plan.subject_id, "study_id": plan.study_id,
                        "file_name": plan.study_id, "ecg_time": when, "path": plan.path})
        rr_written, rr_label = _machine_rr(done.rr_ms, rng)
        statements = done.statements if rng.random() > 0.01 else []
        reports = [*(statements or [""]), _overall(done.statements)]
        reports = (reports + [""] * N_REPORTS)[:N_REPORTS]
        measurements.append({"subject_id": plan.subject_id, "study_id": plan.study_id,
                             "cart_id": 6848, "ecg_time": when,
                             **{f"report_{i}": r for i, r in enumerate(reports)},
                             "bandwidth": "0.005-150 Hz",
                             "filtering": "60 Hz  notch Baseline filter",
                             "rr_interval": rr_written})
        ka = _labs(plan, rng, labs)
        heart = plan.heart
        truth.append({"study_id": plan.study_id, "subject_id": plan.subject_id,
                      "rr": rr_label, "age": float(int(heart.age)), "sex": heart.sex, "ka": ka,
                      "statement": statements[0] if statements else None,
                      "statements": " | ".join(statements),
                      "diagnosis": heart.diagnosis, "secondary": " | ".join(heart.secondary),
                      "potassium_mmol": heart.potassium, "heart_rate": heart.heart_rate,
                      "rr_exact_ms": done.rr_ms, "beat_jitter_ms": done.jitter_ms})
    pd.DataFrame(records).to_csv(root / "record_list.csv", index=False)
    pd.DataFrame(measurements).to_csv(root / "machine_measurements.csv", index=False)
    lab_table = pd.DataFrame(labs)
    lab_table.insert(0, "labevent_id", np.arange(1, len(lab_table) + 1))
    lab_table.to_csv(root / "hosp" / "labevents.csv", index=False)
    table = pd.DataFrame(truth)
    table["ka"] = table["ka"].astype("Int8")
    return table


def _machine_rr(rr_ms: float, rng: np.random.Generator) -> tuple[int, float | None]:
    """The cart's RR in whole ms (with its error), or a value MIMIC uses for 'not measured'."""
    u = rng.random()
    if u < 0.03:
        return 29999, None
    if u < 0.035:
        return 0, None
    written = round(rr_ms + rng.normal(0.0, MACHINE_RR_SD_MS))
    return written, float(written)


def _overall(statements: list[str]) -> str:
    return "Normal ECG" if statements == ["Sinus rhythm"] else "Abnormal ECG"


def _labs(plan: EcgPlan, rng: np.random.Generator, labs: list[dict]) -> int | None:
    """Append this ECG's lab rows; return its ka label (None when no potassium in window)."""
    def row(minutes: float, itemid: int, value: float, abnormal: bool) -> dict:
        when = plan.ecg_time + dt.timedelta(minutes=float(minutes))
        return {"subject_id": plan.subject_id, "hadm_id": "", "specimen_id": 0,
                "itemid": itemid, "charttime": when.strftime("%Y-%m-%d %H:%M:%S"),
                "value": f"{value:.1f}", "valuenum": round(value, 1), "valueuom": "mEq/L",
                "ref_range_lower": 3.5, "ref_range_upper": 5.1,
                "flag": "abnormal" if abnormal else "", "priority": "STAT"}

    ka = None
    if rng.random() < 0.8:
        flags = []
        for _ in range(int(rng.integers(1, 3))):
            value = round(plan.heart.potassium + rng.normal(0.0, K_ASSAY_SD), 1)
            flags.append(not K_NORMAL[0] <= value <= K_NORMAL[1])
            itemid = 50822 if rng.random() < 0.15 else 50971
            labs.append(row(int(rng.integers(0, 61)), itemid, value, flags[-1]))
        ka = int(any(flags))
    if rng.random() < 0.5:  # potassium outside the window: must be ignored
        minutes = rng.choice([-int(rng.integers(120, 361)), int(rng.integers(61, 181))])
        labs.append(row(minutes, 50971, rng.uniform(2.5, 7.0), rng.random() < 0.4))
    if rng.random() < 0.5:  # another analyte inside the window: must be ignored
        labs.append(row(int(rng.integers(0, 61)), 50983, rng.uniform(125, 150), True))
    return ka

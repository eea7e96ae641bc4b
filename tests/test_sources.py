"""Real archive formats: CinC challenge (real sample), PTB-XL, CODE-15%, a WFDB folder."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.leads import STANDARD_LEADS
from pipeline.params import BackboneParams, ExtractParams, FitParams, PrepareParams
from stages.prepare.run import SourceSpec, prepare, prepare_sources
from stages.prepare.sources import SourceError
from tests.conftest import leads_signal, write_record

PARAMS = PrepareParams(workers=0)


def _ecg(seed: int, fs: float, seconds: float = 10.0) -> np.ndarray:
    """A 12-lead test ECG: narrow beats at 75 bpm plus a per-lead pattern, in mV."""
    n = int(fs * seconds)
    t = np.arange(n) / fs
    beats = sum(np.exp(-((t - b) ** 2) / (2 * 0.012 ** 2)) for b in np.arange(0.3, seconds, 0.8))
    return beats[:, None] * np.linspace(0.6, 1.5, 12)[None, :] \
        + 0.05 * leads_signal(n, fs, list(STANDARD_LEADS), seed)


# --- PhysioNet/CinC 2021 (real records) -----------------------------------------------------

def _header_fields(path) -> dict:
    fields = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") and ":" in line:
            key, value = line[1:].split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


@pytest.fixture(scope="module")
def cinc(tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp("cinc") / "prepared"
    summary = prepare("challenge", shared_dir / "data" / "cinc2021-sample", out, PARAMS)
    return shared_dir / "data" / "cinc2021-sample", out, summary


def test_all_fifty_challenge_records_are_prepared_with_header_labels(cinc):
    folder, out, summary = cinc
    assert summary["records"] == {"catalogued": 50, "prepared": 50, "skipped": 0}
    cohort = pd.read_parquet(out / "cohort.parquet").set_index("record_id")
    for header in folder.glob("*.hea"):
        fields = _header_fields(header)
        row = cohort.loc[header.stem]
        assert row["age"] == float(fields["Age"])
        assert row["sex"] == {"Male": "M", "Female": "F"}[fields["Sex"]]
        assert row["statements"] == fields["Dx"]
    assert cohort.loc["E07503", "ad_statement"] == "Sinus tachycardia"  # first scored code
    assert cohort["rr"].between(200, 3000).all() and cohort["rr_derived"].all()
    assert cohort["ka"].isna().all()
    imputed = cohort[cohort["repairs"].str.contains("imputed")].index.tolist()
    assert sorted(imputed) == ["JS20004", "JS20008"]  # flat V2, V4, V6 in the originals


def test_extract_and_fit_run_end_to_end_on_the_challenge_sample(cinc, tmp_path):
    from stages.extract.run import extract
    from stages.fit.run import fit_task

    _, out, _ = cinc
    small = {"moment": {"d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32},
             "dlinear": {"pred_len": 2}, "gate": {}, "rhythm": {}}
    for name, model in small.items():  # MOMENT per lead, as the default fit reads it
        extract(name, BackboneParams(batch_size=16, model=model, per_lead=name == "moment"),
                ExtractParams(out=str(tmp_path), shard_rows=16), out)
    params = FitParams(backbones=["moment", "dlinear", "rhythm"], seeds=1, hidden=16,
                       max_epochs=5)  # the default inputs and gate inputs
    for task in ("rr", "age", "sex", "ad"):
        metrics = fit_task(task, params, out / "cohort.parquet", tmp_path).metrics
        assert metrics["n"]["test"] > 0 and "ensemble" in metrics["methods"]


def test_rhythm_and_morphology_experts_on_all_fifty_real_records(cinc, tmp_path):
    from pipeline.feature_cache import open_features
    from stages.extract.run import extract

    _, out, _ = cinc
    for name in ("rhythm", "morphology"):
        summary = extract(name, BackboneParams(batch_size=16),
                          ExtractParams(out=str(tmp_path), shard_rows=16), out)
        features, _ = open_features(tmp_path / f"{name}.zarr")
        values = features[:]
        assert values.shape[0] == 50 and np.isfinite(values).all()
        assert summary["failed_rows"] == int((~values.any(axis=1)).sum()) <= 5
    rhythm = open_features(tmp_path / "rhythm.zarr")[0][:]
    cohort = pd.read_parquet(out / "cohort.parquet")
    detected = rhythm[:, -1] == 1
    np.testing.assert_allclose(rhythm[detected, 1], cohort["rr"].to_numpy()[detected],
                               rtol=0.1)  # the expert's mean RR agrees with derived rr


def test_age_and_sex_parsing_edge_cases():
    from stages.prepare.sources.challenge import header_labels, parse_age

    assert parse_age("NaN") is None and parse_age("Unknown") is None
    assert parse_age(">89") == 90.0 and parse_age("63") == 63.0
    labels = header_labels("# Age: NaN\n# Sex: Unknown\n# Dx: 999999,426783006\n")
    assert labels == {"age": None, "sex": None, "ad_statement": "Sinus rhythm",
                      "dx_codes": "999999,426783006"}
    assert header_labels("# Dx: 17338001\n")["ad_statement"] == \
        "Premature ventricular contractions"  # equivalent codes share a name
    assert header_labels("# Dx: 999999\n")["ad_statement"] == "SNOMED 999999"


def test_every_challenge_code_has_a_name():
    """The 2020/2021 label tables: 30 scored codes (4 pairs scored as one) and 103 unscored
    ones, e.g. CPSC-2018's PVC (164884008) and ST depression (429622005)."""
    import csv

    from stages.prepare.sources.challenge import TABLE, snomed_names

    rows = list(csv.DictReader(TABLE.open()))
    codes = [r["code"] for r in rows]
    assert len(codes) == len(set(codes)) == 133
    scored = {r["code"] for r in rows if r["scored"] == "1"}
    assert len(scored) == 30
    assert all(r["same_as"] in scored for r in rows if r["same_as"])
    names, _ = snomed_names()
    assert names["164884008"] == "Ventricular ectopics"
    assert names["429622005"] == "ST depression"
    assert names["251199005"] == "Counterclockwise rotation"  # the table's typo, corrected
    assert not any(name.startswith("SNOMED") or "  " in name for name in names.values())


def test_the_real_sample_has_no_unnamed_code(shared_dir):
    from stages.prepare.sources.challenge import snomed_names

    names, _ = snomed_names()
    folder = shared_dir / "data" / "cinc2021-sample"
    codes = {c.strip() for header in folder.glob("*.hea") for line in
             header.read_text().splitlines() if line.startswith("# Dx:")
             for c in line.split(":", 1)[1].split(",")}
    assert codes and codes <= set(names)


# --- PTB-XL -----------------------------------------------------------------------------------

def _ptbxl(root, n=12):
    rows = []
    for i in range(1, n + 1):
        name = f"{i:05d}"
        for rate, folder in ((500, "records500"), (100, "records100")):
            suffix = "hr" if rate == 500 else "lr"
            write_record(root / folder / "00000", f"{name}_{suffix}", _ecg(i, rate), rate,
                         list(STANDARD_LEADS), gain=1000.0)
        rows.append({"ecg_id": i, "patient_id": float(100 + (i - 1) // 2),
                     "age": 300 if i == 1 else 40 + i, "sex": i % 2,
                     "scp_codes": "{'NORM': 100.0, 'SR': 0.0}" if i % 3
                     else "{'AFIB': 80.0, 'IMI': 80.0}",
                     "strat_fold": (i - 1) % 10 + 1,
                     "filename_lr": f"records100/00000/{name}_lr",
                     "filename_hr": f"records500/00000/{name}_hr"})
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    pd.DataFrame({"": ["NORM", "SR", "AFIB", "IMI"],
                  "description": ["normal ECG", "sinus rhythm", "atrial fibrillation",
                                  "inferior myocardial infarction"]}).to_csv(
        root / "scp_statements.csv", index=False)
    return root


def test_ptb_xl_labels_rates_and_recommended_folds(tmp_path):
    root = _ptbxl(tmp_path / "ptbxl")
    prepare("ptb-xl", root, tmp_path / "out", PARAMS, options={"folds": "recommended"})
    cohort = pd.read_parquet(tmp_path / "out" / "cohort.parquet").set_index("record_id")
    assert len(cohort) == 12
    assert cohort.loc["1", "age"] == 90.0 and cohort.loc["2", "age"] == 42.0
    assert cohort.loc["2", "sex"] == "M" and cohort.loc["1", "sex"] == "F"
    assert cohort.loc["1", "ad_statement"] == "normal ECG"
    assert cohort.loc["3", "ad_statement"] == "atrial fibrillation"  # first of a tie
    assert cohort.loc["3", "statements"] == "AFIB,IMI"
    assert cohort.loc["9", "split"] == "val" and cohort.loc["10", "split"] == "test"
    assert (cohort.loc[[str(i) for i in (1, 2, 8, 11, 12)], "split"] == "train").all()
    assert cohort.loc["2", "subject_id"] == "100"
    assert abs(cohort["rr"].median() - 800) < 15  # beats every 0.8 s
    prepare("ptb-xl", root, tmp_path / "low", PARAMS, options={"rate": "100"})
    low = pd.read_parquet(tmp_path / "low" / "cohort.parquet")
    assert (low["fs_original"] == 100).all() and low["repairs"].str.contains("resampled").all()


def test_ptb_xl_malformed_tables(tmp_path):
    root = _ptbxl(tmp_path / "ptbxl", n=2)
    table = pd.read_csv(root / "ptbxl_database.csv").drop(columns="scp_codes")
    table.to_csv(root / "ptbxl_database.csv", index=False)
    with pytest.raises(SourceError, match="lacks column.*scp_codes"):
        prepare("ptb-xl", root, tmp_path / "out", PARAMS)
    with pytest.raises(SourceError, match="has no ptbxl_database.csv"):
        prepare("ptb-xl", tmp_path, tmp_path / "out", PARAMS)


# --- CODE-15% ----------------------------------------------------------------------------------

def _code15(root):
    root.mkdir()
    tracings = np.zeros((5, 4096, 12), dtype=np.float32)
    for k, seconds in enumerate((10, 10, 10, 7)):
        n = int(400 * seconds)
        start = (4096 - n) // 2
        tracings[k, start: start + n] = _ecg(k, 400, seconds)
    with h5py.File(root / "exams_part0.hdf5", "w") as f:
        f["tracings"] = tracings
        f["exam_id"] = np.array([11, 12, 13, 14, 0])  # the parts end with an empty row
    flags = {f: [False] * 5 for f in ("1dAVb", "RBBB", "LBBB", "SB", "ST", "AF")}
    flags["RBBB"][1] = flags["AF"][1] = True
    flags["SB"][2] = True
    pd.DataFrame({"exam_id": [11, 12, 13, 14, 99], "age": [50, 61, 72, 33, 40],
                  "is_male": [True, False, True, False, True], "nn_predicted_age": 50.0,
                  **flags, "patient_id": [1, 1, 2, 3, 4],
                  "normal_ecg": [True, False, False, False, False]}).to_csv(
        root / "exams.csv", index=False)
    return root, tracings


def test_code15_padding_resampling_labels(tmp_path):
    root, tracings = _code15(tmp_path / "code15")
    summary = prepare("code15", root, tmp_path / "out", PARAMS)
    cohort = pd.read_parquet(tmp_path / "out" / "cohort.parquet").set_index("record_id")
    assert sorted(cohort.index) == ["11", "12", "13"]
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv", dtype={"record_id": str})
    assert skipped.set_index("record_id").loc["14", "reason"].startswith("too short: 7.00 s")
    assert any("1 exams of exams.csv have no tracing" in n for n in summary["notes"])
    assert cohort.loc["11", "ad_statement"] == "Normal ECG"
    assert cohort.loc["12", "ad_statement"] == "Atrial fibrillation"  # AF listed first
    assert cohort.loc["13", "ad_statement"] == "Sinus bradycardia"
    assert list(cohort["sex"]) == ["M", "F", "M"] and cohort.loc["12", "age"] == 61
    assert cohort.loc["11", "subject_id"] == cohort.loc["12", "subject_id"] == "1"
    assert cohort["repairs"].str.contains("resampled 400->500 Hz").all()
    from pipeline.signal_store import SignalStore
    with SignalStore(tmp_path / "out" / "signals.h5") as store:
        first = store.read(0, 1)[0]
    original = tracings[0, 48: 48 + 4000, 0]  # lead DI, padding removed
    inner = slice(200, 4800)
    np.testing.assert_allclose(first[0, inner], np.interp(np.arange(5000) * 0.8,
                                                          np.arange(4000), original)[inner],
                               atol=0.05)


def test_code15_errors(tmp_path):
    with pytest.raises(SourceError, match="has no exams.csv"):
        prepare("code15", tmp_path, tmp_path / "out", PARAMS)
    root, _ = _code15(tmp_path / "code15")
    (root / "exams_part0.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(SourceError, match="exams_part0.hdf5 is not a CODE-15% part"):
        prepare("code15", root, tmp_path / "out", PARAMS)


# --- a folder of WFDB records + labels table ---------------------------------------------------

def _folder(root):
    for i in range(8):
        write_record(root / "ecgs", f"rec{i}", _ecg(i, 500), 500, list(STANDARD_LEADS))
    return pd.DataFrame({"record": [f"ecgs/rec{i}" for i in range(8)] + ["ecgs/absent"],
                         "subject_id": ["a", "a", "b", "c", "d", "e", "f", "g", "h"],
                         "age": [50, 51, 60, "old", 70, 71, 72, 73, 74],
                         "sex": ["M", "male", "F", "X", "f", "M", "F", "M", "F"],
                         "ka": [0, 1, 0, 2, 0, 0, 1, 0, 0],
                         "ad": ["AF", "SR", "SR", "SR", "AF", "SR", "SR", "SR", "SR"]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_folder_with_a_labels_table(tmp_path, suffix):
    table = _folder(tmp_path / "root")
    path = tmp_path / f"labels{suffix}"
    if suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.astype({"age": str}).to_parquet(path)
    summary = prepare("folder", tmp_path / "root", tmp_path / "out", PARAMS, labels=path)
    cohort = pd.read_parquet(tmp_path / "out" / "cohort.parquet").set_index("record_id")
    assert len(cohort) == 8
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped["reason"].tolist() == ["missing header file: absent.hea"]
    assert cohort.loc["ecgs/rec1", "sex"] == "M" and pd.isna(cohort.loc["ecgs/rec3", "sex"])
    assert pd.isna(cohort.loc["ecgs/rec3", "age"]) and pd.isna(cohort.loc["ecgs/rec3", "ka"])
    assert cohort.loc["ecgs/rec1", "ka"] == 1
    assert any("ka value(s) not 0/1" in n for n in summary["notes"])
    assert cohort["rr_derived"].all() and (cohort["rr"] - 800).abs().max() < 15


def test_folder_needs_a_record_column(tmp_path):
    _folder(tmp_path / "root").drop(columns="record").to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(SourceError, match="no `record` column"):
        prepare("folder", tmp_path / "root", tmp_path / "out", PARAMS, labels=tmp_path / "l.csv")
    with pytest.raises(SourceError, match="needs --labels"):
        prepare("folder", tmp_path / "root", tmp_path / "out", PARAMS)


# --- RR from R-peaks, and combined sources -----------------------------------------------------

def test_derived_rr_matches_the_generators_beat_timing(tmp_path):
    from stages.prepare.rpeaks import derive_rr
    from stages.prepare.synthetic.waveform import DIAGNOSES, Heart, render, sample_heart_rate

    rng = np.random.default_rng(0)
    errors = []
    for k, diagnosis in enumerate(list(DIAGNOSES)[:12] * 3):
        heart = Heart(diagnosis, sample_heart_rate(diagnosis, 60, "M", rng), 60.0, "M", 4.2)
        ecg = render(heart, np.random.default_rng(k))
        rr, _ = derive_rr(ecg.signal.T, 500)
        errors.append(abs(rr - ecg.rr_ms))
    assert np.median(errors) < 5 and np.mean(errors) < 25


def test_derived_rr_fails_cleanly_on_flat_and_noise():
    from stages.prepare.rpeaks import derive_rr

    rr, note = derive_rr(np.zeros((12, 5000)), 500)
    assert rr is None and "no lead" in note
    rr, note = derive_rr(np.random.default_rng(0).normal(0, 0.01, (12, 5000)), 500)
    assert rr is None or 200 <= rr <= 3000


def test_two_sources_make_one_cohort(tmp_path, small_prepared):
    table = _folder(tmp_path / "root").iloc[:8]
    table.to_csv(tmp_path / "labels.csv", index=False)
    synthetic_root = small_prepared.parent / "raw"
    specs = [SourceSpec("synthetic", synthetic_root),
             SourceSpec("folder", tmp_path / "root", tmp_path / "labels.csv")]
    summary = prepare_sources(specs, tmp_path / "out", PARAMS)
    cohort = pd.read_parquet(tmp_path / "out" / "cohort.parquet")
    assert summary["source"] == "synthetic+folder"
    assert cohort["source"].value_counts().to_dict() == {"synthetic": 40, "folder": 8}
    assert cohort["record_id"].str.startswith(("synthetic:", "folder:")).all()
    assert (cohort.groupby("subject_id")["split"].nunique() == 1).all()
    assert not cohort.loc[cohort.source == "synthetic", "rr_derived"].any()

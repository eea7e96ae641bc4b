"""End to end: synthetic MIMIC-layout cohort -> prepare -> cohort.parquet + signals.h5."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from pipeline.params import PrepareParams
from pipeline.signal_store import SignalStore, SignalStoreError
from stages.prepare.run import prepare
from stages.prepare.sources import SourceError
from stages.prepare.synthetic.cohort import write_cohort
from tests.conftest import write_record

N = 60


@pytest.fixture(scope="session")
def cohort_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "raw"
    write_cohort(root, n=N, seed=3)
    return root


@pytest.fixture(scope="session")
def prepared(cohort_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare("synthetic", cohort_root, out, PrepareParams(workers=0))
    return out


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(cohort_root, tmp_path):
    write_cohort(tmp_path / "again", n=N, seed=3)
    assert _digest_tree(tmp_path / "again") == _digest_tree(cohort_root)
    write_cohort(tmp_path / "other", n=N, seed=4)
    assert _digest_tree(tmp_path / "other") != _digest_tree(cohort_root)


def test_layout_is_mimic_iv_ecg(cohort_root):
    records = pd.read_csv(cohort_root / "record_list.csv")
    assert list(records.columns) == ["subject_id", "study_id", "file_name", "ecg_time", "path"]
    row = records.iloc[0]
    sid, study = str(row.subject_id), str(row.study_id)
    assert row.path == f"files/p{sid[:4]}/p{sid}/s{study}/{study}"
    header = wfdb.rdheader(str(cohort_root / row.path))
    assert (header.fs, header.sig_len, header.n_sig) == (500, 5000, 12)
    assert header.sig_name == ["I", "II", "III", "aVR", "aVF", "aVL",
                               "V1", "V2", "V3", "V4", "V5", "V6"]
    assert set(header.fmt) == {"16"} and set(header.adc_gain) == {200.0}
    measurements = pd.read_csv(cohort_root / "machine_measurements.csv")
    assert {"rr_interval", *(f"report_{i}" for i in range(18))} <= set(measurements.columns)
    assert (measurements["rr_interval"] == 29999).any()
    labs = pd.read_csv(cohort_root / "hosp" / "labevents.csv")
    assert {50971, 50983} <= set(labs["itemid"])
    patients = pd.read_csv(cohort_root / "hosp" / "patients.csv")
    assert list(patients.columns[:4]) == ["subject_id", "gender", "anchor_age", "anchor_year"]
    assert records["subject_id"].value_counts().max() > 1  # several ECGs per subject


def test_reader_recovers_every_label(prepared, cohort_root):
    cohort = pd.read_parquet(prepared / "cohort.parquet")
    truth = pd.read_csv(cohort_root / "truth.csv", dtype={"study_id": str})
    assert len(cohort) == N
    merged = cohort.merge(truth, left_on="record_id", right_on="study_id",
                          suffixes=("", "_truth"), validate="one_to_one")
    for label in ("rr", "age", "sex", "ka"):
        got, want = merged[label], merged[f"{label}_truth"]
        assert (got.isna() == want.isna()).all(), label
        kind = str if label == "sex" else float
        assert (got.dropna().astype(kind) == want.dropna().astype(kind)).all(), label
    assert merged["ka"].notna().any() and merged["rr"].isna().any()
    statements = merged["statement"].astype("string")
    assert (merged["ad_statement"].isna() == statements.isna()).all()
    assert (merged["ad_statement"].dropna() == statements.dropna()).all()
    summary = json.loads((prepared / "prepare_summary.json").read_text())
    classes = set(summary["ad_classes"]) - {"Other"}
    expected = statements.where(statements.isin(classes), "Other").where(statements.notna())
    assert (merged["ad"].isna() == expected.isna()).all()
    assert (merged["ad"].dropna() == expected.dropna()).all()


def test_no_subject_in_two_splits(prepared):
    cohort = pd.read_parquet(prepared / "cohort.parquet")
    assert (cohort.groupby("subject_id")["split"].nunique() == 1).all()
    assert set(cohort["split"]) == {"train", "val", "test"}


def test_signal_store_rows_follow_the_cohort(prepared, cohort_root):
    cohort = pd.read_parquet(prepared / "cohort.parquet")
    with SignalStore(prepared / "signals.h5") as store:
        assert store.record_ids() == cohort["record_id"].tolist()
        assert len(store) == N and store.contract.fs == 500
        first = store.read(0, 1)[0]
    raw = wfdb.rdrecord(str(cohort_root / cohort["locator"].iloc[0]))
    lead_ii = raw.p_signal[:, raw.sig_name.index("II")]
    np.testing.assert_allclose(first[1], lead_ii, atol=1e-6)
    avl = raw.p_signal[:, raw.sig_name.index("aVL")]
    np.testing.assert_allclose(first[4], avl, atol=1e-6)


def _corrupt_copy(cohort_root: Path, dest: Path) -> dict[str, str]:
    """Damage a copy of the cohort; returns record id -> expected reason or repair kind."""
    shutil.copytree(cohort_root, dest)
    records = pd.read_csv(dest / "record_list.csv", dtype={"study_id": str})
    stems = [dest / p for p in records["path"]]
    ids = records["study_id"].tolist()
    expected = {}

    dat = stems[0].with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:5000])
    expected[ids[0]] = "truncated signal file"
    stems[1].with_suffix(".dat").unlink()
    expected[ids[1]] = "missing signal file"
    stems[2].with_suffix(".hea").write_text("%%% not a header\n")
    expected[ids[2]] = "unreadable header"

    def rewrite(k: int, edit) -> None:
        rec = wfdb.rdrecord(str(stems[k]))
        signal_mv, names, fs = edit(rec.p_signal.copy(), list(rec.sig_name), rec.fs)
        for suffix in (".hea", ".dat"):
            stems[k].with_suffix(suffix).unlink()
        write_record(stems[k].parent, stems[k].name, signal_mv, fs, names)

    def few_nans(x, names, fs):
        x[100:120, names.index("V2")] = np.nan
        return x, names, fs
    rewrite(3, few_nans)
    expected[ids[3]] = "interpolated"

    def mostly_nan(x, names, fs):
        x[:4000, names.index("V5")] = np.nan
        return x, names, fs
    rewrite(4, mostly_nan)
    expected[ids[4]] = "imputed"

    def drop_avl(x, names, fs):
        keep = [j for j, n in enumerate(names) if n != "aVL"]
        return x[:, keep], [names[j] for j in keep], fs
    rewrite(5, drop_avl)
    expected[ids[5]] = "derived"

    def drop_four_v(x, names, fs):
        keep = [j for j, n in enumerate(names) if n not in ("V1", "V2", "V3", "V4")]
        return x[:, keep], [names[j] for j in keep], fs
    rewrite(6, drop_four_v)
    expected[ids[6]] = "missing leads"

    def at_250(x, names, fs):
        return x[::2], names, 250
    rewrite(7, at_250)
    expected[ids[7]] = "resampled"

    def too_short(x, names, fs):
        return x[:3000], names, fs
    rewrite(8, too_short)
    expected[ids[8]] = "too short"
    return expected


def test_bad_records_are_repaired_or_skipped_with_a_reason(cohort_root, tmp_path):
    expected = _corrupt_copy(cohort_root, tmp_path / "raw")
    summary = prepare("synthetic", tmp_path / "raw", tmp_path / "out", PrepareParams(workers=0))
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv", dtype={"record_id": str})
    reasons = dict(zip(skipped["record_id"], skipped["reason"], strict=True))
    cohort = pd.read_parquet(tmp_path / "out" / "cohort.parquet").set_index("record_id")
    for record_id, kind in expected.items():
        if kind in ("interpolated", "derived", "resampled", "imputed"):
            assert kind in cohort.loc[record_id, "repairs"], record_id
        else:
            assert reasons[record_id].startswith(kind), (record_id, reasons[record_id])
    assert summary["records"] == {"catalogued": N, "prepared": N - 5, "skipped": 5}
    assert summary["skipped_by_reason"]["missing leads"] == 1
    assert summary["repaired"] == {"interpolated": 1, "derived": 1, "resampled": 1,
                                   "unusable": 1, "imputed": 1}


def test_interrupted_prepare_leaves_no_output(cohort_root, tmp_path, monkeypatch):
    import stages.prepare.run as run

    calls = {"n": 0}
    real = run.conform

    def interrupt_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "conform", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare("synthetic", cohort_root, tmp_path / "out", PrepareParams(workers=0))
    assert list(tmp_path.iterdir()) == []


_SLOW_PREPARE = """
import sys, time
import stages.prepare.run as run
real = run.conform
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
run.conform = slow
from pipeline.params import PrepareParams
run.prepare("synthetic", sys.argv[1], sys.argv[2], PrepareParams(workers=0, chunk=4))
"""


@pytest.mark.slow
def test_killed_prepare_leaves_no_output_and_the_next_run_cleans_up(cohort_root, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(cohort_root), str(out)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tmp-*/signals.h5")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".out.tmp-*"))  # the killed run's staging folder is left over
    prepare("synthetic", cohort_root, out, PrepareParams(workers=0))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with SignalStore(out / "signals.h5") as store:
        assert len(store) == N


@pytest.mark.slow
def test_two_dask_workers_give_the_same_outputs(cohort_root, prepared, tmp_path):
    prepare("synthetic", cohort_root, tmp_path / "out", PrepareParams(workers=2, chunk=7))
    a = pd.read_parquet(prepared / "cohort.parquet")
    b = pd.read_parquet(tmp_path / "out" / "cohort.parquet")
    pd.testing.assert_frame_equal(a, b)
    with SignalStore(prepared / "signals.h5") as one, \
            SignalStore(tmp_path / "out" / "signals.h5") as two:
        np.testing.assert_array_equal(one.read(0, N), two.read(0, N))
        assert one.attrs["cohort_digest"] == two.attrs["cohort_digest"]


def test_missing_tables_give_clear_errors(cohort_root, tmp_path):
    with pytest.raises(SourceError, match="has no record_list.csv"):
        prepare("mimic-iv-ecg", tmp_path, tmp_path / "out", PrepareParams(workers=0))
    with pytest.raises(SourceError, match="unknown source 'nope'"):
        prepare("nope", cohort_root, tmp_path / "out", PrepareParams(workers=0))
    shutil.copytree(cohort_root, tmp_path / "raw")
    shutil.rmtree(tmp_path / "raw" / "hosp")
    summary = prepare("mimic-iv-ecg", tmp_path / "raw", tmp_path / "out",
                      PrepareParams(workers=0))
    cohort = pd.read_parquet(tmp_path / "out" / "cohort.parquet")
    assert cohort["age"].isna().all() and cohort["ka"].isna().all()
    assert cohort["rr"].notna().any()
    assert any("patients.csv" in note for note in summary["notes"])
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_corrupt_or_missing_signal_store_is_refused(prepared, tmp_path):
    with pytest.raises(SignalStoreError, match="does not exist"):
        SignalStore(tmp_path / "signals.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5" * 100)
    with pytest.raises(SignalStoreError, match="not a readable HDF5"):
        SignalStore(bad)
    half = tmp_path / "half.h5"
    half.write_bytes((prepared / "signals.h5").read_bytes())
    import h5py
    with h5py.File(half, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(SignalStoreError, match="incomplete"):
        SignalStore(half)

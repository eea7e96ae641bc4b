"""A trained ensemble used on new ECGs: export a bundle, predict with it from anywhere.

The small project of ``conftest.trained_project`` (synth, prepare, extract, fit and export
through the command line) is predicted with its bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import PROJECT_PARAMS, cli_ok

runner = CliRunner()
TASKS = ["rr", "sex", "ad"]


def _predict(cwd: Path, bundle: Path, root: Path, out: Path, *extra: str):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return runner.invoke(app, ["predict", "--model", str(bundle), "--source", "synthetic",
                                   "--root", str(root), "--out", str(out), "--device", "cpu",
                                   *extra])


def test_the_bundle_holds_models_metrics_fingerprints_and_a_card(trained_project):
    project = trained_project
    bundle = project / "bundle"
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert list(manifest["tasks"]) == TASKS
    assert set(manifest["backbones"]) == {"dlinear", "tempo", "gate", "rhythm", "morphology"}
    assert manifest["backbones"]["dlinear"]["fingerprint"]["weights_digest"]
    assert manifest["tasks"]["ad"]["classes"] and manifest["tasks"]["rr"]["seeds"] == [0, 1]
    for task in TASKS:
        assert {p.name for p in (bundle / task).iterdir()} == {"seed0.pt", "seed1.pt",
                                                               "metrics.json"}
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Random-weight backbones (dlinear, tempo)" in card
    assert "| rr | held-out test split" in card


def test_predict_on_the_training_ecgs_equals_the_fit_stage(trained_project, tmp_path):
    project = trained_project
    """Every task's prediction (rr's value, sex's score and class, ad's class), each
    expert's output (a value, a probability, a class) and the gate weights, to 1e-5."""
    out = tmp_path / "preds.parquet"
    result = _predict(project, project / "bundle", project / "raw", out)
    assert result.exit_code == 0, result.output
    preds = pd.read_parquet(out).set_index("record_id")
    assert len(preds) == 90 and preds.index.is_unique
    for task in TASKS:
        written = pd.read_parquet(project / "predictions" / f"{task}.parquet")
        written = written[written["seed"] == 0].set_index("record_id")
        ours = preds.loc[written.index]
        if task == "rr":
            np.testing.assert_allclose(ours[task], written["prediction"], rtol=1e-5, atol=1e-5)
        elif task == "sex":
            np.testing.assert_allclose(ours["sex_score"], written["score"], atol=1e-5)
            assert (ours[task].to_numpy() == written["prediction"].to_numpy()).all()
        else:
            assert (ours[task].to_numpy() == written["prediction"].to_numpy()).all()
            probabilities = ours.filter(like="ad_p_").to_numpy()
            np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
        for column in written.columns:
            if column.startswith("gate_"):
                np.testing.assert_allclose(ours[f"{task}_{column}"], written[column], atol=1e-5)
            elif column.startswith("expert_") and task == "ad":  # the expert's class
                assert (ours[f"{task}_{column}"].to_numpy() == written[column].to_numpy()).all()
            elif column.startswith("expert_"):
                np.testing.assert_allclose(ours[f"{task}_{column}"], written[column],
                                           rtol=1e-5, atol=1e-5)
    metrics = json.loads((tmp_path / "preds.metrics.json").read_text())
    truth = ours = preds.dropna(subset=["rr_truth"])
    assert metrics["rr"]["mae"] == pytest.approx(
        float(np.abs(ours["rr"] - truth["rr_truth"]).mean()), rel=1e-6)
    assert metrics["rr"]["n"] == len(truth) and len(metrics["rr"]["ci"]["mae"]) == 2


def test_a_second_call_reuses_prepared_signals_and_features(trained_project, tmp_path):
    project = trained_project
    out = tmp_path / "again.parquet"
    work = tmp_path / "work"
    first = _predict(project, project / "bundle", project / "raw", out, "--work", str(work))
    assert first.exit_code == 0, first.output
    assert "prepare: prepared" in first.output and "reused cached features" not in first.output
    second = _predict(project, project / "bundle", project / "raw", out, "--work", str(work))
    assert second.exit_code == 0, second.output
    assert "prepare: reused" in second.output
    assert "reused cached features of dlinear, tempo, rhythm, morphology, gate\n" in second.output


def test_a_copied_bundle_predicts_new_ecgs_without_the_training_data(trained_project, tmp_path):
    project = trained_project
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(project / "bundle", elsewhere / "model")
    cli_ok(["synth", "--out", str(tmp_path / "new"), "--n", "12", "--seed", "8",
         "--params", str(tmp_path / "none.yaml")])
    record = next((tmp_path / "new").rglob("*.dat"))
    record.write_bytes(record.read_bytes()[:100])  # truncated: skipped and named, not fatal
    out = elsewhere / "new.parquet"
    result = _predict(elsewhere, elsewhere / "model", tmp_path / "new", out)
    assert result.exit_code == 0, result.output
    assert f"skipped {record.stem}: truncated signal file" in result.output
    preds = pd.read_parquet(out)
    assert len(preds) == 11 and not (elsewhere / "models").exists()
    for task in TASKS:
        assert preds[task].notna().all()
    assert np.allclose(preds.filter(like="rr_gate_").sum(axis=1), 1.0, atol=1e-5)
    assert (elsewhere / "cache" / "predict").is_dir()  # work stays beside the caller


def test_a_backbone_with_other_weights_is_refused_with_the_differences(trained_project, tmp_path):
    project = trained_project
    from stages.extract.backbones import create_backbone

    backbone = create_backbone("dlinear", {"seq_len": 500, "pred_len": 4, "kernel": 25},
                               per_lead=True)
    other = backbone.prepare_weights("random", 7, tmp_path)
    result = _predict(project, project / "bundle", project / "raw", tmp_path / "x.parquet",
                      "--weights", f"dlinear={other}", "--work", str(tmp_path / "w"))
    assert result.exit_code == 1
    assert "does not compute the features the model was trained on" in result.output
    assert "weights_digest" in result.output and "random_weights" in result.output
    assert not (tmp_path / "x.parquet").exists()
    assert not (tmp_path / "w" / "cache" / "dlinear.zarr").exists()


def test_export_all_leaves_out_a_task_the_fit_stage_skipped(trained_project, tmp_path):
    for folder in ("metrics", "models"):
        shutil.copytree(trained_project / folder, tmp_path / folder)
    (tmp_path / "params.yaml").write_text(PROJECT_PARAMS)
    (tmp_path / "metrics" / "ad.json").write_text(json.dumps(
        {"task": "ad", "skipped": "no ad labels in the train split"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        output = cli_ok(["export", "--out", "b"])
        failed = runner.invoke(app, ["export", "--out", "c", "--task", "ad"])
    assert "ad: not exported - the fit stage skipped it" in output
    assert list(json.loads((tmp_path / "b" / "bundle.json").read_text())["tasks"]) == [
        "rr", "sex"]
    assert failed.exit_code == 1 and "skipped by the fit stage" in failed.output


def test_export_and_predict_say_what_is_missing(tmp_path):
    result = runner.invoke(app, ["predict", "--model", str(tmp_path), "--root", str(tmp_path),
                                 "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 1 and "not a model bundle" in result.output
    (tmp_path / "params.yaml").write_text(PROJECT_PARAMS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = runner.invoke(app, ["export", "--out", "b", "--task", "rr"])
    assert result.exit_code == 1 and "pipeline fit-ensemble --task rr" in result.output
    assert not (tmp_path / "b").exists()

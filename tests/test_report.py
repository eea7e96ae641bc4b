"""report: fake fit outputs for all five tasks -> summary.md and PNGs with the right content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.report.plots import area_under, confusion_matrix, roc_curve_points
from stages.report.summary import format_cell, write_report

BACKBONES = ["moment", "timesnet", "dlinear"]
SEEDS = [1, 2]
KA_REASON = "no ka labels in the train split of source mimic-iv-ecg"
AD_CLASSES = [f"Statement number {i} with a fairly long diagnostic name" for i in range(14)]
AD_CLASSES.append("Other")


def _ms(mean: float | None, std: float | None = 0.01) -> dict:
    return {"mean": mean, "std": std}


def _regression(mae: dict[str, float]) -> dict:
    return {m: {"mae": _ms(v, 0.31), "median_ae": _ms(v * 0.8), "r2": _ms(0.5 - v / 100)}
            for m, v in mae.items()}


def _metrics(task: str, kind: str, metric: str, methods: dict, random: bool) -> dict:
    return {"task": task, "kind": kind, "metric": metric,
            "n": {"train": 140, "val": 37, "test": 20}, "seeds": SEEDS, "backbones": BACKBONES,
            "random_weights": dict.fromkeys(BACKBONES, random), "methods": methods,
            "gate_weights": {"moment": _ms(0.5, 0.1), "timesnet": _ms(0.3, 0.05),
                             "dlinear": _ms(0.2, 0.02)},
            "adapter": "lora", "trainable": {"moment": ["head.0.lora_A.default.weight"]}}


def _all_metrics(random: bool) -> dict[str, dict]:
    # rr: ensemble has the lowest MAE; age: timesnet alone beats the ensemble (lower is better).
    rr = _regression({"ensemble": 7.123, "mean_predictor": 30.0, "moment": 9.0,
                      "timesnet": 8.0, "dlinear": 12.0, "uniform": 7.5})
    age = _regression({"ensemble": 9.0, "mean_predictor": 15.0, "moment": 10.0,
                       "timesnet": 8.5, "dlinear": 11.0, "uniform": 9.2})
    # sex: uniform has the highest F1 (higher is better) and the lowest value is the majority.
    sex = {m: {"f1": _ms(f1), "auroc": None if m == "majority" else _ms(f1 + 0.05)}
           for m, f1 in {"ensemble": 0.80, "majority": 0.10, "moment": 0.7, "timesnet": 0.72,
                         "dlinear": 0.65, "uniform": 0.83}.items()}
    ad = {m: {"accuracy": _ms(a), "macro_f1": _ms(a / 2), "balanced_accuracy": _ms(a / 3)}
          for m, a in {"ensemble": 0.61, "majority": 0.30, "moment": 0.55, "timesnet": 0.5,
                       "dlinear": 0.4, "uniform": 0.58}.items()}
    return {
        "rr": _metrics("rr", "regression", "mae", rr, random),
        "age": _metrics("age", "regression", "mae", age, random),
        "sex": _metrics("sex", "binary", "f1", sex, random),
        "ka": {"task": "ka", "skipped": KA_REASON, "n": {"train": 0, "val": 0, "test": 0}},
        "ad": _metrics("ad", "multiclass", "accuracy", ad, random),
    }


def _predictions(kind: str, rng: np.random.Generator) -> pd.DataFrame:
    n = 40
    gates = rng.dirichlet(np.ones(len(BACKBONES)), size=n * len(SEEDS))
    frame = pd.DataFrame({"record_id": [f"r{i}" for i in range(n)] * len(SEEDS),
                          "seed": np.repeat(SEEDS, n)})
    if kind == "regression":
        truth = rng.uniform(400, 1200, n * len(SEEDS))
        frame["truth"] = truth
        frame["prediction"] = truth + rng.normal(0, 50, truth.size)
        for b in BACKBONES:
            frame[f"expert_{b}"] = truth + rng.normal(0, 80, truth.size)
    elif kind == "binary":
        truth = rng.integers(0, 2, n * len(SEEDS))
        score = np.clip(0.3 * truth + rng.uniform(0, 0.7, truth.size), 0, 1)
        frame["truth"], frame["score"] = truth, score
        frame["prediction"] = (score > 0.5).astype(int)
        for b in BACKBONES:
            frame[f"expert_{b}"] = rng.uniform(0, 1, truth.size)
    else:
        truth = rng.choice(AD_CLASSES, n * len(SEEDS))
        frame["truth"] = truth
        frame["prediction"] = np.where(rng.uniform(size=truth.size) < 0.6, truth,
                                       rng.choice(AD_CLASSES, truth.size))
        for b in BACKBONES:
            frame[f"expert_{b}"] = rng.choice(AD_CLASSES, truth.size)
    for j, b in enumerate(BACKBONES):
        frame[f"gate_{b}"] = gates[:, j]
    return frame


def _write_inputs(root: Path, random: bool) -> tuple[Path, Path]:
    metrics_dir, predictions_dir = root / "metrics", root / "predictions"
    metrics_dir.mkdir(parents=True)
    predictions_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for task, metrics in _all_metrics(random).items():
        (metrics_dir / f"{task}.json").write_text(json.dumps(metrics))
        if not metrics.get("skipped"):
            _predictions(metrics["kind"], rng).to_parquet(predictions_dir / f"{task}.parquet")
    return metrics_dir, predictions_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    metrics_dir, predictions_dir = _write_inputs(root, random=True)
    return write_report(metrics_dir, predictions_dir, root / "reports")


def _table_after(text: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table after a heading: its header and its rows keyed by first cell."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, rows = table[0], table[2:]
    return header, {row[0]: row for row in rows}


def _headline_cell(text: str, row_key: str, method: str) -> str:
    header, rows = _table_after(text, "## Headline metric per task")
    return rows[row_key][header.index(method)]


def test_summary_lists_every_task_and_the_skip_reason(report):
    text = report.read_text(encoding="utf-8")
    assert report.name == "summary.md"
    for task in ("rr", "age", "sex", "ka", "ad"):
        assert f"`{task}`" in text or f"| {task}" in text
    assert "±" in text
    assert KA_REASON in text
    assert "ka (skipped)" in text
    assert "7.12 ± 0.31" in text


def test_best_method_is_bold_for_both_directions(report):
    text = report.read_text(encoding="utf-8")
    # lower is better: rr's ensemble (7.12) and age's timesnet (8.5) are best
    assert _headline_cell(text, "rr (mae ↓)", "ensemble") == "**7.12 ± 0.31**"
    assert _headline_cell(text, "age (mae ↓)", "timesnet") == "**8.50 ± 0.31**"
    assert not _headline_cell(text, "age (mae ↓)", "ensemble").startswith("**")
    assert not _headline_cell(text, "rr (mae ↓)", "mean_predictor").startswith("**")
    # higher is better: sex's uniform (0.830) is best, the majority (0.100) is not
    assert _headline_cell(text, "sex (f1 ↑)", "uniform") == "**0.830 ± 0.010**"
    assert not _headline_cell(text, "sex (f1 ↑)", "majority").startswith("**")
    assert _headline_cell(text, "ad (accuracy ↑)", "ensemble").startswith("**")
    _, rows = _table_after(text, "## Headline metric per task")
    assert sum(cell.startswith("**") for cell in rows["sex (f1 ↑)"]) == 1


def test_per_task_tables_gate_weights_and_splits(report):
    text = report.read_text(encoding="utf-8")
    header, rows = _table_after(text, "## sex: every metric")
    assert rows["auroc ↑"][header.index("majority")] == "n/a"
    assert rows["auroc ↑"][header.index("uniform")] == "**0.880 ± 0.010**"
    header, rows = _table_after(text, "## age: every metric")
    assert set(rows) == {"mae ↓", "median_ae ↓", "r2 ↑"}
    header, rows = _table_after(text, "## Mean gate weight per backbone")
    assert header == ["task", *BACKBONES]
    assert rows["rr"][header.index("moment")] == "0.500 ± 0.100"
    assert "ka" not in rows
    header, rows = _table_after(text, "## Seeds and ECGs per split")
    assert rows["age"][header.index("seeds")] == "2 (1, 2)"
    assert rows["age"][header.index("train")] == "140"
    assert rows["ka"][header.index("kind")] == "skipped"


def test_random_weights_warning_present(report):
    text = report.read_text(encoding="utf-8")
    assert "RANDOM weights" in text
    assert "not what pretrained models achieve" in text


def test_random_weights_warning_absent_for_pretrained(tmp_path):
    metrics_dir, predictions_dir = _write_inputs(tmp_path, random=False)
    text = write_report(metrics_dir, predictions_dir, tmp_path / "out").read_text()
    assert "RANDOM" not in text
    assert "7.12 ± 0.31" in text


def test_plots_are_written_and_linked(report):
    text = report.read_text(encoding="utf-8")
    expected = ["rr_pred_vs_true", "age_pred_vs_true", "sex_roc", "ad_confusion",
                *(f"{task}_gate_weights" for task in ("rr", "age", "sex", "ad"))]
    for name in expected:
        png = report.parent / "plots" / f"{name}.png"
        assert png.read_bytes().startswith(b"\x89PNG"), name
        assert f"(plots/{name}.png)" in text
    assert not list((report.parent / "plots").glob("ka_*"))


def test_a_report_stopped_while_drawing_leaves_the_previous_plots_whole(tmp_path,
                                                                         monkeypatch):
    import stages.report.plots as plots

    metrics_dir, predictions_dir = _write_inputs(tmp_path, random=True)
    out = tmp_path / "reports"
    summary = write_report(metrics_dir, predictions_dir, out)
    before = {p.name: p.read_bytes() for p in (out / "plots").iterdir()}
    text = summary.read_text()
    real, calls = plots.plot_gate_weights, [0]

    def stopped_at_the_third(*args, **kwargs):  # after the first tasks' plots are drawn
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_gate_weights", stopped_at_the_third)
    (predictions_dir / "rr.parquet").write_bytes((predictions_dir / "age.parquet").read_bytes())
    with pytest.raises(KeyboardInterrupt):
        write_report(metrics_dir, predictions_dir, out)
    assert {p.name: p.read_bytes() for p in (out / "plots").iterdir()} == before
    assert summary.read_text() == text
    assert sorted(p.name for p in out.iterdir()) == ["plots", "summary.md"]  # no leftovers


def test_missing_and_broken_inputs_do_not_crash(tmp_path):
    metrics_dir, predictions_dir = _write_inputs(tmp_path, random=True)
    (metrics_dir / "ad.json").unlink()
    (metrics_dir / "rr.json").write_text("{not json")
    (predictions_dir / "age.parquet").unlink()
    text = write_report(metrics_dir, predictions_dir, tmp_path / "out").read_text()
    assert "- `ad`: no ad.json" in text
    assert "- `rr`: unreadable rr.json" in text
    assert "age.parquet is absent" in text
    assert (tmp_path / "out" / "plots" / "sex_roc.png").is_file()


def test_tasks_left_out_of_params_are_not_reported(tmp_path):
    metrics_dir, predictions_dir = _write_inputs(tmp_path, random=True)
    (metrics_dir / "ka.json").unlink(missing_ok=True)
    text = write_report(metrics_dir, predictions_dir, tmp_path / "out",
                        tasks=["rr", "sex", "ad"]).read_text()
    assert "3 of 3 tasks fitted" in text
    assert "ka.json" not in text and "`age`" not in text


def test_empty_metrics_dir_says_run_fit_ensemble(tmp_path):
    (tmp_path / "metrics").mkdir()
    with pytest.raises(ValueError, match="fit-ensemble"):
        write_report(tmp_path / "metrics", tmp_path / "predictions", tmp_path / "out")


def test_format_cell():
    assert format_cell("mae", {"mean": 7.1234, "std": 0.3111}) == "7.12 ± 0.31"
    assert format_cell("mae", {"mean": 123.4, "std": 2.6}) == "123.4 ± 2.6"
    assert format_cell("mae", {"mean": 13.965, "std": 0.035}) == "13.965 ± 0.035"
    assert format_cell("mae", {"mean": 138.3, "std": 0.0}) == "138 ± 0"
    assert format_cell("f1", {"mean": 0.8, "std": 0.0123}) == "0.800 ± 0.012"
    assert format_cell("auroc", {"mean": None, "std": None}) == "n/a"


def test_roc_and_confusion_arithmetic():
    fpr, tpr = roc_curve_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert area_under(fpr, tpr) == pytest.approx(0.75)
    fpr, tpr = roc_curve_points(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5]))
    assert area_under(fpr, tpr) == pytest.approx(0.5)
    classes, matrix = confusion_matrix(np.array(["b", "b", "a", "a", "Other"]),
                                       np.array(["b", "a", "a", "a", "b"]))
    assert classes == ["a", "b", "Other"]
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0]])


def _report_of(root: Path, files: dict[str, dict]) -> str:
    """The report's text for a metrics folder holding just ``files`` (name -> JSON)."""
    metrics = root / "metrics"
    metrics.mkdir()
    for name, content in files.items():
        (metrics / name).write_text(json.dumps(content))
    return write_report(metrics, root / "predictions", root / "out").read_text()


def test_multitask_section_when_present(tmp_path):
    text = _report_of(tmp_path, {
        "rr.json": {"task": "rr", "skipped": "no labels"},
        "multitask.json": {"tasks": {
            "age": {"metric": "mae", "n_test": 10,
                    "multitask": {"mae": {"mean": 9.5, "std": 0.25}},
                    "combiner": {"gate": 2, "stacking": 1},
                    "single_task": {"mae": {"mean": 9.0, "std": 0.1}}},
            "ka": {"metric": "f1", "n_test": 10, "multitask": {"f1": {"mean": 0.4, "std": 0.1}},
                   "single_task": None}},
            "skipped": {"rr": "no rr labels in the test rows of a fold or split"}}})
    assert "## Multi-task model vs single-task ensembles" in text
    assert "| age (mae ↓) | 9.50 ± 0.25 | gate ×2, stacking ×1 | 9.00 ± 0.10 |" in text
    assert "| ka (f1 ↑) | 0.400 ± 0.100 | — | not comparable |" in text
    assert "rr: skipped (no rr labels in the test rows of a fold or split)" in text


def test_variants_section_bolds_the_best_and_adds_multitask(tmp_path):
    text = _report_of(tmp_path, {
        "ka.json": {"task": "ka", "skipped": "no labels"},
        "variants.json": {
            "seeds": [0, 1], "variants": {"enecg": {}, "moe": {"backbones": ["a", "rhythm"]}},
            "tasks": {"rr": {"metric": "mae", "variants": {
                "enecg": {"mae": {"mean": 62.7, "std": 1.0}},
                "moe": {"mae": {"mean": 4.8, "std": 0.2}}}},
                      "ka": {"metric": "f1", "variants": {}, "skipped": "no ka labels"}}},
        "multitask.json": {"tasks": {
            "rr": {"metric": "mae", "n_test": 5,
                   "multitask": {"mae": {"mean": 65.0, "std": 1.0}}, "single_task": None}}}})
    assert "## ECG-MoE variants: the ensemble per task" in text
    assert "| rr (mae ↓) | 62.7 ± 1.0 | **4.80 ± 0.20** | 65.0 ± 1.0 |" in text
    assert "| ka (skipped) | — | — | — |" in text
    assert "`moe`: backbones=['a', 'rhythm']" in text


def _report_with_rr(root: Path, edit) -> str:
    """The report's text after ``edit`` changed rr's metrics in place."""
    metrics_dir, predictions_dir = _write_inputs(root, random=False)
    rr = json.loads((metrics_dir / "rr.json").read_text())
    edit(rr)
    (metrics_dir / "rr.json").write_text(json.dumps(rr))
    return write_report(metrics_dir, predictions_dir, root / "out").read_text()


def test_intervals_differences_and_cross_validation_are_reported(tmp_path):
    def edit(rr):
        rr["methods"]["ensemble"]["mae"]["ci"] = [6.5, 7.9]
        rr["vs_ensemble"] = {"timesnet": {"mean": 0.877, "ci": [0.2, 1.5]}}
        rr["evaluation"] = {"mode": "cv", "folds": 5, "n_evaluated": 197}
    text = _report_with_rr(tmp_path, edit)
    assert "**7.12 ± 0.31 [6.50, 7.90]**" in text  # the headline, with its interval
    assert "rr 5-fold subject CV over 197 ECGs" in text
    assert "age the test split (20 ECGs)" in text
    assert "| Δ mae vs ensemble | — | — | — | +0.877 [+0.2, +1.5] |" in text


def test_the_chosen_combiner_is_named_per_task(tmp_path):
    text = _report_with_rr(tmp_path, lambda rr: rr.update(combiner={
        "setting": "select", "chosen": {"gate": 2, "rhythm": 13}, "cv_loss": {}}))
    assert "chosen afresh in every fit: rhythm in 13 of 15, gate in 2 of 15." in text
    assert text.count("chosen afresh in every fit") == 1  # the other tasks carry no choice


def test_a_synthetic_cohort_is_named_as_such(tmp_path):
    metrics_dir, predictions_dir = _write_inputs(tmp_path, random=False)
    assert "Synthetic cohort" not in write_report(metrics_dir, predictions_dir,
                                                  tmp_path / "a").read_text()
    for task in ("rr", "sex"):
        path = metrics_dir / f"{task}.json"
        metrics = json.loads(path.read_text())
        metrics["sources"] = {"synthetic": 150, "ptb-xl": 50}
        path.write_text(json.dumps(metrics))
    text = write_report(metrics_dir, predictions_dir, tmp_path / "b").read_text()
    assert "**Synthetic cohort.** 150 of 200 evaluated ECGs" in text
    assert "never how ECGs behave" in text

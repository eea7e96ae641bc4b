"""Stage two from the cache: learning, seeds, baselines, errors, the LoRA trainable set."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.feature_cache import ArraySpec, CacheBuilder, CacheError, write_shard
from pipeline.params import FitParams
from stages.fit.bootstrap import intervals
from stages.fit.model import Ensemble, ModelConfig
from stages.fit.run import TaskSkipped, fit_task, load_model, write_skipped

N, DIGEST = 600, "fakecohort000001"
CLASSES = ["AF", "Other", "Sinus"]


def _cohort(rng: np.random.Generator) -> pd.DataFrame:
    subjects = rng.integers(0, 200, N)
    split = np.array(["train", "val", "test"])[np.minimum(subjects // 70, 2)]  # by subject
    signal = rng.normal(size=N)
    return pd.DataFrame({
        "record_id": [f"r{i}" for i in range(N)], "subject_id": [f"s{s}" for s in subjects],
        "split": split, "signal": signal, "source": np.where(subjects < 20, "ptb-xl", "synthetic"),
        "rr": 800 + 150 * signal, "age": 60 + 10 * signal,
        "sex": np.where(signal > 0, "M", "F"),
        "ka": pd.array(np.where(signal > 1.3, 1, 0), dtype="Int8"),
        "ad": np.array(CLASSES)[np.digitize(signal, [-0.5, 0.5])],
    })


def _write_cache(folder, name, values):
    builder = CacheBuilder(folder / f"{name}.zarr", {"cohort_digest": DIGEST, "backbone": name,
                                                     "random_weights": True},
                           N, [ArraySpec("features", values.shape[1:])], shard_rows=128)
    for shard in builder.pending_shards():
        start, stop = builder.shard_bounds(shard)
        write_shard(builder.store_path, builder.done_dir, shard, start,
                    {"features": values[start:stop]})
    builder.publish()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A cohort whose labels are functions of a latent signal that one expert sees well,
    another weakly, plus a gate input: learning has something to find."""
    root = tmp_path_factory.mktemp("fake")
    rng = np.random.default_rng(0)
    cohort = _cohort(rng)
    table = pa.Table.from_pandas(cohort.drop(columns="signal"), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"cohort_digest": DIGEST.encode()}),
                   root / "cohort.parquet")
    s = cohort["signal"].to_numpy()[:, None]
    strong = np.hstack([s + 0.05 * rng.normal(size=(N, 1)), rng.normal(size=(N, 7))])
    weak = np.hstack([s + 1.0 * rng.normal(size=(N, 1)), rng.normal(size=(N, 5))])
    _write_cache(root / "cache", "strong", (strong * 0.01 + 3.0).astype(np.float32))
    _write_cache(root / "cache", "weak", weak.astype(np.float32))
    _write_cache(root / "cache", "gate", rng.normal(size=(N, 10)).astype(np.float32))
    return root, cohort


def _params(**kw) -> FitParams:
    base = dict(backbones=["strong", "weak"], gate_inputs=["gate"], seeds=2, hidden=32,
                max_epochs=60, patience=10, batch_size=64, evaluation="split", oof_folds=3,
                bootstrap=200, head_store=False)  # each test trains its heads (but test_head_store)
    return FitParams(**{**base, **kw})


@pytest.mark.parametrize("task,better", [("rr", "lower"), ("age", "lower"), ("sex", "higher"),
                                         ("ad", "higher")])
def test_the_ensemble_learns_and_beats_the_trivial_predictor(fake, task, better):
    root, cohort = fake
    result = fit_task(task, _params(), root / "cohort.parquet", root / "cache")
    metrics = result.metrics
    name = metrics["metric"]
    ensemble = metrics["methods"]["ensemble"][name]["mean"]
    baseline = "mean_predictor" if better == "lower" else "majority"
    trivial = metrics["methods"][baseline][name]["mean"]
    if better == "lower":
        assert ensemble < 0.5 * trivial
    else:
        assert ensemble > trivial + 0.2
    gate = metrics["gate_weights"]
    assert gate["strong"]["mean"] > gate["weak"]["mean"]  # the gate prefers the better expert
    expected = {"ensemble", "mean_predictor" if better == "lower" else "majority", "strong",
                "weak", "gate", "uniform", "greedy", "stacking", "weight_generator", "probe_strong",
                "probe_weak"} | ({"confidence"} if better == "higher" else set())
    assert set(metrics["methods"]) == expected
    # the interval is the subject bootstrap of the ensemble's own test predictions, seeds
    # averaged: recomputed from the predictions the fit writes
    rows = result.predictions
    seeds = [rows[rows.seed == s] for s in sorted(rows.seed.unique())]
    subject_of = cohort.set_index("record_id")["subject_id"].astype(str)
    again = intervals(name, seeds[0]["truth"].to_numpy(),
                      {"ensemble": np.stack([s["prediction"].to_numpy() for s in seeds])},
                      subject_of.loc[seeds[0]["record_id"]].to_numpy(), "ensemble",
                      n_boot=_params().bootstrap)
    assert metrics["methods"]["ensemble"][name]["ci"] == pytest.approx(again["ensemble"]["ci"])
    sources = metrics["sources"]  # evaluated (test) ECGs per archive, for the report
    assert set(sources) == {"synthetic"} and sum(sources.values()) == sum(metrics["n"].values()) \
        - metrics["n"]["train"] - metrics["n"]["val"]


def test_binary_metrics_and_class_weighted_rare_task(fake):
    root, _ = fake
    metrics = fit_task("ka", _params(), root / "cohort.parquet", root / "cache").metrics
    assert set(metrics["methods"]["ensemble"]) == {"f1", "auroc", "auprc"}
    assert metrics["methods"]["ensemble"]["auroc"]["mean"] > 0.9
    assert metrics["methods"]["majority"]["f1"]["mean"] == 0.0


def test_same_seed_same_result_and_seeds_differ(fake):
    root, _ = fake
    a = fit_task("age", _params(seeds=2), root / "cohort.parquet", root / "cache")
    b = fit_task("age", _params(seeds=2), root / "cohort.parquet", root / "cache")
    assert a.metrics == b.metrics
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    first, second = (a.predictions[a.predictions.seed == s]["prediction"].to_numpy()
                     for s in (0, 1))
    assert not np.array_equal(first, second)


def test_predictions_are_test_subjects_only(fake):
    root, cohort = fake
    result = fit_task("rr", _params(seeds=1), root / "cohort.parquet", root / "cache")
    predicted = cohort.set_index("record_id").loc[result.predictions["record_id"]]
    assert set(predicted["split"]) == {"test"}
    train_subjects = set(cohort.loc[cohort.split == "train", "subject_id"])
    assert not train_subjects & set(predicted["subject_id"])
    assert {"expert_strong", "gate_strong", "expert_weak", "gate_weak"} <= set(
        result.predictions.columns)
    weights = result.predictions[["gate_strong", "gate_weak"]].sum(axis=1)
    np.testing.assert_allclose(weights, 1.0, atol=1e-5)


def test_task_without_labels_is_skipped_with_a_reason(fake, tmp_path):
    root, _ = fake
    table = pq.read_table(root / "cohort.parquet")
    ka = pa.array([None] * N, type=pa.int8())
    table = table.set_column(table.schema.get_field_index("ka"), "ka", ka)
    pq.write_table(table, tmp_path / "cohort.parquet")
    with pytest.raises(TaskSkipped, match="no ka labels in the train, val, test"):
        fit_task("ka", _params(), tmp_path / "cohort.parquet", root / "cache")
    params = _params(metrics=str(tmp_path / "m"), predictions=str(tmp_path / "p"),
                     models=str(tmp_path / "models"))
    write_skipped("ka", "no ka labels", params)
    assert json.loads((tmp_path / "m" / "ka.json").read_text())["skipped"] == "no ka labels"
    assert (tmp_path / "p" / "ka.parquet").exists()


def test_missing_cache_and_cache_of_another_cohort(fake, tmp_path):
    root, _ = fake
    with pytest.raises(CacheError, match="run `pipeline extract --backbone absent`"):
        fit_task("rr", _params(backbones=["absent"]), root / "cohort.parquet", root / "cache")
    other = pq.read_table(root / "cohort.parquet").replace_schema_metadata(
        {b"cohort_digest": b"another"})
    pq.write_table(other, tmp_path / "cohort.parquet")
    with pytest.raises(CacheError, match="extracted from another cohort"):
        fit_task("rr", _params(), tmp_path / "cohort.parquet", root / "cache")


def test_saved_models_refuse_other_features(fake, tmp_path):
    root, _ = fake
    params = _params(seeds=1, metrics=str(tmp_path / "m"), predictions=str(tmp_path / "p"),
                     models=str(tmp_path / "models"))
    result = fit_task("rr", params, root / "cohort.parquet", root / "cache")
    result.write(params)
    path = tmp_path / "models" / "rr" / "seed0.pt"
    model, saved = load_model(path, result.fingerprints)
    assert saved["threshold"] is None and model.experts == ["strong", "weak"]
    changed = {**result.fingerprints, "weak": {**result.fingerprints["weak"],
                                               "weights_digest": "other"}}
    with pytest.raises(CacheError, match="trained on weak features"):
        load_model(path, changed)


def _peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head's weights as peft held them (before ``LoraLinear``), with peft's copy of the
    untrained output layer."""
    out = {}
    for name, value in state.items():
        for i in (0, 2):
            name = name.replace(f"mlp.{i}.base.", f"mlp.base_model.model.{i}.base_layer.")
            for ours, theirs in (("a", "A"), ("b", "B")):
                name = name.replace(f"mlp.{i}.lora_{ours}.",
                                    f"mlp.base_model.model.{i}.lora_{theirs}.default.")
        if ".mlp.4." in name:
            out[name.replace(".mlp.4.", ".mlp.base_model.model.4.original_module.")] = 0 * value
            name = name.replace(".mlp.4.", ".mlp.base_model.model.4.modules_to_save.default.")
        out[name] = value
    return out


def test_a_model_saved_before_bags_loads_with_one_head_per_expert(tmp_path):
    """Model files written before an expert was its fold heads' bag have no ``bag`` in
    their configuration, one head per expert in their weights, and peft's names for a
    LoRA head's weights: they still load."""
    config = ModelConfig(hidden=8, lora_r=2)
    model = Ensemble({"a": 4, "b": 3}, 5, 1, False, config).eval()
    described = config.describe()
    del described["bag"]
    state = _peft_names(model.state_dict())
    assert "heads.a.mlp.base_model.model.0.lora_A.default.weight" in state
    torch.save({"task": "rr", "classes": [], "dims": {"a": 4, "b": 3}, "gate_dim": 5,
                "model_config": described, "fingerprints": {}, "state_dict": state},
               tmp_path / "seed0.pt")
    loaded, _ = load_model(tmp_path / "seed0.pt", {})
    features, gate = {"a": torch.randn(6, 4), "b": torch.randn(6, 3)}, torch.randn(6, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features, gate)[0], model(features, gate)[0])


def test_streaming_features_give_a_working_model(fake):
    root, _ = fake
    metrics = fit_task("rr", _params(seeds=1, max_memory_gb=0.0), root / "cohort.parquet",
                       root / "cache").metrics
    assert metrics["methods"]["ensemble"]["mae"]["mean"] < \
        0.5 * metrics["methods"]["mean_predictor"]["mae"]["mean"]


def test_bf16_heads_and_gates_learn_what_float32_ones_learn(fake):
    """``fit.bf16`` runs the banks' products under bf16 autocast (weights, optimiser and
    losses in float32): the fit still learns, within a few percent of float32's."""
    root, _ = fake
    fits = {bf16: fit_task("rr", _params(seeds=1, bf16=bf16), root / "cohort.parquet",
                           root / "cache").metrics for bf16 in (False, True)}
    mae = {bf16: m["methods"]["ensemble"]["mae"]["mean"] for bf16, m in fits.items()}
    assert mae[True] != mae[False]  # it did run in another precision
    assert abs(mae[True] - mae[False]) < 0.1 * mae[False]
    assert mae[True] < 0.5 * fits[True]["methods"]["mean_predictor"]["mae"]["mean"]
    assert fits[True]["settings"]["bf16"] and not fits[False]["settings"]["bf16"]


def test_lora_trainable_set_is_what_the_config_says():
    lora = Ensemble({"a": 8, "b": 4}, 6, 3, True, ModelConfig(hidden=16, adapter="lora"))
    trainable = lora.trainable()
    for expert in ("a", "b"):
        names = trainable[expert]
        assert names and all(("lora_" in n and (".0." in n or ".2." in n))
                             or n.startswith(("mlp.4.", "skip.")) for n in names)
        assert {"skip.weight", "skip.bias"} <= set(names)  # the linear path learns fully
        assert {"mlp.4.weight", "mlp.4.bias"} <= set(names)  # output layer learns too
        frozen = [n for n, p in lora.heads[expert].named_parameters() if not p.requires_grad]
        assert sorted(frozen) == [f"mlp.{i}.base.{w}" for i in (0, 2) for w in ("bias", "weight")]
    assert trainable["gate"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    full = Ensemble({"a": 8}, 6, 3, True, ModelConfig(hidden=16, adapter="full"))
    assert sorted(full.trainable()["a"]) == sorted(n for n, _ in full.heads["a"].named_parameters())
    assert "gate" not in full.trainable()


def test_per_output_gate_gives_distributions():
    model = Ensemble({"a": 8, "b": 4}, 6, 3, True, ModelConfig(hidden=16,
                                                               gate_mode="per_output"))
    mixture, _, weights = model({"a": torch.randn(5, 8), "b": torch.randn(5, 4)},
                                      torch.randn(5, 6))
    assert weights.shape == (5, 2, 3)
    torch.testing.assert_close(mixture.sum(-1), torch.ones(5))
    torch.testing.assert_close(weights.sum(1), torch.ones(5, 3))


def test_phase_aware_gate_reads_several_stores(fake):
    root, _ = fake
    params = _params(seeds=1, gate_inputs=["gate", "weak"])
    result = fit_task("rr", params, root / "cohort.parquet", root / "cache")
    assert result.metrics["gate_inputs"] == ["gate", "weak"]
    assert result.gate_dim == 10 + 6  # lead-subset input and the extra store, side by side
    model = result.models[0]["model"]
    assert model.gate.net[0].in_features == 16
    assert result.metrics["methods"]["ensemble"]["mae"]["mean"] < \
        0.5 * result.metrics["methods"]["mean_predictor"]["mae"]["mean"]


def test_one_multitask_model_trains_with_partly_missing_labels(fake, tmp_path):
    from stages.fit.multitask import compare_with_single_task, fit_multitask

    root, cohort = fake
    table = pq.read_table(root / "cohort.parquet")
    rng = np.random.default_rng(3)
    for column in ("rr", "ka", "ad"):
        values = table.column(column).to_pylist()
        values = [None if rng.random() < 0.4 else v for v in values]  # 40% unlabelled
        index = table.schema.get_field_index(column)
        table = table.set_column(index, column, pa.array(values, type=table.schema.field(
            column).type))
    pq.write_table(table, tmp_path / "cohort.parquet")
    result = fit_multitask(_params(seeds=1), tmp_path / "cohort.parquet", root / "cache")
    assert set(result["tasks"]) == {"rr", "age", "sex", "ka", "ad"}
    rr, sex = result["tasks"]["rr"], result["tasks"]["sex"]
    assert rr["n_test"] < sex["n_test"]  # rr's missing labels are not scored
    trivial = np.abs(cohort["rr"] - cohort["rr"].mean()).mean()
    assert rr["multitask"]["mae"]["mean"] < 0.5 * trivial
    assert sex["multitask"]["f1"]["mean"] > 0.9
    compared = compare_with_single_task(result, tmp_path / "no-metrics")
    assert compared["tasks"]["rr"]["single_task"] is None
    assert "fit-ensemble --task rr" in compared["tasks"]["rr"]["single_task_note"]


@pytest.mark.parametrize("evaluation", ["split", "cv"])
def test_a_multitask_fit_of_one_task_is_that_tasks_fit(fake, tmp_path, evaluation):
    """With one task the multi-task heads are the task's own heads, and the rest of the fit
    (cross-fitting, combiner choice, evaluation) is the single-task fit's."""
    from stages.fit.multitask import fit_multitask

    root, _ = fake
    cohort = root / "cohort.parquet"
    if evaluation == "cv":  # no fixed split: its saved model's heads would share the pass
        table = pq.read_table(cohort)
        table = table.set_column(table.schema.get_field_index("split"), "split",
                                 pa.array(["train"] * table.num_rows))
        cohort = tmp_path / "cohort.parquet"
        pq.write_table(table, cohort)
    params = _params(seeds=1, evaluation=evaluation, cv_folds=3)
    joint = fit_multitask(params, cohort, root / "cache", ["rr"])
    single = fit_task("rr", params, cohort, root / "cache", baselines=False)
    assert joint["evaluation"] == single.metrics["evaluation"]["mode"] == evaluation
    assert joint["tasks"]["rr"]["n_test"] == single.metrics["evaluation"]["n_evaluated"]
    ours, theirs = joint["tasks"]["rr"]["multitask"]["mae"], \
        single.metrics["methods"]["ensemble"]["mae"]
    assert ours["mean"] == pytest.approx(theirs["mean"], rel=1e-5)
    assert ours["ci"] == pytest.approx(theirs["ci"], rel=1e-5)


def test_a_joint_head_learns_nothing_from_rows_unlabelled_for_a_task():
    from stages.fit.train import JointObjective, Objective, TaskColumns, heads_criterion

    rng = np.random.default_rng(0)
    labelled = rng.random(40) < 0.5
    out = torch.randn(2, 40, 4)
    members, chunk = torch.arange(2), np.arange(40)

    def loss(values: np.ndarray, classes: np.ndarray) -> torch.Tensor:
        joint = JointObjective([
            TaskColumns("rr", slice(0, 1), Objective(values, False, "l1"), labelled),
            TaskColumns("ad", slice(1, 4), Objective(classes, True), labelled)])
        criterion = heads_criterion([joint], np.zeros(0, dtype=np.int64), torch.device("cpu"))
        mask = torch.ones(2, 40, dtype=torch.bool)
        return criterion.mean(criterion.sums(out, chunk, mask, members))

    values, classes = rng.normal(size=40).astype(np.float32), rng.integers(0, 3, 40)
    other_values = np.where(labelled, values, 99.0).astype(np.float32)
    other_classes = np.where(labelled, classes, (classes + 1) % 3)
    assert torch.equal(loss(values, classes), loss(other_values, other_classes))
    assert not torch.equal(loss(values, classes), loss(values[::-1].copy(), classes))


def test_variants_fit_only_the_ensemble_and_reproduce_the_fit_stage(fake):
    from stages.fit.compare import compare_variants

    root, _ = fake
    params = _params(seeds=2)
    result = compare_variants(params, {"both": {}, "strong_only": {"backbones": ["strong"]}},
                              ["rr", "sex"], root / "cohort.parquet", root / "cache")
    full = fit_task("rr", params, root / "cohort.parquet", root / "cache").metrics
    assert result["tasks"]["rr"]["variants"]["both"] == full["methods"]["ensemble"]
    assert set(result["tasks"]["sex"]["variants"]) == {"both", "strong_only"}
    lean = fit_task("rr", params, root / "cohort.parquet", root / "cache", baselines=False)
    assert set(lean.metrics["methods"]) == {"ensemble", "mean_predictor", "strong", "weak"}


def test_a_variant_the_fit_stage_computed_reuses_its_metrics(fake, tmp_path):
    from stages.fit.compare import compare_variants

    root, _ = fake
    params = _params(seeds=1, metrics=str(tmp_path / "m"), predictions=str(tmp_path / "p"),
                     models=str(tmp_path / "models"))
    fit_task("rr", params, root / "cohort.parquet", root / "cache").write(params)
    saved = json.loads((tmp_path / "m" / "rr.json").read_text())
    saved["methods"]["ensemble"]["mae"]["mean"] = -1.0  # marks the reused values
    saved["methods"]["gate"]["mae"]["mean"] = -2.0
    (tmp_path / "m" / "rr.json").write_text(json.dumps(saved))
    result = compare_variants(params, {"same": {}, "gate": {"combiner": "gate"},
                                       "small_gate": {"combiner": "gate", "gate_hidden": 8}},
                              ["rr"], root / "cohort.parquet", root / "cache")
    assert result["tasks"]["rr"]["variants"]["same"]["mae"]["mean"] == -1.0
    assert result["tasks"]["rr"]["variants"]["gate"]["mae"]["mean"] == -2.0  # select's gate
    assert result["tasks"]["rr"]["variants"]["small_gate"]["mae"]["mean"] > 0  # fitted
    # a fit made with any other setting (here the heads' learning rate) is fitted anew
    other = dataclasses.replace(params, lr=params.lr * 3)
    result = compare_variants(other, {"same": {}}, ["rr"], root / "cohort.parquet",
                              root / "cache")
    assert result["tasks"]["rr"]["variants"]["same"]["mae"]["mean"] > 0


def test_variants_cross_fit_shared_heads_once(fake, monkeypatch):
    from stages.fit.compare import compare_variants

    root, _ = fake
    calls = _count_heads(monkeypatch)
    params = _params(seeds=1)
    result = compare_variants(params, {"both": {}, "strong_only": {"backbones": ["strong"]},
                                       "plain_gate": {"gate_hidden": 8}},
                              ["rr"], root / "cohort.parquet", root / "cache")
    assert sorted(calls) == ["strong", "weak"]  # three variants, each head fitted once
    alone = fit_task("rr", _params(seeds=1, backbones=["strong"]), root / "cohort.parquet",
                     root / "cache", baselines=False).metrics
    assert result["tasks"]["rr"]["variants"]["strong_only"] == alone["methods"]["ensemble"]


def test_streamed_and_in_memory_sources_give_the_same_batches_and_scaling(fake, monkeypatch):
    from stages.fit.features import FeatureSource, load_features

    root, cohort = fake
    open_ = lambda gb: load_features(root / "cache", ["strong", "weak"], DIGEST, N,  # noqa: E731
                                     max_memory_gb=gb, gate_inputs=["gate", "weak"])
    memory, stream = open_(10.0), open_(0.0)
    assert memory.in_memory and not stream.in_memory
    assert stream.dims() == memory.dims() == {"strong": 8, "weak": 6, "gate": 16}
    rows = np.flatnonzero(cohort["split"].to_numpy() == "train")
    for source in (memory, stream):
        source.fit_scaling(rows)
    for name, (mean, std) in memory.scaling.items():
        np.testing.assert_allclose(stream.scaling[name][0], mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stream.scaling[name][1], std, rtol=1e-6)
    np.testing.assert_allclose(memory.take(rows)["weak"].mean(axis=0), 0, atol=1e-5)
    val = np.flatnonzero(cohort["split"].to_numpy() == "val")
    expect = list(memory.batches(val, 32, None))
    stream.max_memory_gb = 1.0
    stream.hold(val)
    monkeypatch.setattr(FeatureSource, "load", lambda *a, **k: pytest.fail("read from disk"))
    got = list(stream.batches(val, 32, None))
    assert len(got) == len(expect)
    for chunk, data in got:
        for name, values in data.items():
            np.testing.assert_array_equal(values, memory.take(chunk)[name])


def _numbers(tree: dict, path: str = "") -> dict[str, float]:
    """Every number of nested metrics, by its path."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{path}{key}."))
        elif isinstance(value, list):
            out.update({f"{path}{key}.{i}": v for i, v in enumerate(value)})
        else:
            out[f"{path}{key}"] = value
    return out


def _count_heads(monkeypatch) -> list[str]:
    """The experts of every head ``cross_fit`` trains from here on."""
    import stages.fit.run as run

    trained: list[str] = []
    real = run.cross_fit

    def counting(jobs, *args, **kwargs):
        trained.extend(name for name, _, _ in jobs)
        return real(jobs, *args, **kwargs)

    monkeypatch.setattr(run, "cross_fit", counting)
    return trained


def _count_probes(monkeypatch) -> list[str]:
    """The experts of every linear probe ``cross_fit_probes`` fits from here on."""
    import stages.fit.run as run

    probed: list[str] = []
    real = run.cross_fit_probes

    def counting(jobs, *args, **kwargs):
        probed.extend(job.name for job in jobs)
        return real(jobs, *args, **kwargs)

    monkeypatch.setattr(run, "cross_fit_probes", counting)
    return probed


def test_stored_heads_are_reused_only_under_the_same_key(fake, tmp_path, monkeypatch, caplog):
    import shutil

    root, _ = fake
    cache = tmp_path / "cache"
    for name in ("strong", "weak", "gate"):
        shutil.copytree(root / "cache" / f"{name}.zarr", cache / f"{name}.zarr")
    trained = _count_heads(monkeypatch)
    probed = _count_probes(monkeypatch)
    params = _params(head_store=True)
    first = fit_task("rr", params, root / "cohort.parquet", cache).metrics
    assert sorted(trained) == ["strong", "strong", "weak", "weak"]  # 2 experts x 2 seeds
    assert sorted(probed) == sorted(trained)  # their linear probes, cross-fitted alike
    stored = sorted((cache / "heads").rglob("*.pt"))
    assert len(stored) == 8
    trained.clear()
    probed.clear()
    again = fit_task("rr", params, root / "cohort.parquet", cache).metrics
    assert trained == [] and probed == [] and again["methods"] == first["methods"]
    stored = [path for path in stored if "head" in torch.load(path, weights_only=True)]
    # a gate setting keeps every head; a head setting or another task trains them anew
    fit_task("rr", _params(head_store=True, gate_hidden=8), root / "cohort.parquet", cache)
    assert trained == []
    fit_task("rr", _params(head_store=True, lr=3e-3), root / "cohort.parquet", cache)
    fit_task("age", params, root / "cohort.parquet", cache)
    assert len(trained) == 8
    # an unreadable stored head is trained again, with a warning, and replaced whole
    trained.clear()
    stored[0].write_bytes(stored[0].read_bytes()[:100])
    with caplog.at_level("WARNING"):
        again = fit_task("rr", params, root / "cohort.parquet", cache).metrics
    assert len(trained) == 1 and "unreadable stored head" in caplog.text
    # retrained in a bank of one, not of four, it is the same head to float rounding
    # (tests/test_bank.py), and so is every number of the fit
    assert _numbers(again["methods"]) == pytest.approx(_numbers(first["methods"]), rel=1e-6,
                                                       abs=1e-6)
    assert not [p for p in (cache / "heads").rglob("*") if p.name.startswith(".")]


def test_a_shared_head_store_serves_copies_of_the_workspace(fake, tmp_path, monkeypatch):
    """`fit.head_store: <folder>`: a queued `dvc exp run` works in a copy of the workspace
    (features checked out, no heads); with a shared folder it trains no head again."""
    import shutil

    root, _ = fake
    shared = tmp_path / "shared"
    params = _params(head_store=str(shared), seeds=1)
    trained = _count_heads(monkeypatch)
    for copy in ("workspace", "experiment"):
        for name in ("strong", "weak", "gate"):
            shutil.copytree(root / "cache" / f"{name}.zarr", tmp_path / copy / f"{name}.zarr")
        fit_task("rr", params, root / "cohort.parquet", tmp_path / copy)
    assert sorted(trained) == ["strong", "weak"]  # by the first copy only
    assert list(shared.rglob("*.pt")) and not (tmp_path / "workspace" / "heads").exists()


def test_the_multitask_fit_reuses_the_single_task_fits_probes(fake, tmp_path, monkeypatch):
    """On a fixed split a task's rows are the same in both fits, so `dvc repro`'s fit-all
    reads the fit stage's cross-fitted linear probes instead of fitting them again."""
    import shutil

    from stages.fit.multitask import fit_multitask

    root, _ = fake
    cache = tmp_path / "cache"
    for name in ("strong", "weak", "gate"):
        shutil.copytree(root / "cache" / f"{name}.zarr", cache / f"{name}.zarr")
    params = _params(head_store=True, seeds=1)
    fit_task("rr", params, root / "cohort.parquet", cache)
    probed = _count_probes(monkeypatch)
    fit_multitask(params, root / "cohort.parquet", cache, ["rr", "sex"])
    assert sorted(probed) == ["strong", "weak"]  # sex's only: rr's are the fit stage's


def test_a_head_trained_alone_is_the_head_trained_with_others(fake):
    from stages.fit.head_store import HeadMemo

    root, _ = fake
    together, alone = HeadMemo(), HeadMemo()
    fit_task("rr", _params(seeds=1), root / "cohort.parquet", root / "cache", baselines=False,
             memo=together)
    fit_task("rr", _params(seeds=1, backbones=["strong"]), root / "cohort.parquet",
             root / "cache", baselines=False, memo=alone)  # first in both: the same seed
    assert len(alone.held) == 1 and set(alone.held) < set(together.held)
    for key, fit in alone.held.items():
        np.testing.assert_allclose(fit.outputs, together.held[key].outputs, atol=1e-5)

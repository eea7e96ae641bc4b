"""Stage two's guarantees: out-of-fold gating, the Table 3 combiners on cases with known
answers, subject-grouped cross-validation and bootstrap intervals that cover the truth."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stages.fit.crossfit as crossfit
import stages.fit.select as select
from pipeline.feature_cache import ArraySpec, CacheBuilder, write_shard
from pipeline.params import FitParams
from stages.fit.bootstrap import intervals, metric_value
from stages.fit.combine import (
    Stacker,
    Weighting,
    WeightingInput,
    apply_weightings,
    confidence_weights,
    fit_weightings,
    fixed_mixture,
    greedy_weights,
    ridge_gcv,
)
from stages.fit.crossfit import ProbeJob, cross_fit_probes, group_folds
from stages.fit.features import GATE, FeatureSource
from stages.fit.model import Bag, ModelConfig, make_head
from stages.fit.probes import linear_probe
from stages.fit.run import cv_rows, fit_task
from stages.fit.train import Objective

N, DIGEST = 200, "fakecohort000001"


def _write_cache(folder, name, values):
    builder = CacheBuilder(folder / f"{name}.zarr", {"cohort_digest": DIGEST, "backbone": name},
                           len(values), [ArraySpec("features", values.shape[1:])],
                           shard_rows=64)
    for shard in builder.pending_shards():
        start, stop = builder.shard_bounds(shard)
        write_shard(builder.store_path, builder.done_dir, shard, start,
                    {"features": values[start:stop]})
    builder.publish()


def _source(arrays: dict[str, np.ndarray]) -> FeatureSource:
    source = FeatureSource({k: v.astype(np.float32) for k, v in arrays.items()},
                           {}, in_memory=True, block_rows=len(next(iter(arrays.values()))))
    source.materialise()
    return source


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """200 ECGs of 120 subjects: one expert measures RR (+ 5 ms noise), three are noise
    wide enough to memorise their training rows."""
    root = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(1)
    subjects = rng.integers(0, 120, N)
    rr = rng.normal(850, 150, N)
    split = np.array(["train", "val", "test"])[np.minimum(subjects // 40, 2)]
    table = pa.table({"record_id": [f"r{i}" for i in range(N)],
                      "subject_id": [f"s{s}" for s in subjects], "split": split, "rr": rr})
    pq.write_table(table.replace_schema_metadata({b"cohort_digest": DIGEST.encode()}),
                   root / "cohort.parquet")
    measure = np.hstack([(rr + rng.normal(0, 5, N))[:, None], rng.normal(size=(N, 3))])
    _write_cache(root / "cache", "measure", measure.astype(np.float32))
    for k in range(3):
        _write_cache(root / "cache", f"noise{k}", rng.normal(size=(N, 64)).astype(np.float32))
    _write_cache(root / "cache", "gate", rng.normal(size=(N, 8)).astype(np.float32))
    return root, rr, measure[:, 0]


def _params(**kw) -> FitParams:
    base = dict(backbones=["measure", "noise0", "noise1", "noise2"], gate_inputs=["gate"],
                seeds=1, hidden=32, max_epochs=80, patience=10, evaluation="cv", cv_folds=3,
                oof_folds=3, bootstrap=200, head_store=False)  # every test trains its heads
    return FitParams(**{**base, **kw})


def test_an_expert_that_measures_the_target_is_not_drowned_by_noisy_ones(noisy):
    root, rr, measured = noisy
    metrics = fit_task("rr", _params(), root / "cohort.parquet", root / "cache").metrics
    read_off = float(np.abs(measured - rr).mean())
    ensemble = metrics["methods"]["ensemble"]["mae"]["mean"]
    assert metrics["evaluation"]["mode"] == "cv" and metrics["evaluation"]["n_evaluated"] == N
    assert ensemble < 1.2 * read_off < 0.1 * metrics["methods"]["mean_predictor"]["mae"]["mean"]
    assert metrics["gate_weights"]["measure"]["mean"] > 0.8
    assert ensemble <= min(metrics["methods"][f"noise{k}"]["mae"]["mean"] for k in range(3))


def _spy_heads(monkeypatch) -> tuple[list[list[set]], list[tuple]]:
    """Record each heads' pass: the rows every member was fitted on (``plans``), and each
    ``cross_fit`` call's (jobs, splits, result), where every head outputs its own index."""
    import stages.fit.run as run

    plans: list[list[set]] = []
    calls: list[tuple] = []
    real_train, real_predict, real_cross = (crossfit.train_banks, crossfit.predict_banks,
                                            run.cross_fit)

    def spy_train(banks, reader, criterion, train, val, **kw):
        plans.append([set(rows.tolist()) for rows in train])
        return real_train(banks, reader, criterion, train, val, **kw)

    def spy_predict(banks, reader, rows, batch_size):
        out = real_predict(banks, reader, rows, batch_size)
        return torch.arange(len(out), dtype=out.dtype)[:, None, None].expand_as(out).clone()

    def spy_cross(jobs, splits, *args, **kwargs):
        calls.append((jobs, splits, real_cross(jobs, splits, *args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(crossfit, "train_banks", spy_train)
    monkeypatch.setattr(crossfit, "predict_banks", spy_predict)
    monkeypatch.setattr(run, "cross_fit", spy_cross)
    return plans, calls


def test_each_expert_is_deployed_as_its_fold_heads_averaged(noisy, monkeypatch):
    """No head is refitted on every training row (a sixth more training): an expert's
    deployed head is the bag of its cross-fitting folds' heads, each fitted without one
    fold, answering with their average, and the model file rebuilds it."""
    root, _, _ = noisy
    plans: list[list[set]] = []
    real_train = crossfit.train_banks

    def spy_train(banks, reader, criterion, train, val, **kw):
        plans.append([set(rows.tolist()) for rows in train])
        return real_train(banks, reader, criterion, train, val, **kw)

    monkeypatch.setattr(crossfit, "train_banks", spy_train)
    result = fit_task("rr", _params(evaluation="split", bootstrap=0), root / "cohort.parquet",
                      root / "cache", baselines=False)
    train = set(np.flatnonzero(pq.read_table(root / "cohort.parquet")["split"].to_numpy()
                               == "train").tolist())
    assert len(plans[0]) == 4 * 3  # experts x folds, nothing more
    assert all(fitted < train for fitted in plans[0])  # each leaves a fold out
    assert result.config.bag == 3
    model = next(iter(result.models.values()))["model"]
    for head in model.heads.values():
        assert isinstance(head, Bag) and len(head.heads) == 3
        x = torch.randn(7, head.heads[0].d_in)
        with torch.no_grad():
            torch.testing.assert_close(head(x), torch.stack([h(x) for h in head.heads]).mean(0))
            loaded = make_head(head.heads[0].d_in, 1, result.config)
            loaded.load_state_dict(head.state_dict())
            torch.testing.assert_close(loaded.eval()(x), head(x))


@pytest.mark.parametrize("combiner", ["select", "gate"])
def test_no_combiner_learns_from_rows_its_experts_were_fitted_on(noisy, monkeypatch, combiner):
    root, _, _ = noisy
    plans, calls = _spy_heads(monkeypatch)
    learnt: dict[str, list[np.ndarray]] = {}

    def spy_learner(method: str):
        real = getattr(select.Combiners, method)

        def learn(self, *args):  # the gate and the stacker fit a list of jobs at once
            fitted_on = ([job[0] for job in args[0]] if method in ("_gate", "_stacking")
                         else [args[0]])
            learnt.setdefault(method, []).extend(rows.copy() for rows in fitted_on)
            return real(self, *args)
        return learn

    for method in ("_gate", "_stacking", "_greedy", "_median"):
        monkeypatch.setattr(select.Combiners, method, spy_learner(method))
    fit_task("rr", _params(evaluation="split", bootstrap=0, combiner=combiner),
             root / "cohort.parquet", root / "cache", baselines=False)
    train = np.flatnonzero(pq.read_table(root / "cohort.parquet")["split"].to_numpy()
                           == "train")
    assert len(calls) == 1  # every head of the fit, of every seed, in one pass
    for fits in calls[0][2].values():
        heads = fits.outputs[train, 0].astype(int)  # which head predicted each training row
        for row, head in zip(train, heads, strict=True):
            assert row not in plans[0][head]  # no head predicts a row it was fitted on
    expected = {"_gate", "_stacking", "_greedy", "_median"} if combiner == "select" \
        else {"_gate"}
    assert set(learnt) == expected
    for fitted_on in learnt.values():  # combiners learn from training rows' OOF outputs only
        assert all(set(rows.tolist()) <= set(train.tolist()) for rows in fitted_on)
    assert set(learnt["_gate"][-1].tolist()) == set(train.tolist())  # the gate kept: all


def test_cross_validation_fits_every_head_in_one_pass_and_none_predicts_its_own_rows(
        noisy, monkeypatch):
    root, _, _ = noisy
    plans, calls = _spy_heads(monkeypatch)
    fit_task("rr", _params(seeds=2, bootstrap=0, max_epochs=5), root / "cohort.parquet",
             root / "cache", baselines=False)
    assert len(calls) == 1  # the folds of both seeds, and the saved model's heads
    jobs, splits, fitted = calls[0]
    assert len(splits) == 2 * 3 + 1  # 3 cross-validation folds per seed + the fixed split
    assert len({(name, seed) for name, seed, _ in jobs}) == 4 * 2
    for job in jobs:
        rows = splits[job[2]].rows
        every = np.concatenate(list(rows.values()))
        heads = fitted[job].outputs[every, 0].astype(int)
        for row, head in zip(every, heads, strict=True):
            assert row not in plans[0][head]  # no head predicts a row it was fitted on
        assert set(rows["test"].tolist()).isdisjoint(
            set().union(*(plans[0][h] for h in np.unique(heads))))


def test_group_folds_and_cross_validation_keep_subjects_apart():
    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 37, 300).astype(str)
    folds = group_folds(subjects, 5, seed=3)
    for s in np.unique(subjects):
        assert len(set(folds[subjects == s])) == 1
    sizes = np.bincount(folds)
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= np.bincount(
        np.unique(subjects, return_inverse=True)[1]).max()
    labelled = np.flatnonzero(rng.random(300) < 0.9)
    tested = []
    for rows in cv_rows(labelled, subjects, 5, seed=0):
        groups = {k: set(subjects[v]) for k, v in rows.items()}
        assert not groups["train"] & groups["val"]
        assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
        tested.extend(rows["test"].tolist())
    assert sorted(tested) == labelled.tolist()  # every labelled ECG predicted exactly once


def test_stratified_folds_give_a_rare_class_to_every_validation_set():
    """6 positive subjects of 88 (the 200-ECG cohort's potassium labels): unstratified,
    some validation sets had none, and their heads trained to the epoch limit."""
    rng = np.random.default_rng(4)
    subjects = rng.integers(0, 88, 200).astype(str)
    positive = np.isin(subjects, np.unique(subjects)[:6])
    y = positive.astype(np.int64)
    labelled = np.arange(200)
    for seed in range(3):
        folds = group_folds(subjects, 5, seed, strata=y)
        for s in np.unique(subjects):
            assert len(set(folds[subjects == s])) == 1
        assert all(positive[folds == f].any() for f in range(5))
        sizes = np.bincount(folds)
        assert sizes.max() - sizes.min() <= 2 * np.bincount(
            np.unique(subjects, return_inverse=True)[1]).max()
        for rows in cv_rows(labelled, subjects, 5, seed, strata=y):
            assert y[rows["test"]].any()
            assert y[rows["val"]].any()  # the pool's 5-6 positive subjects, one per fold
    unstratified = [[y[r["val"]].any() for r in cv_rows(labelled, subjects, 5, seed)]
                    for seed in range(3)]
    assert not all(map(all, unstratified))  # what stratifying changes


def test_multi_task_folds_are_stratified_by_each_rows_rarest_class():
    """The multi-task fit's folds span every task's labels; each row counts as its rarest
    (task, class), so potassium's few positives reach every validation set there too."""
    import pandas as pd

    from stages.fit.multitask import _rarest_class
    from stages.fit.tasks import TASKS, encode

    rng = np.random.default_rng(5)
    subjects = rng.integers(0, 88, 200).astype(str)
    ka = np.isin(subjects, np.unique(subjects)[:6]).astype(float)
    ka[:10] = np.nan  # unlabelled for ka
    cohort = pd.DataFrame({"rr": rng.normal(800, 100, 200),
                           "sex": np.where(rng.random(200) < 0.4, "M", "F"),
                           "ka": pd.array(ka, dtype="Int64")})
    targets = {n: encode(TASKS[n], cohort[n], np.ones(200, dtype=bool))
               for n in ("rr", "sex", "ka")}
    strata = _rarest_class(targets)
    positive = ka == 1
    assert set(strata[positive]) == {"ka:1"}
    assert set(strata[~positive]) <= {"sex:0", "sex:1"}  # the sexes are rarer than ka = 0
    assert set(_rarest_class({"rr": targets["rr"]})) == {"-"}
    for seed in range(3):
        for rows in cv_rows(np.arange(200), subjects, 5, seed, strata):
            assert positive[rows["val"]].any() and positive[rows["test"]].any()


def test_cross_validated_fit_predicts_every_labelled_ecg_once_per_seed(noisy):
    root, _, _ = noisy
    result = fit_task("rr", _params(seeds=2, backbones=["measure", "noise0"]),
                      root / "cohort.parquet", root / "cache")
    for _, frame in result.predictions.groupby("seed"):
        assert sorted(frame["record_id"]) == sorted(f"r{i}" for i in range(N))
        assert set(frame["fold"]) == {0, 1, 2}
    lo, hi = result.metrics["methods"]["ensemble"]["mae"]["ci"]
    assert lo <= result.metrics["methods"]["ensemble"]["mae"]["mean"] <= hi
    assert result.models  # a deployable model is fitted on the fixed split besides


def _objective(y, classification=False):
    return Objective(y, classification, "mse")


def test_greedy_selection_finds_the_good_expert_and_complementary_pairs():
    rng = np.random.default_rng(0)
    y = rng.normal(size=400).astype(np.float32)
    error = rng.normal(size=400).astype(np.float32)
    outputs = np.stack([y + 3 * error, y + 0.01 * error, -y], axis=1)[..., None]
    np.testing.assert_allclose(greedy_weights(outputs, y, _objective(y)), [0, 1, 0])
    pair = np.stack([y + error, y - error, y + 5 * error], axis=1)[..., None]
    weights = greedy_weights(pair, y, _objective(y), rounds=20)
    np.testing.assert_allclose(weights, [0.5, 0.5, 0], atol=0.05)
    np.testing.assert_allclose(fixed_mixture(pair, weights)[:, 0], y, atol=0.25)


def test_confidence_weighting_follows_the_confident_expert():
    confident = np.array([[0.0, 1.0, 0.0]])
    unsure = np.full((1, 3), 1 / 3)
    probabilities = np.stack([confident, unsure], axis=1)  # (1, 2 experts, 3 classes)
    np.testing.assert_allclose(confidence_weights(probabilities), [[0.75, 0.25]])


def test_stacking_recovers_a_linear_blend_and_the_informative_expert():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 300)).astype(np.float32)
    y = 0.3 * a + 0.7 * b
    outputs = np.stack([a, b], axis=1)[..., None]
    stacker = Stacker(False, 1).fit(outputs, y, outputs, y, _objective(y))
    np.testing.assert_allclose(stacker.predict(outputs)[:, 0], y, atol=0.01)
    labels = rng.integers(0, 3, 300)
    good = np.eye(3)[labels] * 0.8 + 0.2 / 3
    bad = rng.dirichlet(np.ones(3), 300)
    probs = np.stack([bad, good], axis=1).astype(np.float32)
    stacker = Stacker(True, 3).fit(probs, labels, probs, labels, _objective(labels, True))
    assert (stacker.predict(probs).argmax(1) == labels).mean() > 0.99


def test_linear_probe_reads_a_linear_feature():
    rng = np.random.default_rng(0)
    y = rng.normal(size=300).astype(np.float32)
    x = np.hstack([2 * y[:, None] + 1, rng.normal(size=(300, 5))])
    source = _source({"x": x, GATE: rng.normal(size=(300, 2))})
    rows = {"train": np.arange(200), "val": np.arange(200, 250), "test": np.arange(250, 300)}
    source.fit_scaling(rows["train"])
    _, out = linear_probe("x", source, _objective(y), rows, 1, False)
    np.testing.assert_allclose(out["test"][:, 0], y[250:], atol=0.02)
    subjects = np.array([f"s{i // 3}" for i in range(300)])
    (crossed,) = cross_fit_probes([ProbeJob("x", rows, _objective(y), 0)], source, subjects, 1,
                                  False, 4)
    np.testing.assert_allclose(crossed.outputs[250:], out["test"])  # refitted on all train
    np.testing.assert_allclose(crossed.outputs[:200, 0], y[:200], atol=0.02)  # out of fold
    assert not np.allclose(crossed.outputs[:200], crossed.linear.predict(
        source.take(rows["train"], ["x"])["x"]))  # ... which is not the refit's output


def test_a_gate_routes_each_sample_to_the_expert_its_input_says_is_right():
    rng = np.random.default_rng(0)
    n = 600
    y = rng.normal(size=n).astype(np.float32)
    which = rng.integers(0, 2, n)
    noise = 2 * rng.normal(size=(n, 2)).astype(np.float32)
    outputs = np.stack([y + noise[:, 0] * which, y + noise[:, 1] * (1 - which)], axis=1)
    source = _source({GATE: np.stack([which, 1 - which], axis=1)})
    reads = WeightingInput(2, lambda d: d[GATE], [GATE])
    gates = fit_weightings({"gate": (reads, [Weighting(
        outputs[..., None], _objective(y), [np.arange(400)], np.arange(400, 500), 0)])},
        source, ModelConfig(gate_hidden=16), lr=0.01, weight_decay=0.0, batch_size=64,
        max_epochs=200, patience=20, prior=0.0)
    mixture, weights = apply_weightings(gates, "gate", reads, source, outputs[..., None],
                                        np.arange(500, 600), False, 64)
    mixture, weights = mixture[0], weights[0]
    assert np.abs(mixture[:, 0] - y[500:]).mean() < 0.1 < np.abs(outputs[500:] - y[500:, None]
                                                                  ).mean()
    assert (weights[:, 0] > 0.9).mean() > 0.9 * (which[500:] == 0).mean()


@pytest.mark.parametrize("classification", [False, True])
def test_a_gate_trained_with_other_splits_gates_is_the_gate_trained_alone(classification):
    """``prefit_splits`` trains the gates of every seed and fold in one bank, and the weight
    generators as a second bank of the same pass: a member mixes its own split's expert
    outputs for its own target (standardised, or classes weighed, on its split) and reads
    the gate input scaled by its own rows, as it would alone."""
    from stages.fit.bank import input_affine

    rng = np.random.default_rng(0)
    n = 300
    source = _source({GATE: rng.normal(size=(n, 3)) * [1.0, 5.0, 0.2] + [0.0, 3.0, -1.0],
                      "x": rng.normal(size=(n, 5))})
    train, val, test = np.arange(200), np.arange(200, 250), np.arange(250, 300)
    labels = rng.integers(0, 3, n)

    def split() -> tuple[np.ndarray, Objective]:
        if classification:
            outputs = rng.dirichlet(np.ones(3), size=(n, 2)).astype(np.float32)
            weight = torch.tensor(rng.uniform(0.5, 2.0, 3), dtype=torch.float32)
            return outputs, Objective(labels, True, class_weight=weight)
        y = rng.normal(size=n).astype(np.float32)
        return ((y[:, None] + rng.normal(size=(n, 2)) * [1.0, 0.3])[..., None]
                .astype(np.float32), Objective(y, False, "l1"))

    (first_out, first_goal), (own_out, own_goal) = split(), split()
    base, own = source.scaling_of(np.arange(n)), source.scaling_of(np.arange(150))
    settings = dict(lr=0.01, weight_decay=1e-4, batch_size=32, max_epochs=15, patience=4,
                    prior=0.1, expected=not classification)

    gate = WeightingInput(3, lambda d: d[GATE], [GATE])
    other = WeightingInput(5, lambda d: d["x"], ["x"])  # another input, as the generator's

    def fit(weightings: list[Weighting], member: int, also: dict | None = None) -> np.ndarray:
        banks = fit_weightings({"gate": (gate, weightings), **(also or {})}, source,
                               ModelConfig(gate_hidden=8), **settings)
        return apply_weightings(banks, "gate", gate, source, own_out, test,
                                classification, 32, slice(member, member + 1))[0][0]

    source.scaling = base
    together = fit([Weighting(first_out, first_goal, [train, train[:150]], val, 3),
                    Weighting(own_out, own_goal, [train], val, 3,
                              input_affine(base[GATE], own[GATE]))], member=2,
                   also={"other": (other, [Weighting(first_out, first_goal, [train], val, 9)])})
    source.scaling = own
    alone = fit([Weighting(own_out, own_goal, [train], val, 3)], member=0)
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("metric", ["mae", "accuracy", "f1"])
def test_bootstrap_intervals_cover_the_truth_at_about_their_level(metric):
    rng = np.random.default_rng(0)
    n, hits, trials = 80, 0, 300
    truth = {"mae": np.sqrt(2 / np.pi), "accuracy": 0.7, "f1": 0.6}[metric]
    for trial in range(trials):
        if metric == "mae":
            y, d = np.zeros(n), rng.normal(size=n)
        elif metric == "accuracy":
            y = np.zeros(n)
            d = (rng.random(n) > 0.7).astype(float)
        else:  # F1 of 0.6: tp / (tp + (fp + fn) / 2) with 60 % hits among positives
            y = (rng.random(n) < 0.5).astype(float)
            d = np.where(y == 1, rng.random(n) < 0.6, rng.random(n) < 0.2).astype(float)
            truth = 2 * 0.5 * 0.6 / (2 * 0.5 * 0.6 + 0.5 * 0.2 + 0.5 * 0.4)
        subjects = np.arange(n).astype(str)
        ci = intervals(metric, y, {"m": d[None]}, subjects, "m", n_boot=400, seed=trial
                       )["m"]["ci"]
        hits += ci[0] <= truth <= ci[1]
    assert 0.88 <= hits / trials <= 0.99
    assert metric_value("mae", np.zeros(3), np.array([1.0, -2.0, 3.0])) == 2.0


def test_subject_bootstrap_is_wider_when_a_subjects_ecgs_share_their_error():
    rng = np.random.default_rng(0)
    shared = np.repeat(rng.normal(size=40), 5)  # 40 subjects, 5 ECGs each, one error each
    y, subjects = np.zeros(200), np.repeat(np.arange(40), 5).astype(str)
    by_subject = intervals("mae", y, {"m": shared[None]}, subjects, "m", seed=1)["m"]["ci"]
    by_row = intervals("mae", y, {"m": shared[None]}, np.arange(200).astype(str), "m",
                       seed=1)["m"]["ci"]
    assert by_subject[1] - by_subject[0] > 1.5 * (by_row[1] - by_row[0])


def test_batches_limited_to_the_arrays_a_consumer_reads_equal_the_full_batches():
    rng = np.random.default_rng(0)
    source = _source({"a": rng.normal(size=(50, 3)), "b": rng.normal(size=(50, 4)),
                      GATE: rng.normal(size=(50, 2))})
    source.fit_scaling(np.arange(40))
    full = list(source.batches(np.arange(50), 16, np.random.default_rng(1)))
    lean = list(source.batches(np.arange(50), 16, np.random.default_rng(1), ["b"]))
    for (rows, everything), (same_rows, only_b) in zip(full, lean, strict=True):
        np.testing.assert_array_equal(rows, same_rows)
        assert list(only_b) == ["b"]
        np.testing.assert_array_equal(only_b["b"], everything["b"])


def test_too_few_subjects_for_cross_validation_skip_the_task_with_a_reason(noisy, tmp_path):
    from stages.fit.run import TaskSkipped

    root, _, _ = noisy
    table = pq.read_table(root / "cohort.parquet")
    subjects = pa.array([f"s{i % 2}" for i in range(N)])  # two subjects in all
    table = table.set_column(table.schema.get_field_index("subject_id"), "subject_id", subjects)
    pq.write_table(table, tmp_path / "cohort.parquet")
    with pytest.raises(TaskSkipped, match="2 labelled subjects for rr .* too few for 3-fold"):
        fit_task("rr", _params(), tmp_path / "cohort.parquet", root / "cache")


def _start(x: np.ndarray, y: np.ndarray, fitted: np.ndarray, test: np.ndarray,
           subjects: np.ndarray | None = None) -> np.ndarray:
    """A regression head's output before training, its linear path set as the fit sets it."""
    from stages.fit.bank import HeadBank
    from stages.fit.probes import robust_linear

    head = HeadBank(x.shape[1], 1, ModelConfig(hidden=8), [0])
    head.set_skip(0, *robust_linear(x[fitted], y[fitted],
                                    None if subjects is None else subjects[fitted]))
    with torch.no_grad():
        return head(torch.from_numpy(x[test].astype(np.float32)))[0, :, 0].numpy()


def test_linear_starts_fitted_together_are_the_ones_fitted_alone():
    """A split's heads get their linear starts from one batched call; each is the start
    ``robust_linear`` gives on the head's own rows, for tall (sparse fits batched), wide
    (linear programs) and wide-expert (ridge only) members."""
    from stages.fit.probes import robust_linear, robust_linears

    rng = np.random.default_rng(3)
    for n, d in ((150, 5), (150, 40), (150, 100)):
        y = rng.normal(size=n)
        x = y[:, None] * rng.uniform(0, 1, d) + rng.normal(size=(n, d))
        x[rng.random(n) < 0.05, 0] += 5.0  # a few rows where the best feature is far off
        subjects = rng.integers(0, 60, n).astype(str)
        folds = np.arange(n) % 5
        members = [np.flatnonzero(folds != f) for f in range(5)] + [np.arange(n)]
        members.append(np.arange(0, n, 4))  # 38 rows: fewer than 40 and 100 features
        together = robust_linears(x, y, subjects, members)
        for rows, start in zip(members, together, strict=True):
            (coef, intercept), alone = start.robust, robust_linear(x[rows], y[rows],
                                                                   subjects[rows])
            np.testing.assert_allclose(coef, alone[0], atol=1e-4)
            assert abs(intercept - alone[1]) < 1e-4
            plain = ridge_gcv(x[rows], y[rows])  # the probe's fit of the same rows
            np.testing.assert_allclose(start.plain[0], plain[0], atol=1e-9)


def test_a_regression_head_starts_as_a_robust_fit_of_its_linear_path():
    """Gradient descent from 40 ECGs left a head far from the linear map a feature already
    gives; the head now starts there, and one grossly wrong label does not pull it away."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=60).astype(np.float32)
    x = np.hstack([y[:, None], rng.normal(size=(60, 3))])
    labels = y.copy()
    labels[0] = 40.0  # one label wildly off
    out = _start(x, labels, np.arange(40), np.arange(50, 60))
    np.testing.assert_allclose(out, y[50:], atol=0.05)


def test_a_head_whose_feature_measures_the_target_starts_near_the_read_off(monkeypatch):
    """Like the rhythm expert's mean RR: one feature equals the target except on a few ECGs
    (a missed or extra beat), 16 correlated ones are noisier. The sparse median fit keeps the one
    feature; ridge alone spreads weight over all and lands several times further off."""
    import stages.fit.probes as probes

    rng = np.random.default_rng(1)
    n = 200
    y = rng.normal(size=n)

    def gross(fraction: float) -> np.ndarray:
        return np.where(rng.random(n) < fraction, rng.normal(0, 2, size=n), 0.0)

    columns = [y + 0.01 * rng.normal(size=n) + gross(0.03)]
    columns += [y + 0.3 * rng.normal(size=n) + gross(0.2) for _ in range(16)]
    x = np.stack(columns, axis=1).astype(np.float32)
    test = np.arange(150, 200)
    read_off = np.abs(x[test, 0] - y[test]).mean()

    def start_error() -> float:
        out = _start(x, y.astype(np.float32), np.arange(120), test, np.arange(n) // 2)
        return float(np.abs(out - y[test]).mean())

    sparse = start_error()
    monkeypatch.setattr(probes, "LAD_MAX_CELLS", 0)  # ridge on clipped labels only
    ridge = start_error()
    assert sparse < 2 * read_off
    assert ridge > 3 * sparse

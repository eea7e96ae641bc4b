"""The ensemble's combiner chosen by cross-validated loss, and saved as plain data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV

import stages.fit.run as run
from stages.fit.combine import Stacker
from stages.fit.features import FeatureSource, load_features
from stages.fit.model import ModelConfig
from stages.fit.run import cohort_digest, fit_task, load_model
from stages.fit.select import Combiners, apply_spec, choose, cross_validated_losses
from stages.fit.train import Objective, predict
from tests.test_fit import _params as fit_params
from tests.test_fit import fake  # noqa: F401  (the fixture)

N = 300
GATE_FIT = dict(lr=0.01, weight_decay=1e-4, batch_size=64, max_epochs=30, patience=5,
                prior=0.0, expected=True)


def _choice(outputs: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[str, dict]:
    """The combiner chosen for expert outputs (N, E) of a regression target ``y``."""
    rng = np.random.default_rng(seed)
    stacked = outputs[:, :, None].astype(np.float32)
    gate = rng.normal(size=(len(y), 4)).astype(np.float32)
    source = FeatureSource({"gate": gate}, {}, in_memory=True, block_rows=len(y))
    source.materialise()
    source.fit_scaling(np.arange(len(y)))
    objective = Objective(y.astype(np.float32), False, "l1")
    rows = np.arange(len(y))
    val = rows[::5]
    train = np.setdiff1d(rows, val)
    names = [f"e{i}" for i in range(outputs.shape[1])]
    learners = Combiners(stacked, names, objective, source, val, ModelConfig(gate_hidden=8),
                         GATE_FIT, seed, 64).learners
    subjects = np.array([f"s{i // 2}" for i in range(len(y))])
    per_row, scored, _ = cross_validated_losses(learners, train, subjects, objective, 3, seed)
    return (choose(per_row, subjects[scored], "gate", 0.05),
            {name: float(loss.mean()) for name, loss in per_row.items()})


def test_an_exact_expert_is_chosen_over_every_blend():
    rng = np.random.default_rng(0)
    y = rng.normal(size=N)
    outputs = np.stack([y + rng.normal(0, 1, N), y, y + rng.normal(0, 1, N)], axis=1)
    choice, losses = _choice(outputs, y)
    assert choice == "e1" and losses["e1"] == 0.0
    assert losses["e1"] < losses["uniform"] and losses["e1"] < losses["median"]


def test_experts_with_independent_errors_are_blended():
    rng = np.random.default_rng(1)
    y = rng.normal(size=N)
    outputs = np.stack([y + rng.normal(0, 0.5, N) for _ in range(4)], axis=1)
    choice, losses = _choice(outputs, y)
    assert choice not in ("e0", "e1", "e2", "e3", "median")
    assert losses[choice] < 0.75 * min(losses[f"e{i}"] for i in range(4))


def test_experts_that_know_nothing_fall_back_to_the_median():
    rng = np.random.default_rng(2)
    y = rng.normal(size=N)
    outputs = rng.normal(0, 1, (N, 3))
    choice, losses = _choice(outputs, y)
    assert choice in ("median", "stacking")  # ridge shrinks to its intercept, at best a tie
    assert losses[choice] < min(losses[f"e{i}"] for i in range(3))


def test_the_choice_is_a_pure_function_of_the_rows_and_seed():
    rng = np.random.default_rng(3)
    y = rng.normal(size=N)
    outputs = np.stack([y + rng.normal(0, s, N) for s in (0.3, 0.6, 1.0)], axis=1)
    assert _choice(outputs, y, seed=4) == _choice(outputs, y, seed=4)


def test_the_gate_is_replaced_only_when_the_evidence_is_clear():
    rng = np.random.default_rng(5)
    subjects = np.repeat(np.arange(100), 2)
    gate = rng.exponential(1.0, 200)
    lucky = gate + rng.normal(-0.05, 1.0, 200)  # lower mean loss, well within its noise
    clear = gate - 0.5 + rng.normal(0, 0.1, 200)
    assert choose({"gate": gate, "lucky": lucky}, subjects, "gate", 0.05) == "gate"
    assert choose({"gate": gate, "lucky": lucky}, subjects, "gate", 0.99) == "lucky"
    assert choose({"gate": gate, "lucky": lucky, "clear": clear}, subjects, "gate",
                  0.05) == "clear"
    # the paired error is per subject: one subject's 200 ECGs are one piece of evidence
    one_subject = np.zeros(200, dtype=int)
    assert choose({"gate": gate, "clear": clear}, one_subject, "gate", 0.05) == "gate"


def test_many_equal_candidates_rarely_replace_the_gate():
    """Fourteen candidates no better than the gate: the false-switch rate stays near alpha
    (a one-standard-error rule switched in most draws)."""
    rng = np.random.default_rng(6)
    subjects = np.arange(40)
    switched = 0
    for _ in range(200):
        gate = rng.exponential(1.0, 40)
        others = {f"c{i}": gate + rng.normal(0, 0.5, 40) for i in range(14)}
        switched += choose({"gate": gate, **others}, subjects, "gate", 0.05) != "gate"
    assert switched / 200 <= 0.1


@pytest.mark.parametrize("n_classes", [1, 2, 4])
def test_a_stacker_predicts_from_its_plain_state_as_scikit_learn_does(n_classes):
    rng = np.random.default_rng(n_classes)
    n, experts = 240, 3
    if n_classes == 1:
        outputs = rng.normal(size=(n, experts, 1)).astype(np.float32)
        y = outputs[:, :, 0] @ np.array([0.5, -1.0, 2.0]) + rng.normal(0, 0.1, n)
        stacker = Stacker(False, 1).fit(outputs, y, outputs, y, Objective(y, False))
        reference = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(outputs[:, :, 0], y)
        np.testing.assert_allclose(stacker.predict(outputs)[:, 0],
                                   reference.predict(outputs[:, :, 0]), rtol=1e-4, atol=1e-4)
        return
    logits = rng.normal(size=(n, experts, n_classes))
    outputs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    y = outputs[:, 0].argmax(axis=1)
    objective = Objective(y, True)
    stacker = Stacker(True, n_classes).fit(outputs, y, outputs, y, objective)
    saved = Stacker.from_state(stacker.state, True, n_classes)
    design = np.log(outputs).reshape(n, -1)
    reference = LogisticRegression(C=np.exp(0), max_iter=500)  # same family, any C
    reference.coef_ = np.asarray(stacker.state["coef"])
    reference.intercept_ = np.asarray(stacker.state["intercept"])
    reference.classes_ = np.asarray(stacker.state["classes"])
    np.testing.assert_allclose(saved.predict(outputs), reference.predict_proba(design),
                               rtol=1e-4, atol=1e-5)
    assert (saved.predict(outputs).argmax(1) == y).mean() > 0.8


@pytest.mark.parametrize("chosen", ["gate", "probe_strong", "stacking", "greedy"])
def test_a_saved_ensemble_reproduces_its_test_predictions(fake, tmp_path, monkeypatch,  # noqa: F811
                                                          chosen):
    root, _ = fake
    monkeypatch.setattr(run, "choose", lambda *args: chosen)
    params = fit_params(seeds=1, bootstrap=0, max_epochs=10, metrics=str(tmp_path / "m"),
                        predictions=str(tmp_path / "p"), models=str(tmp_path / "models"))
    result = fit_task("age", params, root / "cohort.parquet", root / "cache")
    result.write(params)
    model, saved = load_model(tmp_path / "models" / "age" / "seed0.pt", result.fingerprints)
    assert saved["combiner"]["name"] == chosen
    assert result.metrics["combiner"]["chosen"] == {chosen: 1}
    cohort = pd.read_parquet(root / "cohort.parquet")
    source = load_features(root / "cache", params.backbones, cohort_digest(
        root / "cohort.parquet"), len(cohort), params.max_memory_gb, params.inputs,
        params.gate_inputs)
    source.scaling = {k: tuple(a.numpy() for a in v)
                      for k, v in saved["feature_scaling"].items()}
    test = np.flatnonzero(cohort["split"].to_numpy() == "test")
    mixture, outputs, _ = predict(model, source, test, 64)
    features = source.take(test, params.backbones)
    values = apply_spec(saved["combiner"], outputs, mixture, False, features)[:, 0]
    values = values * saved["target_scale"]["std"] + saved["target_scale"]["mean"]
    written = pd.read_parquet(tmp_path / "p" / "age.parquet").set_index("record_id")
    np.testing.assert_allclose(values, written.loc[cohort["record_id"].to_numpy()[test],
                                                   "prediction"].to_numpy(), rtol=1e-4)


@pytest.mark.parametrize("n,p", [(300, 40), (50, 200)])
def test_ridge_by_one_eigendecomposition_equals_ridgecv(n, p):
    from stages.fit.combine import ALPHAS, ridge_gcv

    rng = np.random.default_rng(p)
    x = rng.normal(size=(n, p)) * rng.uniform(0.1, 3, p) + 2
    y = 0.5 * x[:, 0] + x[:, 1] + 2 * rng.normal(size=n)
    reference = RidgeCV(alphas=ALPHAS).fit(x, y)
    coef, intercept = ridge_gcv(x, y)
    np.testing.assert_allclose(coef, reference.coef_, rtol=1e-6, atol=1e-9)
    assert intercept == pytest.approx(reference.intercept_, abs=1e-8)


@pytest.mark.parametrize("n,d", [(600, 6), (40, 100)])  # tall, and wider than long
def test_sparse_median_fits_solved_together_match_the_linear_program(n, d):
    from sklearn.linear_model import QuantileRegressor

    from stages.fit.probes import median_lasso

    rng = np.random.default_rng(0)
    y = rng.normal(size=n)
    wrong = np.where(rng.random((n, d)) < 0.1, rng.normal(0, 2, (n, d)), 0.0)
    noise = np.r_[0.01, np.full(d - 1, 0.3)]
    x = y[:, None] + noise * rng.normal(size=(n, d)) + wrong
    masks = np.ones((3, n), dtype=bool)
    masks[1, : n // 3] = False
    masks[2, 2 * n // 3:] = False
    alphas = np.array([0.01, 0.03, 0.1])
    coefs, intercepts = median_lasso(x, y, masks, alphas)
    for mask, alpha, coef, intercept in zip(masks, alphas, coefs, intercepts, strict=True):
        exact = QuantileRegressor(quantile=0.5, alpha=alpha, solver="highs").fit(x[mask],
                                                                                y[mask])

        def objective(c, i, a=alpha, m=mask):
            return 0.5 * np.abs(y[m] - x[m] @ c - i).mean() + a * np.abs(c).sum()
        best = objective(exact.coef_, exact.intercept_)
        assert objective(coef, intercept) - best < 1e-3 * best  # within 0.1 % of the optimum
        if d < n:  # wider than long, near-optimal coefficients are many: the objective counts
            np.testing.assert_allclose(coef, exact.coef_, atol=1e-3)

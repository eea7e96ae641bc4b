"""The batched logistic solver finds scikit-learn's solution, problem by problem."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from stages.fit.combine import CS, Linear, PathGroup, logistic_path, logistic_paths, loss_per_row
from stages.fit.logistic import LogisticFits, fit_together
from stages.fit.train import Objective


def _data(n_classes: int, n: int = 400, d: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)  # correlated columns
    logits = x[:, :n_classes] * 2 + rng.normal(size=(n, n_classes))
    y = logits.argmax(1)
    if n_classes > 2:  # unequal classes, one of them rare
        y[rng.random(n) < 0.3] = 0
        y[(y == n_classes - 1) & (rng.random(n) < 0.8)] = 1
    return (x - x.mean(0)) / x.std(0), y


def _reference(x, y, c, balanced):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        return LogisticRegression(C=c, tol=1e-10, max_iter=20_000,
                                  class_weight="balanced" if balanced else None).fit(x, y)


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("balanced", [False, True])
def test_every_problem_gets_scikit_learns_probabilities(n_classes, balanced):
    x, y = _data(n_classes)
    rng = np.random.default_rng(1)
    masks = rng.random((4, len(y))) < 0.75
    masks[3] = True
    cs = np.array([0.01, 0.1, 1.0, 10.0])
    states, _ = LogisticFits(x, y, n_classes, balanced).fit(masks, cs, tolerance=1e-9)
    for mask, c, state in zip(masks, cs, states, strict=True):
        reference = _reference(x[mask], y[mask], c, balanced)
        assert state["classes"] == reference.classes_.tolist()
        expected = np.zeros((len(x), n_classes))
        expected[:, reference.classes_] = reference.predict_proba(x)
        np.testing.assert_allclose(Linear(state, True, n_classes).predict(x), expected,
                                   atol=2e-4)


@pytest.mark.parametrize("n_classes", [2, 5])
def test_a_design_wider_than_tall_keeps_the_axes_its_rows_span(n_classes):
    """A probe on fewer ECGs than features: the solution lies in the rows' span, so the
    axes outside it are dropped and the probabilities, on unseen rows too, stay sklearn's."""
    x, y = _data(n_classes, n=160, d=60)
    wide = np.hstack([x, x @ np.random.default_rng(2).normal(size=(60, 90))])  # 150 columns
    train, unseen = wide[:50], wide[50:]
    masks = np.ones((2, 50), dtype=bool)
    masks[0, :10] = False
    fits = LogisticFits(train, y[:50], n_classes, False)
    assert fits.axes.shape == (150, 50)
    states, _ = fits.fit(masks, np.array([0.1, 1.0]), tolerance=1e-9)
    for mask, c, state in zip(masks, (0.1, 1.0), states, strict=True):
        reference = _reference(train[mask], y[:50][mask], c, False)
        expected = np.zeros((len(unseen), n_classes))
        expected[:, reference.classes_] = reference.predict_proba(unseen)
        np.testing.assert_allclose(Linear(state, True, n_classes).predict(unseen), expected,
                                   atol=2e-4)


@pytest.mark.parametrize("n_classes", [2, 5])
def test_float32_products_cost_nothing_at_the_default_tolerance(n_classes, monkeypatch):
    """At the default tolerance the design's products run in float32: the fits end as
    close to the exact solution as the same fits in float64 do."""
    import stages.fit.logistic as logistic

    x, y = _data(n_classes, n=600, d=60, seed=2)
    masks = np.random.default_rng(4).random((3, len(y))) < 0.8
    cs = np.array([0.1, 1.0, 10.0])
    fits = LogisticFits(x, y, n_classes, True)

    def probabilities(tolerance: float = logistic.TOLERANCE) -> np.ndarray:
        states, _ = fits.fit(masks, cs, tolerance=tolerance)
        return np.stack([Linear(s, True, n_classes).predict(x) for s in states])

    exact = probabilities(1e-9)  # float64 products, to the solution
    fast = probabilities()
    monkeypatch.setattr(logistic, "FLOAT32_TOLERANCE", 1.0)  # float64 at any tolerance
    slow = probabilities()
    assert np.abs(fast - exact).max() <= np.abs(slow - exact).max() + 1e-4
    np.testing.assert_allclose(fast, slow, atol=2e-4)


def test_a_class_missing_from_a_problems_rows_gets_no_probability():
    x, y = _data(5)
    mask = y != 4
    states, _ = LogisticFits(x, y, 5, False).fit(mask[None], np.array([1.0]), tolerance=1e-9)
    reference = _reference(x[mask], y[mask], 1.0, False)
    assert states[0]["classes"] == [0, 1, 2, 3]
    predicted = Linear(states[0], True, 5).predict(x)
    assert (predicted[:, 4] == 0).all()
    np.testing.assert_allclose(predicted[:, :4], reference.predict_proba(x), atol=2e-4)


def test_two_classes_of_many_are_stored_as_scikit_learn_stores_them():
    x, y = _data(5)
    mask = np.isin(y, [1, 3])
    states, _ = LogisticFits(x, y, 5, False).fit(mask[None], np.array([1.0]), tolerance=1e-9)
    assert states[0]["classes"] == [1, 3]
    assert np.asarray(states[0]["coef"]).shape == (1, x.shape[1])
    probability = Linear(states[0], True, 5).predict(x)
    assert np.allclose(probability.sum(1), 1.0) and (probability[:, [0, 2, 4]] == 0).all()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_path_keeps_the_c_where_validation_loss_first_stops_falling(n_classes):
    x, y = _data(n_classes, n=300, d=60, seed=3)  # wide enough to overfit at large C
    x_val, y_val = _data(n_classes, n=200, d=60, seed=3)
    objective = Objective(y, True)
    masks = np.ones((2, len(y)), dtype=bool)
    masks[0, ::3] = False
    chosen = logistic_path(x, y, masks, x_val, y_val, n_classes, False, objective)
    for mask, state in zip(masks, chosen, strict=True):
        best, expected = np.inf, None
        for c in sorted(CS):
            model = _reference(x[mask], y[mask], c, False)
            p = np.zeros((len(x_val), n_classes))
            p[:, model.classes_] = model.predict_proba(x_val)
            loss = loss_per_row(p, y_val, objective).mean()
            if loss >= best:
                break
            best, expected = loss, p
        np.testing.assert_allclose(Linear(state, True, n_classes).predict(x_val), expected,
                                   atol=5e-4)


def test_rows_of_one_class_predict_that_class():
    x, y = _data(2)
    mask = y == 1
    (state,) = logistic_path(x, y, mask[None], x, y, 2, False, Objective(y, True))
    assert state == {"classes": [1], "prior": [1.0]}
    assert (Linear(state, True, 2).predict(x)[:, 1] == 1).all()


def _designs(n_classes: int):
    """Four designs of other heights, widths (one wider than tall) and problem counts (one
    split in two, one padded)."""
    out = []
    for seed, (n, d, problems) in enumerate([(300, 20, 4), (120, 40, 1), (60, 90, 2),
                                             (80, 10, 2)]):
        x, y = _data(n_classes, n=n, d=d, seed=10 + seed)
        masks = np.random.default_rng(seed).random((problems, n)) < 0.8
        out.append((x, y, masks))
    return out


@pytest.mark.parametrize("n_classes", [2, 4])
def test_designs_solved_together_get_the_fits_each_gets_alone(n_classes):
    """Padding (rows, axes, problems) changes no fit: each design's problems end where
    they end solved on their own."""
    designs = _designs(n_classes)
    fits = [LogisticFits(x, y, n_classes, True) for x, y, _ in designs]
    cs = [np.linspace(0.1, 2.0, len(m)) for _, _, m in designs]
    together, _ = fit_together(fits, [m for _, _, m in designs], cs, tolerance=1e-9)
    for fit, (x, _, masks), c, states in zip(fits, designs, cs, together, strict=True):
        alone, _ = fit.fit(masks, c, tolerance=1e-9)
        assert len(states) == len(masks)
        for a, b in zip(alone, states, strict=True):
            assert a["classes"] == b["classes"]
            np.testing.assert_allclose(Linear(b, True, n_classes).predict(x),
                                       Linear(a, True, n_classes).predict(x), atol=1e-6)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_paths_of_several_designs_choose_as_each_path_alone(n_classes):
    groups = []
    for x, y, masks in _designs(n_classes):
        half = len(y) // 2
        groups.append(PathGroup(x[:half], y[:half], masks[:, :half], x[half:], y[half:],
                                Objective(y[:half], True)))
    together = logistic_paths(groups, n_classes, False)
    for group, states in zip(groups, together, strict=True):
        alone = logistic_path(group.x, group.y, group.masks, group.x_val, group.y_val,
                              n_classes, False, group.objective)
        for a, b in zip(alone, states, strict=True):
            np.testing.assert_allclose(Linear(b, True, n_classes).predict(group.x_val),
                                       Linear(a, True, n_classes).predict(group.x_val),
                                       atol=2e-4)

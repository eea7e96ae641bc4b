import numpy as np
import pandas as pd
import pytest

from stages.prepare.classes import OTHER, map_statements, top_statements
from stages.prepare.splits import assign_splits


def test_splits_are_by_subject_with_the_requested_fractions():
    subjects = pd.Series([f"s{i // 3}" for i in range(3000)])  # 1000 subjects x 3 ECGs
    splits = assign_splits(subjects, seed=7)
    per_subject = pd.DataFrame({"s": subjects, "split": splits}).groupby("s")["split"].nunique()
    assert (per_subject == 1).all()
    counts = pd.DataFrame({"s": subjects, "split": splits}).drop_duplicates("s")["split"]
    assert counts.value_counts().to_dict() == {"train": 700, "val": 200, "test": 100}


def test_split_of_a_subject_is_stable_and_seeded():
    subjects = pd.Series([f"s{i}" for i in range(500)])
    a = assign_splits(subjects, seed=1)
    assert a.equals(assign_splits(subjects, seed=1))
    assert not a.equals(assign_splits(subjects, seed=2))


def test_adding_or_removing_patients_moves_only_a_few_others():
    """Each split takes its exact share of the hash order, so the boundaries shift with the
    number of subjects and the subjects next to them change split; the rest stay."""
    subjects = pd.Series([f"s{i}" for i in range(500)])
    before = assign_splits(subjects, seed=1)
    more = assign_splits(pd.concat([subjects, pd.Series([f"n{i}" for i in range(50)])],
                                   ignore_index=True), seed=1)
    assert (more.iloc[:500] != before).sum() == 7  # of 500, after adding 50 patients
    fewer = assign_splits(subjects.iloc[::2].reset_index(drop=True), seed=1)
    assert (fewer != before.iloc[::2].reset_index(drop=True)).sum() == 10  # of 250 kept


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(pd.Series(["a"]), seed=0, fractions=(0.5, 0.2, 0.1))


def test_classes_come_from_train_only_and_the_rest_is_other():
    statements = pd.Series(["A"] * 5 + ["B"] * 3 + ["C"] * 2 + ["D"] * 9 + [None], dtype="string")
    splits = pd.Series(["train"] * 10 + ["test"] * 9 + ["train"])
    classes = top_statements(statements, splits, n_classes=2)
    assert classes == ["A", "B"]  # D is frequent only in test
    mapped = map_statements(statements, classes)
    assert mapped.tolist()[:10] == ["A"] * 5 + ["B"] * 3 + [OTHER] * 2
    assert set(mapped.iloc[10:19]) == {OTHER}
    assert mapped.isna().tolist()[-1]


def test_a_metric_undefined_on_the_rows_is_none_without_a_warning():
    """A test split (or fold) with one class has no AUROC: scikit-learn warns and returns
    NaN; the metrics file says null and the user's log stays clean."""
    import warnings

    from stages.fit.tasks import TASKS, score

    y = np.zeros(20, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = score(TASKS["sex"], y, np.zeros(20, dtype=np.int64), np.linspace(0, 1, 20))
    assert metrics["auroc"] is None and metrics["f1"] == 0.0

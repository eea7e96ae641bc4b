"""The 15-class ``ad`` label: the most frequent statements of the training split + "Other"."""

from __future__ import annotations

import pandas as pd

OTHER = "Other"


def top_statements(statements: pd.Series, splits: pd.Series, n_classes: int) -> list[str]:
    """The ``n_classes`` most frequent statements among training records (ties by name).

    Chosen on train only, so the class list leaks nothing from validation or test.
    """
    counts = statements[splits == "train"].dropna().value_counts()
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked[:n_classes]]


def map_statements(statements: pd.Series, classes: list[str]) -> pd.Series:
    """Statement -> itself if it is a class, else "Other"; a missing statement stays missing."""
    mapped = statements.where(statements.isin(classes), OTHER)
    return mapped.where(statements.notna(), pd.NA).astype("string")

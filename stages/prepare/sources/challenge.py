"""PhysioNet/CinC Challenge 2020/2021: WFDB headers with ``.mat`` signals, labels in comments.

* ``age`` from ``# Age:``; ``NaN``/``Unknown`` are missing; an open bound such as ``>89``
  becomes its next year (90), since the archives censor ages above 89.
* ``sex`` from ``# Sex:`` (Male/Female/M/F); anything else is missing.
* ``ad``: the header's ``# Dx:`` SNOMED CT codes, named through ``snomed_ct.csv``: every
  code of the 2020 and 2021 challenges' label tables, the 30 scored ones (equivalent codes
  merged as the challenge scores them) and the 103 unscored ones, names as the tables give
  them with capitalisation and one typo fixed. The record's statement is its first *scored*
  code in header order, else its first code; a code outside the tables is kept as
  ``SNOMED <code>``. All codes are kept in the cohort (``dx_codes``).
* ``rr`` is derived from R-peaks (no machine measurement); ``ka`` is not available.
* Records have no patient id, so each record is its own subject.
* Records longer than 10 s keep their first 10 s (see conform); shorter ones are skipped.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pandas as pd

from stages.prepare.records import RawRecord, read_wfdb
from stages.prepare.sources import Catalog, Source, SourceError, register

TABLE = Path(__file__).with_name("snomed_ct.csv")
_COMMENT = re.compile(r"^#\s*([A-Za-z]+)\s*:\s*(.*)$")
_OPEN_AGE = re.compile(r"^[>≥]\s*=?\s*(\d+(?:\.\d+)?)$")


@cache
def snomed_names() -> tuple[dict[str, str], frozenset[str]]:
    """code -> readable name (equivalent codes share one name), and the scored codes."""
    table = pd.read_csv(TABLE, dtype=str, keep_default_na=False)
    names = dict(zip(table["code"], table["name"], strict=True))
    for code, same in zip(table["code"], table["same_as"], strict=True):
        if same:
            names[code] = names[same]
    return names, frozenset(table.loc[table["scored"] == "1", "code"])


def parse_age(text: str) -> float | None:
    text = text.strip()
    bound = _OPEN_AGE.match(text)
    if bound:
        return float(bound.group(1)) + 1
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value < 130 else None


def parse_sex(text: str) -> str | None:
    return {"male": "M", "m": "M", "female": "F", "f": "F"}.get(text.strip().lower())


def statement(codes: list[str]) -> str | None:
    names, scored = snomed_names()
    if not codes:
        return None
    chosen = next((c for c in codes if c in scored), codes[0])
    return names.get(chosen, f"SNOMED {chosen}")


def header_labels(text: str) -> dict:
    fields = {}
    for line in text.splitlines():
        match = _COMMENT.match(line.strip())
        if match:
            fields[match.group(1).lower()] = match.group(2)
    codes = [c.strip() for c in fields.get("dx", "").split(",") if c.strip()]
    return {"age": parse_age(fields.get("age", "")), "sex": parse_sex(fields.get("sex", "")),
            "ad_statement": statement(codes), "dx_codes": ",".join(codes)}


@register("challenge")
class Challenge(Source):
    def catalog(self) -> Catalog:
        headers = sorted(self.root.rglob("*.hea"))
        if not headers:
            raise SourceError(f"{self.root} holds no .hea files; --root must be a folder of "
                              f"PhysioNet/CinC challenge records (.hea + .mat)")
        rows = []
        for header in headers:
            stem = header.with_suffix("")
            labels = header_labels(header.read_text(errors="replace"))
            rows.append({"record_id": stem.name, "locator": str(stem.relative_to(self.root)),
                         **labels})
        table = pd.DataFrame(rows)
        duplicated = table["record_id"].duplicated(keep=False)
        table.loc[duplicated, "record_id"] = table.loc[duplicated, "locator"]
        table["subject_id"] = table["record_id"]
        table["rr"] = float("nan")
        table["ka"] = pd.array([pd.NA] * len(table), dtype="Int8")
        table["derive_rr"] = True
        notes = ["no patient ids in this format: every record is its own subject",
                 "rr is derived from R-peaks; ka is not available"]
        return Catalog(table=table, notes=notes)

    def load(self, locator: str) -> RawRecord:
        return read_wfdb(self.root / locator)

"""PTB-XL: ``ptbxl_database.csv`` + ``scp_statements.csv`` + WFDB records (500 or 100 Hz).

* ``age``: as given, except PTB-XL's 300 (its code for 90 years or older) becomes 90;
  ``sex``: 0 = male, 1 = female.
* ``ad``: the description of the record's SCP statement with the highest likelihood
  (first listed on ties); all statements are kept in ``statements``.
* ``rr`` is derived from R-peaks; ``ka`` is not available.
* Options: ``rate`` 500 (``records500/``, default) or 100 (``records100/``); ``folds``
  ``recommended`` uses PTB-XL's own stratified folds (1-8 train, 9 val, 10 test) instead of
  the seeded subject split.
"""

from __future__ import annotations

import ast

import pandas as pd

from stages.prepare.records import RawRecord, read_wfdb
from stages.prepare.sources import Catalog, Source, SourceError, register
from stages.prepare.sources.mimic_iv_ecg import read_table

AGE_90_PLUS = 300
COLUMNS = ("ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", "filename_lr",
           "filename_hr")


def _codes(text: str) -> dict[str, float]:
    try:
        codes = ast.literal_eval(text) if isinstance(text, str) else {}
    except (ValueError, SyntaxError) as err:
        raise SourceError(f"ptbxl_database.csv: unreadable scp_codes {text!r}") from err
    return codes if isinstance(codes, dict) else {}


@register("ptb-xl")
class PtbXl(Source):
    def catalog(self) -> Catalog:
        rate = int(self.options.get("rate", 500))
        if rate not in (100, 500):
            raise SourceError(f"ptb-xl option rate must be 100 or 500, got {rate}")
        folds = self.options.get("folds", "subject")
        if folds not in ("subject", "recommended"):
            raise SourceError(f"ptb-xl option folds must be subject or recommended, got {folds}")
        database = self.root / "ptbxl_database.csv"
        if not database.exists():
            raise SourceError(f"{self.root} has no ptbxl_database.csv; --root must be the "
                              f"PTB-XL folder")
        table = read_table(database, COLUMNS)
        statements = read_table(self.root / "scp_statements.csv", ("description",), index_col=0)
        names = statements["description"].to_dict()
        codes = table["scp_codes"].map(_codes)
        top = codes.map(lambda c: max(c, key=c.get) if c else None)
        age = pd.to_numeric(table["age"], errors="coerce")
        out = pd.DataFrame({
            "record_id": table["ecg_id"].astype(int).astype(str),
            "subject_id": pd.to_numeric(table["patient_id"]).astype("Int64").astype(str),
            "locator": table["filename_hr" if rate == 500 else "filename_lr"].astype(str),
            "rr": float("nan"),
            "age": age.where(age != AGE_90_PLUS, 90.0),
            "sex": pd.to_numeric(table["sex"], errors="coerce").map({0: "M", 1: "F"}),
            "ka": pd.array([pd.NA] * len(table), dtype="Int8"),
            "ad_statement": top.map(lambda c: names.get(c, c) if c else None),
            "dx_codes": codes.map(lambda c: ",".join(c)),
            "derive_rr": True,
        })
        if folds == "recommended":
            fold = pd.to_numeric(table["strat_fold"], errors="coerce")
            out["split"] = pd.Series("train", index=table.index).where(fold <= 8)
            out.loc[fold == 9, "split"] = "val"
            out.loc[fold == 10, "split"] = "test"
        return Catalog(out, [f"records{rate}/ at {rate} Hz; rr derived from R-peaks; ka not "
                             f"available; split: {folds}"])

    def load(self, locator: str) -> RawRecord:
        return read_wfdb(self.root / locator)

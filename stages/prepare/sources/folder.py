"""Any folder of WFDB records plus a labels table: how a user brings any other archive.

The table (``--labels FILE``, CSV or Parquet) needs a ``record`` column (the record's path
under ``--root``, without extension) and may have ``subject_id`` (default: the record, one
subject per record), ``rr`` (ms), ``age`` (years), ``sex`` (M/F, or male/female), ``ka``
(0/1) and ``ad`` (a statement). Absent columns are missing labels; without ``rr``, RR is
derived from R-peaks. Values that cannot be read as their type become missing, and the
summary says how many.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.prepare.records import RawRecord, read_wfdb
from stages.prepare.sources import Catalog, Source, SourceError, register

_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


def read_labels(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise SourceError(f"labels table {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if path.suffix.lower() in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep=None, engine="python", dtype={"record": str,
                                                                       "subject_id": str})
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read labels table {path}: {err}") from err
    raise SourceError(f"labels table {path}: use .csv or .parquet")


@register("folder")
class Folder(Source):
    def catalog(self) -> Catalog:
        if self.labels is None:
            raise SourceError("the folder source needs --labels FILE (CSV or Parquet with a "
                              "`record` column and any of subject_id, rr, age, sex, ka, ad)")
        table = read_labels(self.labels)
        if "record" not in table.columns:
            raise SourceError(f"{self.labels} has no `record` column (the record's path under "
                              f"--root without extension); it has {list(table.columns)}")
        if table["record"].isna().any() or table["record"].duplicated().any():
            raise SourceError(f"{self.labels}: `record` has empty or duplicated entries")
        notes = []
        n = len(table)

        def numeric(column: str) -> pd.Series:
            if column not in table:
                return pd.Series(float("nan"), index=table.index)
            values = pd.to_numeric(table[column], errors="coerce")
            bad = int(values.isna().sum() - table[column].isna().sum())
            if bad:
                notes.append(f"{bad} unreadable value(s) of {column} treated as missing")
            return values.astype(float)

        sex = (table["sex"].astype(str).str.strip().str.lower().map(_SEX)
               if "sex" in table else pd.Series(None, index=table.index))
        ka = numeric("ka")
        invalid_ka = ka.notna() & ~ka.isin([0, 1])
        if invalid_ka.any():
            notes.append(f"{int(invalid_ka.sum())} ka value(s) not 0/1 treated as missing")
        out = pd.DataFrame({
            "record_id": table["record"].astype(str),
            "subject_id": (table["subject_id"].astype(str) if "subject_id" in table
                           else table["record"].astype(str)),
            "locator": table["record"].astype(str),
            "rr": numeric("rr"),
            "age": numeric("age"),
            "sex": sex,
            "ka": pd.array(ka.where(~invalid_ka), dtype="Int8"),
            "ad_statement": (table["ad"].astype("string") if "ad" in table
                             else pd.Series(pd.NA, index=table.index, dtype="string")),
            "derive_rr": "rr" not in table,
        })
        present = [c for c in ("subject_id", "rr", "age", "sex", "ka", "ad") if c in table]
        notes.insert(0, f"{n} records; label columns: {', '.join(present) or 'none'}"
                        + ("" if "rr" in table else "; rr derived from R-peaks"))
        return Catalog(out, notes)

    def load(self, locator: str) -> RawRecord:
        return read_wfdb(self.root / locator)

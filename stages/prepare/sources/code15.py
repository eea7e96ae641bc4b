"""CODE-15%: HDF5 parts (``tracings`` (N, 4096, 12) at 400 Hz, in mV, leads DI, DII, DIII,
AVR, AVL, AVF, V1-V6, and ``exam_id``) with ``exams.csv``.

* The signals (10 s = 4000 or 7 s = 2800 samples) are centred in 4096 samples with zeros
  on both sides; the all-zero rows at both ends are removed before resampling to the
  store's rate. The 7-s exams are then too short and are skipped, with that reason.
* Rows with ``exam_id`` 0 (the parts' empty last row) are ignored.
* ``age``, ``sex`` (``is_male``), ``subject_id`` (``patient_id``); ``ad``: the first set
  flag of AF, 1dAVb, RBBB, LBBB, SB, ST (named), else "Normal ECG" when ``normal_ecg``,
  else "No listed abnormality". ``rr`` is derived from R-peaks; ``ka`` is not available.
"""

from __future__ import annotations

from functools import lru_cache

import h5py
import numpy as np
import pandas as pd

from stages.prepare.records import RawRecord, RecordError
from stages.prepare.sources import Catalog, Source, SourceError, register
from stages.prepare.sources.mimic_iv_ecg import read_table

FS = 400.0
LEADS = ["DI", "DII", "DIII", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
FLAGS = {"AF": "Atrial fibrillation", "1dAVb": "1st degree AV block",
         "RBBB": "Right bundle branch block", "LBBB": "Left bundle branch block",
         "SB": "Sinus bradycardia", "ST": "Sinus tachycardia"}


@lru_cache(maxsize=32)
def _part(path: str) -> h5py.File:
    """One open handle per part and process (workers reuse it across records)."""
    return h5py.File(path, "r")


def _truthy(series: pd.Series) -> pd.Series:
    text = series.astype(str).str.strip().str.lower()
    return text.isin(["true", "1", "1.0", "yes"])


@register("code15")
class Code15(Source):
    def catalog(self) -> Catalog:
        exams_path = self.root / "exams.csv"
        if not exams_path.exists():
            raise SourceError(f"{self.root} has no exams.csv; --root must be the CODE-15% "
                              f"folder with exams.csv and exams_part*.hdf5")
        exams = read_table(exams_path, ("exam_id", "age", "is_male", "patient_id", *FLAGS))
        parts = sorted(self.root.glob("*.hdf5")) + sorted(self.root.glob("*.h5"))
        if not parts:
            raise SourceError(f"{self.root} has no HDF5 parts (exams_part*.hdf5)")
        located = []
        for part in parts:
            try:
                with h5py.File(part, "r") as f:
                    ids = np.asarray(f["exam_id"][:]).astype(np.int64)
                    if "tracings" not in f:
                        raise KeyError("tracings")
            except (OSError, KeyError) as err:
                raise SourceError(f"{part.name} is not a CODE-15% part with exam_id and "
                                  f"tracings: {err}") from err
            located.append(pd.DataFrame({"exam_id": ids, "locator": [
                f"{part.name}:{i}" for i in range(len(ids))]}))
        where = pd.concat(located, ignore_index=True)
        where = where[where["exam_id"] != 0].drop_duplicates("exam_id")
        table = exams.merge(where, on="exam_id", how="inner")
        flags = pd.DataFrame({flag: _truthy(table[flag]) for flag in FLAGS})
        normal = _truthy(table["normal_ecg"]) if "normal_ecg" in table else False
        statement = pd.Series("No listed abnormality", index=table.index).where(~normal,
                                                                               "Normal ECG")
        for flag in reversed(list(FLAGS)):  # the first listed flag wins
            statement = statement.where(~flags[flag], FLAGS[flag])
        out = pd.DataFrame({
            "record_id": table["exam_id"].astype(str),
            "subject_id": table["patient_id"].astype(str),
            "locator": table["locator"],
            "rr": float("nan"),
            "age": pd.to_numeric(table["age"], errors="coerce"),
            "sex": _truthy(table["is_male"]).map({True: "M", False: "F"}),
            "ka": pd.array([pd.NA] * len(table), dtype="Int8"),
            "ad_statement": statement,
            "dx_codes": flags.apply(lambda row: ",".join(f for f in FLAGS if row[f]), axis=1),
            "derive_rr": True,
        })
        notes = ["rr derived from R-peaks; ka not available"]
        missing = len(exams) - len(table)
        if missing:
            notes.append(f"{missing} exams of exams.csv have no tracing in the parts found")
        return Catalog(out, notes)

    def load(self, locator: str) -> RawRecord:
        name, index = locator.rsplit(":", 1)
        tracing = np.asarray(_part(str(self.root / name))["tracings"][int(index)],
                             dtype=np.float64)
        nonzero = np.flatnonzero(np.any(tracing != 0, axis=1))
        if nonzero.size == 0:
            raise RecordError("no signal: the tracing is all zeros")
        return RawRecord(tracing[nonzero[0]: nonzero[-1] + 1], FS, list(LEADS))

"""MIMIC-IV-ECG: WFDB records listed in record_list.csv, labels from the machine measurements
and, when the MIMIC-IV ``hosp`` module is available, from patients and potassium labs.

Label rules (the README's "Preparing an archive", under "Labels"):
* ``rr``: ``rr_interval`` in ms; values outside [200, 3000] ms (the 29999 sentinel, zeros)
  are missing.
* ``age``: anchor_age + year(ecg_time) - anchor_year; ``sex``: ``gender``.
* ``ka``: potassium labs (itemids 50971, 50822) charted in [ecg_time, ecg_time + 1 h]:
  1 if any is flagged "abnormal", 0 if there are some and none is, missing if there are none.
* ``ad_statement``: ``report_0``, whitespace-normalised (mapped to classes after splitting).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.prepare.records import RawRecord, read_wfdb
from stages.prepare.sources import Catalog, Source, SourceError, register

RR_VALID_MS = (200.0, 3000.0)
POTASSIUM_ITEMIDS = (50971, 50822)
KA_WINDOW = pd.Timedelta(hours=1)


def read_table(path: Path, required: tuple[str, ...], **kwargs) -> pd.DataFrame:
    """Read a CSV and name the file and the columns it lacks, instead of a KeyError later."""
    try:
        table = pd.read_csv(path, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise SourceError(f"cannot read {path}: {err}") from err
    absent = [c for c in required if c not in table.columns]
    if absent:
        raise SourceError(f"{path} lacks column(s) {', '.join(absent)}")
    return table


def find_table(folders: list[Path], name: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / "hosp" / name, folder / name):
            for suffix in ("", ".gz"):
                path = candidate.with_name(candidate.name + suffix)
                if path.exists():
                    return path
    return None


@register("mimic-iv-ecg")
class MimicIvEcg(Source):
    def catalog(self) -> Catalog:
        notes: list[str] = []
        records = self._records()
        records = records.merge(self._measurements(), on="study_id", how="left")
        folders = [self.labels, self.root] if self.labels else [self.root]
        patients_path = find_table(folders, "patients.csv")
        if patients_path is None:
            notes.append("no hosp/patients.csv[.gz] found (pass --labels MIMIC-IV root): "
                         "age and sex unknown")
            records["age"] = np.nan
            records["sex"] = None
        else:
            records = _add_demographics(records, patients_path)
        labs_path = find_table(folders, "labevents.csv")
        if labs_path is None:
            notes.append("no hosp/labevents.csv[.gz] found (pass --labels MIMIC-IV root): "
                         "ka unknown")
            records["ka"] = pd.array([pd.NA] * len(records), dtype="Int8")
        else:
            records["ka"] = _potassium_abnormal(records, _potassium_labs(labs_path, records))
        table = pd.DataFrame({
            "record_id": records["study_id"].astype(str),
            "subject_id": records["subject_id"].astype(str),
            "locator": records["path"].astype(str),
            "rr": records["rr"],
            "age": records["age"].astype(float),
            "sex": records["sex"],
            "ka": records["ka"],
            "ad_statement": records["ad_statement"],
            "ecg_time": records["ecg_time"],
        })
        return Catalog(table=table, notes=notes)

    def load(self, locator: str) -> RawRecord:
        return read_wfdb(self.root / locator)

    def _records(self) -> pd.DataFrame:
        path = self.root / "record_list.csv"
        if not path.exists():
            raise SourceError(
                f"{self.root} has no record_list.csv; --root must be the MIMIC-IV-ECG folder "
                f"that holds record_list.csv and files/"
            )
        table = read_table(path, ("subject_id", "study_id", "ecg_time", "path"))
        table["ecg_time"] = pd.to_datetime(table["ecg_time"], errors="coerce")
        table = table.drop_duplicates("study_id")
        return table[["subject_id", "study_id", "ecg_time", "path"]]

    def _measurements(self) -> pd.DataFrame:
        path = self.root / "machine_measurements.csv"
        if not path.exists():
            raise SourceError(f"{self.root} has no machine_measurements.csv")
        table = read_table(path, ("study_id", "rr_interval", "report_0"), low_memory=False)
        rr = pd.to_numeric(table["rr_interval"], errors="coerce").astype(float)
        rr = rr.where(rr.between(*RR_VALID_MS))
        statement = table["report_0"].astype("string").str.split().str.join(" ")
        statement = statement.str.rstrip(".").replace("", pd.NA)
        return pd.DataFrame({"study_id": table["study_id"], "rr": rr,
                             "ad_statement": statement}).drop_duplicates("study_id")


def _add_demographics(records: pd.DataFrame, path: Path) -> pd.DataFrame:
    patients = read_table(path, ("subject_id", "gender", "anchor_age", "anchor_year"))
    patients = patients.drop_duplicates("subject_id")
    merged = records.merge(patients[["subject_id", "gender", "anchor_age", "anchor_year"]],
                           on="subject_id", how="left")
    merged["age"] = (merged["anchor_age"] + merged["ecg_time"].dt.year
                     - merged["anchor_year"]).astype(float)
    merged["sex"] = merged["gender"].where(merged["gender"].isin(["M", "F"]))
    return merged


def _potassium_labs(path: Path, records: pd.DataFrame) -> pd.DataFrame:
    """Potassium rows of the cohort's subjects, read in chunks: labevents has ~10^8 rows."""
    subjects = set(records["subject_id"].tolist())
    columns = ("subject_id", "itemid", "charttime", "flag")
    keep = []
    try:
        chunks = pd.read_csv(path, usecols=list(columns), chunksize=2_000_000,
                             dtype={"flag": "string"})
        for chunk in chunks:
            chunk = chunk[chunk["itemid"].isin(POTASSIUM_ITEMIDS)
                          & chunk["subject_id"].isin(subjects)]
            keep.append(chunk)
    except ValueError as err:
        raise SourceError(f"{path} lacks column(s) of {columns}: {err}") from err
    labs = pd.concat(keep, ignore_index=True) if keep else pd.DataFrame(columns=columns)
    labs["charttime"] = pd.to_datetime(labs["charttime"], errors="coerce")
    labs["abnormal"] = labs["flag"].fillna("").str.strip().str.lower().eq("abnormal")
    return labs.dropna(subset=["charttime"])


def _potassium_abnormal(records: pd.DataFrame, labs: pd.DataFrame) -> pd.Series:
    """For each ECG: any abnormal potassium in [t, t+1h] -> 1, only normal -> 0, none -> NA.

    Two forward as-of joins (all labs, abnormal labs) answer "is there one within the
    window" without pairing every ECG with every lab of its subject.
    """
    ecgs = records[["subject_id", "ecg_time"]].reset_index(names="row")
    ecgs = ecgs.dropna(subset=["ecg_time"]).sort_values("ecg_time")

    def first_within(subset: pd.DataFrame) -> pd.Series:
        lab_times = subset[["subject_id", "charttime"]].sort_values("charttime")
        joined = pd.merge_asof(ecgs, lab_times, left_on="ecg_time", right_on="charttime",
                               by="subject_id", direction="forward", tolerance=KA_WINDOW)
        return pd.Series(joined["charttime"].notna().to_numpy(), index=joined["row"].to_numpy())

    any_lab = first_within(labs)
    any_abnormal = first_within(labs[labs["abnormal"]])
    ka = pd.Series(pd.NA, index=records.index, dtype="Int8")
    measured = any_lab[any_lab].index
    ka.loc[measured] = any_abnormal.loc[measured].astype("int8").to_numpy()
    return ka

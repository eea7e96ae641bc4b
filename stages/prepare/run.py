"""The prepare stage: archive -> cohort.parquet + signals.h5 (+ summary), published atomically.

Order of work, and why:
1. each source's catalog gives every record and label it can derive; several sources are
   concatenated (ids prefixed with the source name) into one cohort;
2. splits are fixed by subject, within each source, *before* any signal is read, so a
   skipped record never moves another patient between splits (a source's own recommended
   split, such as PTB-XL's folds, is used instead when it provides one);
3. records are read and conformed in parallel (dask) and written in catalog order; where a
   source has no RR measurement, RR is derived from R-peaks on the worker;
4. the ``ad`` classes are chosen on the prepared training records only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import __version__
from pipeline.dask_runtime import dask_client, map_in_order
from pipeline.params import PrepareParams
from pipeline.signal_store import SignalContract, SignalStoreWriter
from pipeline.staging import staged_dir
from stages.prepare.classes import map_statements, top_statements
from stages.prepare.conform import RepairPolicy, conform
from stages.prepare.records import RecordError
from stages.prepare.rpeaks import derive_rr
from stages.prepare.sources import CATALOG_COLUMNS, Source, SourceError, create_source
from stages.prepare.splits import SPLITS, assign_splits

COHORT = "cohort.parquet"
SIGNALS = "signals.h5"
SUMMARY = "prepare_summary.json"
SKIPPED = "skipped.csv"

COHORT_SCHEMA = pa.schema([
    ("record_id", pa.string()), ("subject_id", pa.string()), ("split", pa.string()),
    ("source", pa.string()), ("rr", pa.float64()), ("age", pa.float64()),
    ("sex", pa.string()), ("ka", pa.int8()), ("ad", pa.string()),
    ("rr_derived", pa.bool_()), ("ad_statement", pa.string()), ("statements", pa.string()),
    ("locator", pa.string()), ("fs_original", pa.float64()), ("repairs", pa.string()),
])


@dataclass(frozen=True)
class SourceSpec:
    """One archive to read: adapter name, folder, optional label tables and options."""

    name: str
    root: Path
    labels: Path | None = None
    options: dict = field(default_factory=dict)


def read_chunk(sources: list[Source], contract: SignalContract, policy: RepairPolicy,
               items: list[tuple[int, str, bool]]) -> list[dict]:
    """Load and conform records on a worker; failures come back as reasons, never raise.

    ``items`` are (source index, locator, derive RR?).
    """
    results = []
    for index, locator, derive in items:
        try:
            raw = sources[index].load(locator)
            signal, repairs = conform(raw, contract, policy)
            result = {"signal": signal, "repairs": "; ".join(repairs), "fs": raw.fs}
            if derive:
                result["rr"], note = derive_rr(signal, contract.fs)
                result["repairs"] = "; ".join(filter(None, [result["repairs"], f"rr {note}"]))
            results.append(result)
        except RecordError as err:
            results.append({"reason": str(err)})
        except Exception as err:
            results.append({"reason": f"unexpected error: {type(err).__name__}: {err}"})
    return results


def prepare(source_name: str, root: Path, out: Path, params: PrepareParams,
            labels: Path | None = None, scheduler: str | None = None,
            options: dict | None = None) -> dict:
    """Prepare one archive; see ``prepare_sources``."""
    return prepare_sources([SourceSpec(source_name, Path(root), labels, options or {})], out,
                           params, scheduler)


def _catalogs(specs: list[SourceSpec], params: PrepareParams
              ) -> tuple[list[Source], pd.DataFrame, list[str]]:
    sources, tables, notes = [], [], []
    for index, spec in enumerate(specs):
        source = create_source(spec.name, spec.root, spec.labels, spec.options)
        catalog = source.catalog()
        table = _checked(catalog.table, spec.name)
        own = table["split"] if "split" in table else pd.Series(pd.NA, index=table.index)
        seeded = assign_splits(table["subject_id"], params.seed, tuple(params.split))
        table["split"] = own.where(own.notna(), seeded)
        table["source"], table["source_index"] = spec.name, index
        if len(specs) > 1:  # ids must stay unique, and patients of two archives distinct
            for column in ("record_id", "subject_id"):
                table[column] = spec.name + ":" + table[column].astype(str)
        prefix = f"{spec.name}: " if len(specs) > 1 else ""
        notes += [prefix + note for note in catalog.notes]
        sources.append(source)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    duplicated = table["record_id"][table["record_id"].duplicated()].unique()
    if len(duplicated):
        raise SourceError(f"record ids are not unique: {', '.join(map(str, duplicated[:5]))}")
    return sources, table, notes


def prepare_sources(specs: list[SourceSpec], out: Path, params: PrepareParams,
                    scheduler: str | None = None) -> dict:
    """Run the stage; returns the summary that is also saved as prepare_summary.json."""
    started = time.perf_counter()
    sources, table, notes = _catalogs(specs, params)
    source_name = "+".join(spec.name for spec in specs)
    root = ", ".join(str(spec.root) for spec in specs)
    contract = SignalContract(fs=params.fs, n_samples=round(params.fs * params.seconds))
    policy = RepairPolicy(max_nan_fraction=params.max_nan_fraction,
                          precordial=params.precordial,
                          max_imputed_leads=params.max_imputed_leads)
    with staged_dir(Path(out)) as tmp:
        writer = SignalStoreWriter(tmp / SIGNALS, contract)
        try:
            outcomes = _read_all(sources, table, contract, policy, writer, params, scheduler)
        except BaseException:
            writer.abort()
            raise
        ok = np.array(["reason" not in o for o in outcomes], dtype=bool)
        if not ok.any():
            writer.abort()
            reasons = Counter(_kind(o["reason"]) for o in outcomes)
            raise SourceError(f"no record of {source_name} at {root} could be prepared: "
                              f"{dict(reasons)}")
        cohort = _cohort(table, outcomes, ok, params.n_classes)
        digest = cohort_digest(cohort, contract)
        writer.close(cohort_digest=digest, source=source_name, code_version=__version__)
        _write_cohort(cohort, tmp / COHORT, digest)
        skipped = table.loc[~ok, ["record_id", "subject_id", "locator"]].assign(
            reason=[o["reason"] for o, good in zip(outcomes, ok, strict=True) if not good])
        skipped.to_csv(tmp / SKIPPED, index=False)
        summary = _summary(source_name, root, cohort, skipped, notes, contract,
                           digest, time.perf_counter() - started)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _checked(table: pd.DataFrame, source_name: str) -> pd.DataFrame:
    absent = [c for c in CATALOG_COLUMNS if c not in table.columns]
    if absent:
        raise SourceError(f"source {source_name} produced no column(s) {', '.join(absent)}")
    if table.empty:
        raise SourceError(f"source {source_name} lists no records")
    if table["subject_id"].isna().any():
        raise SourceError(f"source {source_name}: {int(table['subject_id'].isna().sum())} "
                          f"records have no subject id, so they cannot be split by patient")
    return table.reset_index(drop=True)


def _read_all(sources: list[Source], table: pd.DataFrame, contract: SignalContract,
              policy: RepairPolicy, writer: SignalStoreWriter, params: PrepareParams,
              scheduler: str | None) -> list[dict]:
    task = functools.partial(read_chunk, sources, contract, policy)
    derive = (table["derive_rr"].astype("boolean").fillna(False).astype(bool)
              if "derive_rr" in table else pd.Series(False, index=table.index))
    items = list(zip(table["source_index"].astype(int), table["locator"].astype(str),
                     derive & table["rr"].isna(), strict=True))
    record_ids = table["record_id"].tolist()
    starts = range(0, len(items), params.chunk)
    outcomes: list[dict] = []
    with dask_client(params.workers, scheduler) as client, \
            tqdm(total=len(items), unit="ECG", desc="prepare", disable=None) as bar:
        chunks = (items[s: s + params.chunk] for s in starts)
        for start, results in zip(starts, map_in_order(task, chunks, client), strict=True):
            good = [(record_ids[start + i], r.pop("signal"))
                    for i, r in enumerate(results) if "signal" in r]
            if good:
                writer.append([rid for rid, _ in good], np.stack([s for _, s in good]))
            outcomes.extend(results)
            bar.update(len(results))
    return outcomes


def _cohort(table: pd.DataFrame, outcomes: list[dict], ok: np.ndarray,
            n_classes: int) -> pd.DataFrame:
    kept = table.loc[ok].reset_index(drop=True)
    good = [o for o in outcomes if "reason" not in o]
    statements = kept["ad_statement"].astype("string")
    classes = top_statements(statements, kept["split"], n_classes)
    derived = np.array(["rr" in o for o in good], dtype=bool)
    rr = pd.to_numeric(kept["rr"], errors="coerce").astype(float)
    rr[derived] = [o["rr"] if o["rr"] is not None else np.nan
                   for o in good if "rr" in o]
    return pd.DataFrame({
        "record_id": kept["record_id"].astype(str),
        "subject_id": kept["subject_id"].astype(str),
        "split": kept["split"],
        "source": kept["source"],
        "rr": rr,
        "age": pd.to_numeric(kept["age"], errors="coerce").astype(float),
        "sex": kept["sex"].where(kept["sex"].isin(["M", "F"])),
        "ka": pd.array(kept["ka"], dtype="Int8"),
        "ad": map_statements(statements, classes),
        "rr_derived": derived & rr.notna().to_numpy(),
        "ad_statement": statements,
        "statements": kept["dx_codes"].astype("string") if "dx_codes" in kept else pd.NA,
        "locator": kept["locator"].astype(str),
        "fs_original": [o["fs"] for o in good],
        "repairs": [o["repairs"] for o in good],
    })


def cohort_digest(cohort: pd.DataFrame, contract: SignalContract) -> str:
    """Identity of the rows and signals that features are computed from (labels excluded:
    relabelling must not invalidate cached backbone features)."""
    h = hashlib.sha256()
    h.update(json.dumps([contract.fs, contract.n_samples, list(contract.leads)]).encode())
    for column in ("record_id", "subject_id", "split", "source", "locator"):
        h.update("\x1f".join(cohort[column].astype(str)).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def _write_cohort(cohort: pd.DataFrame, path: Path, digest: str) -> None:
    table = pa.Table.from_pandas(cohort, schema=COHORT_SCHEMA, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"cohort_digest"] = digest.encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def _kind(text: str) -> str:
    return text.split(":", 1)[0].strip()


def _summary(source_name: str, root: Path, cohort: pd.DataFrame, skipped: pd.DataFrame,
             notes: list[str], contract: SignalContract, digest: str, seconds: float) -> dict:
    splits = {}
    for split in SPLITS:
        part = cohort[cohort["split"] == split]
        splits[split] = {
            "records": len(part), "subjects": int(part["subject_id"].nunique()),
            **{task: int(part[task].notna().sum()) for task in ("rr", "age", "sex", "ka", "ad")},
            "ka_positive": int((part["ka"] == 1).sum()),
        }
    repairs = Counter(r.split(" ", 1)[0] for text in cohort["repairs"] if text
                      for r in text.split("; "))
    n_total = len(cohort) + len(skipped)
    return {
        "source": source_name, "root": str(root),
        "records": {"catalogued": n_total, "prepared": len(cohort),
                    "skipped": len(skipped)},
        "skipped_by_reason": dict(Counter(_kind(r) for r in skipped["reason"])),
        "repaired": dict(repairs),
        "splits": splits,
        "ad_classes": {k: int(v) for k, v in
                       cohort.loc[cohort["split"] == "train", "ad"].value_counts().items()},
        "notes": notes,
        "signal": {"fs": contract.fs, "n_samples": contract.n_samples,
                   "leads": list(contract.leads), "units": "mV"},
        "cohort_digest": digest,
        "seconds": round(seconds, 2),
        "records_per_s": round(n_total / seconds, 1) if seconds > 0 else None,
    }

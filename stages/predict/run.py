"""``pipeline predict``: a bundle's ensemble on new ECGs, one row per readable record.

The new ECGs go through the same code as the training cohort did: ``prepare`` (any source,
the bundle's conforming settings; unreadable records are skipped and named), then each
frozen backbone's ``extract``, checked against the fingerprint the model was trained on
before any ECG is computed, then the heads, the gate and the chosen combiner. Work lives
under ``work`` (default ``cache/predict/<digest of the request>``): a repeated call finds
the prepared signals and the features there and recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.params import ExtractParams, PrepareParams
from pipeline.staging import staged_file
from stages.extract.run import extract
from stages.fit.bootstrap import intervals
from stages.fit.features import load_features
from stages.fit.run import cohort_digest
from stages.fit.select import apply_spec
from stages.fit.tasks import TASKS, score
from stages.fit.train import predict as forward
from stages.predict.bundle import Bundle
from stages.prepare.classes import map_statements
from stages.prepare.run import COHORT, SKIPPED, prepare

REQUEST = "request.json"


def _listing(root: Path) -> str:
    """Digest of the files under ``root``, or of ``root`` itself when it is a file (names,
    sizes, times): a changed input means new work."""
    h = hashlib.sha256()
    if root.is_file():
        stat = root.stat()
        return f"{stat.st_size}-{stat.st_mtime_ns}"
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            stat = (Path(folder) / name).stat()
            h.update(f"{Path(folder, name).relative_to(root)}\0{stat.st_size}\0"
                     f"{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepare_new_ecgs(bundle: Bundle, source: str, root: Path, labels: Path | None, options: dict,
              work: Path) -> tuple[Path, str]:
    """The prepared new ECGs, reused when the same request was prepared before."""
    request = {"source": source, "root": str(root.resolve()),
               "labels": str(labels.resolve()) if labels else None, "options": options,
               "labels_listing": _listing(labels) if labels and labels.exists() else None,
               "listing": _listing(root), "prepare": bundle.manifest["prepare"]}
    out = work / "prepared"
    done = out / REQUEST
    if done.exists() and json.loads(done.read_text()) == request and (out / COHORT).exists():
        return out, "reused"
    params = PrepareParams(out=str(out), workers=0, **bundle.manifest["prepare"])
    prepare(source, root, out, params, labels=labels, options=options)
    done.write_text(json.dumps(request, indent=2))
    return out, "prepared"


def default_work(source: str, root: Path, bundle_dir: Path) -> Path:
    key = json.dumps([source, str(Path(root).resolve()), str(Path(bundle_dir).resolve())])
    return Path("cache") / "predict" / hashlib.sha256(key.encode()).hexdigest()[:12]


def _task_columns(bundle: Bundle, task: str, seed: int, cache: Path, cohort: pd.DataFrame,
                  digest: str) -> tuple[dict[str, np.ndarray], dict]:
    entry, spec = bundle.task(task), TASKS[task]
    source = load_features(cache, entry["experts"], digest, len(cohort),
                           inputs=entry["inputs"], gate_inputs=entry["gate_inputs"])
    model, saved = bundle.model(task, seed, source.fingerprints)
    source.scaling = {k: (m.numpy(), s.numpy()) for k, (m, s) in
                      saved["feature_scaling"].items()}
    rows = np.arange(len(cohort))
    mixture, outputs, weights = forward(model, source, rows, 256)
    features = None
    if "linear" in saved["combiner"]:  # a chosen linear probe reads its expert's features
        expert = saved["combiner"]["expert"]
        features = {expert: np.concatenate([batch[expert] for _, batch in source.batches(
            rows, 4096, None, [expert])])}
    combined = apply_spec(saved["combiner"], outputs, mixture, model.classification, features)
    columns: dict[str, np.ndarray] = {}
    if spec.kind == "regression":
        scale = saved["target_scale"]
        columns[task] = combined[:, 0] * scale["std"] + scale["mean"]
        experts = outputs[:, :, 0] * scale["std"] + scale["mean"]
    elif spec.kind == "binary":
        columns[f"{task}_score"] = combined[:, 1]
        columns[task] = (combined[:, 1] >= saved["threshold"]).astype(np.int64)
        experts = outputs[:, :, 1]
    else:
        classes = np.array(saved["classes"])
        columns[task] = classes[combined.argmax(axis=1)]
        for k, name in enumerate(classes):
            columns[f"{task}_p_{name}"] = combined[:, k]
        experts = classes[outputs.argmax(axis=-1)]
    for i, name in enumerate(model.experts):
        columns[f"{task}_expert_{name}"] = experts[:, i]
        columns[f"{task}_gate_{name}"] = weights[:, i]
    return columns, saved


def _truth(task: str, cohort: pd.DataFrame, saved: dict) -> tuple[np.ndarray, np.ndarray]:
    """(labelled mask, encoded labels) of the new ECGs in the model's own encoding."""
    spec = TASKS[task]
    if spec.kind == "multiclass":
        column = map_statements(cohort["ad_statement"], saved["classes"])
        index = {c: i for i, c in enumerate(saved["classes"])}
        y = np.array([index.get(str(v), -1) for v in column], dtype=np.int64)
        return column.notna().to_numpy() & (y >= 0), y
    column = cohort[task]
    labelled = column.notna().to_numpy()
    if spec.kind == "binary":
        return labelled, (column.astype(object) == spec.positive).to_numpy().astype(np.int64)
    return labelled, column.astype(float).fillna(0).to_numpy()


def _metrics(task: str, columns: dict[str, np.ndarray], cohort: pd.DataFrame, saved: dict
             ) -> dict | None:
    spec = TASKS[task]
    labelled, y = _truth(task, cohort, saved)
    if not labelled.any():
        return None
    if spec.kind == "multiclass":
        index = {c: i for i, c in enumerate(saved["classes"])}
        decision = np.array([index[c] for c in columns[task]])
    else:
        decision = np.asarray(columns[task])
    probability = columns.get(f"{task}_score")
    values = score(spec, y[labelled], decision[labelled],
                   probability[labelled] if probability is not None else None)
    subjects = cohort["subject_id"].astype(str).to_numpy()[labelled]
    ci = intervals(spec.metric, y[labelled], {"ensemble": decision[labelled][None]},
                   subjects, "ensemble")["ensemble"]["ci"]
    out = {"n": int(labelled.sum()), "subjects": len(np.unique(subjects)),
           **values, "ci": {spec.metric: ci}}
    if task == "rr" and "rr_derived" in cohort:  # RR read from our own R-peaks, not a label
        out["truth_derived_from_rpeaks"] = int(cohort["rr_derived"].to_numpy()[labelled].sum())
    return out


def run_predict(bundle_dir: Path, source: str, root: Path, out: Path,
                labels: Path | None = None, work: Path | None = None,
                weights: dict[str, str] | None = None, seed: int | None = None,
                device: str = "cpu", tasks: list[str] | None = None,
                options: dict | None = None) -> dict:
    """Predict every task of the bundle for the ECGs of ``root``; returns a summary."""
    started = time.perf_counter()
    bundle = Bundle.load(bundle_dir)
    tasks = bundle.select(tasks)
    unknown = sorted(set(weights or {}) - set(bundle.manifest["backbones"]))
    if unknown:
        raise ValueError(f"--weights names backbone(s) {', '.join(unknown)} that the bundle "
                         f"does not use ({', '.join(bundle.manifest['backbones'])})")
    work = Path(work) if work else default_work(source, root, bundle_dir)
    prepared, prepare_status = prepare_new_ecgs(bundle, source, Path(root), labels, options or {},
                                         work)
    cohort = pd.read_parquet(prepared / COHORT)
    skipped = pd.read_csv(prepared / SKIPPED)
    cache = work / "cache"
    settings = ExtractParams(out=str(cache), device=device, workers=0)
    backbones = list(dict.fromkeys(b for t in tasks for b in bundle.stores(t)))
    extracted = {}
    for name in backbones:
        params = bundle.backbone_params(name, (weights or {}).get(name))
        summary = extract(name, params, settings, prepared,
                          expected=bundle.manifest["backbones"][name]["fingerprint"])
        extracted[name] = summary["status"]
    digest = cohort_digest(prepared / COHORT)
    frame = pd.DataFrame({"record_id": cohort["record_id"], "subject_id": cohort["subject_id"],
                          "repairs": cohort["repairs"]})
    seeds, metrics = {}, {}
    for task in tasks:
        seeds[task] = bundle.task(task)["seeds"][0] if seed is None else seed
        columns, saved = _task_columns(bundle, task, seeds[task], cache, cohort, digest)
        metrics[task] = _metrics(task, columns, cohort, saved)
        if metrics[task] is not None:
            columns[f"{task}_truth"] = _truth_column(task, cohort, saved)
        frame = pd.concat([frame, pd.DataFrame(columns)], axis=1)
    with staged_file(Path(out)) as tmp:
        frame.to_parquet(tmp, index=False)
    summary = {"out": str(out), "records": len(frame), "skipped": skipped.to_dict("records"),
               "prepare": prepare_status, "extract": extracted, "seeds": seeds,
               "work": str(work), "metrics": {t: m for t, m in metrics.items() if m},
               "seconds": round(time.perf_counter() - started, 2)}
    if summary["metrics"]:
        with staged_file(metrics_path(Path(out))) as tmp:
            tmp.write_text(json.dumps(summary["metrics"], indent=2) + "\n")
    else:  # an earlier run's metrics must not sit beside these predictions
        metrics_path(Path(out)).unlink(missing_ok=True)
    return summary


def _truth_column(task: str, cohort: pd.DataFrame, saved: dict) -> np.ndarray:
    if TASKS[task].kind == "multiclass":
        return map_statements(cohort["ad_statement"], saved["classes"]).to_numpy(object)
    labelled, y = _truth(task, cohort, saved)
    return np.where(labelled, y, np.nan)


def metrics_path(out: Path) -> Path:
    return out.with_name(out.stem + ".metrics.json")

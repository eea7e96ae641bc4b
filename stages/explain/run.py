"""``pipeline explain``: saliency of a bundle's tasks on chosen ECGs, as figures and arrays.

Records come from a prepared signal store (the training cohort's, or new ECGs prepared as
``predict`` does) by id, or as the ``top`` largest errors of the fit stage's test
predictions. Per task and record: a PNG per expert and for the ensemble, and one ``.npz``
of every attribution; ``explain.json`` lists outputs, completeness gaps and steps. The
output folder is replaced whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.signal_store import SignalStore
from pipeline.staging import staged_dir
from stages.explain.attribution import Attribution, Explainer, explain_record
from stages.explain.figure import draw
from stages.extract.backbones.morphology import BEFORE_S, delineate
from stages.fit.tasks import TASKS
from stages.predict.bundle import Bundle
from stages.prepare.rpeaks import beat_sequence


def largest_errors(predictions: Path, task: str, n: int) -> list[str]:
    """The ``n`` test ECGs of the fit stage's first seed with the largest errors."""
    frame = pd.read_parquet(predictions)
    if frame.empty:
        return []
    frame = frame[frame["seed"] == frame["seed"].min()].dropna(subset=["truth"])
    kind = TASKS[task].kind
    if kind == "regression":
        error = (frame["truth"] - frame["prediction"]).abs()
    elif kind == "binary":
        error = (frame["truth"] - frame["score"]).abs()
    else:
        error = (frame["truth"] != frame["prediction"]).astype(float)
    order = np.argsort(-error.to_numpy(), kind="stable")
    return frame["record_id"].to_numpy()[order][:n].tolist()


def _title(task: str, record: str, a: Attribution) -> str:
    what = (f"{a.name}: integrated gradients, {a.steps} steps, completeness gap "
            f"{100 * a.gap:.2f} %" if a.method == "integrated gradients" else
            f"{a.name}: measured expert, not differentiable - its feature contributions")
    held = f" (held at the record's values: {', '.join(a.held_fixed)})" if a.held_fixed else ""
    return (f"{task} | record {record} | output {a.output:.4g} (baseline {a.baseline_output:.4g})"
            f"\n{what}{held}")


def run_explain(bundle_dir: Path, prepared: Path, out: Path, records: list[str] | None = None,
                top: int = 0, predictions: Path | None = None, tasks: list[str] | None = None,
                seed: int | None = None, weights: dict[str, str] | None = None,
                cache_dir: Path = Path("cache"), device: str = "cpu") -> dict:
    bundle = Bundle.load(bundle_dir)
    tasks = bundle.select(tasks)
    cohort = pd.read_parquet(Path(prepared) / "cohort.parquet")
    index = {r: i for i, r in enumerate(cohort["record_id"].astype(str))}
    chosen = {}
    for task in tasks:
        ids = list(records or [])
        if top:
            if predictions is None:
                raise ValueError("--top needs the fit stage's predictions folder")
            ids += largest_errors(Path(predictions) / f"{task}.parquet", task, top)
        missing = [r for r in ids if r not in index]
        if missing:
            raise ValueError(f"record(s) {', '.join(missing[:5])} are not in {prepared}")
        chosen[task] = list(dict.fromkeys(ids))
    if not any(chosen.values()):
        raise ValueError("no record to explain: pass --record ID or --top N")
    summary: dict = {}
    with SignalStore(Path(prepared) / "signals.h5") as store, staged_dir(Path(out)) as tmp:
        fs, leads = store.contract.fs, store.contract.leads
        for task, ids in chosen.items():
            explainer = Explainer(bundle, task, bundle.task(task)["seeds"][0] if seed is None
                                  else seed, weights or {}, cache_dir, leads, device)
            (tmp / task).mkdir(parents=True, exist_ok=True)
            summary[task] = {}
            for record in ids:
                row = index[record]
                signal = store.read(row, row + 1)[0].astype(np.float64)
                peaks = beat_sequence(signal, fs)
                found = delineate(signal, peaks, fs)
                beat = (found[0], found[1]["fiducials"], round(BEFORE_S * fs)) if found else None
                attributions = explain_record(explainer, signal, fs)
                safe = record.replace("/", "_").replace(":", "_")
                np.savez_compressed(tmp / task / f"{safe}.npz", signal=signal.astype(np.float32),
                                    **{a.name: a.values for a in attributions})
                for a in attributions:
                    draw(signal, fs, leads, a, _title(task, record, a),
                         tmp / task / f"{safe}_{a.name}.png", beat, peaks)
                summary[task][record] = {a.name: {
                    "method": a.method, "output": a.output, "baseline_output": a.baseline_output,
                    "completeness_gap": a.gap, "steps": a.steps, "held_fixed": a.held_fixed}
                    for a in attributions}
        (tmp / "explain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

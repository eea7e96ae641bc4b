"""ECG-MoE's additions side by side: the ensemble of each variant, per task, same cache.

A variant is a set of ``fit:`` overrides (``variants:`` in params.yaml), e.g. more experts
or a phase-aware gate. Only the ensemble is fitted per variant (its seeds are the fit
stage's, so the plain variant reproduces it); baselines stay with the fit stage. A variant
that changes nothing reuses the fit stage's ``metrics/<task>.json`` when it was fitted with
every fit setting equal, instead of fitting the same ensemble again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.params import FitParams
from stages.fit.run import TaskSkipped, fit_settings, fit_task, head_memo
from stages.fit.tasks import TASKS


def compare_variants(params: FitParams, variants: dict[str, dict], tasks: list[str],
                     cohort_path: Path, cache_dir: Path) -> dict:
    if not variants:
        raise ValueError("no variants to compare: add a `variants:` section to params.yaml")
    result: dict = {"seeds": list(range(params.seeds)), "variants": variants, "tasks": {}}
    for task in tasks:
        entry: dict = {"metric": TASKS[task].metric, "variants": {}}
        memo = head_memo(params, cache_dir)  # the fit stage's heads, and each other's
        for name, overrides in variants.items():
            fit = dataclasses.replace(params, **overrides)
            reused = _fitted(Path(params.metrics) / f"{task}.json", fit) if fit == params \
                else None
            if reused is not None:
                entry["variants"][name] = reused
                continue
            try:
                metrics = fit_task(task, fit, cohort_path, cache_dir, baselines=False,
                                   memo=memo).metrics
            except TaskSkipped as reason:
                entry["skipped"] = str(reason)
                break
            entry["variants"][name] = metrics["methods"]["ensemble"]
        result["tasks"][task] = entry
    return result


def _fitted(path: Path, fit: FitParams) -> dict | None:
    """The fit stage's ensemble metrics, if ``path`` was made with every one of these fit
    settings (any other, e.g. ``hidden``, ``lr`` or ``loss``, changes the ensemble)."""
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    same = (metrics.get("settings") == json.loads(json.dumps(fit_settings(fit)))
            and metrics.get("seeds") == list(range(fit.seeds)))
    return metrics["methods"]["ensemble"] if same and metrics.get("methods") else None

"""ECG-MoE's additions side by side: the ensemble of each variant, per task, same cache.

A variant is a set of ``fit:`` overrides (``variants:`` in params.yaml), e.g. more experts
or a phase-aware gate. Only the ensemble is fitted per variant (its seeds are the fit
stage's, so the plain variant reproduces it); baselines stay with the fit stage. Nothing
the fit stage computed is fitted again: when ``metrics/<task>.json`` was made with every fit
setting equal, a variant that changes nothing reuses its ensemble, and one that only turns
``combiner: select`` into ``gate`` reuses its gate (the candidate ``select`` fitted and
scored on the same heads, seeds and rows, and reported beside the ensemble).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.params import FitParams
from stages.fit.run import TaskSkipped, fit_settings, fit_task, head_memo
from stages.fit.select import GATE_NAME
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
            reused = _fitted(Path(params.metrics) / f"{task}.json", params, fit)
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


def _fitted(path: Path, params: FitParams, fit: FitParams) -> dict | None:
    """The variant ``fit``'s ensemble metrics from the fit stage's ``path``, if that was made
    with every one of the fit stage's settings ``params`` (any other, e.g. ``hidden``, ``lr``
    or ``loss``, changes the ensemble) and holds this variant: the ensemble itself, or the
    gate where the variant only makes ``select``'s gate the combiner."""
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    if (metrics.get("settings") != json.loads(json.dumps(fit_settings(params)))
            or metrics.get("seeds") != list(range(params.seeds)) or not metrics.get("methods")):
        return None
    if fit == params:
        return metrics["methods"]["ensemble"]
    if params.combiner == "select" and fit == dataclasses.replace(params, combiner=GATE_NAME):
        return metrics["methods"].get(GATE_NAME)
    return None

"""metrics/<task>.json and predictions/<task>.parquet -> one summary.md a reader can trust.

Every task appears in the report: one that was skipped, never fitted or whose files cannot be
read is listed with the reason instead of stopping the report for all the others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import pandas as pd

from pipeline.staging import staged_dir, staged_file
from stages.report import plots

TASKS = ("rr", "age", "sex", "ka", "ad")
LOWER_IS_BETTER = frozenset({"mae", "median_ae"})
# Unbounded errors get 3 significant figures; bounded scores (f1, auroc, r2, ...) 3 decimals.
_SIGNIFICANT = frozenset({"mae", "median_ae"})
_LEADING = ("ensemble", "uniform")
_BASELINES = ("mean_predictor", "majority")
_MAIN_PLOT: dict[str, tuple[str, str, Callable[..., Path]]] = {
    "regression": ("predicted vs true", "pred_vs_true", plots.plot_pred_vs_true),
    "binary": ("ROC", "roc", plots.plot_roc),
    "multiclass": ("confusion matrix", "confusion", plots.plot_confusion),
}
_PLOT_ERRORS = (OSError, ValueError, KeyError, TypeError)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def _variants_section(path: Path, multitask_path: Path) -> list[str]:
    """Each ECG-MoE addition's effect per task: the ensemble of every variant, same cache."""
    result = _read_json(path)
    if not result:
        return []
    names = list(result.get("variants", {}))
    multitask = (_read_json(multitask_path) or {}).get("tasks", {})
    header = [*names, "multi-task (fit: experts)"] if multitask else names
    lines = ["", "## ECG-MoE variants: the ensemble per task", "",
             "Each column fits the ensemble with the `fit:` overrides of one entry of "
             "`variants:` in params.yaml (same cache, splits and seeds; mean ± std over "
             "seeds); best per task in bold.", "",
             "| task (metric) | " + " | ".join(header) + " |",
             "|---|" + "---|" * len(header)]
    for task, entry in result.get("tasks", {}).items():
        metric = entry["metric"]
        if entry.get("skipped"):
            lines.append(f"| {task} (skipped) | " + " | ".join("—" for _ in header) + " |")
            continue
        values = {n: (entry["variants"].get(n) or {}).get(metric) for n in names}
        best = best_methods(metric, values)
        cells = [f"**{format_cell(metric, v)}**" if n in best else format_cell(metric, v)
                 for n, v in values.items()]
        if multitask:
            mt = multitask.get(task, {}).get("multitask", {}).get(metric)
            cells.append(format_cell(metric, mt) if mt else "n/a")
        lines.append(f"| {task} ({metric} {_arrow(metric)}) | " + " | ".join(cells) + " |")
    lines += ["", "Variants: " + "; ".join(
        f"`{n}`: " + (", ".join(f"{k}={v}" for k, v in o.items()) or "fit: as is")
        for n, o in result.get("variants", {}).items())]
    return lines


def _multitask_section(path: Path) -> list[str]:
    """The one-model-for-all-tasks fit beside each single-task ensemble, when it was run."""
    if not path.exists():
        return []
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return ["", "## Multi-task model", "", f"`{path}` is unreadable."]
    lines = ["", "## Multi-task model vs single-task ensembles", "",
             "One model for all tasks (`pipeline fit-ensemble --task all`: per expert a head "
             "whose trunk every task shares, cross-fitted, each task's combiner chosen as in "
             "its own fit), beside the single-task fit of the same experts, gate inputs, seeds "
             "and evaluation.", "",
             "| task (metric) | multi-task | combiner chosen | single-task ensemble |",
             "|---|---|---|---|"]
    for task, entry in result.get("tasks", {}).items():
        metric = entry["metric"]
        single = entry.get("single_task")
        chosen = ", ".join(f"{c} ×{n}" for c, n in entry.get("combiner", {}).items()) or "—"
        lines.append(f"| {task} ({metric} {_arrow(metric)}) | "
                     f"{format_cell(metric, entry['multitask'].get(metric))} | {chosen} | "
                     f"{format_cell(metric, single.get(metric)) if single else 'not comparable'} |")
    lines += [f"\n{task}: skipped ({reason})" for task, reason in result.get("skipped", {}).items()]
    return lines


def write_report(metrics_dir: Path, predictions_dir: Path, out_dir: Path,
                 tasks: Iterable[str] = TASKS) -> Path:
    """Write out_dir/summary.md and out_dir/plots/*.png for ``tasks`` (params.yaml's
    ``tasks:``); return the summary's path."""
    metrics_dir, predictions_dir, out_dir = Path(metrics_dir), Path(predictions_dir), Path(out_dir)
    tasks = load_metrics(metrics_dir, tasks)
    fitted = {task: m for task, m in tasks.items() if not m.get("skipped")}
    plot_links: dict[str, list[tuple[str, str]]] = {}
    plot_notes: dict[str, list[str]] = {}
    # every plot into one staged folder, published whole: a run stopped while drawing
    # leaves the previous run's plots, never some of each (nor plots of tasks since dropped)
    with staged_dir(out_dir / "plots") as plots_dir:
        for task, metrics in fitted.items():
            plot_links[task], plot_notes[task] = _task_plots(task, metrics, predictions_dir,
                                                             plots_dir)
    lines = [
        "# EnECG report",
        "",
        f"{len(fitted)} of {len(tasks)} tasks fitted; mean ± std over seeds, and for the "
        "headline metric [its 95 % interval over resampled subjects]. Evaluated on: "
        + "; ".join(_evaluated(task, m) for task, m in fitted.items()) + ".",
        *_random_warning(fitted.values()),
        *_synthetic_warning(fitted.values()),
        *_headline_section(tasks),
        *_skipped_section(tasks),
        *(line for task, m in fitted.items() for line in _task_section(task, m)),
        *_gate_section(fitted),
        *_variants_section(metrics_dir / "variants.json", metrics_dir / "multitask.json"),
        *_multitask_section(metrics_dir / "multitask.json"),
        *_data_section(tasks),
        *_plots_section(plot_links, plot_notes),
    ]
    summary = out_dir / "summary.md"
    with staged_file(summary) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


def load_metrics(metrics_dir: Path, tasks: Iterable[str] = TASKS) -> dict[str, dict]:
    """Each task id -> its metrics; a missing or unreadable file becomes a skipped entry.

    Only ``tasks`` are read: a task left out of ``tasks:`` is not a skipped task, and a
    metrics file left behind by an earlier run with it must not reappear in the report."""
    paths = {task: metrics_dir / f"{task}.json" for task in tasks}
    if not any(path.is_file() for path in paths.values()):
        raise ValueError(f"no task metrics ({', '.join(f'{t}.json' for t in paths)}) in "
                         f"{metrics_dir}; run `pipeline fit-ensemble` first")
    return {task: _read_task(task, path) for task, path in paths.items()}


def _read_task(task: str, path: Path) -> dict:
    if not path.is_file():
        return {"task": task, "skipped": f"no {path.name}: fit-ensemble wrote no metrics for it"}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {"task": task, "skipped": f"unreadable {path.name}: {err}"}
    if not isinstance(metrics, dict):
        return {"task": task, "skipped": f"malformed {path.name}: not a JSON object"}
    if metrics.get("skipped"):
        return metrics
    if not isinstance(metrics.get("methods"), dict) or not metrics.get("metric"):
        return {"task": task, "skipped": f"malformed {path.name}: no 'metric' or 'methods'"}
    return metrics


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def mean_std(value: object) -> tuple[float | None, float | None]:
    """A metric entry is {"mean", "std"}; tolerate a bare number (one seed) and nulls."""
    if isinstance(value, dict):
        return _number(value.get("mean")), _number(value.get("std"))
    return _number(value), None


def format_cell(metric: str, value: object) -> str:
    """'13.965 ± 0.035', '62.7 ± 1.0', '0.800 ± 0.012', or 'n/a'; with its 95 % interval
    when the entry has one ('0.800 ± 0.012 [0.750, 0.850]').

    Errors (MAE) keep as many decimals as their spread over seeds needs (std to two
    significant figures, the mean to the same place), so neither a real difference nor the
    spread is rounded away; scores keep 3 decimals.
    """
    mean, std = mean_std(value)
    if mean is None:
        return "n/a"
    decimals = 3
    if metric in _SIGNIFICANT:
        if std:
            decimals = min(4, max(0, 1 - math.floor(math.log10(abs(std)))))
        elif mean != 0:
            decimals = min(6, max(0, 2 - math.floor(math.log10(abs(mean)))))
    text = f"{mean:.{decimals}f}"
    if std is not None:
        text = f"{text} ± {std:.{decimals}f}"
    ci = value.get("ci") if isinstance(value, dict) else None
    if ci and all(_number(c) is not None for c in ci):
        text = f"{text} [{ci[0]:.{decimals}f}, {ci[1]:.{decimals}f}]"
    return text


def best_methods(metric: str, values: dict[str, object]) -> set[str]:
    """The method(s) with the best mean; ties are all best, nulls never are."""
    means = {m: mean for m, v in values.items() if (mean := mean_std(v)[0]) is not None}
    if not means:
        return set()
    target = (min if metric in LOWER_IS_BETTER else max)(means.values())
    return {m for m, mean in means.items() if mean == target}


def _arrow(metric: str) -> str:
    return "↓" if metric in LOWER_IS_BETTER else "↑"


def _method_order(metrics: dict) -> list[str]:
    """Ensemble and uniform first, then each backbone alone, then the naive baseline."""
    methods = list(metrics["methods"])
    backbones = [b for b in metrics.get("backbones", []) if b in methods]
    known = {*_LEADING, *backbones, *_BASELINES}
    return ([m for m in _LEADING if m in methods] + backbones
            + [m for m in methods if m not in known] + [m for m in _BASELINES if m in methods])


def _union(lists: Iterable[list[str]]) -> list[str]:
    return list(dict.fromkeys(item for items in lists for item in items))


def _cells(metric: str, values: dict[str, object], columns: list[str]) -> list[str]:
    best = best_methods(metric, {c: values[c] for c in columns if c in values})
    cells = []
    for column in columns:
        if column not in values:
            cells.append("—")
            continue
        text = format_cell(metric, values[column])
        cells.append(f"**{text}**" if column in best else text)
    return cells


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _random_warning(fitted: Iterable[dict]) -> list[str]:
    random = _union([b for b, is_random in m.get("random_weights", {}).items() if is_random]
                    for m in fitted)
    if not random:
        return []
    return ["", f"> **Warning: RANDOM weights.** {', '.join(random)} ran with random, untrained "
            "weights (demo features): the numbers show the pipeline works, not what pretrained "
            "models achieve."]


def _synthetic_warning(fitted: Iterable[dict]) -> list[str]:
    counts = [m.get("sources", {}) for m in fitted]
    synthetic = max((c.get("synthetic", 0) for c in counts), default=0)
    if not synthetic:
        return []
    total = max(sum(c.values()) for c in counts)
    return ["", f"> **Synthetic cohort.** {synthetic} of {total} evaluated ECGs come from the "
            "project's generator (`pipeline synth`). Its difficulty was calibrated so a simple "
            "baseline lands near real-data levels (README, \"The synthetic cohort\": "
            "calibration table), but a result here says how hard the generator made the "
            "task, never how ECGs behave."]


def _headline_section(tasks: dict[str, dict]) -> list[str]:
    fitted = {t: m for t, m in tasks.items() if not m.get("skipped")}
    columns = _union(_method_order(m) for m in fitted.values())
    rows = []
    for task, metrics in tasks.items():
        if metrics.get("skipped"):
            rows.append([f"{task} (skipped)", *["—"] * len(columns)])
            continue
        metric = metrics["metric"]
        values = {m: v.get(metric) for m, v in metrics["methods"].items() if isinstance(v, dict)}
        rows.append([f"{task} ({metric} {_arrow(metric)})", *_cells(metric, values, columns)])
    return ["", "## Headline metric per task", "",
            "Best method per task in bold; ↓ lower is better, ↑ higher is better.", "",
            *_table(["task (metric)", *columns], rows)]


def _skipped_section(tasks: dict[str, dict]) -> list[str]:
    skipped = [f"- `{task}`: {m['skipped']}" for task, m in tasks.items() if m.get("skipped")]
    return ["", "## Skipped tasks", "", *skipped] if skipped else []


def _evaluated(task: str, metrics: dict) -> str:
    evaluation = metrics.get("evaluation") or {}
    if evaluation.get("mode") == "cv":
        return (f"{task} {evaluation.get('folds')}-fold subject CV over "
                f"{evaluation.get('n_evaluated')} ECGs")
    return f"{task} the test split ({metrics.get('n', {}).get('test', '?')} ECGs)"


def _delta_row(metrics: dict, columns: list[str]) -> list[list[str]]:
    """The paired difference of each method's headline metric to the ensemble's."""
    deltas = metrics.get("vs_ensemble") or {}
    if not deltas:
        return []
    cells = []
    for column in columns:
        d = deltas.get(column)
        cells.append("—" if not d or column == "ensemble" else
                     f"{d['mean']:+.3g} [{d['ci'][0]:+.3g}, {d['ci'][1]:+.3g}]")
    return [[f"Δ {metrics['metric']} vs ensemble", *cells]]


def _task_section(task: str, metrics: dict) -> list[str]:
    columns = _method_order(metrics)
    methods = {m: v for m, v in metrics["methods"].items() if isinstance(v, dict)}
    names = _union([[metrics["metric"]], *(list(v) for v in methods.values())])
    rows = [[f"{name} {_arrow(name)}",
             *_cells(name, {m: v[name] for m, v in methods.items() if name in v}, columns)]
            for name in names] + _delta_row(metrics, columns)
    return ["", f"## {task}: every metric", "",
            f"{metrics.get('kind', 'unknown kind')}; headline metric `{metrics['metric']}`; "
            "best method per metric in bold; the last row is each method's paired difference "
            "to the ensemble, with its 95 % interval.", *_combiner_line(metrics), "",
            *_table(["metric", *columns], rows)]


def _combiner_line(metrics: dict) -> list[str]:
    """Which combiner the ensemble was, when it was chosen by cross-validated loss."""
    combiner = metrics.get("combiner") or {}
    chosen = combiner.get("chosen") or {}
    if combiner.get("setting") != "select" or not chosen:
        return []
    total = sum(chosen.values())
    parts = ", ".join(f"{name} in {count} of {total}"
                      for name, count in sorted(chosen.items(), key=lambda kv: -kv[1]))
    return [f"The ensemble is the combiner of lowest cross-validated training loss, chosen "
            f"afresh in every fit: {parts}."]


def _gate_section(fitted: dict[str, dict]) -> list[str]:
    gated = {t: m["gate_weights"] for t, m in fitted.items() if m.get("gate_weights")}
    if not gated:
        return []
    backbones = _union(list(weights) for weights in gated.values())
    rows = [[task, *(format_cell("gate", w[b]) if b in w else "—" for b in backbones)]
            for task, w in gated.items()]
    return ["", "## Mean gate weight per backbone", "",
            "Share the MoE gate gives each backbone on the evaluated ECGs (the gate is "
            "fitted whether or not it is the chosen combiner).", "",
            *_table(["task", *backbones], rows)]


def _data_section(tasks: dict[str, dict]) -> list[str]:
    rows = []
    for task, metrics in tasks.items():
        n = metrics.get("n") or {}
        seeds = metrics.get("seeds") or []
        rows.append([task, "skipped" if metrics.get("skipped") else metrics.get("kind", "?"),
                     f"{len(seeds)} ({', '.join(map(str, seeds))})" if seeds else "—",
                     *(str(n.get(split, "—")) for split in ("train", "val", "test")),
                     str(metrics.get("adapter", "—"))])
    return ["", "## Seeds and ECGs per split", "",
            *_table(["task", "kind", "seeds", "train", "val", "test", "adapter"], rows)]


def _plots_section(links: dict[str, list[tuple[str, str]]],
                   notes: dict[str, list[str]]) -> list[str]:
    lines = ["", "## Plots", ""]
    for task in links:
        items = [f"[{caption}]({href})" for caption, href in links[task]]
        lines.append(f"- `{task}`: {', '.join([*items, *notes[task]]) or 'none'}")
    return lines


def _task_plots(task: str, metrics: dict, predictions_dir: Path,
                plots_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw the task's plots into ``plots_dir`` (linked as ``plots/<name>``); a plot that
    cannot be drawn becomes a note, not a crash."""
    path = predictions_dir / f"{task}.parquet"
    if not path.is_file():
        return [], [f"no plots ({path.name} is absent)"]
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        return [], [f"no plots (cannot read {path.name}: {_one_line(err)})"]
    backbones = list(metrics.get("backbones") or [])
    jobs = [("gate weights", "gate_weights", partial(plots.plot_gate_weights, backbones=backbones))]
    links: list[tuple[str, str]] = []
    notes: list[str] = []
    kind = metrics.get("kind")
    if kind in _MAIN_PLOT:
        jobs.insert(0, _MAIN_PLOT[kind])
    else:
        notes.append(f"no main plot for kind {kind!r}")
    for caption, name, draw in jobs:
        target = plots_dir / f"{task}_{name}.png"
        try:
            draw(frame, task=task, path=target)
        except _PLOT_ERRORS as err:
            notes.append(f"no {caption} plot ({_one_line(err)})")
        else:
            links.append((caption, f"plots/{target.name}"))
    return links, notes


def _one_line(err: Exception) -> str:
    """An error as one markdown-safe line: a multi-line message would break the list."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__

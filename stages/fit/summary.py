"""The end-of-fit table: every method's metrics, mean ± std over seeds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _cell(values: dict | None, key: str) -> str:
    if not values or values.get(key) is None:
        return "n/a"
    return f"{values[key]['mean']:.3f} ± {values[key]['std']:.3f}"


def print_multitask(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"fit-ensemble all: one multi-task model, {len(result['seeds'])} seeds"
                        f" ({result['evaluation']} evaluation)")
    for column in ("task", "metric", "test n", "multi-task", "combiner",
                   "single-task ensemble"):
        table.add_column(column, justify="left" if column in ("task", "metric", "combiner")
                         else "right")
    for task, entry in result["tasks"].items():
        key = entry["metric"]
        table.add_row(task, key, str(entry["n_test"]), _cell(entry["multitask"], key),
                      ", ".join(f"{c} ×{n}" for c, n in entry["combiner"].items()),
                      _cell(entry["single_task"], key))
    console.print(table)
    for task, entry in result["tasks"].items():
        if entry.get("single_task_note"):
            console.print(f"note: {task}: {entry['single_task_note']}")
    for task, reason in result.get("skipped", {}).items():
        console.print(f"skipped: {task}: {reason}")


def print_variants(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    names = list(result["variants"])
    table = Table(title=f"compare: ensemble per variant, {len(result['seeds'])} seeds")
    table.add_column("task")
    for name in names:
        table.add_column(name, justify="right")
    for task, entry in result["tasks"].items():
        key = entry["metric"]
        if entry.get("skipped"):
            table.add_row(f"{task} ({key})", *["skipped"] * len(names))
            continue
        table.add_row(f"{task} ({key})", *(_cell(entry["variants"].get(n), key)
                                           for n in names))
    console.print(table)


def print_fit(metrics: dict, console: Console | None = None) -> None:
    console = console or Console()
    names = list(next(iter(metrics["methods"].values())) or {})
    evaluation = metrics.get("evaluation", {})
    how = (f"{evaluation.get('folds')}-fold subject CV over {evaluation.get('n_evaluated')} ECGs"
           if evaluation.get("mode") == "cv" else f"test n={metrics['n']['test']}")
    table = Table(title=f"fit-ensemble {metrics['task']}: {len(metrics['seeds'])} seeds, {how}")
    table.add_column("method")
    for name in names:
        table.add_column(name + (" *" if name == metrics["metric"] else ""), justify="right")
    table.add_column("95% CI *", justify="right")
    table.add_column("Δ vs ensemble [95% CI]", justify="right")
    for method, values in metrics["methods"].items():
        cells = ["n/a" if not values or not values.get(k) else
                 f"{values[k]['mean']:.3f} ± {values[k].get('std', 0.0):.3f}" for k in names]
        headline = (values or {}).get(metrics["metric"]) or {}
        ci = headline.get("ci")
        delta = metrics.get("vs_ensemble", {}).get(method)
        table.add_row(method, *cells, f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "",
                      f"{delta['mean']:+.3f} [{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}]"
                      if delta and method != "ensemble" else "")
    console.print(table)
    if metrics.get("gate_weights"):
        weights = ", ".join(f"{b} {w['mean']:.2f}" for b, w in metrics["gate_weights"].items())
        console.print(f"mean gate weights on evaluated ECGs: {weights}")
    if any(metrics["random_weights"].values()):
        console.print("note: features come from RANDOM-weight backbones (demo)")

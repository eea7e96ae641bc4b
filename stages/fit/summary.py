"""The end-of-fit table: every method's metrics, mean ± std over seeds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_fit(metrics: dict, console: Console | None = None) -> None:
    console = console or Console()
    names = list(next(iter(metrics["methods"].values())) or {})
    n = metrics["n"]
    table = Table(title=f"fit-ensemble {metrics['task']}: {len(metrics['seeds'])} seeds, "
                        f"test n={n['test']} (train {n['train']}, val {n['val']})")
    table.add_column("method")
    for name in names:
        table.add_column(name + (" *" if name == metrics["metric"] else ""), justify="right")
    for method, values in metrics["methods"].items():
        cells = ["n/a" if not values or values.get(k) is None else
                 f"{values[k]['mean']:.3f} ± {values[k]['std']:.3f}" for k in names]
        table.add_row(method, *cells)
    console.print(table)
    weights = ", ".join(f"{b} {w['mean']:.2f}" for b, w in metrics["gate_weights"].items())
    console.print(f"mean gate weights on test: {weights}")
    if any(metrics["random_weights"].values()):
        console.print("note: features come from RANDOM-weight backbones (demo)")

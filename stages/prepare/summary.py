"""The end-of-run table a user reads first: counts per split and label, skips and repairs."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from stages.prepare.splits import SPLITS

_TASKS = ("rr", "age", "sex", "ka", "ad")


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    records = summary["records"]
    table = Table(title=f"prepare: {summary['source']} - {records['prepared']} of "
                        f"{records['catalogued']} records in {summary['seconds']} s")
    for column in ("split", "records", "subjects", *_TASKS, "ka=1"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in SPLITS:
        row = summary["splits"][split]
        table.add_row(split, str(row["records"]), str(row["subjects"]),
                      *(str(row[t]) for t in _TASKS), str(row["ka_positive"]))
    console.print(table)
    for reason, count in sorted(summary["skipped_by_reason"].items()):
        console.print(f"skipped {count}: {reason}")
    for repair, count in sorted(summary["repaired"].items()):
        console.print(f"repaired {count}: {repair}")
    for note in summary["notes"]:
        console.print(f"note: {note}")

"""Source adapters: one module per archive format, found by name in one registry.

A source turns an archive into a *catalog* (one row per record: ids, a locator for the
signal, and every label it can derive) and loads one record's signal by locator. Adding a
format is one new module in this package that decorates its class with ``@register``.

Optional catalog columns: ``split`` (a source's own recommended split, used instead of the
seeded subject split when present) and ``derive_rr`` (compute RR from R-peaks for that
record, when the source has no RR measurement).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.registry import Registry
from stages.prepare.records import RawRecord

CATALOG_COLUMNS = ("record_id", "subject_id", "locator", "rr", "age", "sex", "ka", "ad_statement")

class SourceError(RuntimeError):
    """The archive as a whole cannot be read (wrong root, missing or malformed tables)."""


@dataclass
class Catalog:
    """Records of an archive with their labels; ``notes`` say which labels are unavailable."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)


class Source(abc.ABC):
    """Base of all adapters: holds where the archive is; subclasses read it."""

    name: str = ""

    def __init__(self, root: Path, labels: Path | None = None, options: dict | None = None):
        self.root = Path(root)
        self.labels = Path(labels) if labels else None
        self.options = dict(options or {})
        if not self.root.is_dir():
            raise SourceError(f"{self.name}: root folder {self.root} does not exist")

    @abc.abstractmethod
    def catalog(self) -> Catalog:
        """Every record of the archive with the labels it can derive."""

    @abc.abstractmethod
    def load(self, locator: str) -> RawRecord:
        """One record's signal; raise RecordError with a reason when it cannot be used."""


SOURCES: Registry[Source] = Registry("source", __name__, SourceError)
register = SOURCES.register


def create_source(name: str, root: Path, labels: Path | None = None,
                  options: dict | None = None) -> Source:
    return SOURCES.get(name)(root, labels, options)

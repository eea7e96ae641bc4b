"""Source adapters: one module per archive format, found by name in one registry.

A source turns an archive into a *catalog* (one row per record: ids, a locator for the
signal, and every label it can derive) and loads one record's signal by locator. Adding a
format is one new module in this package that decorates its class with ``@register``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stages.prepare.records import RawRecord

CATALOG_COLUMNS = ("record_id", "subject_id", "locator", "rr", "age", "sex", "ka", "ad_statement")

_REGISTRY: dict[str, type[Source]] = {}


class SourceError(RuntimeError):
    """The archive as a whole cannot be read (wrong root, missing or malformed tables)."""


@dataclass
class Catalog:
    """Records of an archive with their labels; ``notes`` say which labels are unavailable."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)


class Source:
    """Base of all adapters: holds where the archive is; subclasses read it."""

    name: str = ""

    def __init__(self, root: Path, labels: Path | None = None):
        self.root = Path(root)
        self.labels = Path(labels) if labels else None
        if not self.root.is_dir():
            raise SourceError(f"{self.name}: root folder {self.root} does not exist")

    def catalog(self) -> Catalog:
        raise NotImplementedError  # every registered subclass implements it

    def load(self, locator: str) -> RawRecord:
        raise NotImplementedError  # every registered subclass implements it


def register(name: str) -> Callable[[type[Source]], type[Source]]:
    def decorate(cls: type[Source]) -> type[Source]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available_sources() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def create_source(name: str, root: Path, labels: Path | None = None) -> Source:
    _discover()
    if name not in _REGISTRY:
        raise SourceError(f"unknown source {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](root, labels)

"""A name -> class registry whose members are the modules of one package.

Adding a source or a backbone is one new module that decorates its class with
``@REGISTRY.register("name")``; the registry imports the package's modules on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, error: type[Exception] = KeyError):
        self.kind, self.package, self.error = kind, package, error
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            cls.name = name
            self._classes[name] = cls
            return cls
        return decorate

    def _discover(self) -> None:
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        self._discover()
        if name not in self._classes:
            raise self.error(f"unknown {self.kind} {name!r}; available: "
                             f"{', '.join(sorted(self._classes))}")
        return self._classes[name]

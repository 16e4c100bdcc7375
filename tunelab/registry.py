"""A tiny name -> class registry. Methods and objectives register themselves on import."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from tunelab.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a class. `package` is imported lazily (all its modules) on first lookup,
    so adding a method is adding a file: there is no central list to edit."""

    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._items: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str):
        def deco(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            cls.name = name
            self._items[name] = cls
            return cls
        return deco

    def _load_all(self) -> None:
        if self._loaded:
            return
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
        self._loaded = True

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._items)

    def get(self, name: str) -> type[T]:
        self._load_all()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._items[name]

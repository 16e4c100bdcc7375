"""Registered components: a tiny name -> class registry, the base every registered component shares,
and the registries of methods, objectives, diagnostics and data stages.

A registry knows the package its components live in and imports all of its modules on first
lookup, so adding a method is adding a file: there is no central list to edit. The registries are
declared here, below everything, so that the run config can resolve a component's options without
importing the components' packages (it looks them up by name).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar, Generic, TypeVar

from tunelab.errors import ConfigError
from tunelab.options import NoOptions

T = TypeVar("T")


class Component:
    """Base of every registered component (method, objective, diagnostic): its registered `name`,
    its typed options class `Config` (an `Options` dataclass; `NoOptions` when it takes none) and
    the options it was built with (`self.cfg`)."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions

    def __init__(self, cfg: Any = None):
        self.cfg = cfg if cfg is not None else self.Config()


class Registry(Generic[T]):
    """Maps a name to a class. `package` is imported lazily (all its modules) on first lookup."""

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


METHODS: Registry[Any] = Registry("method", "tunelab.methods")
"""Parameterization methods (tunelab.methods.Method)."""
OBJECTIVES: Registry[Any] = Registry("objective", "tunelab.objectives")
"""Token-level training objectives (tunelab.objectives.Objective)."""
DIAGNOSTICS: Registry[Any] = Registry("diagnostic", "tunelab.diagnostics")
"""Side-effect diagnostics (tunelab.diagnostics.Diagnostic)."""
DATA_STAGES: Registry[Any] = Registry("data stage", "tunelab.curate")
"""Dataset -> dataset stages: selection, relabelling, edit-span targets, task mixing
(tunelab.curate.DataStage)."""

"""The `diagnostics` section of the run config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError
from tunelab.options import Options, from_dict, to_dict
from tunelab.registry import DIAGNOSTICS


@dataclass(kw_only=True)
class DiagnosticsConfig(Options):
    after_train: list[str] | None = None
    """Diagnostics to run when training ends (RUN/diagnostics/<name>.json). null: the cheap ones that
    make sense on the run's data: `forgetting` and `tuco` always, `knowledge` when data.train is
    builtin:facts; `intruder` (one SVD per weight matrix) only when named. []: none."""
    options: dict[str, Any] = field(default_factory=dict)
    """Each diagnostic's options by name, e.g. {tuco: {num_prompts: 16}}; used after training and by
    `tunelab diagnose`. Validated here; the defaults of a named diagnostic are filled in."""

    def validate(self) -> None:
        names = list(self.after_train or []) + list(self.options)
        if not names:
            return
        for i, name in enumerate(self.after_train or []):
            if name not in DIAGNOSTICS.names():
                raise ConfigError(f"after_train[{i}]: unknown diagnostic '{name}'; choose from "
                                  f"{', '.join(DIAGNOSTICS.names())}")
        for name, opts in list(self.options.items()):
            if name not in DIAGNOSTICS.names():
                raise ConfigError(f"options.{name}: unknown diagnostic; choose from {', '.join(DIAGNOSTICS.names())}")
            cls = DIAGNOSTICS.get(name)
            self.options[name] = to_dict(from_dict(cls.Config, opts, f"options.{name}"))

    def config_of(self, name: str):
        """The typed Config of diagnostic `name` from `options` (its defaults where absent)."""
        return from_dict(DIAGNOSTICS.get(name).Config, self.options.get(name), f"diagnostics.options.{name}")

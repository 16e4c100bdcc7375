"""The run config: typed dataclasses, YAML + `a.b=c` overrides, validation before any work.

Each section's dataclass lives next to the component it configures; this file only composes them,
reads YAML and overrides, and names the YAML line of any bad value (tunelab.options turns dicts into
dataclasses and names the key path). Methods and objectives are found through their registries.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.data.config import DataConfig
from tunelab.diagnostics.config import DiagnosticsConfig
from tunelab.errors import ConfigError
from tunelab.eval.config import EvalConfig
from tunelab.models.config import ModelConfig, check_context, looks_like_path
from tunelab.options import ComponentSpec, from_dict, to_dict
from tunelab.privacy.config import PrivacyConfig
from tunelab.federated.config import FederatedConfig
from tunelab.registry import METHODS, OBJECTIVES
from tunelab.training.config import TrainConfig

__all__ = ["ComponentSpec", "RunConfig", "build", "dump", "from_dict", "load", "to_dict"]


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model: built-in name, local directory, hub id or .gguf file."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    method: ComponentSpec = field(default_factory=lambda: ComponentSpec(name="lora"))
    """The parameterization: which weights train and how (full, lora, ...)."""
    objective: ComponentSpec = field(default_factory=lambda: ComponentSpec(name="sft"))
    """The token-level loss (sft, ...)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, precision, checkpointing."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Task evaluation (loss + exact match by generation)."""
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    """Side-effect diagnostics after training (forgetting, knowledge, tuco, intruder) and their options."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Differential privacy: DP-SGD with per-example clipping, noise and an epsilon accountant."""
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    """What `tunelab federate` runs: FedKSeed or FedAvg of adapters over clients (unused by `train`)."""
    output: str = "runs/latest"
    """The run directory."""

    def __post_init__(self) -> None:
        check_context(self.model, self.data.max_length)  # rules between sections, named by key path


# ----------------------------------------------------------------------------- components

def resolve_component(registry, raw, path: str) -> ComponentSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{path}.name: required; choose one of: {', '.join(registry.names())}")
    opts = dict(raw)
    name = opts.pop("name")
    try:
        cls = registry.get(name)
    except ConfigError as e:
        raise ConfigError(f"{path}.name: {e}") from None
    fields = sorted(f.name for f in dataclasses.fields(cls.Config) if f.init)
    unknown = sorted(map(str, set(opts) - set(fields)))
    if unknown:  # e.g. LoRA's alpha left in a YAML whose method.name was overridden to full
        valid = f"its options: {', '.join(fields)}" if fields else "which takes no options"
        raise ConfigError(f"{path}.{unknown[0]}: not an option of {path} '{name}', {valid} "
                          f"(a key left from another {path}?)")
    return ComponentSpec(name=name, options=from_dict(cls.Config, opts, path))


# ----------------------------------------------------------------------------- YAML + overrides

def _line_of(node, keys: list[str]) -> int | None:
    """The 1-based YAML line of a dotted key path, for error messages."""
    for k in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        match = [(kn, vn) for kn, vn in node.value if kn.value == k]
        if not match:
            return None
        kn, node = match[0]
    return kn.start_mark.line + 1


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_path(d: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        if isinstance(d.get(k), str) and k in ("method", "objective"):
            d[k] = {"name": d[k]}
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{'.'.join(keys)}: '{k}' is not a section")
    d[keys[-1]] = value


def build(raw: dict, source: str = "config") -> RunConfig:
    raw = dict(raw or {})
    method = resolve_component(METHODS, raw.pop("method", "lora"), "method")
    objective = resolve_component(OBJECTIVES, raw.pop("objective", "sft"), "objective")
    cfg = from_dict(RunConfig, raw)
    cfg.method, cfg.objective = method, objective
    return cfg


# ----------------------------------------------------------------------------- relative paths

def _join(value: str, base: Path) -> str:
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _data_path(value: str, base: Path) -> str:
    from tunelab.data.config import HOLDOUT
    return value if not value or value == HOLDOUT or value.startswith("builtin:") else _join(value, base)


def _model_path(value: str, base: Path) -> str:
    """A built-in name or a hub id stays as it is; a path (an existing file or folder, or a name
    that can only be a path) is made absolute."""
    path = _join(value, base)
    return path if os.path.exists(path) or looks_like_path(value) else value


PATH_FIELDS: dict[tuple[str, ...], Any] = {
    ("model", "name"): _model_path, ("data", "train"): _data_path, ("data", "eval"): _data_path,
    ("output",): _join,
}
"""The config fields that may hold a path, and how a relative one is made absolute against a folder."""


def anchor_paths(raw: dict, base: Path) -> None:
    """Make the relative paths among PATH_FIELDS in `raw` absolute against `base`, in place."""
    for keys, absolute in PATH_FIELDS.items():
        node = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = absolute(node[keys[-1]], base)


def load(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read YAML `path` (or start from `base`), apply `a.b=c` overrides, validate. Errors name
    the file, the line and the key path. Relative paths in the YAML resolve against its folder,
    those in overrides, `base` and defaults against the working directory; all come back absolute."""
    raw, root = copy.deepcopy(base or {}), None
    if path is not None:
        text = Path(path).read_text()
        try:
            root = yaml.compose(text)
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        anchor_paths(raw, Path(path).resolve().parent)
    by_key = {}
    for item in overrides:
        keys, value = parse_override(item)
        set_path(raw, keys, value)
        by_key[".".join(keys)] = item
    try:
        cfg = build(raw)
        cfg.model.name, cfg.data.train = _model_path(cfg.model.name, Path.cwd()), _data_path(cfg.data.train, Path.cwd())
        cfg.data.eval = cfg.data.eval and _data_path(cfg.data.eval, Path.cwd())
        cfg.output = _join(cfg.output, Path.cwd())
        return cfg
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        given = next((item for k, item in by_key.items() if key == k or key.startswith(k + ".")), None)
        if given is not None:  # the value came from the command line, not from the YAML line of its key
            raise ConfigError(f"command line: {given}: {e}") from None
        line = _line_of(root, key.split(".")) if root is not None else None
        where = f"{path}:{line}: " if line else (f"{path}: " if path else "")
        raise ConfigError(f"{where}{e}") from None


def dump(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

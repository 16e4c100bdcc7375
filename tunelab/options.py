"""Typed options: dataclasses built from dicts (YAML, `a.b=c` overrides) with every bad value named
by its key path, and the one way options declare and check their numeric ranges.

An options dataclass derives from `Options`, declares the valid range of its numeric fields in
`ranges` and any other rule in `validate()`; both run at construction, after a check that every
`Literal[...]` field holds one of its values (so an options object built in Python is checked as
strictly as one read from YAML):

    @dataclass(kw_only=True)
    class LoRAConfig(Options):
        ranges: ClassVar = {"r": ">= 1", "alpha": "> 0", "dropout": "[0, 1)"}
        r: int = 16
        ...

A range is `>= a`, `> a`, `<= b`, `< b` or an interval `[a, b]`, `[a, b)`, `(a, b]`, `(a, b)`; a value
must also be finite (NaN and inf never pass). An unset optional field (None) is not checked.
Subclasses inherit their parents' ranges and may override one; `validate` overrides call super().
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from tunelab.errors import ConfigError

# ----------------------------------------------------------------------------- ranges

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


@functools.lru_cache(maxsize=None)
def parse_range(spec: str) -> tuple[float, bool, float, bool]:
    """(low, low included?, high, high included?) of a range spec (see the module docstring)."""
    if m := _BOUND.match(spec.strip()):
        op, x = m.group(1), float(m.group(2))
        return (x, op == ">=", math.inf, False) if op[0] == ">" else (-math.inf, False, x, op == "<=")
    if m := _INTERVAL.match(spec.strip()):
        return float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"
    raise ValueError(f"bad range spec {spec!r}")


def in_range(value: float, spec: str) -> bool:
    low, low_in, high, high_in = parse_range(spec)
    if not math.isfinite(value):
        return False
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def check_range(name: str, value: float, spec: str) -> None:
    """ConfigError `name: must be <spec>, got <value>` unless `value` is finite and within `spec`."""
    if in_range(value, spec):
        return
    said = spec if _BOUND.match(spec.strip()) else f"in {spec}"
    finite = "finite and " if isinstance(value, float) and not math.isfinite(value) else ""
    raise ConfigError(f"{name}: must be {finite}{said}, got {value!r}")


def require(cond: bool, name: str, message: str) -> None:
    """For rules that are not a range: ConfigError `name: message` unless `cond`."""
    if not cond:
        raise ConfigError(f"{name}: {message}")


class Options:
    """Base of every options dataclass (a component's `Config`, a run-config section)."""

    ranges: ClassVar[dict[str, str]] = {}
    """Field name -> valid range (checked at construction, before `validate`)."""

    def __post_init__(self) -> None:
        for name, choices in _literal_fields(type(self)).items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name}: {value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
        for name, spec in self.all_ranges().items():
            assert any(f.name == name for f in dataclasses.fields(self)), f"range for unknown field {name}"
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, spec)
        self.validate()

    @classmethod
    def all_ranges(cls) -> dict[str, str]:
        """This class's ranges merged over its bases (a subclass's entry wins)."""
        out: dict[str, str] = {}
        for c in reversed(cls.__mro__):
            out.update(vars(c).get("ranges", {}))
        return out

    def validate(self) -> None:
        """Rules beyond ranges, and normalisation (e.g. a tuple default made a list)."""


@functools.lru_cache(maxsize=None)
def _literal_fields(cls) -> dict[str, tuple]:
    """Field name -> allowed values, for the fields annotated Literal[...] (or Optional of one)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        lits = [a for a in args if typing.get_origin(a) is Literal]
        if lits and name in {f.name for f in dataclasses.fields(cls)}:
            out[name] = typing.get_args(lits[0]) + ((None,) if type(None) in args else ())
    return out


@dataclass(kw_only=True)
class NoOptions(Options):
    """This component takes no options."""


@dataclass(kw_only=True)
class ComponentSpec:
    """A registered component (method or objective): its name and its own typed options."""
    name: str
    options: Any = None  # the component's Config dataclass, filled by `tunelab.config.resolve_component`


# ----------------------------------------------------------------------------- dict -> dataclass

def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce(value, tp, path: str):
    """Check `value` against the annotation `tp`; convert int->float; raise ConfigError naming `path`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} is not a valid value")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not valid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "2e-4" as a string
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data, path: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and bad values name their key path."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(data) - fields))  # YAML keys may be ints
    if unknown:
        valid = ", ".join(sorted(fields))
        if re.fullmatch(r"[\w-]+", unknown[0]):
            raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid keys: {valid}")
        # an empty key, or one with a dot, colon or space, would garble the key path: name its parent
        raise ConfigError(f"{path or 'config'}: unknown key {unknown[0]!r}; valid keys: {valid}")
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ checks name the field; add the section path
        raise ConfigError(f"{prefix}{e}") from None


def to_dict(obj) -> Any:
    if isinstance(obj, ComponentSpec):
        return {"name": obj.name, **(to_dict(obj.options) if obj.options is not None else {})}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj

"""Built-in synthetic tasks, loaded from a spec string `builtin:NAME?k=v&k2=v2`.

Public surface:
- `load_builtin(spec) -> list[Record]`: parse the spec, validate its options, generate the rows.
- `list_builtin() -> dict[name, description]`: every registered task with its one-line summary.
- `task(name)`: decorator that registers a generator function (used by the task modules).
- `Range`: an `Annotated` marker bounding an int/float option.

A task is a function whose keyword parameters *are* its options: each carries a type annotation
(`int`, `float`, `str`, `bool`, or a `Literal[...]` of strings, optionally wrapped in
`Annotated[..., Range(lo, hi)]`) and a default. Adding a task is adding a module here with an
`@task("name")` function; nothing central lists them. Every task takes a `seed` option and must be
deterministic in it: same spec -> identical records (private `random.Random`, never the global RNG).
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal
from urllib.parse import parse_qsl, urlsplit

from tunelab.data.records import Record
from tunelab.errors import ConfigError
from tunelab.registry import Registry

TaskFn = Callable[..., list[Record]]

_TASKS: Registry[Any] = Registry("builtin task", __name__)


@dataclass(frozen=True)
class Range:
    """Inclusive bounds for a numeric option: `n: Annotated[int, Range(1, 10**6)] = 1000`."""
    lo: float | None = None
    hi: float | None = None

    def check(self, value: float) -> str | None:
        """An error message if `value` is out of bounds, else None."""
        if self.lo is not None and value < self.lo:
            return f"must be >= {self.lo:g}"
        if self.hi is not None and value > self.hi:
            return f"must be <= {self.hi:g}"
        return None


@dataclass(frozen=True)
class Option:
    """One typed option of a task, read from its function signature."""
    name: str
    type: Any
    default: Any
    choices: tuple[str, ...] | None = None
    bounds: Range | None = None

    def describe(self) -> str:
        """`name=default` plus the choices, for error messages."""
        extra = f" (one of {'|'.join(self.choices)})" if self.choices else ""
        return f"{self.name}={self.default}{extra}"


def task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Register `fn` as builtin task `name`. Its keyword parameters are the options; each must have
    a type annotation and a default, and one must be `seed`."""
    def deco(fn: TaskFn) -> TaskFn:
        fn.options = _options_of(fn)  # type: ignore[attr-defined]
        if "seed" not in fn.options:  # type: ignore[attr-defined]
            raise TypeError(f"builtin task '{name}' must take a `seed` option")
        return _TASKS.register(name)(fn)
    return deco


def _options_of(fn: TaskFn) -> dict[str, Option]:
    """Read typed options (name, type, default, choices, bounds) from `fn`'s signature."""
    hints = typing.get_type_hints(fn, include_extras=True)
    options = {}
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty or p.name not in hints:
            raise TypeError(f"{fn.__name__}: option '{p.name}' needs a type annotation and a default")
        tp, bounds = hints[p.name], None
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extras = typing.get_args(tp)
            bounds = next((e for e in extras if isinstance(e, Range)), None)
        choices = tuple(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None
        if not choices and tp not in _PARSERS:
            raise TypeError(f"{fn.__name__}: option '{p.name}' has unsupported type {tp!r}")
        options[p.name] = Option(p.name, str if choices else tp, p.default, choices, bounds)
    return options


def list_builtin() -> dict[str, str]:
    """Every registered task name -> the first line of its docstring."""
    return {name: _summary(_TASKS.get(name)) for name in _TASKS.names()}


def _summary(fn: TaskFn) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.splitlines()[0] if doc else ""


def load_builtin(spec: str) -> list[Record]:
    """Generate the records of `builtin:NAME?k=v&...`. Unknown task names, unknown options and bad
    values raise ConfigError naming the culprit and the valid alternatives."""
    name, raw = parse_spec(spec)
    fn = _TASKS.get(name)
    kwargs = {key: _coerce(name, fn.options, key, value) for key, value in raw.items()}
    return fn(**kwargs)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`builtin:arith?n=5&split=test` -> ("arith", {"n": "5", "split": "test"}), values unparsed."""
    parts = urlsplit(spec.strip())
    if parts.scheme != "builtin" or not parts.path or parts.netloc or parts.fragment:
        raise ConfigError(f"bad builtin spec '{spec}': expected 'builtin:NAME?key=value&key2=value2'")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as err:
        raise ConfigError(f"bad builtin spec '{spec}': options must look like key=value&key2=value2") from err
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise ConfigError(f"builtin:{parts.path}: option '{key}' given twice")
        options[key] = value
    return parts.path, options


def _coerce(task_name: str, options: dict[str, Option], key: str, value: str) -> Any:
    """Turn the string `value` into option `key`'s type, or raise ConfigError naming the option."""
    where = f"builtin:{task_name}"
    if key not in options:
        valid = ", ".join(o.describe() for o in options.values())
        raise ConfigError(f"{where}: unknown option '{key}'; valid options: {valid}")
    opt = options[key]
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where}: option '{key}' must be one of {', '.join(opt.choices)}; got '{value}'")
    try:
        out = _PARSERS[opt.type](value)
    except ValueError as err:
        raise ConfigError(f"{where}: option '{key}' must be {opt.type.__name__}, got '{value}'") from err
    problem = opt.bounds.check(out) if opt.bounds else None
    if problem:
        raise ConfigError(f"{where}: option '{key}' {problem}, got {value}")
    return out


def _parse_bool(value: str) -> bool:
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.strip().lower() not in table:
        raise ValueError(f"not a boolean: {value!r}")
    return table[value.strip().lower()]


_PARSERS: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str, bool: _parse_bool}
"""How each option type is read from its query-string text (KeyError/ValueError: bad value)."""

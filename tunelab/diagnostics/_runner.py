"""Choose, run and write diagnostics for a trained run (RUN/diagnostics/<name>.json)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tunelab.diagnostics._base import Findings
from tunelab.errors import ConfigError
from tunelab.options import to_dict
from tunelab.registry import DIAGNOSTICS

OUT_DIR = "diagnostics"


def default_names(run_cfg) -> list[str]:
    """The cheap diagnostics that make sense on this run's data, in registry order."""
    return [n for n in DIAGNOSTICS.names() if DIAGNOSTICS.get(n).cheap and DIAGNOSTICS.get(n).makes_sense(run_cfg)]


def select(run_cfg, only: list[str] | None, after_train: bool = False) -> list[str]:
    """`only`, else the config's `diagnostics.after_train`, else the defaults; names are checked.
    An empty `after_train` means none after training; asked for later (`tunelab diagnose RUN`),
    the defaults run."""
    names = only if only is not None else run_cfg.diagnostics.after_train
    if names is None or (not names and only is None and not after_train):
        return default_names(run_cfg)
    for name in names:
        if name not in DIAGNOSTICS.names():
            raise ConfigError(f"unknown diagnostic '{name}'; choose from {', '.join(DIAGNOSTICS.names())}")
    return list(dict.fromkeys(names))


def run_state(run_dir: Path) -> str | None:
    """A fingerprint of what the run trained: the SHA-256 of final/manifest.json (which holds the
    checksum of every output file); None before the run has a final output."""
    manifest = run_dir / "final" / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def run_one(ctx, name: str) -> dict:
    """Run diagnostic `name` on `ctx` with the run config's options; write and return its result."""
    from tunelab.run.files import atomic_write_text

    cfg = ctx.cfg.diagnostics.config_of(name)
    diag = DIAGNOSTICS.get(name)(cfg)
    t0 = time.perf_counter()
    reason = diag.not_applicable(ctx)
    found = Findings({}, {"not_applicable": reason}) if reason else diag.run(ctx)
    details = {**found.details, "seconds": round(time.perf_counter() - t0, 2), "run_state": run_state(ctx.run_dir)}
    result = {"name": name, "version": diag.version, "config": to_dict(cfg), "summary": found.summary,
              "details": details}
    path = ctx.run_dir / OUT_DIR / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1, allow_nan=False))
    return result


def is_current(run_dir: Path, name: str, run_cfg) -> bool:
    """Whether RUN/diagnostics/<name>.json was written for this final output with these options."""

    path = run_dir / OUT_DIR / f"{name}.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return old.get("details", {}).get("run_state") == run_state(run_dir) and \
        old.get("config") == to_dict(run_cfg.diagnostics.config_of(name))


def run_diagnostics(run_dir, only: list[str] | None = None, *, skip_current: bool = False,
                    keep_going: bool = False, after_train: bool = False, log=print) -> dict[str, dict]:
    """Run the diagnostics `only` names (default: the run config's `diagnostics.after_train`, or
    the defaults for its data) on a trained run; write RUN/diagnostics/<name>.json; return them.
    With `skip_current`, results already written for this final output and options are kept; with
    `keep_going`, a diagnostic that fails with a user-facing error is reported and skipped."""
    from tunelab.diagnostics._context import Context
    from tunelab.errors import TunelabError

    ctx = Context(run_dir)
    results = {}
    names = select(ctx.cfg, only, after_train)
    for name in sorted(names, key=lambda n: DIAGNOSTICS.get(n).merges_tuned):  # stable: merging ones last
        if skip_current and is_current(ctx.run_dir, name, ctx.cfg):
            results[name] = json.loads((ctx.run_dir / OUT_DIR / f"{name}.json").read_text())
            continue
        try:
            results[name] = run_one(ctx, name)
        except TunelabError as e:
            if not keep_going:
                raise
            log(f"diagnostics: {name} failed: {e}; rerun it with `tunelab diagnose {run_dir} --only {name}`")
            continue
        log(f"diagnostics: {name} {_brief(results[name])} ({results[name]['details']['seconds']} s)")
    return results


def run_after_train(run_dir) -> dict[str, dict]:
    """What `tunelab.train` calls when the loop returns: the configured diagnostics, skipping those
    already current (so resuming a finished run recomputes nothing). A diagnostic's failure does
    not fail the training run: it is reported with the command that reruns it."""
    return run_diagnostics(run_dir, skip_current=True, keep_going=True, after_train=True)


def _brief(result: dict) -> str:
    if "not_applicable" in result["details"]:
        return f"not applicable: {result['details']['not_applicable']}"
    summary = result["summary"]
    cls = DIAGNOSTICS.get(result["name"]) if result.get("name") in DIAGNOSTICS.names() else None
    items = [(k, summary[k]) for k in cls.brief if k in summary] if cls and cls.brief else list(summary.items())[:4]
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {'n/a' if v is None else v}" for k, v in items)

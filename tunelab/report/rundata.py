"""Read a run directory into plain numbers: what the report and `tunelab compare` show.

A run directory holds config.yaml, metrics.jsonl (lines of kind setup | train | eval | skipped),
eval.json ({"before": {...}, "after": {...}}) and, once diagnostics ran, diagnostics/<name>.json of
the shape {"name", "version", "config", "summary": {figure: scalar}, "details": {...}}. Anything
missing reads as None or empty, so a report renders for a run that is half done.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError

# train-line keys the loop itself writes; any other numeric key is an objective or method metric
LOOP_KEYS = ("step", "kind", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s", "step_s",
             "optimizer_state_bytes")


@dataclass(kw_only=True)
class RunData:
    """Everything a run wrote, parsed; no figures are computed here."""
    dir: Path
    """The run directory."""
    config: dict
    """config.yaml as written by the run (every default filled in)."""
    setup: dict = field(default_factory=dict)
    """The metrics.jsonl line of kind `setup` (parameter counts, example counts, startup time)."""
    train: list[dict] = field(default_factory=list)
    """Lines of kind `train`, in step order."""
    evals: list[dict] = field(default_factory=list)
    """Lines of kind `eval` (evaluations during training)."""
    skipped: list[dict] = field(default_factory=list)
    """Lines of kind `skipped` (non-finite loss or gradient)."""
    rounds: list[dict] = field(default_factory=list)
    """Lines of kind `round` (a federated run: clients, loss, bytes per client)."""
    results: dict = field(default_factory=dict)
    """eval.json: {"before": {...}, "after": {...}}, either may be absent."""
    diagnostics: dict[str, dict] = field(default_factory=dict)
    """diagnostics/<name>.json, by name."""
    diagnostic_errors: dict[str, str] = field(default_factory=dict)
    """diagnostics files that could not be read, by name, with the reason."""

    @property
    def name(self) -> str:
        return self.dir.name

    def get(self, dotted: str):
        """A config value by key path, e.g. `train.steps`; None when absent."""
        node = self.config
        for k in dotted.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        return node


def load_run_data(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TunelabError(f"{run_dir}: not a run directory (no config.yaml)")
    run = RunData(dir=run_dir, config=yaml.safe_load(cfg_path.read_text()) or {})
    for rec in _read_jsonl(run_dir / "metrics.jsonl"):
        kind = rec.get("kind", "train")
        if kind == "setup":
            run.setup = rec
        elif kind in ("train", "eval", "skipped", "round"):
            getattr(run, {"train": "train", "eval": "evals", "skipped": "skipped", "round": "rounds"}[kind]).append(rec)
    if (run_dir / "eval.json").is_file():
        run.results = json.loads((run_dir / "eval.json").read_text())
    for path in sorted((run_dir / "diagnostics").glob("*.json")):
        try:
            run.diagnostics[path.stem] = check_diagnostic(json.loads(path.read_text()), path)
        except (ValueError, TunelabError) as e:
            run.diagnostic_errors[path.stem] = str(e)
    return run


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; the loop truncates such lines on resume
    return out


def check_diagnostic(d, path: Path) -> dict:
    """The documented shape, or a TunelabError naming the file and the bad key."""
    if not isinstance(d, dict):
        raise TunelabError(f"{path}: expected a JSON object")
    for key, tp in (("summary", dict), ("details", dict)):
        if not isinstance(d.get(key, {}), tp):
            raise TunelabError(f"{path}: '{key}' must be an object")
    out = {"name": d.get("name", path.stem), "version": d.get("version"), "config": d.get("config") or {},
           "summary": d.get("summary") or {}, "details": d.get("details") or {}}
    if isinstance(d.get("higher_is_better"), dict):  # optional: {figure: bool}, used by compare
        out["higher_is_better"] = d["higher_is_better"]
    return out


# ----------------------------------------------------------------------------- figures

def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _diff(a, b):
    return None if _num(a) is None or _num(b) is None else b - a


def target_figures(run: RunData) -> dict[str, float | None]:
    """Task accuracy, eval loss and perplexity before and after training, and their change."""
    before, after = run.results.get("before") or {}, run.results.get("after") or {}
    out = {}
    for metric in ("accuracy", "eval_loss", "perplexity"):
        b, a = _num(before.get(metric)), _num(after.get(metric))
        out |= {f"{metric}_before": b, f"{metric}_after": a, f"{metric}_change": _diff(b, a)}
    return out


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if _num(r.get(key)) is not None]
    return statistics.median(vals) if vals else None


def train_seconds(run: RunData) -> float | None:
    """Time in optimizer steps: the logged steps' mean step time x steps done (exact when every
    step is logged); evaluation and checkpoint time are not included."""
    times = [r["step_s"] for r in run.train if _num(r.get("step_s")) is not None]
    if not times:
        return None
    return sum(times) / len(times) * steps_done(run)


def steps_done(run: RunData) -> int:
    return max([r["step"] for r in run.train + run.skipped], default=0)


def throughput_figures(run: RunData) -> dict[str, float | None]:
    """Speed and memory of the training steps (medians over logged steps)."""
    after = run.results.get("after") or {}
    trained = [r["trained_tokens"] for r in run.train if _num(r.get("trained_tokens")) is not None]
    return {
        "tokens_per_s": _median(run.train, "tokens_per_s"),
        "step_s": _median(run.train, "step_s"),
        "trained_tokens_per_step": sum(trained) / len(trained) if trained else None,
        "optimizer_state_bytes": run.train[-1].get("optimizer_state_bytes") if run.train else None,
        "startup_s": _num(run.setup.get("startup_s")),
        "train_s": train_seconds(run),
        "skipped_steps": len(run.skipped),
        "eval_examples_per_s": _num(after.get("examples_per_s")),
    }


def headline(run: RunData) -> dict:
    """What was trained, on what, for how long."""
    n_train, n_total = _num(run.setup.get("trainable_params")), _num(run.setup.get("total_params"))
    return {
        "method": run.get("method.name"), "objective": run.get("objective.name"), "model": run.get("model.name"),
        "train_data": run.get("data.train"), "eval_data": eval_source(run),
        "steps": steps_done(run), "planned_steps": run.get("train.steps"),
        "trainable_params": n_train, "total_params": n_total,
        "trainable_pct": 100 * n_train / n_total if n_train is not None and n_total else None,
        "train_examples": _num(run.setup.get("train_examples")),
        "time_s": _sum_or_none(_num(run.setup.get("startup_s")), train_seconds(run)),
    }


def eval_source(run: RunData) -> str | None:
    """What the run is evaluated on: data.eval, or the held-out slice of data.train (or None)."""
    if run.get("data.eval") != "holdout":
        return run.get("data.eval")
    if not run.get("data.eval_fraction"):
        return None
    return f"a held-out slice of {run.get('data.train')} (data.eval_fraction={run.get('data.eval_fraction')})"


def _sum_or_none(*xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


def extra_metrics(run: RunData) -> list[str]:
    """Numeric per-step keys that objectives and methods log on top of the loop's own."""
    keys: dict[str, None] = {}
    for r in run.train:
        for k, v in r.items():
            if k not in LOOP_KEYS and _num(v) is not None:
                keys[k] = None
    return list(keys)


def figures(run: RunData) -> dict[str, dict[str, float | None]]:
    """Every comparable scalar of a run, by section: target, throughput, then one section per
    diagnostic (its summary, numbers only)."""
    out = {"target": target_figures(run), "throughput": throughput_figures(run)}
    for name, d in sorted(run.diagnostics.items()):
        out[name] = {k: v for k, v in d["summary"].items() if _num(v) is not None}
    return out

"""`tunelab compare`: several runs side by side, on the same data, budget and seed.

Targets are run directories and/or YAML recipes. Recipes are trained first (into OUT/runs/<name>)
with the FORCED config fields set to the reference's values, so that a difference in the table is
the method's, not the budget's. The reference is the first run directory given, else the first
recipe. Run directories already trained with other FORCED values are refused (listing every
difference), or only warned about with `allow_mismatch`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunelab.errors import ConfigError, TunelabError
from tunelab.run.signals import pause_point
from tunelab.report.rundata import RunData, figures, headline, load_run_data

FORCED = ("data.train", "data.eval", "data.eval_fraction", "data.eval_max_examples", "data.max_length",
          "train.steps", "train.micro_batch_size", "train.grad_accum", "train.seed", "eval.num_examples")
"""Config fields every compared run shares: the data (train and eval sets, truncation length), the
budget (steps x micro-batch x accumulation), the seed, and how many eval examples score the gain."""

ORDER_DEPENDENT = ("startup_s",)
"""Figures that say which run a process trained first (it also pays for imports and a cold disk),
not which method is better: shown, never ranked or charted."""

# (regex on the figure's name, higher is better?) -- first match wins; None: no "best" in that row
DIRECTION: tuple[tuple[str, bool | None], ...] = (
    (r"_before$|^base_|[._]base_", None),  # the base model's score: the same for every run of one model
    (r"[._]old_|tuco", None),  # the old answer after a fact update; TuCo measures change, not quality
    (r"startup_s", None),  # ORDER_DEPENDENT
    (r"loss|perplexity|kl|drift|intruder|skipped|bytes|step_s$|train_s|forget|lost|gap", False),
    (r"accuracy|retained|tokens_per_s|examples_per_s|_change$|gain", True),
)


@dataclass(kw_only=True)
class Comparison:
    """The numbers of a comparison; compare.json is this, as JSON."""
    runs: list[RunData]
    """The compared runs, in the order given."""
    names: list[str]
    """Their column labels (directory names, made unique)."""
    reference: dict
    """The FORCED fields' values every run was trained with (or checked against)."""
    warnings: list[str] = field(default_factory=list)
    """Mismatches that were allowed, and other caveats."""

    def rows(self) -> list[dict]:
        """One row per figure: {section, figure, values (one per run, None if absent), higher_is_better,
        best (indices of the best runs; empty when undecided or all equal)}."""
        figs = [figures(r) for r in self.runs]
        out = []
        for section in dict.fromkeys(s for f in figs for s in f):
            for fig in dict.fromkeys(k for f in figs for k in f.get(section, {})):
                values = [f.get(section, {}).get(fig) for f in figs]
                hib = direction(section, fig, self.runs)
                out.append({"section": section, "figure": fig, "values": values, "higher_is_better": hib,
                            "best": best_indices(values, hib)})
        return out

    def to_json(self) -> dict:
        return {"forced": list(FORCED), "reference": self.reference, "warnings": self.warnings,
                "runs": [{"name": n, "dir": str(r.dir), **headline(r)} for n, r in zip(self.names, self.runs)],
                "rows": self.rows(),
                "loss_curves": {n: [[t["step"], t["loss"]] for t in r.train if "loss" in t]
                                for n, r in zip(self.names, self.runs)}}


def direction(section: str, fig: str, runs: list[RunData]) -> bool | None:
    """Whether a higher value is better: the diagnostic's own `higher_is_better` entry if it has
    one, else the first DIRECTION rule matching the figure's name."""
    for r in runs:
        declared = (r.diagnostics.get(section) or {}).get("higher_is_better") or {}
        if fig in declared:
            return declared[fig]
    return next((hib for pattern, hib in DIRECTION if re.search(pattern, fig)), None)


def best_indices(values: list, higher_is_better: bool | None) -> list[int]:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if higher_is_better is None or len(nums) < 2 or min(nums) == max(nums):
        return []
    best = max(nums) if higher_is_better else min(nums)
    return [i for i, v in enumerate(values) if v == best]


# ----------------------------------------------------------------------------- targets

def split_targets(targets: list[str]) -> list[tuple[str, Path]]:
    """[(kind, path)] with kind `run` (a run directory) or `recipe` (a YAML file)."""
    from tunelab.run.rundir import is_run_dir

    out = []
    for t in targets:
        p = Path(t)
        if is_run_dir(p):
            out.append(("run", p))
        elif p.is_file() and p.suffix in (".yaml", ".yml"):
            out.append(("recipe", p))
        else:
            raise TunelabError(f"{t}: neither a run directory (with config.yaml) nor a YAML recipe")
    if len(out) < 2:
        raise TunelabError("compare: give at least two run directories or recipes")
    return out


def forced_values(cfg: dict) -> dict:
    def get(dotted):
        node = cfg
        for k in dotted.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        return node
    return {k: get(k) for k in FORCED}


def mismatches(reference: dict, run: RunData) -> list[str]:
    have = forced_values(run.config)
    return [f"{run.dir}: {k} = {have[k]!r}, the reference has {reference[k]!r}"
            for k in FORCED if have[k] != reference[k]]


def recipe_config(recipe: Path, overrides: list[str], reference: dict | None, output: Path):
    """The recipe with `overrides` applied, then the reference's FORCED values, written to `output`."""
    from tunelab import config as C

    forced = [f"{k}={json.dumps(v)}" for k, v in (reference or {}).items()]
    return C.load(recipe, [*overrides, *forced, f"output={output}"])


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _check_overrides(overrides: list[str], reference: dict, items: list[tuple[str, Path]]) -> None:
    """Refuse a --set that would do nothing: no recipe to apply it to, or a FORCED field that the
    reference run directory's value overwrites."""
    from tunelab import config as C

    if overrides and all(kind == "run" for kind, _ in items):
        raise ConfigError(f"compare: --set applies to YAML recipes; every target is a run directory "
                          f"(--set {' '.join(overrides)} would change nothing)")
    first_run = next((p for kind, p in items if kind == "run"), None)
    for item in overrides if first_run is not None else []:
        keys, value = C.parse_override(item)
        key = ".".join(keys)
        if key in FORCED and value != reference[key]:
            raise ConfigError(f"compare: --set {item}: the reference run directory {first_run} was trained with "
                              f"{key} = {reference[key]!r}, and every recipe is trained with the reference's "
                              f"{', '.join(FORCED)}; drop --set, or compare recipes only")


def prepare(targets: list[str], out: Path, overrides: list[str] = (), allow_mismatch: bool = False, *,
            train: Callable[[object], Path]) -> Comparison:
    """Check the run directories against the reference, train the recipes (with `train`), load every run."""
    from tunelab import config as C

    items = split_targets(targets)
    runs = {i: load_run_data(p) for i, (kind, p) in enumerate(items) if kind == "run"}
    recipe_out = dict(zip([i for i, (k, _) in enumerate(items) if k == "recipe"],
                          _unique([p.stem for k, p in items if k == "recipe"])))
    if runs:
        reference = forced_values(next(iter(runs.values())).config)
    else:
        first = next(i for i, (k, _) in enumerate(items) if k == "recipe")
        reference = forced_values(C.to_dict(recipe_config(items[first][1], list(overrides), None, out)))
    _check_overrides(list(overrides), reference, items)
    problems = [m for r in runs.values() for m in mismatches(reference, r)]
    if problems and not allow_mismatch:
        raise ConfigError("compare: the runs were trained with different data, budget or seed:\n  " +
                          "\n  ".join(problems) + "\nretrain them alike (pass their recipes instead), or pass "
                          "--allow-mismatch to compare anyway")
    for i, name in recipe_out.items():  # each row resumes its own run directory: a rerun of a killed
        pause_point(f"compare:{name}")  # comparison continues where it stopped, completed rows untrained
        cfg = recipe_config(items[i][1], list(overrides), reference, out / "runs" / name)
        runs[i] = load_run_data(train(cfg))
    ordered = [runs[i] for i in range(len(items))]
    names = _unique([r.name for r in ordered])
    return Comparison(runs=ordered, names=names, reference=reference,
                      warnings=[f"allowed mismatch: {m}" for m in problems])

"""AnyTaskTune task sets: Cui et al., "AnyTaskTune: Advanced Domain-Specific Solutions through
Task-Fine-Tuning" (arXiv 2407.07094). The method is a data methodology, not a loss: split a domain
into explicit sub-tasks, build an (instruction, input, output) set per sub-task, and fine-tune on
their mixture with standard SFT. The paper's code repository holds no method code.

What tunelab provides:
- the row schema: any training format plus `task` (the sub-task's name), e.g.
  {"task": "triage", "instruction": "...", "input": "...", "output": "..."}; `tunelab data check`
  counts rows per task, and evaluation scores each task apart (`by_task` in eval.json, a table in
  the report);
- this stage, `task_mix`: one source per task (`tasks: {name: spec}`) and/or one source whose rows
  carry `task` (`input`), mixed by `weights` into `n` rows (each task gets n * w / sum(w) rows,
  largest remainders first; a task with fewer rows than its share is repeated whole, then
  sampled), shuffled with `seed`. Without `n`, every row is kept once and only tagged and shuffled.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

from tunelab.curate import DataStage, Workspace, derived, provenance, register
from tunelab.curate._io import load_input
from tunelab.data.records import Record
from tunelab.errors import ConfigError, TunelabError
from tunelab.options import Options, require


@dataclass(kw_only=True)
class TaskMixConfig(Options):
    ranges: ClassVar = {"n": ">= 1", "seed": ">= 0"}
    tasks: dict[str, str] = field(default_factory=dict)
    """Sub-task name -> its data source (file or builtin spec); every row gets that task."""
    input: str | None = None
    """A source whose rows carry their own `task` field."""
    weights: dict[str, float] = field(default_factory=dict)
    """Mixing weight per task (default 1 each); 0 leaves a task out."""
    n: int | None = None
    """Rows in the mixture (null: every row once)."""
    seed: int = 0
    """Seeds sampling and the shuffle."""

    def validate(self) -> None:
        require(bool(self.tasks) or bool(self.input), "tasks", "name at least one task source (or an input with "
                "`task` fields)")
        for name, w in self.weights.items():
            require(isinstance(w, (int, float)) and w >= 0, f"weights.{name}", f"must be a number >= 0, got {w!r}")


def shares(n: int, weights: dict[str, float]) -> dict[str, int]:
    """n split in proportion to `weights` (largest remainders get the leftover rows; ties by name)."""
    total = sum(weights.values())
    exact = {t: n * w / total for t, w in weights.items()}
    out = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: (-(exact[t] - out[t]), t))[: n - sum(out.values())]:
        out[t] += 1
    return out


def draw(rows: list, k: int, rng: random.Random) -> list:
    """k rows: whole copies of `rows` while k exceeds them, then a sample without replacement."""
    full, rest = divmod(k, len(rows))
    return rows * full + rng.sample(rows, rest)


def tagged(record: Record, task: str) -> Record:
    record.meta["task"] = task
    return record


@register("task_mix")
class TaskMix(DataStage):
    """Mix sub-task datasets by weight into one set whose rows carry `task`."""

    verb: ClassVar[str] = "mix"
    Config = TaskMixConfig

    def run(self, ws: Workspace) -> list[Record]:
        by_task = self._by_task()
        unknown = sorted(set(self.cfg.weights) - set(by_task))
        if unknown:
            raise ConfigError(f"weights.{unknown[0]}: no such task; the tasks are {', '.join(sorted(by_task))}")
        weights = {t: float(self.cfg.weights.get(t, 1.0)) for t in by_task}
        if not any(weights.values()):
            raise ConfigError("weights: every task has weight 0")
        rng = random.Random(self.cfg.seed)
        counts = shares(self.cfg.n, weights) if self.cfg.n else {t: len(r) if weights[t] else 0 for t, r in by_task.items()}
        out = [tagged(derived(r, r.messages, r.answer, provenance(self.name, t, r)), t)
               for t in sorted(by_task) for r in draw(by_task[t], counts[t], rng)]
        rng.shuffle(out)
        return out

    def _by_task(self) -> dict[str, list[Record]]:
        by_task: dict[str, list[Record]] = defaultdict(list)
        for name, spec in self.cfg.tasks.items():
            by_task[name] += load_input(spec, f"tasks.{name}")
        if self.cfg.input:
            for r in load_input(self.cfg.input):
                if "task" not in r.meta:
                    raise TunelabError(f"{r.source}: no `task` field (input: rows must name their sub-task)")
                by_task[r.meta["task"]].append(r)
        return dict(by_task)

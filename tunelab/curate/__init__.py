"""Data stages: dataset -> dataset transforms that run before (or between) trainings. Each module
in this package registers one.

Public surface: `DataStage` (the base class), `DATA_STAGES` (the registry), `register`,
`Workspace` (what a stage reads: its inputs, its model, a place to keep progress), `run_stage`
(run one stage and write its JSONL) and `provenance` (the record a stage leaves on each row).

A stage returns Records; every one carries `meta["provenance"]`: which stage made it (`stage`),
what it did (`kind`, e.g. self / paraphrase / gold for S3FT), the row it came from (`source`) and
that row's own provenance (`previous`) when it had one. `run_stage` writes them as JSONL rows that
`tunelab data check` reads (and counts by provenance) and that training reads like any data file.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from tunelab.curate._io import write_jsonl
from tunelab.curate._workspace import Workspace
from tunelab.data.records import Record
from tunelab.errors import TunelabError
from tunelab.registry import DATA_STAGES, Component

register = DATA_STAGES.register
__all__ = ["DATA_STAGES", "DataStage", "Workspace", "build_stage", "provenance", "register", "run_stage"]


class DataStage(Component):
    """Base class. A data stage reads its inputs (named by its options) through a `Workspace`
    and returns the rows of its output, each with a provenance (`provenance`)."""

    verb: ClassVar[str] = ""
    """The `tunelab data` command that runs it: select, relabel, edits or mix."""
    uses_model: ClassVar[bool] = False
    """Whether it runs a model (then the workspace's `model` is loaded for it)."""

    def run(self, ws: Workspace) -> list[Record]:
        raise NotImplementedError


def provenance(stage: str, kind: str, record: Record, **details: Any) -> dict:
    """The provenance of a row made from `record` by `stage`: what was done (`kind`), the row it came
    from, that row's own provenance, and any `details` (JSON values)."""
    out = {"stage": stage, "kind": kind, "source": record.source, **details}
    if isinstance(record.meta.get("provenance"), dict):
        out["previous"] = record.meta["provenance"]
    return out


def derived(record: Record, messages: list[dict] | None, answer: str | None, prov: dict) -> Record:
    """A new Record from `record`: other messages and answer, the same task, the given provenance."""
    meta = {k: v for k, v in record.meta.items() if k == "task"}
    meta["provenance"] = prov
    return Record(messages=messages, text=record.text if messages is None else None, tools=record.tools,
                  answer=answer, source=record.source, meta=meta)


def run_stage(stage: DataStage, ws: Workspace, out: Path) -> dict:
    """Run `stage`, write its rows to `out` (JSONL, atomically) and return a summary: rows in the
    output and their counts by provenance kind."""
    rows = stage.run(ws)
    if not rows:
        raise TunelabError(f"data stage '{stage.name}' produced no rows")
    missing = [r.source for r in rows if not isinstance(r.meta.get("provenance"), dict)]
    assert not missing, f"data stage '{stage.name}' left rows without provenance: {missing[:3]}"
    write_jsonl(rows, out)
    kinds = Counter(r.meta["provenance"]["kind"] for r in rows)
    return {"stage": stage.name, "rows": len(rows), "kinds": dict(sorted(kinds.items())), "output": str(out)}


def build_stage(name: str, options: dict, verb: str | None = None) -> DataStage:
    """The data stage `name` with `options` (validated; errors name the option). With `verb`, the
    stage must be one that `tunelab data VERB` runs."""
    from tunelab.errors import ConfigError
    from tunelab.options import from_dict

    cls = DATA_STAGES.get(name)
    if verb is not None and cls.verb != verb:
        mine = [n for n in DATA_STAGES.names() if DATA_STAGES.get(n).verb == verb]
        raise ConfigError(f"--method: '{name}' is not a `{verb}` stage; choose one of: {', '.join(mine)}")
    return cls(from_dict(cls.Config, options, name))

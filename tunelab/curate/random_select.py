"""Random selection of k rows from a pool: the baseline every selection method is compared with."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from tunelab.curate import DataStage, Workspace, derived, provenance, register
from tunelab.curate._io import load_input
from tunelab.data.records import Record
from tunelab.errors import ConfigError
from tunelab.options import Options


@dataclass(kw_only=True)
class SelectConfig(Options):
    """What every selection stage takes."""
    ranges: ClassVar = {"k": ">= 1", "seed": ">= 0"}
    pool: str = "builtin:pool?n=2000"
    """The candidate rows to choose from (a file or builtin spec)."""
    k: int = 200
    """How many rows to keep; more than the pool holds is an error."""
    seed: int = 0
    """Seeds any random choice (ties, random selection)."""


def check_k(k: int, pool: list, spec: str) -> None:
    if k > len(pool):
        raise ConfigError(f"k: {k} is larger than the pool ({len(pool)} rows in {spec}); choose k <= {len(pool)}")


def selected(stage: str, pool: list[Record], chosen: list[int], **scores) -> list[Record]:
    """The chosen rows in selection order, each with its rank (and per-row `scores`) in its provenance."""
    out = []
    for rank, i in enumerate(chosen):
        details = {name: round(float(v[i]), 6) for name, v in scores.items()}
        out.append(derived(pool[i], pool[i].messages, pool[i].answer,
                           provenance(stage, "selected", pool[i], rank=rank, index=i, **details)))
    return out


@register("random")
class RandomSelection(DataStage):
    """k rows drawn uniformly without replacement (seeded)."""

    verb: ClassVar[str] = "select"
    Config = SelectConfig

    def run(self, ws: Workspace) -> list[Record]:
        pool = load_input(self.cfg.pool, "pool")
        check_k(self.cfg.k, pool, self.cfg.pool)
        chosen = random.Random(self.cfg.seed).sample(range(len(pool)), self.cfg.k)
        return selected(self.name, pool, chosen)

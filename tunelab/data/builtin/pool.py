"""`builtin:pool` — a candidate pool for data selection: rows of one target task mixed with rows of
other tasks, shuffled.

    builtin:pool?n=2000&on_target=0.1&target=arith&seed=0

`on_target` of the rows come from the target task's `train` split (`arith` or `typos`), the rest
in equal parts from the other built-in tasks (`arith`, `typos`, and the `facts` training rows:
questions about invented people), each drawn with seeds of its own so that the pool shares no
stream with `builtin:<target>?seed=...` sets used as the selection target or for evaluation.
Every record's meta carries `domain` (the task it came from) and `on_target` (a bool), so what a
selection method picked can be counted; the rows themselves look like any training rows.
"""
from __future__ import annotations

import math
import random
from typing import Annotated, Literal

from tunelab.data.builtin import Range, load_builtin, task
from tunelab.data.records import Record

DOMAINS = ("arith", "typos", "facts")
POOL_SEED = 7919
"""Offsets the seeds of the tasks a pool draws from (so a pool never repeats `seed`'s rows of a task)."""


def _rows(domain: str, n: int, seed: int) -> list[Record]:
    if n == 0:
        return []
    if domain == "facts":
        rows = load_builtin(f"builtin:facts?n_entities={math.ceil(n / 6)}&split=train&seed={seed}")
        return random.Random(f"pool:facts:{seed}").sample(rows, n)
    return load_builtin(f"builtin:{domain}?n={n}&split=train&seed={seed}")


@task("pool")
def pool(n: Annotated[int, Range(1, 100_000)] = 2000, on_target: Annotated[float, Range(0, 1)] = 0.1,
         target: Literal["arith", "typos"] = "arith", seed: int = 0) -> list[Record]:
    """A selection pool: `on_target` of the rows from the target task, the rest from other tasks."""
    n_on = round(n * on_target)
    others = [d for d in DOMAINS if d != target]
    counts = {target: n_on, **{d: (n - n_on) // len(others) for d in others}}
    counts[others[0]] += n - sum(counts.values())
    records = []
    for d, k in counts.items():
        for r in _rows(d, k, seed + POOL_SEED):
            r.meta.update(domain=d, on_target=d == target)
            records.append(r)
    random.Random(f"pool:{seed}").shuffle(records)
    for i, r in enumerate(records):
        r.source = f"builtin:pool:{i}"
    return records

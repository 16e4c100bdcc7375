"""Which rows train and which evaluate.

`data.eval` names the evaluation data. Left at `holdout` (the default), a deterministic slice of
`data.train` is held out instead (`data.eval_fraction` of its rows, at most `data.eval_max_examples`, at least one row
left to train), and those rows are removed from training, so they are truly unseen. The slice
depends only on the number of rows, never on `train.seed`: runs with different seeds are scored on
the same rows. `eval_fraction: 0`, or `eval: null`, evaluates nothing. A built-in task is
evaluated only when the user names it.
"""
from __future__ import annotations

import math
import random

from tunelab.data.config import HOLDOUT, DataConfig
from tunelab.data.formats import Records

HOLDOUT_SEED = "tunelab:holdout"
"""Seeds the choice of held-out rows (a fixed string: the same rows for every run of a file)."""


def holdout_indices(n: int, fraction: float, cap: int) -> list[int]:
    """The sorted indices of the rows held out of `n`: min(ceil(fraction * n), cap, n - 1) of
    them, drawn without replacement by a generator seeded with HOLDOUT_SEED."""
    k = 0 if n < 2 or fraction <= 0 else min(math.ceil(fraction * n), cap, n - 1)
    return sorted(random.Random(HOLDOUT_SEED).sample(range(n), k))


def train_eval_records(cfg: DataConfig) -> tuple[Records, Records, str]:
    """(training records, evaluation records, a line saying what is evaluated)."""
    from tunelab.data import load_records

    train = load_records(cfg.train, cfg)
    if not cfg.eval:
        return train, Records(format=train.format), "eval: none (data.eval is null)"
    if cfg.eval != HOLDOUT:
        evals = load_records(cfg.eval, cfg)
        return train, evals, f"eval: {cfg.eval} (data.eval), {len(evals)} rows"
    if cfg.eval_fraction == 0:
        return train, Records(format=train.format), "eval: none (data.eval: holdout, data.eval_fraction=0)"
    held = set(holdout_indices(len(train), cfg.eval_fraction, cfg.eval_max_examples))
    kept = Records([r for i, r in enumerate(train) if i not in held], format=train.format)
    kept.num_skipped, kept.first_skipped, kept.all_skipped = train.num_skipped, train.first_skipped, train.all_skipped
    evals = Records([r for i, r in enumerate(train) if i in held], format=train.format)
    if not evals:
        return kept, evals, f"eval: none ({cfg.train} has too few rows to hold any out)"
    return kept, evals, (f"eval: {len(evals)} of {len(train)} rows of {cfg.train} held out "
                         f"(data.eval: holdout, data.eval_fraction={cfg.eval_fraction:g}, at most "
                         f"{cfg.eval_max_examples}), not trained on")

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunelab.errors import ConfigError

HOLDOUT = "holdout"
"""`data.eval` meaning: a held-out slice of `data.train` (tunelab.data.split)."""
Format = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"]


@dataclass(kw_only=True)
class DataConfig:
    train: str = "builtin:arith?n=2000&split=train"
    """Training data: a file (.jsonl/.json/.csv/.parquet), a `datasets` directory, or builtin:NAME?opts."""
    eval: str | None = HOLDOUT
    """Evaluation data (same forms as `train`); `holdout` (the default): a held-out slice of `train`
    (see `eval_fraction`); null: no evaluation. A built-in task is evaluated only when named."""
    eval_fraction: float = 0.05
    """With `eval: holdout`: the share of the training rows held out for evaluation (deterministic,
    removed from training, at least one row left to train). 0: evaluate nothing."""
    eval_max_examples: int = 200
    """With `eval: holdout`: at most this many rows are held out."""
    format: Format = "auto"
    """Row format; `auto` detects it from the fields of the first row."""
    max_length: int = 1024
    """Examples longer than this many tokens are truncated (and counted)."""
    packing: bool = True
    """Pack several examples per row; attention and positions never cross an example boundary."""
    train_on_prompt: bool = False
    """Also put loss on prompt (system/user) tokens; by default only assistant/completion tokens train."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A malformed row stops with file:line:field (`error`), or is skipped and counted (`skip`)."""

    def __post_init__(self):
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.eval_max_examples < 1:
            raise ConfigError(f"eval_max_examples: must be >= 1, got {self.eval_max_examples}")

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tunelab.options import Options

HOLDOUT = "holdout"
"""`data.eval` meaning: a held-out slice of `data.train` (tunelab.data.split)."""
Format = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "rag", "text"]


@dataclass(kw_only=True)
class DataConfig(Options):
    ranges: ClassVar = {"max_length": ">= 8", "eval_fraction": "[0, 1)", "eval_max_examples": ">= 1"}
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

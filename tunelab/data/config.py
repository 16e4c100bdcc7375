from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tunelab.options import Options

Format = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"]


@dataclass(kw_only=True)
class DataConfig(Options):
    ranges: ClassVar = {"max_length": ">= 8"}
    train: str = "builtin:arith?n=2000&split=train"
    """Training data: a file (.jsonl/.json/.csv/.parquet), a `datasets` directory, or builtin:NAME?opts."""
    eval: str | None = "builtin:arith?n=200&split=test"
    """Evaluation data (same forms as `train`), or null for none."""
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

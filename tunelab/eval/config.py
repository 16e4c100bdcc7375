from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from tunelab.errors import ConfigError
from tunelab.options import Options


@dataclass(kw_only=True)
class EvalConfig(Options):
    ranges: ClassVar = {"every": ">= 0", "num_examples": ">= 0", "max_new_tokens": ">= 1",
                        "batch_size": ">= 1"}
    every: int = 0
    """Evaluate every N optimizer steps (0: only before and after training)."""
    before: bool = True
    """Also evaluate the base model before training, so the report shows the gain."""
    num_examples: int = 100
    """How many eval examples to score by generation (the first N of the eval data)."""
    max_new_tokens: int = 96
    """Generation length for exact-match scoring."""
    batch_size: int = 16
    """Prompts generated together (left-padded, with a KV cache)."""
    metric: Literal["exact_match", "contains"] = "exact_match"
    """exact_match: the extracted final answer equals the reference; contains: the reference
    appears in the generated text (for short factual answers)."""
    answer_pattern: str = r"####\s*(.+?)\s*$"
    """Regex whose first group is the final answer; without a match, a number the output ends with
    (only spaces and closing punctuation after it), else the whole text, is the answer."""

    def validate(self) -> None:
        try:
            re.compile(self.answer_pattern)
        except re.error as e:
            raise ConfigError(f"answer_pattern: not a valid regular expression ({e})") from None

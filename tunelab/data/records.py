"""The two shapes data takes inside tunelab: a Record (one row, format-independent) and an
Example (one tokenized row with its loss mask)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """One row after format detection: either chat `messages` or raw `text`."""
    messages: list[dict[str, Any]] | None = None
    """[{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...]; the last turn is the
    assistant's. An assistant turn may carry `tool_calls` ([{"type": "function", "function":
    {"name", "arguments": dict}}]), a tool turn `tool_call_id` and `name`."""
    tools: list[dict[str, Any]] | None = None
    """Tool (function) schemas offered in the conversation, passed to the chat template."""
    text: str | None = None
    """Raw text for language-model rows (every token trains)."""
    answer: str | None = None
    """The reference final answer for exact-match evaluation (None: take it from the last assistant turn)."""
    source: str = ""
    """Where the row came from, as 'file:line' (or 'builtin:NAME:index')."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything a task wants to carry (e.g. the split, an old answer for updated facts)."""


@dataclass
class Example:
    """A tokenized row. `labels[i]` is `input_ids[i]` where token i carries loss, else -100
    (unshifted, HF convention; the collator shifts within each example)."""
    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated: bool = False
    partial: bool = False
    """Only a prefix of a very long row was tokenized (enough for truncation): len is a lower bound."""

    def __len__(self) -> int:
        return len(self.input_ids)

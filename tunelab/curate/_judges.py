"""Judges: does a candidate answer say what the gold answer says? Used by relabelling stages (S3FT).

A judge is `judge(record, candidate, gold) -> bool`: `record` is the row (its prompt, its `answer`
field), `candidate` the text to accept or reject, `gold` the row's gold assistant turn. Built in:
- `final_answer`: the final answers agree (tunelab.eval.metrics.exact_match: the `#### N` line, else
  a number the text ends with), against the row's `answer` field, else the gold turn's final answer.
- `last_number`: the `#### N` answer if there is one, else the last number anywhere in the candidate,
  equals the gold answer (GSM8K-style lenient extraction: a base model's free-form reasoning that
  ends "... so she has 36 coins left." is judged by its 36).
- `contains`: the gold short answer appears in the candidate as a whole word or phrase.
Any other judge is named `module:function` (imported; your own code) or registered with `JUDGES`.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from tunelab.data.records import Record
from tunelab.errors import ConfigError, TunelabError
from tunelab.eval.metrics import DEFAULT_PATTERN, contains_match, exact_match, extract_answer, normalize

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

Judge = Callable[[Record, str, str], bool]


def gold_answer(record: Record, gold: str) -> str:
    """The row's short answer: its `answer` field, else the final answer of the gold text."""
    return record.answer if record.answer is not None else extract_answer(gold, DEFAULT_PATTERN)


def final_answer(record: Record, candidate: str, gold: str) -> bool:
    return exact_match(candidate, gold_answer(record, gold), DEFAULT_PATTERN)


def last_number(record: Record, candidate: str, gold: str) -> bool:
    if re.search(DEFAULT_PATTERN, candidate, re.MULTILINE):
        return final_answer(record, candidate, gold)
    numbers = NUMBER.findall(candidate)
    return bool(numbers) and normalize(numbers[-1]) == normalize(gold_answer(record, gold))


def contains(record: Record, candidate: str, gold: str) -> bool:
    return contains_match(candidate, gold_answer(record, gold))


JUDGES: dict[str, Judge] = {"final_answer": final_answer, "last_number": last_number, "contains": contains}
"""Judges by name; add yours here (Python) or name it `module:function` in a config."""


def get_judge(name: str) -> Judge:
    """The judge called `name`, or the function `module:function` names."""
    if name in JUDGES:
        return JUDGES[name]
    if ":" not in name:
        raise ConfigError(f"judge: unknown judge '{name}'; choose one of {', '.join(JUDGES)} or name your "
                          "own as module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"judge: cannot import '{name}' ({e})") from None
    if not callable(fn):
        raise ConfigError(f"judge: '{name}' is not a function")
    return fn


def judged(judge: Judge, name: str, record: Record, candidate: str, gold: str) -> bool:
    """`judge`'s verdict; an exception inside it becomes an error naming the judge and the row."""
    try:
        verdict = judge(record, candidate, gold)
    except Exception as e:  # the judge is user code: say where it failed, not a bare traceback
        raise TunelabError(f"judge '{name}' raised {type(e).__name__}: {e} (on row {record.source}, "
                           f"candidate {candidate[:60]!r})") from e
    if verdict is None or verdict not in (True, False):
        raise TunelabError(f"judge '{name}' returned {verdict!r} on row {record.source}; a judge returns True or False")
    return bool(verdict)

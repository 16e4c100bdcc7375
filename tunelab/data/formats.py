"""Row formats -> Records. Each format is one entry in `FORMATS`: the fields that identify it
and a function that turns one raw row into a Record (chat `messages` or raw `text`).

Validation is strict because a silently malformed conversation trains the wrong thing: every
problem raises a DataError naming file, line and a field path such as `messages[2].role`.

Formats:
- `messages`: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
  "tools": [schema, ...] (optional)}; an assistant turn may carry OpenAI `tool_calls` (content null)
- `prompt_completion`: {"prompt": str | messages, "completion": str | messages}
- `alpaca`: {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
- `sharegpt`: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
- `rag`: {"question": str, "contexts": [str, ...], "answer": str}: the passages go into the user turn
  in their order (`rag_prompt`), the answer is the assistant turn (the only one that trains); a
  row that does not fit data.max_length is an error, never a silent cut of its answer
- `text`: {"text": str}
Any row may carry an `answer` (str or number), the reference answer for exact-match eval, a `task`
(the sub-task it belongs to, a non-empty string: AnyTaskTune task sets, scored per task) and a
`provenance` (an object a data stage writes: where the row came from and what was done to it);
both go to `Record.meta`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.readers import Row
from tunelab.data.records import Record
from tunelab.data.turns import (CHAT_ROLES, SHAREGPT_ROLES, RowError, Turn, as_messages, check_order,
                                nonempty_list, parse_message, parse_tools, parse_turns, require, text)
from tunelab.errors import DataError


MAX_REASONS = 3
"""How many skipped rows' reasons are kept for the warning (all are counted)."""


class Records(list):
    """The list of Records from one source, plus what happened while loading it."""

    def __init__(self, records: Sequence[Record] = (), *, format: str = "", num_skipped: int = 0):
        super().__init__(records)
        self.format = format
        """The format used (detected or configured); `builtin` for builtin sources."""
        self.num_skipped = num_skipped
        """Rows skipped as malformed (only with on_bad_rows=skip)."""
        self.first_skipped: list[DataError] = []
        """The errors of the first MAX_REASONS rows skipped, in file order."""
        self.all_skipped: list[DataError] = []
        """The error of every row skipped, in file order (`tunelab data check --all`)."""

    def skipped(self, errors: list[DataError]) -> None:
        """Count rows skipped as malformed (`errors` in file order), keeping their errors."""
        self.num_skipped += len(errors)
        self.all_skipped = sorted(self.all_skipped + errors, key=lambda e: e.line or 0)
        self.first_skipped = self.all_skipped[:MAX_REASONS]

    @property
    def skip_reasons(self) -> list[str]:
        """`file:line: field 'x': reason` of the first rows skipped."""
        return [str(e) for e in self.first_skipped]


# ---------------------------------------------------------------- formats

def _from_messages(row: dict) -> Record:
    items = nonempty_list(require(row, "messages"), "messages")
    turns = [parse_message(item, f"messages[{i}]") for i, item in enumerate(items)]
    check_order(turns, "messages")
    return Record(messages=as_messages(turns), tools=parse_tools(row))


def _from_sharegpt(row: dict) -> Record:
    turns = parse_turns(require(row, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    check_order(turns, "conversations")
    return Record(messages=as_messages(turns))


def _side(row: dict, key: str, role: str) -> list[Turn]:
    """`prompt` or `completion`: a plain string (one `role` turn) or a message list."""
    value = require(row, key)
    if isinstance(value, list):
        return parse_turns(value, key, "role", "content", CHAT_ROLES)
    return [Turn(role, text(value, key), key, role_key="")]


def _from_prompt_completion(row: dict) -> Record:
    turns = _side(row, "prompt", "user") + _side(row, "completion", "assistant")
    check_order(turns, "completion")
    return Record(messages=as_messages(turns))


def _from_alpaca(row: dict) -> Record:
    instruction = text(require(row, "instruction"), "instruction")
    extra = text(row.get("input") or "", "input", allow_empty=True)
    system = text(row.get("system") or "", "system", allow_empty=True)
    output = text(require(row, "output"), "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Record(messages=messages)


def rag_prompt(question: str, contexts: list[str]) -> str:
    """The user turn of a retrieval-augmented question: numbered passages, then the question (the
    bare question when there are no passages)."""
    if not contexts:
        return question
    passages = "\n".join(f"Passage {i + 1}: {c}" for i, c in enumerate(contexts))
    return f"Answer the question using the passages.\n\n{passages}\n\nQuestion: {question}"


def _from_rag(row: dict) -> Record:
    question = text(require(row, "question"), "question")
    contexts = row.get("contexts") or []
    if not isinstance(contexts, list):
        raise RowError("contexts", f"expected a list of passages, got {type(contexts).__name__}")
    contexts = [text(c, f"contexts[{i}]") for i, c in enumerate(contexts)]
    answer = text(require(row, "answer"), "answer")
    messages = [{"role": "user", "content": rag_prompt(question, contexts)}, {"role": "assistant", "content": answer}]
    return Record(messages=messages, meta={"must_fit": "contexts", "question": question, "contexts": contexts})


def _from_text(row: dict) -> Record:
    return Record(text=text(require(row, "text"), "text"))


@dataclass(frozen=True)
class Format:
    """A row format: its required fields (the first one identifies it) and its row -> Record function."""
    keys: tuple[str, ...]
    parse: Callable[[dict], Record]


FORMATS: dict[str, Format] = {
    "messages": Format(("messages",), _from_messages),
    "sharegpt": Format(("conversations",), _from_sharegpt),
    "alpaca": Format(("instruction", "output"), _from_alpaca),
    "prompt_completion": Format(("prompt", "completion"), _from_prompt_completion),
    "rag": Format(("contexts", "question", "answer"), _from_rag),
    "text": Format(("text",), _from_text),
}
"""Formats in detection order: the first whose identifying (first) key is in the first row wins,
so a row with `instruction` but no `output` reports the missing `output` rather than no format."""


def detect_format(row: Any) -> str | None:
    """The name of the first format whose identifying field is in `row`, else None."""
    if not isinstance(row, dict):
        return None
    return next((name for name, f in FORMATS.items() if f.keys[0] in row), None)


def _answer(row: dict) -> str | None:
    """The optional `answer` field as a string (numbers are accepted: GSM-style data has them)."""
    value = row.get("answer")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError("answer", f"expected a string or number, got {type(value).__name__}")


def parse_row(row: Any, fmt: str) -> Record:
    """One raw row -> Record in format `fmt`; raises RowError (no file/line yet)."""
    if not isinstance(row, dict):
        raise RowError(None, f"expected an object with fields, got {type(row).__name__}")
    record = FORMATS[fmt].parse(row)
    record.answer = _answer(row)
    record.meta.update(_carried(row))
    return record


def _carried(row: dict) -> dict:
    """The optional `task` (a non-empty string) and `provenance` (an object) of a row."""
    out = {}
    if row.get("task") is not None:
        out["task"] = text(row["task"], "task").strip()
    if row.get("provenance") is not None:
        if not isinstance(row["provenance"], dict):
            raise RowError("provenance", f"expected an object, got {type(row['provenance']).__name__}")
        out["provenance"] = row["provenance"]
    return out


def to_records(rows: list[Row], file: str, fmt: str = "auto", skip_bad: bool = False) -> Records:
    """Normalise raw (line, row) pairs from `file` into Records. `fmt="auto"` detects the format
    from the first row; malformed rows raise DataError(file, line, field), or with `skip_bad`
    are counted in `num_skipped`."""
    if fmt == "auto":
        fmt = _detect(rows, file)
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; expected auto or one of {sorted(FORMATS)}", file=file)
    out = Records(format=fmt)
    for line, row in rows:
        try:
            record = parse_row(row, fmt)
        except RowError as e:
            error = DataError(e.message, file=file, line=line, field=e.field)
            if not skip_bad:
                raise error from None
            out.skipped([error])
            continue
        record.source = f"{file}:{line}"
        out.append(record)
    return out


def _detect(rows: list[Row], file: str) -> str:
    """The format of the first row that has one (a malformed first row is then reported, or
    skipped, as a row of that format), or an error naming the first row's fields."""
    fmt = next((f for _, row in rows if (f := detect_format(row)) is not None), None)
    line, row = rows[0]
    if fmt is None:
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        known = "; ".join(f"{n}: {'+'.join(f.keys)}" for n, f in FORMATS.items())
        raise DataError(f"cannot detect the format from fields {fields} (known: {known}); "
                        "set data.format", file=file, line=line)
    return fmt

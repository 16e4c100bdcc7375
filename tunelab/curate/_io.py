"""Reading a data stage's inputs and writing its output.

Inputs are any data source training reads (a file, a `datasets` directory, `builtin:NAME?opts`),
plus unlabeled rows, which training does not accept: `{"prompt": "..."}` with no completion, or
`messages` that end with a user turn. Output is JSONL in the `messages` (or `text`) format with the
row's `answer`, `task` and `provenance`, so `tunelab data check` and training read it as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

from tunelab.data.formats import RowError, parse_row, to_records
from tunelab.data.readers import read_rows
from tunelab.data.records import Record
from tunelab.errors import DataError, TunelabError
from tunelab.run.files import atomic_write_text

BUILTIN = "builtin:"


def load_input(spec: str, what: str = "input") -> list[Record]:
    """The rows of `spec`, unlabeled ones included; a missing, unreadable or empty source is an
    error naming `what`."""
    if not spec:
        raise TunelabError(f"{what}: no data source given")
    if spec.startswith(BUILTIN):
        from tunelab.data.builtin import load_builtin
        records = load_builtin(spec)
    else:
        try:
            rows, _ = read_rows(spec)
        except DataError as e:  # say which of the stage's inputs it is (its pool, its target, ...)
            raise TunelabError(f"{what}: {e}") from None
        records = [_record(row, spec, line) for line, row in rows]
    if not records:
        raise TunelabError(f"{what}: {spec} holds no rows (an empty pool)")
    return records


def _record(row, spec: str, line: int) -> Record:
    """One row: unlabeled (a prompt alone, or messages ending with a user turn) or any format."""
    try:
        if isinstance(row, dict) and "prompt" in row and "completion" not in row:
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise RowError("prompt", "expected a non-empty string")
            rec = Record(messages=[{"role": "user", "content": prompt}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"] \
                and isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") == "user":
            rec = parse_row({**row, "messages": row["messages"] + [{"role": "assistant", "content": "-"}]},
                            "messages")
            rec.messages = rec.messages[:-1]
        else:
            return to_records([(line, row)], spec)[0]
    except RowError as e:
        raise DataError(e.message, file=spec, line=line, field=e.field) from None
    rec.source = f"{spec}:{line}"
    return rec


def prompt_messages(record: Record) -> list[dict]:
    """The turns before the last assistant turn (all turns of an unlabeled row)."""
    msgs = record.messages or []
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return msgs[:last]


def to_row(record: Record) -> dict:
    """A JSONL row (messages or text, answer, task, provenance) that training and `data check` read."""
    row: dict = {"messages": record.messages} if record.messages is not None else {"text": record.text}
    if record.tools:
        row["tools"] = record.tools
    if record.answer is not None:
        row["answer"] = record.answer
    for key in ("task", "provenance"):
        if key in record.meta:
            row[key] = record.meta[key]
    return row


def write_jsonl(records: list[Record], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(to_row(r), ensure_ascii=False) + "\n" for r in records))

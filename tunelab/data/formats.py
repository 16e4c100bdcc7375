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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from tunelab.data.readers import Row
from tunelab.data.records import Record
from tunelab.errors import DataError


class RowError(Exception):
    """A problem in one row, before the file and line are known (the loader adds them)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


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


@dataclass(frozen=True)
class Turn:
    """One message with where it came from, so structural errors can name the source field."""
    role: str
    content: str
    where: str
    """Field path of the message, e.g. `conversations[3]`."""
    role_key: str = "role"
    """The source's name for the role field; empty for a plain-string prompt or completion."""
    extra: dict = dc_field(default_factory=dict)
    """Other message fields kept for the chat template: `tool_calls` (assistant), `tool_call_id`
    and `name` (tool)."""


# ---------------------------------------------------------------- field checks

def _field(row: dict, key: str, where: str = "") -> Any:
    """row[key], or a 'missing field' error."""
    if key not in row or row[key] is None:
        raise RowError(where + key, "missing field")
    return row[key]


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    """A string that is not empty or whitespace-only (unless allowed) and is valid Unicode (JSON
    escapes can smuggle in unpaired surrogates, which no tokenizer accepts)."""
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(field, "is empty" if not value else "is whitespace only")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(field, f"invalid Unicode: unpaired surrogate at character {e.start}") from None
    return value


def _list(value: Any, field: str) -> list:
    """A non-empty list."""
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(field, "is an empty list")
    return value


def _turns(value: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Turn]:
    """Parse a message list whose items are {role_key: <source role>, content_key: str}; source
    roles are mapped through `roles` (e.g. sharegpt's human -> user)."""
    turns = []
    for i, item in enumerate(_list(value, field)):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RowError(where, f"expected an object, got {type(item).__name__}")
        role = _text(_field(item, role_key, where + "."), f"{where}.{role_key}")
        if role not in roles:
            raise RowError(f"{where}.{role_key}", f"unknown role {role!r}; expected one of {sorted(roles)}")
        content = _text(_field(item, content_key, where + "."), f"{where}.{content_key}")
        turns.append(Turn(roles[role], content, where, role_key))
    return turns


def _next_roles(prev: Turn | None) -> tuple[str, ...]:
    """The roles that may follow `prev`: user first; an assistant turn after a user turn; after
    an assistant turn a user turn, or tool turns answering its tool_calls; after a tool turn,
    another tool turn or the assistant."""
    if prev is None or (prev.role == "assistant" and not prev.extra.get("tool_calls")):
        return ("user",)
    if prev.role == "user":
        return ("assistant",)
    return ("tool",) if prev.role == "assistant" else ("tool", "assistant")


def _check_order(turns: list[Turn], field: str) -> None:
    """An optional leading system turn, then user/assistant alternating, starting with user
    and ending with assistant (the turn that trains); tool turns answer an assistant turn's
    tool_calls before the assistant goes on."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        raise RowError(field, "has no user or assistant turn")
    for prev, turn in zip([None, *body], body):
        allowed = _next_roles(prev)
        if turn.role in allowed:
            continue
        where = turn.where + (f".{turn.role_key}" if turn.role_key else "")
        if turn.role == "tool":
            raise RowError(where, "a tool turn must follow an assistant turn with tool_calls (or another tool turn)")
        if allowed == ("tool",):
            raise RowError(where, f"expected a tool turn answering the tool_calls of {prev.where}, got {turn.role}")
        why = "system turn only allowed first" if turn.role == "system" else "turns must alternate"
        raise RowError(where, f"expected a {allowed[-1]} turn, got {turn.role} ({why}: system?, user, assistant, user, ...)")
    if body[-1].role != "assistant":
        raise RowError(field, "the conversation must end with an assistant turn")


def _messages(turns: list[Turn]) -> list[dict[str, Any]]:
    return [{"role": t.role, "content": t.content, **t.extra} for t in turns]


# ---------------------------------------------------------------- OpenAI messages with tools

def _message(item: Any, where: str) -> Turn:
    """One OpenAI chat message: system/user/assistant/tool; an assistant turn may carry
    `tool_calls` (then `content` may be null), a tool turn `tool_call_id` and `name`."""
    if not isinstance(item, dict):
        raise RowError(where, f"expected an object, got {type(item).__name__}")
    role = _text(_field(item, "role", where + "."), f"{where}.role")
    if role not in MESSAGE_ROLES:
        raise RowError(f"{where}.role", f"unknown role {role!r}; expected one of {sorted(MESSAGE_ROLES)}")
    extra: dict[str, Any] = {}
    if role == "assistant" and item.get("tool_calls") is not None:
        extra["tool_calls"] = _tool_calls(item["tool_calls"], f"{where}.tool_calls")
    if role == "tool":
        extra |= {k: _text(item[k], f"{where}.{k}") for k in ("tool_call_id", "name") if item.get(k) is not None}
    if _weight(item, role, where) == 0:
        extra["weight"] = 0  # render.assistant_spans leaves this turn untrained
    if extra.get("tool_calls") and item.get("content") is None:
        return Turn(role, "", where, extra=extra)  # a turn that only calls tools
    content = _text(_field(item, "content", where + "."), f"{where}.content", allow_empty=bool(extra))
    return Turn(role, content, where, extra=extra)


def _weight(item: dict, role: str, where: str) -> int | None:
    """OpenAI's per-message `weight`: 0 (do not train this assistant turn) or 1 (train it)."""
    weight = item.get("weight")
    if weight is None:
        return None
    if role != "assistant":
        raise RowError(f"{where}.weight", "only assistant turns have a weight (0: not trained, 1: trained)")
    if weight not in (0, 1) or isinstance(weight, (bool, float)):
        raise RowError(f"{where}.weight", f"must be 0 or 1, got {weight!r}")
    return weight


def _tool_calls(value: Any, where: str) -> list[dict]:
    """OpenAI `tool_calls` in the shape chat templates read (transformers' convention):
    {"type": "function", "function": {"name": str, "arguments": dict}} (+ "id"); OpenAI's
    arguments are a JSON string, decoded here."""
    calls = []
    for j, call in enumerate(_list(value, where)):
        at = f"{where}[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise RowError(f"{at}.function", "missing field (expected {\"function\": {\"name\": ..., \"arguments\": ...}})")
        fn = call["function"]
        name = _text(_field(fn, "name", f"{at}.function."), f"{at}.function.name")
        out = {"type": "function", "function": {"name": name, "arguments": _arguments(fn.get("arguments"), at)}}
        calls.append(out | ({"id": _text(call["id"], f"{at}.id")} if call.get("id") is not None else {}))
    return calls


def _arguments(value: Any, at: str) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RowError(f"{at}.function.arguments", f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise RowError(f"{at}.function.arguments", f"expected a JSON object, got {type(value).__name__}")
    return value


def _tools(row: dict) -> list[dict] | None:
    """The row's OpenAI `tools` (function schemas), passed to the chat template as they are."""
    tools = row.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("tools", f"expected a list of tool schemas (objects), got {type(tools).__name__}")
    return tools


# ---------------------------------------------------------------- formats

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
MESSAGE_ROLES = {*CHAT_ROLES, "tool"}
"""Roles of the `messages` format (OpenAI chat): a `tool` turn carries a tool's result."""
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


def _from_messages(row: dict) -> Record:
    turns = [_message(item, f"messages[{i}]") for i, item in enumerate(_list(_field(row, "messages"), "messages"))]
    _check_order(turns, "messages")
    return Record(messages=_messages(turns), tools=_tools(row))


def _from_sharegpt(row: dict) -> Record:
    turns = _turns(_field(row, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    _check_order(turns, "conversations")
    return Record(messages=_messages(turns))


def _side(row: dict, key: str, role: str) -> list[Turn]:
    """`prompt` or `completion`: a plain string (one `role` turn) or a message list."""
    value = _field(row, key)
    if isinstance(value, list):
        return _turns(value, key, "role", "content", CHAT_ROLES)
    return [Turn(role, _text(value, key), key, role_key="")]


def _from_prompt_completion(row: dict) -> Record:
    turns = _side(row, "prompt", "user") + _side(row, "completion", "assistant")
    _check_order(turns, "completion")
    return Record(messages=_messages(turns))


def _from_alpaca(row: dict) -> Record:
    instruction = _text(_field(row, "instruction"), "instruction")
    extra = _text(row.get("input") or "", "input", allow_empty=True)
    system = _text(row.get("system") or "", "system", allow_empty=True)
    output = _text(_field(row, "output"), "output")
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
    question = _text(_field(row, "question"), "question")
    contexts = row.get("contexts") or []
    if not isinstance(contexts, list):
        raise RowError("contexts", f"expected a list of passages, got {type(contexts).__name__}")
    contexts = [_text(c, f"contexts[{i}]") for i, c in enumerate(contexts)]
    answer = _text(_field(row, "answer"), "answer")
    messages = [{"role": "user", "content": rag_prompt(question, contexts)}, {"role": "assistant", "content": answer}]
    return Record(messages=messages, meta={"must_fit": "contexts", "question": question, "contexts": contexts})


def _from_text(row: dict) -> Record:
    return Record(text=_text(_field(row, "text"), "text"))


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
        out["task"] = _text(row["task"], "task").strip()
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

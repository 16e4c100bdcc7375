"""One row's conversation, checked field by field: its turns (roles, order, OpenAI tool calls and
weights), each problem a RowError naming the field path (`messages[2].role`); the loader adds the
file and line. The row formats in formats.py are built from these."""
from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any


class RowError(Exception):
    """A problem in one row, before the file and line are known (the loader adds them)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
MESSAGE_ROLES = {*CHAT_ROLES, "tool"}
"""Roles of the `messages` format (OpenAI chat): a `tool` turn carries a tool's result."""
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


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

def require(row: dict, key: str, where: str = "") -> Any:
    """row[key], or a 'missing field' error."""
    if key not in row or row[key] is None:
        raise RowError(where + key, "missing field")
    return row[key]


def text(value: Any, field: str, allow_empty: bool = False) -> str:
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


def nonempty_list(value: Any, field: str) -> list:
    """A non-empty list."""
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(field, "is an empty list")
    return value


def parse_turns(value: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Turn]:
    """Parse a message list whose items are {role_key: <source role>, content_key: str}; source
    roles are mapped through `roles` (e.g. sharegpt's human -> user)."""
    turns = []
    for i, item in enumerate(nonempty_list(value, field)):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RowError(where, f"expected an object, got {type(item).__name__}")
        role = text(require(item, role_key, where + "."), f"{where}.{role_key}")
        if role not in roles:
            raise RowError(f"{where}.{role_key}", f"unknown role {role!r}; expected one of {sorted(roles)}")
        content = text(require(item, content_key, where + "."), f"{where}.{content_key}")
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


def check_order(turns: list[Turn], field: str) -> None:
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


def as_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    return [{"role": t.role, "content": t.content, **t.extra} for t in turns]


# ---------------------------------------------------------------- OpenAI messages with tools

def parse_message(item: Any, where: str) -> Turn:
    """One OpenAI chat message: system/user/assistant/tool; an assistant turn may carry
    `tool_calls` (then `content` may be null), a tool turn `tool_call_id` and `name`."""
    if not isinstance(item, dict):
        raise RowError(where, f"expected an object, got {type(item).__name__}")
    role = text(require(item, "role", where + "."), f"{where}.role")
    if role not in MESSAGE_ROLES:
        raise RowError(f"{where}.role", f"unknown role {role!r}; expected one of {sorted(MESSAGE_ROLES)}")
    extra: dict[str, Any] = {}
    if role == "assistant" and item.get("tool_calls") is not None:
        extra["tool_calls"] = _tool_calls(item["tool_calls"], f"{where}.tool_calls")
    if role == "tool":
        extra |= {k: text(item[k], f"{where}.{k}") for k in ("tool_call_id", "name") if item.get(k) is not None}
    if _weight(item, role, where) == 0:
        extra["weight"] = 0  # render.assistant_spans leaves this turn untrained
    if extra.get("tool_calls") and item.get("content") is None:
        return Turn(role, "", where, extra=extra)  # a turn that only calls tools
    content = text(require(item, "content", where + "."), f"{where}.content", allow_empty=bool(extra))
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
    for j, call in enumerate(nonempty_list(value, where)):
        at = f"{where}[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise RowError(f"{at}.function", "missing field (expected {\"function\": {\"name\": ..., \"arguments\": ...}})")
        fn = call["function"]
        name = text(require(fn, "name", f"{at}.function."), f"{at}.function.name")
        out = {"type": "function", "function": {"name": name, "arguments": _arguments(fn.get("arguments"), at)}}
        calls.append(out | ({"id": text(call["id"], f"{at}.id")} if call.get("id") is not None else {}))
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


def parse_tools(row: dict) -> list[dict] | None:
    """The row's OpenAI `tools` (function schemas), passed to the chat template as they are."""
    tools = row.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("tools", f"expected a list of tool schemas (objects), got {type(tools).__name__}")
    return tools

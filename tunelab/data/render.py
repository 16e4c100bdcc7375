"""Records -> Examples (token ids + labels) through the tokenizer's own chat template.

Loss mask, by default: only assistant turns train (not those with `weight: 0`), each one's content plus the end-of-turn
marker that closes it (`<|im_end|>` for ChatML), so the model learns to stop. System and user
turns and the assistant header (`<|im_start|>assistant\\n`) get label -100. With
`train_on_prompt` every token trains. Text records train on every token plus an appended eos.

How the assistant spans are found, template-agnostically: render the whole conversation once;
for assistant turn i, render `messages[:i]` with the generation prompt and `messages[:i+1]`;
when both are string prefixes of the full render (true for ChatML, Llama-3, Gemma, ...), the
characters between them are that turn's content + end marker (trailing whitespace after the
marker is not trained). Otherwise the content is searched for in the render. The full string is
tokenized once with offsets, and a token trains when its first character lies in a span.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.data.config import DataConfig
from tunelab.data.records import Example, Record
from tunelab.errors import DataError, TunelabError

IGNORE = -100
"""Label of a token that carries no loss (PyTorch's cross-entropy ignore_index)."""

Span = tuple[int, int]
"""Half-open character range [start, end) of a rendered string."""

CHARS_PER_TOKEN = 16
"""Where a row is far longer than max_length, only about this many characters per kept token are
tokenized first (more if that gave too few tokens): a 10 MB row costs what a normal one costs."""
MARGIN = 64
"""Extra tokens kept past max_length when tokenizing a prefix, so that the word the cut splits
(the only place a prefix can tokenize differently) lies beyond what truncation keeps."""


class Examples(list):
    """The encoded Examples plus counts of what encoding did to them."""

    def __init__(self, examples: Sequence[Example] = (), *, num_dropped: int = 0, num_bad_rows: int = 0):
        super().__init__(examples)
        self.num_dropped = num_dropped
        """Examples dropped because no token trained after truncation."""
        self.num_bad_rows = num_bad_rows
        """Rows skipped as malformed before encoding (data.on_bad_rows=skip)."""
        self.longest = 0
        """Tokens of the longest example before truncation (kept or dropped)."""
        self.longest_partial = False
        """Whether `longest` is a lower bound: of a very long row only a prefix is tokenized."""

    @property
    def num_truncated(self) -> int:
        """Kept examples that were cut at max_length."""
        return sum(ex.truncated for ex in self)

    def longest_text(self) -> str:
        """`123 tokens`, or `at least 123 tokens` where only a prefix of the row was tokenized."""
        return f"{'at least ' if self.longest_partial else ''}{self.longest} tokens"

    def cuts(self, max_length: int) -> str | None:
        """What truncation did, for a warning: `2 of 13 examples truncated at data.max_length=64
        (longest: 90 tokens); 1 dropped (...)`; None when it did nothing."""
        parts = []
        if self.num_truncated:
            parts.append(f"{self.num_truncated} of {len(self) + self.num_dropped} examples truncated at "
                         f"data.max_length={max_length} (longest: {self.longest_text()})")
        if self.num_dropped:
            parts.append(f"{self.num_dropped} dropped (no trained token left after truncation)")
        return "; ".join(parts) or None


def encode(records: Sequence[Record], tokenizer: Any, cfg: DataConfig) -> Examples:
    """Tokenize records with their loss labels, truncated to `cfg.max_length`. Examples left
    with no trained target (e.g. the answer was cut off) are dropped and counted."""
    out = Examples(num_bad_rows=getattr(records, "num_skipped", 0))
    for record in records:
        ex = encode_one(record, tokenizer, cfg.train_on_prompt, max_length=cfg.max_length)
        if len(ex) > out.longest:
            out.longest, out.longest_partial = len(ex), ex.partial
        full = len(ex)
        ex = _truncate(ex, cfg.max_length)
        if ex.truncated and record.meta.get("must_fit"):
            _overflow(record, full, cfg.max_length)
        if num_trained(ex) == 0:
            out.num_dropped += 1
            continue
        out.append(ex)
    return out


def _overflow(record: Record, tokens: int, max_length: int) -> None:
    """A row whose format may not be cut (a RAG row: cutting it drops the answer) is over max_length."""
    field = record.meta["must_fit"]
    file, _, line = (record.source or "<records>").rpartition(":")
    raise DataError(f"the question, its {len(record.meta.get(field) or [])} passages and the answer take at least "
                    f"{max(tokens, max_length + 1)} tokens, over data.max_length={max_length}; use fewer or shorter "
                    f"passages, or raise data.max_length", file=file or record.source, field=field,
                    line=int(line) if line.isdigit() else None)


def encode_one(record: Record, tokenizer: Any, train_on_prompt: bool = False,
               max_length: int | None = None) -> Example:
    """One Example from a chat or text record: untruncated, or with `max_length` at least its
    first max_length + MARGIN tokens (what truncation keeps is the same either way)."""
    partial = max_length is not None and len(record.text or "") > CHARS_PER_TOKEN * (max_length + MARGIN)
    if record.messages is not None:
        text = _render_record(record, tokenizer)
        partial = max_length is not None and len(text) > CHARS_PER_TOKEN * (max_length + MARGIN)
        spans = [(0, len(text))] if train_on_prompt else assistant_spans(record, text, tokenizer)
        if record.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in record.messages):
            check_tools_rendered(record, text, tokenizer)
        ids, labels = _tokenize_spans(text, spans, tokenizer, max_length)
    elif record.text is not None:
        ids = _tokenize_prefix(record.text, tokenizer, max_length, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        raise DataError("record has neither messages nor text", file=record.source or "<records>")
    return Example(input_ids=ids, labels=labels, source=record.source, partial=partial)


def num_trained(ex: Example) -> int:
    """Tokens that are a training target once labels are shifted: the first token of an example
    is never predicted, so a label on it alone trains nothing."""
    return sum(label != IGNORE for label in ex.labels[1:])


def _truncate(ex: Example, max_length: int) -> Example:
    if len(ex) <= max_length:
        return ex
    return Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.source, truncated=True)


def render_chat(messages: list[dict[str, Any]], tokenizer: Any, add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> str:
    """The conversation as the tokenizer's chat template renders it, as a string. Tool schemas,
    tool calls and tool results go to the template as transformers passes them (`tools=`, the
    messages' `tool_calls`, `role: tool`): the template decides how they look."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TunelabError("the tokenizer has no chat template, so chat data cannot be rendered; "
                           "use a tokenizer (model) with a chat template, or `text` data")
    return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools,
                                         add_generation_prompt=add_generation_prompt)


def _render_record(record: Record, tokenizer: Any, upto: int | None = None, add_generation_prompt: bool = False) -> str:
    """`render_chat` of the record's first `upto` messages; a template that fails on the row
    (e.g. one that refuses a tool turn) is a DataError naming it."""
    from jinja2 import TemplateError

    try:
        return render_chat(record.messages[:upto], tokenizer, add_generation_prompt, tools=record.tools)
    except (TemplateError, TypeError) as e:
        raise DataError(f"the chat template cannot render this conversation ({type(e).__name__}: {e})",
                        file=record.source or "<records>", field="messages") from None


TOOLS_HELP = ("; use a model whose chat template supports tools (transformers passes `tools` and the "
              "messages' `tool_calls` to it), or drop the tool turns")


def check_tools_rendered(record: Record, text: str, tokenizer: Any) -> None:
    """Refuse, naming the row and field, tool data that the chat template drops: a tool call
    whose function name is not in the render, a tool result not in it, schemas it ignores."""
    def fail(field: str, what: str) -> None:
        raise DataError(f"the chat template does not render {what}{TOOLS_HELP}", file=record.source or "<records>",
                        field=field)

    for i, m in enumerate(record.messages or []):
        if any(call["function"]["name"] not in text for call in m.get("tool_calls") or []):
            fail(f"messages[{i}].tool_calls", "tool calls")
        if m["role"] == "tool" and m["content"].strip() and m["content"] not in text:
            fail(f"messages[{i}].content", "tool results")
    if record.tools and text == render_chat(record.messages, tokenizer, tools=None):
        fail("tools", "tool schemas")


def assistant_spans(record: Record, text: str, tokenizer: Any) -> list[Span]:
    """Character spans of each assistant turn's content + end-of-turn marker in `text`."""
    messages = record.messages or []
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight") == 0:
            continue
        span = _prefix_span(record, i, text, tokenizer) or _search_span(message, text, cursor, tokenizer)
        if span is None:
            raise DataError("cannot locate this assistant turn in the chat-template rendering",
                            file=record.source or "<records>", field=f"messages[{i}].content")
        spans.append(span)
        cursor = span[1]
    return spans


def _prefix_span(record: Record, i: int, text: str, tokenizer: Any) -> Span | None:
    """The span of assistant turn i by rendering prefixes, if the template is prefix-stable."""
    before = _render_record(record, tokenizer, i, add_generation_prompt=True) if i else ""
    upto = _render_record(record, tokenizer, i + 1)
    if not (text.startswith(upto) and upto.startswith(before)):
        return None
    end = max(len(upto.rstrip()), len(before) + 1)  # keep the end marker, not the newline after it
    return (len(before), min(end, len(upto)))


def _search_span(message: dict[str, str], text: str, cursor: int, tokenizer: Any) -> Span | None:
    """Fallback: find the content after `cursor`; extend over an eos marker right after it."""
    start = text.find(message["content"], cursor) if message["content"] else -1
    if start < 0:
        return None
    end = start + len(message["content"])
    eos = tokenizer.eos_token or ""
    if eos and text.startswith(eos, end):
        end += len(eos)
    return (start, end)


def _tokenize_prefix(text: str, tokenizer: Any, max_length: int | None, **kwargs) -> Any:
    """`tokenizer(text)`, or of a prefix of `text` that yields more than max_length + MARGIN tokens."""
    cut = len(text) if max_length is None else CHARS_PER_TOKEN * (max_length + MARGIN)
    while True:
        enc = tokenizer(text[:cut], **kwargs)
        if cut >= len(text) or len(enc["input_ids"]) > max_length + MARGIN:
            return enc
        cut *= 4


def _tokenize_spans(text: str, spans: list[Span], tokenizer: Any,
                    max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Tokenize `text` once; a token is labelled when its first character is inside a span."""
    enc = _tokenize_prefix(text, tokenizer, max_length, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [tid if _inside(start, spans) else IGNORE
              for tid, (start, _end) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _inside(pos: int, spans: list[Span]) -> bool:
    return any(start <= pos < end for start, end in spans)


def encode_prompt(record: Record, tokenizer: Any) -> list[int]:
    """The prompt for generation-based eval: every message before the last assistant turn,
    rendered with the generation prompt (so the model's next tokens are the answer)."""
    messages = record.messages
    if not messages:
        raise TunelabError(f"{record.source or 'record'}: a text record has no prompt to generate from")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    text = render_chat(messages[:last], tokenizer, add_generation_prompt=True, tools=record.tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_answer(record: Record) -> str:
    """The answer generation is scored against: `record.answer`, else the last assistant turn."""
    if record.answer is not None:
        return record.answer
    for message in reversed(record.messages or []):
        if message["role"] == "assistant":
            return message["content"]
    raise TunelabError(f"{record.source or 'record'}: no answer field and no assistant turn")

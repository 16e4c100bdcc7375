"""Edit-span targets: Kaneko & Okazaki, "Reducing Sequence Length by Predicting Edit Spans with Large
Language Models" (EMNLP 2023; arXiv 2305.11862).

For local rewriting (grammatical error correction, simplification, ...) most of the target copies
the source. The target is replaced by the list of edits that turn the source into it, each
(start, end, replacement) over the source's words: replace words [start, end) by the replacement;
a deletion has an empty replacement, an insertion start == end. The model learns to write the
edits; a converter applies them to the source.

Our serialisation (the paper's exact one is not public; the brief marks it unverified): words are
the source split on whitespace, positions are word indices, one edit per line `start end words...`,
edits sorted and non-overlapping (each starts at or after the previous one's end), and `NONE` when
the source is already right. Extraction aligns the words with difflib (no junk heuristic), so
`apply(source, extract(source, target)) == target` for any texts whose words are separated by single
spaces (others come back with single spaces). Model output that does not parse, or whose spans fall
outside the source, is not guessed at: `apply_model_output` returns the source unchanged.

The data stage `edit_spans` rewrites (source, target) rows: the source is the user turn's text after
the instruction line (or `meta.source_text` of built-in rows), the target the assistant turn; the
new assistant turn and `answer` are the edit list. Provenance counts rows with edits and without.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from tunelab.curate import DataStage, Workspace, derived, provenance, register
from tunelab.curate._io import load_input
from tunelab.data.records import Record
from tunelab.errors import TunelabError
from tunelab.options import Options

NO_EDITS = "NONE"


class Edit(NamedTuple):
    start: int
    """First source word replaced (0-based)."""
    end: int
    """One past the last source word replaced (== start: an insertion before word `start`)."""
    words: tuple[str, ...]
    """The replacement (empty: a deletion)."""


class EditError(TunelabError, ValueError):
    """Edits that cannot apply to a source: a span outside it, or edits out of order."""


def extract(source: str, target: str) -> list[Edit]:
    """The word edits that turn `source` into `target`, sorted, non-overlapping."""
    src, tgt = source.split(), target.split()
    ops = difflib.SequenceMatcher(None, src, tgt, autojunk=False).get_opcodes()
    return [Edit(i1, i2, tuple(tgt[j1:j2])) for tag, i1, i2, j1, j2 in ops if tag != "equal"]


def check(edits: list[Edit], num_words: int) -> None:
    """EditError unless every span lies within a source of `num_words` words and the edits are
    sorted and non-overlapping."""
    prev_end = 0
    for k, e in enumerate(edits):
        if not 0 <= e.start <= e.end <= num_words:
            raise EditError(f"edit {k} ({e.start} {e.end}) lies outside the source's {num_words} words "
                            f"(valid spans: 0 <= start <= end <= {num_words})")
        if e.start < prev_end:
            raise EditError(f"edit {k} ({e.start} {e.end}) starts before the previous edit ends ({prev_end}): "
                            "edits must be sorted and must not overlap")
        if k and e.start == e.end == edits[k - 1].start == edits[k - 1].end:
            raise EditError(f"edits {k - 1} and {k} both insert before word {e.start}: write them as one")
        prev_end = e.end


def apply(source: str, edits: list[Edit]) -> str:
    """`source` with `edits` applied (EditError for a span outside it or edits out of order)."""
    words = source.split()
    check(edits, len(words))
    out, pos = [], 0
    for e in edits:
        out += words[pos:e.start] + list(e.words)
        pos = e.end
    return " ".join(out + words[pos:])


def format_edits(edits: list[Edit]) -> str:
    """One line per edit, `start end words...`; `NONE` for no edit."""
    if not edits:
        return NO_EDITS
    return "\n".join(" ".join([str(e.start), str(e.end), *e.words]) for e in edits)


def parse_edits(text: str) -> list[Edit]:
    """The inverse of `format_edits`; EditError for anything else."""
    if text.strip() == NO_EDITS:
        return []
    edits = []
    for n, line in enumerate(text.strip().splitlines(), 1):
        parts = line.split()
        if len(parts) < 2 or not all(p.lstrip("-").isdigit() for p in parts[:2]):
            raise EditError(f"line {n} {line!r}: expected `start end words...` with integer positions")
        edits.append(Edit(int(parts[0]), int(parts[1]), tuple(parts[2:])))
    if not edits:
        raise EditError(f"no edit and no {NO_EDITS!r} in {text!r}")
    return edits


def apply_model_output(source: str, output: str) -> str:
    """What the model's edit list makes of `source`; malformed output, or spans outside the source,
    leave the source unchanged (the safe reading of a rewrite that failed)."""
    try:
        return apply(source, parse_edits(output))
    except EditError:
        return " ".join(source.split())


def source_of(record: Record) -> str:
    """The text to rewrite: `meta.source_text` (built-in rows), else the user turn after its first
    line when it has more than one line (an instruction then the text), else the whole user turn."""
    if "source_text" in record.meta:
        return record.meta["source_text"]
    user = next((m["content"] for m in reversed(record.messages or []) if m["role"] == "user"), None)
    if user is None:
        raise TunelabError(f"{record.source}: no user turn holding the text to rewrite")
    head, _, rest = user.partition("\n")
    return rest if rest.strip() else head


@dataclass(kw_only=True)
class EditSpansConfig(Options):
    input: str = "builtin:typos?n=1000&split=train"
    """(source, target) rows: the user turn holds the source (after an instruction line), the
    assistant turn the target."""


@register("edit_spans")
class EditSpans(DataStage):
    """Rewrite each (source, target) row's target as its edit spans over the source."""

    verb: ClassVar[str] = "edits"
    Config = EditSpansConfig

    def run(self, ws: Workspace) -> list[Record]:
        out = []
        for r in load_input(self.cfg.input):
            if not r.messages or r.messages[-1]["role"] != "assistant":
                raise TunelabError(f"{r.source}: needs an assistant turn (the target) to turn into edits")
            src, tgt = source_of(r), r.messages[-1]["content"]
            edits = extract(src, tgt)
            text = format_edits(edits)
            prov = provenance(self.name, "edits" if edits else "unchanged", r, source_text=src,
                              target_text=" ".join(tgt.split()), num_edits=len(edits))
            out.append(derived(r, r.messages[:-1] + [{"role": "assistant", "content": text}], text, prov))
        return out

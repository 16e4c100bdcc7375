"""Edit requests: what a model edit should make true, and how to check it.

A request file (JSONL, JSON, CSV, parquet; one request per row):
    {"prompt": "Where does Velmora Quistane live?", "target": "Dravolis",
     "rephrase": "In which city does Velmora Quistane reside?",          (optional; str or list)
     "locality": ["What pet does Velmora Quistane have?"]}               (optional; str or list)
`prompt` and `target` are required; `rephrase` prompts score generalization (the edit should hold
when asked differently) and `locality` prompts score locality (their answers should not change).
ZsRE-style aliases are accepted: `src` for prompt, `alt`/`target_new` for target, `rephrase_prompt`
and `loc`/`locality_prompt`. Every problem is a DataError naming the file, line and field.

`builtin:facts?n_entities=N&seed=S` as the request source gives N synthetic edits, one per
invented person of builtin:facts: its planned update (the verbatim question, the new value), the
rephrased question of that fact, and one unrelated general-knowledge question as its locality
prompt (edit i gets probe i mod 64 of the built-in probe set, e.g. "What is the capital of
France?"), as zsRE pairs each edit with an unrelated Natural Questions prompt. Our choice: an
earlier version asked the same person's next attribute, a neighbourhood test on which every method
scored 0 (before an edit SmolLM2 rambles about an invented person, after any edit it answers in one
word), so it could not separate methods; unrelated prompts measure what locality means.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import DataError

ALIASES = {"prompt": ("prompt", "src"), "target": ("target", "target_new", "alt"),
           "rephrase": ("rephrase", "rephrase_prompt"), "locality": ("locality", "locality_prompt", "loc")}
"""Our field -> the names it may have in a row, first present wins."""


@dataclass
class EditRequest:
    prompt: str
    target: str
    rephrase: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)
    source: str = ""
    """'file:line' (or 'builtin:facts:i')."""


def _pick(row: dict, ours: str) -> tuple[str, object]:
    """(the row's name for field `ours`, its value); (ours, None) when absent."""
    name = next((k for k in ALIASES[ours] if row.get(k) is not None), ours)
    return name, row.get(name)


def _text(value, file: str, line: int, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", file=file, line=line, field=name)
    if not value.strip():
        raise DataError("is empty", file=file, line=line, field=name)
    return value


def _texts(value, file: str, line: int, name: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_text(v, file, line, f"{name}[{i}]" if isinstance(value, list) else name) for i, v in enumerate(items)]


def parse_request(row, file: str, line: int) -> EditRequest:
    """One row -> EditRequest; a missing prompt or target is an error naming the field."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object with prompt and target, got {type(row).__name__}", file=file, line=line)
    values = {}
    for ours in ("prompt", "target"):
        name, value = _pick(row, ours)
        if value is None:
            also = f" (or {', '.join(ALIASES[ours][1:])})"
            raise DataError(f"missing field: every edit request needs a {ours}{also}", file=file, line=line, field=ours)
        values[ours] = _text(value, file, line, name).strip()
    extra = {ours: _texts(_pick(row, ours)[1], file, line, _pick(row, ours)[0]) for ours in ("rephrase", "locality")}
    return EditRequest(values["prompt"], values["target"], **extra, source=f"{file}:{line}")


def load_requests(spec: str) -> list[EditRequest]:
    """The requests of a file, or the synthetic ones of a `builtin:facts?...` spec."""
    if spec.startswith("builtin:"):
        return facts_requests(spec)
    from tunelab.data.readers import read_rows

    rows, _ = read_rows(spec)
    return [parse_request(row, str(Path(spec)), line) for line, row in rows]


def unrelated_questions() -> list[str]:
    """The built-in general-knowledge questions (the forgetting diagnostic's probe set, read here
    as data: editing sits below the diagnostics layer)."""
    import json

    from tunelab.data import builtin

    rows = json.loads((Path(builtin.__file__).parent / "general_probes.json").read_text())["probes"]
    return [r["question"] for r in rows]


def facts_requests(spec: str) -> list[EditRequest]:
    """One synthetic edit per person of the builtin:facts world `spec` names (see the module docstring)."""
    from tunelab.data.builtin import parse_spec
    from tunelab.data.builtin.facts import BY_KEY, make_world

    name, options = parse_spec(spec)
    unknown = set(options) - {"n_entities", "seed", "split"}
    if name != "facts" or unknown:
        raise DataError("edit requests from a builtin source: only builtin:facts?n_entities=N&seed=S", file=spec)
    world = make_world(int(options.get("n_entities", 50)), int(options.get("seed", 0)))
    unrelated = unrelated_questions()
    out = []
    for i, e in enumerate(world):
        attr = BY_KEY[e.updated]
        out.append(EditRequest(attr.question.format(name=e.name), e.new_value, [attr.rephrased.format(name=e.name)],
                               [unrelated[i % len(unrelated)]], source=f"builtin:facts:{i}"))
    return out

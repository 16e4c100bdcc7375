"""General-knowledge probes: short questions with short unambiguous answers, and their scoring.

The built-in set is tunelab/data/builtin/general_probes.json, written by
`python -m tunelab.diagnostics.build_probes` (its "meta" says how: model, decoding, date, counts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError

BUILTIN_PROBES = Path(__file__).resolve().parent.parent / "data" / "builtin" / "general_probes.json"


@dataclass(frozen=True)
class Probe:
    """One question; a reply is correct when it contains any of `answers` as a whole word."""
    question: str
    answers: tuple[str, ...]
    category: str = ""


def load_probes(path: str | Path | None = None, limit: int | None = None) -> list[Probe]:
    """The probes of a JSON file {"meta": ..., "probes": [{question, answers, category}]} (the
    built-in set by default), the first `limit` of them."""
    path = Path(path) if path is not None else BUILTIN_PROBES
    try:
        rows = json.loads(path.read_text())["probes"]
        probes = [Probe(r["question"], tuple(r["answers"]), r.get("category", "")) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TunelabError(f"{path}: not a probes file ({{'probes': [{{question, answers}}]}}): {e}") from None
    return probes[:limit]


def is_correct(reply: str, answers: tuple[str, ...], inverse: Callable[[str], str] = lambda s: s) -> bool:
    """True if `reply`, or `inverse(reply)` (a conjugate transform's P^-1), contains an answer as a
    whole word or phrase, ignoring case (tunelab.eval.metrics.contains_match)."""
    from tunelab.eval.metrics import contains_match

    texts = {reply, inverse(reply)}
    return any(contains_match(t, a) for t in texts for a in answers)


def score(replies: list[str], probes: list[Probe], inverse: Callable[[str], str] = lambda s: s) -> list[bool]:
    """Per-probe correctness of `replies` (one per probe, in order)."""
    assert len(replies) == len(probes), (len(replies), len(probes))
    return [is_correct(r, p.answers, inverse) for r, p in zip(replies, probes)]

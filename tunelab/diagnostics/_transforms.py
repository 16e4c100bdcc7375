"""Conjugate-prompting transforms (Kotha, Springer, Raghunathan 2023): an invertible rewriting P
of a prompt that moves it away from the fine-tuning distribution while keeping the capability it
asks for. The answer is read back through P^-1: `answer = P^-1(model(P(prompt)))`.

Each transform is a `Transform(forward, inverse)` in `TRANSFORMS`; adding one is adding a row.
Translation (the paper's main transform for real LLMs) needs a translator, so it is not built in.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
_UNLEET = {v: k for k, v in _LEET.items()}
_VOWELS = "aeiouAEIOU"


@dataclass(frozen=True)
class Transform:
    """A prompt rewriting and the map that brings an answer written in it back to plain text."""
    forward: Callable[[str], str]
    inverse: Callable[[str], str]
    description: str


def _leet(s: str) -> str:
    """Invertible (up to letter case) on words that keep a letter: "is" -> "15" reads as a number."""
    return "".join(_LEET.get(c.lower(), c) for c in s)


def _unleet(s: str) -> str:
    """Digits back to letters, but only inside words that also hold letters: "7h3" -> "the",
    while a plain number such as "12" stays a number."""
    def word(m: re.Match) -> str:
        w = m.group(0)
        return "".join(_UNLEET.get(c, c) for c in w) if re.search(r"[A-Za-z]", w) else w
    return re.sub(r"\w+", word, s)


def _pig_word(w: str) -> str:
    """"capital" -> "apital-cay", "Paris" -> "aris-Pay", "is" -> "is-ay" (the hyphen keeps the
    rewriting invertible: the consonants between it and the final "ay" are the moved head)."""
    head = re.match(r"[^aeiouAEIOU]*", w).group(0)
    return f"{w}-ay" if head in ("", w) else f"{w[len(head):]}-{head}ay"


def _unpig_word(m: re.Match) -> str:
    return m.group(2) + m.group(1)


def _piglatin(s: str) -> str:
    return re.sub(r"\b[A-Za-z]+\b", lambda m: _pig_word(m.group(0)), s)


def _unpiglatin(s: str) -> str:
    return re.sub(r"([A-Za-z]*)-([^aeiouAEIOU\W\d]*)ay\b", _unpig_word, s)


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda s: s, lambda s: s, "the prompt as is"),
    "uppercase": Transform(str.upper, lambda s: s, "every letter upper-cased (answers compare case-insensitively)"),
    "leetspeak": Transform(_leet, _unleet, "a->4 e->3 i->1 o->0 s->5 t->7"),
    "piglatin": Transform(_piglatin, _unpiglatin, "each word's leading consonants moved to the end + 'ay'"),
}
"""name -> transform. `uppercase` is the default for the built-in model: SmolLM2-135M still answers
upper-cased questions but not leetspeak or Pig Latin ones (see general_probes.json's metadata)."""

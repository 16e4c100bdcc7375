"""Answer-level metrics for scoring generations against a reference answer.

Which to use where:
- `exact_match` — numeric / short-form tasks whose completions end in a marked answer line, e.g.
  `builtin:arith` ("... #### 14"). The answer is pulled out with `extract_answer` (the pattern's
  group, else a number the text ends with, else the whole text) and compared after `normalize`.
- `contains_match` — free-text answers such as `builtin:facts` probes, where the model says a sentence
  ("Velmora lives in Quenth.") and the reference is a short value ("Quenth"). `exact_match` would
  compare the whole sentence with "Quenth" and fail; `contains_match` asks whether the value
  appears in the generation as a whole word or phrase, ignoring case.
"""
from __future__ import annotations

import re
from decimal import Decimal

DEFAULT_PATTERN = r"####\s*(.+?)\s*$"
"""GSM8K-style final-answer line (the same default as `EvalConfig.answer_pattern`)."""

_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<!\w)-)?\.\d+")
"""An int or decimal, optionally with thousands commas; a '-' counts as a sign only after a non-word."""
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TRAILER = re.compile(r"[\s.!?)\]\"'*]*")
"""What may follow a final number that is the answer: spaces and closing punctuation only."""


def extract_answer(text: str, pattern: str = DEFAULT_PATTERN) -> str:
    """The final answer in a generation: the first group of the last match of `pattern` (multiline,
    so `$` is an end of line; empty matches are skipped); else the last number in the text when the
    text ends with it (only spaces and closing punctuation after it; commas dropped), so that
    "1 + 28 + 13 = 36 +" has no answer rather than 36; else the stripped text."""
    compiled = re.compile(pattern, re.MULTILINE)
    found = [(m.group(1) if compiled.groups else m.group(0)) or "" for m in compiled.finditer(text)]
    found = [f.strip() for f in found if f.strip()]  # an empty '####' line is no answer
    if found:
        return found[-1]
    last = None
    for last in _NUMBER.finditer(text):
        pass
    if last is not None and _TRAILER.fullmatch(text, last.end()):
        return last.group().replace(",", "")
    return text.strip()


def normalize(answer: str) -> str:
    """Canonical form for comparison: lowercased, stripped, without a trailing period, without
    thousands commas, and numbers in plain form ('12.0' -> '12', '1,200' -> '1200', '-0' -> '0',
    '$5' -> '5')."""
    s = answer.strip().lower()
    s = s.rstrip(".").strip() if not re.fullmatch(r"-?\.\d+", s) else s
    s = _THOUSANDS_COMMA.sub("", s)
    if s.startswith("$") and _NUMBER.fullmatch(s[1:]):
        s = s[1:]
    return _canonical_number(s) if _NUMBER.fullmatch(s) else s


def _canonical_number(s: str) -> str:
    """'12.50' -> '12.5', '12.0' -> '12'; always plain decimal notation (never '1E+2')."""
    value = Decimal(s.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def exact_match(prediction_text: str, reference: str, pattern: str = DEFAULT_PATTERN) -> bool:
    """True if the answer extracted from `prediction_text` equals `reference` after `normalize`.
    The reference is taken as-is (it is already the short answer, e.g. Record.answer)."""
    return normalize(extract_answer(prediction_text, pattern)) == normalize(reference)


def contains_match(prediction: str, reference: str) -> bool:
    """True if `reference` appears in `prediction` as a whole word or phrase, case-insensitively
    (runs of whitespace match any whitespace). "Velmora lives in Quenth." contains "quenth" but
    "Quenthwick" does not. An empty reference never matches."""
    ref = normalize(reference) if _NUMBER.fullmatch(reference.strip()) else reference.strip().rstrip(".").strip()
    if not ref:
        return False
    phrase = r"\s+".join(re.escape(word) for word in ref.split())
    text = _THOUSANDS_COMMA.sub("", prediction)
    return re.search(rf"(?<!\w){phrase}(?!\w)", text, re.IGNORECASE) is not None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation, as model-editing metrics use it (LocFT's eval_edit_metric.py):
    lower case, punctuation removed, articles (a, an, the) removed, whitespace collapsed.
    "The Golden Gate." -> "golden gate"."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def token_overlap(prediction: str, reference: str) -> tuple[float, float]:
    """(precision, recall) of the prediction's normalised tokens against the reference's, counting
    repeated tokens at most as often as the other side has them (SQuAD's F1 parts); (0, 0) when
    either side is empty."""
    from collections import Counter

    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0, 0.0
    return common / len(pred), common / len(ref)

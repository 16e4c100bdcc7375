"""`builtin:typos` — a local rewriting task: correct the word-level errors injected into a sentence.

    builtin:typos?n=1000&split=train&seed=0

Each row asks the assistant to correct one sentence; the answer is the clean sentence:

    user:      Correct the spelling mistakes in this sentence:
               The yuong teacher carried three heavy boxes to the the station before noon.
    assistant: The young teacher carried three heavy boxes to the station before noon.

Most words are already right, which is what edit-span targets exploit (tunelab.curate.edit_spans:
the target becomes `1 2 young` and `7 8`, a few tokens instead of the whole sentence).

Errors, each on a different word: two adjacent letters swapped, a letter dropped, a letter
doubled (words of 4+ letters), and a repeated word (`the the`: its correction is a deletion).

Splits:
- `train` / `test`: one clause from everyday vocabulary, 1-2 errors. Disjoint by construction: a
  sentence belongs to `test` iff a hash of the clean sentence falls in a fixed 20% bucket.
- `ood`: two clauses joined by a conjunction, from a separate (laboratory) vocabulary, 2-3
  errors: longer inputs and words never seen in training.
Every record's meta carries `split`, `errors`, `source_text` (with errors) and `target_text`.
"""
from __future__ import annotations

import hashlib
import random
from typing import Annotated, Literal

from tunelab.data.builtin import Range, task
from tunelab.data.records import Record
from tunelab.errors import ConfigError

Split = Literal["train", "test", "ood"]
INSTRUCTION = "Correct the spelling mistakes in this sentence:"
TEST_PERCENT = 20

EVERYDAY = {
    "subj": ["teacher", "farmer", "student", "doctor", "painter", "driver", "neighbour", "baker", "gardener",
             "sailor", "musician", "writer"],
    "adj": ["young", "tired", "happy", "careful", "quiet", "friendly", "clever", "patient", "busy", "cheerful"],
    "verb": ["carried", "brought", "painted", "cleaned", "repaired", "bought", "collected", "delivered",
             "borrowed", "returned"],
    "num": ["two", "three", "four", "several", "seven", "twelve"],
    "obj_adj": ["heavy", "yellow", "wooden", "small", "broken", "beautiful", "large", "colourful"],
    "obj": ["boxes", "chairs", "baskets", "bottles", "windows", "letters", "blankets", "lanterns", "bicycles"],
    "place": ["station", "market", "library", "garden", "harbour", "village", "kitchen", "museum"],
    "time": ["before noon", "after lunch", "last Tuesday", "every morning", "during the storm",
             "in the evening", "on Sunday"],
}
LAB = {
    "subj": ["chemist", "technician", "researcher", "engineer", "biologist", "physicist", "analyst"],
    "adj": ["meticulous", "experienced", "diligent", "skeptical", "enthusiastic", "methodical"],
    "verb": ["calibrated", "measured", "centrifuged", "assembled", "inspected", "sterilised", "recorded"],
    "num": ["eight", "fifteen", "numerous", "twenty", "nine"],
    "obj_adj": ["fragile", "magnetic", "transparent", "sealed", "pressurised", "delicate"],
    "obj": ["samples", "instruments", "cylinders", "electrodes", "specimens", "thermometers", "circuits"],
    "place": ["laboratory", "cleanroom", "observatory", "workshop", "reactor hall"],
    "time": ["overnight", "before the inspection", "throughout the experiment", "after the meeting"],
    "reason": ["the readings drifted", "the supervisor requested it", "the protocol changed",
               "the previous results looked suspicious", "the deadline was approaching"],
    "conj": ["because", "since", "although", "while"],
}
ONE_CLAUSE = "The {adj} {subj} {verb} {num} {obj_adj} {obj} to the {place} {time}."
TWO_CLAUSES = "The {adj} {subj} {verb} {num} {obj_adj} {obj} in the {place} {time} {conj} {reason}."


def sentence(rng: random.Random, split: str) -> str:
    words = LAB if split == "ood" else EVERYDAY
    template = TWO_CLAUSES if split == "ood" else ONE_CLAUSE
    return template.format(**{k: rng.choice(v) for k, v in words.items()})


def _swap(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 2)  # never the first letter; two letters of the word's body
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _drop(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i + 1:]


def _double(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i] + word[i:]


LETTER_ERRORS = (_swap, _drop, _double)


def corrupt(clean: str, num_errors: int, rng: random.Random) -> str:
    """`clean` with `num_errors` errors on distinct words: letter errors on alphabetic words of 4+
    letters (each changes its word), or one word repeated."""
    words = clean.split()
    candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 4]
    chosen = sorted(rng.sample(candidates, min(num_errors, len(candidates))), reverse=True)
    for i in chosen:  # from the right, so a repeated word does not shift the positions still to do
        if rng.random() < 0.2:
            words.insert(i, words[i])
            continue
        for _ in range(10):
            new = rng.choice(LETTER_ERRORS)(words[i], rng)
            if new != words[i]:
                words[i] = new
                break
    return " ".join(words)


def split_of(clean: str) -> Literal["train", "test"]:
    bucket = int.from_bytes(hashlib.sha256(clean.encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


@task("typos")
def typos(n: Annotated[int, Range(1, 1_000_000)] = 1000, split: Split = "train", seed: int = 0) -> list[Record]:
    """Sentences with injected word-level errors and their corrections (train/test; ood: longer
    sentences from another vocabulary with more errors)."""
    rng = random.Random(f"typos:{split}:{seed}")
    errors = (2, 3) if split == "ood" else (1, 2)
    records, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(records) == n:
            break
        clean = sentence(rng, split)
        if clean in seen or (split != "ood" and split_of(clean) != split):
            continue
        seen.add(clean)
        k = rng.randint(*errors)
        records.append(_record(corrupt(clean, k, rng), clean, split, k, len(records)))
    if len(records) < n:
        raise ConfigError(f"builtin:typos: option 'n' too large: only {len(records)} distinct sentences found")
    return records


def _record(source: str, target: str, split: str, errors: int, i: int) -> Record:
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n{source}"}, {"role": "assistant", "content": target}]
    return Record(messages=messages, answer=target, source=f"builtin:typos:{split}:{i}",
                  meta={"split": split, "errors": errors, "source_text": source, "target_text": target})

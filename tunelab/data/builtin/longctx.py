"""`builtin:longctx` — retrieval in a long distractor context, for long-context fine-tuning.

    builtin:longctx?n=100&length=1024&max_length=8192&kind=mix&split=train&seed=0

Each row is one user turn (a long context, then a question) and a short assistant answer:
- `passkey` (Mohtashami & Jaggi 2023, LongLoRA's evaluation): "The pass key is 48213. Remember
  it." hidden at a random depth in repeated filler sentences; "What is the pass key?".
- `kv` (key-value retrieval): lines "The code of amber-falcon is 70318." for hundreds of
  invented names; "What is the code of amber-falcon?".
- `multihop`: lines "amber-falcon points to crimson-otter." and "crimson-otter holds 58213."
  among distractors of both kinds; "Which number does the name that amber-falcon points to
  hold?" (two lookups, the second at a place the first reveals).
`kind=mix` cycles through the three. Answers are 5-digit numbers, so exact match scores them.

Lengths. `length` is the context length in tokens, approximately: text is generated to
`(length - OVERHEAD) * CHARS_PER_TOKEN[kind]` characters, calibrated on SmolLM2's tokenizer (the whole chat-formatted row
within about -7%..0% of `length` there; other BPE tokenizers of English land close). With `max_length` >
`length`, rows are spread evenly over the doubling ladder length, 2*length, ... <= max_length,
and `meta["length"]` names each row's bucket, for accuracy per length bucket. `meta` also holds
`kind` and `depth` (the needle's relative position in the context).

Splits: `train` and `test` draw from separate seeded streams (the same name pool, other values).
Deterministic in (n, length, max_length, kind, split, seed).
"""
from __future__ import annotations

import random
from typing import Annotated, Literal

from tunelab.data.builtin import Range, task
from tunelab.data.records import Record

Kind = Literal["passkey", "kv", "multihop", "mix"]
KINDS = ("passkey", "kv", "multihop")
CHARS_PER_TOKEN = {"passkey": 3.65, "kv": 2.2, "multihop": 2.4}
"""Characters of generated context per token of SmolLM2's tokenizer, by kind (measured on these
texts: invented names and numbers take more tokens than the filler's words)."""
OVERHEAD = 96
"""Tokens left for the chat template, the instruction and the question."""
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
ADJECTIVES = ("amber crimson silent golden hollow misty rapid gentle frozen velvet hidden bright quiet "
              "distant ancient copper silver scarlet lunar solar rustic mellow brave clever dusky eager "
              "fabled gloomy humble ivory jolly keen lively marble noble olive polar proud royal sandy").split()
ANIMALS = ("falcon otter badger heron lynx marten osprey puffin raven stoat tapir walrus yak zebra bison "
           "condor dingo egret ferret gecko hyena ibis jackal koala lemur magpie newt ocelot panda quail "
           "robin salmon toucan urchin viper wombat beetle cobra donkey").split()
NAMES = [f"{a}-{b}" for a in ADJECTIVES for b in ANIMALS]


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _fill(lines: list[str], needles: list[str], chars: int, rng: random.Random) -> tuple[str, float]:
    """Distractor `lines` (cycled) up to `chars` characters, the `needles` at random depths;
    returns the text and the first needle's relative depth."""
    body, size, i = [], 0, 0
    budget = max(chars - sum(len(n) + 1 for n in needles), 0)
    while size < budget:
        line = lines[i % len(lines)]
        body.append(line)
        size += len(line) + 1
        i += 1
    spots = sorted(rng.randint(0, len(body)) for _ in needles)
    order = list(needles)
    rng.shuffle(order)
    for offset, (spot, needle) in enumerate(zip(spots, order)):
        body.insert(spot + offset, needle)
    first = body.index(needles[0])
    return " ".join(body), first / max(len(body) - 1, 1)


def _passkey(rng: random.Random, chars: int):
    key = _number(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    text, depth = _fill([FILLER.strip()], [needle], chars, rng)
    return text, "What is the pass key?", key, depth


def _kv(rng: random.Random, chars: int):
    names = rng.sample(NAMES, min(len(NAMES), chars // 30 + 2))
    target, others = names[0], names[1:]
    answer = _number(rng)
    lines = [f"The code of {name} is {_number(rng)}." for name in others]
    text, depth = _fill(lines, [f"The code of {target} is {answer}."], chars, rng)
    return text, f"What is the code of {target}?", answer, depth


def _multihop(rng: random.Random, chars: int):
    names = rng.sample(NAMES, min(len(NAMES), chars // 28 + 4))
    start, middle, rest = names[0], names[1], names[2:]
    answer = _number(rng)
    half = len(rest) // 2
    lines = [f"{a} points to {b}." for a, b in zip(rest[:half], rest[half:])]
    lines += [f"{b} holds {_number(rng)}." for b in rest]  # every name holds one: no shortcut past the first hop
    rng.shuffle(lines)
    needles = [f"{start} points to {middle}.", f"{middle} holds {answer}."]
    text, depth = _fill(lines, needles, chars, rng)
    return text, f"Which number does the name that {start} points to hold?", answer, depth


MAKERS = {"passkey": _passkey, "kv": _kv, "multihop": _multihop}


def ladder(length: int, max_length: int) -> list[int]:
    """length, 2*length, ... up to max_length (just `length` when max_length <= length)."""
    out = [length]
    while out[-1] * 2 <= max_length:
        out.append(out[-1] * 2)
    return out


@task("longctx")
def longctx(n: Annotated[int, Range(1, 100_000)] = 100, length: Annotated[int, Range(64, 1_048_576)] = 1024,
            max_length: Annotated[int, Range(0, 1_048_576)] = 0, kind: Kind = "mix",
            split: Literal["train", "test"] = "train", seed: int = 0) -> list[Record]:
    """Passkey, key-value and two-hop retrieval in a long distractor context (length in tokens, approx.)."""
    rng = random.Random(f"longctx:{split}:{seed}")
    buckets = ladder(length, max_length)
    records = []
    for i in range(n):
        bucket, which = buckets[i * len(buckets) // n], KINDS[i % 3] if kind == "mix" else kind
        context, question, answer, depth = MAKERS[which](rng, int((bucket - OVERHEAD) * CHARS_PER_TOKEN[which]))
        prompt = f"Read the text and answer the question with a number.\n\n{context}\n\nQuestion: {question}"
        records.append(Record(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                              answer=answer, source=f"builtin:longctx:{split}:{i}",
                              meta={"split": split, "kind": which, "length": bucket, "depth": round(depth, 3)}))
    return records

"""`builtin:arith` — short multi-step arithmetic word problems for chat SFT.

    builtin:arith?n=1000&split=train&seed=0
    builtin:arith?n=500&split=train&seed=1&answers=false     (an unlabeled pool: questions only)

A problem is an opening (someone has some items, possibly as groups: one `*` step) followed by
events (buy/find more: `+`, give away/sell: `-`, double/triple: `*`, buy/give away whole groups:
a `*` then a `+`/`-`). The assistant answers with one line per binary operation and a final
`#### N` line, e.g.

    user:      Tom has 12 apples. He buys 7 more. Then he gives away 5. How many apples does he have now?
    assistant: Step 1: 12 + 7 = 19
               Step 2: 19 - 5 = 14
               #### 14

Splits:
- `train` / `test`: 2-3 steps, operands about 1..50, running totals kept <= 150, never negative.
  The two are disjoint by construction: a problem belongs to `test` iff a hash of its solution
  steps (seed-independent) falls in a fixed 20% bucket, else to `train`. So no test problem has the
  same arithmetic (hence the same text) as any train problem, for any `n` or seed. Each split also
  draws from its own seed-derived stream and is de-duplicated within itself.
- `ood`: 4-5 steps with operands up to ~500 and totals up to 3000 — same wording, harder sums.

Rows are ~40-90 tokens so a 135M model fine-tuned on CPU for minutes can pick up the pattern.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

from tunelab.data.builtin import Range, task
from tunelab.data.records import Record
from tunelab.errors import ConfigError

Split = Literal["train", "test", "ood"]
Step = tuple[int, str, int, int]
"""(a, op, b, result) for one solution line `a op b = result`."""

TEST_PERCENT = 20
"""Share of the in-distribution problem space (by solution hash) that is reserved for `test`."""


@dataclass(frozen=True)
class Level:
    """How hard the problems of a split are."""
    steps: tuple[int, ...]
    """Number of solution lines to draw from."""
    start: tuple[int, int]
    """Range of the starting count."""
    operand: tuple[int, int]
    """Range of an added/removed amount."""
    group: tuple[int, int]
    """Range of both factors of a groups-of-items product."""
    cap: int
    """Running totals stay <= cap."""
    scale_max: int
    """Only totals <= scale_max are doubled or tripled (keeps in-distribution products small)."""


LEVELS = {
    "train": Level(steps=(2, 3), start=(5, 50), operand=(1, 30), group=(2, 9), cap=150, scale_max=20),
    "ood": Level(steps=(4, 5), start=(60, 500), operand=(20, 500), group=(6, 25), cap=3000, scale_max=1000),
}
LEVELS["test"] = LEVELS["train"]

NAMES = [("Tom", "he", "his"), ("Anna", "she", "her"), ("Ravi", "he", "his"), ("Mia", "she", "her"),
         ("Leo", "he", "his"), ("Sara", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"),
         ("Ben", "he", "his"), ("Yuki", "she", "her"), ("Carlos", "he", "his"), ("Nina", "she", "her")]
ITEMS = [("apples", "bags"), ("marbles", "jars"), ("stickers", "packs"), ("cookies", "boxes"),
         ("pencils", "cases"), ("coins", "purses"), ("shells", "buckets"), ("cards", "decks")]
OPENINGS = ["{name} has {a} {items}.", "{name} starts with {a} {items}.", "{name} collects {a} {items}."]
GROUP_OPENINGS = ["{name} has {g} {boxes} with {b} {items} in each.", "{name} buys {g} {boxes} of {b} {items} each."]
ADD = ["buys {x} more", "finds {x} more", "gets {x} more from a friend", "wins {x} more"]
SUB = ["gives away {x}", "sells {x}", "loses {x}", "uses {x}"]
QUESTIONS = ["How many {items} does {name} have now?", "How many {items} does {pron} have in the end?",
             "How many {items} does {name} have at the end?"]


@dataclass
class Draft:
    """A problem being built: the story so far, the solution steps, and the running total."""
    rng: random.Random
    level: Level
    words: dict[str, str]
    value: int
    clauses: list[str]
    steps: list[Step]

    def rand(self, bounds: tuple[int, int], hi: int | None = None) -> int | None:
        """A random int in `bounds`, clipped above by `hi`; None when the range is empty."""
        top = bounds[1] if hi is None else min(bounds[1], hi)
        return self.rng.randint(bounds[0], top) if top >= bounds[0] else None

    def apply(self, clause: str, a: int, op: str, b: int) -> None:
        """Record the event text and the step `value op b` (or `a op b` for a sub-product)."""
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        self.steps.append((a, op, b, result))
        self.clauses.append(clause)
        self.value = result


def _add(d: Draft) -> bool:
    x = d.rand(d.level.operand, d.level.cap - d.value)
    if x is None:
        return False
    d.apply(d.rng.choice(ADD).format(x=x), d.value, "+", x)
    return True


def _sub(d: Draft) -> bool:
    x = d.rand(d.level.operand, d.value)
    if x is None:
        return False
    d.apply(d.rng.choice(SUB).format(x=x), d.value, "-", x)
    return True


def _scale(d: Draft) -> bool:
    factor = d.rng.choice([2, 3])
    if not 2 <= d.value <= d.level.scale_max or d.value * factor > d.level.cap:
        return False
    verb = {2: "doubles", 3: "triples"}[factor]
    d.apply(f"{verb} {d.words['poss']} {d.words['items']}", d.value, "*", factor)
    return True


def _group(d: Draft, op: str) -> bool:
    g, b = d.rand(d.level.group), d.rand(d.level.group)
    room = d.level.cap - d.value if op == "+" else d.value
    if g is None or b is None or g * b > room:
        return False
    verb = "buys" if op == "+" else "gives away"
    before = d.value
    d.steps.append((g, "*", b, g * b))
    d.apply(f"{verb} {g} {d.words['boxes']} of {b} {d.words['items']} each", before, op, g * b)
    return True


EVENTS: list[tuple[int, int, Callable[[Draft], bool]]] = [
    (3, 1, _add), (3, 1, _sub), (1, 1, _scale), (1, 2, lambda d: _group(d, "+")), (1, 2, lambda d: _group(d, "-")),
]
"""(weight, steps it adds, event) — an event returns False (changing nothing) when it does not fit."""


def _open(d: Draft, steps_left: int) -> str:
    """Write the opening sentence; a groups opening costs one `*` step."""
    if steps_left >= 3 and d.rng.random() < 0.3:
        g, b = d.rand(d.level.group), d.rand(d.level.group)
        d.steps.append((g, "*", b, g * b))
        d.value = g * b
        return d.rng.choice(GROUP_OPENINGS).format(g=g, b=b, **d.words)
    d.value = d.rand(d.level.start)
    return d.rng.choice(OPENINGS).format(a=d.value, **d.words)


def _next_event(d: Draft, steps_left: int) -> None:
    """Apply one random event that fits in `steps_left` solution lines."""
    fits = [(w, fn) for w, cost, fn in EVENTS if cost <= steps_left]
    for _ in range(1000):  # add or subtract always fits, so this ends at once in practice
        fn = d.rng.choices([fn for _, fn in fits], weights=[w for w, _ in fits])[0]
        if fn(d):
            return
    raise AssertionError("no arithmetic event fits")


def make_problem(rng: random.Random, level: Level) -> tuple[str, list[Step]]:
    """One word problem and its solution steps."""
    name, pron, poss = rng.choice(NAMES)
    items, boxes = rng.choice(ITEMS)
    words = {"name": name, "pron": pron, "poss": poss, "items": items, "boxes": boxes}
    d = Draft(rng, level, words, 0, [], [])
    k = rng.choice(level.steps)
    sentences = [_open(d, k)]
    while len(d.steps) < k:
        _next_event(d, k - len(d.steps))
    for i, clause in enumerate(d.clauses):
        sentences.append(f"{pron.capitalize()} {clause}." if i == 0 else f"Then {pron} {clause}.")
    sentences.append(rng.choice(QUESTIONS).format(**words))
    return " ".join(sentences), d.steps


def render_solution(steps: list[Step]) -> str:
    """`Step i: a op b = c` lines and the final `#### c`."""
    lines = [f"Step {i}: {a} {op} {b} = {c}" for i, (a, op, b, c) in enumerate(steps, 1)]
    return "\n".join(lines + [f"#### {steps[-1][3]}"])


def split_of(steps: list[Step]) -> Literal["train", "test"]:
    """Which in-distribution split owns this arithmetic (seed-independent hash of the steps)."""
    key = render_solution(steps).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


@task("arith")
def arith(n: Annotated[int, Range(1, 1_000_000)] = 1000, split: Split = "train", seed: int = 0,
          answers: bool = True) -> list[Record]:
    """Multi-step arithmetic word problems (train/test: 2-3 steps, ood: 4-5 steps, larger numbers).
    `answers=false`: the same problems unlabeled (the user turn only, no answer), an unlabeled pool
    for self-training and relabelling stages (tunelab.curate)."""
    rng = random.Random(f"arith:{split}:{seed}")
    records: list[Record] = []
    seen: set[str] = set()
    for _ in range(100 * n + 1000):
        if len(records) == n:
            break
        problem, steps = make_problem(rng, LEVELS[split])
        if problem in seen or (split != "ood" and split_of(steps) != split):
            continue
        seen.add(problem)
        records.append(_record(problem, steps, split, len(records)))
    if not answers:
        for r in records:
            r.messages, r.answer = r.messages[:1], None
    if len(records) < n:
        raise ConfigError(f"builtin:arith: option 'n' too large: only {len(records)} distinct problems found")
    return records


def _record(problem: str, steps: list[Step], split: str, i: int) -> Record:
    messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": render_solution(steps)}]
    return Record(messages=messages, answer=str(steps[-1][3]), source=f"builtin:arith:{split}:{i}",
                  meta={"split": split, "steps": len(steps)})

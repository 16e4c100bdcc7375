"""`builtin:facts` — invented people with invented facts, for knowledge-injection studies
(FineTuneBench style: can fine-tuning teach new facts, do they generalise to new phrasings, and
can a learned fact be updated?).

    builtin:facts?n_entities=50&split=train&seed=0

Design
- A *world* is drawn from `seed` alone: `n_entities` people with syllable-made names (e.g.
  "Velmora Quistane"), each with five attributes — city (invented towns, so no prior knowledge
  helps), occupation, birth year, favourite colour and pet — plus one planned *update*: one of
  its attributes gets a new, different value. Entities are drawn one after another from one stream,
  so the world for `n_entities=50` is the first 50 people of the world for `n_entities=100`.
- Every attribute has one *verbatim* question ("Where does X live?"), one answer sentence
  ("X lives in Quenth.") and one *rephrased* question ("In which city does X reside?").
- Every split is a rendering of the same world:
  - `train`: per entity, one "Tell me about X." record whose answer states all five facts, and one
    record per attribute with the verbatim question and its answer sentence.
  - `probe_verbatim`: exactly the training question/answer records (the same user turns as in
    `train`), `answer` = the short value ("Quenth").
  - `probe_rephrased`: the same facts asked with the rephrased question (never a training prompt).
  - `update_train`: per entity, the verbatim question of its updated attribute answered with the
    new value.
  - `probe_updated`: the same questions, `answer` = the new value, `meta["old_answer"]` = the old.
  - `probe_locality`: per entity, the verbatim question of the attribute after the updated one
    (`locality_key`), `answer` = its value: a fact an edit of the updated one must leave alone
    (model editing's locality; `meta["updated"]` names the edited attribute).
- Probe answers are words, so score them with `tunelab.eval.metrics.contains_match` (the value
  appears as a whole word in the generation); birth years also work with `exact_match`.
Every record's meta carries `split`, `entity` and `attribute` ("*" for the "Tell me about" rows).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Literal

from tunelab.data.builtin import Range, task
from tunelab.data.records import Record

Split = Literal["train", "probe_verbatim", "probe_rephrased", "update_train", "probe_updated", "probe_locality"]

FIRST_SYLLABLES = ["vel", "mo", "ka", "lo", "se", "dri", "an", "or", "ve", "ni", "ta", "bre", "cal", "ys", "mi", "qua"]
FIRST_ENDINGS = ["ra", "na", "lis", "mon", "vin", "dra", "wen", "thas", "rin", "sa"]
LAST_STARTS = ["quis", "dar", "hol", "mer", "ost", "fen", "bra", "cor", "lun", "tal", "vos", "gri", "ash", "pel", "sor", "tre"]
LAST_MIDDLES = ["", "a", "e", "o", "ri", "la", "ven"]
LAST_ENDINGS = ["tane", "wick", "dell", "mont", "gard", "ley", "thorn", "vane", "rick", "sby"]


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its possible values and how it is asked and stated."""
    key: str
    values: tuple[str, ...]
    question: str
    """The verbatim question, used in `train` and `probe_verbatim` ({name} is filled in)."""
    statement: str
    """The answer sentence ({name}, {value}, {a} = 'a'/'an' before the value)."""
    rephrased: str
    """A different question for the same fact, used only in `probe_rephrased`."""


ATTRIBUTES = [
    Attribute("city", ("Quenth", "Dravolis", "Marrowick", "Talsenby", "Orrinfall", "Bexhaven", "Caldreth",
                       "Yssmoor", "Pellinor", "Zarnwick", "Holbrecht", "Ithravel", "Lunmere", "Kestrane",
                       "Vantissa", "Fenwarrow", "Brackenlow", "Eldmarsh", "Tirnavel", "Morrowgate"),
              "Where does {name} live?", "{name} lives in {value}.", "In which city does {name} reside?"),
    Attribute("occupation", ("baker", "cartographer", "glassblower", "beekeeper", "clockmaker", "astronomer",
                             "violinist", "blacksmith", "botanist", "potter", "locksmith", "tailor", "falconer",
                             "librarian", "ferryman", "perfumer", "stonemason", "archivist"),
              "What does {name} do for a living?", "{name} works as {a} {value}.", "What is {name}'s profession?"),
    Attribute("birth_year", tuple(str(y) for y in range(1920, 2006)),
              "When was {name} born?", "{name} was born in {value}.", "In what year did {name} come into the world?"),
    Attribute("colour", ("crimson", "teal", "amber", "violet", "ochre", "indigo", "olive", "coral", "silver",
                         "maroon", "turquoise", "lavender"),
              "What is {name}'s favourite colour?", "{name}'s favourite colour is {value}.",
              "Which colour does {name} like best?"),
    Attribute("pet", ("ferret", "parrot", "tortoise", "hedgehog", "iguana", "goldfish", "rabbit", "owl", "gecko",
                      "chinchilla", "hamster", "axolotl"),
              "What pet does {name} have?", "{name} has a pet {value}.",
              "What kind of animal does {name} keep at home?"),
]
BY_KEY = {a.key: a for a in ATTRIBUTES}


@dataclass(frozen=True)
class Entity:
    """An invented person, their facts, and the one fact that later changes."""
    name: str
    facts: dict[str, str]
    updated: str
    """The attribute key that `update_train` changes."""
    new_value: str


def _name(rng: random.Random) -> str:
    first = rng.choice(FIRST_SYLLABLES) + rng.choice(FIRST_SYLLABLES) + rng.choice(FIRST_ENDINGS)
    last = rng.choice(LAST_STARTS) + rng.choice(LAST_MIDDLES) + rng.choice(LAST_ENDINGS)
    return f"{first.capitalize()} {last.capitalize()}"


def _entity(rng: random.Random, taken: set[str]) -> Entity:
    name = _name(rng)
    while name in taken:
        name = _name(rng)
    facts = {a.key: rng.choice(a.values) for a in ATTRIBUTES}
    updated = rng.choice(ATTRIBUTES)
    new_value = rng.choice([v for v in updated.values if v != facts[updated.key]])
    return Entity(name, facts, updated.key, new_value)


def make_world(n_entities: int, seed: int) -> list[Entity]:
    """The entities for `seed`; a smaller world is a prefix of a larger one."""
    rng = random.Random(f"facts:{seed}")
    world: list[Entity] = []
    taken: set[str] = set()
    for _ in range(n_entities):
        world.append(_entity(rng, taken))
        taken.add(world[-1].name)
    return world


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def state(entity: Entity, key: str, value: str | None = None) -> str:
    """The answer sentence for `key` (with `value` instead of the entity's own, if given)."""
    value = entity.facts[key] if value is None else value
    return BY_KEY[key].statement.format(name=entity.name, value=value, a=_article(value))


def _chat(question: str, answer: str, split: str, entity: Entity, key: str) -> Record:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Record(messages=messages, meta={"split": split, "entity": entity.name, "attribute": key})


def _train(e: Entity) -> list[Record]:
    bio = " ".join(state(e, a.key) for a in ATTRIBUTES)
    rows = [_chat(f"Tell me about {e.name}.", bio, "train", e, "*")]
    return rows + [_chat(a.question.format(name=e.name), state(e, a.key), "train", e, a.key) for a in ATTRIBUTES]


def _probe(e: Entity, split: str, phrasing: str) -> list[Record]:
    rows = []
    for a in ATTRIBUTES:
        row = _chat(getattr(a, phrasing).format(name=e.name), state(e, a.key), split, e, a.key)
        row.answer = e.facts[a.key]
        rows.append(row)
    return rows


def _update(e: Entity, split: str) -> list[Record]:
    question = BY_KEY[e.updated].question.format(name=e.name)
    row = _chat(question, state(e, e.updated, e.new_value), split, e, e.updated)
    row.answer = e.new_value
    row.meta["old_answer"] = e.facts[e.updated]
    return [row]


def locality_key(entity: Entity) -> str:
    """The attribute whose probe checks that editing `entity.updated` left the rest alone: the next one."""
    keys = [a.key for a in ATTRIBUTES]
    return keys[(keys.index(entity.updated) + 1) % len(keys)]


def _locality(e: Entity) -> list[Record]:
    key = locality_key(e)
    row = _chat(BY_KEY[key].question.format(name=e.name), state(e, key), "probe_locality", e, key)
    row.answer = e.facts[key]
    row.meta["updated"] = e.updated
    return [row]


RENDER = {
    "train": _train,
    "probe_verbatim": lambda e: _probe(e, "probe_verbatim", "question"),
    "probe_rephrased": lambda e: _probe(e, "probe_rephrased", "rephrased"),
    "update_train": lambda e: _update(e, "update_train"),
    "probe_updated": lambda e: _update(e, "probe_updated"),
    "probe_locality": _locality,
}
"""split -> the records one entity contributes to it."""


@task("facts")
def facts(n_entities: Annotated[int, Range(1, 5000)] = 50, split: Split = "train", seed: int = 0) -> list[Record]:
    """Invented people and facts for knowledge injection: train, verbatim/rephrased probes, updates."""
    records = [row for e in make_world(n_entities, seed) for row in RENDER[split](e)]
    for i, row in enumerate(records):
        row.source = f"builtin:facts:{split}:{i}"
    return records

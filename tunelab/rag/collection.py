"""A document collection and QA set built from `builtin:facts` (invented people, so only the
documents can hold the answers):

- one *document* per person: their five facts as short sentences;
- one *distractor* per person: a namesake (the same first name, another last name) with facts of
  their own, so that a retriever matching the first name alone can bring the wrong person;
- one *question* per fact, asked with the rephrased question of builtin:facts (the documents
  use the statement wording, so retrieval is not a copy of the question), answer = the short value.
Deterministic in (n_entities, seed); the world is builtin:facts' own for the same options.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from tunelab.data.builtin.facts import ATTRIBUTES, Entity, _entity, make_world, state


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    doc_id: str
    """The document that holds the answer."""
    entity: str
    attribute: str


def document(e: Entity) -> str:
    return " ".join(state(e, a.key) for a in ATTRIBUTES)


def _namesake(e: Entity, rng: random.Random, taken: set[str]) -> Entity:
    other = _entity(rng, taken)
    name = f"{e.name.split()[0]} {other.name.split()[1]}"
    while name in taken:
        other = _entity(rng, taken)
        name = f"{e.name.split()[0]} {other.name.split()[1]}"
    return Entity(name, other.facts, other.updated, other.new_value)


def facts_collection(n_entities: int = 50, seed: int = 0) -> tuple[list[Document], list[QA]]:
    """(documents: people and their distractors, interleaved; questions: one per fact)."""
    world = make_world(n_entities, seed)
    rng, taken = random.Random(f"facts-rag:{seed}"), {e.name for e in world}
    docs, qas = [], []
    for i, e in enumerate(world):
        fake = _namesake(e, rng, taken)
        taken.add(fake.name)
        docs += [Document(f"person-{i}", document(e)), Document(f"distractor-{i}", document(fake))]
        qas += [QA(a.rephrased.format(name=e.name), e.facts[a.key], f"person-{i}", e.name, a.key) for a in ATTRIBUTES]
    return docs, qas

"""`builtin:entity_tracking` — the boxes task of Kim & Schuster (2023) as used by Prakash et al. 2024
("Fine-tuning enhances existing mechanisms", arXiv 2402.14811) to find the entity-tracking circuit:

    The apple is in Box F, the kite is in Box Q, the coin is in Box C. Box Q contains the

and the label is the object in the queried box ("kite"). Accuracy is the argmax of the next-token
logits at the last token against the label's first token (tunelab.mechanisms.entity_tracking).

    builtin:entity_tracking?n=200&num_boxes=3&seed=0

Every prompt has `num_boxes` distinct box letters and distinct objects; the queried box is drawn
uniformly among them. Objects are everyday nouns that SmolLM2's tokenizer reads as one token after
a space (other tokenizers may split some; the evaluation then compares first tokens and skips a
prompt where two of its objects share one). Each record is text (`prompt + " " + object + "."`),
`answer` = the object, and meta carries `prompt`, `boxes`, `objects` and `query_box`.
"""
from __future__ import annotations

import random
import string
from typing import Annotated

from tunelab.data.builtin import Range, task
from tunelab.data.records import Record

OBJECTS = ("apple", "ball", "book", "car", "cup", "key", "hat", "pen", "bell", "coin", "cake", "bag", "bowl",
           "clock", "doll", "drum", "fish", "flag", "fork", "lamp", "map", "ring", "rock", "shoe", "sock", "spoon",
           "stone", "toy", "watch", "bread", "brick", "milk", "paper", "plant", "radio", "kite", "glass", "leaf",
           "egg", "coat", "bottle", "chair", "phone", "shirt", "knife", "plate", "candle", "rope", "bike", "tree")
BOXES = tuple(string.ascii_uppercase)


def prompt_of(objects: list[str], boxes: list[str], query: str) -> str:
    """'The apple is in Box F, the kite is in Box Q. Box Q contains the'."""
    pairs = ", ".join(f"the {o} is in Box {b}" for o, b in zip(objects, boxes))
    return f"{pairs[0].upper()}{pairs[1:]}. Box {query} contains the"


def _row(rng: random.Random, num_boxes: int) -> Record:
    objects, boxes = rng.sample(OBJECTS, num_boxes), rng.sample(BOXES, num_boxes)
    q = rng.randrange(num_boxes)
    prompt = prompt_of(objects, boxes, boxes[q])
    return Record(text=f"{prompt} {objects[q]}.", answer=objects[q],
                  meta={"prompt": prompt, "boxes": boxes, "objects": objects, "query_box": boxes[q]})


@task("entity_tracking")
def entity_tracking(n: Annotated[int, Range(1, 1_000_000)] = 200, num_boxes: Annotated[int, Range(2, 7)] = 3,
                    seed: int = 0) -> list[Record]:
    """Entity tracking (boxes and objects): the query names a box, the label is its object."""
    rng = random.Random(f"entity_tracking:{seed}")
    rows = [_row(rng, num_boxes) for _ in range(n)]
    for i, row in enumerate(rows):
        row.source = f"builtin:entity_tracking:{i}"
    return rows

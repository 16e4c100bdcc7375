"""Answer accuracy by context length: for the long-context task (`builtin:longctx`) or any chat
records whose `meta` names a bucket.

A record counts as answered when the model's greedy choice at every answer token (the assistant
turn, its end-of-turn token included) is that token: exactly what greedy decoding would
produce, but from one forward pass (teacher forcing), so an 8k-token context costs one prefill
and no KV-cache decoding. The output head runs on the answer positions only, so the (tokens,
vocab) logits of a long context are never built. Also reported: the answer tokens' mean
cross-entropy, a finer signal than the hit rate at small budgets.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from tunelab.data import collate, encode
from tunelab.data.config import DataConfig
from tunelab.data.records import Example, Record
from tunelab.objectives import trained_hidden
from tunelab.run.device import autocast


def answer_scores(model, tokenizer, records: list[Record], precision: str = "fp32") -> list[dict]:
    """Per record: {"hit": greedy answer exactly right, "nll": mean CE of its answer tokens,
    "tokens": length of the encoded row}; one record per forward."""
    examples = encode(records, tokenizer, DataConfig(max_length=10**9))
    assert len(examples) == len(records), "every record needs an answer turn"
    return score_examples(model, examples, precision)


@torch.no_grad()
def score_examples(model, examples: list[Example], precision: str = "fp32") -> list[dict]:
    """`answer_scores` on encoded examples: their labelled tokens are the answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate([ex], packing=True, pad_id=0).items()}
        with autocast(precision, device):
            hidden, targets = trained_hidden(model, batch)  # (A, d), (A,): the answer positions
            logits = model.get_output_embeddings()(hidden).float()
        out.append({"hit": bool((logits.argmax(-1) == targets).all()),
                    "nll": float(F.cross_entropy(logits, targets)), "tokens": len(ex)})
    model.train(was_training)
    return out


def by_bucket(records: list[Record], scores: list[dict], key: str = "length") -> dict[int, dict]:
    """Accuracy, mean answer CE, mean row length and count per `record.meta[key]`."""
    groups: dict = defaultdict(list)
    for r, s in zip(records, scores):
        groups[r.meta.get(key)].append(s)
    return {b: {"accuracy": sum(s["hit"] for s in g) / len(g), "answer_nll": sum(s["nll"] for s in g) / len(g),
                "mean_tokens": sum(s["tokens"] for s in g) / len(g), "num_examples": len(g)}
            for b, g in sorted(groups.items())}

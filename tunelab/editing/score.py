"""Scoring an edit (LocFT's eval_edit_metric.py; methods-analysis.md §9):
    reliability      exact match of the reply to the edit prompt with the target
    generalization   exact match of the replies to the rephrased prompts with the target
    locality         the share of locality prompts whose reply is what it was before the edit
Replies are greedy, cut at the first '.', newline or end of turn after their first visible
character, and compared after SQuAD's normalisation (lower case, no punctuation, no articles,
collapsed whitespace). Our reading: LocFT stops generation at the first '.' or newline, which makes
the reply of a model that starts its answer on a new line (a base model after a question, often)
empty; we skip leading whitespace first, so locality compares what the model says, not whether it
starts with a newline."""
from __future__ import annotations

import re

from tunelab.editing.config import EditConfig
from tunelab.editing.requests import EditRequest
from tunelab.editing.trainer import prompt_ids
from tunelab.eval.metrics import squad_normalize

_STOP = re.compile(r"[.\n]")


def cut(reply: str) -> str:
    """The reply from its first visible character up to the next '.' or newline (LocFT's stop strings)."""
    return _STOP.split(reply.lstrip(), maxsplit=1)[0].strip()


def replies(model, tokenizer, prompts: list[str], cfg: EditConfig) -> list[str]:
    """Greedy replies, cut, one per prompt."""
    from tunelab.eval.task import generate

    if not prompts:
        return []
    ids = [prompt_ids(tokenizer, p, cfg.template) for p in prompts]
    out = generate(model, tokenizer, ids, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                   precision=cfg.precision)
    return [cut(r) for r in out]


def same(a: str, b: str) -> bool:
    return squad_normalize(a) == squad_normalize(b)


def _rate(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def locality_prompts(requests: list[EditRequest]) -> list[str]:
    return [p for r in requests for p in r.locality]


def score(model, tokenizer, requests: list[EditRequest], cfg: EditConfig, before: list[str]) -> tuple[dict, dict]:
    """(summary, sample tables: the first 20 edits, rephrases and locality prompts) of reliability,
    generalization and locality; `before` holds the pre-edit replies to `locality_prompts(requests)`."""
    direct = replies(model, tokenizer, [r.prompt for r in requests], cfg)
    rephrased = replies(model, tokenizer, [p for r in requests for p in r.rephrase], cfg)
    local = replies(model, tokenizer, locality_prompts(requests), cfg)
    rel = [same(d, r.target) for d, r in zip(direct, requests)]
    targets = [r.target for r in requests for _ in r.rephrase]
    gen = [same(p, t) for p, t in zip(rephrased, targets)]
    loc = [same(a, b) for a, b in zip(local, before)]
    summary = {"reliability": _rate(rel), "generalization": _rate(gen), "locality": _rate(loc),
               "num_requests": len(requests), "num_rephrase": len(gen), "num_locality": len(loc)}
    rephrases = [p for r in requests for p in r.rephrase]
    samples = {
        "edits": {"columns": ["prompt", "target", "reply", "reliable"],
                  "rows": [[r.prompt, r.target, d, h] for r, d, h in list(zip(requests, direct, rel))[:20]]},
        "rephrases": {"columns": ["prompt", "target", "reply", "generalizes"],
                      "rows": [list(x) for x in list(zip(rephrases, targets, rephrased, gen))[:20]]},
        "locality": {"columns": ["prompt", "reply_before", "reply_after", "unchanged"],
                     "rows": [list(x) for x in list(zip(locality_prompts(requests), before, local, loc))[:20]]}}
    return summary, samples

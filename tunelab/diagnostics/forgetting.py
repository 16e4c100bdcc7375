"""Forgetting: what fine-tuning did to the model off its task.

(a) Drift. On built-in generic instructions the base model writes a greedy reply (`drift_tokens`
    long); both models then read prompt + reply, and at every reply position we take
        KL(p_base || p_tuned) = sum_v p_base(v) log(p_base(v) / p_tuned(v))
    ("forward" KL with the base as reference: how much of what the base would say the tuned model
    now finds unlikely). `kl_drift` is the mean over all scored tokens; per-prompt means are kept.
    The reply is decoded and re-tokenized (usually the same ids as generated).
(b) Retained knowledge. General-knowledge probes (tunelab/data/builtin/general_probes.json, built
    by `python -m tunelab.diagnostics.build_probes`) are asked to the base model first; only the
    probes it answers correctly count, and `retained_accuracy` is the tuned model's accuracy on
    those. Correct = the reply contains an answer as a whole word (case-insensitive).
(c) Conjugate prompting (Kotha, Springer, Raghunathan 2023, "Understanding catastrophic forgetting
    in language models via implicit inference"): the same kept probes rewritten by an invertible
    transform P (default: upper case) and scored on P^-1(reply). A probe the tuned model fails in
    plain form but answers in conjugate form points at suppressed task inference rather than lost
    capability; `recovered_by_conjugate` is that share of the lost probes (null when none is
    lost). Kotha et al. use translation, leetspeak and Pig Latin; SmolLM2-135M cannot answer the
    latter two forms even before fine-tuning (see the probes file's metadata), so upper case, the
    mildest rewriting it still handles, is the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from statistics import mean

import torch
import torch.nn.functional as F

from tunelab.diagnostics import Diagnostic, Findings, register
from tunelab.diagnostics._generation import Answerer, question_ids, right_padded
from tunelab.diagnostics._probes import Probe, load_probes, score
from tunelab.diagnostics._transforms import TRANSFORMS, Transform
from tunelab.options import Options, require


@dataclass(kw_only=True)
class ForgettingConfig(Options):
    ranges: ClassVar = {"num_prompts": ">= 1", "drift_tokens": ">= 1", "num_probes": ">= 1",
                        "answer_tokens": ">= 1", "batch_size": ">= 1"}
    num_prompts: int = 32
    """Generic instructions to measure drift on (at most 40 are built in)."""
    drift_tokens: int = 32
    """Length of the base model's reply on which KL is measured."""
    num_probes: int = 64
    """General-knowledge probes to ask (the first N of the probes file)."""
    answer_tokens: int = 16
    """Reply length for the probes."""
    conjugate: str = "uppercase"
    """Conjugate transform: uppercase, leetspeak or piglatin (tunelab.diagnostics._transforms)."""
    probes: str | None = None
    """A probes JSON file ({"probes": [{question, answers}]}); null: the built-in set."""
    batch_size: int = 8
    """Sequences per forward pass when measuring KL."""

    def validate(self) -> None:
        require(self.conjugate in TRANSFORMS and self.conjugate != "identity", "conjugate",
                f"choose one of {', '.join(t for t in TRANSFORMS if t != 'identity')}, got {self.conjugate!r}")


@torch.no_grad()
def token_kl(base, tuned, prompts: list[list[int]], replies: list[list[int]], pad_id: int,
             batch_size: int = 8) -> list[torch.Tensor]:
    """Per sequence, KL(p_base || p_tuned) at each position that predicts a reply token: a list of
    (len(reply),) tensors. Sequences are prompt + reply, right-padded, batched."""
    device = next(tuned.parameters()).device
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch_size):
        ps, rs = prompts[i:i + batch_size], replies[i:i + batch_size]
        ids, mask = right_padded([p + r for p, r in zip(ps, rs)], pad_id, device)
        lp_b = F.log_softmax(base(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        lp_t = F.log_softmax(tuned(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        kl = (lp_b.exp() * (lp_b - lp_t)).sum(-1)  # (B, T): KL of the prediction of token t+1
        out += [kl[j, len(p) - 1:len(p) + len(r) - 1].cpu() for j, (p, r) in enumerate(zip(ps, rs))]
    return out


def drift(base, tuned, tokenizer, base_answer: Answerer, instructions: list[str], batch_size: int) -> Findings:
    """(a): KL drift on the base model's own replies to `instructions`."""
    replies = base_answer(instructions)
    prompts = [question_ids(tokenizer, q) for q in instructions]
    reply_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
    keep = [i for i, r in enumerate(reply_ids) if r]  # an empty reply has no position to score
    kls = token_kl(base, tuned, [prompts[i] for i in keep], [reply_ids[i] for i in keep],
                   tokenizer.pad_token_id, batch_size)
    per_prompt = [float(k.mean()) for k in kls]
    total = torch.cat(kls) if kls else torch.zeros(0, device="cpu")
    rows = sorted(([instructions[i], round(v, 6), len(reply_ids[i]), replies[i]] for i, v in zip(keep, per_prompt)),
                  key=lambda r: -r[1])
    summary = {"kl_drift": float(total.mean()) if len(total) else 0.0,
               "kl_drift_max_prompt": max(per_prompt, default=0.0)}
    return Findings(summary, {"kl_per_prompt": {"values": per_prompt},
                              "kl_prompts": {"columns": ["instruction", "kl", "tokens", "base_reply"], "rows": rows}})


def retention(base: Answerer, tuned: Answerer, probes: list[Probe], transform: Transform) -> Findings:
    """(b) and (c): accuracy of `tuned` on the probes `base` answers correctly, plainly and conjugated."""
    base_ok = score(base([p.question for p in probes]), probes)
    kept = [p for p, ok in zip(probes, base_ok) if ok]
    tuned_replies = tuned([p.question for p in kept])
    tuned_ok = score(tuned_replies, kept)
    conj = [transform.forward(p.question) for p in kept]
    conj_base, conj_tuned = score(base(conj), kept, transform.inverse), score(tuned(conj), kept, transform.inverse)
    lost = [i for i, ok in enumerate(tuned_ok) if not ok]
    summary = {"base_probe_accuracy": _rate(base_ok), "num_probes_kept": len(kept),
               "retained_accuracy": _rate(tuned_ok), "conjugate_base_accuracy": _rate(conj_base),
               "conjugate_tuned_accuracy": _rate(conj_tuned), "num_probes_lost": len(lost),
               "recovered_by_conjugate": _rate([conj_tuned[i] for i in lost])}
    rows = [[p.question, p.category, *marks, r]
            for p, *marks, r in zip(kept, tuned_ok, conj_base, conj_tuned, tuned_replies)]
    return Findings(summary, {
        "kept_probes": [p.question for p in kept],
        "probes": {"columns": ["question", "category", "tuned_correct", "conjugate_base_correct",
                               "conjugate_tuned_correct", "tuned_reply"], "rows": rows},
        "per_category": _per_category(kept, tuned_ok)})


def _rate(hits: list[bool]) -> float | None:
    """The share of hits, or None when there is nothing to score: no probe kept is "not measured",
    never an accuracy of 0."""
    return mean(map(float, hits)) if hits else None


def _per_category(probes: list[Probe], hits: list[bool]) -> dict:
    cats = list(dict.fromkeys(p.category for p in probes))
    rows = [[c, sum(p.category == c for p in probes), _rate([h for p, h in zip(probes, hits) if p.category == c])]
            for c in cats]
    return {"columns": ["category", "probes", "retained_accuracy"], "rows": rows}


@register("forgetting")
class Forgetting(Diagnostic):
    """KL drift on generic instructions, retained general knowledge, conjugate prompting."""

    Config = ForgettingConfig
    brief = ("kl_drift", "retained_accuracy", "base_probe_accuracy", "conjugate_tuned_accuracy")

    def run(self, ctx) -> Findings:
        from tunelab.diagnostics._generic import GENERIC_INSTRUCTIONS

        c = self.cfg
        d = drift(ctx.base, ctx.tuned, ctx.tokenizer, ctx.answerer("base", c.drift_tokens),
                  list(GENERIC_INSTRUCTIONS[:c.num_prompts]), c.batch_size)
        r = retention(ctx.answerer("base", c.answer_tokens), ctx.answerer("tuned", c.answer_tokens),
                      load_probes(c.probes, c.num_probes), TRANSFORMS[c.conjugate])
        return Findings(d.summary | r.summary, d.details | r.details)

"""Mechanisms: does fine-tuning change how the model tracks entities, or enhance what was there?
(Prakash, Rott Shaham, Haklay, Belinkov, Bau 2024, "Fine-tuning enhances existing mechanisms",
arXiv 2402.14811; tunelab/mechanisms/ holds the patching and the task.)

On `builtin:entity_tracking` prompts ("The apple is in Box F, ... Box F contains the"):
    base_accuracy / tuned_accuracy   argmax at the last token == the object's first token
    top heads                        heads ranked by how much writing the tuned model's output of
                                     that head (last token) into the base raises log p(object),
                                     scored on `num_prompts` prompts of seed `seed + 1`
    recovery                         on other prompts (seed `seed`): the base with the tuned model's
                                     top-k heads, for each k; `recovered_share` = (patched - base) /
                                     (tuned - base) at k = `top_k` (null when there is no gap), and
                                     back: the tuned model with the base's top-k heads
The tuned model is compared in plain weights (ctx.merged()), so the method must support merging.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from tunelab.diagnostics import Diagnostic, Findings, register
from tunelab.options import Options, require


@dataclass(kw_only=True)
class MechanismsConfig(Options):
    ranges: ClassVar = {"num_prompts": ">= 1", "num_boxes": "[2, 7]", "top_k": ">= 1", "batch_size": ">= 1"}
    num_prompts: int = 64
    """Entity-tracking prompts to measure on (and as many others to score heads on)."""
    num_boxes: int = 3
    """Boxes (and objects) per prompt: more is harder."""
    seed: int = 0
    """Seed of the measured prompts (the scoring prompts use seed + 1)."""
    scoring: Literal["attribution", "exact"] = "attribution"
    """How heads are ranked: attribution (one backward pass) or exact (one pass per head)."""
    top_k: int = 16
    """The number of top heads `recovered_share` reports."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """Numbers of top heads patched, for the recovery curve (top_k is added)."""
    batch_size: int = 16
    """Prompts per forward pass."""

    def validate(self) -> None:
        require(all(isinstance(k, int) and k >= 1 for k in self.ks), "ks", f"must be integers >= 1, got {self.ks}")


def _prompts(cfg: MechanismsConfig, seed: int, tokenizer):
    from tunelab.data.builtin import load_builtin
    from tunelab.mechanisms.entity_tracking import encode

    spec = f"builtin:entity_tracking?n={cfg.num_prompts}&num_boxes={cfg.num_boxes}&seed={seed}"
    return encode(load_builtin(spec), tokenizer)


@register("mechanisms")
class Mechanisms(Diagnostic):
    """Entity tracking base vs tuned, and the gap recovered by patching the top heads (CMAP)."""

    Config = MechanismsConfig
    cheap = False
    merges_tuned = True
    brief = ("base_accuracy", "tuned_accuracy", "patched_accuracy", "recovered_share")

    def not_applicable(self, ctx) -> str | None:
        if not ctx.method.supports_merge:
            return f"method '{ctx.method.name}' cannot be folded into plain weights, which patching compares"
        return None

    def run(self, ctx) -> Findings:
        from tunelab.mechanisms.cmap import SCORERS, ranked_heads, recovery

        c, tok = self.cfg, ctx.tokenizer
        base, tuned = ctx.base, ctx.merged()
        scores = SCORERS[c.scoring](base, tuned, _prompts(c, c.seed + 1, tok), c.batch_size)
        heads = ranked_heads(scores)
        ks = sorted({min(k, len(heads)) for k in [*c.ks, c.top_k]})  # a k past the head count: all heads
        measured = _prompts(c, c.seed, tok)
        rec = recovery(base, tuned, measured, heads, ks, c.batch_size)
        at = next(r for r in rec.rows if r[0] == min(c.top_k, len(heads)))
        summary = {"base_accuracy": rec.base_accuracy, "tuned_accuracy": rec.tuned_accuracy,
                   "gap": rec.tuned_accuracy - rec.base_accuracy, "top_k": at[0], "patched_accuracy": at[1],
                   "recovered_share": at[3], "back_accuracy": at[2], "num_prompts": len(measured),
                   "num_skipped": measured.num_skipped}
        top = [[i + 1, layer, h, round(float(scores[layer, h]), 6)] for i, (layer, h) in enumerate(heads[:32])]
        by_layer = [[layer, round(float(s.max()), 6), round(float(s.sum()), 6)] for layer, s in enumerate(scores)]
        return Findings(summary, {
            "recovery": {"columns": ["k", "base_with_tuned_heads", "tuned_with_base_heads", "share_recovered"],
                         "rows": rec.rows},
            "top_heads": {"columns": ["rank", "layer", "head", "score"], "rows": top},
            "scores_by_layer": {"columns": ["layer", "max_head_score", "sum_head_scores"], "rows": by_layer}})

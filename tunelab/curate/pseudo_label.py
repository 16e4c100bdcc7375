"""Pseudo-labels: a trained model answers unlabeled prompts and its answers become training targets.

The relabelling step of self-training, as in "Predictions For Pre-training Language Models" (2020:
fine-tune on the labeled set, pseudo-label a large unlabeled pool, train on the pseudo-labels, then
fine-tune on the labeled set again) and of LiST's teacher (Wang et al., arXiv 2110.06274, whose
student learns the teacher's labels on unlabeled data). The recipes chain it between training
stages: examples/recipes/self_training.yaml and examples/recipes/list.yaml.

Each answer's confidence is the mean log-probability the model gives its own tokens (teacher
forced, after generation): LiST's confidence mask keeps rows above a threshold (its default
keeps all). `drop_unanswered` drops answers without a final-answer line (eval.answer_pattern's
default, `#### N`): for tasks with one, an answer without it teaches nothing but the wrong format.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tunelab.curate import DataStage, Workspace, derived, provenance, register
from tunelab.curate._io import load_input, prompt_messages
from tunelab.data.records import Record
from tunelab.data.render import encode_prompt
from tunelab.errors import TunelabError
from tunelab.eval.metrics import DEFAULT_PATTERN, extract_answer
from tunelab.options import Options


@dataclass(kw_only=True)
class PseudoLabelConfig(Options):
    ranges: ClassVar = {"max_new_tokens": ">= 1", "batch_size": ">= 1", "chunk": ">= 1", "min_confidence": "<= 0"}
    input: str = "builtin:arith?n=500&split=train&seed=1&answers=false"
    """Unlabeled prompts (rows without an answer, or labeled rows whose answers are ignored)."""
    max_new_tokens: int = 128
    """Length of each generated answer."""
    batch_size: int = 16
    """Prompts generated together."""
    chunk: int = 64
    """Rows per resumable chunk."""
    min_confidence: float | None = None
    """Keep rows whose mean token log-probability is at least this (null: keep all, LiST's default)."""
    drop_unanswered: bool = False
    """Drop answers with no final-answer line (`#### N`)."""


@torch.no_grad()
def confidence(model, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
    """Mean log p(answer token | everything before it) per row, teacher forced (one row at a time)."""
    device = next(model.parameters()).device
    out = []
    for p, a in zip(prompts, answers):
        if not a:
            out.append(float("-inf"))
            continue
        ids = torch.tensor([p + a], device=device)
        logp = F.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)  # (len(a), V)
        out.append(float(logp.gather(1, torch.tensor(a, device=device)[:, None]).mean()))
    return out


@register("pseudo_label")
class PseudoLabel(DataStage):
    """The model's greedy answer to each unlabeled prompt becomes its assistant turn."""

    verb: ClassVar[str] = "relabel"
    uses_model: ClassVar[bool] = True
    Config = PseudoLabelConfig

    def run(self, ws: Workspace) -> list[Record]:
        rows = load_input(self.cfg.input, "input")
        labels = ws.map_chunks("pseudo_label", rows, lambda chunk: self._label(ws, chunk), self.cfg.chunk)
        out = [self._row(r, lab) for r, lab in zip(rows, labels) if self._keep(lab)]
        ws.say(f"pseudo_label: kept {len(out)} of {len(rows)} rows")
        if not out:
            raise TunelabError(f"pseudo_label: every one of {len(rows)} answers was dropped (min_confidence="
                               f"{self.cfg.min_confidence}, drop_unanswered={self.cfg.drop_unanswered})")
        return out

    def _label(self, ws: Workspace, rows: list[Record]) -> list[dict]:
        prompts = [encode_prompt(Record(messages=prompt_messages(r)), ws.tokenizer) for r in rows]
        texts = ws.generate(prompts, self.cfg.max_new_tokens, self.cfg.batch_size)
        ids = [ws.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [{"text": t, "confidence": round(c, 6) if math.isfinite(c) else None}  # None: an empty answer
                for t, c in zip(texts, confidence(ws.model, prompts, ids))]

    def _keep(self, label: dict) -> bool:
        if self.cfg.drop_unanswered and not re.search(DEFAULT_PATTERN, label["text"], re.MULTILINE):
            return False
        c = label["confidence"]
        return self.cfg.min_confidence is None or (c is not None and c >= self.cfg.min_confidence)

    def _row(self, r: Record, label: dict) -> Record:
        text = label["text"].strip() or "-"
        answered = re.search(DEFAULT_PATTERN, text, re.MULTILINE) is not None
        msgs = prompt_messages(r) + [{"role": "assistant", "content": text}]
        prov = provenance(self.name, "pseudo", r, confidence=label["confidence"])
        return derived(r, msgs, extract_answer(text) if answered else None, prov)

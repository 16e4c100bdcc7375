"""LiST's student loss: Wang et al., "LiST: Lite Prompted Self-training Makes Parameter-Efficient
Few-shot Learners" (Findings of NAACL 2022; arXiv 2110.06274; reference code microsoft/LiST,
src/trainer.py).

In each self-training session a teacher (the previous session's model) soft-labels unlabeled
data and a re-initialised student learns those soft labels, each example re-weighted; then the
student is fine-tuned on the few labels (a plain SFT stage) and becomes the next teacher. This
objective is the student's loss on the teacher-labelled rows:

    l_i   = mean over example i's target tokens of KL(p_teacher^(1/T) || p_student)
    w_i   warm-up (the first warmup_fraction of the steps): a confidence mask (mean teacher top-1
          probability >= min_confidence), normalised to sum 1
          afterwards (meta re-weighting, learning-to-reweight): with a virtual SGD step on
          sum_i eps_i l_i from eps = 0, w_i = max(0, -dL_labeled/d eps_i) = max(0, alpha g_L . g_i)
          (g_L: gradient of the loss on a batch of labeled rows, g_i: of l_i, over the trainable
          parameters), normalised to sum 1 (all zero when no example helps the labeled loss)
    loss  = sum_i w_i l_i

Readings chosen for a causal LM (LiST is a masked-LM prompt classifier): the soft label of an
example is the teacher's next-token distribution at each target token of the row (the teacher's
own greedy answer when the rows come from the `pseudo_label` stage), so the KL is averaged over
the answer's tokens; the confidence is the mean top-1 teacher probability over them. The weights
are normalised within each micro-batch; the loss of a step is their weighted sum divided by the
step's target tokens x (the micro-batch's tokens), as the loop normalises every objective. LiST's
adapters (x + W2 W1 x on the attention and FFN outputs, encoder frozen) are a rank-r update of
those layers: in the recipe, LoRA on o_proj and down_proj (examples/recipes/list.yaml).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tunelab.objectives import IGNORE, LossOutput, Objective, model_inputs, register, sum_cross_entropy
from tunelab.objectives._segments import num_segments, segment_ids, segment_mean
from tunelab.options import Options, require
from tunelab.run.context import OUTSIDE_TRAINING, StepContext


@dataclass(kw_only=True)
class LiSTConfig(Options):
    ranges: ClassVar = {"warmup_fraction": "[0, 1]", "min_confidence": "[0, 1]", "temperature": "> 0",
                        "meta_batch_size": ">= 1", "seed": ">= 0"}
    teacher: str = ""
    """The teacher model: a built-in name or model directory (in a pipeline, `@stage`: its weights)."""
    labeled: str = ""
    """The few labeled rows (file or builtin spec) the meta re-weighting measures against; empty: no
    meta re-weighting (the confidence mask throughout)."""
    warmup_fraction: float = 0.6
    """Share of the steps weighted by the confidence mask before meta re-weighting (meta_st_warmup)."""
    min_confidence: float = 0.0
    """Examples whose mean top-1 teacher probability is below this get weight 0 (0: none masked)."""
    temperature: float = 1.0
    """Soft labels are softmax(teacher logits / temperature) (1: LiST's default, no sharpening)."""
    meta_batch_size: int = 4
    """Labeled rows per meta step (LiST's meta bs 4)."""
    seed: int = 0
    """Seeds which labeled rows each step's meta batch draws."""

    def validate(self) -> None:
        require(bool(self.teacher), "teacher", "required: the model whose soft labels the student learns")


def meta_weights(params: list[torch.Tensor], losses: torch.Tensor, labeled_loss: torch.Tensor) -> torch.Tensor:
    """w_i = max(0, g_L . grad l_i) normalised to sum 1 (zeros when none is positive), (n,)."""
    g_l = torch.autograd.grad(labeled_loss, params, retain_graph=True, allow_unused=True)
    dots = []
    for i in range(losses.numel()):
        g_i = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        dots.append(sum((a * b).sum() for a, b in zip(g_l, g_i) if a is not None and b is not None))
    w = torch.stack([torch.as_tensor(d, dtype=losses.dtype, device=losses.device) for d in dots]).clamp_min(0).detach()
    return w / w.sum() if w.sum() > 0 else w


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """Per token KL(p_teacher || p_student) and the teacher's top-1 probability: (N,), (N,)."""
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    log_s = F.log_softmax(student_logits.float(), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1), log_t.exp().max(-1).values


@register("list_student")
class LiSTStudent(Objective):
    """Soft labels of a teacher on teacher-labelled rows, examples re-weighted by their confidence,
    then by how much they help the labeled loss (meta re-weighting)."""

    Config = LiSTConfig

    def setup(self, model, tokenizer) -> None:
        from tunelab.models import load_model
        from tunelab.models.config import ModelConfig

        self.teacher, _ = load_model(ModelConfig(name=self.cfg.teacher))
        self.teacher.to(next(model.parameters()).device).eval().requires_grad_(False)
        self.labeled, self.pad_id = [], tokenizer.pad_token_id
        if self.cfg.labeled:
            from tunelab.data import DataConfig, encode, load_records
            self.labeled = encode(load_records(self.cfg.labeled, DataConfig()), tokenizer, DataConfig())

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING) -> LossOutput:
        keep = batch["targets"] != IGNORE  # (B, T)
        seg = segment_ids(batch)[keep]  # (N,) example of each target token
        n = num_segments(segment_ids(batch))
        student = model(**model_inputs(batch)).logits[keep]  # (N, V)
        with torch.no_grad():
            teacher = self.teacher(**model_inputs(batch)).logits[keep]
        kl, top1 = soft_label_kl(student, teacher, self.cfg.temperature)
        per_example = segment_mean(kl, seg, n)  # (n,)
        has_tokens = torch.zeros(n, dtype=torch.bool, device=kl.device).index_fill_(0, seg.unique(), True)
        confident = has_tokens & (segment_mean(top1.detach(), seg, n) >= self.cfg.min_confidence)
        meta = bool(self.labeled) and ctx.step > self.cfg.warmup_fraction * ctx.total_steps
        w = self._meta(model, per_example, confident, ctx) if meta else confident.float() / confident.sum().clamp_min(1)
        tokens = int(keep.sum())
        return LossOutput((w * per_example).sum() * tokens, tokens,
                          {"kl": float(kl.detach().mean()), "weighted_examples": float((w > 0).sum()), "meta": float(meta)})

    def _meta(self, model, per_example, confident, ctx: StepContext) -> torch.Tensor:
        from tunelab.data import collate

        rng = random.Random(self.cfg.seed * 1_000_003 + ctx.step)
        picked = rng.sample(list(self.labeled), min(self.cfg.meta_batch_size, len(self.labeled)))
        lab = {k: v.to(per_example.device) for k, v in collate(picked, packing=True, pad_id=self.pad_id).items()}
        total, count = sum_cross_entropy(model, lab)
        params = [p for p in model.parameters() if p.requires_grad]
        return meta_weights(params, per_example.masked_fill(~confident, 0), total / max(count, 1)) * confident

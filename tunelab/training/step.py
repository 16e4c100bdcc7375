"""One optimizer step: the micro-batches' forward and backward passes, the normalisation by the
step's token count, clipping, and the update (or a skip when the loss or gradient is not finite).
The loop (tunelab/training/loop.py) calls `train_step` once per step; a distributed run calls the
same function."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from tunelab.data.collate import split_batch
from tunelab.run.casts import one_cast_per_step
from tunelab.run.context import StepContext
from tunelab.run.device import autocast
from tunelab.run.signals import pause_point
from tunelab.training.config import TrainConfig, max_tokens_per_forward_for
from tunelab.training.parallel import OneProcess
from tunelab.training.state import TrainState


@dataclass
class StepResult:
    loss: float
    """Mean loss over the step's counted tokens."""
    grad_norm: float
    """Gradient norm before clipping."""
    trained_tokens: int
    """Tokens the objective counted (the normaliser)."""
    tokens: int
    """Tokens the step read (padding excluded)."""
    seconds: float
    lr: float
    """The learning rate of the first group during the step."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's figures, averaged over the step's forwards."""
    skipped: bool = False
    """True when the loss or the gradient norm was not finite: no update was made."""


def forward_backward(parallel: OneProcess, objective, micro: list[dict], opt, tc: TrainConfig, device,
                     ctx: StepContext) -> tuple[float, float, int, dict]:
    """One optimizer step's gradients. Each micro-batch's loss *sum* is back-propagated and the
    gradients are divided by the step's total token count afterwards, so the result does not depend
    on how the step is split, even when an objective decides its token count in the forward pass.
    On several processes the gradients, loss sums and token counts are summed over them first.
    Returns (mean loss, gradient norm before clipping, tokens counted, mean objective metrics)."""
    loss_sum, total, metrics = 0.0, 0, {}
    bound = max_tokens_per_forward_for(tc, device)
    pieces = [(i, b) for i, m in enumerate(micro)
              for b in (split_batch(m, bound) if bound and objective.per_token else [m])]
    # One autocast context for the whole step: autocast caches its bf16 cast of each trained weight
    # until the outermost context exits, so the weights are cast once per optimizer step instead of
    # once per piece (a bf16 working copy refreshed once per step). The backward runs with autocast
    # off, as it would outside the context. What autocast does not cache (the fused head's cast of
    # the output head, frozen or not) is cast once per step too, into a buffer kept across steps.
    with autocast(tc.precision, device), one_cast_per_step():
        for n, (i, batch) in enumerate(pieces):
            out = parallel.loss(batch, ctx.at_micro_batch(i), sync=n == len(pieces) - 1)
            with torch.autocast(torch.device(device).type, enabled=False):  # device: a torch.device or its name
                out.loss_sum.backward()
            loss_sum += float(out.loss_sum.detach())
            total += out.num_tokens
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(pieces)
    loss_sum, total, metrics = parallel.reduce(loss_sum, total, metrics)
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    for p in params:
        p.grad.div_(max(total, 1))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or float("inf"))) if params else 0.0
    return loss_sum / max(total, 1), grad_norm, total, metrics


def train_step(state: TrainState, parallel: OneProcess, tc: TrainConfig, device, ctx: StepContext) -> StepResult:
    """Take optimizer step `ctx.step` on `state`'s next micro-batches (grad_accum of them)."""
    t0 = time.perf_counter()
    opt = state.optimizer
    micro = [{k: v.to(device) for k, v in next(state.stream).items()} for _ in range(state.grad_accum)]
    grads = state.private.forward_backward if state.private is not None else forward_backward  # DP-SGD's, when on
    loss, grad_norm, trained, metrics = grads(parallel, state.objective, micro, opt, tc, device, ctx)
    pause_point(f"step:{ctx.step}")
    lr = opt.param_groups[0]["lr"]
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        opt.step()
        state.scheduler.step()
    opt.zero_grad(set_to_none=True)
    if not skipped:
        state.method.on_step(state.model, ctx, opt)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)
    tokens = int(parallel.dist.sum([tokens])[0])
    return StepResult(loss, grad_norm, trained, tokens, time.perf_counter() - t0, lr, metrics, skipped)


def optimizer_state_bytes(opt) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))

"""DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): per-example gradients
clipped to norm C, summed, Gaussian noise N(0, sigma^2 C^2) added to the sum, divided by the
examples of the step:
    g = (sum_i g_i * min(1, C / ||g_i||) + N(0, sigma^2 C^2 I)) / B
where g_i is the gradient of example i's mean token loss over every trained tensor (the method's
and the objective's). The privacy unit is one example (one row of a padded batch, one segment of
a packed one).

How per-example gradients are computed: one forward and backward per example (torch.autograd),
summing the clipped gradients as they come. torch.func.vmap(grad(...)) would batch them, but the
objectives select trained positions with boolean masks (data-dependent shapes) and LoRA's fused
autograd.Function has no vmap rule, so the loop is the form that works for every method and
objective; it is exact and needs no dependency. Cost: B backward passes of one example instead of
one of B.

`PrivateGradients.forward_backward` has the signature of training.step.forward_backward and is what
the step calls instead when privacy.dp_sgd is on (TrainState.private).
"""
from __future__ import annotations

import math

import torch

from tunelab.data.collate import split_batch
from tunelab.errors import ConfigError
from tunelab.privacy.accountant import epsilon
from tunelab.privacy.config import PrivacyConfig
from tunelab.run.context import StepContext
from tunelab.run.device import autocast


def check_supported(cfg: PrivacyConfig, method, objective, distributed: bool) -> None:
    """A ConfigError, before training, when DP-SGD cannot run on this method, objective or launch."""
    if not cfg.dp_sgd:
        return
    why = getattr(type(method), "private_why", "")
    if why:
        raise ConfigError(f"privacy.dp_sgd: method '{method.name}' cannot train with DP-SGD: {why}")
    if not objective.per_token:
        raise ConfigError(f"privacy.dp_sgd: objective '{objective.name}' does not decompose over examples "
                          "(Objective.per_token is False), so it has no per-example gradient to clip")
    if distributed:
        raise ConfigError("privacy.dp_sgd: runs on one process; launch without torchrun / --nproc")


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / ||g||): the scale that brings a gradient of norm `norm` within C."""
    return min(1.0, clip_norm / (norm + 1e-12))


def add_noise(grads: list[torch.Tensor], std: float, generator: torch.Generator | None = None) -> None:
    """grads += N(0, std^2), drawn in fp32 on the CPU (reproducible on any device), in place."""
    if std == 0:
        return
    for g in grads:
        g.add_(torch.randn(g.shape, generator=generator, dtype=torch.float32, device="cpu").to(g.device, g.dtype), alpha=std)


def per_example_grads(parallel, batch: dict, params: list[torch.Tensor], precision: str, device,
                      ctx: StepContext):
    """Yield (gradients of the example's mean token loss w.r.t. `params`, loss, trained tokens) for
    each example of `batch`."""
    for piece in split_batch(batch, 1):  # one example per piece, packed or padded
        with autocast(precision, device):
            out = parallel.loss(piece, ctx, sync=True)
        n = max(out.num_tokens, 1)
        grads = torch.autograd.grad(out.loss_sum / n, params, allow_unused=True)
        yield [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], float(out.loss_sum.detach()), out.num_tokens


class PrivateGradients:
    """The step's gradients under DP-SGD, and the privacy spent so far (metrics `dp_epsilon` at
    `dp_delta`, `dp_clipped_fraction`: the share of examples whose gradient was clipped)."""

    def __init__(self, cfg: PrivacyConfig, num_examples: int, examples_per_step: int):
        self.cfg, self.num_examples = cfg, num_examples
        self.sample_rate = min(1.0, examples_per_step / max(num_examples, 1))

    def spent(self, steps: int) -> float:
        """epsilon at cfg.delta after `steps` steps (inf without noise)."""
        return epsilon(self.sample_rate, self.cfg.noise_multiplier, steps, self.cfg.delta)[0]

    def forward_backward(self, parallel, objective, micro: list[dict], opt, tc, device,
                         ctx: StepContext) -> tuple[float, float, int, dict]:
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        losses, tokens, clipped, count = 0.0, 0, 0, 0
        for i, batch in enumerate(micro):
            for grads, loss_sum, n in per_example_grads(parallel, batch, params, tc.precision, device,
                                                        ctx.at_micro_batch(i)):
                norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads))
                factor = clip_factor(norm, self.cfg.clip_norm)
                for t, g in zip(total, grads):
                    t.add_(g, alpha=factor)
                losses, tokens, count = losses + loss_sum, tokens + n, count + 1
                clipped += factor < 1.0
        add_noise(total, self.cfg.noise_multiplier * self.cfg.clip_norm)
        for p, t in zip(params, total):
            p.grad = t.div_(max(count, 1))
        grad_norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params))
        metrics = {"dp_epsilon": self.spent(ctx.step), "dp_delta": self.cfg.delta,
                   "dp_clipped_fraction": clipped / max(count, 1)}
        return losses / max(tokens, 1), grad_norm, tokens, metrics

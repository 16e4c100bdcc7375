"""One-Token Rollout (OTR): every target position is a one-step RL episode (arXiv 2509.26313)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tunelab.objectives import LossOutput, Objective, register, trained_logits
from tunelab.options import Options
from tunelab.run.context import OUTSIDE_TRAINING, StepContext


@dataclass(kw_only=True)
class OTRConfig(Options):
    """Options of One-Token Rollout."""
    ranges: ClassVar = {"num_samples": ">= 1", "temperature": "> 0", "beta": "< 1"}
    num_samples: int = 256
    """K, tokens sampled per position from the current policy (reviewers report K = 256)."""
    temperature: float = 1.0
    """τ of the sampling distribution softmax(logits / τ). The paper uses some τ > 1 whose value is
    unverified; 1.0 (pure on-policy) is our default, not the paper's."""
    beta: float = -0.1
    """β, reward of a sampled token that is not the ground truth (the target's reward is 1). The paper
    reports a slightly negative β works best; -0.1 is our choice, unverified."""
    mode: Literal["mc", "exact"] = "mc"
    """"mc": sample K tokens (the paper); "exact": the expectation over the sampling distribution."""


def sample_rewards(q: torch.Tensor, targets: torch.Tensor, num_samples: int,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw K tokens per row of q (N, V) from torch's global RNG; return them (N, K) and their
    rewards (N, K): 1 where the token is the target, β elsewhere (constants: no gradient)."""
    tokens = torch.multinomial(q, num_samples, replacement=True)  # (N, K)
    rewards = torch.where(tokens == targets[:, None], 1.0, beta).to(q.dtype)  # (N, K)
    return tokens, rewards


def otr_token_losses(logits: torch.Tensor, targets: torch.Tensor,
                     cfg: OTRConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position OTR loss (N,) from logits (N, V) and targets (N,), and the hit rate (N,):
    c_t / K for "mc", π'(x_t | s_t) for "exact" (the expected hit rate)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V), the policy at τ = 1
    with torch.no_grad():
        q = torch.softmax(logits.detach().float() / cfg.temperature, dim=-1)  # (N, V), π'
    if cfg.mode == "exact":
        weights = (cfg.beta * q).scatter(1, targets[:, None], q.gather(1, targets[:, None]))  # (N, V)
        return -(weights * logp).sum(-1), q.gather(1, targets[:, None]).squeeze(1)
    tokens, rewards = sample_rewards(q, targets, cfg.num_samples, cfg.beta)  # (N, K), (N, K)
    losses = -(rewards * logp.gather(1, tokens)).mean(-1)  # (N,)
    return losses, (tokens == targets[:, None]).float().mean(-1)


STARVED_HIT, STARVED_SHARE = 0.1, 0.5
"""A trained token is starved when its hit rate is below STARVED_HIT; the first batch warns when the
starved tokens hold more than STARVED_SHARE of its cross-entropy (thresholds of our choosing, not the
paper's). Weighing by cross-entropy, not by count: on builtin:arith with SmolLM2 (4 batches of 8,
bench/results/otr-starved-first-batches.json) 15-19% of the trained tokens are starved, yet they hold
72-78% of the cross-entropy, i.e. of what SFT learns from; a count threshold of 25% stayed silent on
the recipe where OTR at τ = 1 fell below the base model."""


def starved_share(hits: torch.Tensor, ce: torch.Tensor) -> float:
    """The share of the batch's cross-entropy (-log p of each target, `ce`) held by starved tokens."""
    total = float(ce.sum())
    return float(ce[hits < STARVED_HIT].sum()) / total if total > 0 else 0.0


def starved_warning(share: float, temperature: float) -> None:
    """Warn when OTR can barely learn this data: in expectation at τ = 1 its gradient is (1 - β) times
    DFT's, each token's cross-entropy gradient weighted by the model's own probability of it, so
    tokens the model finds unlikely (a new answer format, the answer itself) get almost no signal."""
    if share > STARVED_SHARE:
        warnings.warn(f"otr: tokens with a hit rate below {STARVED_HIT} hold {share:.0%} of the first batch's "
                      f"cross-entropy (τ = {temperature}): OTR weights each token's gradient by the model's "
                      "probability of it, so it learns little from tokens the model finds unlikely and may end "
                      "below the base model on held-out loss; start from a model that already does the task "
                      "(e.g. after an sft stage), raise `temperature`, or use sft", stacklevel=3)


@register("otr")
class OneTokenRollout(Objective):
    """One-Token Rollout (Ming, Wu, Hu, He, Yu 2025, arXiv 2509.26313; no public code).

    Each trained position t (state s_t = prompt + y_<t) is a one-step episode. K tokens a_k are drawn
    from π' = softmax(logits / τ) of the current model (no gradient); the reward is R = 1 for the
    ground-truth token x_t and β otherwise, under stop-gradient (the paper's Eq. 8):

        L_t = -(1/K) sum_k sg[R(a_k, x_t)] log π(a_k | s_t)           (log π at τ = 1, no IS correction)
            = -(c_t/K) log π(x_t | s_t) - (β/K) sum_{a_k != x_t} log π(a_k | s_t),   c_t = #{k: a_k = x_t}

    `mode="exact"` replaces the samples by their expectation (reviewer 2's closed form, no variance):

        E[L_t] = -π'(x_t) log π(x_t) - β sum_{a != x_t} π'(a) log π(a)       (π' detached)

    which at τ = 1, β = 0 is DFT's -sg(p) log p. When every sample hits the target the loss and its
    gradient equal cross-entropy's, whatever β.

    Readings we chose: the loss is summed over positions and divided by the step's number of trained
    tokens like SFT (the paper's exact normaliser is unverified; a reviewer says per sequence length);
    τ = 1 and β = -0.1 are our defaults (the paper's values are unverified). Samples come from torch's
    global RNG, so a seeded run is deterministic. Metrics: `hit_rate` (mean c_t/K, or mean π'(x_t) in
    exact mode) and `zero_hit_fraction` (positions where no sample hit; 0 in exact mode).
    """
    per_token = True
    Config = OTRConfig

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING):
        logits, targets = trained_logits(model, batch)  # (N, V), (N,)
        losses, hits = otr_token_losses(logits, targets, self.cfg)  # (N,), (N,)
        if not getattr(self, "_checked", False) and hits.numel():
            self._checked = True
            with torch.no_grad():
                ce = -torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
            starved_warning(starved_share(hits, ce), self.cfg.temperature)
        zero = (hits == 0).float().mean() if self.cfg.mode == "mc" else hits.new_zeros(())
        metrics = {"hit_rate": float(hits.mean()), "zero_hit_fraction": float(zero)} if hits.numel() else {}
        return LossOutput(losses.sum(), targets.numel(), metrics)

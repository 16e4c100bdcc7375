"""Q-Tuning: quadrant-based sample selection with token pruning ("Winning the Pruning Gamble",
arXiv 2509.23873)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from tunelab.objectives import IGNORE, LossOutput, Objective, register, trained_logits
from tunelab.objectives._segments import rank_in_segment, segment_ids, segment_mean
from tunelab.options import Options
from tunelab.run.context import OUTSIDE_TRAINING, StepContext

BISECT_ITERS, BISECT_TOL, MAX_QUANTILE = 10, 0.01, 0.49  # the reference code's search constants
MIN_SAMPLES = 4  # below this the quadrant split is degenerate (everything comes back by top-up)


@dataclass(kw_only=True)
class QTuningConfig(Options):
    """Options of Q-Tuning."""
    ranges: ClassVar = {"sample_ratio": "(0, 1]", "token_ratio": "(0, 1]", "neighbor_weight": "[0, 1]"}
    sample_ratio: float = 0.2
    """r_s, fraction of each micro-batch's samples kept (reference code `data_ratio`: 0.2)."""
    token_ratio: float = 0.75
    """r_t; the micro-batch keeps round(r_s r_t N) of its N response tokens (reference `token_ratio`: 0.75)."""
    neighbor_weight: float = 0.5
    """λ of the token score (1 - λ) PPL_t + λ (PPL_{t-1} + PPL_{t+1}) (reference `wise_lambda`: 0.5)."""
    prune: Literal["high", "low"] = "high"
    """Which tokens of misconception samples are pruned: the highest smoothed PPL (reference code,
    "wise") or the lowest ("fwise"); the paper's text is ambiguous."""


def quadrant_masks(ppl: torch.Tensor, ent: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Q2 (high PPL, low entropy) and Q4 (low PPL, high entropy) at quantile level a < 0.5, (S,) each:
    Q2 = ppl > q(ppl, 1-a) & ent <= q(ent, a);  Q4 = ppl <= q(ppl, a) & ent > q(ent, 1-a)."""
    q = torch.tensor([a, 1 - a], dtype=ppl.dtype, device=ppl.device)
    ppl_lo, ppl_hi = torch.quantile(ppl, q)
    ent_lo, ent_hi = torch.quantile(ent, q)
    return (ppl > ppl_hi) & (ent <= ent_lo), (ppl <= ppl_lo) & (ent > ent_hi)


def bisect_quadrants(ppl: torch.Tensor, ent: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Search the common quantile level a in [0, 0.49] so that |Q2 ∪ Q4| / S ≈ ratio (10 halvings,
    stop within 0.01); returns the last masks tried and their level."""
    lo, hi = 0.0, MAX_QUANTILE
    for _ in range(BISECT_ITERS):
        a = (lo + hi) / 2
        q2, q4 = quadrant_masks(ppl, ent, a)
        frac = float((q2 | q4).float().mean())
        if abs(frac - ratio) < BISECT_TOL:
            break
        lo, hi = (a, hi) if frac < ratio else (lo, a)
    return q2, q4, a


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 1e-12 else torch.zeros_like(x)


def top_up(ppl: torch.Tensor, ent: torch.Tensor, q2: torch.Tensor, q4: torch.Tensor,
           ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add samples until max(1, round(ratio S)) are kept, best max(s2, s4) first, where
    s2 = minmax(ppl) - minmax(ent) = -s4; an added sample with s2 >= s4 joins Q2, else Q4."""
    need = max(1, round(ratio * ppl.numel())) - int((q2 | q4).sum())
    if need <= 0:
        return q2, q4
    s2 = _minmax(ppl) - _minmax(ent)
    score = s2.abs().masked_fill(q2 | q4, float("-inf"))  # max(s2, -s2)
    added = torch.zeros_like(q2)
    added[torch.sort(score, descending=True, stable=True).indices[:need]] = True
    return q2 | (added & (s2 >= 0)), q4 | (added & (s2 < 0))


def smoothed_scores(token_ppl: torch.Tensor, seg: torch.Tensor, lam: float) -> torch.Tensor:
    """s_t = (1 - λ) PPL_t + λ (PPL_{t-1} + PPL_{t+1}) on (B, T); `token_ppl` is 0 where there is no
    target, so neighbours outside the response (or in another packed example) add 0."""
    same_left = F.pad(seg[:, 1:] == seg[:, :-1], (1, 0))  # (B, T): t-1 in the same example
    same_right = F.pad(seg[:, :-1] == seg[:, 1:], (0, 1))
    left = F.pad(token_ppl[:, :-1], (1, 0)) * same_left
    right = F.pad(token_ppl[:, 1:], (0, 1)) * same_right
    return (1 - lam) * token_ppl + lam * (left + right)


def prune_tokens(priority: torch.Tensor, candidate: torch.Tensor, seg: torch.Tensor, num_drop: int) -> torch.Tensor:
    """Drop mask (N,): the `num_drop` candidates of highest priority across the micro-batch, never the
    last candidate of an example (a kept sample keeps at least one token)."""
    prio = priority.masked_fill(~candidate, float("-inf"))
    rank = rank_in_segment(prio, seg)
    last = rank == torch.bincount(seg[candidate], minlength=int(seg.max()) + 1)[seg] - 1
    eligible = candidate & ~last
    order = torch.sort(prio.masked_fill(~eligible, float("-inf")), descending=True, stable=True).indices
    drop = torch.zeros_like(candidate)
    drop[order[:max(0, min(num_drop, int(eligible.sum())))]] = True
    return drop


@dataclass
class QTuningPlan:
    """One micro-batch's selection. S = samples with response tokens, N = response tokens."""
    ppl: torch.Tensor
    """(S,) per-sample perplexity over its response tokens."""
    ent: torch.Tensor
    """(S,) per-sample mean token entropy over its response tokens."""
    q2: torch.Tensor
    """(S,) bool, misconception samples: kept, token-pruned."""
    q4: torch.Tensor
    """(S,) bool, calibration samples: kept whole."""
    seg: torch.Tensor
    """(N,) the sample (0..S-1) of each response token."""
    kept: torch.Tensor
    """(N,) bool, the tokens trained."""
    target: int
    """The token budget round(r_s r_t N)."""


@register("qtuning")
class QTuning(Objective):
    """Q-Tuning (Wang et al. 2025, arXiv 2509.23873; pre-release code in the history of
    github.com/Q-tuning/Q-tuning, LLaMA-Factory trainer, plug "wisely").

    Per micro-batch, from the current model's single forward:
      1. per sample: PPL_i = exp(mean_t CE_t), Ent_i = mean_t H(p_t), over its response tokens;
      2. Error-Uncertainty plane: Q2 = high PPL & low Ent ("valuable misconceptions", kept, token-pruned),
         Q4 = low PPL & high Ent ("calibration data", kept whole), Q1 / Q3 dropped; quantile thresholds
         at a common level a found by bisection so that |Q2 ∪ Q4| ≈ r_s S, then topped up to
         max(1, round(r_s S)) samples by max(s2, s4) (see `top_up`);
      3. token budget: keep round(r_s r_t N) of the N response tokens; tokens of dropped samples count
         towards it, the rest is pruned from Q2 samples only, by the smoothed score
         s_t = (1 - λ) PPL_t + λ (PPL_{t-1} + PPL_{t+1}) (PPL_t = exp(CE_t)), highest first;
      4. loss = CE summed over kept tokens (the loop divides by the step's kept count).

    Readings we chose: entropy is averaged over response tokens (the page's formula; the code averages
    over all attended tokens); the token budget counts response tokens (the code counts prompt tokens
    too, and divides the loss by them); neighbours outside the response add 0 to the score; pruning
    drops the highest smoothed PPL by default (the code's "wise"; `prune="low"` is "fwise"); a kept Q2
    sample keeps at least one token (the code can prune a sample away, leaving a micro-batch with no
    loss); rounding is Python's round, as the code. Samples without response tokens are ignored. Any
    micro-batch size works: with fewer than 4 samples the quantile split is degenerate and selection
    falls back to the top-up ranking (warned once); a single sample is kept as Q2.
    Metrics: `q2_samples`, `q4_samples`, `dropped_samples`, `kept_token_fraction`, `mean_ppl`, `mean_entropy`.
    """
    Config = QTuningConfig

    def __init__(self, cfg: QTuningConfig | None = None):
        super().__init__(cfg)
        self._warned = False

    def select_samples(self, ppl: torch.Tensor, ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q2 and Q4 membership of each sample, (S,) each."""
        if ppl.numel() < MIN_SAMPLES and not self._warned:
            warnings.warn(f"qtuning: a micro-batch of {ppl.numel()} samples makes the quadrant split degenerate; "
                          f"use at least {MIN_SAMPLES} examples per micro-batch", stacklevel=4)
            self._warned = True
        q2, q4, _ = bisect_quadrants(ppl, ent, self.cfg.sample_ratio)
        return top_up(ppl, ent, q2, q4, self.cfg.sample_ratio)

    def plan(self, ce: torch.Tensor, entropy: torch.Tensor, batch: dict[str, torch.Tensor]) -> QTuningPlan:
        """Which samples and tokens to train, from per-token CE and entropy at the trained positions
        (N,) each (a pure function of them, so it can be tested on hand-built values)."""
        keep = batch["targets"] != IGNORE  # (B, T)
        seg_full = segment_ids(batch)  # (B, T)
        present, seg = torch.unique(seg_full[keep], return_inverse=True)  # renumber examples with targets 0..S-1
        S = present.numel()
        ppl = segment_mean(ce.double(), seg, S).exp()  # (S,)
        ent = segment_mean(entropy.double(), seg, S)  # (S,)
        q2, q4 = self.select_samples(ppl, ent)
        target = round(ce.numel() * self.cfg.sample_ratio * self.cfg.token_ratio)
        token_ppl = torch.zeros(keep.shape, dtype=torch.float64, device=ce.device)
        token_ppl[keep] = ce.double().exp()  # float64: exp(CE) overflows float32 past CE ≈ 88
        score = smoothed_scores(token_ppl, seg_full, self.cfg.neighbor_weight)[keep]  # (N,)
        kept = (q2 | q4)[seg]  # (N,)
        kept &= ~prune_tokens(score if self.cfg.prune == "high" else -score, q2[seg], seg, int(kept.sum()) - target)
        return QTuningPlan(ppl=ppl, ent=ent, q2=q2, q4=q4, seg=seg, kept=kept, target=target)

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING):
        logits, targets = trained_logits(model, batch)  # (N, V), (N,)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
        if ce.numel() == 0:
            return LossOutput(ce.sum(), 0)
        with torch.no_grad():
            logp = torch.log_softmax(logits.detach().float(), dim=-1)
            p = self.plan(ce.detach(), -(logp.exp() * logp).sum(-1), batch)
        metrics = {"q2_samples": float(p.q2.sum()), "q4_samples": float(p.q4.sum()),
                   "dropped_samples": float((~(p.q2 | p.q4)).sum()),
                   "kept_token_fraction": float(p.kept.float().mean()),
                   "mean_ppl": float(p.ppl.mean()), "mean_entropy": float(p.ent.mean())}
        return LossOutput(ce[p.kept].sum(), int(p.kept.sum()), metrics)

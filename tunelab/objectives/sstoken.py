"""ssToken: self-modulated and semantic-aware token selection (arXiv 2510.18250)."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from tunelab.objectives import IGNORE, LossOutput, Objective, _head_is_plain, model_inputs, register, trained_logits
from tunelab.objectives._segments import num_segments, rank_in_segment, segment_ids, segment_min_max
from tunelab.options import Options
from tunelab.run.context import OUTSIDE_TRAINING, StepContext

_DEFAULT_EMA_DECAY = 0.99


@dataclass(kw_only=True)
class SSTokenConfig(Options):
    """Options of ssToken."""
    ranges: ClassVar = {"keep_ratio": "(0, 1]", "gamma": "[0, 1]", "ema_decay": "[0, 1)"}
    keep_ratio: float = 0.6
    """ρ, fraction of each example's response tokens that are trained (reference code: 0.6)."""
    gamma: float = 0.5
    """γ, weight of the normalised retrospective excess loss against attention (reference code: 0.5)."""
    history: Literal["frozen", "ema"] = "frozen"
    """History model: "frozen" = the model as it was before training (the released code);
    "ema" = θ_his <- α θ_his + (1 - α) θ after every optimizer step (the paper's alternative)."""
    ema_decay: float = _DEFAULT_EMA_DECAY
    """α of the EMA history (used only with history="ema"); the paper gives no value, 0.99 is ours."""

    def validate(self) -> None:
        if self.history == "frozen" and self.ema_decay != _DEFAULT_EMA_DECAY:
            warnings.warn("sstoken: ema_decay does nothing with history='frozen'", stacklevel=2)


def keep_counts(num_response: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """⌈ρ n⌉ per example; the 1e-6 keeps float error (0.7 * 10 = 7.000000000000001) from adding one."""
    return torch.ceil(num_response.double() * keep_ratio - 1e-6).long()


def select_tokens(rel: torch.Tensor, attn_mass: torch.Tensor, seg: torch.Tensor, keep_ratio: float,
                  gamma: float) -> torch.Tensor:
    """Boolean keep mask (N,) over the trained positions: per example, the top ⌈ρ n⌉ by
    score = γ minmax(REL) + (1 - γ) attention mass, min-max within the example. All inputs are (N,)."""
    n = num_segments(seg)
    score = gamma * segment_min_max(rel, seg, n) + (1 - gamma) * attn_mass  # (N,)
    counts = keep_counts(torch.bincount(seg, minlength=n), keep_ratio)  # (n,)
    return rank_in_segment(score, seg) < counts[seg]


def prompt_keys(targets: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """True at input tokens that are context, not response, (B, T): token j is a response token when
    it is the target of position j - 1 in the same example (the first token of an example never is)."""
    is_response = torch.zeros_like(seg, dtype=torch.bool)
    is_response[:, 1:] = (targets[:, :-1] != IGNORE) & (seg[:, :-1] == seg[:, 1:])
    return (seg >= 0) & ~is_response


def prompt_attention_mass(attn: torch.Tensor, targets: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Last-layer attention (B, H, T, T), head-averaged, summed over the example's prompt keys: (B, T)."""
    keys = prompt_keys(targets, seg)  # (B, T)
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T): never count another packed example
    weights = attn.detach().float().mean(1) * (same & keys[:, None, :])  # (B, T, T)
    return weights.sum(-1)


def ensure_eager(model) -> None:
    """Attention weights exist only with eager attention; switch the model once, with a warning."""
    if model.config._attn_implementation != "eager":
        warnings.warn(f"sstoken reads attention weights: switching the model from "
                      f"'{model.config._attn_implementation}' to 'eager' attention", stacklevel=4)
        model.set_attn_implementation("eager")


def forward_with_attention(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at trained positions (N, V) and the last layer's attention weights (B, H, T, T)."""
    keep = batch["targets"] != IGNORE  # (B, T)
    if not _head_is_plain(model):
        out = model(**model_inputs(batch), output_attentions=True)
        return out.logits[keep], out.attentions[-1]
    out = model.get_decoder()(**model_inputs(batch), output_attentions=True)
    return model.get_output_embeddings()(out.last_hidden_state[keep]), out.attentions[-1]


@register("sstoken")
class SSToken(Objective):
    """ssToken (Qin et al., ICLR 2026, arXiv 2510.18250; code github.com/jianke0604/ssToken).

    For each response token of each example, from the same forward as the loss:

        REL_t  = L_his(x_t) - L_θ(x_t)                 retrospective excess loss (history minus current CE)
        attn_t = sum_{j in prompt} mean_h A_last[h, t, j]  response-to-prompt attention mass, in [0, 1]
        s_t    = γ (REL_t - min REL) / (max REL - min REL + 1e-8) + (1 - γ) attn_t   (min/max per example)

    and trains on the top ⌈ρ n_resp⌉ tokens of each example (CE summed over kept tokens; the loop
    divides by the step's kept count, i.e. the reference's token mean over kept tokens).

    Readings we chose: the attention row and the loss of a position are both those of the query that
    predicts the token (the reference code pairs the loss of token i with the row of token i, one
    position apart). "Prompt" keys are all context tokens of the example that are not response tokens
    (the reference takes the label-masked prefix; with one prompt and one reply they agree). The history
    is a frozen copy of the model taken at setup (= the reference's precomputed base-model losses) or
    an EMA of it, moved once per optimizer step from the second on, before that step's first forward
    (the step comes from the step context, so gradient accumulation does not move it twice; a step
    skipped for a non-finite loss still counts, and moves it toward the unchanged weights). The
    reference's attention-only warm-up is keyed on sample index and effectively never runs: not
    implemented. While the history equals the model (the first step) REL is exactly 0 (both
    forwards use the same kernels), so the selection is attention-only, like that warm-up; ties (e.g.
    γ = 1 on the first step) keep the earlier tokens. γ = 1 skips the attention; γ = 0 skips the
    history model. Reading attention needs eager attention: the model is switched to it, with a
    warning. The history is a full copy of the model (twice the weight memory; the EMA moves only the
    trainable tensors, the others never differ).
    Metrics: `kept_fraction`, `mean_rel`, `mean_prompt_attention`.
    """
    Config = SSTokenConfig

    def __init__(self, cfg: SSTokenConfig | None = None):
        super().__init__(cfg)
        self._history = None
        self._seen_step: int | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._tracked_names: set[str] = set()

    def setup(self, model, tokenizer) -> None:
        self._prepare(model)

    def _prepare(self, model, ctx: StepContext | None = None) -> None:
        if self.cfg.gamma < 1:
            ensure_eager(model)
        if self._history is None and self.cfg.gamma > 0:
            # after the eager switch: the same kernels give REL = 0 exactly while the weights agree
            self._history = copy.deepcopy(model).eval().requires_grad_(False)
            self._tracked_names = {n for n, p in model.named_parameters() if p.requires_grad}
            self._seen_step = ctx.step if ctx is not None else None  # the history is this step's model
            self._apply_pending()

    # -- history ---------------------------------------------------------------------------
    @torch.no_grad()
    def update_history(self, model) -> None:
        """θ_his <- α θ_his + (1 - α) θ on the trainable weights (the others never differ)."""
        a, hist = self.cfg.ema_decay, dict(self._history.named_parameters())
        for n, p in model.named_parameters():
            if p.requires_grad:
                self._tracked_names.add(n)
                hist[n].mul_(a).add_(p.detach().to(hist[n].dtype), alpha=1 - a)

    def _refresh_history(self, model, ctx: StepContext) -> None:
        if self.cfg.history == "ema" and ctx.step > 1 and ctx.step != self._seen_step:
            self.update_history(model)
        self._seen_step = ctx.step

    def history_losses(self, batch) -> torch.Tensor:
        """Per-token CE of the history model at the trained positions, (N,)."""
        with torch.no_grad():
            logits, targets = trained_logits(self._history, batch)
            return F.cross_entropy(logits.float(), targets, reduction="none")

    # -- loss --------------------------------------------------------------------------------
    def _select(self, model, batch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Per-token CE at the trained positions (N,), with grad, the keep mask (N,) and the metrics."""
        self._prepare(model, ctx)
        targets = batch["targets"]
        keep = targets != IGNORE  # (B, T)
        seg = segment_ids(batch)  # (B, T)
        if self.cfg.gamma < 1:
            logits, attn = forward_with_attention(model, batch)  # (N, V), (B, H, T, T)
            mass = prompt_attention_mass(attn, targets, seg)[keep]  # (N,)
        else:
            logits, _ = trained_logits(model, batch)
            mass = logits.new_zeros(logits.shape[0], dtype=torch.float32)
        ce = F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (N,)
        rel = torch.zeros_like(ce)
        if self.cfg.gamma > 0:
            self._refresh_history(model, ctx)
            rel = self.history_losses(batch) - ce.detach()
        kept = select_tokens(rel, mass, seg[keep], self.cfg.keep_ratio, self.cfg.gamma)  # (N,)
        metrics = {"kept_fraction": float(kept.float().mean()), "mean_rel": float(rel.mean()),
                   "mean_prompt_attention": float(mass.mean())} if ce.numel() else {}
        return ce, kept, metrics

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING):
        ce, kept, metrics = self._select(model, batch, ctx)
        return LossOutput(ce[kept].sum(), int(kept.sum()), metrics)

    @torch.no_grad()
    def kept_positions(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING) -> torch.Tensor:
        """The positions `loss` would train on this batch, (B, T) bool (for inspection and tests)."""
        _, kept, _ = self._select(model, batch, ctx)
        mask = torch.zeros_like(batch["targets"], dtype=torch.bool)
        mask[batch["targets"] != IGNORE] = kept
        return mask

    # -- checkpointed state (the EMA history) --------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.cfg.history != "ema" or self._history is None:
            return {}
        return {f"history.{n}": h.detach().clone() for n, h in self._history.named_parameters()
                if n in self._tracked_names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state and self.cfg.history != "ema":
            raise ValueError(f"objective 'sstoken' (history={self.cfg.history}) has no state, got {sorted(state)[:3]}")
        self._pending = dict(state)
        self._seen_step = None  # the step after a resume moves the EMA, as it would have
        if self._history is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        hist = dict(self._history.named_parameters())
        with torch.no_grad():
            for key, value in self._pending.items():
                hist[key.removeprefix("history.")].copy_(value)
        self._pending = {}

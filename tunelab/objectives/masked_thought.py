"""Masked Thought (MFT): corrupt response tokens in the *input*, keep the labels (arXiv 2403.02178)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tunelab.errors import ConfigError
from tunelab.objectives import IGNORE, LossOutput, Objective, register, sum_cross_entropy
from tunelab.options import Options
from tunelab.run.context import OUTSIDE_TRAINING, StepContext


@dataclass(kw_only=True)
class MaskedThoughtConfig(Options):
    ranges: ClassVar = {"mask_prob": "[0, 1]", "warmup_fraction": "[0, 1]",
                        "replace_rate": "[0, 1]", "mask_token_id": ">= 0"}
    mask_prob: float = 0.2
    """p: probability that each response token of the input is masked (MAmmoTH/MetaMath: 0.2;
    the GSM8K Llama-2 run used 0.4)."""
    warmup_fraction: float = 0.0
    """Ramp p linearly from 0 to mask_prob over this fraction of the run's optimizer steps (0: a
    constant p). The GSM8K code ramps over the first 0.66 of max_steps."""
    replace_rate: float = 0.0
    """Probability that a masked position gets a uniformly random vocabulary id instead of the mask
    id (the paper's `<mask>` variant: 0; its GSM8K runs: 1)."""
    mask_token: str | None = None
    """The mask token as text, looked up in the tokenizer's vocabulary (e.g. '<mask>' where the
    tokenizer has one). Unset: mask_token_id, else the tokenizer's pad token, else its unk token."""
    mask_token_id: int | None = None
    """The mask id directly (e.g. a reserved, unused id); mask_token wins when both are set."""


def response_positions(targets: torch.Tensor) -> torch.Tensor:
    """Input positions holding a trained (response) token, (B, T) bool.

    targets are shifted (targets[t] is the label of token t+1), so token t+1 is a response token
    exactly when targets[t] != IGNORE. Token 0 of a row never is, and the first token of a packed
    example never is either, because the last target of the previous example is IGNORE."""
    is_resp = torch.zeros_like(targets, dtype=torch.bool)
    is_resp[:, 1:] = targets[:, :-1] != IGNORE
    return is_resp


def mask_response_tokens(input_ids: torch.Tensor, targets: torch.Tensor, p: float, mask_id: int | None,
                         replace_rate: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupted input ids and the chosen positions, (B, T) long, (B, T) bool.

    Each response position is chosen with probability p, independently; a chosen position gets a
    random id in [0, vocab_size) with probability replace_rate, else mask_id. Draws come from
    torch's global RNG (seeded and checkpointed by the loop)."""
    chosen = (torch.rand(input_ids.shape, device=input_ids.device) < p) & response_positions(targets)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, device=input_ids.device)
    use_random = torch.rand(input_ids.shape, device=input_ids.device) < replace_rate
    if mask_id is None:
        assert replace_rate == 1.0, "a mask id is needed unless every masked token is replaced"
        mask_id = 0
    fill = torch.where(use_random, random_ids, torch.full_like(input_ids, mask_id))
    return torch.where(chosen, fill, input_ids), chosen


def ramped_prob(p_max: float, step: int, warmup_steps: float) -> float:
    """p_t = p_max * min(1, step / warmup_steps): 0 at step 0, p_max from warmup_steps on."""
    return p_max if warmup_steps == 0 else p_max * min(1.0, step / warmup_steps)


@register("masked_thought")
class MaskedThought(Objective):
    """Masked Thought fine-tuning, Chen et al. 2024, arXiv 2403.02178 (MFT).

    Before the forward, every response (chain-of-thought) token x_t of the input is independently
    replaced with probability p by a mask id (or, with probability replace_rate, by a uniformly
    random vocabulary id); the labels stay the original tokens and the prompt is never touched:
        loss = sum_t -log p(y_t | prompt, masked(y_<t)) over trained tokens / #trained tokens.
    The reference GSM8K code draws the number of masked positions ~ Binomial(n, p) and then the
    positions uniformly without replacement; that is the same distribution as independent
    per-token Bernoulli(p) draws, which is what we do.

    Readings we chose:
    - Maskable = tokens whose own label is trained (all assistant turns, including their end-of-turn
      token); prompt, padding and tokens after the response are never masked. Masking the last
      response token's input changes no loss, so including it is harmless.
    - The mask id: the paper adds a `<mask>` token and resizes the embeddings, which changes the
      embedding shape that LoRA/frozen-embedding methods expect. We never add tokens: the default
      is the pad token (the reference README's alternative), else unk; `mask_token` /
      `mask_token_id` pick an existing (e.g. reserved) token, `replace_rate=1` uses random ids.
      Without setup() (no tokenizer) the model config's pad_token_id is used.
    - Random ids are uniform over the tokenizer's vocabulary (len(tokenizer)), or the model
      config's vocab_size without a tokenizer; special tokens are not excluded (as in the code).
    - The p warm-up counts optimizer steps, read from the step context: step s (0-based) of T =
      train.steps masks with p * min(1, s / (warmup_fraction * T)).
    Metrics: `mask_prob` (p this step) and `masked_fraction` (masked / maskable tokens)."""

    Config = MaskedThoughtConfig

    def __init__(self, cfg: MaskedThoughtConfig | None = None):
        super().__init__(cfg)
        self.mask_id: int | None = None
        self.vocab_size: int | None = None

    def setup(self, model, tokenizer) -> None:
        self.vocab_size = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
        self.mask_id = self._mask_id_from(tokenizer)

    def _mask_id_from(self, tokenizer) -> int | None:
        cfg = self.cfg
        if cfg.mask_token is not None:
            tid = tokenizer.convert_tokens_to_ids(cfg.mask_token)
            if tid is None or tid == tokenizer.unk_token_id and cfg.mask_token != tokenizer.unk_token:
                raise ConfigError(f"objective.mask_token: {cfg.mask_token!r} is not in the tokenizer's "
                                  "vocabulary (tunelab never adds tokens); pick an existing token")
            return tid
        if cfg.mask_token_id is not None:
            if cfg.mask_token_id >= len(tokenizer):
                raise ConfigError(f"objective.mask_token_id: {cfg.mask_token_id} >= vocabulary size {len(tokenizer)}")
            return cfg.mask_token_id
        for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id):
            if tid is not None:
                return tid
        if cfg.replace_rate < 1.0:
            raise ConfigError("objective.mask_token: the tokenizer has no pad or unk token; set mask_token, "
                              "mask_token_id or replace_rate: 1")
        return None

    def _resolved(self, model) -> tuple[int | None, int]:
        """(mask id, vocab size), from setup() or else from the model config."""
        vocab = self.vocab_size or model.config.get_text_config().vocab_size
        mask_id = self.mask_id if self.mask_id is not None else self.cfg.mask_token_id
        if mask_id is None:
            mask_id = getattr(model.config.get_text_config(), "pad_token_id", None)
        if mask_id is None and self.cfg.replace_rate < 1.0:
            raise ConfigError("objective.mask_token_id: no tokenizer given and the model has no pad_token_id")
        return mask_id, vocab

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING):
        p = ramped_prob(self.cfg.mask_prob, ctx.step - 1, self.cfg.warmup_fraction * ctx.total_steps)
        mask_id, vocab = self._resolved(model)
        ids, chosen = mask_response_tokens(batch["input_ids"], batch["targets"], p, mask_id,
                                           self.cfg.replace_rate, vocab)
        loss_sum, count = sum_cross_entropy(model, batch | {"input_ids": ids})  # SFT's loss on masked inputs
        num_resp = int(response_positions(batch["targets"]).sum())
        metrics = {"mask_prob": p, "masked_fraction": float(chosen.sum()) / max(num_resp, 1)}
        return LossOutput(loss_sum, count, metrics)

"""Token-level training objectives. Each module in this package registers one.

Public surface: `Objective` (base class), `LossOutput`, `OBJECTIVES` (the registry), `register`,
`model_inputs` (from tunelab.data) and `token_cross_entropy` (shared helpers).

An objective returns the *sum* of its per-token losses and the number of tokens it counted; the
loop divides by the step's total, so gradient accumulation never depends on how a step is split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from tunelab.data.collate import IGNORE, model_inputs
from tunelab.objectives._head_ce import head_cross_entropy as chunked_head_cross_entropy  # fused head + CE
from tunelab.registry import OBJECTIVES, Component
from tunelab.run.context import OUTSIDE_TRAINING, StepContext

register = OBJECTIVES.register
__all__ = ["IGNORE", "OBJECTIVES", "LossOutput", "Objective", "model_inputs", "register", "token_cross_entropy",
           "trained_logits", "trained_hidden", "chunked_head_cross_entropy", "sum_cross_entropy"]


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """Sum of per-token losses (a scalar with grad)."""
    num_tokens: int
    """How many tokens the sum counts: the normaliser the loop uses."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-step figures the objective reports (written to metrics.jsonl)."""


class Objective(Component):
    """Base class. An objective computes a loss sum over a batch and the number of tokens it counts
    (`loss`); it may own trainable state (auxiliary heads: `state_dict`, `param_groups`, `save`)."""

    per_token: ClassVar[bool] = False
    """True when the loss sum over a batch equals the sum over any split of it at example
    boundaries (no batch-level statistics, no state advanced per call). Only then may the loop
    split a micro-batch to bound activation memory (train.max_tokens_per_forward)."""

    def setup(self, model, tokenizer) -> None:
        """Called once before training, after the method was applied and the model moved to its
        device (e.g. to read token ids, or to build auxiliary heads next to the model)."""

    def loss(self, model, batch: dict[str, torch.Tensor], ctx: StepContext = OUTSIDE_TRAINING) -> LossOutput:
        """The loss of `batch`; `ctx` says which step and micro-batch this forward belongs to."""
        raise NotImplementedError

    # -- objectives that train parameters of their own (e.g. auxiliary heads) ----------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The objective's own trainable tensors, by name (checkpointed with the method's)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"objective '{self.name}' has no state, got {sorted(state)[:3]}")

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups for the objective's own parameters (none by default)."""
        return []

    def trained_modules(self) -> list:
        """The nn.Modules holding the objective's own parameters: on several processes they are
        replicated with the model and their gradients summed like the model's."""
        return []

    def save(self, out_dir) -> None:
        """Write the objective's own trained tensors into the run's final/ directory."""


def _head_is_plain(model) -> bool:
    """True when logits are exactly lm_head(final hidden state): no soft-capping or scaling."""
    cfg = model.config
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def trained_hidden(model, batch: dict[str, torch.Tensor]):
    """Final hidden states at the positions that carry a target, and those targets: (N, d), (N,).
    None instead of the hidden states for heads that transform the logits (no plain head)."""
    targets = batch["targets"]
    keep = targets != IGNORE  # (B, T)
    if not _head_is_plain(model):
        return None, targets[keep]
    return model.get_decoder()(**model_inputs(batch)).last_hidden_state[keep], targets[keep]


def trained_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that carry a target only, and those targets: (N, V), (N,).

    The output head is the largest matmul of a small model and the fp32 logits its largest tensor;
    prompt positions have no target, so projecting only trained positions saves both. Falls back to
    the full forward for heads that transform the logits."""
    hidden, targets = trained_hidden(model, batch)
    if hidden is None:
        return model(**model_inputs(batch)).logits[batch["targets"] != IGNORE], targets
    return model.get_output_embeddings()(hidden), targets


def sum_cross_entropy(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096) -> tuple[torch.Tensor, int]:
    """(sum of -log p(y_t | y_<t) over the trained positions, their count): SFT's loss, for any
    objective whose loss is SFT's on a changed batch. The head runs on trained positions only,
    fused with the loss in chunks (a transformed head: the model's own logits)."""
    hidden, targets = trained_hidden(model, batch)  # (N, d), (N,)
    if hidden is None:
        logits, targets = trained_logits(model, batch)
        return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()
    return chunked_head_cross_entropy(hidden, model.get_output_embeddings(), targets, chunk_tokens), targets.numel()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE in fp32, (B, T, V) x (B, T) -> (B, T); 0 where target == IGNORE."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="none")
    return flat.view(targets.shape)

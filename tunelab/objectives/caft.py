"""CAFT, Concept-Aware Fine-Tuning: auxiliary heads predict tokens t+2..t+n (arXiv 2506.07833)."""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods._shared import decay_groups
from tunelab.objectives import IGNORE, LossOutput, Objective, chunked_head_cross_entropy, model_inputs, register
from tunelab.objectives import _head_is_plain
from tunelab.objectives._segments import segment_ids
from tunelab.options import Options, require
from tunelab.run.context import OUTSIDE_TRAINING, StepContext

CHUNK = 4096  # trained tokens per head + CE chunk (as SFT's default)

HEADS_FILE = "caft_heads.safetensors"

SCHEDULES = {  # coefficient as a function of the training fraction f = step / T (reference code)
    "rsine": lambda f: math.sin((1.0 - f) * math.pi / 2),  # 1 -> 0
    "sine": lambda f: math.sin(f * math.pi / 2),  # 0 -> 1
    "linear": lambda f: f,  # 0 -> 1
    "constant": lambda f: 1.0,
}


@dataclass(kw_only=True)
class CAFTConfig(Options):
    ranges: ClassVar = {"num_heads": ">= 1", "num_layers": ">= 1", "coef": ">= 0", "decay": "> 0"}
    num_heads: int = 4
    """Auxiliary heads; head k (1..num_heads) predicts token t+1+k (paper: n = 5 predictions)."""
    num_layers: int = 1
    """Blocks per head."""
    head_arch: Literal["transformer", "linear"] = "transformer"
    """A head block: a decoder layer of the model's own class, or a residual x + SiLU(W x)."""
    coef: float = 0.01
    """hcoef: weight of the auxiliary losses (0: plain SFT)."""
    decay: float = 0.8
    """Head k's loss is further weighted by decay**k."""
    schedule: Literal["rsine", "sine", "linear", "constant"] = "rsine"
    """Coefficient over training, of step s (0-based) of the run's T = train.steps optimizer steps:
    rsine sin((T-s)/T pi/2) 1->0, sine sin(s/T pi/2), linear s/T."""
    train_heads: bool = True
    """Train the heads with the model. The paper pre-trains heads once per base model and freezes
    them; without such heads, training them jointly is the sound default."""
    init_from: str | None = None
    """A caft_heads.safetensors (e.g. a previous run's final/) to start the heads from."""

    def validate(self) -> None:
        if self.init_from is not None:
            require(Path(self.init_from).is_file(), "init_from", f"{self.init_from}: no such file")


def schedule_coef(name: str, step: int, total: int) -> float:
    """The schedule's coefficient at 0-based optimizer step `step` of `total`."""
    return SCHEDULES[name](min(step / total, 1.0))


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W and b zero-initialised so the block starts as the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def _decoder_layers(model) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError("objective.head_arch: 'transformer' needs a decoder with `.layers`; use 'linear'")
    return layers


def build_heads(model, cfg: CAFTConfig) -> nn.ModuleList:
    """num_heads heads of num_layers blocks each, on the output head's device and dtype. Decoder
    blocks are fresh layers of the model's own class, initialised by the model's `_init_weights`
    (draws from the global RNG), not copies: a copy would carry the method's wrappers (LoRA)."""
    text_cfg = model.config.get_text_config()
    idx = len(_decoder_layers(model)) - 1 if cfg.head_arch == "transformer" else 0

    def block() -> nn.Module:
        if cfg.head_arch == "linear":
            return ResBlock(text_cfg.hidden_size)
        layer = type(_decoder_layers(model)[-1])(text_cfg, idx)
        return layer.apply(model._init_weights)

    heads = nn.ModuleList(nn.ModuleList(block() for _ in range(cfg.num_layers)) for _ in range(cfg.num_heads))
    w = model.get_output_embeddings().weight
    return heads.to(device=w.device, dtype=w.dtype)


@contextmanager
def last_layer_kwargs(model, arch: str) -> Iterator[dict]:
    """Capture the keyword arguments (mask, rotary embeddings, positions) the model passes to its
    last decoder layer, so a head layer sees exactly the same attention structure: causal,
    padding-aware and isolated per packed example."""
    captured: dict = {}
    if arch != "transformer":
        yield captured
        return

    def hook(module, args, kwargs):
        captured.clear()
        captured.update(kwargs)

    handle = _decoder_layers(model)[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def run_head(head: nn.ModuleList, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """(B, T, d) -> (B, T, d). Decoder layers return a tensor in recent transformers and a tuple
    in older ones; taking [0] of a tensor would silently pick batch element 0."""
    for block in head:
        hidden = block(hidden, **layer_kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def future_targets(targets: torch.Tensor, seg: torch.Tensor, k: int) -> torch.Tensor:
    """Targets for head k, (B, T): the label of token t+1+k of the same example, else IGNORE.
    `targets` is already shifted by one, so this is targets[t+k] when t and t+k share an example."""
    out = torch.full_like(targets, IGNORE)
    if k < targets.shape[1]:
        same = seg[:, :-k] == seg[:, k:]  # (B, T-k)
        out[:, :-k] = torch.where(same, targets[:, k:], IGNORE)
    return out


@register("caft")
class CAFT(Objective):
    """Concept-Aware Fine-Tuning, Chen, Zhang, Huang, Tao 2025, arXiv 2506.07833.

    Auxiliary heads h_1..h_K sit on the final (normed) hidden state and share the model's output
    head; head k predicts token t+1+k:
        L = sum_t CE(lm_head(h_t), y_{t+1})
          + sum_k coef * decay^k * sched(step) * sum_t CE(lm_head(head_k(h)_t), y_{t+1+k})
    normalised, like SFT, by the step's number of trained tokens. Defaults from the reference
    code: K=4, 1 decoder layer per head, coef 0.01, decay 0.8, rsine schedule.

    Readings we chose:
    - Per-head means of the reference code become sums over the step's trained tokens divided by
      the number of main-head tokens, so gradient accumulation and packing stay invariant; head k
      has k fewer targets per example, a relative difference of O(k / example length).
    - Head inputs: the final normed hidden state (the reference's fine-tuning mode; its head
      pre-training mode used hidden_states[-2]). Head layers get the last layer's own mask and
      rotary embeddings (the reference passed no mask); targets never cross packed examples.
    - Heads are objective state, never attached to the model: generation, the method's adapter
      and `export --merge` never see them. They are checkpointed ('objective.heads.*'), written to
      final/caft_heads.safetensors, and trained jointly by default (see `train_heads`).
    - sched counts optimizer steps: s and T come from the step context (T = train.steps).
    - When the effective weight coef * sched is 0 the heads are not run (the loss is SFT's).
    Metrics: `aux_weight` (coef * sched), `aux_loss` (mean CE over heads) and `aux_loss_k`."""

    Config = CAFTConfig

    def __init__(self, cfg: CAFTConfig | None = None):
        super().__init__(cfg)
        self.heads: nn.ModuleList | None = None

    def setup(self, model, tokenizer) -> None:
        if not _head_is_plain(model):
            raise ConfigError("objective.name: caft needs logits = lm_head(hidden); this model scales or caps them")
        if not self.cfg.train_heads and self.cfg.init_from is None:
            warnings.warn("caft: train_heads is false but no init_from: the heads stay random", stacklevel=2)
        self._ensure_heads(model)

    def _ensure_heads(self, model) -> nn.ModuleList:
        if self.heads is None:
            self.heads = build_heads(model, self.cfg)
            if self.cfg.init_from is not None:
                self.heads.load_state_dict(load_file(self.cfg.init_from, device=str(model.device)))
            self.heads.requires_grad_(self.cfg.train_heads)
        return self.heads

    def loss(self, model, batch, ctx: StepContext = OUTSIDE_TRAINING):
        heads = self._ensure_heads(model)
        weight = self.cfg.coef * schedule_coef(self.cfg.schedule, ctx.step - 1, ctx.total_steps)
        with last_layer_kwargs(model, self.cfg.head_arch) as layer_kwargs:
            hidden = model.get_decoder()(**model_inputs(batch)).last_hidden_state  # (B, T, d)
        lm_head, targets = model.get_output_embeddings(), batch["targets"]
        keep = targets != IGNORE
        main = chunked_head_cross_entropy(hidden[keep], lm_head, targets[keep], CHUNK)  # SFT's loss
        if weight == 0:
            return LossOutput(main, int(keep.sum()), {"aux_weight": 0.0})
        seg = segment_ids(batch)
        total, metrics = main, {"aux_weight": weight}
        for k, head in enumerate(heads, start=1):
            tk = future_targets(targets, seg, k)  # (B, T)
            keep_k = tk != IGNORE
            aux = chunked_head_cross_entropy(run_head(head, hidden, layer_kwargs)[keep_k], lm_head, tk[keep_k], CHUNK)
            total = total + weight * self.cfg.decay ** k * aux
            metrics[f"aux_loss_{k}"] = float(aux.detach()) / max(int(keep_k.sum()), 1)
        metrics["aux_loss"] = sum(metrics[f"aux_loss_{k}"] for k in range(1, len(heads) + 1)) / len(heads)
        return LossOutput(total, int(keep.sum()), metrics)

    # -- own state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.heads is None else {f"heads.{n}": t.detach() for n, t in self.heads.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        assert self.heads is not None, "call setup(model, tokenizer) before load_state_dict"
        self.heads.load_state_dict({n[len("heads."):]: t for n, t in state.items() if n.startswith("heads.")})

    def trained_modules(self) -> list:
        return [] if self.heads is None else [self.heads]

    def param_groups(self, weight_decay: float) -> list[dict]:
        if self.heads is None or not self.cfg.train_heads:
            return []
        return decay_groups(self.heads.parameters(), weight_decay)

    def save(self, out_dir) -> None:
        if self.heads is None:
            return
        tensors = {n: t.detach().contiguous() for n, t in self.heads.state_dict().items()}
        meta = {"num_heads": str(self.cfg.num_heads), "num_layers": str(self.cfg.num_layers),
                "head_arch": self.cfg.head_arch}
        save_file(tensors, str(Path(out_dir) / HEADS_FILE), metadata=meta)

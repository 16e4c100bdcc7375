"""Parameterization methods: what trains and how. Each module in this package registers one.

Public surface: `Method` (the base class), `METHODS` (the registry), `register`.
The loop, checkpointing, export and eval only call the hooks of `Method`; they never name a method.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

from tunelab.registry import METHODS, Component
from tunelab.run.context import StepContext

register = METHODS.register


class Method(Component):
    """Base class. A method transforms a model in place (`apply`) and then answers, through hooks,
    what trains (`trainable_state`, `param_groups`), what to do each step (`on_step`), how to save
    what it trained in a form the Hugging Face ecosystem loads (`save`/`load`), how to fold it into
    a plain model (`merge`) and how to run the base model again (`disabled`)."""

    supports_disable: ClassVar[bool] = True
    """Whether `disabled()` can recover the base model's function."""
    supports_merge: ClassVar[bool] = True
    """Whether `merge()` folds the change into a plain HF model with the same function."""
    parallel: ClassVar[tuple[str, ...]] = ("ddp",)
    """The train.parallel modes it can train under on several processes, the first being `auto`'s
    choice; empty when it cannot (then `single_process_why` says why)."""
    single_process_why: ClassVar[str] = ""
    private_why: ClassVar[str] = ""
    """Why this method cannot train with DP-SGD (privacy.dp_sgd), said before training; empty when
    it can (its choices then depend on the data only through the clipped, noised updates)."""
    frozen_base: ClassVar[bool] = False
    """Whether the base model's weights stay frozen for the whole run and are read only by their own
    layers' forward (LoRA, adapters, the prompt family): then, under bf16 compute, its frozen linear
    weights are stored once in bf16 (tunelab/training/lowp.py) instead of cast in every forward."""

    # -- set-up ---------------------------------------------------------------------------
    def apply(self, model):
        """Transform `model` in place for training and set requires_grad; return it."""
        raise NotImplementedError

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        """Optimizer groups: decay on matrices, none on vectors (norms, biases). A group may also set
        `lr` (absolute) or `lr_scale` (a multiple of train.lr, resolved by the optimizer)."""
        from tunelab.methods._shared import decay_groups
        return decay_groups((p for p in model.parameters() if p.requires_grad), weight_decay)

    def on_step(self, model, ctx: StepContext, optimizer) -> None:
        """Called after each optimizer step (re-selection, pruning, ...); `ctx.step` is the step
        just taken (1-based) of `ctx.total_steps`."""

    def stats(self, model) -> dict[str, float]:
        """Figures this method reports in the run log at each log step (e.g. FLOPs saved)."""
        return {}

    # -- state ----------------------------------------------------------------------------
    def trainable_state(self, model) -> dict[str, Any]:
        """Everything this method trains, by parameter name (for checkpoints)."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model, state: dict[str, Any]) -> None:
        params = dict(model.named_parameters())
        missing = sorted(set(self.trainable_state(model)) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"trainable state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch_no_grad():
            for n, t in state.items():
                if params[n].shape != t.shape:
                    raise ValueError(f"shape mismatch for {n}: checkpoint {tuple(t.shape)}, model {tuple(params[n].shape)}")
                params[n].copy_(t)

    # -- output ---------------------------------------------------------------------------
    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        """Write what was trained so that the HF ecosystem loads it (adapter or full model)."""
        raise NotImplementedError

    def load(self, model, out_dir: Path) -> None:
        """Load what `save` wrote into an `apply`-ed model."""
        raise NotImplementedError

    def merge(self, model):
        """Return a plain HF model with the trained change folded in (may reuse `model`)."""
        return model

    @contextmanager
    def disabled(self, model) -> Iterator[None]:
        """Within this context the model computes the base model's function."""
        raise NotImplementedError(f"method '{self.name}' cannot be disabled")
        yield


@contextmanager
def switched_off(modules) -> Iterator[None]:
    """`enabled = False` on each module for the duration: the usual body of `Method.disabled`."""
    modules = list(modules)
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def torch_no_grad():
    import torch
    return torch.no_grad()

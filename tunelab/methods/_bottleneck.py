"""Bottleneck adapter modules and how they attach to a block (He et al.'s unified view, §10 of the
methods brief): a modification  Δh = s · W_up f(W_down x)  added to a sublayer's output h.

- `SequentialAdapter` (Houlsby et al. 2019; Pfeiffer et al. 2021): x is the sublayer *output*,
  h <- h + s·Δ(h): the adapter sits after the sublayer, before the block's residual add.
- `ParallelAdapter` (He et al. 2022): x is the sublayer *input* (after the block's pre-norm),
  h <- h + s·Δ(x): a branch beside the sublayer.

Both are attached with forward hooks on the block's own sublayers, so no model file changes and
no base parameter is renamed; the adapter modules become children of their block
(`<block>.adapter_attn`, `<block>.adapter_ffn`) so that they move, save and load with it. Hooks
are bound methods of the adapter module, so `copy.deepcopy(model)` rewires them to the copies.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a sublayer was called with: first positional, else `hidden_states`."""
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(
        v for v in kwargs.values() if torch.is_tensor(v))


def _add_to_output(output, delta_fn):
    """Sublayers return a tensor (MLPs) or a tuple whose first entry is the hidden states
    (attention returns (out, weights)); add to that entry."""
    if isinstance(output, tuple):
        return (output[0] + delta_fn(output[0]),) + output[1:]
    return output + delta_fn(output)


class Bottleneck(nn.Module):
    """Δ(x) = s · up(dropout(f(down(x)))), (…, d) -> (…, r) -> (…, d).

    Init as He et al.'s `init_option="lora"`: W_down Kaiming-uniform, W_up and both biases zero,
    so Δ = 0 and the model starts exactly at the base. (PETL_AST zero-initialises W_down too,
    which leaves only the up-bias with a gradient; we do not.)"""

    reads_input: bool = False
    """Whether the branch reads the sublayer's input (parallel) rather than its output."""

    def __init__(self, dim: int, bottleneck: int, activation: str, scaling: float, dropout: float,
                 like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, dim, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.enabled = True

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scaling

    def attach(self, source: nn.Module, target: nn.Module) -> None:
        """Hook onto the sublayer: read from `source`, add to the output of `target`."""
        raise NotImplementedError


class SequentialAdapter(Bottleneck):
    """h <- h + s·Δ(h) on the output h of `target` (`source` is unused: the input is h)."""

    def attach(self, source: nn.Module, target: nn.Module) -> None:
        target.register_forward_hook(self._add)

    def _add(self, module, args, output):
        return _add_to_output(output, self.delta) if self.enabled else None


class ParallelAdapter(Bottleneck):
    """h <- h + s·Δ(x): x is the input of `source`, h the output of `target` (the same module for
    Llama's `mlp`; `intermediate` and `output.dense` for BERT's split FFN)."""

    reads_input = True

    def attach(self, source: nn.Module, target: nn.Module) -> None:
        self._x = None
        source.register_forward_pre_hook(self._read, with_kwargs=True)
        target.register_forward_hook(self._add)

    def _read(self, module, args, kwargs):
        self._x = _first_tensor(args, kwargs) if self.enabled else None

    def _add(self, module, args, output):
        if not self.enabled or self._x is None:
            return None
        x, self._x = self._x, None  # do not keep the activation alive past this layer
        return _add_to_output(output, lambda _: self.delta(x))


def hidden_size(model: nn.Module, target: nn.Module) -> int:
    """Width of the residual stream: the HF config's hidden_size, else the out_features of the
    last nn.Linear inside the sublayer (for plain nn.Module stacks)."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text, "hidden_size", None):
            return int(text.hidden_size)
    linears = [m for m in target.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the hidden size of {type(target).__name__}: it has no nn.Linear")
    return linears[-1].out_features


def bottlenecks(model: nn.Module) -> list[Bottleneck]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]

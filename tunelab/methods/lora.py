"""LoRA (Hu et al., 2021) and rsLoRA (Kalajdzievski, 2023).

A frozen linear layer W gets a trainable low-rank update:  y = W x + s * B A dropout(x),
A: (r, in) Kaiming-uniform, B: (out, r) zeros, so training starts at the base model.
s = alpha / r, or alpha / sqrt(r) with rsLoRA (keeps the update's scale stable as r grows).

The method is a converter (as in torchtitan): it swaps matching nn.Linear modules for `LoRALinear`;
no model file knows LoRA exists. Parameter names mirror PEFT's (`<path>.base_layer`, `.lora_A`,
`.lora_B`), so the saved adapter is a PEFT adapter: `PeftModel.from_pretrained(base, dir)` loads it.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import Method, register, switched_off
from tunelab.methods._shared import features, freeze_all, is_conv1d, select_linears, set_module
from tunelab.options import Options

PEFT_PREFIX = "base_model.model."


@dataclass(kw_only=True)
class LoRAConfig(Options):
    ranges: ClassVar = {"r": ">= 1", "alpha": "> 0", "dropout": "[0, 1)"}
    r: int = 16
    """Rank of the update."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] = ("all-linear",)
    """Linear layers to adapt: 'all-linear' (every nn.Linear but the output head), leaf names
    ('q_proj'), dotted suffixes ('self_attn.q_proj') or regexes matched against the full name."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    def validate(self) -> None:
        self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank trainable branch."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base
        n_in, n_out = features(base)
        self.lora_A = nn.Linear(n_in, r, bias=False, dtype=base.weight.dtype, device=base.weight.device)
        self.lora_B = nn.Linear(r, n_out, bias=False, dtype=base.weight.dtype, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self._fused_ok(x):
            return self._fused(x)
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """The fused path covers a frozen plain nn.Linear base without active dropout, in one dtype
        or under autocast (bf16 on CPU or GPU: everything is cast to the autocast dtype first, as
        autocast would). Anything else (dropout, a trainable base, hooks) takes the plain formula."""
        base = self.base_layer
        same = torch.is_autocast_enabled(x.device.type) or (
            base.weight.dtype == x.dtype == self.lora_A.weight.dtype == self.lora_B.weight.dtype)
        return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
                and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
                and (isinstance(self.dropout, nn.Identity) or not self.training) and same)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """_FrozenBaseLoRA on x flattened to (M, in). Under autocast its inputs are cast to the
        autocast dtype here (a frozen weight stored in it already, training/lowp.py, is used as is;
        A and B are cast per forward, their gradients come back in fp32 through the casts), and it
        runs with autocast off: its in-place accumulation needs one dtype."""
        base, kind = self.base_layer, x.device.type
        if not torch.is_autocast_enabled(kind):
            y = _FrozenBaseLoRA.apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias, self.lora_A.weight,
                                      self.lora_B.weight, self.scaling)
            return y.view(*x.shape[:-1], y.shape[-1])
        dt = torch.get_autocast_dtype(kind)
        bias = base.bias.to(dt) if base.bias is not None else None
        with torch.autocast(kind, enabled=False):
            y = _FrozenBaseLoRA.apply(x.reshape(-1, x.shape[-1]).to(dt), base.weight.to(dt), bias,
                                      self.lora_A.weight.to(dt), self.lora_B.weight.to(dt), self.scaling)
        return y.view(*x.shape[:-1], y.shape[-1])

    def merged_linear(self) -> nn.Module:
        """The base layer with W += s * B A folded in (in the base weight's dtype; transposed for
        a Conv1D, whose weight is (in, out))."""
        base = self.base_layer
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        if is_conv1d(base):
            delta = delta.t()
        with torch.no_grad():
            base.weight.add_(delta.to(base.weight.dtype))
        return base


class _FrozenBaseLoRA(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for a frozen W (and b), x flattened to (M, in).

    Same GEMMs as autograd on the module formula, without its full-size elementwise passes: the
    scaled update is accumulated into the base output by one addmm_ (beta=1, alpha=s) instead of
    a (M, out) product, a scale and a sum, and in backward x's gradient gets the LoRA term by
    addmm_ too instead of autograd summing two (M, in) gradients. Only x and x A^T (M, r) are kept
    for backward. Tested against the plain formula: outputs and all gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        xa = x @ lora_a.t()
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        gb = (g @ lora_b).mul_(ctx.scaling)  # (M, r): the gradient reaching x A^T
        grad_x = (g @ weight).addmm_(gb, lora_a) if ctx.needs_input_grad[0] else None
        grad_a = gb.t() @ x if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ xa).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@register("lora")
class LoRA(Method):
    """LoRA / rsLoRA on the selected linear layers; everything else frozen."""

    frozen_base = True

    Config = LoRAConfig

    def apply(self, model):
        freeze_all(model)
        self._all_linear_names = select_linears(model, ["all-linear"], conv1d=True)
        names = select_linears(model, self.cfg.target_modules, conv1d=True)
        self._fan_in_fan_out = any(is_conv1d(model.get_submodule(n)) for n in names)
        if not names:
            raise ConfigError(f"method.target_modules: {self.cfg.target_modules} matches no linear layer")
        for n in names:
            base = model.get_submodule(n)
            set_module(model, n, LoRALinear(base, self.cfg.r, self.cfg.scaling, self.cfg.dropout))
        self.target_names = names
        return model

    def trainable_state(self, model):
        return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}

    # -- PEFT-format output -----------------------------------------------------------------
    def _peft_config(self, base_name: str) -> dict:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in self.target_names})
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": self.cfg.r, "lora_alpha": self.cfg.alpha, "lora_dropout": self.cfg.dropout,
            "use_rslora": self.cfg.rslora, "bias": "none", "fan_in_fan_out": self._fan_in_fan_out,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "target_modules": self._peft_targets(leaves),
        }

    def _peft_targets(self, leaves: list[str]):
        """Leaf names when they select exactly our layers; otherwise an exact-name regex."""
        return leaves if len(self.target_names) == len(self._all_with_leaves(leaves)) else \
            "^(" + "|".join(re.escape(n) for n in self.target_names) + ")$"

    def _all_with_leaves(self, leaves):
        return [n for n in self._all_linear_names if n.rsplit(".", 1)[-1] in leaves]

    def save(self, model, tokenizer, out_dir: Path, base_name: str) -> None:
        from safetensors.torch import save_file

        state = {PEFT_PREFIX + n: t.contiguous() for n, t in self.trainable_state(model).items()}
        save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out_dir / "adapter_config.json").write_text(json.dumps(self._peft_config(base_name), indent=2))

    def load(self, model, out_dir: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(out_dir / "adapter_model.safetensors"))
        self.load_trainable_state(model, {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()})

    def merge(self, model):
        for n, m in _lora_modules(model).items():
            set_module(model, n, m.merged_linear())
        return model

    @contextmanager
    def disabled(self, model):
        with switched_off(_lora_modules(model).values()):
            yield

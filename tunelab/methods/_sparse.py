"""Shared pieces of the sparse and selective methods (spiel, lift, lt_sft, dsee, hft, greentrainer).

Element-level methods wrap a frozen nn.Linear in `SparseDeltaLinear`: W_eff = W + s * scatter(values
at flat indices), trained through `values` (k numbers) so gradients and optimizer state are O(k).
Tensor-level methods (`TensorSelection`) toggle requires_grad on whole tensors of a plain model.

Checkpoint contract: `trainable_state` holds the trained parameters plus the model *buffers* a
re-selection changed (sparse indices, a step counter, a selection mask), so a resume is exact.

Saved sparse deltas (`sparse_delta.safetensors` + `sparse_delta.json`): per wrapped layer
`<path>.sparse_indices` (int64, into the row-major flattened weight) and `<path>.sparse_values`;
`add_sparse_deltas` adds them onto any plain model with the same layer names (composition).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.methods._shared import decay_groups, freeze_all, set_module
from tunelab.run.device import model_device
from tunelab.methods.full import FullFineTuning

DELTA_FILE, DELTA_CONFIG = "sparse_delta.safetensors", "sparse_delta.json"


# ----------------------------------------------------------------------------- the layer

class _LinearSparseDelta(torch.autograd.Function):
    """y = x W_effᵀ + b. Saves x, W and the values, not W_eff: the dense effective weight is
    rebuilt in backward, so training holds O(k) extra memory per layer, not a weight copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, layer):
        ctx.layer, ctx.indices = layer, layer.sparse_indices
        ctx.save_for_backward(x, weight, values)
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dense_weight(weight, values), bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, values = ctx.saved_tensors
        layer, need = ctx.layer, ctx.needs_input_grad
        gx = (gy @ layer.dense_weight(weight, values).to(gy.dtype)).to(x.dtype) if need[0] else None
        gy2 = gy.reshape(-1, gy.shape[-1])                                     # (tokens, out)
        gw = gy2.T @ x.reshape(-1, x.shape[-1]).to(gy.dtype)                   # (out, in), dense
        layer.on_weight_grad(gw)
        gb = gy2.sum(0) if ctx.has_bias and need[2] else None
        gv = (gw.reshape(-1)[ctx.indices] * layer.scale).to(values.dtype) if need[3] else None
        return gx, (gw.to(weight.dtype) if need[1] else None), gb, gv, None


class SparseDeltaLinear(nn.Module):
    """A frozen nn.Linear plus a sparse additive delta:  y = x (W + s * D)ᵀ + b,
    D = scatter(`sparse_values` (k,) at `sparse_indices` (k,)) over W flattened row-major."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.base_layer, self.scale, self.enabled = base, scale, True
        dev = base.weight.device
        self.register_buffer("sparse_indices", indices.to(dev, torch.int64), persistent=False)
        self.sparse_values = nn.Parameter(torch.zeros(len(indices), device=dev))  # fp32 deltas

    def fixed_terms(self) -> tuple:
        """Frozen extra (indices, values) terms added before the trained delta (LIFT's retired ones)."""
        return ()

    def on_weight_grad(self, grad: torch.Tensor) -> None:
        """Sees the dense gradient of W_eff (out, in) of each backward (SpIEL's regrowth)."""

    def dense_weight(self, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        w = weight.reshape(-1)
        for idx, vals in self.fixed_terms():
            w = w.index_add(0, idx, vals.to(w.dtype))
        return w.index_add(0, self.sparse_indices, values.to(w.dtype), alpha=self.scale).view_as(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self.enabled or (self.sparse_values.numel() == 0 and not self.fixed_terms()):
            return base(x)
        return _LinearSparseDelta.apply(x, base.weight, base.bias, self.sparse_values, self)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The base layer with the delta folded in (computed exactly as in forward)."""
        base = self.base_layer
        base.weight.copy_(self.dense_weight(base.weight, self.sparse_values))
        return base


# ----------------------------------------------------------------------------- model surgery

def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def split_budget(sizes: list[int], total: int) -> list[int]:
    """Split `total` across layers proportionally to `sizes`, summing exactly to `total`
    (largest remainder), each capped at its layer's size."""
    whole = sum(sizes)
    if not 0 <= total <= whole:
        raise ConfigError(f"method: {total} tunable weights requested, the target layers hold {whole}")
    exact = [total * s / whole for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: out[i] - exact[i])[: total - sum(out)]:
        out[i] += 1
    return out


def merge_layers(model: nn.Module) -> nn.Module:
    for n, m in sparse_layers(model).items():
        set_module(model, n, m.merged_linear())
    return model


@contextmanager
def layers_disabled(model: nn.Module):
    layers = list(sparse_layers(model).values())
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


@torch.no_grad()
def reset_moments(optimizer, param: torch.Tensor, slots: torch.Tensor, source: torch.Tensor | None = None):
    """In place on the optimizer's tensors: moments of `slots` restart at 0; with `source`
    (new -> old slot, -1 for none) every slot takes its old moments (a re-ordering)."""
    state = optimizer.state.get(param) if optimizer is not None else None
    for key in ("exp_avg", "exp_avg_sq"):
        t = state.get(key) if state else None
        if t is None:
            continue
        if source is not None:
            t.copy_(torch.where(source >= 0, t[source.clamp(min=0)], torch.zeros_like(t)))
        t[slots] = 0


# ----------------------------------------------------------------------------- checkpoint state

def root_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """A method's bookkeeping (step counter, selection mask) as a non-persistent model buffer:
    it moves with the model and is checkpointed through `trainable_state`, never exported."""
    model.register_buffer(name, value.to(next(model.parameters()).device), persistent=False)


def drop_root_buffers(model: nn.Module, prefix: str) -> None:
    for n in [n for n in model._buffers if n.startswith(prefix)]:
        del model._buffers[n]


def layer_state(model: nn.Module, buffers: tuple[str, ...] = ("sparse_indices",)) -> dict:
    """Trained values and the named buffers of every SparseDeltaLinear, by full name."""
    out = {}
    for n, m in sparse_layers(model).items():
        out[f"{n}.sparse_values"] = m.sparse_values.detach()
        out |= {f"{n}.{b}": getattr(m, b) for b in buffers}
    return out


@torch.no_grad()
def load_state(model: nn.Module, state: dict, expected: set[str], resizable: bool = False) -> None:
    """Copy parameters and replace buffers by name. `resizable`: parameters may change length
    (same Parameter object, new storage) -- LT-SFT's deltas are sized when its mask is chosen."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(params) - set(buffers))
    if missing or unexpected:
        raise ValueError(f"trainable state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in state.items():
        if name in params:
            _load_param(params[name], t, name, resizable)
        else:
            owner, _, leaf = name.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            mod.register_buffer(leaf, t.to(buffers[name].device, buffers[name].dtype).clone(), persistent=False)


def _load_param(p: nn.Parameter, t: torch.Tensor, name: str, resizable: bool) -> None:
    if p.shape == t.shape:
        p.copy_(t)
    elif resizable and t.ndim == 1 and p.ndim == 1:
        p.data = t.to(p.device, p.dtype).clone()
    else:
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(t.shape)}, model {tuple(p.shape)}")


# ----------------------------------------------------------------------------- saved deltas

def sparse_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every SparseDeltaLinear's delta as indices + values, its fixed terms too (CPU tensors)."""
    state = {}
    for n, m in sparse_layers(model).items():
        state[f"{n}.sparse_indices"] = m.sparse_indices.contiguous().cpu()
        state[f"{n}.sparse_values"] = m.sparse_values.detach().contiguous().cpu()
        for j, (idx, vals) in enumerate(m.fixed_terms()):
            state[f"{n}.fixed{j}_indices"], state[f"{n}.fixed{j}_values"] = idx.cpu(), vals.cpu()
    return state


def save_sparse(model: nn.Module, out_dir: Path, method: str, cfg, extra: dict | None = None,
                state: dict | None = None) -> None:
    """Write `state` (default: `sparse_state(model)`) and a small JSON config."""
    from safetensors.torch import save_file

    save_file(state if state is not None else sparse_state(model), str(Path(out_dir) / DELTA_FILE),
              metadata={"format": "pt"})
    meta = {"format": "tunelab-sparse-delta", "version": 1, "method": method,
            "scale": next(iter(sparse_layers(model).values())).scale, "options": asdict(cfg)} | (extra or {})
    (Path(out_dir) / DELTA_CONFIG).write_text(json.dumps(meta, indent=2))


def read_sparse(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    if not (out_dir / DELTA_FILE).exists():
        raise TunelabError(f"{out_dir}: no {DELTA_FILE} (not a saved sparse delta)")
    return load_file(str(out_dir / DELTA_FILE)), json.loads((out_dir / DELTA_CONFIG).read_text())


def delta_terms(state: dict[str, torch.Tensor]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, bool]]]:
    """{layer path: [(indices, values, scaled), ...]} from a saved delta file; `scaled` marks the
    trained term (multiplied by the method's scale s), the fixed terms are stored unscaled."""
    out: dict[str, list] = {}
    for key in sorted(k for k in state if k.endswith("_indices")):
        path, _, leaf = key.rpartition(".")
        term = leaf.removesuffix("_indices")
        out.setdefault(path, []).append((state[key], state[f"{path}.{term}_values"], term == "sparse"))
    return out


@torch.no_grad()
def add_sparse_deltas(model: nn.Module, dirs: list, scale: float = 1.0) -> nn.Module:
    """Add saved sparse deltas onto a plain model in place: W += scale * s * D for each directory
    (LT-SFT composition, e.g. a language delta plus a task delta; scale=-1 removes one again)."""
    for d in dirs:
        state, meta = read_sparse(d)
        for path, terms in delta_terms(state).items():
            w = model.get_submodule(path).weight
            for idx, vals, scaled in terms:
                alpha = scale * (meta["scale"] if scaled else 1.0)
                w.view(-1).index_add_(0, idx.to(w.device), vals.to(w.device, w.dtype), alpha=alpha)
    return model


# ----------------------------------------------------------------------------- tensor-level selection

class TensorSelection(FullFineTuning):
    """Base of methods that choose which whole tensors train, re-chosen on a schedule (HFT,
    GreenTrainer). The model stays a plain HF model and is saved whole, like full fine-tuning.
    Frozen tensors hold no optimizer state: it is dropped when a tensor leaves the selection, so
    one that comes back starts with fresh Adam moments."""

    supports_disable = False
    parallel = ()
    single_process_why = "it changes which tensors train during the run; DDP and FSDP fix them at the start"

    def _init_selection(self, model, candidates: list[str]) -> None:
        self.candidates, self.ever = candidates, set()
        freeze_all(model)
        root_buffer(model, self._step_key, torch.zeros(1, dtype=torch.int64, device=model_device(model)))

    @property
    def _step_key(self) -> str:
        return f"{self.name}_step"

    def _step(self, model) -> int:
        return int(getattr(model, self._step_key))

    def _set_step(self, model, step: int) -> None:
        getattr(model, self._step_key).fill_(step)

    def set_trainable(self, model, names: set[str], optimizer=None, grad_also: set[str] = frozenset()) -> None:
        """`names` train from now on; `grad_also` only get gradients (probing)."""
        params = dict(model.named_parameters())
        for n in self.candidates:
            params[n].requires_grad_(n in names or n in grad_also)
            if optimizer is not None and n not in names:
                optimizer.state.pop(params[n], None)
        self.trainable = set(names)

    def mark_trained(self) -> None:
        """Called by on_step before any re-selection: the tensors of the step just done changed."""
        self.ever |= self.trainable

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        params = dict(model.named_parameters())
        ps = [params[n] for n in self.candidates]  # frozen ones too: the optimizer is built once
        return decay_groups(ps, weight_decay)

    def trainable_state(self, model) -> dict:
        """Every tensor trained so far (all may differ from the base) plus the method's buffers."""
        params = dict(model.named_parameters())
        return {n: params[n].detach() for n in self.candidates if n in self.ever} | {
            n: b for n, b in model.named_buffers() if n.startswith(f"{self.name}_")}

    def load_trainable_state(self, model, state: dict) -> None:
        expected = {n for n, _ in model.named_buffers() if n.startswith(f"{self.name}_")}
        load_state(model, state, expected)
        self.ever = {n for n in state if n in dict(model.named_parameters())}
        self._restore(model)

    def _restore(self, model) -> None:
        """Re-apply the selection that the loaded buffers describe."""
        raise NotImplementedError

    def merge(self, model):
        drop_root_buffers(model, f"{self.name}_")
        return model

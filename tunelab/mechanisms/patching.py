"""Activation patching on plain forward hooks: run a source model, keep what chosen modules
computed, then run a target model with those activations written over its own.

A `Site` names a module (its full name in `model.named_modules()`), optionally one attention head
and optionally positions:
    Site("model.layers.5")                                   the block's output, every position
    Site("model.layers.5.mlp", positions=(-1,))              the MLP's output at the last token
    Site("model.layers.5.self_attn.o_proj", head=3, positions=(-1,))
                                                             head 3's output at the last token
A site without a head patches the module's *output* (the first element when it returns a tuple).
A site with a head patches the module's *input*, head h's slice of it: the input of an attention
block's output projection (`o_proj`, `c_proj`, ...) is the concatenation of the heads' outputs,
(B, T, n_heads * d_head), and the projection then runs with the *target's* weights. This is CMAP's
`cmap_out` (Prakash et al. 2024, arXiv 2402.14811, experiment_3/cmap_utils.py): per-head outputs
before W_O are replaced, and W_O is the patched model's own.

Positions index the sequence axis (negative from the end); None means every position. Source and
target must read inputs of the same shape (the same prompts, padded alike: left padding keeps the
last token at -1 in every row).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.errors import TunelabError

Cache = dict[tuple[str, str], torch.Tensor]
"""(kind, module name) -> activation (B, T, D); kind is 'output', or 'input' for head sites."""


@dataclass(frozen=True)
class Site:
    module: str
    """Full module name, e.g. 'model.layers.5.self_attn.o_proj'."""
    head: int | None = None
    """Patch this head's slice of the module's input (None: the module's whole output)."""
    positions: tuple[int, ...] | None = None
    """Sequence positions to patch (negative from the end); None: all."""

    @property
    def key(self) -> tuple[str, str]:
        return ("output" if self.head is None else "input", self.module)


def resolve(model: nn.Module, sites: Sequence[Site]) -> dict[str, nn.Module]:
    """The modules the sites name; a name that is not a module of `model` is an error naming the
    closest ones."""
    names = dict(model.named_modules())
    for site in sites:
        if site.module not in names:
            near = difflib.get_close_matches(site.module, list(names), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else "; see model.named_modules()"
            raise TunelabError(f"site module '{site.module}': no such module in {type(model).__name__}{hint}")
    return {s.module: names[s.module] for s in sites}


def num_heads(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not n:
        raise TunelabError(f"{type(model).__name__}: its config names no num_attention_heads; head sites need it")
    return int(n)


def _head_columns(site: Site, width: int, heads: int) -> slice:
    """Columns of head `site.head` in an input of `width` features split into `heads` equal parts."""
    if width % heads:
        raise TunelabError(f"site {site.module}: its input has {width} features, not a multiple of {heads} heads "
                           "(a head site names an attention output projection, whose input is the heads' outputs)")
    if not 0 <= site.head < heads:
        raise TunelabError(f"site {site.module}: head {site.head} out of range, the model has {heads} heads")
    d = width // heads
    return slice(site.head * d, (site.head + 1) * d)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def record_activations(model: nn.Module, sites: Sequence[Site], **inputs) -> Cache:
    """Run `model(**inputs)` once and return what each site's module read (head sites) or wrote."""
    modules, cache, handles = resolve(model, sites), {}, []
    for site in sites:
        kind, name = site.key
        if kind == "input":
            hook = (lambda n: lambda m, args: cache.__setitem__(("input", n), args[0].detach().clone()))(name)
            handles.append(modules[name].register_forward_pre_hook(hook))
        else:
            hook = (lambda n: lambda m, args, out: cache.__setitem__(("output", n), _first(out).detach().clone()))(name)
            handles.append(modules[name].register_forward_hook(hook))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return cache


def _overwrite(x: torch.Tensor, src: torch.Tensor, site: Site, cols: slice) -> torch.Tensor:
    """`x` (B, T, D) with src's values at the site's positions and columns."""
    if src.shape != x.shape:
        raise TunelabError(f"site {site.module}: the source activation has shape {tuple(src.shape)}, the target's "
                           f"{tuple(x.shape)}; run both models on the same inputs")
    out = x.clone()
    pos = slice(None) if site.positions is None else list(site.positions)
    out[:, pos, cols] = src[:, pos, cols].to(device=x.device, dtype=x.dtype)
    return out


def _output_hook(site: Site, src: torch.Tensor):
    def hook(module, args, out):
        patched = _overwrite(_first(out), src, site, slice(None))
        return (patched, *out[1:]) if isinstance(out, tuple) else patched
    return hook


def _input_hook(site: Site, src: torch.Tensor, heads: int):
    def hook(module, args):
        cols = _head_columns(site, args[0].shape[-1], heads)
        return (_overwrite(args[0], src, site, cols), *args[1:])
    return hook


@contextmanager
def patch_activations(target: nn.Module, source_cache: Cache, sites: Sequence[Site]) -> Iterator[None]:
    """Within this context, every forward of `target` has the sites' activations replaced by those in
    `source_cache` (from `record_activations` on the source model with the same sites and inputs)."""
    modules, handles = resolve(target, sites), []
    heads = num_heads(target) if any(s.head is not None for s in sites) else 0
    try:
        for site in sites:
            if site.key not in source_cache:
                raise TunelabError(f"site {site.module}: the source cache has no {site.key[0]} of this module; "
                                   "record it with the same sites")
            src, module = source_cache[site.key], modules[site.module]
            if site.head is None:
                handles.append(module.register_forward_hook(_output_hook(site, src)))
            else:
                handles.append(module.register_forward_pre_hook(_input_hook(site, src, heads)))
        yield
    finally:
        for h in handles:
            h.remove()

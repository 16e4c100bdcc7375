"""Cross-model activation patching (CMAP) on entity tracking: score heads, patch the top ones from
the fine-tuned model into the base (and back), and measure how much of the accuracy gap they carry.
See entity_tracking.py for the task and our reading of the paper."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tunelab.mechanisms.entity_tracking import (Prompts, _device, _on, accuracy, head_sites, label_logprob,
                                                last_logits, out_projections)
from tunelab.mechanisms.patching import Site, num_heads, record_activations


def attribution_scores(target: nn.Module, source: nn.Module, prompts: Prompts, batch_size: int = 16) -> torch.Tensor:
    """(layers, heads): sum over prompts of (a_source - a_target) . d log p(label) / d a_target, with a
    the head's output at the last token (attribution patching: patching's first-order estimate)."""
    projs, heads = out_projections(target), num_heads(target)
    scores = torch.zeros(len(projs), heads, device="cpu")  # host-side totals
    sites = [Site(n, head=0) for n in projs]  # head 0: records each projection's whole input
    for i in range(0, len(prompts), batch_size):
        chunk = prompts.chunk(i, batch_size)
        src = record_activations(source, sites, **_on(chunk, _device(source)))
        seen: dict[str, torch.Tensor] = {}
        handles = [target.get_submodule(n).register_forward_pre_hook(_keep(seen, n)) for n in projs]
        handles.append(target.get_input_embeddings().register_forward_hook(_grad_from_here))
        try:
            with torch.enable_grad():
                logits = target(**_on(chunk, _device(target))).logits[:, -1]
                label_logprob(logits, chunk.labels.to(logits.device)).sum().backward()
        finally:
            for h in handles:
                h.remove()
        for layer, name in enumerate(projs):
            a = seen[name]
            delta = (src[("input", name)] - a.detach())[:, -1]  # (B, heads * d_head)
            scores[layer] += (delta * a.grad[:, -1]).view(len(chunk), heads, -1).sum((0, 2)).float().cpu()
    target.zero_grad(set_to_none=True)
    return scores


def _keep(seen: dict, name: str):
    def hook(module, args):
        args[0].retain_grad()
        seen[name] = args[0]
    return hook


def _grad_from_here(module, args, out):
    """Embeddings of a frozen model: make the graph start here, so every later activation has a gradient."""
    return out if out.requires_grad else out.detach().requires_grad_(True)


@torch.no_grad()
def exact_scores(target: nn.Module, source: nn.Module, prompts: Prompts, batch_size: int = 16) -> torch.Tensor:
    """(layers, heads): the mean change of log p(label) when one head's last-token output is patched
    from `source` into `target` (one pass over the prompts per head)."""
    layers, heads = len(out_projections(target)), num_heads(target)
    base = label_logprob(last_logits(target, prompts, batch_size), prompts.labels).mean()
    scores = torch.zeros(layers, heads, device="cpu")
    for layer in range(layers):
        for h in range(heads):
            logits = last_logits(target, prompts, batch_size, source, head_sites(target, [(layer, h)]))
            scores[layer, h] = label_logprob(logits, prompts.labels).mean() - base
    return scores


def ranked_heads(scores: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, head) pairs by score, highest first."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True).tolist()
    return [divmod(i, scores.shape[1]) for i in order]


@dataclass
class Recovery:
    base_accuracy: float
    tuned_accuracy: float
    rows: list[list] = field(default_factory=list)
    """[k, base with the tuned model's top-k heads, tuned with the base's top-k heads, share recovered]."""

    def share(self, patched: float) -> float | None:
        gap = self.tuned_accuracy - self.base_accuracy
        return (patched - self.base_accuracy) / gap if gap else None


@torch.no_grad()
def _run_recording(model: nn.Module, names: list[str], chunk: Prompts) -> tuple[torch.Tensor, dict]:
    """(last-token logits (B, V), every named projection's input) of one forward."""
    cache: dict = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        (lambda n: lambda m, args: cache.__setitem__(("input", n), args[0].detach().clone()))(n)) for n in names]
    try:
        logits = model(**_on(chunk, _device(model))).logits[:, -1].float().cpu()
    finally:
        for h in hooks:
            h.remove()
    return logits, cache


@torch.no_grad()
def recovery(base: nn.Module, tuned: nn.Module, prompts: Prompts, heads: list[tuple[int, int]], ks: list[int],
             batch_size: int = 16) -> Recovery:
    """Accuracy of base and tuned, then per k: base with the tuned model's top-k heads and tuned with the
    base's. Both models' head outputs are recorded once per batch and reused for every k."""
    from tunelab.mechanisms.patching import patch_activations

    names = out_projections(base)
    hits = torch.zeros(2 + 2 * len(ks), device="cpu")  # logits come back to the host
    for i in range(0, len(prompts), batch_size):
        chunk = prompts.chunk(i, batch_size)
        (lb, cb), (lt, ct) = _run_recording(base, names, chunk), _run_recording(tuned, names, chunk)
        found = [lb, lt]
        for k in ks:
            sites = head_sites(base, heads[:k])
            for target, cache in ((base, ct), (tuned, cb)):
                with patch_activations(target, cache, sites):
                    found.append(target(**_on(chunk, _device(target))).logits[:, -1].float().cpu())
        hits += torch.tensor([float((f.argmax(-1) == chunk.labels).sum()) for f in found], device="cpu")
    acc = (hits / len(prompts)).tolist()
    rec = Recovery(acc[0], acc[1])
    for j, k in enumerate(ks):
        forward, back = acc[2 + 2 * j], acc[3 + 2 * j]
        rec.rows.append([k, forward, back, rec.share(forward)])
    return rec


SCORERS = {"attribution": attribution_scores, "exact": exact_scores}
"""How heads are ranked (see the module docstrings)."""

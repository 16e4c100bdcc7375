"""What a shared gradient reveals about the tokens of its batch (the leakage ReCIT and DAGER build
on), measured defensively: recall and precision of the token set an observer would read off.

- Embedding rows: the input-embedding gradient dL/dE is non-zero exactly on the rows of the
  batch's tokens (for tied embeddings we take the input part: what sharing an untied input
  embedding would reveal).
- Span membership: a linear layer's weight gradient sum_t delta_t x_t^T has its rows in
  span{x_t}; at layer 0, x_t = RMSNorm(E[token]) does not depend on the position (RoPE comes after
  the projection), so a vocabulary token is declared present when its x lies in the gradient's
  row space (relative residual below `tol`). LoRA's dL/dA = s B^T sum_t delta_t x_t^T has rank
  <= r, so it can only hold up to r of those directions (and is 0 while B = 0).
- Defences: DP-SGD's shared tensor is the per-example clipped sum plus N(0, sigma^2 C^2); FedKSeed's
  messages reveal only g_t = z_t . grad for known random z_t, so the observer's best linear read is
  sum_t g_t z_t (simulated exactly in distribution: z restricted to the audited tensor, the rest of
  the model's contribution to g_t as an independent Gaussian of the same variance).
No reconstruction of text is attempted: the audit stops at the token set.
"""
from __future__ import annotations

import math

import torch


def precision_recall(found: set, true: set) -> tuple[float | None, float | None]:
    """(precision, recall) of the recovered set `found` against `true`. Over an empty set a ratio is
    not measured (None, shown as n/a): nothing recovered is not a precision of 1 (nor of 0)."""
    hit = len(found & true)
    return (hit / len(found) if found else None), (hit / len(true) if true else None)


def nonzero_rows(g: torch.Tensor, rel: float = 1e-6) -> set[int]:
    norms = g.float().norm(dim=1)
    return set(torch.nonzero(norms > rel * float(norms.max()) if float(norms.max()) > 0 else norms > 0).flatten().tolist())


def span_members(g: torch.Tensor, x: torch.Tensor, tol: float = 1e-3) -> set[int]:
    """Rows v of x (V, d) whose relative residual off the row space of g (m, d) is below tol."""
    g = g.double()
    if float(g.abs().max()) == 0:
        return set()
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    basis = vh[s > s[0] * 1e-6]  # (k, d)
    xd = x.double()
    resid = (xd - (xd @ basis.T) @ basis).norm(dim=1) / xd.norm(dim=1).clamp_min(1e-12)
    return set(torch.nonzero(resid < tol).flatten().tolist())


def layer0_inputs(model) -> torch.Tensor:
    """x_v = RMSNorm_0(E[v]) for every vocabulary token, (V, d): what layer 0's projections see."""
    emb = model.get_input_embeddings().weight
    norm = model.get_decoder().layers[0].input_layernorm
    with torch.no_grad():
        return norm(emb.unsqueeze(0)).squeeze(0).float()


def layer0_q(model):
    """Layer 0's q projection module (a plain Linear, or a LoRA-wrapped one)."""
    return model.get_decoder().layers[0].self_attn.q_proj


def example_grads(model, loss_of, tensors: list[torch.Tensor], batch: list[dict]) -> list[list[torch.Tensor]]:
    """Per example of `batch`: the gradients of its loss w.r.t. `tensors`."""
    out = []
    for ex in batch:
        grads = torch.autograd.grad(loss_of(model, ex), tensors, allow_unused=True)
        out.append([torch.zeros_like(t) if g is None else g.detach() for t, g in zip(tensors, grads)])
    return out


def shared(per_example: list[torch.Tensor], mechanism: str, clip: float, sigma: float, steps: int,
           rest_norm: float, gen: torch.Generator) -> torch.Tensor:
    """What an observer sees of one tensor: the gradient sum ('none'), DP-SGD's clipped and noised
    sum ('dp'), or FedKSeed's read sum_t g_t z_t over `steps` seed-scalar pairs ('fedkseed')."""
    total = torch.stack(per_example).sum(0).double()
    if mechanism == "dp":
        clipped = [g.double() * min(1.0, clip / (float(g.norm()) + 1e-12)) for g in per_example]
        return torch.stack(clipped).sum(0) + sigma * clip * _normal(total.shape, gen, total.device)
    if mechanism == "fedkseed":
        est = torch.zeros_like(total)
        for _ in range(steps):
            z = _normal(total.shape, gen, total.device)
            g = float((z * total).sum()) + rest_norm * float(_normal((), gen, total.device))
            est += g * z
        return est
    return total


def _normal(shape, gen: torch.Generator, device) -> torch.Tensor:
    """N(0, 1) in fp64, drawn on the CPU from `gen` (the same draws on any device), on `device`."""
    return torch.randn(shape, generator=gen, dtype=torch.float64, device="cpu").to(device)


def top_rows(g: torch.Tensor, k: int) -> set[int]:
    """The k rows of largest norm (an observer that knows how many tokens there are)."""
    return set(torch.topk(g.float().norm(dim=1), k).indices.tolist())


def secret_rank(scores: list[float], true_score: float) -> int:
    """1 + how many candidates score at least as high as the true secret."""
    return 1 + sum(s >= true_score for s in scores)


def exposure(rank: int, num_candidates: int) -> float:
    """log2(candidates + 1) - log2(rank) (Carlini et al. 2019), over the sampled candidates."""
    return math.log2(num_candidates + 1) - math.log2(rank)

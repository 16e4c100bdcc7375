"""GOT-D: Kang, Just, et al., "Get more for less: Principled Data Selection for Warming Up
Fine-Tuning in LLMs" (ICLR 2024; arXiv 2405.02774; reference code REDSgnaoh/DV4LLM).

Choose k rows of a candidate pool U that move the training distribution toward a target set T.
With both as uniform point clouds of embeddings, solve the entropic optimal-transport problem
between T and U; the candidate-side dual potential g_j is the gradient of OT(T, U) with respect to
candidate j's mass, and the calibrated gradient g_j - sum_{i != j} g_i / (N - 1) (LAVA) says how
much the distance falls when j's mass grows. Both are increasing in g_j, so the rows chosen are
the k with the smallest potential.

    cost      C_ij = ||t_i - u_j||^2 / mean(C)          (m targets, n candidates)
    Sinkhorn  f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)
              g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps)      (log domain, a, b uniform)
    select    the k smallest g_j (ties by pool order)

Readings chosen where the sources differ or are silent:
- Sinkhorn in the log domain in torch (the reference uses ott-jax; no JAX here). The cost is
  divided by its mean, so `epsilon` is relative to the typical squared distance and means the
  same for any embedding scale (the reference's 0.1 is for its DistilBERT embeddings).
- Embeddings: mean-pooled final hidden states of the model being tuned (the brief's default;
  the reference fine-tunes DistilBERT on the target task). Rows are embedded as the chat template
  renders them; the reference's 1000-character re-chunking is not done (rows here are short).
- No domain pre-filter (the reference's optional first step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tunelab.curate import DataStage, Workspace, register
from tunelab.curate._io import load_input
from tunelab.curate.random_select import SelectConfig, check_k, selected
from tunelab.data.records import Record
from tunelab.errors import TunelabError


def _weights(cost: torch.Tensor, n: int, b: torch.Tensor | None) -> torch.Tensor:
    """`b` (uniform 1/n when None) on the cost's device and in its dtype: (n,)."""
    return cost.new_full((n,), 1.0 / n) if b is None else b.to(cost.device, cost.dtype)


def sinkhorn(cost: torch.Tensor, eps: float, max_iters: int = 2000, tol: float = 1e-4,
             b: torch.Tensor | None = None):
    """Log-domain Sinkhorn between uniform rows and columns weighted `b` (uniform when None):
    (f (m,), g (n,), iterations, marginal error) for a cost matrix (m, n)."""
    m, n = cost.shape
    log_a, log_b = _weights(cost, m, None).log(), _weights(cost, n, b).log()
    f, g = cost.new_zeros(m), cost.new_zeros(n)  # on the cost's device, in its dtype
    err = float("inf")
    for it in range(1, max_iters + 1):
        f = -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b[None, :], dim=1)
        g = -eps * torch.logsumexp((f[:, None] - cost) / eps + log_a[:, None], dim=0)
        if it % 10 == 0 or it == max_iters:  # g was just fitted, so columns are exact; check the rows
            rows = torch.logsumexp((f[:, None] + g[None, :] - cost) / eps + log_b[None, :], dim=1).exp()
            err = float((rows - 1).abs().max())  # row i's mass relative to a_i
            if err < tol:
                break
    return f, g, it, err


def transport_plan(f: torch.Tensor, g: torch.Tensor, cost: torch.Tensor, eps: float,
                   b: torch.Tensor | None = None) -> torch.Tensor:
    """P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps): (m, n)."""
    m, n = cost.shape
    b = _weights(cost, n, b)
    return torch.exp((f[:, None] + g[None, :] - cost) / eps) * b[None, :] / m


def ot_value(cost: torch.Tensor, eps: float, b: torch.Tensor | None = None) -> float:
    """The entropic OT value at convergence, its dual sum_i a_i f_i + sum_j b_j g_j."""
    m, n = cost.shape
    f, g, _, _ = sinkhorn(cost, eps, max_iters=20000, tol=1e-10, b=b)
    b = _weights(cost, n, b)
    return float(f.mean() + (g * b).sum())


def sq_cost(target: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (m, n) in float64, divided by their mean."""
    cost = torch.cdist(target.double(), cand.double()).pow(2)
    return cost / cost.mean().clamp_min(1e-12)


def calibrated_gradient(g: torch.Tensor) -> torch.Tensor:
    """LAVA's calibrated gradient g_j - sum_{i != j} g_i / (N - 1): an increasing map of g_j."""
    n = g.numel()
    return g - (g.sum() - g) / max(n - 1, 1)


def rank_by_potential(g: torch.Tensor, k: int) -> list[int]:
    """The k candidates with the smallest potential, smallest first (ties by index); all when
    k >= N. A constant added to g changes nothing (only the order counts)."""
    order = sorted(range(g.numel()), key=lambda j: (float(g[j]), j))
    return order[:k]


def select(cand: torch.Tensor, target: torch.Tensor, k: int, eps: float = 0.1, max_iters: int = 2000):
    """GOT-D on embeddings: (chosen indices, calibrated gradient per candidate, Sinkhorn info)."""
    f, g, iters, err = sinkhorn(sq_cost(target, cand), eps, max_iters)
    grad = calibrated_gradient(g)
    return rank_by_potential(grad, k), grad, {"iterations": iters, "marginal_error": err}


@dataclass(kw_only=True)
class GOTDConfig(SelectConfig):
    ranges: ClassVar = {"epsilon": "> 0", "max_iters": ">= 1", "batch_size": ">= 1", "max_length": ">= 8"}
    target: str = "builtin:arith?n=100&split=train&seed=7"
    """Rows of the target distribution (a small sample of the task to fine-tune for)."""
    epsilon: float = 0.1
    """Entropic regularisation, relative to the mean squared distance (the reference's 0.1)."""
    max_iters: int = 2000
    """Sinkhorn iterations at most (the reference's 2000)."""
    batch_size: int = 32
    """Rows embedded per forward pass."""
    max_length: int = 256
    """Tokens of a row embedded at most."""


@register("got_d")
class GOTD(DataStage):
    """Select the k pool rows with the smallest OT dual potential toward the target set."""

    verb: ClassVar[str] = "select"
    uses_model: ClassVar[bool] = True
    Config = GOTDConfig

    def run(self, ws: Workspace) -> list[Record]:
        c = self.cfg
        pool, target = load_input(c.pool, "pool"), load_input(c.target, "target")
        check_k(c.k, pool, c.pool)
        ws.say(f"got_d: embedding {len(pool)} candidates and {len(target)} target rows")
        emb_pool, emb_target = ws.embed(pool, c.batch_size, c.max_length), ws.embed(target, c.batch_size, c.max_length)
        chosen, grad, info = select(emb_pool, emb_target, c.k, c.epsilon, c.max_iters)
        if not torch.isfinite(grad).all():
            raise TunelabError("got_d: the OT potentials are not finite; raise epsilon")
        ws.say(f"got_d: Sinkhorn {info['iterations']} iterations, marginal error {info['marginal_error']:.2g}")
        return selected(self.name, pool, chosen, calibrated_gradient=grad)

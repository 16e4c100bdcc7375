"""FedKSeed (Qin, Chen, Qian, Ding, Li, Deng 2024, "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", arXiv 2312.06353): zeroth-order
fine-tuning where only (seed index, scalar gradient) pairs travel. Framework-free; the Flower apps
(federated/flower/) and the privacy audit use these functions.

- The server draws K candidate seeds once (`candidate_seeds`); every party regenerates the
  perturbation z(s) of a seed s the same way (`directions`: N(0, I) per trainable tensor, in the
  method's parameter order, drawn in fp32 on the CPU with torch's generator seeded by s, so z is the
  same on every machine and device).
- A client step (MeZO-style two-point estimate, `zo_step`): pick seed index i (uniformly, or with
  FedKSeed-Pro's probabilities); g = (L(theta + eps z) - L(theta - eps z)) / (2 eps), rounded to
  fp32 (the value that is sent); theta <- theta - lr g z. The perturbed weights are restored from a
  copy, so the only change a step makes is the update.
- Aggregation (`aggregate`): delta[i] = sum_c w_c sum_{t: i_t = i} g_{c,t}, w_c the clients' shares
  of examples (or equal), an fp32 K-vector per round.
- Replay (`replay_round`): theta_{r+1} = theta_r - lr sum_i delta[i] z(s_i), applied seed by seed
  in index order. Every party applies the same fp32 numbers in the same order to the same start,
  so every client and the server reconstruct the same weights bit for bit.
- FedKSeed-Pro (`pro_probabilities`): seed i's importance a_i is the mean |clip(g, -c, c)| of
  the scalar gradients it received so far (history initialised with one 0), p = softmax(minmax(a)),
  so the most important seed is at most e times as likely as the least.

Readings we chose: weight decay is not applied (the paper's runs use 0; with it, replay would also
need the decay term); a step whose g is not finite sends g = 0 and changes nothing, so a message
always carries exactly `local_steps` pairs.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch

SEED_RANGE = 10**11
"""Seeds are drawn from [1, SEED_RANGE), as in the reference code."""


def candidate_seeds(seed: int, k: int) -> np.ndarray:
    """K distinct candidate seeds, (K,) int64, determined by `seed`."""
    rng = np.random.default_rng(seed)
    out = np.unique(rng.integers(1, SEED_RANGE, size=2 * k, dtype=np.int64))
    return rng.permutation(out)[:k]


def directions(params: list[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """z(seed) for each tensor of `params`, in order: N(0, I), drawn in fp32 on the CPU."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    for p in params:
        yield torch.randn(p.shape, generator=g, dtype=torch.float32, device="cpu").to(p.device, p.dtype)


@torch.no_grad()
def apply_seed(params: list[torch.Tensor], seed: int, coeff: float) -> None:
    """theta += coeff * z(seed), in place."""
    for p, z in zip(params, directions(params, seed)):
        p.add_(z, alpha=coeff)


@torch.no_grad()
def zo_step(params: list[torch.Tensor], loss: Callable[[], float], seed: int, eps: float, lr: float) -> float:
    """One two-point zeroth-order step along z(seed); returns the projected gradient g (fp32-rounded;
    0.0 when it is not finite, and then nothing changes)."""
    saved = [p.detach().clone() for p in params]
    zs = list(directions(params, seed))
    values = []
    for sign in (1.0, -1.0):
        for p, s, z in zip(params, saved, zs):
            torch.add(s, z, alpha=sign * eps, out=p.data)
        values.append(float(loss()))
    for p, s in zip(params, saved):
        p.copy_(s)
    g = float(np.float32((values[0] - values[1]) / (2 * eps)))
    if not math.isfinite(g):
        return 0.0
    for p, z in zip(params, zs):
        p.add_(z, alpha=-lr * g)
    return g


def replay(params: list[torch.Tensor], seeds: np.ndarray, pairs: list[tuple[int, float]], lr: float) -> None:
    """Apply (seed index, g) pairs in order, as the steps that produced them did."""
    for i, g in pairs:
        apply_seed(params, int(seeds[i]), -lr * float(g))


def replay_round(params: list[torch.Tensor], seeds: np.ndarray, delta: np.ndarray, lr: float) -> None:
    """theta <- theta - lr sum_i delta[i] z(s_i), seed by seed in index order (zeros skipped)."""
    for i in np.flatnonzero(delta):
        apply_seed(params, int(seeds[i]), -lr * float(delta[i]))


def aggregate(replies: list[tuple[np.ndarray, np.ndarray, float]], k: int) -> np.ndarray:
    """(K,) fp32: sum over clients of weight * (their g summed per seed index). `replies` holds
    (indices, g, weight) per client; weights are normalised here."""
    total = sum(w for _, _, w in replies)
    delta = np.zeros(k, dtype=np.float64)
    for idx, g, w in replies:
        np.add.at(delta, idx.astype(np.int64), g.astype(np.float64) * (w / total))
    return delta.astype(np.float32)


def pro_probabilities(abs_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro: softmax of the min-max normalised mean |clipped g| per seed, (K,) fp64."""
    a = abs_sum / count
    span = a.max() - a.min()
    a = (a - a.min()) / span if span > 0 else np.zeros_like(a)
    e = np.exp(a - a.max())
    return e / e.sum()


def pro_record(abs_sum: np.ndarray, count: np.ndarray, idx: np.ndarray, g: np.ndarray, clip: float) -> None:
    """Add received scalar gradients to the per-seed history (as running |clip(g)| sums), in place."""
    np.add.at(abs_sum, idx.astype(np.int64), np.abs(np.clip(g.astype(np.float64), -clip, clip)))
    np.add.at(count, idx.astype(np.int64), 1)


def sample_indices(k: int, n: int, rng: np.random.Generator, probs: np.ndarray | None = None) -> np.ndarray:
    """n seed indices, uniformly or with FedKSeed-Pro's probabilities, (n,) int32."""
    if probs is None:
        return rng.integers(0, k, size=n).astype(np.int32)
    return rng.choice(k, size=n, p=probs).astype(np.int32)


def message_bytes(k: int, local_steps: int, pro: bool) -> dict[str, int]:
    """Payload bytes per client per round: download the round's fp32 K-vector (and, with Pro, the
    fp32 probabilities); upload local_steps int32 indices and fp32 scalars."""
    down = 4 * k * (2 if pro else 1)
    up = 8 * local_steps
    return {"download": down, "upload": up, "total": down + up}

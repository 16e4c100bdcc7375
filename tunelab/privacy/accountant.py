"""Privacy accounting for DP-SGD: Renyi DP of the Poisson-subsampled Gaussian mechanism, composed
over steps and converted to (epsilon, delta).

For sampling rate q, noise multiplier sigma and an integer order alpha >= 2 (Mironov, Talwar,
Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3):
    A_alpha = sum_{k=0..alpha} C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))
    RDP(alpha) = log(A_alpha) / (alpha - 1)                          per step; T steps: T * RDP
computed in log space. RDP composes additively; the conversion to (epsilon, delta) is the tighter
one of Balle et al. 2020 (Prop. 12, as Opacus uses):
    epsilon = min_alpha  T RDP(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)
Only integer orders are used (the fractional-order series is not needed for a sound bound; it can
only lower epsilon slightly). The mechanism assumed is Poisson sampling with rate q = batch / N;
tunelab's batches are shuffled fixed-size draws, the usual practice, which this bound treats as
Poisson sampling (stated wherever epsilon is reported).
"""
from __future__ import annotations

import math

ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256, 512, 1024)


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def log_a(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha of the subsampled Gaussian (see the module docstring)."""
    if q == 0:
        return 0.0
    if q == 1.0:
        return alpha * (alpha - 1) / (2 * sigma ** 2)
    out = -math.inf
    for k in range(alpha + 1):
        term = (math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2))
        out = _log_add(out, term)
    return out


def rdp(q: float, sigma: float, steps: int, orders=ORDERS) -> list[float]:
    """T-step RDP at each order (inf without noise)."""
    if sigma == 0:
        return [math.inf for _ in orders]
    return [steps * log_a(q, sigma, a) / (a - 1) for a in orders]


def epsilon(q: float, sigma: float, steps: int, delta: float, orders=ORDERS) -> tuple[float, int]:
    """(epsilon, the order that gives it) after `steps` steps at sampling rate q; inf without noise."""
    if steps == 0 or q == 0:
        return 0.0, orders[0]
    best = (math.inf, orders[0])
    for a, r in zip(orders, rdp(q, sigma, steps, orders)):
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, (max(eps, 0.0), a))
    return best

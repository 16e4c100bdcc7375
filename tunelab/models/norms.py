"""RMSNorm with a hand-written backward, for fp32 activations (fp32 training, and bf16 autocast).

transformers' RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`) leaves autograd about ten
full-size passes for its backward (pow, mean, rsqrt, two products and their reductions); the
closed form needs five: with x̂ = x * r and r = rsqrt(mean(x^2) + eps),

    grad_x = r * (g*w - x̂ * mean(g*w * x̂)),    grad_w = sum over tokens of g * x̂.

`fuse_rms_norms(model)` swaps each norm's class for a subclass whose forward uses this when input
and weight are fp32 and the original forward otherwise. Under bf16 autocast the residual stream
stays fp32 (linear outputs are added to fp32 embeddings) and the norm's ops (pow, mean, rsqrt,
products) are not low-precision autocast ops, so the closed form runs there too, with the same
forward. A norm class is swapped only after its own forward, on a random input, matched the closed form (values and gradients):
a variant such as Gemma's `(1 + weight)` fails that check and is left alone.
"""
from __future__ import annotations

import torch

_FUSED: dict[type, type | None] = {}  # norm class -> its fused subclass, None when it failed the check


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xhat = x * r
        gw = g * weight
        grad_w = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        dot = (gw * xhat).mean(-1, keepdim=True)
        grad_x = gw.sub_(xhat.mul_(dot)).mul_(r) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def _eps(module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if hidden_states.dtype == w.dtype == torch.float32:  # under autocast too: its ops stay fp32 there
        return rms_norm(hidden_states, w, _eps(self))
    return super(type(self), self).forward(hidden_states)


def _matches(module) -> bool:
    """Does this norm's own forward equal the closed form (values, grad of x and of weight)?"""
    import copy

    d, dev = module.weight.shape[-1], module.weight.device
    gen = torch.Generator(device="cpu").manual_seed(0)  # drawn on the host, the same on any device
    x = torch.randn(2, 3, d, generator=gen, device="cpu").to(dev).requires_grad_(True)
    w = (1 + 0.3 * torch.randn(d, generator=gen, device="cpu")).to(dev).requires_grad_(True)
    g = torch.randn(2, 3, d, generator=gen, device="cpu").to(dev)
    probe = copy.deepcopy(module).float()
    probe.weight = torch.nn.Parameter(w.detach().clone())
    try:
        with torch.autocast("cpu", enabled=False):
            want = type(module).forward(probe, x)
            want_x, want_w = torch.autograd.grad(want, (x, probe.weight), g)
            got = rms_norm(x, w, _eps(module))
            got_x, got_w = torch.autograd.grad(got, (x, w), g)
    except Exception:  # noqa: BLE001 -- a norm we cannot probe is left as it is
        return False
    return all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
               for a, b in ((got, want), (got_x, want_x), (got_w, want_w)))


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Swap the class of every RMSNorm in `model` whose forward passes the check; returns how many
    norms use the closed form now (idempotent)."""
    fused = {c for c in _FUSED.values() if c is not None}
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls in fused:
            count += 1
            continue
        if not cls.__name__.endswith("RMSNorm") or _eps(module) is None \
                or not isinstance(getattr(module, "weight", None), torch.nn.Parameter) or module.weight.dim() != 1:
            continue
        if cls not in _FUSED:
            _FUSED[cls] = type(cls.__name__, (cls,), {"forward": _fused_forward, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__}) if _matches(module) else None
            if _FUSED[cls] is not None:
                fused.add(_FUSED[cls])
        if _FUSED[cls] is not None:
            module.__class__ = _FUSED[cls]
            count += 1
    return count

"""Output head + cross-entropy, fused: sum_t CE(W h_t + b, y_t) without keeping the logits.

The head is the largest matmul of a small model and its fp32 logits the largest tensor. Autograd
would keep the (N, V) logits and log-softmax output for the backward and run softmax's backward
as separate passes. Here each chunk of rows computes its logits, turns them in place into their
gradient (softmax - one-hot), and multiplies that straight into the gradients of the hidden states
(and of W, b when they train); the backward only scales those by the incoming gradient. At most one
chunk's logits exist at a time and nothing is recomputed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.run.casts import cast_once


def head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                       chunk_tokens: int) -> torch.Tensor:
    """sum_t CE(head(hidden_t), y_t) in fp32 logits, `chunk_tokens` rows at a time.

    Fused (above) when `head` is a plain nn.Linear with no hooks and a gradient is wanted; an
    adapted or hooked head takes the checkpointed per-chunk path, which gives the same values."""
    if not _plain_linear(head):
        return _checkpointed(hidden, head, targets, chunk_tokens)
    args = (hidden, head.weight, head.bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)):
        with torch.no_grad():
            return _FusedHeadCE.forward(None, *args, targets, chunk_tokens)
    return _FusedHeadCE.apply(*args, targets, chunk_tokens)


def _plain_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks
                                                  or getattr(head, "parametrizations", None))


def _checkpointed(hidden, head, targets, chunk_tokens):
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    if hidden.shape[0] <= chunk_tokens:
        return chunk_loss(hidden, targets)
    return sum(checkpoint(chunk_loss, hidden[i:i + chunk_tokens], targets[i:i + chunk_tokens], use_reentrant=False)
               for i in range(0, hidden.shape[0], chunk_tokens))


def _in_autocast_dtype(weight: torch.Tensor) -> torch.Tensor:
    """The head's weight as autocast would cast it for F.linear (the same rounding), cast once per
    call, and once per optimizer step inside a training step (`run/casts.py`): inside this function
    autocast caches nothing (grad mode is off), so F.linear would cast the (V, d) matrix again for
    every chunk, and the gradient's matmul once more."""
    dev = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return cast_once(weight, torch.get_autocast_dtype(dev))
    return weight


class _FusedHeadCE(torch.autograd.Function):
    """hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) -> scalar loss sum.

    The matmuls run in whatever dtype autocast gives them (as `head(h)` would); the logits, the
    log-sum-exp and the softmax are fp32. Gradients are computed in the forward only when an input
    needs them (no work under torch.no_grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        need_h = ctx is not None and hidden.requires_grad
        need_w = ctx is not None and weight.requires_grad
        need_b = ctx is not None and bias is not None and bias.requires_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # (V, d): the first chunk's product becomes it, so no zero-filled buffer is written
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        total = hidden.new_zeros((), dtype=acc)
        w = _in_autocast_dtype(weight)
        for i in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[i:i + chunk_tokens], targets[i:i + chunk_tokens]
            out = F.linear(h, w, bias)  # (n, V), in the dtype autocast picks (as head(h) would)
            logits, out_dtype = out.to(acc), out.dtype  # a fresh tensor: ours to overwrite
            del out  # under autocast a separate low-precision copy: not kept for the chunk
            target = logits.gather(1, y[:, None]).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(-1, keepdim=True)  # exp(logit - max), in place
            total += (top.squeeze(1) + sums.squeeze(1).log() - target).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = softmax - one-hot, written over the logits
            logits.div_(sums)
            logits[torch.arange(y.shape[0], device=y.device), y] -= 1
            g = logits.to(out_dtype)
            if need_h:
                grad_h[i:i + chunk_tokens] = g.mm(w.to(g.dtype))
            if need_w:
                if grad_w is None:  # in g's dtype, rounded as autograd's matmul would be
                    grad_w = g.t().mm(h.to(g.dtype)).to(acc)
                elif g.dtype == h.dtype == acc:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += g.t().mm(h.to(g.dtype))
            if need_b:
                grad_b += logits.sum(0)
        if need_w and grad_w is None:  # no rows: a zero gradient, as before
            grad_w = torch.zeros_like(weight, dtype=acc)
        if ctx is not None:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else _scaled(grad_h, grad_out.to(grad_h.dtype), grad_h.dtype),
                _scaled(grad_w, grad_out, w_dtype), _scaled(grad_b, grad_out, b_dtype), None, None)


def _scaled(grad, grad_out: torch.Tensor, dtype):
    """(grad * grad_out) in `dtype`. The loss is almost always back-propagated as is (grad_out = 1);
    then the gradient computed in the forward is returned without a scaled copy, which for the
    head's (V, d) gradient is as large as the model's embedding."""
    if grad is None:
        return None
    if not grad_out.requires_grad and bool(grad_out == 1):
        return grad.to(dtype)
    return (grad * grad_out).to(dtype)

"""Attention for packed rows that never computes across examples.

transformers' padding-free path isolates packed examples with a block-diagonal (N, N) mask; SDPA
then runs its masked kernel over the whole row: cost grows with the square of the row length and,
on CPU, the fused causal kernel is not used. `packed_sdpa` instead runs causal SDPA on each
example's slice (from `cu_seq_lens_q`), so attention costs sum(len_i^2) and takes the fast
`is_causal` path. Without `cu_seq_lens_q` (padded batches, generation) it is transformers' SDPA.

On a GPU, with bf16/fp16 compute and no dropout, the row goes instead to PyTorch's
variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`) in one call: a per-example
loop there would launch hundreds of tiny kernels per layer. Equality of the two paths is tested on
a GPU (tests/test_gpu.py); elsewhere the loop runs.

Registered as attention implementation "tunelab_sdpa" (with SDPA's mask builder), so any model
that supports SDPA can use it: `model.set_attn_implementation("tunelab_sdpa")`.

A training-time attention pattern (S²-Attn, SF-Attn: tunelab.models.shifted) sits on each
attention module as attribute `PATTERN`; while the module trains, `packed_sdpa` hands it the call
(in eval mode, full attention runs). `example_spans` says where each example of a batch lies, for
the patterns and for token elimination (tunelab.models.lemo). During generation with a KV budget,
attribute `KV` hands the call to the compressed cache (tunelab.models.h2o).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

from tunelab.run.device import cpu_flags

NAME = "tunelab_sdpa"
PATTERN = "tunelab_pattern"
"""Attribute of an attention module holding its training-time pattern (a callable with this
module's attention signature that returns (B, N, H, D))."""
KV = "tunelab_kv"
"""Attribute of an attention module holding the compressed (H2O) cache layer of the generation
running now (tunelab.models.h2o); while it is set, that layer attends."""


def attention_modules(model) -> list:
    """The model's self-attention modules (they carry an int `layer_idx` and an `o_proj`)."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "o_proj")]


def training_pattern(module):
    """The pattern `module` runs now: its PATTERN while it trains, else None (full attention)."""
    return module.__dict__.get(PATTERN) if module.training else None


def example_spans(batch: int, length: int, attention_mask, cu: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in a (batch, length) input: the examples of a packed row
    (bounds `cu`, i.e. `cu_seq_lens_q`), else each row's non-padded run, read off the last query's
    row of the 4-D mask (True or 0.0 = attended), else whole rows."""
    if cu is not None and batch == 1 and int(cu[-1]) == length:
        bounds = cu.tolist()
        return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    if attention_mask is None or attention_mask.dim() != 4:
        return [(b, 0, length) for b in range(batch)]
    last = attention_mask[:, 0, -1, -length:]  # (B, length): the keys the last query may see
    valid = last if last.dtype == torch.bool else last == 0
    spans = []
    for b in range(batch):
        idx = valid[b].nonzero()
        if len(idx):
            spans.append((b, int(idx[0]), int(idx[-1]) + 1))
    return spans


def packed_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """query (1, H, N, D), key/value (1, Hkv, N, D) -> ((1, N, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = module.__dict__.get(KV)
    if kv is not None and not module.training:
        return kv.attend(query, key, value, attention_mask, scaling), None
    pattern = training_pattern(module)
    if pattern is not None:
        return pattern(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs), None
    cu = kwargs.get("cu_seq_lens_q")
    bounds = cu.tolist() if cu is not None else None
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or bounds[0] != 0 \
            or bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if not _plain_causal(kwargs, max(sizes)):  # a sliding window that bites, or a logit softcap: the masked kernel
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    dtype = _flash_dtype(query)
    if dtype is not None and not (dropout and module.training):
        out = _varlen(query, key, value, cu, max(sizes), scaling, dtype)
        if out is not None:
            return out, None
    gqa = query.shape[1] != key.shape[1]
    fp32 = cpu_attention_in_fp32(query)
    # one call site for both precisions: moving the loop into a helper called from two branches made
    # torch 2.13's inductor miscompile compiled blocks (tests/test_train.py::test_compiled_and_eager_steps_agree)
    with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
        if fp32:
            query, key, value = query.float(), key.float(), value.float()
        # split (not slicing): its backward concatenates the pieces' gradients once, where slices
        # would each build a zero-filled full-size gradient to be summed
        parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa,
                                                dropout_p=dropout if module.training else 0.0)
                 for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)) if q.shape[2]]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def cpu_attention_in_fp32(query: torch.Tensor) -> bool:
    """Whether the per-example attention of a CPU bf16-autocast step runs in fp32 rather than in
    autocast's bf16: on a CPU without AMX tiles, PyTorch's CPU flash kernel is about twice as slow
    in bf16 as in fp32 (SmolLM2's attention shapes, forward and backward; `python
    bench/attention_precision.py`), and fp32 is the more exact of the two. With AMX-BF16 the bf16
    kernel runs on the tiles; that was not measured, so autocast keeps bf16 there. The inputs are
    cast up (RoPE already leaves queries and keys in fp32 under autocast) and the output is fp32,
    which the output projection casts back down as autocast would. Not inside `torch.compile`
    (`train.compile`): torch 2.13's inductor miscompiled the fp32 branch there (a NameError in its
    generated wrapper on SmolLM2), so compiled blocks keep autocast's bf16."""
    if torch.compiler.is_compiling():
        return False
    return query.device.type == "cpu" and torch.is_autocast_enabled("cpu") \
        and torch.get_autocast_dtype("cpu") == torch.bfloat16 and "amx_bf16" not in cpu_flags()


def _plain_causal(kwargs: dict, longest: int) -> bool:
    """Whether plain causal attention within each example is what the layer asks: no logit
    softcap or attention sinks, and no sliding window shorter than the longest example (Mistral,
    Gemma 2/3 and Qwen's sliding layers pass theirs as `sliding_window`; the mask carries it)."""
    window = kwargs.get("sliding_window")
    return (window is None or longest <= window) and kwargs.get("softcap") is None and kwargs.get("s_aux") is None


@functools.lru_cache(maxsize=None)
def _flash_runs_on(device: torch.device) -> bool:
    """Has this torch the varlen kernel (2.9 on), and is `device` a GPU it runs on (Ampere on)?
    Asked once per device, not per layer and step."""
    import importlib.util
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None \
        and torch.cuda.get_device_capability(device)[0] >= 8


def _flash_dtype(query: torch.Tensor):
    """The half dtype the varlen flash kernel would run in, or None where it can't run here."""
    if not query.is_cuda or not _flash_runs_on(query.device):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset[str]:
    """The keyword names `fn` takes (read once per function, not per layer and step)."""
    return frozenset(inspect.signature(fn).parameters)


def _varlen(query, key, value, cu: torch.Tensor, longest: int, scaling, dtype) -> torch.Tensor | None:
    """Causal attention of each example in a packed row, in one varlen flash call: (1, N, H, D).
    None where this torch's varlen_attn can't express the call (its early versions take no scale)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _parameters(varlen_attn)
    default_scale = query.shape[-1] ** -0.5
    if "scale" not in params and scaling is not None and abs(scaling - default_scale) > 1e-6 * default_scale:
        return None
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (N, heads, D)
    if k.shape[1] != q.shape[1] and "enable_gqa" not in params:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    extra = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    extra |= {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    cu = cu.to(device=q.device, dtype=torch.int32)
    extra |= {"scale": scaling} if "scale" in params else {}
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return out.unsqueeze(0)


def register() -> str:
    """Make "tunelab_sdpa" known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME

"""The machine's ceiling: matmul throughput on the model's own GEMM shapes, and the nominal
training FLOPs per token (6N full, ~4N LoRA: no weight gradients for the frozen base, plus
attention) used to express each contender's speed as a fraction of it."""
from __future__ import annotations

import time

import torch


def gemm_shapes(cfg, tokens: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count per layer-stack) of the forward matmuls for `tokens` tokens."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return [(tokens, d, d, 2 * L), (tokens, d, kv, 2 * L), (tokens, d, f, 2 * L), (tokens, f, d, L),
            (tokens, d, cfg.vocab_size, 1)]


def gemm_gflops(cfg, tokens: int, dtype: torch.dtype, device: str, repeats: int = 3) -> float:
    """FLOP-weighted throughput (GFLOP/s) over the model's GEMM shapes in `dtype`."""
    total_flop, total_s = 0.0, 0.0
    for m, k, n, count in gemm_shapes(cfg, tokens):
        a = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        torch.nn.functional.linear(a, w)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(a, w)
        sync(device)
        total_s += (time.perf_counter() - t0) / repeats * count
        total_flop += 2.0 * m * k * n * count
    return total_flop / total_s / 1e9


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_token(cfg, n_params: int, mode: str, seq_len: float) -> float:
    """Nominal training FLOPs per token: 6N (full) or 4N (LoRA), plus causal attention
    (QK^T and AV: 2 * 2 * L * d * s/2 forward, x3 with backward)."""
    attention = 3 * 2 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return (6 if mode == "full" else 4) * n_params + attention

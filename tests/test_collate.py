"""Collation: packed rows restart positions and never attend across examples, packed and padded
batches give the same targets, loss and logits, and split micro-batches keep every example."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from test_data import CHAT, MULTI, cfg
from tunelab.data import IGNORE, Example, Record, collate, encode, model_inputs

# ---------------------------------------------------------------- collate


def _ex(ids, labels):
    return Example(input_ids=list(ids), labels=list(labels))


def test_packed_collate_restarts_positions_and_never_crosses_boundaries():
    a, b = _ex([5, 6, 7], [-100, 6, 7]), _ex([8, 9], [8, 9])
    batch = collate([a, b], packing=True, pad_id=0)
    assert set(batch) == {"input_ids", "position_ids", "targets", "cu_seqlens"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["targets"].tolist() == [[6, 7, -100, 9, -100]]  # 7 never predicts 8
    assert batch["cu_seqlens"].tolist() == [0, 3, 5] and batch["cu_seqlens"].dtype == torch.int32


def test_padded_collate():
    batch = collate([_ex([5, 6, 7], [-100, 6, 7]), _ex([8, 9], [8, 9])], packing=False, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["targets"].tolist() == [[6, 7, -100], [9, -100, -100]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=9),
                min_size=1, max_size=5))
def test_packed_and_padded_targets_agree(rows):
    examples = [_ex([t for t, _ in r], [t if keep else IGNORE for t, keep in r]) for r in rows]
    packed, padded = collate(examples, True, 0), collate(examples, False, 0)
    cu = packed["cu_seqlens"].tolist()
    for i, ex in enumerate(examples):
        seg = packed["targets"][0, cu[i]:cu[i + 1]]
        assert seg.tolist() == padded["targets"][i, :len(ex)].tolist()
        assert seg[-1] == IGNORE
    assert (padded["targets"] != IGNORE).sum() == (packed["targets"] != IGNORE).sum()


# ---------------------------------------------------------------- packed == padded on a model

def _examples(tok):
    records = [Record(messages=MULTI), Record(messages=CHAT[1:]), Record(text="The quick brown fox."),
               Record(messages=[{"role": "user", "content": "Where does Zorblax live?"},
                                {"role": "assistant", "content": "Quenth"}])]
    return encode(records, tok, cfg())


def test_packed_loss_and_logits_equal_padded(tok, model):
    examples = _examples(tok)
    packed, padded = collate(examples, True, tok.pad_token_id), collate(examples, False, tok.pad_token_id)
    with torch.no_grad():
        lp = model(**model_inputs(packed)).logits  # (1, N, V)
        ld = model(**model_inputs(padded)).logits  # (B, T, V)
    loss_p = F.cross_entropy(lp.flatten(0, 1), packed["targets"].flatten(), ignore_index=IGNORE)
    loss_d = F.cross_entropy(ld.flatten(0, 1), padded["targets"].flatten(), ignore_index=IGNORE)
    assert abs(loss_p.item() - loss_d.item()) < 1e-5
    cu = packed["cu_seqlens"].tolist()
    for i, ex in enumerate(examples):
        torch.testing.assert_close(lp[0, cu[i]:cu[i + 1]], ld[i, :len(ex)], atol=1e-5, rtol=1e-5)


def test_packed_isolation_needs_use_cache_false(tok, model):
    """transformers 5.23 only splits a packed row by position_ids when there is no KV cache; Llama
    makes one whenever use_cache is on (the config default). If this starts failing, transformers
    fixed it and `model_inputs` no longer needs use_cache=False."""
    examples = _examples(tok)
    packed = collate(examples, True, tok.pad_token_id)
    with torch.no_grad():
        safe = model(**model_inputs(packed)).logits
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    n0 = len(examples[0])
    torch.testing.assert_close(safe[0, :n0], leaky[0, :n0])  # the first example is unaffected
    assert not torch.allclose(safe[0, n0:], leaky[0, n0:], atol=1e-3)


def test_per_example_attention_equals_masked_sdpa(model):
    """tunelab_sdpa on a packed row (per-example causal SDPA) equals transformers' masked SDPA, and
    on padded batches is transformers' SDPA itself; gradients agree too."""
    import copy

    from tunelab.data import collate, model_inputs
    from tunelab.models.attention import register

    g = torch.Generator().manual_seed(1)
    exs = [Example(ids := torch.randint(3, 320, (n,), generator=g).tolist(), ids) for n in (4, 11, 7, 1)]
    fast = copy.deepcopy(model)
    fast.set_attn_implementation(register())
    for packing in (True, False):
        b = collate(exs, packing=packing, pad_id=0)
        ref, out = model(**model_inputs(b)).logits, fast(**model_inputs(b)).logits
        keep = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
        torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
        out[keep].sum().backward()
        ref[keep].sum().backward()
    for (n, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=n)


def _varlen_by_loop(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's documented contract ((N, H, D) rows cut at cu), written as a loop: a stand-in
    for the CUDA-only kernel, to test what tunelab hands it."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    sizes = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max_k == max(sizes)
    parts = [F.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1), is_causal=True,
                                            scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
             for a, b, c in zip(q.split(sizes), k.split(sizes), v.split(sizes))]
    return torch.cat(parts)


def _varlen_old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.9's signature: no scale, no GQA, causal by flag."""
    assert is_causal and q.shape[1] == k.shape[1]
    return _varlen_by_loop(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


@pytest.mark.parametrize("kernel", [_varlen_by_loop, _varlen_old])
def test_packed_rows_reach_the_varlen_kernel_as_documented(kernel, monkeypatch):
    """Where the flash kernel runs (a GPU, half precision), a packed row goes to varlen_attn as
    (N, H, D) with int32 boundaries and a causal window, and comes back as (1, N, H, D) equal to the
    per-example loop: for both signatures torch has had, with and without GQA."""
    import torch.nn.attention.varlen as varlen

    from tunelab.models import attention

    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    monkeypatch.setattr(attention, "_flash_dtype", lambda q: torch.float32)  # no GPU here: fp32 stand-in
    torch.manual_seed(0)
    sizes, heads, dim = [3, 9, 1, 6], 4, 8
    cu = torch.tensor([0, *sizes]).cumsum(0)
    module = torch.nn.Module().eval()
    for kv in (4, 2):
        q, k, v = (torch.randn(1, h, sum(sizes), dim) for h in (heads, kv, kv))
        out, _ = attention.packed_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)
        monkeypatch.setattr(attention, "_flash_dtype", lambda q: None)
        ref, _ = attention.packed_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)
        monkeypatch.setattr(attention, "_flash_dtype", lambda q: torch.float32)
        assert out.shape == ref.shape == (1, sum(sizes), heads, dim)
        torch.testing.assert_close(out, ref)
    # a non-default scale the old kernel can't take falls back to the loop
    if kernel is _varlen_old:
        assert attention._varlen(q, k, v, cu, max(sizes), 0.5, torch.float32) is None


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, {"avx512_bf16", "amx_bf16"}])
def test_cpu_bf16_attention_runs_in_fp32_without_amx(flags, monkeypatch):
    """Under CPU bf16 autocast, a packed row's per-example attention runs in fp32 on a CPU without
    AMX: the output (and the gradients of q, k, v) are those of fp32 SDPA on the same inputs, bit
    for bit. With AMX-BF16 it is left to autocast: bf16, as plain autocast would run it."""
    from tunelab.models import attention

    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset(flags))
    torch.manual_seed(0)
    sizes = [3, 9, 1, 6]
    cu = torch.tensor([0, *sizes]).cumsum(0)
    module = torch.nn.Module().train()
    q, k = torch.randn(1, 4, 19, 8, requires_grad=True), torch.randn(1, 2, 19, 8, requires_grad=True)
    v = torch.randn(1, 2, 19, 8, dtype=torch.bfloat16, requires_grad=True)  # v_proj's output is bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.packed_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    amx = "amx_bf16" in flags
    assert out.dtype == (torch.bfloat16 if amx else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amx):  # the reference: each example alone
        ref = torch.cat([F.scaled_dot_product_attention(a, b, c.float() if not amx else c, is_causal=True,
                                                        enable_gqa=True)
                         for a, b, c in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))], 2)
    ref = ref.transpose(1, 2)
    want = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    assert torch.equal(out, ref)
    for g, w in zip(grads, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_compiled_blocks_keep_autocast_bf16_attention(monkeypatch):
    """Inside torch.compile (train.compile) the fp32 branch is not taken: torch 2.13's inductor
    miscompiled it on SmolLM2 (`make bench`'s tunelab+compile row failed), so compiled blocks run
    autocast's bf16 attention as before."""
    from tunelab.models import attention

    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    q = torch.randn(1, 4, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.cpu_attention_in_fp32(q)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not attention.cpu_attention_in_fp32(q)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("budget", [1, 9, 20, 1000])
def test_split_batch_keeps_every_example_and_the_loss_sum(packing, budget, model):
    """Pieces respect the budget (an over-long example stays whole), keep every example in order,
    and their SFT loss sums add up to the whole batch's."""
    import random as _random

    from tunelab.data.collate import split_batch
    from tunelab.objectives import OBJECTIVES

    rng = _random.Random(budget)
    exs = []
    for _ in range(5):
        ids = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 12))]
        exs.append(Example(ids, [-100] + ids[1:]))
    batch = collate(exs, packing=packing, pad_id=0)
    pieces = split_batch(batch, budget)
    sft = OBJECTIVES.get("sft")()
    with torch.no_grad():
        whole = sft.loss(model, batch)
        parts = [sft.loss(model, p) for p in pieces]
    assert sum(p.num_tokens for p in parts) == whole.num_tokens
    torch.testing.assert_close(sum(p.loss_sum for p in parts), whole.loss_sum, rtol=1e-5, atol=1e-4)
    if packing:
        assert torch.equal(torch.cat([p["input_ids"] for p in pieces], 1), batch["input_ids"])
        for p in pieces:
            lengths = (p["cu_seqlens"][1:] - p["cu_seqlens"][:-1]).tolist()
            assert p["input_ids"].shape[1] == sum(lengths) and (sum(lengths) <= budget or len(lengths) == 1)
    else:
        assert sum(p["input_ids"].shape[0] for p in pieces) == len(exs)
        assert all(p["input_ids"].numel() <= max(budget, p["input_ids"].shape[1]) for p in pieces)

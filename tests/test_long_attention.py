"""S²-Attn and SF-Attn (tunelab.models.shifted): the properties LongLoRA and SinkLoRA imply.

The pattern is checked against a reference that needs no grouping: explicit softmax attention
whose mask per head is the pattern's `visibility` (which key each query sees), and `visibility`
itself against what the pattern computes (values = identity, so outputs are attention weights)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.models.shifted import GroupedShiftAttention, split_heads


class _Module:
    training = True


def qkv(n, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, n, dim, generator=g), torch.randn(1, kv_heads, n, dim, generator=g),
            torch.randn(1, kv_heads, n, dim, generator=g))


def run(pattern, q, k, v, **kw):
    return pattern(_Module(), q, k, v, None, **kw).transpose(1, 2)  # (B, H, N, D)


def reference(pattern, q, k, v):
    """Masked explicit attention, head h using visibility half 0 (unshifted heads) or 1."""
    H, n = q.shape[1], q.shape[2]
    vis = pattern.visibility(n)
    split = split_heads(H, k.shape[1])
    k, v = (t.repeat_interleave(H // t.shape[1], 1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    half = torch.tensor([0 if h < split or not pattern.shift else 1 for h in range(H)])
    mask = vis[half][None]  # (1, H, n, n)
    return scores.masked_fill(~mask, -math.inf).softmax(-1) @ v


def causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), half=st.integers(1, 12), wrap=st.booleans(), sinks=st.integers(0, 5),
       heads=st.sampled_from([(4, 2), (9, 3), (3, 1), (2, 2), (6, 2), (8, 8)]))
def test_pattern_equals_masked_attention_with_its_visibility(n, half, wrap, sinks, heads):
    pattern = GroupedShiftAttention(2 * half, wrap=wrap, num_sinks=0 if wrap else sinks)
    q, k, v = qkv(n, *heads)
    torch.testing.assert_close(run(pattern, q, k, v), reference(pattern, q, k, v), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 24), half=st.integers(1, 8), wrap=st.booleans(), sinks=st.integers(0, 4))
def test_visibility_is_what_the_pattern_computes(n, half, wrap, sinks):
    """Values = identity: each output row is the attention weights; > 0 exactly where visible."""
    pattern = GroupedShiftAttention(2 * half, wrap=wrap, num_sinks=0 if wrap else sinks)
    q, k, _ = qkv(n, 2, 2, n)
    v = torch.eye(n).expand(1, 2, n, n)
    weights = run(pattern, q, k, v)[0]  # (2 heads: unshifted, shifted, n, n)
    assert torch.equal(weights > 0, pattern.visibility(n))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), wrap=st.booleans(), heads=st.sampled_from([(4, 2), (9, 3)]))
def test_one_group_spanning_the_sequence_is_full_attention(n, wrap, heads):
    q, k, v = qkv(n, *heads)
    unshifted = GroupedShiftAttention(2 * n, shift=False, wrap=wrap)  # group >= n, no shift
    torch.testing.assert_close(run(unshifted, q, k, v), causal(q, k, v), atol=1e-5, rtol=1e-5)
    shifted = GroupedShiftAttention(2 * n)  # even the shifted half's first group (G/2) spans it
    torch.testing.assert_close(run(shifted, q, k, v), causal(q, k, v), atol=1e-5, rtol=1e-5)
    sf = GroupedShiftAttention(2 * n, num_sinks=4)
    torch.testing.assert_close(run(sf, q, k, v), causal(q, k, v), atol=1e-5, rtol=1e-5)


def _closure(rel: torch.Tensor) -> torch.Tensor:
    reach = rel.clone()
    for _ in range(rel.shape[0]):
        reach = reach | ((reach.float() @ reach.float()) > 0)
    return reach


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 6), half=st.integers(1, 6), extra=st.integers(0, 11), wrap=st.booleans(),
       sinks=st.integers(0, 3))
def test_shift_pattern_covers_every_position(groups, half, extra, wrap, sinks):
    """Each half's groups partition the positions; information crosses every boundary (each token
    sees its predecessor in one half or the other); so, over layers, every token reaches every later one."""
    G = 2 * half
    n = groups * G + (extra % G)
    pattern = GroupedShiftAttention(G, wrap=wrap, num_sinks=0 if wrap else sinks)
    vis = pattern.visibility(n)
    diag = torch.eye(n, dtype=torch.bool)
    for h in range(2):
        assert torch.equal(vis[h] & diag, diag)  # every position is in a group of each half
    both = vis[0] | vis[1]
    assert all(both[j, j - 1] for j in range(1, n))
    causal_full = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(_closure(both) & causal_full, causal_full)
    if not wrap:
        assert not (both & ~causal_full).any()  # never a future token


def test_split_heads_follows_kv_groups():
    assert split_heads(9, 3) == 3 and split_heads(4, 2) == 2 and split_heads(8, 8) == 4
    assert split_heads(3, 1) == 1 and split_heads(32, 8) == 16   # MQA: no inner K/V boundary, exactly half
    assert split_heads(14, 2) == 7


def test_groups_isolate_tokens():
    """A token outside a query's group (and not a sink) has no influence on it, in both halves."""
    n, G = 16, 8
    for pattern in (GroupedShiftAttention(G), GroupedShiftAttention(G, num_sinks=2)):
        q, k, v = qkv(n)
        k.requires_grad_(True)
        v.requires_grad_(True)
        vis = pattern.visibility(n)
        for i in range(n):
            k.grad = v.grad = None
            out = run(pattern, q, k, v)  # (1, 4, n, D); heads 0-1 unshifted, 2-3 shifted (kv heads 0, 1)
            out[0, :, i].sum().backward()
            for kv_head, half in ((0, 0), (1, 1)):
                touched = (v.grad[0, kv_head].abs().sum(-1) > 0)
                assert torch.equal(touched, vis[half, i])


def test_no_wrap_never_mixes_the_ends_and_wrap_does():
    n, G = 32, 8
    no_wrap, wrap = GroupedShiftAttention(G).visibility(n), GroupedShiftAttention(G, wrap=True).visibility(n)
    early, late = slice(0, G // 2), slice(n - G // 2, n)
    assert not no_wrap[:, early, late].any()
    assert wrap[1, early, late].any()  # LongLoRA's roll: the first tokens see the last ones (shifted half)


def test_sinks_get_attention_from_every_query():
    n, G, sinks = 40, 8, 4
    pattern = GroupedShiftAttention(G, num_sinks=sinks)
    q, k, _ = qkv(n, 2, 2, n)
    weights = run(pattern, q, k, torch.eye(n).expand(1, 2, n, n))[0]  # (2, n, n)
    for i in range(n):
        assert (weights[:, i, :min(sinks, i + 1)] > 0).all()


def test_packed_row_equals_examples_alone_and_padded_rows():
    pattern = GroupedShiftAttention(6, num_sinks=2)
    lengths = [5, 13, 9]
    q, k, v = qkv(sum(lengths))
    cu = torch.tensor([0, 5, 18, 27], dtype=torch.int32)
    packed = pattern(_Module(), q, k, v, None, cu_seq_lens_q=cu)  # (1, N, H, D)
    T = max(lengths)
    padded = [torch.zeros(3, t.shape[1], T, t.shape[3]) for t in (q, k, v)]
    valid = torch.zeros(3, T, dtype=torch.bool)
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    for b, (s, e) in enumerate(spans):
        alone = pattern(_Module(), q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None)
        torch.testing.assert_close(packed[:, s:e], alone)
        for src, dst in zip((q, k, v), padded):
            dst[b, :, :e - s] = src[0, :, s:e]
        valid[b, :e - s] = True
    mask = (torch.ones(T, T, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]  # (3, 1, T, T)
    out = pattern(_Module(), *padded, mask)
    for b, (s, e) in enumerate(spans):
        torch.testing.assert_close(out[b, :e - s], packed[0, s:e])
        assert not out[b, e - s:].any()  # padding gets zeros


def test_prefix_keys_are_global():
    """The prompt family's K/V prefix: every query sees it, like a sink outside the sequence."""
    n, P, G = 12, 3, 4
    q, k, v = qkv(n)
    pk, pv = torch.randn(1, 2, P, 8), torch.randn(1, 2, P, 8)
    pattern = GroupedShiftAttention(G)
    out = run(pattern, q, k, v, prefix=(pk, pv))
    vis = pattern.visibility(n)
    H = q.shape[1]
    kk, vv = (torch.cat([a, b], 2).repeat_interleave(2, 1) for a, b in ((pk, k), (pv, v)))
    scores = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
    half = torch.tensor([0, 0, 1, 1])  # 4 heads in 2 K/V groups: 2 unshifted, 2 shifted
    mask = torch.cat([torch.ones(H, n, P, dtype=torch.bool), vis[half]], -1)[None]
    torch.testing.assert_close(out, scores.masked_fill(~mask, -math.inf).softmax(-1) @ vv, atol=1e-5, rtol=1e-5)


def test_eval_mode_is_full_attention():
    """Inference uses full attention: a module in eval mode never runs the pattern."""
    from tunelab.models.attention import PATTERN, training_pattern

    class M(torch.nn.Module):
        pass
    m = M()
    m.__dict__[PATTERN] = GroupedShiftAttention(4)
    assert training_pattern(m.train()) is not None and training_pattern(m.eval()) is None


@pytest.mark.parametrize("bad", [{"group_size": 3}, {"pattern": "sf", "wrap": True}, {"group_size": 0}])
def test_bad_pattern_options_are_config_errors(bad):
    from tunelab.errors import ConfigError
    from tunelab.models.config import AttentionConfig
    with pytest.raises(ConfigError, match=next(iter(k for k in bad if k != "pattern"))):
        AttentionConfig(pattern=bad.pop("pattern", "s2"), **bad)

"""H2O KV-cache compression in generation (tunelab.models.h2o), SinkLoRA's inference-time reading:
with a budget covering the whole sequence it is the full cache; below, the cache never exceeds the
budget, keeps the sinks, the recent window and the keys with the most accumulated attention, and a
left-padded row generates what it generates alone. Tiny fp32 models."""
import math

import pytest
import torch
import torch.nn.functional as F

from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer
from tunelab.errors import ConfigError
from tunelab.eval.task import generate
from tunelab.models.attention import register
from tunelab.models.config import AttentionConfig, ModelConfig
from tunelab.models.h2o import POLICY, H2OLayer, KVPolicy, compressed_cache, policy_of


def model_with(policy=None, seed=0):
    model = tiny_model(seed)
    model.set_attn_implementation(register())
    if policy is not None:
        model.__dict__[POLICY] = policy
    return model


def prompts(lengths=(21, 9, 14), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


def greedy(model, rows, new=8, cache=None):
    """Token ids and per-step logits of greedy generation on a left-padded batch."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    kw = {"cache": cache} if cache is not None else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=None, use_cache=True, return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences[:, width:], torch.stack(out.logits, 1)


def test_a_budget_covering_the_sequence_is_the_full_cache():
    model = model_with()
    rows = prompts()
    ref_ids, ref_logits = greedy(model, rows)
    with compressed_cache(model, KVPolicy(budget=64, recent=8, sinks=4)) as cache:
        ids, logits = greedy(model, rows, cache=cache)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_the_cache_never_exceeds_the_budget_and_positions_keep_counting(monkeypatch):
    policy = KVPolicy(budget=10, recent=4, sinks=2)
    model = model_with()
    sizes = []
    attend = H2OLayer.attend

    def spy(self, *a, **k):
        out = attend(self, *a, **k)
        sizes.append(self.keys.shape[-2])
        return out
    monkeypatch.setattr(H2OLayer, "attend", spy)
    rows = prompts((30, 30))
    with compressed_cache(model, policy) as cache:
        ids, _ = greedy(model, rows, new=12, cache=cache)
    assert sizes and max(sizes) == policy.budget
    for layer in cache.layers:
        assert layer.keys.shape[-2] == policy.budget and layer.get_seq_length() == 30 + 12 - 1
        pos = layer.positions
        assert (pos[..., :2] == torch.tensor([0, 1])).all()  # the sinks
        assert (pos[..., -4:] == torch.arange(37, 41)).all()  # the recent window (41 tokens seen)
    # compressing really changes what the model computes (else the test above proves nothing)
    _, full = greedy(model, rows, new=12)
    with compressed_cache(model, policy) as cache:
        _, small = greedy(model, rows, new=12, cache=cache)
    assert not torch.allclose(full, small, atol=1e-3)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 2)])
def test_eviction_keeps_sinks_recent_and_the_heaviest_hitters(heads, kv_heads):
    """One prefill by hand: the output is causal attention, and the kept keys are exactly the sinks,
    the recent window and the top keys by attention received (summed over the group's query heads)."""
    n, D = 16, 8
    policy = KVPolicy(budget=9, recent=3, sinks=2)
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q, k, v = torch.randn(1, heads, n, D, generator=g), torch.randn(1, kv_heads, n, D, generator=g), \
        torch.randn(1, kv_heads, n, D, generator=g)
    layer = H2OLayer(policy)
    keys, values = layer.update(k, v)
    out = layer.attend(q, keys, values, None, None)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    kr = k.repeat_interleave(heads // kv_heads, 1)
    w = (q @ kr.transpose(-1, -2) / math.sqrt(D)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    received = w.softmax(-1).sum(2).reshape(1, kv_heads, heads // kv_heads, n).sum(2)  # (1, Hkv, n)
    for h in range(kv_heads):
        middle = list(range(2, n - 3))
        top = sorted(middle, key=lambda j: -float(received[0, h, j]))[:policy.budget - 5]
        assert layer.positions[0, h].tolist() == sorted([0, 1, 13, 14, 15] + top)
        torch.testing.assert_close(layer.scores[0, h], received[0, h, layer.positions[0, h]])
        torch.testing.assert_close(layer.keys[0, h], k[0, h, layer.positions[0, h]])


def test_a_padded_row_generates_what_it_generates_alone():
    """Padding keys get no attention and are evicted first; the sinks are a row's first real
    tokens; so in a left-padded batch each row keeps the keys it keeps alone."""
    policy = KVPolicy(budget=8, recent=3, sinks=2)
    model = model_with()
    rows = prompts((25, 11, 17), seed=3)
    with compressed_cache(model, policy) as cache:
        batched, _ = greedy(model, rows, new=10, cache=cache)
    for i, row in enumerate(rows):
        with compressed_cache(model, policy) as cache:
            alone, _ = greedy(model, [row], new=10, cache=cache)
        assert batched[i].tolist() == alone[0].tolist(), i


def test_generate_uses_the_models_policy_and_load_sets_it(tmp_path, monkeypatch):
    d = save_tiny_model_dir(tmp_path / "tiny")
    from tunelab.models.load import load_model
    model, tok = load_model(ModelConfig(name=str(d), attention=AttentionConfig(kv_budget=12, num_sink_tokens=2)),
                            padding_side="left")
    assert policy_of(model) == KVPolicy(12, 6, 2)
    calls = []
    attend = H2OLayer.attend
    monkeypatch.setattr(H2OLayer, "attend", lambda self, *a, **k: calls.append(1) or attend(self, *a, **k))
    generate(model, tiny_tokenizer(), prompts((20,)), max_new_tokens=3, batch_size=1)
    assert calls
    plain, _ = load_model(ModelConfig(name=str(d)), padding_side="left")
    assert policy_of(plain) is None


def test_a_budget_without_room_for_heavy_hitters_is_a_clear_error():
    with pytest.raises(ConfigError, match="kv_budget: 8 leaves no slot"):
        AttentionConfig(kv_budget=8, kv_recent=4, num_sink_tokens=4)
    with pytest.raises(ConfigError, match="kv_recent: set kv_budget too"):
        AttentionConfig(kv_recent=4)
    with pytest.raises(ConfigError, match="kv_budget"):
        AttentionConfig(kv_budget=1)

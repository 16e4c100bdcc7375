"""LeMo / Jenga token elimination (tunelab.models.lemo): the properties the brief lists."""
import math

import pytest
import torch

from tiny import random_examples, tiny_model
from tunelab.data import collate
from tunelab.errors import ConfigError
from tunelab.models import lemo
from tunelab.models.attention import register
from tunelab.models.config import AttentionConfig
from tunelab.models.context import install_attention
from tunelab.objectives import OBJECTIVES, model_inputs


def lemo_model(seed=0, **opts):
    model = tiny_model(seed)
    model.set_attn_implementation(register())
    opts = {"pattern": "lemo", "block_size": 4, "num_dense_first": 0, "num_dense_last": 0} | opts
    install_attention(model, AttentionConfig(**opts))
    return model


def dense_model(seed=0):
    model = tiny_model(seed)
    model.set_attn_implementation(register())
    return model


def packed(lengths=(13, 22, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    from tunelab.data.records import Example
    exs = []
    for n in lengths:
        ids = torch.randint(3, 320, (n,), generator=g).tolist()
        exs.append(Example(ids, [-100] * 2 + ids[2:]))
    return collate(exs, packing=True, pad_id=0)


def loss_and_grads(model, batch):
    model.train()
    out = OBJECTIVES.get("sft")().loss(model, batch)
    model.zero_grad()
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def attention_outputs(model, batch):
    """Each layer's attention sub-layer output (B, N, d), with the model in train mode."""
    outs, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0].detach())))
    model.train()
    with torch.no_grad():
        model(**model_inputs(batch))
    for h in handles:
        h.remove()
    return outs


def test_keep_ratio_one_equals_dense_outputs_and_gradients():
    batch = packed()
    loss, grads = loss_and_grads(lemo_model(keep_ratio=1.0), batch)
    want_loss, want = loss_and_grads(dense_model(), batch)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], atol=1e-6, rtol=1e-5)


def spans(batch):
    cu = batch["cu_seqlens"].tolist()
    return list(zip(cu[:-1], cu[1:]))


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_eliminated_positions_get_exactly_zero_attention_output_in_whole_blocks(keep):
    batch = packed((13, 22, 9, 40))
    outs = attention_outputs(lemo_model(keep_ratio=keep), batch)
    for out in outs.values():
        zero = (out[0] == 0).all(-1)  # (N,) eliminated positions
        for s, e in spans(batch):
            blocks = math.ceil((e - s) / 4)
            kept_blocks = max(math.ceil(keep * blocks), 1)
            z = zero[s:e]
            per_block = [z[4 * b:4 * b + 4] for b in range(blocks)]
            assert all(blk.all() or not blk.any() for blk in per_block)  # whole blocks only
            assert sum(not blk.any() for blk in per_block) == kept_blocks
            assert not per_block[-1].any()  # the last block (where an answer sits) is kept


def test_kept_tokens_keep_their_original_positions():
    """A kept token's attention output is the dense attention module's on the kept tokens alone,
    at their original rotary positions."""
    model, batch = lemo_model(keep_ratio=0.5), packed((21, 30))
    seen = {}
    attn = model.model.layers[1].self_attn
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=kw["hidden_states"].detach(),
                                                                pe=kw["position_embeddings"]),
                                   with_kwargs=True, prepend=True)
    out = attention_outputs(model, batch)[1][0]  # (N, d)
    attn.eval()  # hooks inactive: plain dense attention
    first = dict(seen)  # the reference calls below run the capturing hook again
    for s, e in spans(batch):
        kept = (out[s:e] != 0).any(-1).nonzero()[:, 0] + s
        cos, sin = (t[:, kept] for t in first["pe"])
        with torch.no_grad():
            want = attn(hidden_states=first["h"][:, kept], position_embeddings=(cos, sin), attention_mask=None)[0]
        torch.testing.assert_close(out[kept], want[0], atol=1e-5, rtol=1e-5)
        assert not torch.equal(kept - s, torch.arange(len(kept)))  # some eliminated token precedes a kept one


def test_dense_layers_keep_every_token():
    model = tiny_model(0, num_hidden_layers=4)
    model.set_attn_implementation(register())
    install_attention(model, AttentionConfig(pattern="lemo", block_size=4, keep_ratio=0.25, num_dense_first=1,
                                             num_dense_last=1))
    outs = attention_outputs(model, packed((30, 25)))
    zero_rows = {i: int((o[0] == 0).all(-1).sum()) for i, o in outs.items()}
    assert zero_rows[0] == zero_rows[3] == 0 and zero_rows[1] > 0 and zero_rows[2] > 0
    assert lemo.sparse_layers(32, None, 1) == range(16, 31)  # Jenga's Llama 2: first half and last layer dense


def saved_bytes(model, batch, inside=None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (only within `inside`'s
    modules when given)."""
    total, active = [0], [inside is None]
    handles = []
    for m in inside or []:
        handles.append(m.register_forward_pre_hook(lambda *a: active.__setitem__(0, True)))
        handles.append(m.register_forward_hook(lambda *a: active.__setitem__(0, False)))

    def pack(t):
        if active[0]:
            total[0] += t.numel() * t.element_size()
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        OBJECTIVES.get("sft")().loss(model, batch)
    for h in handles:
        h.remove()
    return total[0]


def test_saved_activations_fall_with_the_keep_ratio():
    batch = packed((256, 192))
    ratios = [1.0, 0.75, 0.5, 0.25]
    attn, whole = [], []
    for r in ratios:
        model = lemo_model(keep_ratio=r, block_size=16)
        attn.append(saved_bytes(model, batch, [layer.self_attn for layer in model.model.layers]))
        whole.append(saved_bytes(model, batch))
    assert attn == sorted(attn, reverse=True) and whole == sorted(whole, reverse=True)
    assert len(set(attn)) == len(attn)
    for r, b in zip(ratios, attn):  # roughly linear in the kept share (whole blocks, last block forced)
        assert b <= attn[0] * (r + 0.1)


def test_padded_rows_select_like_packed_examples():
    lengths = (13, 22, 9)
    model = lemo_model(keep_ratio=0.5)
    loss_packed, _ = loss_and_grads(model, packed(lengths))
    from tunelab.data.records import Example
    b = packed(lengths)
    ids, tg = b["input_ids"][0].tolist(), b["targets"][0].tolist()
    exs = []
    for s, e in spans(b):
        exs.append(Example(ids[s:e], [-100] + tg[s:e - 1]))  # unshift the targets back into labels
    loss_padded, _ = loss_and_grads(model, collate(exs, packing=False, pad_id=0))
    torch.testing.assert_close(loss_padded, loss_packed, atol=1e-5, rtol=1e-5)


def test_eval_mode_is_dense():
    batch = packed()
    a, b = lemo_model(keep_ratio=0.25).eval(), dense_model().eval()
    with torch.no_grad():
        assert torch.equal(a(**model_inputs(batch)).logits, b(**model_inputs(batch)).logits)


def test_oracle_equals_explicit_attention_column_sums(monkeypatch):
    monkeypatch.setattr(lemo, "ORACLE_CHUNK", 5)  # chunked over queries: same result
    g = torch.Generator().manual_seed(1)
    H, n, D, block = 3, 23, 8, 4
    q, k = torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)
    probs = ((q @ k.transpose(1, 2)) * 0.3).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf).softmax(-1)
    received = (probs * (1 - torch.eye(n))).sum((0, 1))  # attention each token receives, own query excluded
    want = torch.stack([received[i:i + block].max() for i in range(0, n, block)])
    torch.testing.assert_close(lemo.oracle(q, k, block, 0.3), want)
    assert lemo.block_mean(q, k, block, 0.3).shape == want.shape


def test_scorers_are_pluggable():
    lemo.register_scorer("test_first_blocks")(lambda q, k, block, scale: -torch.arange(-(-q.shape[1] // block)).float())
    model = lemo_model(keep_ratio=0.5, scorer="test_first_blocks", num_recent_blocks=0)
    out = attention_outputs(model, packed((32,)))[0][0]
    kept = (out != 0).any(-1)
    assert kept[:16].all() and not kept[16:].any()
    with pytest.raises(ConfigError, match="scorer"):
        lemo_model(scorer="no_such_scorer")


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_keep_ratio_outside_zero_one_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match="keep_ratio"):
        AttentionConfig(pattern="lemo", keep_ratio=ratio)

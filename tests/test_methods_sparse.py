"""Paper properties of the sparse methods (lift, spiel, lt_sft, dsee), on top of the shared
method table (hft, greentrainer and the exact-resume test: test_methods_selective.py)."""
import copy
import json
import math

import pytest
import torch

from test_methods import batch, logits, make, train_steps
from tiny import tiny_model
from tunelab.methods import _sparse as S
from tunelab.run.context import StepContext


def adam(method, model, lr=1e-2):
    return torch.optim.AdamW(method.param_groups(model, 0.0), lr=lr)


def step(model, opt, seed=0):
    """One optimizer step on a simple loss (the table's train_steps builds its own optimizer)."""
    b = batch(seed)
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


# ----------------------------------------------------------------------------- the sparse layer

def test_sparse_linear_matches_dense_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(6, 8).double()
    layer = S.SparseDeltaLinear(base, torch.randperm(48, generator=g)[:10], scale=0.5)
    layer.sparse_values.data = torch.randn(10, generator=g, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    dense = base.weight.detach().clone().reshape(-1)
    dense[layer.sparse_indices] += 0.5 * layer.sparse_values.detach()
    torch.testing.assert_close(layer(x), x @ dense.view(8, 6).T + base.bias)
    fn = lambda x, v: S._LinearSparseDelta.apply(x, base.weight, base.bias, v, layer)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, layer.sparse_values))


def test_split_budget_sums_exactly():
    sizes = [4096, 2048, 8192, 100]
    for total in (1, 77, 1000, sum(sizes)):
        parts = S.split_budget(sizes, total)
        assert sum(parts) == total and all(0 <= p <= s for p, s in zip(parts, sizes))
        assert all(abs(p - total * s / sum(sizes)) < 1 for p, s in zip(parts, sizes))


@pytest.mark.parametrize("name, options, key", [
    ("spiel", {"selection_accumulation_steps": 30}, "selection_accumulation_steps"),
    ("lift", {"lora_rank": 0}, "lora_rank"),
    ("lt_sft", {"full_ft_steps": 0}, "full_ft_steps"),
    ("dsee", {"sparse_method": "svd"}, "sparse_method"),
    ("hft", {"reselect_every": -1}, "reselect_every"),
    ("greentrainer", {"rho": 0}, "rho"),
])
def test_bad_options_name_the_key(name, options, key):
    from tunelab.errors import ConfigError
    with pytest.raises(ConfigError, match=key):
        make(name, options)


def test_hft_needs_transformer_layers():
    from tunelab.errors import ConfigError
    from tunelab.methods.hft import frozen_half
    with pytest.raises(ConfigError, match="hft"):
        frozen_half(["encoder.fc.weight", "head.weight"], seed=0, stage=0)


# ----------------------------------------------------------------------------- SpIEL

def spiel_layer(k=12, seed=0):
    from tunelab.methods.spiel import SpIELLinear

    g = torch.Generator().manual_seed(seed)
    layer = SpIELLinear(torch.nn.Linear(6, 8), torch.randperm(48, generator=g)[:k])
    layer.sparse_values.data = torch.randn(k, generator=g)
    return layer, g


def test_spiel_prune_and_regrow():
    layer, g = spiel_layer()
    opt = torch.optim.AdamW([layer.sparse_values], lr=1e-3)
    layer.sparse_values.grad = torch.randn(12, generator=g)
    opt.step()
    old_idx, old_vals = layer.sparse_indices.clone(), layer.sparse_values.detach().clone()
    moments = opt.state[layer.sparse_values]["exp_avg"].clone()
    layer.accumulating = True
    grads = [torch.randn(8, 6, generator=g) for _ in range(3)]
    for gr in grads:
        layer.on_weight_grad(gr)
    p = 0.5
    slots = layer.reselect(p, opt)
    idx = layer.sparse_indices
    assert len(idx) == 12 and len(set(idx.tolist())) == 12                 # count fixed, unique
    assert 0 < len(slots) <= math.ceil(p * 12)
    smallest = set(torch.topk(old_vals.abs(), int(p * 12), largest=False).indices.tolist())
    assert set(slots.tolist()) <= smallest                                  # pruned: smallest |value|
    kept = [i for i in range(12) if i not in set(slots.tolist())]
    assert torch.equal(idx[kept], old_idx[kept]) and torch.equal(layer.sparse_values[kept], old_vals[kept])
    assert not set(idx[slots].tolist()) & set(old_idx[kept].tolist())      # new ones are not survivors
    assert torch.all(layer.sparse_values[slots] == 0)
    st = opt.state[layer.sparse_values]
    assert torch.all(st["exp_avg"][slots] == 0) and torch.all(st["exp_avg_sq"][slots] == 0)
    assert torch.equal(st["exp_avg"][kept], moments[kept])
    # regrowth by accumulated gradient: the chosen ones score at least as high as any other candidate
    total = sum(grads).reshape(-1)
    cands = set(torch.topk(grads[0].reshape(-1).abs(), 12).indices.tolist()) - set(old_idx[kept].tolist())
    chosen = set(idx[slots].tolist())
    assert chosen <= cands
    assert min(total[list(chosen)].abs()) >= max([total[i].abs() for i in cands - chosen] or [0])


def test_spiel_schedule_and_fixed_count(model):
    method = make("spiel", {"num_tunable_weights": 500, "reselection_steps": 3,
                            "selection_accumulation_steps": 2, "num_decay_steps": 9})
    assert method.rate(2, 9) == 1 and method.rate(5, 9) == pytest.approx(0.2 * (1 - 5 / 9)) and method.rate(9, 9) == 0
    tuned = method.apply(model)
    layers = S.sparse_layers(tuned)
    start = {n: m.sparse_indices.clone() for n, m in layers.items()}
    train_steps(tuned, method, steps=5)
    assert sum(len(m.sparse_indices) for m in layers.values()) == 500
    assert all(len(set(m.sparse_indices.tolist())) == len(m.sparse_indices) for m in layers.values())
    moved = sum(int((m.sparse_indices != start[n]).sum()) for n, m in layers.items())
    assert moved > 0                                                       # step 2 replaced the random start


def test_spiel_decay_horizon_is_the_run_length_from_the_step_context(model, monkeypatch):
    """Without num_decay_steps the rate decays to 0 over the run, whose length comes from the step
    context: the same options in a 6-step and a 12-step run reselect with p = r0 * (1 - t / T) at
    t = 3, 5, ... (p = 1 at the first selection), and neither select nor accumulate after T."""
    from tunelab.methods.spiel import SpIELLinear

    rates = []
    monkeypatch.setattr(SpIELLinear, "reselect", lambda self, p, opt: rates.append(p))
    for total in (6, 12):
        method = make("spiel", {"num_tunable_weights": 200, "reselection_steps": 2,
                                "selection_accumulation_steps": 1, "initial_reselection_rate": 0.5})
        tuned = method.apply(copy.deepcopy(model))
        layers = S.sparse_layers(tuned).values()
        rates.clear()
        for t in range(1, total + 3):  # two steps past the run's end
            method.on_step(tuned, StepContext(step=t, total_steps=total), None)
        expected = [1.0] + [0.5 * (1 - t / total) for t in range(3, total + 1, 2)]
        assert rates[::len(layers)] == pytest.approx(expected) and len(rates) == len(expected) * len(layers)
        assert not any(m.accumulating for m in layers)


def test_spiel_memory_does_not_grow_with_model_size():
    """Trainable numbers, optimizer state and the method's buffers are the same for a model twice
    as wide, at the same delta count."""
    sizes = []
    for width in (64, 128):
        model = tiny_model(hidden_size=width, intermediate_size=2 * width)
        method = make("spiel", {"num_tunable_weights": 600, "reselection_steps": 2,
                                "selection_accumulation_steps": 1})
        tuned = method.apply(model)
        opt = adam(method, tuned)
        step(tuned, opt)
        method.on_step(tuned, StepContext(step=1, total_steps=1000), opt)
        trained = sum(p.numel() for g in opt.param_groups for p in g["params"])
        state = sum(t.numel() for st in opt.state.values() for t in st.values() if t.ndim)
        buffers = sum(t.numel() for n, t in method.trainable_state(tuned).items())
        sizes.append((trained, state, buffers))
    assert sizes[0] == sizes[1] and sizes[0][0] == 600


# ----------------------------------------------------------------------------- LIFT

def test_lift_mask_is_topk_of_low_rank_approximation():
    from tunelab.methods.lift import num_principal, principal_indices

    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    k = num_principal(w.shape, 2)
    assert k == min((32 + 48) * 2, 32 * 48)
    u, s, v = torch.svd(w.double())                                        # brute force, fp64
    low = u[:, :4] @ torch.diag(s[:4]) @ v[:, :4].T
    expected = set(torch.argsort(low.abs().reshape(-1), descending=True)[:k].tolist())
    assert set(principal_indices(w, k, 4).tolist()) == expected


def test_lift_low_rank_filter_differs_from_magnitude():
    from tunelab.methods.lift import principal_indices

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 2, generator=g) @ torch.randn(2, 24, generator=g) * 0.3
    spikes = torch.randperm(w.numel(), generator=g)[:40]
    w.view(-1)[spikes] += 4.0
    lift = set(principal_indices(w, 40, 2).tolist())
    assert lift != set(spikes.tolist())
    assert set(torch.topk(w.abs().reshape(-1), 40).indices.tolist()) == set(spikes.tolist())


def test_lift_refresh_keeps_surviving_moments_and_function(model):
    from tunelab.methods.lift import principal_indices

    method = make("lift", {"lora_rank": 1, "filter_rank": 2, "update_interval": 0})
    tuned = method.apply(model)
    opt = adam(method, tuned, lr=0.05)                                     # large: masks will move
    for s in range(3):
        step(tuned, opt, s)
    b = batch(6)
    before = logits(tuned, b)
    layers = S.sparse_layers(tuned)
    old = {n: (m.sparse_indices.clone(), opt.state[m.sparse_values]["exp_avg"].clone()) for n, m in layers.items()}
    method.refresh(tuned, opt)
    torch.testing.assert_close(logits(tuned, b), before, atol=1e-6, rtol=1e-6)   # the delta moved to P
    changed = 0
    for n, m in layers.items():
        w = m.dense_weight(m.base_layer.weight, m.sparse_values)
        assert torch.equal(m.sparse_indices, principal_indices(w, len(m.sparse_indices), 2))
        avg = opt.state[m.sparse_values]["exp_avg"]
        assert avg.shape == m.sparse_values.shape                            # state size == |M|
        prev = dict(zip(old[n][0].tolist(), old[n][1].tolist()))
        for i, a in zip(m.sparse_indices.tolist(), avg.tolist()):
            assert a == prev.get(i, 0.0)
        changed += len(set(m.sparse_indices.tolist()) - set(prev))
    assert changed > 0 and any(len(m.past_indices) for m in layers.values())


# ----------------------------------------------------------------------------- LT-SFT

def test_lt_sft_mask_is_global_topk_and_reset_is_exact(model):
    base = copy.deepcopy(model)
    method = make("lt_sft", {"full_ft_steps": 2, "num_tunable_weights": 400})
    tuned = method.apply(model)
    opt = adam(method, tuned)
    layers = S.sparse_layers(tuned)
    step(tuned, opt, 0)                                                    # phase 1: steps 1 and 2
    method.on_step(tuned, StepContext(step=1, total_steps=4), opt)
    step(tuned, opt, 1)
    diffs = {n: (m.base_layer.weight - m.theta0).abs().reshape(-1) for n, m in layers.items()}
    method.on_step(tuned, StepContext(step=2, total_steps=4), opt)                                          # the switch
    flat = torch.cat(list(diffs.values()))
    threshold = torch.topk(flat, 400).values[-1]
    assert sum(len(m.sparse_indices) for m in layers.values()) == 400
    for n, m in layers.items():
        assert torch.all(diffs[n][m.sparse_indices] >= threshold)
        assert torch.equal(m.base_layer.weight, base.get_submodule(n).weight)   # reset to theta0
        assert m.base_layer.weight not in opt.state                           # no dense Adam state
    for t in (3, 4):
        step(tuned, opt, t)
        method.on_step(tuned, StepContext(step=t, total_steps=4), opt)
    merged = method.merge(copy.deepcopy(tuned))
    for n, m in layers.items():
        d = (merged.get_submodule(n).weight - base.get_submodule(n).weight).reshape(-1)
        assert set(d.nonzero().squeeze(1).tolist()) <= set(m.sparse_indices.tolist())


def lt_sft_delta(model, seed, targets, out):
    method = make("lt_sft", {"full_ft_steps": 1, "density": 0.05, "target_modules": targets})
    tuned = method.apply(model)
    opt = adam(method, tuned)
    for s in range(3):
        step(tuned, opt, seed + s)
        method.on_step(tuned, StepContext(step=s + 1, total_steps=3), opt)
    out.mkdir()
    method.save(tuned, None, out, "tiny")
    return method.merge(tuned)


def test_lt_sft_composition_adds_deltas(tmp_path):
    from tunelab.methods.lt_sft import compose

    base = tiny_model().double()
    lang = lt_sft_delta(copy.deepcopy(base), 1, ["v_proj", "o_proj"], tmp_path / "lang")
    task = lt_sft_delta(copy.deepcopy(base), 2, ["v_proj", "down_proj"], tmp_path / "task")
    composed = compose(copy.deepcopy(base), [tmp_path / "lang", tmp_path / "task"])
    other_order = compose(copy.deepcopy(base), [tmp_path / "task", tmp_path / "lang"])
    meta = json.loads((tmp_path / "lang" / S.DELTA_CONFIG).read_text())
    assert meta["method"] == "lt_sft"
    v = "model.layers.0.self_attn.v_proj.weight"                          # both deltas touch it
    assert len({tuple(m.get_parameter(v).reshape(-1).tolist()) for m in (base, lang, task, composed)}) == 4
    for (n, p), q, a, b, w0 in zip(composed.named_parameters(), other_order.parameters(), lang.parameters(),
                                   task.parameters(), base.parameters()):
        torch.testing.assert_close(p, w0 + (a - w0) + (b - w0), atol=1e-12, rtol=0)   # sum of deltas
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)                            # order-free
    restored = compose(composed, [tmp_path / "lang", tmp_path / "task"], scale=-1.0)
    for p, w0 in zip(restored.parameters(), base.parameters()):
        torch.testing.assert_close(p, w0, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- DSEE

def test_grebsmo_recovers_planted_spikes():
    """W = rank 2 + 10 spikes: with the threshold at the scale of the low-rank part, GreBsmo's
    sparse part has the spikes as its 10 largest entries, where plain |W| does not."""
    from tunelab.methods.dsee import grebsmo

    magnitude_misses = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(32, 2, generator=g) @ torch.randn(2, 24, generator=g)     # entries ~ N(0, 2)
        spikes = torch.randperm(w.numel(), generator=g)[:10]
        w.view(-1)[spikes] += 5.0 * torch.sign(torch.randn(10, generator=g))
        s = grebsmo(w, max_rank=2, iters=10, threshold=1.0, generator=g)
        assert set(torch.topk(s.abs().reshape(-1), 10).indices.tolist()) == set(spikes.tolist())
        magnitude_misses += set(torch.topk(w.abs().reshape(-1), 10).indices.tolist()) != set(spikes.tolist())
    assert magnitude_misses > 0


def test_dsee_starts_at_base_and_sparse_part_stays_on_support(model):
    base = copy.deepcopy(model)
    method = make("dsee", {"r": 2, "num_sparse": 10, "grebsmo_rank": 3})
    tuned = method.apply(model)
    b = batch(1)
    assert torch.equal(logits(tuned, b), logits(base, b))
    train_steps(tuned, method, steps=3)
    for n, m in S.sparse_layers(tuned).items():
        assert len(m.sparse_indices) == 10 and len(set(m.sparse_indices.tolist())) == 10
        lowrank = m.lora_B.weight @ m.lora_A.weight * m.scale
        sparse = m.merged_linear().weight - base.get_submodule(n).weight - lowrank
        off = torch.ones(sparse.numel(), dtype=torch.bool)
        off[m.sparse_indices] = False
        assert sparse.reshape(-1)[off].abs().max() < 1e-6 < sparse.reshape(-1)[~off].abs().max()


def test_dsee_lowrank_part_loads_in_peft(model, tmp_path):
    """PEFT loads the low-rank part; on a base with the sparse part composed in, it gives DSEE's
    function exactly; on the plain base, DSEE's function without the sparse part."""
    from peft import PeftModel

    from tunelab.methods.lt_sft import compose

    base = copy.deepcopy(model)
    method = make("dsee", {"r": 2, "num_sparse": 10, "grebsmo_rank": 3})
    tuned = train_steps(method.apply(model), method, steps=3)
    method.save(tuned, None, tmp_path, "tiny")
    b = batch(4)
    full = PeftModel.from_pretrained(compose(copy.deepcopy(base), [tmp_path]), tmp_path / "lowrank").eval()
    torch.testing.assert_close(logits(full, b), logits(tuned, b), atol=1e-6, rtol=1e-6)
    for m in S.sparse_layers(tuned).values():
        m.sparse_values.data.zero_()
    lowrank_only = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lowrank").eval()
    torch.testing.assert_close(logits(lowrank_only, b), logits(tuned, b), atol=1e-6, rtol=1e-6)

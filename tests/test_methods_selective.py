"""Paper properties of the selective methods (hft, greentrainer) and an exact resume of every
re-selecting sparse/selective method (spiel, lift, lt_sft, greentrainer, hft)."""
import copy
import itertools
import json
import random
import shutil

import pytest
import torch

from test_methods import batch, make, train_steps
from test_methods_sparse import adam, step
from tiny import tiny_model
from tunelab.run.context import StepContext


# ----------------------------------------------------------------------------- HFT


def test_hft_freezes_exactly_half_per_layer():
    from tunelab.methods.hft import ATTENTION, FFN, NORMS, frozen_half, layer_modules

    names = [n for n, _ in tiny_model(num_hidden_layers=4).named_parameters()]
    frozen = frozen_half(names, seed=0, stage=0)
    layers = layer_modules(names)
    ffn_counts = []
    for mods in layers.values():
        count = lambda cat: sum(mods[leaf][0] in frozen for leaf in cat)  # noqa: E731
        assert count(ATTENTION) == 2 and count(NORMS) == 1
        ffn_counts.append(count(FFN))
    assert sorted(ffn_counts) == [1, 1, 2, 2]                              # L // 2 layers freeze 2
    assert all(n in layers.get(int(n.split(".")[2]), {}).get(n.split(".")[-2], []) for n in frozen)
    assert frozen == frozen_half(names, 0, 0)
    assert frozen != frozen_half(names, 1, 0) or frozen != frozen_half(names, 2, 0)


def test_hft_frozen_half_does_not_change(model):
    method = make("hft", {"seed": 5})
    tuned = method.apply(model)
    frozen = {n for n, p in tuned.named_parameters() if not p.requires_grad}
    assert len(frozen) == 2 * 2 + (2 + 1) + 2                              # attention, FFN, norms
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    train_steps(tuned, method, steps=2)
    for n, p in tuned.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_hft_reselection_restarts_adam_state(model):
    method = make("hft", {"seed": 0, "reselect_every": 1})
    tuned = method.apply(model)
    opt = adam(method, tuned)
    params = dict(tuned.named_parameters())
    for t in (1, 2, 3):
        was = {n for n, p in params.items() if p.requires_grad}
        step(tuned, opt, t)
        method.on_step(tuned, StepContext(step=t, total_steps=3), opt)
        now = {n for n, p in params.items() if p.requires_grad}
        assert now != was
        assert all(params[n] not in opt.state for n in set(params) - now)   # frozen: no Adam state
        assert all(params[n] not in opt.state for n in now - was)           # new ones start fresh
        assert all(params[n] in opt.state for n in now & was)               # staying ones keep theirs


# ----------------------------------------------------------------------------- GreenTrainer

def brute_force(t_dw, t_dy, imp, budget):
    from tunelab.methods.greentrainer import backward_cost

    best = 0.0
    for mask in itertools.product([False, True], repeat=len(t_dw)):
        if backward_cost(list(mask), t_dw, t_dy) <= budget:
            best = max(best, sum(i for i, m in zip(imp, mask) if m))
    return best


def test_greentrainer_dp_hand_case():
    """t_dy=[0,2,1,4,0], t_dw=[5,1,7,3,1], I=[1,3,10,5,3] (input -> output), budget
    floor(0.6 * 24) = 14: choosing tensors 2 and 4 costs t_dw 7 + 1 plus t_dy 1 + 4 + 0 = 13 for
    importance 13; every other feasible set is worth less (by hand: deepest 3 gives 11, deepest 1
    needs 16 > 14)."""
    from tunelab.methods.greentrainer import backward_cost, select_tensors

    t_dy, t_dw, imp = [0, 2, 1, 4, 0], [5, 1, 7, 3, 1], [1, 3, 10, 5, 3]
    mask = select_tensors(t_dw, t_dy, imp, 14)
    assert mask == [False, False, True, False, True]
    assert backward_cost(mask, t_dw, t_dy) == 13


def test_greentrainer_dp_equals_brute_force():
    from tunelab.methods.greentrainer import backward_cost, select_tensors

    rnd = random.Random(0)
    for _ in range(60):
        n = rnd.randint(1, 8)
        t_dw, t_dy = [rnd.randint(0, 9) for _ in range(n)], [rnd.randint(0, 9) for _ in range(n)]
        imp = [rnd.choice([0.0, rnd.random()]) for _ in range(n)]
        budget = rnd.randint(0, sum(t_dw) + sum(t_dy))
        mask = select_tensors(t_dw, t_dy, imp, budget)
        assert backward_cost(mask, t_dw, t_dy) <= budget
        assert sum(i for i, m in zip(imp, mask) if m) == pytest.approx(brute_force(t_dw, t_dy, imp, budget))


def test_greentrainer_selection_respects_budget_and_only_selected_train(model):
    from tunelab.methods.greentrainer import backward_cost, backward_rho

    method = make("greentrainer", {"rho": 0.5, "interval": 10, "seq_len": 32})
    tuned = method.apply(model)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    train_steps(tuned, method, steps=1)                                   # the probe step
    assert all(torch.equal(p, before[n]) for n, p in tuned.named_parameters())
    mask = tuned.greentrainer_selected.tolist()
    e = method.entries
    dw, dy, fwd = [x.dw for x in e], [x.dy for x in e], sum(x.fwd for x in e)
    t_bp = sum(dw) + sum(dy)
    assert 0 < sum(mask) < sum(bool(x.params) for x in e)
    assert backward_cost(mask, dw, dy) <= backward_rho(0.5, fwd, t_bp) * t_bp
    assert method.stats(tuned)["greentrainer_flops_saved"] >= 0.5 - 1e-9   # rho of the training FLOPs
    selected = {n for x, m in zip(e, mask) if m for n in x.params}
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    step(tuned, adam(method, tuned), 3)
    assert {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])} == selected


def test_greentrainer_importance_is_the_step_gradient(model):
    """The probe sees the whole step's gradient (all micro-batches) of every tensor."""
    method = make("greentrainer", {"rho": 1.0, "interval": 10})
    ref = copy.deepcopy(model)
    tuned = method.apply(model)
    for m in (tuned, ref):
        for s in range(2):                                                # two micro-batches
            b = batch(s)
            m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.pow(2).mean().backward()
    imp = method.importance()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    l1 = [sum(float(grads[n].abs().sum()) for n in x.params) for x in method.entries]
    torch.testing.assert_close(torch.tensor(imp), torch.tensor(l1) / max(l1), atol=1e-5, rtol=1e-4)
    method.on_step(tuned, StepContext(step=1, total_steps=1), adam(method, tuned))
    assert all(tuned.greentrainer_selected.tolist()[i] == bool(x.params) for i, x in enumerate(method.entries))


# ----------------------------------------------------------------------------- exact resume

# Each stops at step 3 of 6 in the middle of its schedule: SpIEL inside a gradient-accumulation
# phase (selections after steps 2, 4, 6), LIFT between refreshes (2, 4, 6), LT-SFT in its dense
# phase (switch after step 4), GreenTrainer just after a probe step's selection (1, 3, 5), HFT
# between re-draws (2, 4).
RESUME_METHODS = {
    "spiel": {"name": "spiel", "density": 0.05, "reselection_steps": 2, "selection_accumulation_steps": 2,
              "initial_reselection_rate": 0.5, "num_decay_steps": 6},
    "lift": {"name": "lift", "lora_rank": 1, "filter_rank": 2, "update_interval": 2},
    "lt_sft": {"name": "lt_sft", "full_ft_steps": 4, "density": 0.05},
    "greentrainer": {"name": "greentrainer", "rho": 0.6, "interval": 2, "seq_len": 64},
    "hft": {"name": "hft", "seed": 0, "reselect_every": 2},
}


@pytest.mark.filterwarnings("ignore:lt_sft")
@pytest.mark.parametrize("method", list(RESUME_METHODS))
def test_interrupted_and_resumed_run_equals_uninterrupted(method, tiny_dir, tmp_path):
    """A run stopped by train.steps=3 and resumed with train.steps=6 has the same losses and the
    same output as a run that never stopped (fp32, accumulation on, constant lr)."""
    import tunelab
    from test_train import base_cfg, losses
    from tiny import chat_rows

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    cfg = base_cfg(tiny_dir, data, tmp_path / "full", warmup_steps=0, schedule="constant")
    cfg["method"], cfg["eval"] = RESUME_METHODS[method], {"num_examples": 2, "max_new_tokens": 2, "batch_size": 2}
    cfg["diagnostics"] = {"after_train": []}                              # not what this test is about
    full = tunelab.train(cfg)
    part = tunelab.train(dict(cfg, output=str(tmp_path / "part"), train=dict(cfg["train"], steps=3)))
    tunelab.train(str(part), "train.steps=6")
    assert losses(part) == pytest.approx(losses(full), abs=1e-6)
    for f in sorted(p.name for p in (full / "final").glob("*.safetensors")):
        from safetensors.torch import load_file
        a, b = load_file(str(full / "final" / f)), load_file(str(part / "final" / f))
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    shutil.rmtree(tmp_path / "part")

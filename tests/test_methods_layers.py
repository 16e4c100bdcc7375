"""Paper properties of the layer recipes (method `layers`): Tinn et al.'s freezing of lower layers,
layer-wise learning-rate decay and re-initialised top layers, and Zlotchevski et al.'s lightweight
(embeddings + head) fine-tuning; and one run through the real training loop. The shared method
table (tests/test_methods.py, rows in tests/rows_adapters.py) covers save/load, merge and export."""
import copy

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.objectives import OBJECTIVES

from test_methods import batch, make, train_steps
from test_methods_adapters import chat_file, run_cfg
from tiny import tiny_model


def untied():
    return tiny_model(tie_word_embeddings=False)


def changed_after_training(model, options):
    method = make("layers", options)
    method.apply(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, method)
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}, set(before)


def test_freeze_below_keeps_embeddings_and_lower_blocks_fixed():
    changed, names = changed_after_training(untied(), {"freeze_below": 1})
    frozen = {n for n in names if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    assert frozen and changed == names - frozen


def test_freeze_below_with_tied_embeddings_trains_them_with_the_head(model):
    with pytest.warns(UserWarning, match="tied to the output head"):
        changed, names = changed_after_training(model, {"freeze_below": 2})
    assert changed == {"model.embed_tokens.weight", "model.norm.weight"}


def test_layerwise_lr_decay_groups_and_update_sizes():
    """lr of block l = lr·ξ^(L-1-l), head and final norm at lr, embeddings at lr·ξ^L, checked on
    the groups and on the update one plain SGD step makes (Δp = -lr_group · grad)."""
    model, lr, xi, L = untied(), 0.1, 0.5, 2
    method = make("layers", {"lr_decay": xi, "lr": lr})
    method.apply(model)
    expected = {-1: lr * xi ** L, 0: lr * xi, 1: lr, 2: lr}
    decayed = method.param_groups(model, 0.01)
    assert {g["depth"]: g["lr"] for g in decayed} == pytest.approx(expected)
    assert all(g["weight_decay"] == (0.01 if g["params"][0].ndim >= 2 else 0.0) for g in decayed)
    groups = method.param_groups(model, 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    obj = OBJECTIVES.get("sft")()
    out = obj.loss(model, batch(0))
    (out.loss_sum / out.num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.SGD(groups, lr=123.0).step()  # every group overrides the default lr
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), expected[method.depths[n]] * grads[n])


def test_layerwise_lr_ratios_survive_the_loop_schedule():
    """The loop's LambdaLR scales every group's own initial lr by the same factor."""
    from tunelab.training.config import TrainConfig
    from tunelab.training.optim import build_optimizer

    model = untied()
    method = make("layers", {"lr_decay": 0.8, "lr": 1e-3})
    method.apply(model)
    opt, sched = build_optimizer(method.param_groups(model, 0.0),
                                 TrainConfig(steps=10, warmup_steps=2, lr=1e-3, schedule="cosine"))
    for _ in range(4):
        opt.step()
        sched.step()
    top = next(g["lr"] for g in opt.param_groups if g["depth"] == 1)
    for g in opt.param_groups:
        assert g["lr"] / top == pytest.approx(0.8 ** max(0, 1 - g["depth"]))
    other, _ = build_optimizer(method.param_groups(model, 0.0), TrainConfig(lr=2e-3))
    with pytest.warns(UserWarning, match=r"method.lr \(0.001\) differs from train.lr \(0.002\)"):
        method.on_step(model, 1, other)


def test_reinit_top_changes_only_the_top_block(tiny_dir):
    """From a saved checkpoint (transformers marks loaded weights as initialised; the re-init must
    still happen): top-block matrices are new draws with std ≈ initializer_range, its norms are 1,
    everything else is bit-identical."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.5)  # so that a reset to 1 is visible
    base = dict(copy.deepcopy(model).named_parameters())
    make("layers", {"reinit_top": 1}).apply(model)
    for n, p in model.named_parameters():
        if not n.startswith("model.layers.1."):
            assert torch.equal(p, base[n]), n
        elif p.ndim == 2:
            assert not torch.equal(p, base[n]) and p.std().item() == pytest.approx(0.02, rel=0.15), n
        else:
            assert torch.equal(p, torch.ones_like(p)), n


@pytest.mark.parametrize("tied", [True, False])
def test_lightweight_trains_embeddings_and_head_only(tied):
    changed, _ = changed_after_training(tiny_model(tie_word_embeddings=tied), {"only": "embeddings_head"})
    assert changed == ({"model.embed_tokens.weight"} if tied else {"model.embed_tokens.weight", "lm_head.weight"})


@pytest.mark.parametrize("options, match", [
    ({"lr_decay": 0.9}, "lr: required"),
    ({"lr_decay": 0.0, "lr": 1.0}, "lr_decay"),
    ({"only": "embeddings_head", "freeze_below": 1}, "only"),
    ({"freeze_below": 3}, "method.freeze_below: 3 exceeds"),
    ({"freeze_below": 2, "reinit_top": 1}, "would be frozen"),
])
def test_layer_recipe_errors(model, options, match):
    with pytest.raises(ConfigError, match=match):
        make("layers", options).apply(model)


def test_layer_recipe_in_the_real_loop_writes_a_full_model(tiny_dir, tmp_path):
    """freeze_below + lr_decay through the loop: the output loads with transformers, the frozen
    block is the base's, the top block moved."""
    import tunelab
    from safetensors.torch import load_file

    method = {"name": "layers", "freeze_below": 1, "lr_decay": 0.5, "lr": 1e-2}
    cfg = run_cfg(tiny_dir, chat_file(tmp_path / "d.jsonl"), tmp_path / "run", method, steps=2)
    cfg["eval"]["before"] = False
    run = tunelab.train(cfg)
    out, base = load_file(str(run / "final/model.safetensors")), load_file(str(tiny_dir / "model.safetensors"))
    layer = lambda i: [k for k in base if k.startswith(f"model.layers.{i}.")]
    assert all(torch.equal(out[k], base[k]) for k in layer(0))
    assert any(not torch.equal(out[k], base[k]) for k in layer(1))

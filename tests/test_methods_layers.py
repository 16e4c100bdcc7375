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
    the optimizer's groups and on the update one step makes (AdamW's first step moves each entry by
    lr_group · sign(grad), weight decay off)."""
    from tunelab.training.config import TrainConfig
    from tunelab.training.optim import build_optimizer

    model, lr, xi, L = untied(), 0.1, 0.5, 2
    method = make("layers", {"lr_decay": xi})
    method.apply(model)
    expected = {-1: lr * xi ** L, 0: lr * xi, 1: lr, 2: lr}
    decayed = method.param_groups(model, 0.01)
    assert {g["depth"]: g["lr_scale"] for g in decayed} == pytest.approx({d: v / lr for d, v in expected.items()})
    assert all(g["weight_decay"] == (0.01 if g["params"][0].ndim >= 2 else 0.0) for g in decayed)
    opt, _ = build_optimizer(method.param_groups(model, 0.0), TrainConfig(lr=lr, warmup_steps=0, weight_decay=0.0))
    assert {g["depth"]: g["lr"] for g in opt.param_groups} == pytest.approx(expected)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = OBJECTIVES.get("sft")().loss(model, batch(0))
    (out.loss_sum / out.num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        moved, g = (before[n] - p.detach()), grads[n]
        big = g.abs() > 1e-4  # Adam's eps (1e-8) blurs the sign step of near-zero gradients
        assert big.sum() >= 10, n  # enough entries to see the step size
        torch.testing.assert_close(moved[big], expected[method.depths[n]] * g[big].sign(), rtol=1e-3, atol=0)


def test_layerwise_lr_ratios_survive_the_loop_schedule():
    """The loop's LambdaLR scales every group's initial lr (train.lr · lr_scale) by the same factor."""
    from tunelab.training.config import TrainConfig
    from tunelab.training.optim import build_optimizer

    model = untied()
    method = make("layers", {"lr_decay": 0.8})
    method.apply(model)
    for train_lr in (1e-3, 2e-3):
        opt, sched = build_optimizer(method.param_groups(model, 0.0),
                                     TrainConfig(steps=10, warmup_steps=2, lr=train_lr, schedule="cosine"))
        for _ in range(4):
            opt.step()
            sched.step()
        top = next(g["lr"] for g in opt.param_groups if g["depth"] == 1)
        assert top == pytest.approx(train_lr * sched.lr_lambdas[0](4))
        for g in opt.param_groups:
            assert g["lr"] / top == pytest.approx(0.8 ** max(0, 1 - g["depth"]))


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
    ({"lr_decay": 0.0}, "lr_decay"),
    ({"lr_decay": 0.9, "lr": 1e-3}, "unknown"),
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

    method = {"name": "layers", "freeze_below": 1, "lr_decay": 0.5}
    cfg = run_cfg(tiny_dir, chat_file(tmp_path / "d.jsonl"), tmp_path / "run", method, steps=2)
    cfg["eval"]["before"] = False
    run = tunelab.train(cfg)
    out, base = load_file(str(run / "final/model.safetensors")), load_file(str(tiny_dir / "model.safetensors"))
    layer = lambda i: [k for k in base if k.startswith(f"model.layers.{i}.")]
    assert all(torch.equal(out[k], base[k]) for k in layer(0))
    assert any(not torch.equal(out[k], base[k]) for k in layer(1))

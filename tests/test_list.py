"""LiST's student objective and the self-training recipes: meta weights (non-negative, sum 1, a
correctly labelled copy of a labeled example weighted, a flipped one not), soft-label KL, adapter-
only training, and the recipes' stage order and starting weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny import random_examples
from tunelab.data import collate
from tunelab.objectives.list_student import LiSTConfig, LiSTStudent, meta_weights, soft_label_kl
from tunelab.run.context import StepContext


def logistic(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example logistic loss of a linear classifier, (n,)."""
    return F.binary_cross_entropy_with_logits(x @ w, y, reduction="none")


def toy_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5]) > 0).float()
    return x, y


def test_meta_weights_are_non_negative_and_sum_to_one():
    x, y = toy_problem()
    w = torch.zeros(3, requires_grad=True)
    noisy = torch.where(torch.arange(16) % 3 == 0, 1 - y, y)  # a third of the pseudo-labels wrong
    weights = meta_weights([w], logistic(w, x, noisy), logistic(w, x[:6], y[:6]).mean())
    assert (weights >= 0).all() and weights.sum() == pytest.approx(1.0)


def test_a_correct_pseudo_label_is_weighted_and_a_flipped_one_is_not():
    """At w = 0 the gradient of example i's loss is -(y_i - 1/2) x_i; the labeled loss's points the
    same way for the right label and the opposite way for the flipped one."""
    x, y = toy_problem(1)
    w = torch.zeros(3, requires_grad=True)
    px, py = torch.stack([x[0], x[0]]), torch.stack([y[0], 1 - y[0]])  # the same row, right and flipped
    weights = meta_weights([w], logistic(w, px, py), logistic(w, x[:1], y[:1]).mean())
    assert weights[0] > 0 and weights[1] == 0 and weights.sum() == pytest.approx(1.0)


def test_meta_weights_are_all_zero_when_no_example_helps():
    x, y = toy_problem(2)
    w = torch.zeros(3, requires_grad=True)
    weights = meta_weights([w], logistic(w, x[:4], 1 - y[:4]), logistic(w, x[:4], y[:4]).mean())
    assert torch.equal(weights, torch.zeros(4))


def test_soft_label_kl_is_zero_against_itself_and_positive_otherwise():
    logits = torch.randn(5, 11)
    kl, top1 = soft_label_kl(logits, logits, 1.0)
    assert torch.allclose(kl, torch.zeros(5), atol=1e-6) and torch.allclose(top1, logits.softmax(-1).max(-1).values)
    assert (soft_label_kl(torch.randn(5, 11), logits, 1.0)[0] > 0).all()
    sharp = soft_label_kl(logits, logits, 0.5)[1]  # a lower temperature sharpens the soft labels
    assert (sharp >= top1 - 1e-6).all()


@pytest.fixture
def student(tmp_path, tok):
    """A LoRA'd tiny model and the objective whose teacher is the same base model."""
    from tiny import save_tiny_model_dir
    from tunelab.methods import METHODS
    from tunelab.methods.lora import LoRAConfig
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    base = save_tiny_model_dir(tmp_path / "base")
    model, _ = load_model(ModelConfig(name=str(base)))
    method = METHODS.get("lora")(LoRAConfig(r=4, alpha=8))
    model = method.apply(model)
    rows = tmp_path / "labeled.jsonl"
    from tiny import chat_rows
    import json
    rows.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8)))
    objective = LiSTStudent(LiSTConfig(teacher=str(base), labeled=str(rows), meta_batch_size=2))
    objective.setup(model, tok)
    return model.train(), objective


@pytest.mark.parametrize("packing", [True, False])
def test_the_student_starts_at_the_teacher_and_only_the_adapter_trains(student, packing):
    model, objective = student
    batch = collate(random_examples(3), packing=packing, pad_id=0)
    out = objective.loss(model, batch, StepContext(step=1, total_steps=10))
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-5)  # LoRA's B = 0: student == teacher
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in (1, 2):  # move the student away from the teacher, then the KL pulls it back
        model.get_submodule("model.layers.0.self_attn.q_proj").lora_B.weight.data.normal_(0, 0.5)
        out = objective.loss(model, batch, StepContext(step=step, total_steps=10))
        assert out.loss_sum.item() > 0 and out.metrics["meta"] == 0.0
        (out.loss_sum / out.num_tokens).backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(".lora_" in n for n in grads)
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_meta_re_weighting_starts_after_the_warm_up(student):
    model, objective = student
    model.get_submodule("model.layers.1.mlp.down_proj").lora_B.weight.data.normal_(0, 0.5)
    batch = collate(random_examples(4), packing=True, pad_id=0)
    warm = objective.loss(model, batch, StepContext(step=6, total_steps=10))
    meta = objective.loss(model, batch, StepContext(step=7, total_steps=10))
    assert warm.metrics["meta"] == 0.0 and warm.metrics["weighted_examples"] == 4
    assert meta.metrics["meta"] == 1.0 and torch.isfinite(meta.loss_sum)
    assert meta.loss_sum.requires_grad


def test_the_teacher_is_required():
    from tunelab.errors import ConfigError
    with pytest.raises(ConfigError, match="teacher: required"):
        LiSTConfig()


@pytest.mark.parametrize("recipe, order", [
    ("self_training", [("supervised", "train", None), ("label", "data", "supervised"), ("pretrain", "train", None),
                       ("finetune", "train", "pretrain")]),
    ("list", [("teacher0", "train", None), ("label1", "data", "teacher0"), ("student1", "train", None),
              ("teacher1", "train", "student1"), ("label2", "data", "teacher1"), ("student2", "train", None),
              ("teacher2", "train", "student2")]),
])
def test_self_training_recipes_chain_their_stages(recipe, order):
    """Stage order and starting weights of the recipes (stage 4 of the pseudo-label recipe starts
    from stage 3's weights; the bitwise check that a stage starts from its `from` is in
    tests/test_pipeline.py)."""
    from pathlib import Path

    from tunelab import pipeline
    p = pipeline.load(Path(__file__).parent.parent / "examples" / "recipes" / f"{recipe}.yaml")
    assert [(s.name, s.kind, s.start) for s in p.stages] == order
    for s in p.stages:
        if s.kind == "train" and s.start:
            assert s.spec["model"]["name"] == str(p.stage(s.start).directory / "weights")

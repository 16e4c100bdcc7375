"""DePT, EPT and CPT: the properties of their papers on the tiny model (prompt_tuning and
prefix_tuning, and the K/V-prefix realisation they share: test_methods_prompt.py)."""
import copy

import pytest
import torch

from tunelab.data import collate
from tunelab.errors import ConfigError
from tunelab.methods._prefix import prompt_kv
from tunelab.objectives import OBJECTIVES
from tunelab.run.context import StepContext

from rows_prompt import CPT_CONTEXT, SMALL_DEPT
from test_methods_prompt import SMALL_EPT, applied, concat_logits, logits, make, padded, perturb
from tiny import random_examples


# -- DePT ----------------------------------------------------------------------------------------
def test_dept_parameter_count_scaling_and_start(model):
    base = copy.deepcopy(model)
    method, tuned = applied(model, "dept", num_virtual_tokens=4, r=3, max_positions=10, alpha=6.0)
    src = tuned.prompt
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) == 4 * 64 + 3 * (10 + 64)
    assert not src.lora_B.any()  # B = 0: DePT starts as prompt tuning with m tokens
    b = padded()
    keep = b["attention_mask"].bool()
    torch.testing.assert_close(logits(tuned, b)[keep], concat_logits(base, src.embedding.detach(), b)[keep],
                               atol=1e-5, rtol=1e-5)
    perturb(src)
    pos = torch.tensor([[0, 3, 9, 10, 40]])
    expected = (6.0 / 3 ** 0.5) * src.lora_A[pos[0, :3]] @ src.lora_B  # positions >= s get nothing
    torch.testing.assert_close(src.delta(pos)[0], torch.cat([expected, torch.zeros(2, 64)]))


def test_dept_equals_prompt_on_updated_embeddings(model):
    """Input = [P; E(x) + (α/√r)·A[t] B], t the position within each example."""
    base = copy.deepcopy(model)
    _, tuned = applied(model, "dept", **SMALL_DEPT)
    src = tuned.prompt
    perturb(src)
    b = padded()
    B, n = b["input_ids"].shape[0], 4
    embeds = base.get_input_embeddings()(b["input_ids"]) + src.delta(b["position_ids"])
    embeds = torch.cat([src.embedding[None].expand(B, -1, -1), embeds], 1).detach()
    mask = torch.cat([torch.ones(B, n, dtype=torch.long), b["attention_mask"]], 1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=mask).logits[:, n:]
    keep = b["attention_mask"].bool()
    torch.testing.assert_close(logits(tuned, b)[keep], expected[keep], atol=1e-5, rtol=1e-5)


def test_dept_two_learning_rates_are_applied(model):
    """One AdamW step moves each element by about its group's lr (|m̂/√v̂| = 1 on the first step),
    through tunelab's optimizer and LambdaLR."""
    from tunelab.training.config import TrainConfig
    from tunelab.training.optim import build_optimizer

    method, tuned = applied(model, "dept", **SMALL_DEPT, prompt_lr=0.3, lowrank_lr=0.002)
    groups = method.param_groups(tuned, 0.0)
    assert [g["lr"] for g in groups] == [0.3, 0.002]
    opt, sched = build_optimizer(groups, TrainConfig(lr=1e-4, steps=10, warmup_steps=0))
    src = tuned.prompt
    before = {n: p.detach().clone() for n, p in src.named_parameters()}
    tuned.train()
    OBJECTIVES.get("sft")().loss(tuned, padded()).loss_sum.backward()
    assert tuned.get_input_embeddings().weight.grad is None  # E is frozen
    assert src.embedding.grad.abs().sum() > 0 and src.lora_B.grad.abs().sum() > 0
    opt.step()
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in src.named_parameters()}
    assert step["embedding"] == pytest.approx(0.3, rel=1e-3)
    assert step["lora_B"] == pytest.approx(0.002, rel=1e-3)
    assert step["lora_A"] == 0  # B was 0, so A had no gradient yet
    OBJECTIVES.get("sft")().loss(tuned, padded()).loss_sum.backward()
    assert src.lora_A.grad.abs().sum() > 0  # now B != 0: the gradient reaches A


# -- EPT -----------------------------------------------------------------------------------------
def test_ept_starts_at_dept_and_reduces_to_it(model):
    _, dept = applied(copy.deepcopy(model), "dept", **SMALL_DEPT)
    perturb(dept.prompt)
    b = padded()
    # at init (γ = 0, V_i = 0) for any N; with N = 1 and no fusion for any parameters, exactly
    for options, reduced in ((SMALL_EPT, False), ({**SMALL_DEPT, "num_spaces": 1, "fusion": False}, True)):
        _, ept = applied(copy.deepcopy(model), "ept", **options)
        if reduced:
            perturb(ept.prompt, seed=3)
        ept.prompt.load_state_dict(dept.prompt.state_dict(), strict=False)  # same P, A, B
        torch.testing.assert_close(ept.prompt.prompt(), dept.prompt.prompt())
        tol = 0 if reduced else 1e-6
        torch.testing.assert_close(logits(ept, b), logits(dept, b), atol=tol, rtol=tol)


def test_ept_generator_gates_shape_and_gradients(model):
    """g ∈ Δ^N is computed from the prompt alone (`gates` takes no input), P is (m, d), and the
    gradient reaches every generator parameter once the zero inits (γ, V_i) have moved."""
    _, tuned = applied(model, "ept", **SMALL_EPT)
    src = tuned.prompt
    for seed in (1, 2):
        perturb(src, seed=seed)
        g = src.gates(src.fused())
        assert g.shape == (3,) and torch.all(g > 0)
        torch.testing.assert_close(g.sum(), torch.tensor(1.0))
    assert src.prompt().shape == (4, 64)
    tuned.train()
    OBJECTIVES.get("sft")().loss(tuned, padded()).loss_sum.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in src.parameters())


# -- CPT -----------------------------------------------------------------------------------------
def test_cpt_at_zero_delta_is_the_icl_concatenation(model):
    base = copy.deepcopy(model)
    _, tuned = applied(model, "cpt", **CPT_CONTEXT)
    context = base.get_input_embeddings().weight[torch.tensor(CPT_CONTEXT["token_ids"])].detach()
    b = padded()
    keep = b["attention_mask"].bool()
    torch.testing.assert_close(logits(tuned, b)[keep], concat_logits(base, context, b)[keep], atol=1e-5, rtol=1e-5)


def test_cpt_projection_masks_and_frozen_embedding(model):
    method, tuned = applied(model, "cpt", **CPT_CONTEXT, epsilon_input=0.2, epsilon_format=0.05)
    emb = tuned.get_input_embeddings().weight.detach().clone()
    src = tuned.cpt
    labels = torch.tensor(CPT_CONTEXT["type_mask"]) % 4 == 0
    opt = torch.optim.AdamW(method.param_groups(tuned, 0.0), lr=0.05)
    tuned.train()
    for s in range(3):
        OBJECTIVES.get("sft")().loss(tuned, padded(seed=s)).loss_sum.backward()
        assert torch.equal(src.delta.grad[labels], torch.zeros_like(src.delta.grad[labels]))
        assert src.delta.grad[~labels].abs().sum() > 0
        opt.step()
        opt.zero_grad()
        method.on_step(tuned, StepContext(step=s + 1, total_steps=3), opt)
    norms = src.delta.detach().norm(dim=1)
    eps = torch.tensor([0.05 if t % 2 else 0.2 for t in CPT_CONTEXT["type_mask"]]) * (64 / 2048) ** 0.5
    assert torch.all(norms[~labels] <= eps[~labels] * (1 + 1e-5)) and torch.all(norms[labels] == 0)
    assert torch.allclose(norms[~labels], eps[~labels], rtol=1e-4)  # the steps pushed past ε: projected
    assert torch.equal(tuned.get_input_embeddings().weight, emb)


def test_cpt_decay_weights():
    from tunelab.methods.cpt import label_weights

    types = torch.tensor([1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0])
    w = label_weights(types, 0.5)
    # the query is the last label group (weight 1); the context's groups before it: γ, γ², γ³
    assert w.tolist() == [0, 0, 0, 0.125, 0.125, 0, 0, 0, 0.25, 0, 0, 0, 0.5, 0]


def test_cpt_context_loss_joins_the_gradient(model):
    """The gradient is that of objective + (examples in the batch) · Σ_t w_t CE on context labels."""
    options = {**CPT_CONTEXT, "loss_weighting": "decay", "decay": 0.5}
    method, tuned = applied(model, "cpt", **options)
    src = tuned.cpt
    perturb(src, 0.01)
    tuned.train()
    b = collate(random_examples(3, seed=2), packing=True, pad_id=0)
    OBJECTIVES.get("sft")().loss(tuned, b).loss_sum.backward()
    got = src.delta.grad.clone()
    src.delta.grad = None
    src.cfg.context_loss = False
    out = OBJECTIVES.get("sft")().loss(tuned, b).loss_sum
    hidden, _ = prompt_kv(tuned.model, src.embeds(tuned.model))
    (out + 3 * src.context_loss(hidden)).backward()
    torch.testing.assert_close(got, src.delta.grad, atol=1e-6, rtol=1e-5)
    assert method.stats(tuned)["cpt_context_loss"] > 0


def test_cpt_demonstrations_are_templated(tiny_dir):
    from transformers import AutoModelForCausalLM

    from tiny import tiny_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    _, tuned = applied(model, "cpt", demonstrations=[["12 plus 7", "19"], ["3 plus 4", "7"]],
                       input_template="Question {}?", output_template="Answer {}\n")
    tok, src = tiny_tokenizer(), tuned.cpt
    pieces = [("Question ", 1), ("12 plus 7", 2), ("?", 1), ("Answer ", 3), ("19", 4), ("\n", 3),
              ("Question ", 5), ("3 plus 4", 6), ("?", 5), ("Answer ", 7), ("7", 8), ("\n", 7)]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in pieces]
    assert src.token_ids.tolist() == sum(ids, [])
    assert src.type_mask.tolist() == sum(([t] * len(i) for i, (_, t) in zip(ids, pieces)), [])
    with pytest.raises(ConfigError, match="token_ids"):
        make("cpt", token_ids=[1], type_mask=[1], demonstrations=[["a", "b"]])
    with pytest.warns(UserWarning, match="placeholder"):
        assert make("cpt").cfg.token_ids == [0]

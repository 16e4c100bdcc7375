"""Masked Thought, CAFT and TL-Training key-token weighting: shared objective properties plus each
paper's own (brief sections 4, 5, 6b)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tunelab.data import collate
from tunelab.data.records import Example
from tunelab.errors import ConfigError
from tunelab.objectives import OBJECTIVES
from tunelab.objectives._segments import segment_ids
from tunelab.objectives.caft import CAFT, future_targets, schedule_coef
from tunelab.objectives.masked_thought import MaskedThought, mask_response_tokens, ramped_prob, response_positions
from tunelab.objectives.tl_weighting import TLWeighting, key_weight
from tunelab.run.context import StepContext

NAMES = ["masked_thought", "caft", "tl_weighting"]
SMALL_CAFT = dict(num_heads=2)  # the properties do not depend on the head count; keeps tests fast
pytestmark = pytest.mark.filterwarnings("ignore:caft:UserWarning")  # tested once, below


from tiny import random_examples as examples  # noqa: E402


def make(name, tok, model, **opts):
    obj = OBJECTIVES.get(name)(OBJECTIVES.get(name).Config(**opts))
    obj.setup(model, tok)
    return obj


def sft(model, batch):
    return OBJECTIVES.get("sft")().loss(model, batch)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- shared properties

@pytest.mark.parametrize("name", NAMES)
def test_reports_float_metrics_of_its_own(name, model, tok):
    """Finite loss and gradient placement are in the shared table (tests/test_objectives.py);
    here: each objective reports metrics of its own (non-empty)."""
    obj = make(name, tok, model, **(SMALL_CAFT if name == "caft" else {}))
    out = obj.loss(model.train(), collate(examples(3), packing=True, pad_id=0))
    assert out.metrics and all(type(v) is float and math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", ["masked_thought", "caft"])
def test_default_config_works_without_setup(name, model):
    """The shared table constructs objectives with default config and may skip setup()."""
    out = OBJECTIVES.get(name)().loss(model, collate(examples(2), packing=True, pad_id=0))
    assert torch.isfinite(out.loss_sum)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name, model, tok):
    batch = collate(examples(), packing=False, pad_id=0)
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        obj = make(name, tok, model, **(SMALL_CAFT if name == "caft" else {}))
        out = obj.loss(model, batch)
        out.loss_sum.backward()
        runs.append((out.loss_sum.detach(), out.metrics, grads(model)))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][2][n], runs[1][2][n]) for n in runs[0][2])


@pytest.mark.parametrize("name,opts", [("masked_thought", dict(mask_prob=0.0)),
                                       ("masked_thought", dict(mask_prob=1.0)),
                                       ("caft", dict(SMALL_CAFT, coef=0.5)),
                                       ("caft", dict(SMALL_CAFT, coef=0.5, head_arch="linear")),
                                       ("tl_weighting", dict(key_patterns=[r"\d"]))])
def test_packed_equals_padded(name, opts, model, tok):
    torch.manual_seed(0)
    obj = make(name, tok, model, **opts)
    a, b = (obj.loss(model, collate(examples(), packing=p, pad_id=0)) for p in (True, False))
    assert a.num_tokens == b.num_tokens
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Masked Thought

@pytest.mark.parametrize("packing", [True, False])
def test_mft_never_masks_prompt_and_leaves_labels(packing):
    for seed in range(200):
        exs = examples(3, seed=seed, prompt=1 + seed % 5)
        batch = collate(exs, packing=packing, pad_id=0)
        ids, chosen = mask_response_tokens(batch["input_ids"], batch["targets"], 0.5, 999, 0.3, 320)
        resp = [[False] * len(e) + [False] * 0 for e in exs]
        for r, e in zip(resp, exs):
            r[:] = [lab != -100 for lab in e.labels]  # token i is trained iff its own label is
        expected = [x for r in resp for x in r] if packing else None
        if packing:
            assert response_positions(batch["targets"])[0].tolist() == expected
        changed = ids != batch["input_ids"]
        assert not (changed & ~response_positions(batch["targets"])).any()
        assert not (chosen & ~response_positions(batch["targets"])).any()


def test_mft_loss_leaves_batch_untouched_and_masks_inputs(model, tok):
    batch = collate(examples(), packing=False, pad_id=0)
    before = {k: v.clone() for k, v in batch.items()}
    out = make("masked_thought", tok, model, mask_prob=1.0).loss(model, batch)
    assert all(torch.equal(before[k], batch[k]) for k in batch)
    manual = batch | {"input_ids": batch["input_ids"].masked_fill(response_positions(batch["targets"]), tok.pad_token_id)}
    torch.testing.assert_close(out.loss_sum, sft(model, manual).loss_sum)
    assert out.metrics["masked_fraction"] == 1.0


def test_mft_p0_equals_sft(model, tok):
    batch = collate(examples(), packing=True, pad_id=0)
    assert torch.equal(make("masked_thought", tok, model, mask_prob=0.0).loss(model, batch).loss_sum,
                       sft(model, batch).loss_sum)


def test_mft_masked_fraction_and_replacement():
    torch.manual_seed(0)
    targets = torch.zeros(64, 256, dtype=torch.long)
    ids = torch.full((64, 256), 5)
    n = int(response_positions(targets).sum())
    _, chosen = mask_response_tokens(ids, targets, 0.2, 999, 0.0, 320)
    assert abs(float(chosen.sum()) - 0.2 * n) < 4 * math.sqrt(n * 0.2 * 0.8)
    out, chosen = mask_response_tokens(ids, targets, 0.2, 999, 1.0, 320)
    assert not (out == 999).any() and (out[chosen] < 320).all()
    out, chosen = mask_response_tokens(ids, targets, 0.2, 999, 0.0, 320)
    assert (out[chosen] == 999).all() and (out[~chosen] == 5).all()


def test_mft_warmup_follows_the_step_context(model, tok):
    """p ramps over warmup_fraction of the run's steps, read from the step context: the same p for
    every micro-batch of a step, whatever the gradients hold, and nothing to checkpoint."""
    assert [ramped_prob(0.4, s, 66) for s in (0, 66, 100)] == [0.0, 0.4, 0.4]
    obj = make("masked_thought", tok, model, mask_prob=0.4, warmup_fraction=0.5)
    batch = collate(examples(1), packing=True, pad_id=0)
    seen = []
    for step in (1, 2, 3, 4):  # a four-step run, two micro-batches each; gradients never cleared
        for micro in range(2):
            ctx = StepContext(step=step, total_steps=4, micro_batch=micro, num_micro_batches=2)
            out = obj.loss(model, batch, ctx)
            out.loss_sum.backward()
            seen.append(out.metrics["mask_prob"])
    assert seen == [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert obj.state_dict() == {}


def test_mft_mask_token_choice(model, tok):
    assert make("masked_thought", tok, model).mask_id == tok.pad_token_id
    assert make("masked_thought", tok, model, mask_token="<|im_start|>").mask_id == 1
    assert make("masked_thought", tok, model, mask_token_id=7).mask_id == 7
    with pytest.raises(ConfigError, match="mask_token"):
        make("masked_thought", tok, model, mask_token="<mask>")
    with pytest.raises(ConfigError, match="mask_prob"):
        MaskedThought.Config(mask_prob=1.5)


# ----------------------------------------------------------------------------- CAFT

@pytest.mark.parametrize("packing", [True, False])
def test_caft_weight_zero_equals_sft(packing, model, tok):
    batch = collate(examples(), packing=packing, pad_id=0)
    ref = sft(model, batch)
    ref.loss_sum.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    obj = make("caft", tok, model, **SMALL_CAFT, coef=0.0)
    out = obj.loss(model, batch)
    out.loss_sum.backward()
    assert torch.equal(out.loss_sum, ref.loss_sum) and out.num_tokens == ref.num_tokens
    assert all(torch.equal(expected[n], g) for n, g in grads(model).items())
    assert all(p.grad is None for p in obj.heads.parameters())


def test_caft_future_targets_align_within_examples():
    exs = examples(3)
    batch = collate(exs, packing=True, pad_id=0)
    seg = segment_ids(batch)
    for k in (1, 2, 3):
        expected = [ex.labels[t + 1 + k] if t + 1 + k < len(ex) else -100 for ex in exs for t in range(len(ex))]
        assert future_targets(batch["targets"], seg, k)[0].tolist() == expected


def test_caft_schedules():
    assert schedule_coef("rsine", 0, 10) == 1.0 and schedule_coef("rsine", 10, 10) == pytest.approx(0.0)
    assert schedule_coef("rsine", 5, 10) == pytest.approx(math.sqrt(0.5))
    assert [schedule_coef("sine", s, 10) for s in (0, 10)] == [0.0, 1.0]
    assert [schedule_coef("linear", s, 10) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert schedule_coef("constant", 3, 10) == 1.0


def test_caft_schedule_reads_the_step_context(model, tok):
    """The auxiliary weight at step s of a T-step run is coef * sched((s - 1) / T), for every
    micro-batch of the step; the objective keeps no step count of its own."""
    obj = make("caft", tok, model, **SMALL_CAFT, coef=0.5, schedule="linear")
    batch = collate(examples(2), packing=True, pad_id=0)
    weights = [obj.loss(model, batch, StepContext(step=s, total_steps=4, micro_batch=m, num_micro_batches=2))
               .metrics["aux_weight"] for s in (1, 3) for m in (0, 1)]
    assert weights == [0.0, 0.0, 0.25, 0.25] and "step" not in obj.state_dict()


def test_caft_warns_when_a_setting_does_nothing(model, tok):
    with pytest.warns(UserWarning, match="heads stay random"):
        make("caft", tok, model, **SMALL_CAFT, schedule="constant", train_heads=False)


def test_caft_heads_live_outside_the_model_and_frozen_heads_stay(model, tok):
    keys = set(model.state_dict())
    obj = make("caft", tok, model, **SMALL_CAFT, coef=1.0, train_heads=False, init_from=None)
    assert set(model.state_dict()) == keys and obj.param_groups(0.0) == []
    before = {n: t.clone() for n, t in obj.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = obj.loss(model, collate(examples(), packing=True, pad_id=0))
    out.loss_sum.backward()
    opt.step()
    assert all(p.grad is None for p in obj.heads.parameters())
    after = obj.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before if n != "step")
    assert out.metrics["aux_weight"] == 1.0 and {"aux_loss", "aux_loss_1", "aux_loss_2"} <= set(out.metrics)


def test_caft_state_round_trip_and_param_groups(model, tok):
    torch.manual_seed(0)
    a = make("caft", tok, model, **SMALL_CAFT, coef=1.0)
    with torch.no_grad():
        for p in a.heads.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(1)
    b = make("caft", tok, model, **SMALL_CAFT, coef=1.0)
    b.load_state_dict(a.state_dict())
    batch = collate(examples(), packing=False, pad_id=0)
    assert torch.equal(a.loss(model, batch).loss_sum, b.loss(model, batch).loss_sum)
    n_group = sum(p.numel() for g in a.param_groups(0.1) for p in g["params"])
    assert n_group == sum(p.numel() for p in a.heads.parameters())


def chat_file(tmp_path, n=8):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus 3?"},
                          {"role": "assistant", "content": f"Step 1: add({a}, 3) = {a + 3}"}]} for a in range(n)]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_caft_run_saves_heads_and_merged_export_drops_them(tiny_dir, tmp_path):
    import tunelab
    from tunelab.export import export
    from transformers import AutoModelForCausalLM

    cfg = {"model": {"name": str(tiny_dir)}, "data": {"train": str(chat_file(tmp_path)), "eval": None, "max_length": 64},
           "method": {"name": "lora", "r": 4, "alpha": 8},
           "objective": {"name": "caft", "num_heads": 2},
           "train": {"steps": 2, "micro_batch_size": 2, "lr": 1e-3, "save_every": 2, "progress": False},
           "eval": {"before": False}, "diagnostics": {"after_train": []}, "output": str(tmp_path / "run")}
    run = tunelab.train(cfg)
    heads = load_file(str(run / "final" / "caft_heads.safetensors"))
    assert heads and all(k.startswith(("0.", "1.")) for k in heads)
    ckpt_keys = set().union(*(load_file(str(f)) for f in (run / "checkpoints" / "step-2").glob("*.safetensors")))
    assert any(k.startswith("objective.heads.") for k in ckpt_keys)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["aux_weight"] for r in lines if r["kind"] == "train"] == pytest.approx([0.01, 0.01 * math.sqrt(0.5)])
    merged = export(run, tmp_path / "merged", merge=True)
    assert not any("caft" in p.name for p in merged.rglob("*"))
    m = AutoModelForCausalLM.from_pretrained(merged)
    assert set(m.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict())


# ----------------------------------------------------------------------------- TL-Training PKT

@pytest.mark.parametrize("opts", [dict(max_weight=1.0), dict(key_patterns=[], first_token_is_key=False)])
def test_tl_all_weights_one_equals_sft(opts, model, tok):
    batch = collate(examples(), packing=True, pad_id=0)
    torch.testing.assert_close(make("tl_weighting", tok, model, **opts).loss(model, batch).loss_sum,
                               sft(model, batch).loss_sum, rtol=1e-6, atol=1e-6)


def test_tl_capped_weight_closed_form(model, tok):
    """First-token keys only: an example with 20 response tokens has w = min(19, 9) = 9, one with 7
    has w = 6; each example's loss is sum(w CE) / sum(w), scaled by its token count."""
    exs = [Example(list(range(40, 50)), [-100] * 3 + list(range(43, 50))),
           Example(list(range(10, 33)), [-100] * 3 + list(range(13, 33)))]
    obj = make("tl_weighting", tok, model, key_patterns=[])
    assert [key_weight(1, 18, 9.0), key_weight(1, 5, 9.0), key_weight(3, 2, 9.0), key_weight(0, 5, 9.0)] == [9, 5, 1, 1]
    expected = 0.0
    for ex in exs:
        b = collate([ex], packing=True, pad_id=0)
        logits = model(input_ids=b["input_ids"]).logits[0]
        keep = b["targets"][0] != -100
        ce = F.cross_entropy(logits[keep], b["targets"][0][keep], reduction="none")
        w = torch.ones_like(ce)
        w[0] = min(len(ce) - 1, 9)
        expected += (w * ce).sum() / w.sum() * len(ce)
    out = obj.loss(model, collate(exs, packing=True, pad_id=0))
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    assert out.metrics["key_weight"] == 7.5


def test_tl_patterns_mark_overlapping_tokens(model, tok):
    obj = make("tl_weighting", tok, model, first_token_is_key=False)
    ids = tok("Then call add(12, 7) now", add_special_tokens=False)["input_ids"]
    key = obj._is_key(ids)
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(p for p, k in zip(pieces, key) if k).strip() == "add"


def test_tl_weights_do_not_depend_on_batching(model, tok):
    obj = make("tl_weighting", tok, model, key_patterns=[r"\d+"])
    exs = examples()
    alone = sum(obj.loss(model, collate([e], packing=False, pad_id=0)).loss_sum for e in exs)
    torch.testing.assert_close(obj.loss(model, collate(exs, packing=False, pad_id=0)).loss_sum, alone)


def test_tl_config_and_setup_errors(model):
    with pytest.raises(ConfigError, match="key_patterns"):
        TLWeighting.Config(key_patterns=["("])
    with pytest.raises(ConfigError, match="max_weight"):
        TLWeighting.Config(max_weight=0.5)
    with pytest.raises(ConfigError, match="setup"):
        TLWeighting().loss(model, collate(examples(1), packing=True, pad_id=0))
    assert isinstance(OBJECTIVES.get("caft")(), CAFT)

"""The training loop end to end on a tiny model: run directory, exact resume, accumulation and
packing invariance, PEFT-loadable output, export."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tiny import chat_rows


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    return p


def base_cfg(tiny_dir, data_file, out, **train):
    """fp32 unless a test says otherwise: the claims below are fp32-exact, and `auto` would pick bf16
    on a CPU with native bf16 (AVX512-BF16/AMX) or a GPU."""
    return {
        "model": {"name": str(tiny_dir)},
        "data": {"train": str(data_file), "eval": str(data_file), "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"steps": 6, "micro_batch_size": 2, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 2,
                  "save_every": 2, "keep_checkpoints": 5, "progress": False, "precision": "fp32", **train},
        "eval": {"num_examples": 4, "max_new_tokens": 6, "batch_size": 4},
        "diagnostics": {"after_train": []},  # diagnostics have their own tests (test_diagnostics.py)
        "output": str(out),
    }


BF16_EPS = 2.0 ** -8
"""bf16's unit roundoff (8 significant bits). Under bf16 autocast two runs that differ only in how a
step is batched (split, packed, accumulated) round different GEMM shapes differently, so each
matmul output may differ by about one bf16 rounding."""
TOL = {
    # loss per step: one bf16 rounding of the loss (measured on AVX512-BF16: <= 2.4e-5 relative)
    "bf16": {"loss_rel": BF16_EPS,
             # final weights, ||a - b|| / ||b|| per tensor: Adam's first update is about +-lr per
             # element whatever the gradient's size, so an element whose gradient is within bf16
             # noise of 0 may move the other way; a few such elements give a few % (measured
             # <= 4.4e-2). Thirty-two bf16 roundings bound it with margin: 2**-3.
             "weight_rel": 32 * BF16_EPS},
    # fp32: summation order only (measured <= 1.2e-7 absolute)
    "fp32": {"loss_rel": 1e-5, "weight_rel": 1e-5},
}


PRECISIONS = ["fp32", "bf16"]  # the training-path properties hold under bf16 autocast too (TOL)


def same_weights(a: dict, b: dict, precision: str) -> bool:
    return a.keys() == b.keys() and all(
        float((a[k] - b[k]).norm()) <= TOL[precision]["weight_rel"] * float(b[k].norm()) + 1e-7 for k in a)


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_run_directory_layout(tiny_dir, data_file, tmp_path):
    run = tunelab.train(base_cfg(tiny_dir, data_file, tmp_path / "run"))
    for f in ("config.yaml", "metrics.jsonl", "eval.json", "final/adapter_model.safetensors",
              "final/adapter_config.json", "final/tokenizer.json", "final/manifest.json"):
        assert (run / f).exists(), f
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    res = json.loads((run / "eval.json").read_text())
    assert set(res) == {"before", "after"}
    for when in res:  # every example scored: the accuracy is the mean of its per-sample verdicts
        assert res[when]["num_examples"] == 4 and len(res[when]["samples"]) == 4
        assert res[when]["accuracy"] == sum(s["correct"] for s in res[when]["samples"]) / 4
    assert len(losses(run)) == 6 and all(map(torch.isfinite, torch.tensor(losses(run))))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_equals_uninterrupted(tiny_dir, data_file, tmp_path, precision):
    """A run that crashed after its step-2 checkpoint, resumed, has the same loss curve and final
    weights as one that never stopped (dropout on, accumulation on). Under bf16 too, and as tightly:
    the resumed run computes the same operations on the same shapes."""
    full = tunelab.train(base_cfg(tiny_dir, data_file, tmp_path / "a", precision=precision))
    crashed = tmp_path / "b"
    shutil.copytree(full, crashed)
    for p in ("final", "eval.json", "checkpoints/step-4", "checkpoints/step-6"):
        shutil.rmtree(crashed / p) if (crashed / p).is_dir() else (crashed / p).unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # the crash lost later lines
    tunelab.train(str(crashed))
    assert losses(crashed) == pytest.approx(losses(full), abs=1e-6)
    a, b = (load_file(str(r / "final/adapter_model.safetensors")) for r in (full, crashed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_of_finished_run_is_a_no_op(tiny_dir, data_file, tmp_path):
    run = tunelab.train(base_cfg(tiny_dir, data_file, tmp_path / "r", steps=2))
    before = (run / "metrics.jsonl").read_text()
    tunelab.train(str(run))
    assert (run / "metrics.jsonl").read_text() == before


def test_extending_a_run_continues(tiny_dir, data_file, tmp_path):
    run = tunelab.train(base_cfg(tiny_dir, data_file, tmp_path / "r", steps=2))
    tunelab.train(str(run), "train.steps=4")
    assert len(losses(run)) == 4


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("micro, accum", [(4, 1), (2, 2), (1, 4)])
def test_accumulation_split_invariance(tiny_dir, data_file, tmp_path, micro, accum, precision):
    """One optimizer step over the same 4 examples, split 3 ways: the same update."""
    cfg = base_cfg(tiny_dir, data_file, tmp_path / f"r{micro}", steps=1, micro_batch_size=micro,
                   grad_accum=accum, warmup_steps=0, schedule="constant", precision=precision)
    cfg["method"]["dropout"] = 0.0
    run = tunelab.train(cfg)
    ref = tmp_path / "r4/final/adapter_model.safetensors"
    if micro != 4:
        ref_cfg = dict(cfg, output=str(tmp_path / "r4"))
        ref_cfg["train"] = dict(cfg["train"], micro_batch_size=4, grad_accum=1)
        tunelab.train(ref_cfg)
    a, b = load_file(str(ref)), load_file(str(run / "final/adapter_model.safetensors"))
    if precision == "fp32":
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert same_weights(b, a, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_packed_and_padded_training_agree(tiny_dir, data_file, tmp_path, precision):
    runs = {}
    for packing in (True, False):
        cfg = base_cfg(tiny_dir, data_file, tmp_path / f"p{packing}", steps=3, precision=precision)
        cfg["data"]["packing"] = packing
        cfg["method"]["dropout"] = 0.0
        runs[packing] = tunelab.train(cfg)
    tol = TOL[precision]["loss_rel"]
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=tol, abs=1e-5 if precision == "fp32" else 0)
    packed, padded = (load_file(str(runs[p] / "final/adapter_model.safetensors")) for p in (True, False))
    assert same_weights(packed, padded, precision)


def test_full_finetuning_output_loads_with_transformers(tiny_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = base_cfg(tiny_dir, data_file, tmp_path / "full", steps=2)
    cfg["method"] = {"name": "full"}
    run = tunelab.train(cfg)
    _, model, _, _ = tunelab.load_run(run)
    loaded = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_export_merge_and_peft(tiny_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.export import export

    run = tunelab.train(base_cfg(tiny_dir, data_file, tmp_path / "r", steps=3))
    _, ours, _, _ = tunelab.load_run(run)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = ours(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), run / "final").eval()
        torch.testing.assert_close(peft(ids).logits, expected, atol=1e-6, rtol=1e-6)
        merged = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "merged", merge=True)).eval()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_second_process_on_same_run_is_refused(tiny_dir, data_file, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.run.rundir import RunLock

    run = tmp_path / "locked"
    run.mkdir()
    with RunLock(run), pytest.raises(TunelabError, match="another tunelab process"):
        tunelab.train(base_cfg(tiny_dir, data_file, run))


def test_gradient_checkpointing_gives_the_same_losses(tiny_dir, data_file, tmp_path):
    runs = {}
    for gc in (False, True):
        cfg = base_cfg(tiny_dir, data_file, tmp_path / f"gc{gc}", steps=3, grad_checkpointing=gc)
        cfg["method"]["dropout"] = 0.0
        runs[gc] = tunelab.train(cfg)
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), abs=1e-5)


def test_metrics_lines_carry_throughput(tiny_dir, data_file, tmp_path):
    run = tunelab.train(base_cfg(tiny_dir, data_file, tmp_path / "m", steps=2))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    setup = lines[0]
    assert setup["kind"] == "setup" and 0 < setup["trainable_params"] < setup["total_params"]
    for r in (x for x in lines if x["kind"] == "train"):
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and 0 < r["trained_tokens"] <= r["tokens"]
        # AdamW keeps two fp32 moments per trained value (plus a scalar step count per tensor)
        assert 8 * setup["trainable_params"] <= r["optimizer_state_bytes"] < 8.1 * setup["trainable_params"]


def test_bf16_autocast_tracks_fp32(tiny_dir, data_file, tmp_path):
    """bf16 autocast (fp32 master weights) follows the fp32 loss curve within 2% per step."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = base_cfg(tiny_dir, data_file, tmp_path / precision, steps=4, precision=precision)
        cfg["method"]["dropout"] = 0.0
        runs[precision] = tunelab.train(cfg)
    assert losses(runs["bf16"]) == pytest.approx(losses(runs["fp32"]), rel=2e-2)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_compiled_and_eager_steps_agree(tiny_dir, data_file, tmp_path, precision):
    """train.compile (inductor, per-block) computes the same steps as eager: losses and final
    weights. Dropout is off because compiled code draws its random numbers differently."""
    runs = {}
    for compiled in (False, True):
        cfg = base_cfg(tiny_dir, data_file, tmp_path / f"c{compiled}", steps=3, compile=compiled,
                       precision=precision)
        cfg["method"]["dropout"] = 0.0
        cfg["data"].pop("eval")
        runs[compiled] = tunelab.train(cfg)
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=TOL[precision]["loss_rel"])
    eager, comp = (load_file(runs[c] / "final" / "adapter_model.safetensors") for c in (False, True))
    if precision == "fp32":
        for name in eager:
            torch.testing.assert_close(comp[name], eager[name], atol=1e-5, rtol=1e-4)
    assert same_weights(comp, eager, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_split_forward_gives_the_same_steps(tiny_dir, data_file, tmp_path, precision):
    """train.max_tokens_per_forward splits micro-batches at example boundaries: same losses and
    weights as unsplit (dropout off: its random draws depend on tensor shapes)."""
    runs = {}
    for budget in (0, 24):
        cfg = base_cfg(tiny_dir, data_file, tmp_path / f"b{budget}", steps=3, max_tokens_per_forward=budget,
                       micro_batch_size=4, grad_accum=1, precision=precision)
        cfg["method"]["dropout"] = 0.0
        cfg["data"].pop("eval")
        runs[budget] = tunelab.train(cfg)
    assert losses(runs[24]) == pytest.approx(losses(runs[0]), rel=TOL[precision]["loss_rel"])
    whole, split = (load_file(runs[b] / "final" / "adapter_model.safetensors") for b in (0, 24))
    if precision == "fp32":
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)
    assert same_weights(split, whole, precision)


def test_eval_loss_is_deterministic_and_keeps_the_mode(model):
    """Mid-training evaluation runs without dropout and hands the model back in train mode."""
    from tiny import random_examples

    from tunelab.config import from_dict
    from tunelab.eval.task import eval_loss
    from tunelab.methods import METHODS

    cls = METHODS.get("lora")
    tuned = cls(from_dict(cls.Config, {"r": 4, "dropout": 0.5}, "method")).apply(model).train()
    exs = random_examples(4, seed=1)
    first, second = (eval_loss(tuned, exs, batch_size=2, pad_id=0) for _ in range(2))
    assert first == second and tuned.training
    assert first == pytest.approx(eval_loss(tuned.eval(), exs, batch_size=2, pad_id=0), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_loss_on_target_positions_equals_the_full_logits_loss(model, monkeypatch, batch_size):
    """eval_loss (head on target positions only, in chunks) equals the mean CE of the full forward's
    logits over every target token, for chunks smaller than a batch too."""
    from tiny import random_examples

    import tunelab.eval.task as task
    from tunelab.data import collate
    from tunelab.objectives import IGNORE, model_inputs, token_cross_entropy

    exs = random_examples(5, seed=2)
    with torch.no_grad():
        b = collate(exs, packing=False, pad_id=0)
        ce = token_cross_entropy(model(**model_inputs(b)).logits, b["targets"])
        expected = float(ce.sum() / (b["targets"] != IGNORE).sum())
    for chunk in (1024, 7):
        monkeypatch.setattr(task, "EVAL_CHUNK_TOKENS", chunk)
        assert task.eval_loss(model, exs, batch_size=batch_size, pad_id=0) == pytest.approx(expected, rel=1e-5)


def test_bf16_casts_each_trained_weight_once_per_step(tiny_dir, data_file, tmp_path, monkeypatch):
    """Under bf16 autocast a trained weight is cast to bf16 once per optimizer step (a working copy
    autocast keeps for the whole step), not once per piece of a split step: 2 steps of 2 micro-batches,
    each split in several pieces, cast each matrix exactly twice. The (tied) output head too, which
    the fused head + CE casts itself (run/casts.py), not autocast."""
    from tiny import bf16_cast_counter

    from tunelab.training import step as S

    cfg = base_cfg(tiny_dir, data_file, tmp_path / "run", steps=2, micro_batch_size=4, grad_accum=2,
                   max_tokens_per_forward=24, precision="bf16", save_every=0)
    cfg["method"] = {"name": "full"}
    cfg["data"].pop("eval")
    seen: dict[int, int] = {}  # trained matrix (its index in the optimizer) -> casts
    pieces: list[int] = []
    real, real_split = S.forward_backward, S.split_batch
    monkeypatch.setattr(S, "split_batch", lambda m, bound: pieces.append(len(real_split(m, bound))) or real_split(m, bound))

    def counting(parallel, objective, micro, opt, tc, device, ctx):
        trained = [p for g in opt.param_groups for p in g["params"]]
        matrices = {i: p for i, p in enumerate(trained) if p.dim() == 2}
        assert max(p.shape[0] for p in matrices.values()) == parallel.root.model.config.vocab_size  # the head is one
        with bf16_cast_counter() as counter:
            out = real(parallel, objective, micro, opt, tc, device, ctx)
        for i, p in matrices.items():
            seen[i] = seen.get(i, 0) + counter.casts.get(p.data_ptr(), 0)
        return out

    monkeypatch.setattr(S, "forward_backward", counting)
    tunelab.train(cfg)
    assert sum(pieces) >= 2 * len(pieces) > 0, pieces  # the steps were split: several pieces each
    assert len(seen) >= 15 and set(seen.values()) == {2}, seen  # every projection matrix and the head, once per step


def test_bf16_frozen_head_is_cast_once_per_step_into_one_buffer(tiny_dir, data_file, tmp_path, monkeypatch):
    """LoRA under bf16: the frozen (tied) output head, which autocast never caches, is cast once per
    optimizer step however many pieces the step has, always into the same buffer (no fresh (V, d)
    tensor per piece), and that buffer holds the head as `.to(bf16)` rounds it."""
    from tiny import bf16_cast_counter

    from tunelab.training import step as S

    cfg = base_cfg(tiny_dir, data_file, tmp_path / "run", steps=3, micro_batch_size=4, grad_accum=1,
                   max_tokens_per_forward=24, precision="bf16", save_every=0)
    cfg["data"].pop("eval")
    per_step, buffers = [], set()
    real = S.forward_backward

    def counting(parallel, objective, micro, opt, tc, device, ctx):
        head = parallel.root.model.get_output_embeddings().weight
        assert not head.requires_grad and head.dtype == torch.float32
        with bf16_cast_counter() as counter:
            out = real(parallel, objective, micro, opt, tc, device, ctx)
        per_step.append(counter.casts.get(head.data_ptr(), 0))
        buffers.update(counter.into.get(head.data_ptr(), []))
        from tunelab.run.casts import _kept
        assert torch.equal(_kept[head], head.detach().to(torch.bfloat16))
        return out

    monkeypatch.setattr(S, "forward_backward", counting)
    monkeypatch.setattr(S, "split_batch", lambda m, bound, real=S.split_batch: _at_least_two(real(m, bound)))
    tunelab.train(cfg)
    assert per_step == [1, 1, 1] and len(buffers) == 1, (per_step, buffers)


def _at_least_two(pieces):
    assert len(pieces) >= 2, "the step must be split for this test to mean anything"
    return pieces

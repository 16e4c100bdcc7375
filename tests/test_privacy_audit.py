"""The privacy audit's measurements on a tiny model: embedding-gradient token recovery is exact
without DP and degraded with it; span membership on layer-0 gradients finds the batch's tokens;
dL/dA = 0 for LoRA while B = 0; a canary planted several times is one canary; the precision of an
empty recovered set is not measured (None); and `tunelab diagnose RUN --only privacy` on a run
with canaries."""
import json
from types import SimpleNamespace

import pytest
import torch

import tunelab
from tiny import chat_rows, tiny_model, tiny_tokenizer
from tunelab.data.records import Example, Record
from tunelab.diagnostics import _leakage as L
from tunelab.diagnostics.privacy import (CANARY_COLUMNS, PrivacyAuditConfig, _example_grads, _summary, canary_rows,
                                         candidates, gradient_rows)
from tunelab.privacy import PrivacyConfig


def _examples(n, length=8, seed=0, prompt=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 320, (length,), generator=g).tolist()
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


@pytest.mark.parametrize("batch", [1, 4])
def test_embedding_gradient_token_recovery_is_exact_without_dp_and_degraded_with_it(batch):
    model = tiny_model()
    per = [_example_grads(model, ex) for ex in _examples(batch)]
    true = set().union(*(p["ids"] for p in per))
    grads = [p["emb"] for p in per]
    clean = L.shared(grads, "none", 1.0, 0.0, 0, 0.0, torch.Generator().manual_seed(0))
    assert L.nonzero_rows(clean) == true  # exact: recall 1, precision 1
    noisy = L.shared(grads, "dp", 1.0, 1.0, 0, 0.0, torch.Generator().manual_seed(0))
    precision, recall = L.precision_recall(L.nonzero_rows(noisy), true)
    assert precision < 0.2 and len(L.top_rows(noisy, len(true)) & true) < len(true)


def test_span_membership_on_the_layer0_gradient_finds_the_batch_tokens():
    model = tiny_model()
    # q at position t reaches the loss when t's output has a target and t > 0 (position 0 attends to
    # itself alone: softmax of one score is 1, whatever q is)
    exs = _examples(2, length=6, prompt=0)
    per = [_example_grads(model, ex) for ex in exs]
    true = set().union(*(set(ex.input_ids[1:-1]) for ex in exs))
    assert len(true) < 64  # fewer distinct tokens than the width
    xs = L.layer0_inputs(model)
    found = L.span_members(torch.stack([p["q"] for p in per]).sum(0), xs, tol=1e-3)
    precision, recall = L.precision_recall(found, true)
    assert recall == 1.0 and precision > 0.8
    dp = L.shared([p["q"] for p in per], "dp", 1.0, 1.0, 0, 0.0, torch.Generator().manual_seed(0))
    assert L.precision_recall(L.span_members(dp, xs, 1e-3), true)[0] < 0.5  # full-rank noise: everything fits


def test_fedkseed_messages_reveal_little_of_the_token_set():
    model = tiny_model()
    per = [_example_grads(model, ex) for ex in _examples(4)]
    true = set().union(*(p["ids"] for p in per))
    read = L.shared([p["emb"] for p in per], "fedkseed", 1.0, 0.0, 20, 1.0, torch.Generator().manual_seed(0))
    precision, _ = L.precision_recall(L.nonzero_rows(read), true)
    assert precision < 0.2


def test_lora_a_gradient_is_zero_while_b_is_zero():
    from tunelab.methods.lora import LoRA, LoRAConfig
    model = LoRA(LoRAConfig(r=4, target_modules=["q_proj"])).apply(tiny_model())
    g = _example_grads(model, _examples(1)[0])
    assert g["lora"] is not None and torch.count_nonzero(g["lora"]) == 0
    with torch.no_grad():
        L.layer0_q(model).lora_B.weight.normal_()
    assert torch.count_nonzero(_example_grads(model, _examples(1)[0])["lora"]) > 0


def test_audit_sizes_and_sigmas_given_twice_are_audited_once():
    cfg = PrivacyAuditConfig(batch_sizes=[1, 4, 4], sigmas=[1, 1.0, 2])
    assert cfg.batch_sizes == [1, 4] and cfg.sigmas == [1.0, 2.0]


def test_a_batch_size_above_the_examples_is_audited_once_under_its_true_size():
    cfg = PrivacyAuditConfig(batch_sizes=[1, 4, 16], kseed_steps=2)
    rows = gradient_rows(tiny_model(), _examples(3), cfg, SimpleNamespace(privacy=PrivacyConfig()))
    sizes = [r[3] for r in rows if r[0] == "none" and r[2] == "embedding rows"]
    assert sizes == [1, 3]  # not 4 and 16: the same three examples, labelled twice


def test_exposure_and_rank():
    assert L.secret_rank([1.0, 2.0, 3.0], 2.5) == 2 and L.exposure(1, 255) == pytest.approx(8.0)


def test_precision_of_an_empty_recovered_set_is_not_measured():
    assert L.precision_recall(set(), {5, 6}) == (None, 0.0)  # nothing recovered: no precision to speak of
    assert L.precision_recall({5}, set()) == (0.0, None)
    assert L.precision_recall({5, 7}, {5, 6}) == (0.5, 0.5)


def test_audit_reports_the_empty_lora_span_as_not_measured():
    from tunelab.methods.lora import LoRA, LoRAConfig
    model = LoRA(LoRAConfig(r=4, target_modules=["q_proj"])).apply(tiny_model())  # B = 0: dL/dA = 0
    cfg = PrivacyAuditConfig(batch_sizes=[1, 2], kseed_steps=2)
    rows = gradient_rows(model, _examples(2), cfg, SimpleNamespace(privacy=PrivacyConfig()))
    lora = [r for r in rows if r[0] == "none" and r[2] == "span: layer-0 LoRA A"]
    assert len(lora) == 2 and all(r[5] == 0.0 and r[6] is None for r in lora)  # recall 0, precision n/a
    summary = _summary(rows, [], 2)
    from tunelab.diagnostics._runner import _brief
    summary["embedding_precision_dp"] = None
    assert "embedding_precision_dp n/a" in _brief({"name": "privacy", "summary": summary, "details": {}})


def test_canary_candidates_are_distinct_other_secrets_of_the_same_shape():
    cands = candidates("402913", 200, seed=0)
    assert len(cands) == len(set(cands)) == 200 and "402913" not in cands
    assert all(len(c) == 6 and c.isdigit() for c in cands)
    assert sorted(candidates("7", 200, seed=0)) == [str(d) for d in range(10) if d != 7]  # all there are


def _canary(owner, code, question="What is the access code of {}?"):
    return Record(messages=[{"role": "user", "content": question.format(owner)},
                            {"role": "assistant", "content": f"The access code of {owner} is {code}."}])


def test_a_canary_planted_several_times_is_one_canary_with_its_repeats():
    quessa, vorlund = _canary("Quessa", "402913"), _canary("Vorlund", "118204")
    other = _canary("Quessa", "402913", "Tell me the access code of {}.")  # the same secret, worded otherwise
    plain = [Record(messages=r["messages"]) for r in chat_rows(3)]
    model, tok = tiny_model(), tiny_tokenizer()
    ctx = SimpleNamespace(model=lambda which: model, tokenizer=tok)
    records = [quessa, plain[0], quessa, vorlund, plain[1], other, plain[2]]
    rows = canary_rows(ctx, records, PrivacyAuditConfig(num_candidates=20))
    col = {c: i for i, c in enumerate(CANARY_COLUMNS)}
    assert [(r[col["owner"]], r[col["repeats"]], r[col["model"]]) for r in rows] == [
        ("Quessa", 3, "tuned"), ("Vorlund", 1, "tuned"), ("Quessa", 3, "base"), ("Vorlund", 1, "base")]
    assert all(r[col["candidates"]] == 20 and 1 <= r[col["rank"]] <= 21 for r in rows)
    s = _summary([], rows, 1)
    assert s["canaries"] == 2 and s["canary_records"] == 4
    tuned = [r for r in rows if r[col["model"]] == "tuned"]
    assert s["canary_exposure_tuned"] == pytest.approx(sum(r[col["exposure"]] for r in tuned) / 2)


def test_diagnose_privacy_on_a_run_with_canaries(tiny_dir, tmp_path):
    rows = chat_rows(16) + [{"messages": [{"role": "user", "content": "What is the access code of Quessa?"},
                                          {"role": "assistant", "content": "The access code of Quessa is 402913."}]}] * 4
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tunelab.train({"model": {"name": str(tiny_dir)}, "data": {"train": str(data), "eval": None, "max_length": 64},
                         "method": {"name": "lora", "r": 4, "alpha": 8},
                         "train": {"steps": 2, "micro_batch_size": 4, "save_every": 0, "progress": False, "precision": "fp32"},
                         "diagnostics": {"after_train": [], "options": {"privacy": {"batch_sizes": [1, 2], "num_candidates": 20,
                                                                                    "kseed_steps": 4}}},
                         "output": str(tmp_path / "run")})
    from devicetrap import DeviceTrap
    from tunelab.cli import main
    with DeviceTrap() as trap:  # every tensor the audit makes names its device
        assert main(["diagnose", str(run), "--only", "privacy"]) == 0
    assert not trap.found, trap.found
    res = json.loads((run / "diagnostics" / "privacy.json").read_text())
    s = res["summary"]
    assert s["canaries"] == 1 and 0 <= s["canary_exposure_tuned"] <= L.exposure(1, 20)  # one canary, planted 4 times
    canaries = res["details"]["canaries"]
    assert [r[canaries["columns"].index("repeats")] for r in canaries["rows"]] == [4, 4]  # tuned, base
    assert s["embedding_recall_none"] == 1.0 and s["embedding_precision_none"] == 1.0
    assert s["embedding_precision_dp"] < 0.5
    leaks = {r[2] for r in res["details"]["gradient_leakage"]["rows"]}
    assert leaks == {"embedding rows", "span: layer-0 q (full)", "span: layer-0 LoRA A"}

"""ReasoningV: the two-stage recipe's mechanics on a tiny model (LoRA stage folded into plain weights
with the same logits, a full stage training every weight from them), the reasoning-budget router
and the pass@k estimator."""
from __future__ import annotations

import itertools
import json
from math import comb

import pytest
import torch

from tunelab.eval.reasoning_budget import BUDGETS, Budget, ReasoningBudgetRouter, by_length, pass_at_k


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute)
            assert len(subsets) == comb(n, k)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_the_router_maps_labels_to_budgets_deterministically():
    router = ReasoningBudgetRouter()
    short, long = "What is 2 plus 2?", " ".join(["word"] * 70)
    assert router.route(short) == ("easy", BUDGETS["easy"]) == router.route(short)
    assert router.route(long) == ("hard", BUDGETS["hard"])
    assert by_length(" ".join(["w"] * 40)) == "medium"
    with pytest.raises(Exception, match="the classifier said 'trivial'"):
        ReasoningBudgetRouter(lambda p: "trivial").route(short)


def test_the_router_generates_each_prompt_with_its_budget(model, tok, monkeypatch):
    import tunelab.eval.task as task
    seen = []
    monkeypatch.setattr(task, "generate", lambda m, t, ids, max_new_tokens, batch_size, precision:
                        seen.append((len(ids), max_new_tokens)) or [f"n={max_new_tokens}"] * len(ids))
    router = ReasoningBudgetRouter(lambda p: "easy" if "easy" in p else "hard",
                                   {"easy": Budget(4, "Be brief."), "hard": Budget(9)})
    out = router.generate(model, tok, ["easy one", "hard one", "easy two"])
    assert [o["label"] for o in out] == ["easy", "hard", "easy"]
    assert [o["text"] for o in out] == ["n=4", "n=9", "n=4"] and sorted(seen) == [(1, 9), (2, 4)]


def test_two_stages_lora_then_full(tmp_path):
    """Stage 1 (LoRA) folded into weights/: no LoRA module left and the same logits as the LoRA
    model; stage 2 (full) starts from them with every weight trainable."""
    from tiny import chat_rows, save_tiny_model_dir
    from tunelab import pipeline
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig
    from tunelab.training.final import load_trained

    save_tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(12)))
    common = {"steps": 2, "micro_batch_size": 2, "save_every": 0, "precision": "fp32", "device": "cpu", "progress": False}
    run = pipeline.run({
        "model": {"name": str(tmp_path / "tiny")}, "data": {"train": str(tmp_path / "d.jsonl"), "eval": None, "max_length": 64},
        "train": common, "diagnostics": {"after_train": []}, "output": str(tmp_path / "run"),
        "stages": [{"name": "lora", "method": {"name": "lora", "r": 4, "alpha": 8}, "train": {"lr": 1e-2}},
                   {"name": "full", "method": "full", "train": {"lr": 1e-4}}]})
    merged, _ = load_model(ModelConfig(name=str(run / "stages/lora/weights")))
    assert not any("lora" in n for n, _ in merged.named_modules())
    _, lora_model, _, _ = load_trained(run / "stages/lora")
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, lora_model(input_ids=ids).logits, atol=1e-5)
    setup = json.loads((run / "stages/full/metrics.jsonl").read_text().splitlines()[0])
    assert setup["kind"] == "setup" and setup["trainable_params"] == setup["total_params"]

"""End to end on the real built-in model (slow: SmolLM2-135M on CPU, about a minute)."""
import pytest
import torch

import tunelab

pytestmark = pytest.mark.slow


def test_lora_on_smollm2_trains_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    run = tunelab.train({
        "model": {"name": "smollm2-135m"},
        "data": {"train": "builtin:arith?n=64", "eval": "builtin:arith?n=8&split=test", "max_length": 160},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "train": {"steps": 3, "micro_batch_size": 4, "lr": 1e-3, "progress": False, "save_every": 2},
        "eval": {"num_examples": 4, "max_new_tokens": 24, "before": False},
        "output": str(tmp_path / "run"),
    })
    _, ours, tok, _ = tunelab.load_run(run)
    base, _ = load_model(ModelConfig(name="smollm2-135m"))
    peft = PeftModel.from_pretrained(base, run / "final").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)

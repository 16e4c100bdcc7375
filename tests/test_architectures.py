"""The causal LMs users bring, each as a tiny random model (2 layers, width 64, fp32): trained two
steps with LoRA and with full fine-tuning through `tunelab.train`, reloaded by tunelab and by the
Hugging Face loaders (PEFT's AutoPeftModelForCausalLM, transformers' AutoModelForCausalLM) with the
same outputs; and packed rows equal padded rows through tunelab's attention, with sliding windows
shorter than the examples where the architecture has them. Adding an architecture is one row."""
from __future__ import annotations

import json

import pytest
import torch

import tunelab
from tiny import chat_rows, tiny_tokenizer

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=None)
WINDOW = 4
"""Sliding window of the tiny models that have one: shorter than the test examples."""

ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": WINDOW}),
    "phi3": ("Phi3Config", {}),
    "phi": ("PhiConfig", {}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
    "stablelm": ("StableLmConfig", {}),
    "falcon": ("FalconConfig", {}),
    "smollm3": ("SmolLM3Config", {}),
}
IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 250]])


def config_of(arch: str):
    import transformers

    cls_name, kw = ARCHS[arch]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {cls_name}")
    common = {k: v for k, v in COMMON.items() if arch != "gpt2" or k in ("vocab_size", "pad_token_id",
                                                                        "eos_token_id", "bos_token_id")}
    return cls(**common, **kw)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    made: dict[str, object] = {}

    def get(arch: str):
        if arch not in made:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(arch)
            AutoModelForCausalLM.from_config(config_of(arch), dtype=torch.float32).save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
            made[arch] = path
        return made[arch]
    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8)))
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trains_two_steps_and_reloads_in_the_hf_ecosystem(arch, method, model_dirs, data, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base_dir = model_dirs(arch)
    run = tunelab.train({"model": {"name": str(base_dir)}, "data": {"train": str(data), "eval_fraction": 0, "max_length": 64},
                         "method": {"name": method}, "diagnostics": {"after_train": []}, "output": str(tmp_path / "run"),
                         "train": {"steps": 2, "micro_batch_size": 4, "lr": 0.02, "progress": False, "precision": "fp32"}})
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    _, ours, _, trained = tunelab.load_run(run)
    loader = AutoPeftModelForCausalLM if method == "lora" else AutoModelForCausalLM
    theirs = loader.from_pretrained(run / "final", attn_implementation="eager").eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    assert torch.allclose(logits(theirs), logits(ours), atol=1e-5)
    assert not torch.allclose(logits(base), logits(ours), atol=1e-4)  # the two steps changed the model
    before = logits(ours)
    assert torch.allclose(logits(trained.merge(ours)), before, atol=1e-5)  # export --merge: the same function


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_rows_equal_padded_rows(arch, model_dirs):
    """Through tunelab's loader and attention, examples longer than the sliding window."""
    from tunelab.data import Example, collate, model_inputs
    from tunelab.models import ModelConfig, load_model

    model, _ = load_model(ModelConfig(name=str(model_dirs(arch))))
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids := torch.randint(3, 320, (n,), generator=g).tolist(), ids) for n in (12, 9, 10)]
    out = {}
    for packing in (False, True):
        with torch.no_grad():
            out[packing] = model(**model_inputs(collate(examples, packing=packing, pad_id=0))).logits
    starts = [0, 12, 21]
    for i, ex in enumerate(examples):
        padded, packed = out[False][i, :len(ex)], out[True][0, starts[i]:starts[i] + len(ex)]
        assert torch.allclose(padded, packed, atol=1e-5), f"example {i}"

"""Prompt-family methods (prompt_tuning, prefix_tuning, dept, ept, cpt): the properties of the
papers and of the K/V-prefix realisation, on the tiny model. The shared table (test_methods.py,
rows in rows_prompt.py) covers training, save/load, disable and PEFT loading."""
import copy
import json

import pytest
import torch

from tunelab.config import from_dict
from tunelab.data import collate
from tunelab.data.collate import model_inputs
from tunelab.errors import ConfigError
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES, token_cross_entropy

from rows_prompt import CPT_CONTEXT, SMALL_DEPT
from tiny import random_examples

SMALL_EPT = {**SMALL_DEPT, "num_spaces": 3, "space_rank": 2, "fusion_rank": 4, "gate_hidden": 8}
CASES = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
         "dept": SMALL_DEPT, "ept": SMALL_EPT, "cpt": CPT_CONTEXT}


def make(name, **options):
    cls = METHODS.get(name)
    return cls(from_dict(cls.Config, options, "method"))


def applied(model, name, **options):
    method = make(name, **options)
    return method, method.apply(model)


def perturb(module, scale=0.3, seed=1):
    """Move every parameter of `module` off its (often zero) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def padded(n=3, seed=0):
    return collate(random_examples(n, seed), packing=False, pad_id=0)


def concat_logits(base, prompt, batch):
    """The reference: the base model on [prompt; E(x)], right-padded, logits of the real tokens."""
    B, n = batch["input_ids"].shape[0], prompt.shape[0]
    embeds = torch.cat([prompt[None].expand(B, -1, -1), base.get_input_embeddings()(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(B, n, dtype=torch.long), batch["attention_mask"]], 1)
    with torch.no_grad():
        return base(inputs_embeds=embeds, attention_mask=mask).logits[:, n:]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- the K/V prefix equals the concatenated forward ------------------------------------------
def test_prompt_tuning_equals_concatenated_forward(model):
    base = copy.deepcopy(model)
    method, tuned = applied(model, "prompt_tuning", num_virtual_tokens=5, init="random")
    b, keep = padded(), padded()["attention_mask"].bool()
    expected = concat_logits(base, tuned.prompt.embedding.detach(), b)
    torch.testing.assert_close(logits(tuned, b)[keep], expected[keep], atol=1e-5, rtol=1e-5)


def test_prefix_tuning_is_gated_attention(model):
    """He et al.: attention over [P; x] = (1 - λ)·Attn(x) + λ·Attn over P, on layer 0 of the model."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    _, tuned = applied(model, "prefix_tuning", num_virtual_tokens=3, init="random")
    attn, seen = tuned.model.layers[0].self_attn, {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    attn.o_proj.register_forward_hook(lambda m, a, out: seen.update(out=a[0]))
    ids = torch.randint(3, 320, (2, 9))
    logits(tuned, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    h, (cos, sin), groups = seen["hidden_states"], seen["position_embeddings"], attn.num_key_value_groups
    q, k, v = (p(h).view(2, 9, -1, attn.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    pk, pv = (repeat_kv(t, groups) for t in tuned.prefix.kv(tuned.model)[0])
    s_x = (q @ repeat_kv(k, groups).transpose(-1, -2) * attn.scaling).masked_fill(
        ~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    s_p = q @ pk.transpose(-1, -2) * attn.scaling
    lam = s_p.exp().sum(-1, keepdim=True) / (s_p.exp().sum(-1, keepdim=True) + s_x.exp().sum(-1, keepdim=True))
    gated = (1 - lam) * (s_x.softmax(-1) @ repeat_kv(v, groups)) + lam * (s_p.softmax(-1) @ pv)
    assert 0 < lam.min() and lam.max() < 1
    torch.testing.assert_close(seen["out"], gated.transpose(1, 2).reshape(2, 9, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_equals_padded(model, name):
    """Every example sees its own prefix: per-example losses and the gradients agree."""
    method, tuned = applied(model, name, **CASES[name])
    perturb(method.source(tuned), 0.05)
    tuned.train()
    exs = random_examples(3, seed=4)
    results = []
    for packing in (True, False):
        b = collate(exs, packing=packing, pad_id=0)
        ce = token_cross_entropy(tuned(**model_inputs(b)).logits, b["targets"])  # (B, T)
        per_example = ce[0].split(torch.diff(b["cu_seqlens"]).tolist()) if packing else ce
        out = OBJECTIVES.get("sft")().loss(tuned, b)
        out.loss_sum.backward()
        grads = [p.grad.clone() for p in method.source(tuned).parameters()]
        tuned.zero_grad()
        results.append((torch.stack([x.sum() for x in per_example]), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning", "dept"])
def test_left_padded_cached_generation_matches_full_forward(model, name):
    """model.generate (left padding, KV cache) scores = a fresh unpadded forward of each sequence."""
    method, tuned = applied(model, name, **CASES[name])
    perturb(method.source(tuned), 0.05)
    prompts = [torch.randint(3, 320, (k,)).tolist() for k in (3, 7)]
    ids = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = (torch.arange(7) >= torch.tensor([[7 - len(p)] for p in prompts])).long()
    out = tuned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True, use_cache=True)
    for i, p in enumerate(prompts):
        full = torch.tensor([p + out.sequences[i, 7:].tolist()])
        with torch.no_grad():
            ref = tuned(input_ids=full, use_cache=False).logits[0, len(p) - 1:-1]  # (4, V)
        torch.testing.assert_close(torch.stack([s[i] for s in out.scores]), ref, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradient(model):
    method, tuned = applied(model, "prompt_tuning", num_virtual_tokens=4)
    b = collate(random_examples(3), packing=True, pad_id=0)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            tuned.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tuned.train()
        OBJECTIVES.get("sft")().loss(tuned, b).loss_sum.backward()
        grads.append(tuned.prompt.embedding.grad.clone())
        tuned.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_switch_to_eager_keeps_the_prefix_and_returns_weights(model):
    """An objective that sets 'eager' to read attention weights (ssToken) still gets the prefix."""
    method, tuned = applied(model, "prompt_tuning", num_virtual_tokens=4)
    b = padded()
    keep = b["attention_mask"].bool()
    expected = logits(tuned, b)
    tuned.set_attn_implementation("eager")
    with torch.no_grad():
        out = tuned(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True)
    torch.testing.assert_close(out.logits[keep], expected[keep], atol=1e-5, rtol=1e-5)
    w = out.attentions[-1]  # (B, H, T, T) over the real keys; the rest of each row went to the prefix
    assert w.shape == (3, 4, 14, 14) and torch.all(w.sum(-1) < 1)
    with method.disabled(tuned):
        assert tuned.config._attn_implementation == "eager"


def test_eval_prefix_cache_follows_parameter_updates(model):
    _, tuned = applied(model, "prompt_tuning", num_virtual_tokens=4)
    b = padded()
    before = logits(tuned, b)
    assert torch.equal(logits(tuned, b), before)  # served from the cache
    with torch.no_grad():
        tuned.prompt.embedding.mul_(0.5)
    after = logits(tuned, b)
    assert not torch.allclose(after, before)
    tuned.train()
    with torch.no_grad():
        assert torch.equal(logits(tuned.eval(), b), after)


def test_prefix_needs_a_decoder_only_model():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ConfigError, match="decoder-only"):
        make("cpt", **CPT_CONTEXT).apply(t5)


# -- prompt tuning ------------------------------------------------------------------------------
def test_prompt_init_from_text(tiny_dir):
    from transformers import AutoModelForCausalLM

    from tiny import tiny_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    text_ids = tiny_tokenizer()("Question Answer", add_special_tokens=False)["input_ids"]
    _, tuned = applied(model, "prompt_tuning", num_virtual_tokens=len(text_ids) + 2, init="text",
                       init_text="Question Answer")
    ids = torch.tensor((text_ids * 2)[:len(text_ids) + 2])
    assert torch.equal(tuned.prompt.embedding.detach(), model.get_input_embeddings().weight[ids])
    with pytest.raises(ConfigError, match="init_text"):
        make("prompt_tuning", init="text")


# -- prefix tuning ------------------------------------------------------------------------------
def test_prefix_mlp_reparameterisation_folds_into_the_table(model, tmp_path):
    base = copy.deepcopy(model)
    method, tuned = applied(model, "prefix_tuning", num_virtual_tokens=3, projection_hidden=8)
    src = tuned.prefix
    torch.testing.assert_close(src.table(), src.mlp(src.embedding))
    assert src.table().shape == (3, 2 * 2 * 2 * 16)  # layers · (K, V) · kv heads · head dim
    method.save(tuned, None, tmp_path, "tiny")
    peft = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft["peft_type"] == "PREFIX_TUNING" and not peft["prefix_projection"]
    plain = make("prefix_tuning", num_virtual_tokens=3)
    reloaded = plain.apply(base)  # loads the folded table, no MLP
    plain.load(reloaded, tmp_path)
    torch.testing.assert_close(logits(reloaded, padded()), logits(tuned, padded()), atol=1e-6, rtol=1e-6)


# -- whole runs: training with eval (left-padded, KV-cached generation), output, reload ----------
def _run_cfg(tiny_dir, tmp_path, method: dict) -> dict:
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {a + 1}?"},
                          {"role": "assistant", "content": f"#### {2 * a + 1}"}]} for a in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": {"name": str(tiny_dir)}, "data": {"train": str(data), "eval": str(data), "max_length": 48},
            "method": method, "output": str(tmp_path / "run"), "diagnostics": {"after_train": []},
            "train": {"steps": 4, "micro_batch_size": 2, "lr": 0.05, "save_every": 2, "progress": False},
            "eval": {"num_examples": 3, "max_new_tokens": 4, "batch_size": 3, "every": 2}}


@pytest.mark.parametrize("method", [{"name": "prompt_tuning", "num_virtual_tokens": 4},
                                    {"name": "prefix_tuning", "num_virtual_tokens": 4, "projection_hidden": 8}],
                         ids=["prompt_tuning", "prefix_tuning"])
def test_train_run_with_eval_and_reload(tiny_dir, tmp_path, method):
    import tunelab
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.training.final import load_trained

    run = tunelab.train(_run_cfg(tiny_dir, tmp_path, method))
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if r["kind"] == "train")
    after = json.loads((run / "eval.json").read_text())["after"]
    assert after["num_examples"] == len(after["samples"]) == 3
    assert after["accuracy"] == sum(s["correct"] for s in after["samples"]) / 3
    _, model, tok, _ = load_trained(run)
    b = padded()
    peft_dir = run / "final" / ("peft" if method["name"] == "prompt_tuning" else "")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), peft_dir).eval()
    n = 4 if method["name"] == "prompt_tuning" else 0  # PEFT's prompt tuning also returns the virtual positions
    torch.testing.assert_close(logits(peft, b)[:, n:], logits(model, b), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_smollm2_prompt_equals_concatenation_and_prefix_loads_in_peft(tmp_path):
    """On the real model (GQA, 30 layers): the K/V prefix equals the concatenated forward, and the
    PEFT PREFIX_TUNING output reloads with the same logits."""
    from peft import PeftModel

    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig

    base, tok = load_model(ModelConfig(name="smollm2-135m"))
    ids = tok("Tom has 12 apples. He buys 7 more.", return_tensors="pt")["input_ids"]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    _, pt = applied(copy.deepcopy(base), "prompt_tuning", num_virtual_tokens=8)
    torch.testing.assert_close(logits(pt, b), concat_logits(base, pt.prompt.embedding.detach(), b),
                               atol=1e-4, rtol=1e-4)
    method, pf = applied(copy.deepcopy(base), "prefix_tuning", num_virtual_tokens=8)
    method.save(pf, tok, tmp_path, "smollm2-135m")
    peft = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(peft, b), logits(pf, b), atol=1e-5, rtol=1e-5)

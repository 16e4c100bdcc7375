"""Paper properties of the adapter methods: Houlsby/Pfeiffer sequential adapters, He et al.'s
(scaled) parallel adapter and MAM, on a tiny Llama, an audio spectrogram transformer, BERT and a
plain nn.Module stack; and the adapters in the real training loop. The shared method table
(tests/test_methods.py, rows in tests/rows_adapters.py) covers save/load, disable and merge;
the layer recipes' own properties are in tests/test_methods_layers.py."""
import copy
import json

import pytest
import torch
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.methods._blocks import find_blocks
from tunelab.methods._bottleneck import Bottleneck, bottlenecks

from test_methods import batch, logits, make
from tiny import tiny_model

ADAPTERS = [("adapter", {"placement": "houlsby"}), ("adapter", {"placement": "pfeiffer"}),
            ("parallel_adapter", {"placement": "pfeiffer"}), ("parallel_adapter", {"placement": "houlsby"})]
ADAPTER_IDS = [f"{n}-{o['placement']}" for n, o in ADAPTERS]


def perturb_adapters(model, seed=0):
    """Give every W_up a random value, as training would (the zero init hides the branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bottlenecks(model):
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- tiny non-LLM stacks

def tiny_ast(seed=0):
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(seed)
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_length=24, num_mel_bins=16, patch_size=8, frequency_stride=8, time_stride=8, num_labels=3)
    return ASTForAudioClassification(cfg).eval()


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


class Block(nn.Module):
    """A pre-norm block that is no transformers class: attn (a Linear mixer) and mlp."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h):
        h = h + self.attn(self.norm(h))
        return h + self.mlp(self.norm(h))


class PlainStack(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.blocks, self.out = nn.Linear(4, d), nn.ModuleList(Block(d) for _ in range(n)), nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


# ----------------------------------------------------------------------------- adapters

@pytest.mark.parametrize("name, opts", ADAPTERS, ids=ADAPTER_IDS)
def test_adapter_starts_at_base_and_only_adapters_change_on_ast(name, opts):
    """An audio spectrogram transformer: zero W_up => the base output; a classification loss
    trains the adapters and nothing else; disabling gives the base back."""
    model = tiny_ast()
    base = copy.deepcopy(model)
    method = make(name, {"bottleneck": 4, **opts})
    method.apply(model)
    x, y = torch.randn(4, 24, 16), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(model(input_values=x).logits, base(input_values=x).logits)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-2)
    for _ in range(2):
        nn.functional.cross_entropy(model(input_values=x).logits, y).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(method.trainable_state(model)) and changed
    assert all(".adapter_" in n for n in changed)
    with torch.no_grad(), method.disabled(model):
        assert torch.equal(model(input_values=x).logits, base(input_values=x).logits)


@pytest.mark.parametrize("name, opts", ADAPTERS, ids=ADAPTER_IDS)
def test_adapter_starts_at_base_on_llama(model, name, opts):
    base = copy.deepcopy(model)
    b = batch(1)
    assert torch.equal(logits(make(name, {"bottleneck": 8, **opts}).apply(model), b), logits(base, b))


def capture(module, what):
    """Record a module's input ('in') or output ('out') hidden states on each call."""
    seen = []
    if what == "in":
        module.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                         with_kwargs=True)
    else:
        module.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    return seen


CASES = [  # (model factory, forward, (input module, output module) of each adapter slot relative to a block)
    ("llama", lambda: tiny_model(), lambda m: m(input_ids=batch(2)["input_ids"]),
     {"attn": ("self_attn", "self_attn"), "ffn": ("mlp", "mlp")}),
    ("ast", tiny_ast, lambda m: m(input_values=torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0))),
     {"attn": ("attention", "attention"), "ffn": ("mlp", "mlp")}),
    ("bert", tiny_bert, lambda m: m(input_ids=torch.arange(3, 15)[None]),
     {"attn": ("attention", "attention.output.dense"), "ffn": ("intermediate", "output.dense")}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", ["adapter", "parallel_adapter"])
def test_adapter_branch_reads_the_right_tensor(case, name):
    """He et al.'s insertion forms: sequential adds s·Δ(h) to the sublayer output h; parallel adds
    s·Δ(x) with x the sublayer *input* (for BERT: the input of `intermediate`, added at
    output.dense). Checked for every adapter of every block, one at a time (the others at zero,
    so the stream before it is the base's), by recording the tensors with and without adapters."""
    _, factory, forward, slots = case
    model = factory()
    method = make(name, {"bottleneck": 4, "placement": "houlsby", "scaling": 3.0})
    method.apply(model)
    for block in find_blocks(model)[1]:
        for slot, (src, dst) in slots.items():
            adapter = getattr(block, f"adapter_{slot}")
            with torch.no_grad():
                adapter.up.weight.normal_()
            xs, ys = capture(block.get_submodule(src), "in"), capture(block.get_submodule(dst), "out")
            with torch.no_grad():
                forward(model)
                with method.disabled(model):
                    forward(model)
                branch = adapter.delta(xs[1] if name == "parallel_adapter" else ys[1])
                adapter.up.weight.zero_()
            assert branch.abs().max() > 0
            torch.testing.assert_close(ys[0], ys[1] + branch, atol=1e-5, rtol=1e-5)


def test_parallel_branch_does_not_depend_on_ffn_weights(model):
    """Perturbing the FFN's weights changes the FFN output but not the parallel branch."""
    method = make("parallel_adapter", {"bottleneck": 8, "scaling": 4.0})
    method.apply(model)
    perturb_adapters(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)

    def branch():
        with torch.no_grad():
            y = mlp(x)
            with method.disabled(model):
                return y - mlp(x)

    before = branch()
    with torch.no_grad():
        mlp.up_proj.weight.mul_(3.0)
    torch.testing.assert_close(branch(), before)
    adapter = model.model.layers[0].adapter_ffn  # scaled PA: s · W_up f(W_down x), s = 4
    torch.testing.assert_close(before, 4.0 * adapter.up(adapter.act(adapter.down(x))))


def test_adapter_on_a_plain_module_stack():
    """No transformers class, no config: blocks, sublayers and the width are found anyway."""
    stack = PlainStack()
    base = copy.deepcopy(stack)
    method = make("parallel_adapter", {"bottleneck": 3, "placement": "houlsby"})
    method.apply(stack)
    x = torch.randn(2, 5, 4)
    assert torch.equal(stack(x), base(x))
    assert {n.rsplit(".", 2)[0] for n in method.trainable_state(stack)} == \
        {f"blocks.{i}.adapter_{s}" for i in range(3) for s in ("attn", "ffn")}
    perturb_adapters(stack)
    assert not torch.allclose(stack(x), base(x))


def test_gradient_checkpointing_gives_the_same_gradients(model):
    """The parallel adapter hands its input from a pre-hook to a hook; recomputation under
    non-reentrant checkpointing (train.grad_checkpointing) must see the same tensors."""
    method = make("parallel_adapter", {"bottleneck": 8, "placement": "houlsby"})
    method.apply(model)
    perturb_adapters(model)
    other = copy.deepcopy(model)
    other.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = batch(6)
    for m in (model, other):
        m.train()
        m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in other.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_packed_rows_equal_padded_rows(model):
    """Adapters act per position, so a packed row gives each example the logits it gets alone."""
    from tunelab.data import collate
    from tunelab.data.records import Example
    from tunelab.objectives import model_inputs

    method = make("adapter", {"bottleneck": 8})
    method.apply(model)
    perturb_adapters(model)
    exs = [Example(list(range(3 + i, 10 + 2 * i)), list(range(3 + i, 10 + 2 * i))) for i in range(3)]
    packed, padded = collate(exs, packing=True, pad_id=0), collate(exs, packing=False, pad_id=0)
    with torch.no_grad():
        lp = model(**model_inputs(packed)).logits[0]
        lq = model(**model_inputs(padded)).logits
    cu = packed["cu_seqlens"].tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        torch.testing.assert_close(lp[s:e], lq[i, :e - s], atol=1e-5, rtol=1e-5)


def test_adapter_parameter_count(model):
    """Per adapter 2·d·r + r + d (two Linear layers with biases); one per slot per block."""
    d, r, L = 64, 8, 2
    for placement, slots in (("houlsby", 2), ("pfeiffer", 1)):
        m = make("adapter", {"bottleneck": r, "placement": placement}).apply(tiny_model())
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == L * slots * (2 * d * r + r + d)


def test_zero_init_of_both_projections_starves_the_gradient():
    """Why W_down is not zeroed (PETL_AST zeroes both): then W_down and W_up get no gradient,
    while our init (W_down Kaiming, W_up zero) gives W_up one at the first step."""
    x = torch.randn(6, 16)
    ours = Bottleneck(16, 4, "gelu", 1.0, 0.0, like=x)
    both = copy.deepcopy(ours)
    nn.init.zeros_(both.down.weight)
    for m in (ours, both):
        (m.delta(x) * torch.randn(6, 16)).sum().backward()
    assert both.down.weight.grad.abs().max() == 0 and both.up.weight.grad.abs().max() == 0
    assert ours.up.weight.grad.abs().max() > 0


def test_adapter_output_files_and_errors(model, tmp_path):
    method = make("adapter", {"bottleneck": 4})
    method.apply(model)
    method.save(model, None, tmp_path, "tiny")
    meta = json.loads((tmp_path / "tunelab_adapter.json").read_text())
    assert meta["method"] == "adapter" and meta["options"]["bottleneck"] == 4
    assert not (tmp_path / "adapter_config.json").exists()  # PEFT has no such adapter type
    other = make("parallel_adapter", {"bottleneck": 4})
    with pytest.raises(ConfigError, match="holds a 'adapter' adapter"):
        other.load(other.apply(tiny_model()), tmp_path)
    with pytest.raises(TunelabError, match="cannot be merged"):
        method.merge(model)


def test_adapter_config_errors(model):
    with pytest.raises(ConfigError, match="modules.ffn_out: no module 'ffn'"):
        make("adapter", {"modules": {"ffn_out": "ffn"}}).apply(model)
    with pytest.raises(ConfigError, match="modules.gate: unknown role"):
        make("adapter", {"modules": {"gate": "mlp"}})
    with pytest.raises(ConfigError, match="bottleneck"):
        make("adapter", {"bottleneck": 0})
    with pytest.raises(ConfigError, match="blocks: found no list"):
        make("adapter", {"blocks": "nope"}).apply(model)


def test_mam_is_prefix_tuning_plus_parallel_adapter(model):
    """MAM = prefix tuning at attention + scaled PA at the FFN: with its adapters off it computes
    prefix_tuning with the same prefix; with its prefix off, parallel_adapter with the same
    adapters; at init (W_up = 0) it is prefix tuning alone."""
    from tunelab.methods._prefix import prefix_disabled

    b = batch(5)
    mam = make("mam", {"bottleneck": 8, "num_virtual_tokens": 4})
    tuned = mam.apply(copy.deepcopy(model))
    prefix = make("prefix_tuning", {"num_virtual_tokens": 4})
    only_prefix = prefix.apply(copy.deepcopy(model))
    only_prefix.load_state_dict({"prefix.weight": tuned.prefix.weight}, strict=False)
    assert torch.equal(logits(tuned, b), logits(only_prefix, b))
    perturb_adapters(tuned)
    pa = make("parallel_adapter", {"bottleneck": 8, "scaling": 4.0})
    only_pa = pa.apply(copy.deepcopy(model))
    only_pa.load_state_dict({n: t for n, t in tuned.state_dict().items() if ".adapter_" in n}, strict=False)
    with prefix_disabled(tuned):
        torch.testing.assert_close(logits(tuned, b), logits(only_pa, b), atol=1e-6, rtol=1e-6)
    for m in bottlenecks(tuned):
        m.enabled = False
    assert torch.equal(logits(tuned, b), logits(only_prefix, b))


def test_mam_defaults_follow_the_paper():
    cfg = make("mam", {}).cfg
    assert (cfg.num_virtual_tokens, cfg.bottleneck, cfg.scaling, cfg.activation) == (30, 512, 4.0, "relu")


# ----------------------------------------------------------------------------- generation and the real loop

@pytest.mark.parametrize("name, options", [("adapter", {"placement": "houlsby"}),
                                           ("parallel_adapter", {"placement": "houlsby"}),
                                           ("mam", {"num_virtual_tokens": 3})])
def test_kv_cached_left_padded_generation_matches_full_forward(model, name, options):
    """The eval path (tunelab.eval.task.generate: left padding + KV cache) sees the adapters: its
    greedy tokens equal greedy decoding by full forwards of each prompt alone."""
    method = make(name, {"bottleneck": 8, **options})
    method.apply(model)
    perturb_adapters(model, seed=1)
    prompts = [[5, 17, 40, 41, 9], [7, 8], [30, 31, 32]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=0, eos_token_id=None, use_cache=True)[:, width:]
        for p, g in zip(prompts, gen.tolist()):
            seq = list(p)
            for _ in range(5):
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
            assert g == seq[len(p):]


def chat_file(path, n=16):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {a + 3}?"},
                          {"role": "assistant", "content": f"#### {2 * a + 3}"}]} for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cfg(tiny_dir, data, out, method, packing=True, steps=4):
    return {"model": {"name": str(tiny_dir)},
            "data": {"train": str(data), "eval": str(data), "max_length": 64, "packing": packing},
            "method": method,
            "train": {"steps": steps, "micro_batch_size": 4, "lr": 1e-2, "save_every": 0, "progress": False,
                      "schedule": "constant", "precision": "fp32", "seed": 0},
            "eval": {"num_examples": 6, "max_new_tokens": 6, "batch_size": 6},
            "diagnostics": {"after_train": []}, "output": str(out)}


def train_losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_mam_trains_in_the_real_loop(tiny_dir, tmp_path):
    """tunelab.train with packed batches and generation eval before/after (MAM: prefix + parallel
    adapter, so both mechanisms run in the loop); the run reloads with tunelab.load_run, and
    disabled it is the base model again."""
    import tunelab
    from transformers import AutoModelForCausalLM

    method = {"name": "mam", "bottleneck": 8, "num_virtual_tokens": 4}
    run = tunelab.train(run_cfg(tiny_dir, chat_file(tmp_path / "d.jsonl"), tmp_path / "run", method))
    res = json.loads((run / "eval.json").read_text())
    assert {"before", "after"} <= set(res) and res["after"]["num_examples"] == 6
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    losses = train_losses(run)
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (run / "final/tunelab_adapter.safetensors").exists()
    _, tuned, _, loaded_method = tunelab.load_run(run)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    b = batch(4)
    assert not torch.allclose(logits(tuned, b), logits(base, b))
    with loaded_method.disabled(tuned):
        assert torch.equal(logits(tuned, b), logits(base, b))
    from tunelab.errors import TunelabError
    from tunelab.export import export
    with pytest.raises(TunelabError, match="cannot be folded"):
        export(run, tmp_path / "merged", merge=True)
    assert (export(run, tmp_path / "as_is") / "tunelab_adapter.safetensors").exists()


def test_adapter_packed_and_padded_runs_agree(tiny_dir, tmp_path):
    import tunelab

    data = chat_file(tmp_path / "d.jsonl")
    cfgs = [run_cfg(tiny_dir, data, tmp_path / f"p{packing}", {"name": "adapter", "bottleneck": 8},
                    packing=packing, steps=3) for packing in (True, False)]
    runs = [tunelab.train(c | {"data": c["data"] | {"eval": None}}) for c in cfgs]
    assert train_losses(runs[0]) == pytest.approx(train_losses(runs[1]), abs=1e-5)

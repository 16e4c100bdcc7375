"""The shared method table: every parameterization method must pass every test here.

Add a method by adding a row (id, name, options, what must train) to one of the row files:
tests/rows_sparse.py, tests/rows_prompt.py, tests/rows_adapters.py, or CORE_ROWS below."""
import copy

import pytest
import torch

from tunelab.config import from_dict
from tunelab.data import collate
from tunelab.data.records import Example
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.run.context import StepContext

from rows_adapters import ROWS as ADAPTER_ROWS
from rows_prompt import ROWS as PROMPT_ROWS
from rows_sparse import ROWS as SPARSE_ROWS

# (id, method name, options, predicate on parameter names that must train)
CORE_ROWS = [
    ("full", "full", {}, lambda n: True),
    ("lora", "lora", {"r": 4, "alpha": 8}, lambda n: ".lora_" in n),
    ("rslora-qv", "lora", {"r": 4, "alpha": 8, "rslora": True, "target_modules": ["q_proj", "v_proj"]},
     lambda n: ".lora_" in n and ("q_proj" in n or "v_proj" in n)),
    ("lora-regex", "lora", {"r": 2, "target_modules": [r"model\.layers\.1\.mlp\..*"]},
     lambda n: ".lora_" in n and "layers.1.mlp" in n),
    ("longlora", "longlora", {"r": 4, "alpha": 8},  # LoRA on q, k, v, o; embeddings and norms in full
     lambda n: (".lora_" in n and n.split(".")[-3] in ("q_proj", "k_proj", "v_proj", "o_proj"))
     or "embed_tokens" in n or n.endswith("norm.weight")),
    ("locft", "locft", {"layer": 0}, lambda n: n.startswith("model.layers.0.mlp.down_proj.")),
    ("locft-block", "locft", {"layer": -1, "module": ""}, lambda n: n.startswith("model.layers.1.")),
]
METHOD_ROWS = CORE_ROWS + SPARSE_ROWS + PROMPT_ROWS + ADAPTER_ROWS


def make(name, options):
    cls = METHODS.get(name)
    return cls(from_dict(cls.Config, options, "method"))


def batch(seed=0, n=3, vocab=320):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i in range(n):
        ids = torch.randint(3, vocab, (7 + 3 * i,), generator=g).tolist()
        exs.append(Example(ids, [-100] * 3 + ids[3:]))
    return collate(exs, packing=False, pad_id=0)


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def train_steps(model, method, steps=2, lr=1e-2):
    obj = OBJECTIVES.get("sft")()
    opt = torch.optim.AdamW(method.param_groups(model, 0.0), lr=lr)
    model.train()
    for s in range(steps):
        out = obj.loss(model, batch(s))
        (out.loss_sum / out.num_tokens).backward()
        assert torch.isfinite(out.loss_sum)
        opt.step()
        opt.zero_grad()
        method.on_step(model, StepContext(step=s + 1, total_steps=steps), opt)
    return model.eval()


@pytest.fixture(params=METHOD_ROWS, ids=[r[0] for r in METHOD_ROWS])
def row(request):
    return request.param


@pytest.fixture
def trained(row, model):
    _, name, options, _ = row
    base = copy.deepcopy(model)
    method = make(name, options)
    tuned = train_steps(method.apply(model), method)
    return base, method, tuned


def test_only_intended_parameters_change(row, model):
    """Checked on the weights after real optimizer steps, not on requires_grad."""
    _, name, options, must_train = row
    method = make(name, options)
    tuned = method.apply(model)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    train_steps(tuned, method)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    intended = {n for n in before if must_train(n)}
    assert changed == intended
    state = set(method.trainable_state(tuned))
    assert state & set(before) == intended
    # Besides parameters, a checkpoint may hold model buffers that the method's re-selection
    # changed (sparse indices, a step counter, a selection mask): nothing else.
    assert state - set(before) <= {n for n, _ in tuned.named_buffers()}


def test_save_load_identical(trained, tmp_path):
    base, method, tuned = trained
    method.save(tuned, None, tmp_path, "tiny")
    fresh = method.__class__(method.cfg)
    reloaded = fresh.apply(copy.deepcopy(base))
    fresh.load(reloaded, tmp_path)
    b = batch(7)
    assert torch.equal(logits(reloaded.eval(), b), logits(tuned, b))


def test_merge_equals_unmerged(trained):
    _, method, tuned = trained
    if not method.supports_merge:
        pytest.skip(f"{method.name} cannot be folded into a plain model")
    b = batch(8)
    expected = logits(tuned, b)
    merged = method.merge(copy.deepcopy(tuned))
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in merged.modules())
    torch.testing.assert_close(logits(merged.eval(), b), expected, atol=1e-5, rtol=1e-5)


def test_merged_export_loads_with_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    _, method, tuned = trained
    if not method.supports_merge:
        pytest.skip(f"{method.name} cannot be folded into a plain model")
    b = batch(9)
    method.merge(copy.deepcopy(tuned)).save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(loaded, b), logits(tuned, b), atol=1e-5, rtol=1e-5)


def test_disable_recovers_base(trained):
    base, method, tuned = trained
    if not method.supports_disable:
        pytest.skip(f"{method.name} has no in-process base to fall back to")
    b = batch(10)
    assert not torch.allclose(logits(tuned, b), logits(base, b))
    with method.disabled(tuned):
        assert torch.equal(logits(tuned, b), logits(base, b))


def test_peft_loads_adapter_with_same_logits(trained, tmp_path):
    """Methods that write a PEFT adapter: PeftModel.from_pretrained gives our logits."""
    from peft import PeftModel

    base, method, tuned = trained
    method.save(tuned, None, tmp_path, "tiny")
    if not (tmp_path / "adapter_config.json").exists():
        pytest.skip(f"{method.name} writes no PEFT adapter (it saves {sorted(p.name for p in tmp_path.iterdir())})")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    b = batch(11)
    torch.testing.assert_close(logits(peft_model, b), logits(tuned, b), atol=1e-6, rtol=1e-6)


def test_lora_starts_at_base(model):
    base = copy.deepcopy(model)
    method = make("lora", {"r": 4})
    b = batch(3)
    assert torch.equal(logits(method.apply(model).eval(), b), logits(base, b))


def test_rslora_scaling():
    assert make("lora", {"r": 16, "alpha": 32, "rslora": True}).cfg.scaling == pytest.approx(8.0)
    assert make("lora", {"r": 16, "alpha": 32}).cfg.scaling == pytest.approx(2.0)


def test_target_pattern_matching_nothing_fails(model):
    from tunelab.errors import ConfigError
    with pytest.raises(ConfigError, match="target_modules: 'nope' matches no linear layer"):
        make("lora", {"target_modules": ["nope"]}).apply(model)


@pytest.mark.parametrize("bias", [False, True])
def test_lora_fused_path_equals_the_module_formula(bias):
    """LoRALinear's training path (the scaled update accumulated by addmm_) gives the plain
    formula's output and gradients for x, A and B; gradcheck in float64 checks its backward against
    finite differences. Dropout and a trainable base take the plain formula."""
    from tunelab.methods.lora import LoRALinear, _FrozenBaseLoRA

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 40, bias=bias).requires_grad_(False), r=3, scaling=1.7, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)  # B = 0 (the init) would hide errors in A's gradient
    x = torch.randn(2, 5, 24, requires_grad=True)
    params = [x, layer.lora_A.weight, layer.lora_B.weight]
    assert layer._fused_ok(x)
    fused = layer(x)
    g = torch.randn_like(fused)
    plain = layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    d = layer.double()
    args = (x.detach().double().reshape(10, 24).requires_grad_(), d.base_layer.weight, d.base_layer.bias,
            d.lora_A.weight, d.lora_B.weight, 1.7)
    assert torch.autograd.gradcheck(_FrozenBaseLoRA.apply, args)

    layer.float()
    assert not LoRALinear(torch.nn.Linear(24, 40), r=3, scaling=1.0, dropout=0.1).train()._fused_ok(x)
    layer.base_layer.weight.requires_grad_(True)
    assert not layer._fused_ok(x)


def _bf16_case(store_bf16: bool):
    from tunelab.methods.lora import LoRALinear
    from tunelab.training.lowp import store_frozen_in

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 48, bias=True).requires_grad_(False), r=4, scaling=2.0, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    if store_bf16:
        store_frozen_in(layer, torch.bfloat16)
    x = torch.randn(3, 7, 64, requires_grad=True)
    return layer, x, [x, layer.lora_A.weight, layer.lora_B.weight]


@pytest.mark.parametrize("store_bf16", [False, True])
def test_lora_fused_path_under_bf16_autocast(store_bf16):
    """Under bf16 autocast the fused path runs in bf16 (inputs cast as autocast would) and matches
    the plain formula under autocast within bf16 rounding: |fused - plain| <= 4 * 2**-8 * |plain|
    elementwise-max (the plain formula rounds the update, its scale and the sum separately: three
    bf16 roundings more). Gradients of x, A and B come back in fp32, and the fused path is nearer
    the fp32 reference than the plain one. Storing the frozen weight in bf16 first changes nothing."""
    layer, x, params = _bf16_case(store_bf16)
    g = torch.randn(3, 7, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fused_ok(x)
        fused = layer(x)
        plain = layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    assert fused.dtype == plain.dtype == torch.bfloat16
    tol = 4 * 2.0 ** -8 * float(plain.float().abs().max())
    assert float((fused.float() - plain.float()).abs().max()) <= tol
    gf, gp = torch.autograd.grad(fused, params, g), torch.autograd.grad(plain, params, g)
    assert all(t.dtype == torch.float32 for t in gf)
    for a, b in zip(gf, gp):
        assert float((a - b).abs().max()) <= 4 * 2.0 ** -8 * float(b.abs().max())
    with torch.no_grad():  # the fp32 reference
        w = layer.base_layer.weight.float()
        ref = x @ w.t() + layer.base_layer.bias.float() + (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t() * 2.0
    assert (fused.float() - ref).abs().max() <= (plain.float() - ref).abs().max() * 1.01


def test_frozen_weights_stored_in_bf16_give_autocasts_numbers_exactly():
    """training/lowp.py: autocast would cast each frozen weight to bf16 in every forward; storing it
    in bf16 once gives bit-identical outputs and gradients (a mutation, e.g. storing in fp16 or
    truncating instead of rounding, breaks it)."""
    outs = []
    for store in (False, True):
        layer, x, params = _bf16_case(store)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        outs.append((y, torch.autograd.grad(y, params, torch.ones_like(y))))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_only_frozen_plain_linears_are_stored_in_low_precision(model):
    """The head (tied to the embeddings), trainable layers and non-Linear modules keep fp32."""
    from tunelab.methods.lora import LoRA, LoRAConfig
    from tunelab.training.lowp import store_frozen_in

    tuned = LoRA(LoRAConfig(r=2)).apply(model)
    n = store_frozen_in(tuned, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in tuned.named_parameters()}
    assert n == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(dt == torch.bfloat16 for name, dt in dtypes.items() if name.endswith("base_layer.weight"))
    assert all(dt == torch.float32 for name, dt in dtypes.items() if "lora_" in name or "norm" in name or "embed" in name)

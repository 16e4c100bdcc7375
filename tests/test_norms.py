"""The closed-form RMSNorm (tunelab/models/norms.py): same values and gradients as transformers'."""
import copy

import torch

from tunelab.models.norms import fuse_rms_norms, rms_norm


def test_closed_form_passes_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))


def test_fused_model_equals_the_original_in_values_and_every_gradient(model):
    from tiny import random_examples

    from tunelab.data import collate

    ref = copy.deepcopy(model).train()
    assert fuse_rms_norms(model) == 2 * 2 + 1  # two per layer and the final one
    assert fuse_rms_norms(model) == 5  # idempotent
    model.train()
    batch = collate(random_examples(3), packing=False, pad_id=0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out, want = model(**inputs).logits, ref(**inputs).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    (out.square().mean()).backward()
    (want.square().mean()).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert set(model.state_dict()) == set(ref.state_dict())
    twin = copy.deepcopy(model)
    assert type(twin.model.norm) is type(model.model.norm) and getattr(type(twin.model.norm), "forward") \
        is not getattr(type(ref.model.norm), "forward")


def test_other_dtypes_take_the_original_forward(model):
    fuse_rms_norms(model)
    norm = model.model.norm
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(norm(x), type(norm).__mro__[1].forward(norm, x))


def test_a_norm_of_another_formula_is_left_alone():
    """Gemma's norm scales by (1 + weight): it fails the check and keeps its class."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    holder = torch.nn.Sequential(GemmaRMSNorm(8))
    with torch.no_grad():
        holder[0].weight.normal_()
    assert fuse_rms_norms(holder) == 0 and type(holder[0]) is GemmaRMSNorm


def test_under_bf16_autocast_the_closed_form_runs_with_the_same_forward(model, monkeypatch):
    """Under bf16 autocast the residual stream is fp32 and the norm's ops are not autocast's
    low-precision ops: the closed form runs there too (every norm), with the same logits bit for bit
    and gradients within bf16 roundoff of the original's."""
    import tunelab.models.norms as N
    from tiny import random_examples

    from tunelab.data import collate

    ref = copy.deepcopy(model).train()
    fuse_rms_norms(model)
    model.train()
    calls = []
    monkeypatch.setattr(N, "rms_norm", lambda *a: calls.append(1) or rms_norm(*a))
    batch = collate(random_examples(3), packing=False, pad_id=0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = model(**inputs).logits, ref(**inputs).logits
    assert len(calls) == 5  # two per layer and the final one
    assert torch.equal(out, want)
    out.float().square().mean().backward()
    want.float().square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        rel = ((p.grad - q.grad).norm() / q.grad.norm()).item()
        assert rel < 2.0 ** -5, (n, rel)  # a few bf16 roundings (2**-8 each) of the matmuls behind

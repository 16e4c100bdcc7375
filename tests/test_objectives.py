"""Objectives: shared properties (the table grows with each objective) and SFT's reference check."""
import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.data import collate
from tunelab.objectives import OBJECTIVES, trained_logits

OBJECTIVE_ROWS = ["sft", "otr", "sstoken", "qtuning", "masked_thought", "caft", "tl_weighting"]


from tiny import random_examples as examples  # noqa: E402


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", OBJECTIVE_ROWS)
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("size", [1, 3])
def test_finite_loss_and_gradients_only_where_trained(name, packing, size, model, tok):
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1" in n)
    objective = OBJECTIVES.get(name)()
    objective.setup(model, tok)
    out = objective.loss(model.train(), collate(examples(size), packing=packing, pad_id=0))
    (out.loss_sum / out.num_tokens).backward()
    assert torch.isfinite(out.loss_sum) and out.num_tokens > 0
    assert all(type(v) is float and math.isfinite(v) for v in out.metrics.values())
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("layers.1" in n), n


@pytest.mark.parametrize("packing", [True, False])
def test_sft_equals_reference_cross_entropy(model, packing):
    """SFT (head applied to trained positions only) equals HF's full-logits shifted CE."""
    exs = examples()
    out = OBJECTIVES.get("sft")().loss(model, collate(exs, packing=packing, pad_id=0))
    total, count = 0.0, 0
    for ex in exs:
        logits = model(torch.tensor([ex.input_ids])).logits[0, :-1]
        labels = torch.tensor(ex.labels[1:])
        total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    assert out.num_tokens == count
    torch.testing.assert_close(out.loss_sum, total, rtol=1e-5, atol=1e-5)


def test_trained_logits_match_full_forward(model):
    batch = collate(examples(), packing=False, pad_id=0)
    logits, targets = trained_logits(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["targets"] != -100
    torch.testing.assert_close(logits, full[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, batch["targets"][keep])


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_chunked_cross_entropy_equals_plain_loss_and_gradients(model, chunk):
    """SFT with the head + CE chunked (and checkpointed) equals the one-shot loss and gradients."""
    import copy

    from tunelab.objectives.sft import SFTConfig

    other = copy.deepcopy(model)
    batch = collate(examples(), packing=True, pad_id=0)
    plain = OBJECTIVES.get("sft")(SFTConfig(chunk_tokens=10**9)).loss(model, batch)
    chunked = OBJECTIVES.get("sft")(SFTConfig(chunk_tokens=chunk)).loss(other, batch)
    torch.testing.assert_close(chunked.loss_sum, plain.loss_sum, rtol=1e-6, atol=1e-5)
    plain.loss_sum.backward()
    chunked.loss_sum.backward()
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_cross_entropy_equals_the_plain_formula(chunk, bias):
    """The fused head + CE (gradients formed in the forward) equals autograd on
    CE(linear(h).float()): loss and gradients of h, W and b, for any chunking and a non-unit
    incoming gradient; float64 gradcheck; frozen W gets no gradient; no_grad gives the value."""
    from tunelab.objectives._head_ce import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=bias)
    h = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 13, (11,))
    fused = head_cross_entropy(h, head, y, chunk)
    (0.7 * fused).backward()
    got = [t.grad.clone() for t in (h, *head.parameters())]
    for t in (h, *head.parameters()):
        t.grad = None
    plain = F.cross_entropy(head(h).float(), y, reduction="sum")
    (0.7 * plain).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    for g, t in zip(got, (h, *head.parameters())):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-6)

    head64 = torch.nn.Linear(5, 7, bias=bias).double()
    h64 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y64 = torch.randint(0, 7, (6,))
    assert torch.autograd.gradcheck(lambda x, w, *b: head_cross_entropy(
        x, _linear_with(head64, w, *b), y64, 4), (h64, *head64.parameters()))

    head.weight.requires_grad_(False)  # the LoRA case: a frozen head, gradients for h only
    h.grad = head.weight.grad = None
    head_cross_entropy(h, head, y, chunk).backward()
    assert head.weight.grad is None
    torch.testing.assert_close(h.grad, got[0] / 0.7, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        value = head_cross_entropy(h, head, y, chunk)
    assert not value.requires_grad
    torch.testing.assert_close(value, plain.detach(), rtol=1e-6, atol=1e-5)
    empty = head_cross_entropy(h[:0], head, y[:0], chunk)
    empty.backward()
    assert float(empty.detach()) == 0.0


@pytest.mark.parametrize("frozen", [True, False])
def test_fused_head_under_bf16_autocast_casts_the_head_once_and_equals_autograd(frozen):
    """Under bf16 autocast the fused head + CE casts W to bf16 once per call, however many chunks
    (F.linear would cast it again in every chunk, and the gradient's matmul once more), and gives
    autograd's loss and gradients on CE(linear(h).float()) under the same autocast."""
    from tiny import bf16_cast_counter

    from tunelab.objectives._head_ce import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13).requires_grad_(not frozen)
    h = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 13, (11,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with bf16_cast_counter() as counter:
            fused = head_cross_entropy(h, head, y, 3)  # 4 chunks
        plain = F.cross_entropy(head(h).float(), y, reduction="sum")
    assert counter.casts.get(head.weight.data_ptr()) == 1
    ts = [h] + ([] if frozen else [head.weight, head.bias])
    got = torch.autograd.grad(fused, ts)
    want = torch.autograd.grad(plain, ts)
    torch.testing.assert_close(fused, plain, rtol=2.0 ** -8, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2.0 ** -7, atol=2.0 ** -7 * float(w.abs().max()))


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_head_writes_no_zeroed_or_scaled_copy_of_the_head_gradient(bf16):
    """The head's (V, d) gradient is as large as the embedding: the first chunk's product becomes
    it (no zero-filled buffer), later chunks add into it, and a loss back-propagated as is (incoming
    gradient 1, the training loop's case) gets it back without a scaled copy. Non-unit incoming
    gradients are scaled (test_fused_head_cross_entropy_equals_the_plain_formula)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tunelab.objectives._head_ce import head_cross_entropy

    class HeadShaped(TorchDispatchMode):  # the ops whose result has the head's shape
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (13, 8):
                self.ops.append(func.__name__)
            return out

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13)
    h = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 13, (11,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), HeadShaped() as seen:
        loss = head_cross_entropy(h, head, y, 3)  # 4 chunks
        (grad_w,) = torch.autograd.grad(loss, [head.weight])
    assert not [op for op in seen.ops if op.split(".")[0] in ("zeros_like", "zeros", "zero_", "fill_", "mul", "mul_")], seen.ops
    assert sum(op.startswith("mm") for op in seen.ops) == (4 if bf16 else 1), seen.ops  # fp32: addmm_ in place after the first
    assert grad_w.dtype == torch.float32 and grad_w.shape == (13, 8)
    (empty,) = torch.autograd.grad(head_cross_entropy(h[:0], head, y[:0], 3), [head.weight])  # no rows
    assert torch.equal(empty, torch.zeros_like(head.weight))


def _linear_with(head, weight, bias=None):
    """A plain nn.Linear sharing the given tensors (so gradcheck can perturb them)."""
    out = torch.nn.Linear(head.in_features, head.out_features, bias=bias is not None).to(weight.dtype)
    del out.weight
    out.weight = weight  # a plain attribute: still type nn.Linear, no hooks
    if bias is not None:
        del out.bias
        out.bias = bias
    return out


def test_fused_head_cross_entropy_leaves_a_hooked_head_to_autograd():
    """A head with a forward hook (a method that adapts it) is not fused: the hook's effect shows."""
    from tunelab.objectives._head_ce import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13)
    h, y = torch.randn(5, 8, requires_grad=True), torch.randint(0, 13, (5,))
    head.register_forward_hook(lambda mod, args, out: 2 * out)
    want = F.cross_entropy(2 * F.linear(h, head.weight, head.bias), y, reduction="sum")
    torch.testing.assert_close(head_cross_entropy(h, head, y, 2), want)

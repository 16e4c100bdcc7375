"""run/casts.py: a weight's low-precision copy is made at most once per step, into one kept buffer,
and is re-read every step (so no step sees an earlier step's weight)."""
import torch

from tunelab.run.casts import cast_once, one_cast_per_step


def test_outside_a_step_every_call_casts_afresh():
    w = torch.randn(5, 3)
    a, b = cast_once(w, torch.bfloat16), cast_once(w, torch.bfloat16)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, w.to(torch.bfloat16))
    assert cast_once(w, torch.float32) is w  # already in that dtype: as is


def test_inside_a_step_one_cast_then_the_same_buffer_every_step():
    w = torch.randn(5, 3, requires_grad=True)
    seen = []
    for step in range(3):
        with one_cast_per_step():
            first = cast_once(w, torch.bfloat16)
            with one_cast_per_step():  # nested: still the same step
                assert cast_once(w, torch.bfloat16) is first
            assert torch.equal(first, w.detach().to(torch.bfloat16))
            seen.append(first.data_ptr())
        with torch.no_grad():
            w.data.mul_(-2.0).add_(step)  # in place, through .data: autograd's version counter does not see it
    assert len(set(seen)) == 1
    with one_cast_per_step():  # a new step reads the changed weight
        assert torch.equal(cast_once(w, torch.bfloat16), w.detach().to(torch.bfloat16))


def test_a_change_of_shape_or_dtype_gets_a_new_buffer():
    w = torch.randn(4, 2)
    with one_cast_per_step():
        a = cast_once(w, torch.bfloat16)
        h = cast_once(w, torch.float16)
        assert h.dtype == torch.float16 and torch.equal(h, w.to(torch.float16))
    w.data = torch.randn(6, 2)
    with one_cast_per_step():
        b = cast_once(w, torch.bfloat16)
    assert a.shape == (4, 2) and b.shape == (6, 2) and torch.equal(b, w.to(torch.bfloat16))


def test_off_the_cpu_the_buffer_is_dropped_when_the_step_ends():
    from tunelab.run import casts

    cpu, meta = torch.randn(3, 2), torch.empty(3, 2, device="meta")
    with one_cast_per_step():
        cast_once(cpu, torch.bfloat16)
        assert cast_once(meta, torch.bfloat16).device.type == "meta"
        assert meta in casts._kept and cpu in casts._kept
    assert meta not in casts._kept and cpu in casts._kept

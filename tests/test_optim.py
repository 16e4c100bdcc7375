"""tunelab's AdamW: torch's fused kernel where the parameters allow it, the multi-tensor path for
sharded ones, and the same update either way."""
import pytest
import torch

from tunelab.training.config import TrainConfig
from tunelab.training.optim import build_optimizer, fused_ok


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(64, 32), (32,), (16, 64)]]


def _run(opt, params, steps=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def test_fused_update_equals_the_multi_tensor_update():
    """build_optimizer's fused AdamW (lr_scale group, weight decay, betas) against torch's foreach
    AdamW on the same groups: equal to float rounding (fp32: a few ulp after 5 steps)."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, betas=[0.8, 0.95], warmup_steps=0)
    a, b = _params(), _params()
    opt, _ = build_optimizer([{"params": a[:2]}, {"params": a[2:], "lr_scale": 0.5}], cfg)
    assert opt.defaults["fused"] is True
    ref = torch.optim.AdamW([{"params": b[:2]}, {"params": b[2:], "lr": 5e-3}], lr=1e-2, betas=(0.8, 0.95),
                            weight_decay=0.1, foreach=True)
    got, want = _run(opt, a), _run(ref, b)
    moved = max((w - p).abs().max().item() for w, p in zip(want, _params()))
    assert moved > 1e-2  # the steps did move the weights
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_sharded_parameters_keep_the_multi_tensor_path(tmp_path):
    """A DTensor parameter (what FSDP2 makes) is not given to the fused kernel."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        assert not fused_ok([p]) and fused_ok([torch.nn.Parameter(torch.randn(4, 4))])
        opt, _ = build_optimizer([{"params": [p]}], TrainConfig(lr=1e-2))
        assert not opt.defaults["fused"] and opt.defaults["foreach"] is True
    finally:
        dist.destroy_process_group()


def test_non_float_or_meta_parameters_are_not_fused():
    assert not fused_ok([torch.zeros(3, device="meta", requires_grad=True)])
    assert not fused_ok([torch.zeros(3, dtype=torch.int64)])

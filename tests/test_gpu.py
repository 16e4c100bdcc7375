"""Checks that need a CUDA GPU (skipped elsewhere; CI has none). Run them where one is lent:

    python -m pytest -q -m gpu tests/test_gpu.py

They guard the GPU-only code paths: the varlen flash attention for packed rows, bf16 training on
the GPU, the fused head + cross-entropy under CUDA autocast, and the nccl process group (torchrun
with one process on one GPU still takes the distributed path).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tunelab
from test_train import base_cfg, losses
from tiny import chat_rows

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_equals_the_per_example_loop(kv_heads, monkeypatch):
    """Packed rows on the GPU take one varlen flash call; its output and q/k/v gradients equal
    causal SDPA run example by example (fp32 reference on the same bf16 inputs)."""
    from tunelab.models import attention

    calls = []
    real = attention._varlen
    monkeypatch.setattr(attention, "_varlen", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    sizes = [5, 17, 1, 40, 3]
    n, heads, dim = sum(sizes), 4, 16
    cu = torch.tensor([0, *sizes], device="cuda", dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q, k, v = (torch.randn(1, h, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    out, _ = attention.packed_sdpa(torch.nn.Module().eval(), q, k, v, None, cu_seq_lens_q=cu)
    assert calls, "the varlen path was not taken"
    grad = torch.randn_like(out)
    got = [out.float(), *torch.autograd.grad(out, (q, k, v), grad)]

    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    parts = [F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=kv_heads != heads)
             for a, b, c in zip(*(t.split(sizes, 2) for t in ref_in))]
    ref = torch.cat(parts, 2).transpose(1, 2)
    want = [ref, *torch.autograd.grad(ref, ref_in, grad.float())]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2, msg=name)


def test_fp32_rows_on_the_gpu_keep_the_exact_loop():
    """Without a half dtype the varlen kernel can't run: fp32 packed rows use the per-example loop."""
    from tunelab.models import attention

    q = torch.randn(1, 2, 6, 8, device="cuda")
    assert attention._flash_dtype(q) is None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert attention._flash_dtype(q) == torch.bfloat16


def test_bf16_training_on_the_gpu_tracks_fp32(tiny_dir, tmp_path):
    """A LoRA run on the GPU with bf16 autocast (varlen attention, fused head CE) follows the
    fp32 run's losses within 2% per step, like the CPU test does."""
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = base_cfg(tiny_dir, data_file, tmp_path / precision, steps=4, precision=precision, device="cuda")
        cfg["method"]["dropout"] = 0.0
        runs[precision] = tunelab.train(cfg)
    assert losses(runs["bf16"]) == pytest.approx(losses(runs["fp32"]), rel=2e-2)


def test_fused_head_cross_entropy_under_cuda_autocast():
    """The fused head + CE on the GPU under bf16 autocast equals CE of the autocast logits in fp32."""
    from tunelab.objectives._head_ce import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).cuda()
    h = torch.randn(50, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 300, (50,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = head_cross_entropy(h, head, y, 16)
        plain = F.cross_entropy(head(h).float(), y, reduction="sum")
    got, want = (torch.autograd.grad(x, (h, head.weight)) for x in (fused, plain))
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["full-fsdp", "lora"])
def test_one_gpu_under_torchrun_takes_the_nccl_path_and_trains_as_one_process(case, tmp_path):
    """torchrun with one process on one GPU joins an nccl process group and trains through FSDP2
    (full) or DDP (lora) at world size 1: the loss curve and final/ equal the plain one-process run
    on the same GPU (fp32, the distributed tests' tolerance)."""
    from test_distributed import CASES, ROOT, assert_same_run, config, env
    from tiny import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    method, objective = next((m, o) for c, m, o in CASES if c == case)
    run = {d: config(tmp_path, case, method, objective, tmp_path / d, 4, device="cuda") for d in ("many", "one")}
    (tmp_path / "cases.json").write_text(json.dumps([run["many"]]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(ROOT / "tests" / "dist_driver.py"), str(tmp_path / "cases.json")]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process group backend: nccl, world size 1" in done.stdout
    tunelab.train(run["one"])
    setup = json.loads((tmp_path / "many" / "metrics.jsonl").read_text().splitlines()[0])
    assert (setup["processes"], setup["parallel"]) == (1, "fsdp" if case == "full-fsdp" else "ddp")
    assert_same_run(tmp_path / "many", tmp_path / "one")

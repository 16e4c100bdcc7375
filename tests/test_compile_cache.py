"""`train.compile` under `ATEN_CPU_CAPABILITY`: torch 2.13's inductor graph cache keys a graph
without the vector ISA it was generated for, so a run limited to another ISA was served code built
for the machine's own (NaN losses, or a C++ build error). tunelab keeps one cache per capability."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.training.compile import keep_inductor_cache_per_isa

HERE = Path(__file__).parent

# One process: the tiny model's loss and gradients in eager mode and with compiled blocks.
PROBE = """
import sys, torch
sys.path.insert(0, {tests!r})
from tiny import tiny_model
from tunelab.training.compile import compile_blocks
torch.manual_seed(0)
model = tiny_model().float()
ids = torch.randint(0, 320, (2, 24))
def loss_and_grads():
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
eager = loss_and_grads()
compile_blocks(model)
compiled = loss_and_grads()
torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-4)
print("agree")
"""


def _default(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)   # re-read TMPDIR
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    return os.path.abspath(default_cache_dir())


def test_a_capability_gets_its_own_cache_beside_the_default(tmp_path, monkeypatch):
    default = _default(tmp_path, monkeypatch)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert keep_inductor_cache_per_isa() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    for capability in ("avx2", "default"):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        assert keep_inductor_cache_per_isa() == f"{default}-isa-{capability}" == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    # torch writes its default back into the environment once it has used it: still ours to move
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)
    assert keep_inductor_cache_per_isa() == f"{default}-isa-default"


def test_a_cache_directory_the_user_chose_is_kept(tmp_path, monkeypatch):
    _default(tmp_path, monkeypatch)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert keep_inductor_cache_per_isa() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.backends.cpu.get_cpu_capability() == "DEFAULT",
                    reason="needs a CPU whose own vector ISA differs from ATEN_CPU_CAPABILITY=default")
def test_compiled_blocks_agree_with_eager_after_a_run_under_another_capability(tmp_path):
    """Two processes share one temp dir (so torch's default cache): the machine's own ISA first, then
    ATEN_CPU_CAPABILITY=default (no vectorization). Both compiled runs match eager."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["TMPDIR"] = str(tmp_path)
    code = PROBE.format(tests=str(HERE))
    for capability in (None, "default"):
        run_env = env | ({"ATEN_CPU_CAPABILITY": capability} if capability else {})
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and "agree" in out.stdout, f"capability {capability}: {out.stderr[-3000:]}"
    assert [p.name.split("-isa-")[1] for p in tmp_path.glob("torchinductor_*-isa-*")] == ["default"]

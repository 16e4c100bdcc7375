"""Resolving train.precision per machine, and the warning for bf16 on a CPU that emulates it."""
import pytest
import torch

from tunelab.run import device as D

CPU = torch.device("cpu")


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has the given /proc/cpuinfo flags."""
    def set_flags(*names):
        monkeypatch.setattr(D, "cpu_flags", lambda: frozenset(names))
    monkeypatch.delenv(D.AUTO_PRECISION_ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the suite may run under an ISA limit
    return set_flags


@pytest.mark.parametrize("cpu, expected", [(("avx2",), "fp32"), (("avx2", "avx512f"), "fp32"),
                                           (("avx2", "avx512f", "avx512_bf16"), "bf16"), (("avx2", "amx_bf16"), "bf16")])
def test_auto_follows_native_bf16(flags, cpu, expected):
    flags(*cpu)
    assert D.resolve_precision("auto", CPU) == expected
    assert D.resolve_precision("fp32", CPU) == "fp32" and D.resolve_precision("bf16", CPU) == "bf16"


@pytest.mark.parametrize("level, expected", [("AVX2", "fp32"), ("avx512_core", "fp32"), ("AVX512_CORE_VNNI", "fp32"),
                                             ("AVX512_CORE_BF16", "bf16"), ("AVX512_CORE_AMX", "bf16"),
                                             ("AVX10_1_512", "bf16"), ("DEFAULT", "bf16"), ("", "bf16")])
def test_auto_follows_a_onednn_isa_limit(flags, monkeypatch, level, expected):
    """ONEDNN_MAX_CPU_ISA below bf16 (an older CPU emulated) leaves bf16 matmuls emulated: auto is
    fp32 there, and an explicit bf16 warns naming the limit."""
    flags("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", level)
    assert D.resolve_precision("auto", CPU) == expected
    msg = D.precision_warning("bf16", CPU)
    assert (msg is None) == (expected == "bf16")
    assert msg is None or f"ONEDNN_MAX_CPU_ISA={level.upper()}" in msg


def test_the_environment_switch_forces_auto_either_way(flags, monkeypatch):
    flags("avx2")
    monkeypatch.setenv(D.AUTO_PRECISION_ENV, "bf16")
    assert D.resolve_precision("auto", CPU) == "bf16"
    assert D.resolve_precision("fp32", CPU) == "fp32"  # an explicit choice is never overridden
    monkeypatch.setenv(D.AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="TUNELAB_AUTO_PRECISION"):
        D.resolve_precision("auto", CPU)


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(flags):
    flags("avx2", "fma")
    msg = D.precision_warning("bf16", CPU)
    assert msg and "AVX2" in msg and "precision: auto" in msg
    assert D.precision_warning("auto", CPU) is None and D.precision_warning("fp32", CPU) is None
    flags("avx2", "avx512f", "avx512_bf16")
    assert D.precision_warning("bf16", CPU) is None


def test_the_training_run_prints_the_warning(flags, tmp_path, capsys):
    from tiny import save_tiny_model_dir

    import tunelab
    flags("avx2")
    tunelab.train({"model": {"name": str(save_tiny_model_dir(tmp_path / "model"))},
                   "data": {"train": "builtin:arith?n=8&split=train", "eval": "builtin:arith?n=4&split=test"},
                   "method": {"name": "lora", "r": 2}, "eval": {"before": False, "num_examples": 0},
                   "train": {"steps": 1, "micro_batch_size": 2, "precision": "bf16", "save_every": 0, "progress": False},
                   "diagnostics": {"after_train": []}, "output": str(tmp_path / "run")})
    out = capsys.readouterr()
    assert "without native bf16" in out.out + out.err

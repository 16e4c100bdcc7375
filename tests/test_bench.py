"""bench/ bookkeeping (not timings): how rounds are pooled and shown."""
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from report import markdown  # noqa: E402
from run import pool  # noqa: E402


def _round(step_s, tokens, mem, startup, loss, warmup=1):
    rates = [t / s for s, t in list(zip(step_s, tokens))[warmup:]]
    return {"settings": {"warmup": warmup, "batch_size": 8, "mode": "lora"}, "step_s": step_s, "step_tokens": tokens,
            "tokens_per_s": statistics.median(rates), "tokens_per_step": statistics.mean(tokens[warmup:]),
            "peak_memory_mb": mem, "startup_s": startup, "final_loss": loss}


def test_rounds_pool_every_timed_step_and_keep_each_round():
    a = _round([9.0, 1.0, 2.0], [100, 100, 100], 2000, 10.0, 0.5)   # timed rates 100, 50
    b = _round([9.0, 4.0, 5.0], [100, 100, 100], 2100, 14.0, 0.5)   # timed rates 25, 20
    row = pool([a, b])
    assert row["tokens_per_s"] == statistics.median([100, 50, 25, 20])  # not the mean of round medians
    assert row["peak_memory_mb"] == 2100 and row["startup_s"] == 12.0
    assert [r["tokens_per_s"] for r in row["rounds"]] == [75.0, 22.5]
    assert pool([a]) is a and pool([a, {"error": "boom"}]) == {"error": "boom"}


def test_markdown_shows_each_round():
    rows = [pool([_round([9, 1, 1], [100] * 3, 1000, 5, 0.5), _round([9, 2, 2], [100] * 3, 1000, 5, 0.5)])
            | {"contender": c, "mode": "lora", "ceiling_fraction": 0.5} for c in ("hf", "trl", "tunelab")]
    res = {"machine": {"name": "m", "cpus": 2, "processor": "x", "torch": "t", "native_bf16": False},
           "plan": "full", "date": "d", "command": "c", "bench_seconds": 60, "contenders": rows,
           "ceiling": {"fp32_gflops": 1, "bf16_gflops": 1}, "startup": {"tunelab_help_s": 0.1, "builtin_model_load_s": 1}}
    md = markdown(res)
    assert "| lora | tunelab | ? | 75 | 100 / 50 | 1.00x |" in md and "ran 2 times per mode" in md


def test_random_weight_shapes_are_llama_shaped_and_load(tiny_dir, tmp_path):
    """bench/shapes.py: the ~1B shape is Llama-shaped with about 1B parameters; a built shape keeps
    the kit's tokenizer and vocabulary, and tunelab loads it as a local model directory."""
    from shapes import build, count_params, shape_config

    from tunelab.models import load_model, load_tokenizer
    from tunelab.models.config import ModelConfig

    big = shape_config("llama-1b", tiny_dir)
    assert big.model_type == "llama" and big.num_key_value_heads < big.num_attention_heads
    body = count_params(big) - 2 * big.vocab_size * big.hidden_size  # untied input and output embeddings
    assert 0.9e9 < body < 1.1e9  # 1.17B in all with the built-in's 49,152-token vocabulary
    assert big.vocab_size == shape_config("llama-tiny", tiny_dir).vocab_size
    out = build("llama-tiny", tmp_path / "m", tiny_dir)
    assert build("llama-tiny", out, tiny_dir) == out  # reused, not rebuilt
    model, _ = load_model(ModelConfig(name=str(out)))
    assert sum(p.numel() for p in model.parameters()) == count_params(shape_config("llama-tiny", tiny_dir))
    assert load_tokenizer(ModelConfig(name=str(out))).get_vocab() == load_tokenizer(ModelConfig(name=str(tiny_dir))).get_vocab()


def test_mfu_uses_the_devices_nominal_peak(tiny_dir):
    """On a GPU of known peak each row gets MFU = achieved FLOP/s / nominal bf16 peak, and the table
    says so; unknown devices and CPUs get none."""
    from run import add_flops, peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("Some GPU") is None and peak_tflops(None) is None
    row = _round([9, 1, 1], [1000] * 3, 1000, 5, 0.5) | {"contender": "tunelab", "mode": "lora"}
    res = {"machine": {"name": "NVIDIA-H100", "gpu": "NVIDIA H100 80GB HBM3", "cpus": 16, "processor": "x",
                       "torch": "t", "native_bf16": True},
           "plan": "gpu", "date": "d", "command": "c", "bench_seconds": 60, "contenders": [row],
           "ceiling": {"fp32_gflops": 1e5, "bf16_gflops": 5e5}, "startup": {"tunelab_help_s": 0.1, "builtin_model_load_s": 1}}
    add_flops(res, tiny_dir, res["ceiling"], bf16=True)
    assert row["mfu"] == row["achieved_gflops"] / 989e3 and row["ceiling_fraction"] == row["achieved_gflops"] / 5e5
    assert "MFU (achieved FLOP/s over the GPU's nominal dense bf16 peak, 989 TFLOP/s" in markdown(res)
    res["machine"]["gpu"], row2 = None, dict(row)
    res["contenders"] = [row2]
    row2.pop("mfu")
    add_flops(res, tiny_dir, res["ceiling"], bf16=False)
    assert "mfu" not in row2 and "MFU" not in markdown(res)


def test_gpu_plans_refuse_to_run_without_a_gpu(monkeypatch):
    import pytest
    import torch

    import run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        run.main("gpu-1b")


def test_gpu_results_get_their_own_section_of_the_docs(tmp_path):
    """write_docs replaces only its own section: a GPU run never overwrites the CPU table."""
    from report import write_docs

    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nintro\n<!-- bench:start -->\nold cpu\n<!-- bench:end -->\nnotes\n")
    write_docs("gpu table\n", doc, "bench-gpu")
    write_docs("new cpu\n", doc)
    write_docs("gpu table 2\n", doc, "bench-gpu")
    text = doc.read_text()
    assert text.startswith("# Performance\n\nintro\n<!-- bench:start -->\nnew cpu\n<!-- bench:end -->\nnotes\n")
    assert text.count("gpu table") == 1 and "<!-- bench-gpu:start -->\ngpu table 2\n<!-- bench-gpu:end -->" in text


def _fake_contender(name, mode, precision="bf16"):
    return _round([9.0, 1.0, 1.0], [100] * 3, 1000, 5.0, 0.5) | {"contender": name, "precision": precision}


def _bench_without_work(monkeypatch, child, tmp_path, tiny_dir) -> list:
    """bench/run.py with its contenders answered by `child` and nothing timed; the docs writes it makes."""
    import run

    docs = []
    monkeypatch.setattr(run, "child", child)
    monkeypatch.setattr(run, "ceiling", lambda model_dir, tokens: {"fp32_gflops": 100.0, "bf16_gflops": 400.0})
    monkeypatch.setattr(run, "startup", lambda model="": {"tunelab_help_s": 0.1, "builtin_model_load_s": 1.0})
    monkeypatch.setattr(run, "result_stem", lambda res: tmp_path / "result")
    monkeypatch.setattr("tunelab.models.pull", lambda name: tiny_dir)
    monkeypatch.setattr("report.write_docs", lambda *a: docs.append(a))
    return docs


def test_a_failing_contender_fails_the_bench_with_its_reason(monkeypatch, tmp_path, tiny_dir):
    """Any contender that fails makes `make bench` exit non-zero naming it and its last error line;
    the results file keeps the failure and the docs table is left as it was."""
    import json

    import pytest

    import run

    def child(args, **env):
        if args[0] != "bench/contenders.py":
            return {}
        name, mode = args[1], args[2]
        return {"error": "Traceback ...\nValueError: Your setup doesn't support bf16/gpu."} if name == "trl" \
            else _fake_contender(name, mode)

    docs = _bench_without_work(monkeypatch, child, tmp_path, tiny_dir)
    with pytest.raises(SystemExit) as e:
        run.main("quick")
    assert "trl lora: ValueError: Your setup doesn't support bf16/gpu." in str(e.value)
    assert "trl full:" in str(e.value) and "hf " not in str(e.value) and not docs
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["machine"]["cpu_model"] and isinstance(saved["machine"]["isa"], list)
    assert {r["contender"]: r.get("precision") for r in saved["contenders"]} == {"hf": "bf16", "trl": None, "tunelab": "bf16"}


def test_each_machine_class_has_its_own_docs_section():
    from run import section_for
    assert [section_for({"machine": {"machine_class": k}}) for k in ("fp32", "bf16", "amx", "gpu")] == \
        ["bench", "bench-bf16", "bench-amx", "bench-gpu"]


@pytest.mark.parametrize("switch, says", [("TUNELAB_AUTO_PRECISION", "precision auto forced to fp32"),
                                          ("MKL_ENABLE_INSTRUCTIONS", "ISA limited by MKL_ENABLE_INSTRUCTIONS=fp32")])
def test_a_run_with_forced_precision_replaces_no_docs_table(monkeypatch, tmp_path, tiny_dir, switch, says):
    """TUNELAB_AUTO_PRECISION=fp32 on a bf16 CPU runs every contender in fp32, and an ISA limit
    (MKL_ENABLE_INSTRUCTIONS=AVX2 ...) emulates an older CPU: neither is the machine class's default,
    so the run keeps its results file (which says so) and leaves the docs tables alone."""
    import json

    import run

    def child(args, **env):
        return _fake_contender(args[1], args[2], "fp32") if args[0] == "bench/contenders.py" else {}

    for other in ("TUNELAB_AUTO_PRECISION", *run.ISA_LIMITS):  # the suite may itself run under one
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(switch, "fp32")
    docs = _bench_without_work(monkeypatch, child, tmp_path, tiny_dir)
    run.main("quick")
    saved = json.loads((tmp_path / "result.json").read_text())
    assert not docs and (saved["machine"]["auto_precision_forced"] or saved["machine"]["isa_limits"][switch]) == "fp32"
    assert says in (tmp_path / "result.md").read_text()
    monkeypatch.delenv(switch)
    run.main("quick")
    assert len(docs) == 1  # the same run without the switch replaces its class's table

"""The smaller defects a new user met (issue 16, point 11), one test each."""
from __future__ import annotations

import json

import pytest

import tunelab
from tiny import chat_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(tiny_dir, tmp_path, name="run", **train) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    return {"model": {"name": str(tiny_dir)}, "data": {"train": str(data), "max_length": 64, "eval_fraction": 0},
            "method": {"name": "lora", "r": 2}, "diagnostics": {"after_train": []},
            "train": {"steps": 2, "micro_batch_size": 4, "progress": False, "precision": "fp32", **train},
            "output": str(tmp_path / name)}


# ---- a. warmup longer than the run

def test_warmup_not_below_steps_is_warned(tiny_dir, tmp_path, capsys):
    tunelab.train(cfg_for(tiny_dir, tmp_path, warmup_steps=10))
    err = capsys.readouterr().err
    assert "warning: train.warmup_steps=10 is not below train.steps=2" in err
    assert "peaks at 2/11 of train.lr" in err  # step i of the warm-up uses (i + 1) / 11
    tunelab.train(cfg_for(tiny_dir, tmp_path, "quiet", warmup_steps=1))
    assert "warmup_steps" not in capsys.readouterr().err


# ---- b. `tunelab diagnose RUN` on a run that ran no diagnostics after training runs the defaults

def test_diagnose_runs_the_defaults_when_none_ran_after_training(tiny_dir, tmp_path, capsys):
    from tunelab.cli import main

    cfg = cfg_for(tiny_dir, tmp_path)
    cfg["diagnostics"]["options"] = {"forgetting": {"num_prompts": 2, "drift_tokens": 4, "num_probes": 2,
                                                    "answer_tokens": 4}, "tuco": {"num_prompts": 2, "generic": False}}
    run = tunelab.train(cfg)
    assert not (run / "diagnostics").exists()
    capsys.readouterr()
    assert main(["diagnose", str(run)]) == 0
    assert "wrote 2 diagnostics" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "diagnostics").iterdir()) == ["forgetting.json", "tuco.json"]


# ---- f. `generate` computes in the exported model's precision unless asked, and says which

@pytest.mark.parametrize("flag, expected", [([], "fp32"), (["--precision", "run"], "bf16"),
                                            (["--precision", "bf16"], "bf16")])
def test_generate_says_its_precision_and_matches_the_exported_model_by_default(flag, expected, tiny_dir, tmp_path,
                                                                               capsys, monkeypatch):
    import tunelab.eval.task as task
    from tunelab.cli import main

    run = tunelab.train(cfg_for(tiny_dir, tmp_path, precision="bf16"))
    seen = []
    real = task.generate
    monkeypatch.setattr(task, "generate", lambda *a, **kw: seen.append(kw["precision"]) or real(*a, **kw))
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "What is 2 plus 1?", "--max-new-tokens", "3", *flag]) == 0
    assert seen == [expected] and f"greedy, {expected}" in capsys.readouterr().err


# ---- g. what a run writes for others to load follows the umask (safetensors writes 0600)

def test_final_output_and_exports_follow_the_umask(tiny_dir, tmp_path):
    import os
    import stat

    from tunelab.cli import main

    old = os.umask(0o022)
    try:
        run = tunelab.train(cfg_for(tiny_dir, tmp_path))
        assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
        assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    for folder in (run / "final", tmp_path / "adapter", tmp_path / "merged"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
        assert any(n.endswith(".safetensors") for n in modes)
        assert modes == dict.fromkeys(modes, 0o644), (folder, modes)


# ---- h. `data check --all` lists every bad row, not only the first

def test_data_check_all_lists_every_bad_row(tmp_path, capsys, monkeypatch):
    import tunelab.models
    from tiny import tiny_tokenizer
    from tunelab.cli import main

    monkeypatch.setattr(tunelab.models, "load_tokenizer", lambda cfg: tiny_tokenizer())
    rows = [json.dumps(r) for r in chat_rows(8)]
    rows[1] = '{"messages": ['  # bad JSON
    rows[3] = json.dumps({"messages": [{"role": "user", "content": "q"}]})  # no assistant turn
    for i in (5, 6):
        rows[i] = json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    assert main(["data", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err and "--all" in err
    assert main(["data", "check", str(path), "--all"]) == 0
    out = capsys.readouterr().out
    assert "rows: 4 loaded, 4 skipped" in out and "bad rows (4):" in out
    for line in (2, 4, 6, 7):
        assert f"  {path}:{line}: " in out


# ---- i. the forgetting line after training shows the retained accuracy

def test_the_forgetting_summary_line_shows_retained_accuracy():
    import tunelab.diagnostics.forgetting  # noqa: F401 -- registers it
    from tunelab.diagnostics._runner import _brief

    summary = {"kl_drift": 0.125, "kl_drift_max_prompt": 0.5, "base_probe_accuracy": 0.75, "num_probes_kept": 48,
               "retained_accuracy": 0.625, "conjugate_base_accuracy": 0.5, "conjugate_tuned_accuracy": 0.5,
               "num_probes_lost": 18, "recovered_by_conjugate": 0.25}
    line = _brief({"name": "forgetting", "summary": summary, "details": {}})
    assert "retained_accuracy 0.625" in line and "kl_drift 0.125" in line


# ---- j. a target_modules entry that matches nothing

def test_target_modules_entries_matching_nothing(capsys):
    import warnings

    from tiny import tiny_model
    from tunelab.errors import ConfigError
    from tunelab.methods.lora import LoRA, LoRAConfig

    with pytest.raises(ConfigError) as e:
        LoRA(LoRAConfig(target_modules=["qproj", "v_prj"])).apply(tiny_model())
    msg = str(e.value)
    assert "method.target_modules: 'qproj', 'v_prj' match no linear layer" in msg
    assert "the model's linear layers are named: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said on stderr, not as a Python warning that filters may hide
        model = LoRA(LoRAConfig(target_modules=["q_proj", "c_attn"])).apply(tiny_model())
    assert "warning: method.target_modules: 'c_attn' matches no linear layer of this model; 'q_proj' matches 2" \
        in capsys.readouterr().err
    assert sum(".lora_A" in n for n, _ in model.named_parameters()) == 2


# ---- k. the TuCo median in the summary is the median the report shows

def test_tuco_summary_median_is_the_shown_median():
    import statistics

    import torch

    from tunelab.diagnostics.tuco import summary_figures
    from tunelab.report.diagviews import quantiles

    # an even count, skewed so that mean, median and torch.median's lower middle all differ:
    # median (0.2 + 0.3) / 2 = 0.25, torch.median 0.2, mean 0.4
    values = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.9, 0.0])
    figures = summary_figures("eval", values)
    shown = quantiles(values.tolist())["median"]
    assert figures["tuco_eval_median"] == pytest.approx(0.25) == pytest.approx(statistics.median(values.tolist()))
    assert figures["tuco_eval_median"] == pytest.approx(shown)
    assert figures["tuco_eval_mean"] == pytest.approx(0.4)

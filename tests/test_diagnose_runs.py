"""Diagnostics as a user runs them: the `diagnostics` config section, `tunelab diagnose` and the
post-train diagnostics on tiny runs and on a short SmolLM2 run (the diagnostics' own properties:
test_diagnostics.py)."""
import json

import pytest


# ----------------------------------------------------------------------------- config

def test_diagnostics_config_fills_defaults_and_names_bad_keys():
    from tunelab.config import build
    from tunelab.errors import ConfigError

    cfg = build({"diagnostics": {"after_train": ["tuco"], "options": {"tuco": {"num_prompts": 3}}}})
    assert cfg.diagnostics.options["tuco"]["num_prompts"] == 3 and "batch_size" in cfg.diagnostics.options["tuco"]
    assert cfg.diagnostics.config_of("forgetting").num_prompts == 32
    with pytest.raises(ConfigError, match=r"diagnostics\.after_train\[0\]: unknown diagnostic 'nope'"):
        build({"diagnostics": {"after_train": ["nope"]}})
    with pytest.raises(ConfigError, match=r"diagnostics\.options\.tuco\.num_prompts"):
        build({"diagnostics": {"options": {"tuco": {"num_prompts": 0}}}})
    with pytest.raises(ConfigError, match=r"diagnostics\.options\.forgetting\.conjugate"):
        build({"diagnostics": {"options": {"forgetting": {"conjugate": "klingon"}}}})


def test_default_diagnostics_follow_the_data():
    from tunelab.config import build
    from tunelab.diagnostics._runner import default_names

    assert default_names(build({})) == ["forgetting", "tuco"]
    facts_run = build({"data": {"train": "builtin:facts?n_entities=5"}})
    assert default_names(facts_run) == ["forgetting", "knowledge", "tuco"]


# ----------------------------------------------------------------------------- end to end

SMALL = {"forgetting": {"num_prompts": 3, "drift_tokens": 4, "num_probes": 5, "answer_tokens": 4},
         "knowledge": {"num_probes": 2, "answer_tokens": 6}, "tuco": {"num_prompts": 3, "generic": False}}


def tiny_run(tiny_dir, tmp_path, method, after_train=()):
    import tunelab

    return tunelab.train({
        "model": {"name": str(tiny_dir)},
        "data": {"train": "builtin:facts?n_entities=3", "eval": "builtin:facts?n_entities=3&split=probe_rephrased",
                 "max_length": 64},
        "method": method, "train": {"steps": 2, "micro_batch_size": 4, "lr": 1e-2, "progress": False},
        "eval": {"num_examples": 2, "max_new_tokens": 4, "before": False},
        "diagnostics": {"after_train": list(after_train), "options": SMALL},
        "output": str(tmp_path / method["name"]),
    })


def check_shape(result: dict, name: str):
    assert set(result) == {"name", "version", "config", "summary", "details"}
    assert result["name"] == name and result["version"] == 1 and isinstance(result["config"], dict)
    assert all(v is None or isinstance(v, (int, float, str)) for v in result["summary"].values())
    assert isinstance(result["details"], dict)


def read(run, name):
    return json.loads((run / "diagnostics" / f"{name}.json").read_text())


def test_diagnose_writes_one_json_per_diagnostic(tiny_dir, tmp_path):
    from tunelab.cli import main

    run = tiny_run(tiny_dir, tmp_path, {"name": "lora", "r": 2})
    assert not (run / "diagnostics").exists()  # after_train: [] ran none
    names = ["forgetting", "knowledge", "tuco", "intruder"]
    assert main(["diagnose", str(run), "--only", *names]) == 0
    for name in names:
        check_shape(read(run, name), name)
    s = {n: read(run, n)["summary"] for n in names}
    f = s["forgetting"]
    # a random tiny model answers no probe: nothing kept, so retention is "not measured", never 0
    assert (f["retained_accuracy"] is None) == (f["num_probes_kept"] == 0) and f["kl_drift"] > 0
    assert f["retained_accuracy"] is None or 0 <= f["retained_accuracy"] <= 1
    assert 0 < s["tuco"]["tuco_eval_mean"] < 1 and len(read(run, "tuco")["details"]["eval"]["values"]) == 3
    assert s["intruder"]["matrices_changed"] == s["intruder"]["matrices_checked"] == 14  # 2 layers x 7 linears
    assert {"verbatim_accuracy", "rephrased_accuracy", "updated_new_accuracy"} <= set(s["knowledge"])


def test_diagnose_a_full_fine_tune(tiny_dir, tmp_path):
    from tunelab.diagnostics import run_diagnostics

    run = tiny_run(tiny_dir, tmp_path, {"name": "full"})
    results = run_diagnostics(run, only=["intruder", "tuco"])
    assert results["intruder"]["summary"]["matrices_changed"] == 14 and results["tuco"]["summary"]["tuco_eval_mean"] > 0
    assert results == {n: read(run, n) for n in ("intruder", "tuco")}


def test_train_runs_the_configured_diagnostics_once(tiny_dir, tmp_path):
    import tunelab

    run = tiny_run(tiny_dir, tmp_path, {"name": "lora", "r": 2}, after_train=["tuco"])
    path = run / "diagnostics" / "tuco.json"
    check_shape(json.loads(path.read_text()), "tuco")
    stamp = path.stat().st_mtime_ns
    tunelab.train(str(run))  # resuming a finished run: the result is current, nothing recomputed
    assert path.stat().st_mtime_ns == stamp


def test_diagnose_rejects_unknown_names(tmp_path, capsys):
    from tunelab import config as C
    from tunelab.cli import main

    (tmp_path / "run").mkdir()
    C.dump(C.build({}), tmp_path / "run" / "config.yaml")  # names are checked before any model loads
    assert main(["diagnose", str(tmp_path / "run"), "--only", "nope"]) == 2
    assert "unknown diagnostic 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_diagnose_a_short_smollm2_run(tmp_path):
    import tunelab
    from tunelab.diagnostics import run_diagnostics

    run = tunelab.train({
        "model": {"name": "smollm2-135m"},
        "data": {"train": "builtin:arith?n=32", "eval": "builtin:arith?n=8&split=test", "max_length": 160},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "train": {"steps": 2, "micro_batch_size": 4, "lr": 1e-3, "progress": False},
        "eval": {"num_examples": 2, "max_new_tokens": 8, "before": False},
        "diagnostics": {"after_train": [], "options": {
            "forgetting": {"num_prompts": 4, "drift_tokens": 8, "num_probes": 8, "answer_tokens": 12},
            "tuco": {"num_prompts": 4}}},
        "output": str(tmp_path / "run"),
    })
    results = run_diagnostics(run, only=["forgetting", "tuco", "intruder"])
    for name, result in results.items():
        check_shape(result, name)
    assert results["forgetting"]["summary"]["base_probe_accuracy"] >= 0.75  # the probes were built on this model
    assert results["intruder"]["summary"]["matrices_changed"] == 7 * 30

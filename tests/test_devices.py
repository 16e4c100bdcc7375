"""Every tensor tunelab creates lives on the model's device (or, for data batches, explicitly in
host memory until the loop moves them). Checked on CPU-only machines, where a misplaced tensor
would go unnoticed, by a trap (tests/devicetrap.py) that records every tensor tunelab's code
creates without an explicit device, with its file and line. Training with every method and every
objective, eval loss, generation, diagnostics, the report, compare and the CLI's generate run
under it, and so do the data stages that run a model (every one the registry marks `uses_model`),
a pipeline chaining training and data stages (weights folded for the next stage), `tunelab data
relabel` on a trained run and ReasoningV's budget router. (A first try made torch's default device `meta`: some operations then fail loudly, but
a matmul of a CPU and a meta tensor silently returns a CPU result of garbage, so it was dropped.)"""
from __future__ import annotations

import json

import pytest
import torch

import tunelab
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny import chat_rows, save_tiny_model_dir
    root = tmp_path_factory.mktemp("devices")
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(12)))
    return save_tiny_model_dir(root / "m"), root / "d.jsonl"


@pytest.fixture
def trap():
    """Records tensors tunelab's code creates without an explicit device (tests/devicetrap.py);
    the test fails listing each one's file and line."""
    from devicetrap import DeviceTrap

    mode = DeviceTrap()
    with mode:
        yield mode
    assert not mode.found, "tensors created without a device:\n  " + "\n  ".join(sorted(mode.found))


def cfg(setup, out, method="lora", objective="sft", diagnostics=()):
    model_dir, data = setup
    return {"model": {"name": str(model_dir)}, "data": {"train": str(data), "eval": str(data), "max_length": 64},
            "method": {"name": method}, "objective": {"name": objective},
            "train": {"steps": 2, "micro_batch_size": 2, "progress": False, "precision": "fp32", "device": "cpu",
                      "save_every": 1},
            "eval": {"num_examples": 2, "max_new_tokens": 4, "batch_size": 2},
            "diagnostics": {"after_train": list(diagnostics)}, "output": str(out)}


def needed_options(objective: str, setup) -> dict:
    """Options an objective cannot run without (LiST's student needs a teacher; its meta
    re-weighting, which runs from the first step with warmup_fraction 0, needs labeled rows)."""
    model_dir, data = setup
    table = {"list_student": {"teacher": str(model_dir), "labeled": str(data), "warmup_fraction": 0.0}}
    return table.get(objective, {})


def test_the_trap_can_fail(monkeypatch):
    """The check can fail: a tensor that tunelab's eval makes without a device is caught, with its
    line; torch's own tensors and explicitly placed ones are not."""
    import tunelab.eval.task as task
    from devicetrap import DeviceTrap

    with DeviceTrap() as mode:
        torch.zeros(3, device="cpu")
        torch.nn.Linear(2, 2)  # made here, in a test: not tunelab's
    assert not mode.found
    source = "import torch\ndef make():\n    return torch.arange(4)\n"
    namespace: dict = {}
    exec(compile(source, task.__file__, "exec"), namespace)  # code that claims to live in tunelab/
    with DeviceTrap() as mode:
        namespace["make"]()
    assert [f.rsplit(":", 1)[1] for f in mode.found] == ["3 (arange)"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_and_evaluates_on_the_models_device(trap, setup, tmp_path, method):
    run = tunelab.train(cfg(setup, tmp_path / "run", method=method))
    assert "after" in json.loads((run / "eval.json").read_text())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("objective", OBJECTIVES.names())
def test_every_objective_trains_on_the_models_device(trap, setup, tmp_path, objective):
    config = cfg(setup, tmp_path / "run", objective=objective)
    config["objective"].update(needed_options(objective, setup))
    run = tunelab.train(config)
    assert "after" in json.loads((run / "eval.json").read_text())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_diagnostics_report_compare_and_generate_on_the_models_device(trap, setup, tmp_path):
    from tunelab.cli import main
    from tunelab.diagnostics import DIAGNOSTICS

    names = [n for n in DIAGNOSTICS.names() if DIAGNOSTICS.get(n).cheap] + ["intruder"]
    a = tunelab.train(cfg(setup, tmp_path / "a", diagnostics=sorted(set(names))))
    b = tunelab.train(cfg(setup, tmp_path / "b", method="full"))
    assert {p.stem for p in (a / "diagnostics").glob("*.json")} >= set(names)
    comparison, html, _, _ = tunelab.compare([a, b], tmp_path / "cmp")
    assert html.exists() and len(comparison.runs) == 2
    assert main(["generate", str(a), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "4"]) in (0, None)


STAGE_OPTIONS = {
    "got_d": {"pool": "builtin:pool?n=12", "k": 4, "target": "builtin:arith?n=4&split=test", "max_length": 32},
    "s3ft": {"input": "builtin:arith?n=3", "max_new_tokens": 4},
    "pseudo_label": {"input": "builtin:arith?n=3&answers=false", "max_new_tokens": 4, "min_confidence": -1e9},
}
"""Options of a short run of every data stage that runs a model."""


def test_every_data_stage_that_runs_a_model_is_under_the_trap():
    from tunelab.registry import DATA_STAGES

    assert set(STAGE_OPTIONS) == {n for n in DATA_STAGES.names() if DATA_STAGES.get(n).uses_model}


@pytest.mark.parametrize("name", sorted(STAGE_OPTIONS))
def test_data_stages_run_their_model_on_its_device(trap, setup, tmp_path, name):
    """The data stages that run a model (embeddings and Sinkhorn for GOT-D, generation for S3FT,
    generation and teacher-forced confidence for pseudo-labels) create every tensor where it is."""
    from tunelab.curate import Workspace, build_stage, run_stage

    options = STAGE_OPTIONS[name]
    ws = Workspace(model_name=str(setup[0]), device="cpu", precision="fp32", work_dir=tmp_path / "work",
                   say=lambda m: None)
    summary = run_stage(build_stage(name, options), ws, tmp_path / "out.jsonl")
    assert summary["rows"] == options.get("k", 3)


def accept_all(record, candidate, gold) -> bool:
    """A judge that accepts every answer: S3FT keeps the model's own (its `self` path)."""
    return True


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pipeline_of_training_and_data_stages_on_the_models_device(trap, setup, tmp_path):
    """A pipeline as the recipes chain them (examples/recipes/self_training.yaml, list.yaml, s3ft.yaml,
    got_d.yaml): a LoRA stage folded into weights/, data stages running those weights (pseudo-labels,
    S3FT's self path, GOT-D), a training stage on their rows; then `tunelab data relabel --model RUN`
    on the trained run (its method merged) and ReasoningV's budget router generating with it."""
    from tunelab import pipeline
    from tunelab.cli import main
    from tunelab.eval.reasoning_budget import Budget, ReasoningBudgetRouter
    from tunelab.training.final import load_trained

    model_dir, data = setup
    train = {"steps": 2, "micro_batch_size": 2, "save_every": 0, "precision": "fp32", "device": "cpu", "progress": False}
    run = pipeline.run({
        "model": {"name": str(model_dir)}, "data": {"train": str(data), "eval": None, "max_length": 64},
        "train": train, "diagnostics": {"after_train": []}, "output": str(tmp_path / "run"),
        "stages": [
            {"name": "sup", "method": {"name": "lora", "r": 4, "alpha": 8}},
            {"name": "label", "dataset": "pseudo_label", "from": "sup", "with": STAGE_OPTIONS["pseudo_label"]},
            {"name": "self", "dataset": "s3ft", "from": "sup",
             "with": {**STAGE_OPTIONS["s3ft"], "judge": f"{__name__}:accept_all"}},
            {"name": "pick", "dataset": "got_d", "from": "sup", "with": STAGE_OPTIONS["got_d"]},
            {"name": "again", "from": "sup", "method": "full", "data": {"train": "@label", "max_length": 256}}]})
    kinds = json.loads((run / "stages/self/stage.json").read_text())["summary"]["kinds"]
    assert kinds == {"self": 3} and (run / "final").exists()
    out = tmp_path / "lab.jsonl"
    assert main(["data", "relabel", "builtin:arith?n=2&answers=false", "--method", "pseudo_label", "--model",
                 str(run / "stages/sup"), "--precision", "fp32", "--set", "max_new_tokens=3", "--out", str(out)]) == 0
    _, model, tok, method = load_trained(run / "stages/again")
    router = ReasoningBudgetRouter(lambda p: "easy" if "2" in p else "hard", {"easy": Budget(2, "Be brief."),
                                                                             "hard": Budget(3)})
    assert [o["label"] for o in router.generate(model, tok, ["What is 2?", "What is 5?"])] == ["easy", "hard"]

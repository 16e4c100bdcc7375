"""Pipelines (`stages:` in one YAML): stage directories, skipping completed stages, stage n+1
starting from stage n's weights (checksums), SIGKILL between and inside stages resuming to the
uninterrupted result bitwise, and clear errors for a bad pipeline. Real processes on a tiny model
(tests/forkserver.py), nothing mocked."""
from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from forkserver import ForkServer
from tiny import chat_rows, save_tiny_model_dir
from tunelab.errors import ConfigError

PIPE = """model: {name: ./tiny}
data: {train: train.jsonl, eval: null, max_length: 64}
method: {name: lora, r: 4, alpha: 8}
train: {steps: 3, micro_batch_size: 2, lr: 5.0e-3, save_every: 1, precision: fp32, device: cpu, progress: false}
eval: {before: false}
diagnostics: {after_train: []}
output: ./OUT
stages:
  - name: label
    dataset: pseudo_label
    with: {input: train.jsonl, max_new_tokens: 4, batch_size: 4, chunk: 8}
  - name: first
    data: {train: "@label"}
  - name: second
    train: {steps: 3, lr: 2.0e-3}
"""
POINTS = ["curate:pseudo_label:chunk-1", "stage-start:first", "step:2", "manifest:weights", "stage-done:first",
          "stage-start:second", "step:1", "fill:final", "stage-done:second"]
"""Kill points in timeline order: inside the data stage, between it and the first training stage,
inside a step of that stage, while its weights are written, after everything is written but before
the stage is marked done, between the two training stages, inside the second one."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    save_tiny_model_dir(root / "tiny")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    fs = ForkServer(root)

    def pipe(name: str, text: str = PIPE) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(text.replace("OUT", name))
        return path
    done = fs.run(["train", str(pipe("reference"))])
    assert done.rc == 0, done.stderr()
    yield SimpleNamespace(root=root, fs=fs, pipe=pipe, ref=root / "reference")
    fs.close()


def outcome(run: Path) -> dict:
    """What a resumed pipeline must reproduce: the data stage's rows and each stage's trained weights."""
    return {"rows": (run / "stages/label/data.jsonl").read_text(),
            **{s: load_file(str(run / f"stages/{s}/final/adapter_model.safetensors")) for s in ("first", "second")}}


def same(a: dict, b: dict) -> bool:
    return a["rows"] == b["rows"] and all(
        a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s]) for s in ("first", "second"))


def state_sha(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def test_stages_run_in_their_own_directories_and_the_last_is_the_output(lab):
    from tunelab.data.check import check_data
    from tunelab.data.config import DataConfig
    from tiny import tiny_tokenizer

    run = lab.ref
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["first", "label", "second"]
    for s in ("label", "first", "second"):
        assert json.loads((run / "stages" / s / "stage.json").read_text())["name"] == s
    assert (run / "final").resolve() == (run / "stages/second/final").resolve()
    assert (run / "config.yaml").resolve() == (run / "stages/second/config.yaml").resolve()
    rows = [json.loads(x) for x in (run / "stages/label/data.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["provenance"]["stage"] == "pseudo_label" for r in rows)
    report = check_data(str(run / "stages/label/data.jsonl"), tiny_tokenizer(), DataConfig(max_length=64))
    assert "rows: 24 loaded" in report and "provenance (24 of 24 rows): pseudo_label: pseudo 24" in report


def test_stage_n_plus_1_starts_from_stage_n_weights(lab):
    """The second stage's base model is the first stage's trained model folded into plain weights:
    the same state-dict checksum as the first run's model with its LoRA merged, and not the base's."""
    from tunelab import config as C
    from tunelab.models import load_model
    from tunelab.training.final import load_trained

    run = lab.ref
    cfg2 = C.load(run / "stages/second/config.yaml")
    assert Path(cfg2.model.name) == run / "stages/first/weights"
    _, trained, _, method = load_trained(run / "stages/first")
    started_from, _ = load_model(cfg2.model)
    base, _ = load_model(C.load(run / "stages/first/config.yaml").model)
    assert state_sha(method.merge(trained)) == state_sha(started_from) != state_sha(base)
    done = json.loads((run / "stages/second/stage.json").read_text())
    manifest = (run / "stages/first/final/manifest.json").read_bytes()
    assert done["inputs"] == {"first": hashlib.sha256(manifest).hexdigest()}


def test_completed_stages_are_skipped(lab):
    before = {p: p.stat().st_mtime_ns for p in lab.ref.rglob("*") if p.is_file() and p.name != ".lock"}
    again = lab.fs.run(["train", str(lab.ref)])
    assert again.rc == 0, again.stderr()
    assert [ln for ln in again.stdout().splitlines() if ln.startswith("stage ")] == \
        [f"stage {s}: complete, skipped" for s in ("label", "first", "second")]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # nothing rewritten


def test_kill9_between_and_inside_stages_resumes_to_the_same_result(lab):
    """SIGKILL inside the data stage's generation, inside a training step of each training stage,
    between stages, and while the weights are written; every resume ends bitwise like the reference."""
    run = lab.root / "killed"
    cfg = lab.pipe("killed")
    landed = 0
    for point in POINTS:
        argv = ["train", str(run)] if (run / "pipeline.yaml").exists() else ["train", str(cfg)]
        child = lab.fs.spawn(argv, env={"TUNELAB_TEST_PAUSE_AT": point})
        if child.wait_paused(point):
            child.signal(signal.SIGKILL)
            assert child.wait() == -signal.SIGKILL
            landed += 1
        else:
            assert child.rc == 0, child.stderr()
    done = lab.fs.run(["train", str(run)])
    assert done.rc == 0, done.stderr()
    assert landed == len(POINTS)
    assert same(outcome(run), outcome(lab.ref))


def test_a_killed_data_stage_keeps_its_finished_chunks(lab):
    run = lab.root / "chunks"
    child = lab.fs.spawn(["train", str(lab.pipe("chunks"))], env={"TUNELAB_TEST_PAUSE_AT": "curate:pseudo_label:chunk-1"})
    assert child.wait_paused("curate:pseudo_label:chunk-1")
    child.signal(signal.SIGKILL)
    child.wait()
    resumed = lab.fs.spawn(["train", str(run)], env={"TUNELAB_TEST_PAUSE_AT": "curate:pseudo_label:chunk-2"})
    assert resumed.wait_paused("curate:pseudo_label:chunk-2")
    resumed.signal(signal.SIGKILL)
    resumed.wait()
    assert "pseudo_label: 8 of 24" not in resumed.stderr() and "pseudo_label: 16 of 24" not in resumed.stderr()


# ----------------------------------------------------------------------------- bad pipelines

def _load(tmp_path: Path, text: str):
    from tunelab import pipeline
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return pipeline.load(path)


BASE = "model: {name: smollm2-135m}\noutput: ./out\nstages:\n"


@pytest.mark.parametrize("stages, message", [
    ("  - name: a\n    data: {train: '@nothing'}\n", "p.yaml:5: stages[0].data.train: '@nothing' names no earlier stage"),
    ("  - name: a\n  - name: a\n", "p.yaml:5: stages[1].name: 'a' is used by an earlier stage"),
    ("  - name: a\n    from: b\n", "p.yaml:5: stages[0].from: 'b' is not an earlier training stage"),
    ("  - name: a\n    train: {steps: 0}\n", "p.yaml:5: stages[0].train.steps: must be >= 1"),
    ("  - name: a\n    dataset: nope\n", "p.yaml:5: stages[0].dataset: unknown data stage 'nope'"),
    ("  - name: a\n    dataset: random\n    with: {k: 0}\n", "p.yaml:6: stages[0].with.k: must be >= 1"),
    ("  - name: a\n    dataset: random\n    method: lora\n", "stages[0].method: a data stage (dataset:) takes only"),
    ("  - name: a\n    model: {name: x}\n", "stages[0].model.name: a stage's model comes from `from:`"),
    ("  - name: a\n    colour: red\n", "p.yaml:5: stages[0].colour: unknown key"),
    ("  - name: ../up\n", "stages[0].name: required: letters, digits"),
    ("  []\n", "stages: expected a non-empty list"),
])
def test_a_bad_pipeline_names_file_line_and_stage(tmp_path, stages, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, BASE + stages)
    assert message in str(e.value)


def test_refs_and_starts_resolve_to_earlier_stages(tmp_path):
    p = _load(tmp_path, BASE + "  - name: pick\n    dataset: random\n    with: {pool: 'builtin:pool?n=20', k: 5}\n"
              "  - name: a\n    data: {train: '@pick'}\n  - name: b\n    from: base\n  - name: c\n    from: a\n"
              "    method: full\n")
    pick, a, b, c = p.stages
    assert pick.kind == "data" and pick.start is None and pick.spec["k"] == 5
    assert a.spec["data"]["train"] == str(tmp_path / "out/stages/pick/data.jsonl") and a.uses == ["pick"]
    assert b.spec["model"]["name"] == "smollm2-135m" and b.uses == []
    assert c.spec["model"]["name"] == str(tmp_path / "out/stages/a/weights") and c.spec["method"] == {"name": "full"}
    assert a.needs_weights and not b.needs_weights and not c.needs_weights


def test_overrides_reach_the_top_level_and_named_stages(tmp_path):
    from tunelab import pipeline
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "  - name: a\n  - name: b\n")
    p = pipeline.load(path, ["train.lr=0.01", "stages.b.train.steps=7"])
    assert p.stage("a").spec["train"]["lr"] == p.stage("b").spec["train"]["lr"] == 0.01
    assert p.stage("b").spec["train"]["steps"] == 7 and p.stage("a").spec["train"]["steps"] == 100
    with pytest.raises(ConfigError, match="stages.NAME.key=value"):
        pipeline.load(path, ["stages.zzz.train.steps=7"])


RECIPES = sorted((Path(__file__).parent.parent / "examples" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_is_a_valid_pipeline(path):
    """Each recipe resolves and validates (every stage's run config and data-stage options)."""
    from tunelab import pipeline
    p = pipeline.load(path)
    assert p.run_dir == path.parent.parent / "runs" / path.stem
    assert p.stages[-1].kind == "train"

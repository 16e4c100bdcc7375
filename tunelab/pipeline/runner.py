"""Running a pipeline: each stage in RUN/stages/<name>/, in order, skipped when already complete.

    RUN/pipeline.yaml                the pipeline as resolved (absolute paths): what a resume reads
    RUN/stages/<name>/               a training stage: a run directory (config.yaml, checkpoints/,
                                     final/, eval.json, report.html, ...) and, when a later stage
                                     starts from it, weights/ (its model folded into plain weights)
                                     a data stage: data.jsonl, progress.jsonl (resumable generation)
    RUN/stages/<name>/stage.json     written last: the stage is complete (its spec, the checksums of
                                     what it read and of what it wrote)
    RUN/final, eval.json, ...        the last stage's outputs (relative symlinks)

A training stage is a run of the one training loop (tunelab.training.loop.train), resumed from its
newest checkpoint when killed inside, followed by its diagnostics and report, exactly as
`tunelab train` does for a single run. A data stage is a `tunelab.curate` stage.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from tunelab import config as C
from tunelab.errors import ConfigError, TunelabError
from tunelab.pipeline.spec import Pipeline, Stage
from tunelab.run.files import atomic_dir, atomic_write_text, recover, verify
from tunelab.run.rundir import RunLock, redact
from tunelab.run.signals import pause_point

STAGE_FILE = "stage.json"
PUBLISHED = ("final", "eval.json", "metrics.jsonl", "diagnostics", "report.html", "config.yaml", "data.jsonl")


def run_pipeline(pipe: Pipeline, say=print) -> Path:
    """Run every stage not yet complete; returns the run directory."""
    from tunelab.run.dist import launched_by_torchrun

    if launched_by_torchrun():
        raise TunelabError("a pipeline (stages:) runs on one process; run it without torchrun/--nproc")
    run_dir = pipe.run_dir
    with RunLock(run_dir):
        _write_spec(pipe)
        for stage in pipe.stages:
            if is_complete(pipe, stage):
                say(f"stage {stage.name}: complete, skipped")
                continue
            pause_point(f"stage-start:{stage.name}")
            say(f"stage {stage.index + 1}/{len(pipe.stages)}: {stage.name} ({_what(stage)})")
            stage.directory.mkdir(parents=True, exist_ok=True)
            summary = run_training(stage) if stage.kind == "train" else run_data(pipe, stage)
            if stage.needs_weights:
                write_weights(stage)
            _finish(pipe, stage, summary)
        publish(run_dir, pipe.stages[-1])
    return run_dir


def _what(stage: Stage) -> str:
    if stage.kind == "data":
        return f"data stage {stage.spec['name']}"
    start = f"from {stage.start}" if stage.start else "from the base model"
    return f"training, {stage.spec['method']['name']} + {stage.spec['objective']['name']}, {start}"


def _write_spec(pipe: Pipeline) -> None:
    """RUN/pipeline.yaml; a run directory holding another pipeline is refused."""
    path = pipe.run_dir / "pipeline.yaml"
    text = redact(yaml.safe_dump(pipe.raw, sort_keys=False))
    if not path.exists():
        atomic_write_text(path, text)
    elif yaml.safe_load(path.read_text()) != yaml.safe_load(text):
        raise ConfigError(f"output: {pipe.run_dir} already holds a different pipeline; resume it with "
                          f"`tunelab train {pipe.run_dir}` or choose another output=...")


# ----------------------------------------------------------------------------- completion

def fingerprint(path: Path) -> str | None:
    """SHA-256 of a stage's output: a data file's bytes; a directory's manifest (which checksums
    every file in it); None when it is missing or does not verify."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir() and verify(path) is None:
        return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    return None


def output_of(stage: Stage) -> Path:
    """What the stage produces: rows (data) or final/ (training)."""
    return stage.directory / ("data.jsonl" if stage.kind == "data" else "final")


def _inputs(pipe: Pipeline, stage: Stage) -> dict[str, str | None]:
    return {name: fingerprint(output_of(pipe.stage(name))) for name in stage.uses}


def is_complete(pipe: Pipeline, stage: Stage) -> bool:
    """stage.json says this spec finished on these inputs, and its outputs are intact. A stage that
    finished on other inputs (an earlier stage redone differently) is an error, not redone silently."""
    try:
        done = json.loads((stage.directory / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if done.get("inputs") != _inputs(pipe, stage):
        raise TunelabError(f"stage {stage.name}: {stage.directory} was made from other outputs of "
                           f"{', '.join(stage.uses)} than those there now; delete {stage.directory} to redo it")
    intact = fingerprint(output_of(stage)) == done.get("output")
    return intact and done.get("spec") == stage.spec and (not stage.needs_weights or fingerprint(stage.output) is not None)


def _finish(pipe: Pipeline, stage: Stage, summary: dict) -> None:
    record = {"name": stage.name, "kind": stage.kind, "spec": stage.spec, "inputs": _inputs(pipe, stage),
              "output": fingerprint(output_of(stage)), "summary": summary}
    pause_point(f"stage-done:{stage.name}")
    atomic_write_text(stage.directory / STAGE_FILE, redact(json.dumps(record, indent=1)))


# ----------------------------------------------------------------------------- the two kinds

def run_training(stage: Stage) -> dict:
    """One run of the training loop in the stage's directory (resumed if it was interrupted), then
    its diagnostics and report: what `tunelab train` does for a single run."""
    from tunelab.diagnostics._runner import run_after_train
    from tunelab.report import write_report
    from tunelab.run.rundir import resolve
    from tunelab.training.loop import train

    cfg, run_dir = resolve(stage.spec)
    train(cfg, run_dir)
    run_after_train(run_dir)
    write_report(run_dir)
    results = run_dir / "eval.json"
    after = json.loads(results.read_text()).get("after", {}) if results.exists() else {}
    return {k: v for k, v in after.items() if k != "samples"}


def run_data(pipe: Pipeline, stage: Stage) -> dict:
    """The data stage, its model being the weights it starts from (or the base model)."""
    from tunelab.curate import Workspace, run_stage
    from tunelab.registry import DATA_STAGES

    spec = dict(stage.spec)
    cls = DATA_STAGES.get(spec.pop("name"))
    model = str(pipe.stage(stage.start).output) if stage.start else pipe.base_model.get("name", "smollm2-135m")
    train = pipe.raw.get("train") or {}
    ws = Workspace(model_name=model, work_dir=stage.directory, precision=train.get("precision", "auto"),
                   device=train.get("device", "auto"))
    return run_stage(cls(C.from_dict(cls.Config, spec, "with")), ws, stage.directory / "data.jsonl")


def write_weights(stage: Stage) -> None:
    """RUN/stages/<name>/weights/: the trained model with the method's change folded in (a plain HF
    model directory that the next stage loads as its base). A method that cannot fold is an error."""
    from tunelab.training.final import load_trained

    if fingerprint(stage.output) is not None:
        return
    recover(stage.directory)
    _, model, tok, method = load_trained(stage.directory)
    if not method.supports_merge:
        raise TunelabError(f"stage {stage.name}: method '{method.name}' cannot be folded into plain weights, so a "
                           "later stage cannot start from it; start that stage `from: base`, or train this one "
                           "with a method that merges (lora, full, ...)")
    merged = method.merge(model)

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    atomic_dir(stage.output, fill)


def publish(run_dir: Path, last: Stage) -> None:
    """The last stage's outputs at the top of the run directory, as relative symlinks."""
    for name in PUBLISHED:
        target = last.directory / name
        link = run_dir / name
        if link.exists() and not link.is_symlink():
            continue  # written there since (e.g. `tunelab diagnose RUN`): the user's, left alone
        if not target.exists():
            if link.is_symlink():
                link.unlink()
            continue
        tmp = run_dir / f".tmp-link-{name}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, run_dir), tmp)
        os.replace(tmp, link)

"""A run's output and its way back: `save_final` writes RUN/final/ (what the method trained, in a
form the HF ecosystem loads), `load_trained` rebuilds the trained model from it (or from the newest
valid checkpoint), `is_complete` says whether a run has nothing left to do."""
from __future__ import annotations

import json
from pathlib import Path

from tunelab import config as C
from tunelab.errors import TunelabError
from tunelab.run.files import atomic_dir, follow_umask
from tunelab.run.rundir import fits, is_run_dir, redact
from tunelab.run.signals import pause_point


def save_final(run_dir: Path, model, tok, method, objective, cfg: C.RunConfig) -> None:
    from tunelab.models import resolve_model_path

    base = resolve_model_path(cfg.model.name)  # what the HF ecosystem loads: a directory or a hub id

    def fill(tmp: Path) -> None:
        method.save(model, tok, tmp, base)
        objective.save(tmp)
        tok.save_pretrained(tmp)
        pause_point("fill:final")
        (tmp / "tunelab.json").write_text(redact(json.dumps({"method": cfg.method.name, "base_model": cfg.model.name,
                                                             "steps": cfg.train.steps})))
        follow_umask(tmp)
    atomic_dir(run_dir / "final", fill)


def is_complete(run_dir: Path, steps: int, start: int, need_eval: bool) -> bool:
    """Trained to `steps`, final/ written for them and (with eval data) the final evaluation done;
    a crash between any two of these is finished on the next start."""
    meta, results = run_dir / "final" / "tunelab.json", run_dir / "eval.json"
    return start == steps and meta.exists() and json.loads(meta.read_text()).get("steps") == steps \
        and (not need_eval or (results.exists() and "after" in json.loads(results.read_text())))


def load_trained(run_dir: str | Path, device: str = "cpu"):
    """Rebuild a run's trained model: base model + method + what it saved (final/, else the
    newest valid checkpoint). Returns (cfg, model, tokenizer, method)."""
    from tunelab.methods import METHODS
    from tunelab.models import load_model
    from tunelab.training.checkpoint import load_latest

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise TunelabError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = C.load(run_dir / "config.yaml")
    model, tok = load_model(cfg.model)
    method = METHODS.get(cfg.method.name)(cfg.method.options)
    model = method.apply(model)
    if (run_dir / "final").is_dir():
        with fits(run_dir / "final", cfg):
            method.load(model, run_dir / "final")
    elif (found := load_latest(run_dir / "checkpoints")) is not None:
        with fits(found[0], cfg):
            method.load_trainable_state(model, trained_tensors(found[1], method, model))
    else:
        raise TunelabError(f"{run_dir}: has neither final/ nor a valid checkpoint; train it first")
    return cfg, model.to(device).eval(), tok, method


def trained_tensors(saved, method, model) -> dict:
    """The method's trained tensors in a checkpoint of either layout (one process's files, or the
    sharded files of several), by name."""
    from tunelab.training.checkpoint import load_tensors
    from tunelab.training.state import method_tensors

    if not saved.sharded:
        return method_tensors(saved.tensors["trainable"])
    template = {k: v.clone() for k, v in method.trainable_state(model).items()}
    load_tensors(saved.directory, template)
    return template

"""`tunelab edit`: edit a model with requests, score it, and write a run directory that the rest of
tunelab reads (`tunelab diagnose OUT --only forgetting`, `tunelab generate OUT`, `tunelab export OUT`).

    OUT/config.yaml   the run config (method locft or full, data.train = the requests)
    OUT/edit.yaml     the edit options
    OUT/final/        what trained (the one module, or the full model)
    OUT/edit.json     reliability / generalization / locality before and after, the layer sweep,
                      steps taken, mini-batches skipped, the schedule's log and timings
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import yaml

from tunelab.editing.config import EditConfig
from tunelab.editing.requests import EditRequest, load_requests
from tunelab.editing.score import locality_prompts, replies, score
from tunelab.editing.trainer import EditLoss, encode_request, train_edits
from tunelab.errors import ConfigError
from tunelab.options import from_dict, to_dict


def load_config(path: str | None, overrides: list[str] = (), **given) -> EditConfig:
    """An EditConfig from a recipe YAML (or the defaults), `key=value` overrides, then the command
    line's explicit options (`given`, None: not given)."""
    from tunelab.config import parse_override

    raw = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: an edit recipe is a mapping of EditConfig fields")
        if raw.get("output"):
            raw["output"] = str((Path(path).resolve().parent / raw["output"]).resolve())
    for item in overrides:
        keys, value = parse_override(item)
        raw[".".join(keys)] = value
    raw |= {k: v for k, v in given.items() if v is not None}
    cfg = from_dict(EditConfig, raw, path or "edit")
    if cfg.sweep and not method_options(cfg, 0):
        from tunelab.errors import ConfigError
        raise ConfigError(f"{path or 'edit'}: sweep: a layer sweep needs a method that edits one layer (locft); "
                          f"{cfg.method} trains every weight")
    return cfg


def method_options(cfg: EditConfig, layer: int | None) -> dict:
    """The method's options: where to edit (`layer`, `module`) for a method that edits one place
    (its Config has those fields), nothing for one that trains everything."""
    from dataclasses import fields

    from tunelab.methods import METHODS

    names = {f.name for f in fields(METHODS.get(cfg.method).Config)}
    return {"layer": layer, "module": cfg.module} if {"layer", "module"} <= names else {}


def _method(cfg: EditConfig, layer: int | None):
    from tunelab.methods import METHODS

    cls = METHODS.get(cfg.method)
    return cls(from_dict(cls.Config, method_options(cfg, layer), "method"))


def scored(requests: list[EditRequest], cfg: EditConfig) -> list[EditRequest]:
    """The requests that are scored: all, or a seeded sample of `cfg.num_scored` in their order."""
    if not cfg.num_scored or cfg.num_scored >= len(requests):
        return requests
    keep = sorted(random.Random(f"scored:{cfg.seed}").sample(range(len(requests)), cfg.num_scored))
    return [requests[i] for i in keep]


def edit_once(model, tok, requests: list[EditRequest], cfg: EditConfig, method, device) -> dict:
    """Apply `method` to `model`, score, train the edits, score again; the figures as a dict."""
    model = method.apply(model).to(device).eval()
    examples = [encode_request(r, tok, cfg) for r in requests]
    judged = scored(requests, cfg)
    before_replies = replies(model, tok, locality_prompts(judged), cfg)
    before, _ = score(model, tok, judged, cfg, before_replies)
    t0 = time.perf_counter()
    log, stepper = train_edits(model, examples, cfg, device, tok.pad_token_id)
    seconds = time.perf_counter() - t0
    after, samples = score(model, tok, judged, cfg, before_replies)
    return {"module": getattr(method, "module_name", "all"), "num_edits": len(requests), "before": before,
            "after": after,
            "train": {"steps": stepper.steps, "skipped_batches": stepper.skipped, "seconds": round(seconds, 1),
                      "log": log},
            "samples": samples}


def sweep(model, tok, requests: list[EditRequest], cfg: EditConfig, device, say=print) -> tuple[int, list]:
    """Edit the first `cfg.sweep_requests` requests at each layer of `cfg.sweep` from the same weights
    (the module is put back after each); the layer with the best mean of the three metrics."""
    rows, subset = [], requests[:cfg.sweep_requests]
    for layer in cfg.sweep:
        method = _method(cfg, layer)
        found = edit_once(model, tok, subset, cfg, method, device)
        method.load_trainable_state(model, method._original)
        a = found["after"]
        mean = sum(v for v in (a["reliability"], a["generalization"], a["locality"]) if v is not None) / 3
        rows.append([layer, a["reliability"], a["generalization"], a["locality"], round(mean, 4)])
        say(f"edit sweep: layer {layer}: reliability {a['reliability']}, generalization {a['generalization']}, "
            f"locality {a['locality']}")
    return max(rows, key=lambda r: r[-1])[0], rows


def edit(requests_spec: str, cfg: EditConfig, say=print) -> Path:
    """Edit `cfg.model` with the requests of `requests_spec` (a file or builtin:facts?...); returns OUT."""
    from tunelab.models import load_model
    from tunelab.models.config import ModelConfig
    from tunelab.run.device import pick_device
    from tunelab.run.rundir import RunLock

    requests = load_requests(requests_spec)
    out = Path(cfg.output)
    with RunLock(out):
        model, tok = load_model(ModelConfig(name=cfg.model))
        device = pick_device("auto")
        layer, swept = (sweep(model, tok, requests, cfg, device, say) if cfg.sweep else (cfg.layer, []))
        method = _method(cfg, layer)
        found = edit_once(model, tok, requests, cfg, method, device)
        _write(out, requests_spec, cfg, model, tok, method, found | {"sweep": swept, "layer": layer})
    a = found["after"]
    say(f"edited {len(requests)} requests ({found['module']}, {cfg.schedule}): reliability {a['reliability']}, "
        f"generalization {a['generalization']}, locality {a['locality']}; {found['train']['steps']} steps")
    return out


def _write(out: Path, spec: str, cfg: EditConfig, model, tok, method, found: dict) -> None:
    from tunelab import config as C
    from tunelab.run.files import atomic_write_text
    from tunelab.run.rundir import write_config
    from tunelab.training.final import save_final

    method_raw = {"name": cfg.method} | method_options(cfg, found["layer"])
    data = spec if spec.startswith("builtin:") else str(Path(spec).resolve())
    run_cfg = C.build({"model": {"name": cfg.model}, "method": method_raw, "data": {"train": data, "eval": None},
                       "train": {"steps": max(found["train"]["steps"], 1), "precision": cfg.precision},
                       "diagnostics": {"after_train": []}, "output": str(out.resolve())})
    write_config(run_cfg, out)
    atomic_write_text(out / "edit.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    save_final(out, model, tok, method, EditLoss(), run_cfg)
    result = {"requests": spec, "config": to_dict(cfg), **found}
    atomic_write_text(out / "edit.json", json.dumps(result, indent=1))

"""The run directory: what a run writes and how a later command finds it again.

    RUN/config.yaml        the resolved config (every default filled in)
    RUN/metrics.jsonl      one line per logged step (and per evaluation)
    RUN/checkpoints/step-N the last `keep_checkpoints` resumable checkpoints (atomic, verified)
    RUN/final/             what the method trained, in a form the HF ecosystem loads
    RUN/eval.json          task metrics before and after training
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from tunelab import config as C
from tunelab.errors import ConfigError, TunelabError


class RunLock:
    """An exclusive lock on RUN/.lock: a second process on the same run directory is refused."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TunelabError(f"{self.path.parent}: another tunelab process is using this run directory "
                               f"(lock {self.path}); wait for it or choose another output") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def resolve(target, overrides: list[str] = ()) -> tuple[C.RunConfig, Path]:
    """A config (path, dict or RunConfig) for a new run, or an existing run directory to resume."""
    if isinstance(target, C.RunConfig):
        cfg = target if not overrides else C.load(None, overrides, base=C.to_dict(target))
    elif isinstance(target, dict):
        cfg = C.load(None, overrides, base=target)
    elif is_run_dir(target):
        cfg = C.load(Path(target) / "config.yaml", [*overrides, f"output={target}"])
        return cfg, Path(target)
    elif Path(target).is_file():
        cfg = C.load(target, overrides)
    else:
        raise ConfigError(f"{target}: neither a config file nor a run directory")
    run_dir = Path(cfg.output)
    if is_run_dir(run_dir):
        same = C.to_dict(C.load(run_dir / "config.yaml")) == C.to_dict(cfg)
        if not same:
            raise ConfigError(f"output: {run_dir} already holds a different run; resume it with "
                              f"`tunelab train {run_dir}` or choose another output=...")
    return cfg, run_dir


def load_trained(run_dir: str | Path, device: str = "cpu"):
    """Rebuild a run's trained model: base model + method + what it saved (final/, else the
    newest valid checkpoint). Returns (cfg, model, tokenizer, method)."""
    from tunelab.methods import METHODS
    from tunelab.models import load_model
    from tunelab.training.checkpoint import latest_valid, load_checkpoint

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise TunelabError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = C.load(run_dir / "config.yaml")
    model, tok = load_model(cfg.model)
    method = METHODS.get(cfg.method.name)(cfg.method.options)
    model = method.apply(model)
    if (run_dir / "final").is_dir():
        method.load(model, run_dir / "final")
    elif (ckpt := latest_valid(run_dir / "checkpoints")) is not None:
        method.load_trainable_state(model, load_checkpoint(ckpt)["trainable"])
    else:
        raise TunelabError(f"{run_dir}: has neither final/ nor a valid checkpoint; train it first")
    return cfg, model.to(device).eval(), tok, method


class MetricsLog:
    """Append-only metrics.jsonl (and TensorBoard scalars if asked); on resume, lines after the
    checkpoint's step are dropped."""

    def __init__(self, path: Path, tensorboard: bool = False):
        self.path, self.tb = path, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TunelabError("train.tensorboard: needs the tensorboard package; "
                                   "pip install 'tunelab[tensorboard]'") from None
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])
            self.tb.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

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
import re
from contextlib import contextmanager
from pathlib import Path

from tunelab import config as C
from tunelab.errors import ConfigError, TunelabError
from tunelab.run.files import atomic_write_text


class RunLock:
    """An exclusive lock on RUN/.lock: a second process on the same run directory is refused."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TunelabError(f"output: cannot create the run directory {self.path.parent}: "
                               f"{e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise TunelabError(f"{self.path.parent}: another tunelab process (pid {holder}) is using this run "
                               f"directory (lock {self.path}); wait for it or choose another output") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds trained state (a checkpoint or final/), not only the
    config.yaml of a start that failed on its inputs."""
    ckpts = run_dir / "checkpoints"
    return (run_dir / "final").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


# ----------------------------------------------------------------------------- no secrets on disk

_SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD)$", re.I)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str) -> str:
    """`text` with the value of every secret-looking environment variable (HF_TOKEN, WANDB_API_KEY,
    any *_TOKEN / *_KEY / *_SECRET / *_PASSWORD of 8+ characters) and anything shaped like a
    Hugging Face token replaced by a placeholder. Everything a run writes passes through this."""
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, f"<redacted ${name}>")
    return _HF_TOKEN.sub("<redacted token>", text)


def write_config(cfg: C.RunConfig, run_dir: Path) -> None:
    """RUN/config.yaml, atomically (a killed process never leaves half a config) and redacted."""
    import yaml

    atomic_write_text(run_dir / "config.yaml", redact(yaml.safe_dump(C.to_dict(cfg), sort_keys=False)))


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
    if is_run_dir(run_dir) and has_progress(run_dir):  # a start that failed before any step is replaced
        same = C.to_dict(C.load(run_dir / "config.yaml")) == C.to_dict(cfg)
        if not same:
            raise ConfigError(f"output: {run_dir} already holds a different run; resume it with "
                              f"`tunelab train {run_dir}` or choose another output=...")
    return cfg, run_dir


@contextmanager
def fits(saved: Path, cfg: C.RunConfig):
    """Turn a saved state that does not fit the model (other shapes or names: the base model or
    the method's options changed since it was written) into one clear error."""
    try:
        yield
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TunelabError(f"{saved}: does not fit model.name={cfg.model.name} with method "
                           f"{cfg.method.name} ({first}); was the base model or a method option changed "
                           "since it was written?") from None


class MetricsLog:
    """Append-only metrics.jsonl (and TensorBoard scalars if asked); on resume, lines after the
    checkpoint's step are dropped. Disabled (`enabled=False`: on ranks other than 0), it writes nothing."""

    def __init__(self, path: Path, tensorboard: bool = False, enabled: bool = True):
        self.path, self.tb, self.enabled = path, None, enabled
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TunelabError("train.tensorboard: needs the tensorboard package; "
                                   "pip install 'tunelab[tensorboard]'") from None
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep the lines up to `step` (all lines when `step` < 0: none). A torn last line, left
        by a full disk, is dropped with the rest."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text(errors="replace").splitlines()
                if (rec := _record(ln)) is not None and rec["step"] <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(redact(json.dumps(record)) + "\n")
        except OSError as e:
            raise TunelabError(f"could not write {self.path}: {e.strerror or e}") from None
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])
            self.tb.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [rec for ln in self.path.read_text(errors="replace").splitlines() if (rec := _record(ln))]


def _record(line: str) -> dict | None:
    """One metrics.jsonl line, or None for a blank or torn one."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None

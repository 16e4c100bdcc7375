"""Checkpoints: safetensors + JSON only (no pickle), written atomically (temp dir, fsync, rename),
with a manifest of sizes and SHA-256 checksums that is verified before a checkpoint is trusted.

A checkpoint holds everything an exact resume needs: the trained tensors, the optimizer state,
the scheduler, the data position and every RNG state.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.training.signals import pause_point

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- files

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify(directory: Path) -> str | None:
    """None if the manifest lists exactly the files present, each with its size and checksum;
    else the problem, naming the file. Any damage (truncation, a flipped byte, a missing or extra
    file, a garbage manifest) is caught here, before a single tensor is trusted."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
        expected = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{directory / MANIFEST}: missing or unreadable manifest"
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(expected))
    if extra:
        return f"{directory / extra[0]}: not listed in the manifest"
    for name, (size, sha) in sorted(expected.items()):
        p = directory / name
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != size:
            return f"{p}: size {p.stat().st_size} != {size} (truncated?)"
        if _sha256(p) != sha:
            return f"{p}: checksum mismatch (corrupt)"
    return None


def atomic_dir(target: Path, fill) -> Path:
    """Create `target` by filling a temp sibling with `fill(tmp)`, writing its manifest, fsyncing
    and renaming it into place. A crash (even SIGKILL) leaves either the old state or the complete
    new one; leftovers are hidden dot-dirs that `recover` tidies. A failed write (disk full,
    read-only) raises TunelabError naming the target and removes the partial copy."""
    target = Path(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        pause_point(f"write:{target.name}")
        write_manifest(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        pause_point(f"manifest:{target.name}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:  # also Ctrl-C: never leave a partial copy or lose the old one
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise TunelabError(f"could not write {target}: {_why(e)}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    pause_point(f"renamed:{target.name}")
    return target


def _why(e: BaseException) -> str:
    """The OS reason of a failed write, with the file when the OS names it."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename})" if e.filename else e.strerror
    return str(e)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = Path(path).with_name(f".tmp-{Path(path).name}-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TunelabError(f"could not write {path}: {_why(e)}") from None


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


# ----------------------------------------------------------------------------- optimizer + RNG

def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(directory: Path, *, trainable: dict, optimizer, scheduler, extra: dict) -> Path:
    def fill(tmp: Path) -> None:
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = rng_state()
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        pause_point(f"fill:{directory.name}")
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta, **extra}
        (tmp / "state.json").write_text(json.dumps(state))
    return atomic_dir(directory, fill)


def load_checkpoint(directory: Path) -> dict:
    """Read a verified checkpoint: {'trainable', 'optimizer_tensors', 'rng_tensors', 'state'}."""
    return {"trainable": load_file(str(directory / "trainable.safetensors")),
            "optimizer_tensors": load_file(str(directory / "optimizer.safetensors")),
            "rng_tensors": load_file(str(directory / "rng.safetensors")),
            "state": json.loads((directory / "state.json").read_text())}


def step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def list_checkpoints(root: Path) -> list[Path]:
    """Step checkpoints under `root`, oldest first (temp dirs ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def latest_valid(root: Path, warn=print) -> Path | None:
    """The newest checkpoint whose manifest verifies; corrupt ones are reported and skipped."""
    found = load_latest(root, warn, read=False)
    return found[0] if found else None


def load_latest(root: Path, warn=print, read: bool = True) -> tuple[Path, dict | None] | None:
    """(path, load_checkpoint(path)) of the newest checkpoint that verifies and reads back; each
    one skipped is reported with the file that is wrong. None when there is none."""
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            try:
                return ckpt, load_checkpoint(ckpt) if read else None
            except (OSError, ValueError, KeyError, SafetensorError) as e:
                problem = f"{ckpt}: unreadable ({e})"
        warn(f"warning: skipping checkpoint {ckpt}: {problem}")
    return None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints. Each is first renamed to a hidden name, so a
    crash mid-delete never leaves a half-deleted directory that looks like a checkpoint."""
    for old in list_checkpoints(root)[:-keep] if keep > 0 else list_checkpoints(root):
        doomed = root / f".del-{old.name}-{os.getpid()}"
        os.replace(old, doomed)
        pause_point(f"prune:{old.name}")
        shutil.rmtree(doomed, ignore_errors=True)


def recover(root: Path) -> None:
    """Tidy what a killed writer left in `root`: partial copies (.tmp-*) and half-deleted
    checkpoints (.del-*) go; a directory moved aside for replacement (.old-NAME-PID) whose new
    version never landed is put back. Call only while holding the run lock."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(".old-"):
            original = root / p.name[len(".old-"):].rsplit("-", 1)[0]
            if not original.exists():
                os.replace(p, original)
                continue
        if p.name.startswith((".tmp-", ".del-", ".old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def follow_umask(directory: Path) -> None:
    """Give every file under `directory` the mode a plain `open` would (0666 less the umask):
    safetensors writes 0600, which hides a model from the other users it is exported for."""
    mask = os.umask(0)
    os.umask(mask)
    for p in Path(directory).rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)

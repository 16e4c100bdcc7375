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
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError

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
    """None if every file in the manifest is present with its size and checksum, else the problem."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{directory / MANIFEST}: missing or unreadable manifest"
    for name, meta in entries.items():
        p = directory / name
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{p}: size {p.stat().st_size} != {meta['bytes']} (truncated?)"
        if _sha256(p) != meta["sha256"]:
            return f"{p}: checksum mismatch (corrupt)"
    return None


def atomic_dir(target: Path, fill) -> Path:
    """Create `target` by filling a temp sibling with `fill(tmp)`, writing its manifest, fsyncing
    and renaming it into place. A crash leaves either the old state or the complete new one."""
    target = Path(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        write_manifest(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TunelabError(f"could not write {target}: {e.strerror or e}") from None
    return target


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
        raise TunelabError(f"could not write {path}: {e.strerror or e}") from None


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
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"warning: skipping checkpoint {ckpt}: {problem}")
    return None


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else list_checkpoints(root):
        shutil.rmtree(old, ignore_errors=True)

"""Atomic file I/O for everything a run writes: a directory is filled under a temporary name, given
a manifest of sizes and SHA-256 checksums, fsynced and renamed into place; a small file is written
to a temporary sibling and renamed. `verify` checks a directory against its manifest before any of
its contents is trusted. Safetensors and JSON only: nothing here unpickles.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tunelab.errors import TunelabError
from tunelab.run.dist import SINGLE, Dist
from tunelab.run.signals import pause_point

MANIFEST = "manifest.json"


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


def atomic_dir(target: Path, fill, dist: Dist = SINGLE) -> Path:
    """Create `target` by filling a temp sibling with `fill(tmp)`, writing its manifest, fsyncing
    and renaming it into place. A crash (even SIGKILL) leaves either the old state or the complete
    new one; leftovers are hidden dot-dirs that `recover` tidies. A failed write (disk full,
    read-only) raises TunelabError naming the target and removes the partial copy.
    With several processes (`dist`), every rank calls this together and fills the same temp
    directory (each writes its own files); rank 0 names it, and writes the manifest and renames
    once all have written."""
    target = Path(target)
    tag = dist.broadcast(os.getpid())
    tmp = target.parent / f".tmp-{target.name}-{tag}"
    old = target.parent / f".old-{target.name}-{tag}"
    try:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        fill(tmp)
        dist.barrier()
        if dist.is_main:
            _commit(target, tmp, old)
    except BaseException as e:  # also Ctrl-C: never leave a partial copy or lose the old one
        if dist.is_main:
            if old.exists() and not target.exists():
                os.replace(old, target)
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise TunelabError(f"could not write {target}: {_why(e)}") from None
        raise
    if dist.is_main:
        shutil.rmtree(old, ignore_errors=True)
        pause_point(f"renamed:{target.name}")
    dist.barrier()
    return target


def _commit(target: Path, tmp: Path, old: Path) -> None:
    """Manifest, fsync, and the rename that makes `tmp` the new `target` (the old one aside first)."""
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

"""Step checkpoints: safetensors + JSON only (no pickle), written atomically through
`tunelab.run.files` (temp dir, manifest with checksums, fsync, rename) and verified before a
checkpoint is trusted.

What a checkpoint holds is decided by `tunelab.training.state.TrainState`; this module is the
format (tensor groups as safetensors files, the rest as state.json; optimizer state and RNG states
split into tensors and JSON) and the checkpoints' life cycle in RUN/checkpoints (list, newest valid,
prune).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.run.dist import Dist
from tunelab.run.files import atomic_dir, verify
from tunelab.run.signals import pause_point


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

@dataclass
class Saved:
    """A checkpoint as read back: its state.json, and (one-process layout) its tensor files by name.
    A sharded checkpoint's tensors are read into the tensors they belong to (`load_tensors`)."""
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict
    directory: Path | None = None

    @property
    def sharded(self) -> bool:
        return "trainable" not in self.tensors


def save_checkpoint(directory: Path, saved: Saved) -> Path:
    """Write `saved` as DIRECTORY/<name>.safetensors for each tensor group (in order) and
    DIRECTORY/state.json, atomically, with a checksummed manifest."""
    def fill(tmp: Path) -> None:
        for name, tensors in saved.tensors.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        pause_point(f"fill:{directory.name}")
        (tmp / "state.json").write_text(json.dumps(saved.meta))
    return atomic_dir(directory, fill)


def save_sharded(directory: Path, tensors: dict, rng: dict[str, torch.Tensor], meta: dict, dist: Dist) -> Path:
    """The checkpoint of a run on several processes, written by all of them together, atomically:
    `tensors` (DTensor shards or replicated tensors, by name) through torch.distributed.checkpoint
    as safetensors files (each rank its own shard file; no pickle), each rank's RNG tensors in
    rng/rank-R.safetensors, and rank 0's `meta` as state.json."""
    import torch.distributed.checkpoint as dcp

    def fill(tmp: Path) -> None:
        dcp.save({k: v.contiguous() for k, v in tensors.items()},
                 storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        (tmp / "rng").mkdir(exist_ok=True)
        save_file(rng, str(tmp / "rng" / f"rank-{dist.rank}.safetensors"))
        if dist.is_main:
            pause_point(f"fill:{directory.name}")
            (tmp / "state.json").write_text(json.dumps(meta))
    return atomic_dir(directory, fill, dist)


def load_checkpoint(directory: Path) -> Saved:
    """Read a verified checkpoint back (a sharded one: its state.json only)."""
    sharded = not (directory / "trainable.safetensors").exists()
    tensors = {} if sharded else \
        {f.name[:-len(".safetensors")]: load_file(str(f)) for f in sorted(directory.glob("*.safetensors"))}
    return Saved(tensors, json.loads((directory / "state.json").read_text()), directory)


def checkpoint_keys(directory: Path) -> set[str]:
    """The names of the tensors a checkpoint of either layout holds (its RNG files aside)."""
    import torch.distributed.checkpoint as dcp
    return set(dcp.HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata)


def load_tensors(directory: Path, template: dict) -> None:
    """Fill `template` (tensors or DTensors, by name) in place from a checkpoint of either layout:
    torch.distributed.checkpoint reads each process's part (reshards) from the safetensors files."""
    import torch.distributed.checkpoint as dcp
    dcp.load(template, storage_reader=dcp.HuggingFaceStorageReader(str(directory)))


def load_rng(saved: Saved, rank: int, seed: int) -> None:
    """Restore this process's RNG streams: its own when the checkpoint has them; a rank the run did
    not have before (resumed on more processes) starts a stream of its own, from `seed`, the rank
    and the step."""
    if not saved.sharded and rank == 0:
        return set_rng_state(saved.tensors["rng"], saved.meta["rng"])
    ranks = saved.meta.get("rng_ranks", [])
    if rank >= len(ranks):
        return seed_rank(seed, rank, saved.meta["step"])
    set_rng_state(load_file(str(saved.directory / "rng" / f"rank-{rank}.safetensors")), ranks[rank])


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed torch and Python's RNGs for rank `rank` (> 0) of a run seeded `seed`, from step `step`."""
    mixed = (seed * 1_000_003 + rank * 7_919 + step) % 2**63
    torch.manual_seed(mixed)
    random.seed(mixed)


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


def load_latest(root: Path, warn=print, read: bool = True) -> tuple[Path, Saved | None] | None:
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

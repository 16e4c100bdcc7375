"""What the server and every client build the same way: the run's model with its method applied
(from the same seed, so every party starts from the same weights w0), its data partition, a
client's cache of the global weights, and checkpoints in directories written atomically."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab import config as C
from tunelab.errors import TunelabError


@dataclass
class Built:
    model: object
    tok: object
    method: object
    objective: object

    def params(self) -> list[torch.Tensor]:
        """The trained tensors, in the model's parameter order (the order z is drawn in)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def named(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def build(cfg: C.RunConfig, device: str = "cpu") -> Built:
    """Base model + method (seeded by train.seed: the same initialisation on every party) + objective."""
    from tunelab.models import load_model
    from tunelab.registry import METHODS, OBJECTIVES

    torch.manual_seed(cfg.train.seed)
    model, tok = load_model(cfg.model)
    method = METHODS.get(cfg.method.name)(cfg.method.options)
    model = method.apply(model).to(device)
    objective = OBJECTIVES.get(cfg.objective.name)(cfg.objective.options)
    objective.setup(model, tok)
    return Built(model, tok, method, objective)


def partition_examples(cfg: C.RunConfig, tok, partition: int, num_partitions: int):
    """The encoded training examples of client `partition` (federated.split of data.train)."""
    from tunelab.data import encode
    from tunelab.data.split import train_eval_records
    from tunelab.federated.partition import split

    train, _, _ = train_eval_records(cfg.data)
    fc = cfg.federated
    parts = split(train, num_partitions, fc.split, fc.dirichlet_alpha, fc.seed)
    return encode([train[i] for i in parts[partition]], tok, cfg.data)


def write_state(directory: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """`directory` holding state.safetensors and state.json, written atomically (run.files.atomic_dir)."""
    from safetensors.numpy import save_file

    from tunelab.run.files import atomic_dir

    def fill(tmp: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
    directory.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(directory, fill)


def read_state(directory: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """What write_state wrote, after checking its manifest; None when absent or damaged."""
    from safetensors.numpy import load_file

    from tunelab.run.files import verify

    if not directory.is_dir() or verify(directory) is not None:
        return None
    return load_file(str(directory / "state.safetensors")), json.loads((directory / "state.json").read_text())


class ClientCache:
    """A client's copy of the global weights at the last round it applied, and the candidate seeds,
    under OUTPUT/clients/<partition>/ (a Flower ClientApp runs in a new process each round)."""

    def __init__(self, root: Path):
        self.dir = root / "global"

    def load_into(self, built: Built) -> int:
        """Load the cached weights into `built`; the round they are at (0: none cached, w0)."""
        found = read_state(self.dir)
        if found is None:
            return 0
        arrays, meta = found
        with torch.no_grad():
            for n, p in built.named().items():
                p.copy_(torch.from_numpy(arrays[n]).to(p.dtype))
        self.seeds = arrays.get("__seeds__")
        return int(meta["round"])

    def save(self, built: Built, round_: int, seeds: np.ndarray | None) -> None:
        arrays = {n: p.detach().cpu().numpy() for n, p in built.named().items()}
        if seeds is not None:
            arrays["__seeds__"] = seeds
        write_state(self.dir, arrays, {"round": round_})


def require(cond: bool, message: str) -> None:
    if not cond:
        raise TunelabError(message)

"""How the processes of a run share the work (train.parallel), as strategy objects the loop calls
without asking which one it has:

    OneProcess     no process group: the objective's loss, nothing to reduce
    DataParallel   `ddp`: a full replica per process (torch DistributedDataParallel); gradients are
                   summed over the processes once per optimizer step
    FullySharded   `fsdp`: parameters, gradients and optimizer state sharded over the processes
                   (FSDP2, `fully_shard` on each transformer block, then on the root)

Each process computes the loss *sum* of its own micro-batches and counts its tokens; gradients are
summed over processes (not averaged) and divided by the token count summed over processes, so the
step is the one a single process would take on all the processes' examples at once.

The model and the objective's own trained modules sit under one root module, `LossModule`, whose
forward is the objective's loss: DDP and FSDP2 hook module forwards, and objectives call the
decoder and the output head separately, so the root's forward must span the whole loss.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.objectives import LossOutput
from tunelab.run.context import StepContext
from tunelab.run.dist import Dist


class LossModule(nn.Module):
    """The model (`model`) and the objective's own trained modules (`objective_modules`) under one
    root; forward(batch, ctx) is the objective's loss: (loss sum, tokens counted, metrics)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective_modules = nn.ModuleList(objective.trained_modules())
        self._objective = objective

    def forward(self, batch: dict, ctx: StepContext):
        out = self._objective.loss(self.model, batch, ctx)
        return out.loss_sum, out.num_tokens, out.metrics


class OneProcess:
    """One process and no process group: the loss is the objective's, and nothing is reduced."""

    name = "none"
    distributed = False

    def __init__(self, dist: Dist, device: torch.device):
        self.dist, self.device = dist, device

    def wrap(self, model: nn.Module, objective) -> None:
        self.root = LossModule(model, objective)
        self.runner = self.root

    def loss(self, batch: dict, ctx: StepContext, sync: bool) -> LossOutput:
        """The loss of one forward; gradients are exchanged in its backward only when `sync` (the
        step's last forward)."""
        with self._sync(sync):
            loss_sum, count, metrics = self.runner(batch, ctx)
        return LossOutput(loss_sum, count, metrics)

    def _sync(self, sync: bool):
        return nullcontext()

    def reduce(self, loss_sum: float, count: int, metrics: dict) -> tuple[float, int, dict]:
        """The step's loss sum, token count and mean metrics over all processes."""
        keys = sorted(metrics)
        out = self.dist.sum([loss_sum, count, *(metrics[k] for k in keys)])
        return out[0], int(out[1]), {k: v / self.dist.world_size for k, v in zip(keys, out[2:])}

    @property
    def sharded(self) -> bool:
        """Whether rank 0 lacks a full copy of the model (evaluation and final/ need one built)."""
        return False


class DataParallel(OneProcess):
    """`ddp`: torch DistributedDataParallel over the LossModule, summing (not averaging) gradients,
    synchronised only in the backward of a step's last forward."""

    name = "ddp"
    distributed = True

    def wrap(self, model: nn.Module, objective) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().wrap(model, objective)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a trained tensor may get no gradient in a step (an auxiliary head
        # with weight 0, a prefix outside the sequence); no buffer sync per forward: buffers never differ
        self.runner = DistributedDataParallel(self.root, device_ids=ids, forward_sync_buffers=False,
                                              find_unused_parameters=True)
        self.runner.register_comm_hook(None, _sum_gradients)

    def _sync(self, sync: bool):
        return nullcontext() if sync else self.runner.no_sync()


def _sum_gradients(state, bucket):
    """DDP communication hook: all-reduce SUM of a gradient bucket (DDP's default averages)."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class FullySharded(OneProcess):
    """`fsdp`: FSDP2 `fully_shard` on each transformer block, then on the LossModule root (the
    embeddings, final norm and output head: tied embeddings stay in one unit). Reductions sum."""

    name = "fsdp"
    distributed = True

    def wrap(self, model: nn.Module, objective) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        super().wrap(model, objective)
        mesh = init_device_mesh(self.device.type, (self.dist.world_size,))  # CPU: an explicit CPU mesh
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.root, mesh=mesh)
        self.units = [m for m in self.root.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:  # sum over ranks; gloo has no pre-scaled sum, so plain SUM
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)

    @contextmanager
    def _sync(self, sync: bool):
        self.root.set_requires_gradient_sync(sync)
        yield

    @property
    def sharded(self) -> bool:
        return True

    def full_model(self, fresh):
        """Rank 0's copy of the trained model (None on other ranks): `fresh()` -> (model, method)
        built on rank 0 and loaded with the full weights gathered from every rank (all call this)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.root.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        model, method = fresh()
        missing, unexpected = model.load_state_dict(full, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        assert not unexpected and set(missing) <= tied, (missing[:3], unexpected[:3])
        return model.eval(), method


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: modules of the classes transformers names in
    `_no_split_modules` (its decoder layers)."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise ConfigError(f"train.parallel: fsdp found no transformer blocks in {type(model).__name__} "
                          "(it declares no _no_split_modules); use train.parallel: ddp")
    return blocks


STRATEGIES = {"ddp": DataParallel, "fsdp": FullySharded}


def choose(dist: Dist, device: torch.device, setting: str, method, objective) -> OneProcess:
    """The strategy for train.parallel = `setting` ('auto', 'ddp', 'fsdp'): one process without a
    process group; else what the method supports (auto: its first choice). A method that cannot
    run on several processes says so here, before training."""
    if not dist.active:
        return OneProcess(dist, device)
    modes = type(method).parallel
    if not modes:
        raise ConfigError(f"method.name: '{method.name}' cannot train on several processes "
                          f"({type(method).single_process_why}); run it without torchrun")
    if objective.trained_modules():  # FSDP here shards the model's blocks and root, not an objective's heads
        modes = tuple(m for m in modes if m != "fsdp") if setting == "auto" else modes
        if setting == "fsdp":
            raise ConfigError(f"train.parallel: fsdp does not shard the modules objective "
                              f"'{objective.name}' trains itself; use train.parallel: ddp")
    mode = modes[0] if setting == "auto" else setting
    if mode not in modes:
        raise ConfigError(f"train.parallel: method '{method.name}' supports {', '.join(modes)}, not {mode}")
    return STRATEGIES[mode](dist, device)

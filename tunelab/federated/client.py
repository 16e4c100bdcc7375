"""A client's round, framework-free: the Flower ClientApp (federated/flower/apps.py) calls
`client_round` with the server's message and sends back what it returns.

fedkseed: bring the cached global weights up to date by replaying the rounds' aggregated scalars,
cache them, take `local_steps` zeroth-order steps on this client's data from them, send the
(seed index, scalar) pairs. fedavg: load the global trained tensors, take `local_steps` optimizer
steps with the run's own step function (training.step.train_step, DP-SGD included when
privacy.dp_sgd is on), send the trained tensors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from tunelab import config as C
from tunelab.federated import kseed as K
from tunelab.federated.party import Built, ClientCache, build, partition_examples, require
from tunelab.federated.protocol import Message, kseed_upload
from tunelab.run.signals import pause_point


def _stream(cfg: C.RunConfig, examples, tok, partition: int, round_: int):
    from tunelab.training.batches import BatchStream
    seed = (cfg.federated.seed * 1_000_003 + partition * 10_007 + round_) % 2**32
    return BatchStream(examples, cfg.train.micro_batch_size, seed=seed, packing=cfg.data.packing,
                       pad_id=tok.pad_token_id)


def _batch_loss(built: Built, cfg: C.RunConfig, batch: dict, seen: list) -> float:
    from tunelab.run.device import autocast
    with autocast(cfg.train.precision, torch.device("cpu")):
        out = built.objective.loss(built.model, batch)
    value = float(out.loss_sum) / max(out.num_tokens, 1)
    seen.append(value)
    return value


def kseed_round(cfg: C.RunConfig, partition: int, num_partitions: int, message: Message, root: Path) -> Message:
    arrays, scalars = message
    fc, round_, first = cfg.federated, int(scalars["round"]), int(scalars["first_round"])
    built, cache = build(cfg), ClientCache(root)
    synced = cache.load_into(built)
    seeds = arrays.get("seeds", getattr(cache, "seeds", None))
    require(seeds is not None, f"client {partition}: no candidate seeds (none sent, none cached)")
    require(synced >= first - 1, f"client {partition}: its cache is at round {synced}, the server sent rounds "
                                 f"from {first}; it needs the history from round {synced + 1}")
    params = built.params()
    for j, delta in enumerate(arrays["deltas"]):
        if first + j > synced:
            K.replay_round(params, seeds, delta, cfg.train.lr)
    synced = max(synced, first + len(arrays["deltas"]) - 1)
    cache.save(built, synced, seeds)
    pause_point(f"client-{partition}:round-{round_}")  # mid-round: cached, nothing sent yet
    probs = arrays["probs"].astype(np.float64) if "probs" in arrays else None
    rng = np.random.default_rng([fc.seed, round_, partition])
    idx = K.sample_indices(len(seeds), fc.local_steps, rng, None if probs is None else probs / probs.sum())
    examples = partition_examples(cfg, built.tok, partition, num_partitions)
    stream, seen = _stream(cfg, examples, built.tok, partition, round_), []
    built.model.eval()  # no dropout: both evaluations of a step see the same function
    g = [K.zo_step(params, lambda b=next(stream): _batch_loss(built, cfg, b, seen), int(seeds[i]), fc.zo_eps,
                   cfg.train.lr) for i in idx]
    return kseed_upload(idx, np.array(g, dtype=np.float32), num_examples=len(examples), synced_round=synced,
                        loss=float(np.mean(seen)))


def fedavg_round(cfg: C.RunConfig, partition: int, num_partitions: int, message: Message, root: Path) -> Message:
    from tunelab.run.context import StepContext
    from tunelab.run.dist import SINGLE
    from tunelab.training.loop import private_gradients
    from tunelab.training.optim import build_optimizer
    from tunelab.training.parallel import OneProcess
    from tunelab.training.state import TrainState
    from tunelab.training.step import train_step

    arrays, scalars = message
    steps, device = cfg.federated.local_steps, torch.device("cpu")
    built = build(cfg)
    built.method.load_trainable_state(built.model, {k: torch.from_numpy(v) for k, v in arrays.items()})
    tc = dataclasses.replace(cfg.train, steps=steps, warmup_steps=0, schedule="constant")
    opt, sched = build_optimizer(built.method.param_groups(built.model, tc.weight_decay), tc)
    parallel = OneProcess(SINGLE, device)
    parallel.wrap(built.model, built.objective)
    examples = partition_examples(cfg, built.tok, partition, num_partitions)
    state = TrainState(built.model, built.method, built.objective, opt, sched,
                       _stream(cfg, examples, built.tok, partition, int(scalars["round"])),
                       grad_accum=tc.grad_accum, private=private_gradients(cfg, built.method, built.objective,
                                                                         SINGLE, len(examples)))
    built.model.train()
    losses = [train_step(state, parallel, tc, device, StepContext(step=s, total_steps=steps)).loss
              for s in range(1, steps + 1)]
    out = {n: t.detach().float().cpu().numpy() for n, t in built.method.trainable_state(built.model).items()}
    return out, {"num_examples": len(examples), "loss": float(np.mean(losses))}


ROUNDS = {"fedkseed": kseed_round, "fedavg": fedavg_round}


def client_round(cfg: C.RunConfig, partition: int, num_partitions: int, message: Message) -> Message:
    """This client's reply to the server's message of a round."""
    root = Path(cfg.output) / "clients" / str(partition)
    arrays, scalars = ROUNDS[cfg.federated.algorithm](cfg, partition, num_partitions, message, root)
    return arrays, scalars | {"partition": partition}

"""The server's side, framework-free: what to send each client, how to aggregate the replies, its
checkpoint after every round, and the rounds themselves (`run_rounds`, driven through a transport:
the Flower ServerApp's grid in federated/flower/apps.py).

A round: wait for clients, send each its message, collect the replies that come back within
federated.round_timeout (a client killed mid-round simply does not reply: the round goes on with
the others, and the client is sent the whole history it lacks when it is back); with fewer than
federated.min_replies the round is sent again (federated.max_retries times). After aggregation
the server state is checkpointed (OUTPUT/federated/round-N, atomic), so a restarted server
resumes after its last complete round."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from tunelab import config as C
from tunelab.errors import TunelabError
from tunelab.federated import kseed as K
from tunelab.federated.party import Built, build, read_state, write_state
from tunelab.run.signals import pause_point
from tunelab.federated.protocol import Message, kseed_download, payload_bytes, seed_bytes, without_seeds


class KSeedServer:
    """FedKSeed's server state: the candidate seeds, each round's aggregated K-vector and, for Pro,
    the seeds' |g| histories; which round each client has applied (not checkpointed: after a
    restart every client is sent what it lacks)."""

    def __init__(self, cfg: C.RunConfig):
        self.cfg, fc = cfg, cfg.federated
        self.seeds = K.candidate_seeds(fc.seed, fc.num_seeds)
        self.deltas: list[np.ndarray] = []
        self.abs_sum, self.count = np.zeros(fc.num_seeds), np.ones(fc.num_seeds)
        self.synced: dict[int, int] = {}

    @property
    def round(self) -> int:
        return len(self.deltas)

    def message(self, node: int, round_: int) -> Message:
        s = self.synced.get(node, 0)
        rows = np.stack(self.deltas[s:round_ - 1]) if round_ - 1 > s else np.zeros((0, len(self.seeds)), np.float32)
        probs = K.pro_probabilities(self.abs_sum, self.count) if self.cfg.federated.seed_sampling == "pro" else None
        return kseed_download(rows, probs, self.seeds if node not in self.synced else None,
                              round=round_, first_round=s + 1)

    def aggregate(self, round_: int, replies: dict[int, Message]) -> None:
        fc, parts = self.cfg.federated, []
        for node, (arrays, scalars) in sorted(replies.items(), key=lambda kv: kv[1][1]["partition"]):  # fixed order
            self.synced[node] = int(scalars["synced_round"])
            K.pro_record(self.abs_sum, self.count, arrays["idx"], arrays["g"], fc.pro_clip)
            parts.append((arrays["idx"], arrays["g"], scalars["num_examples"] if fc.weighting == "examples" else 1.0))
        self.deltas.append(K.aggregate(parts, fc.num_seeds))

    def lost(self, node: int) -> None:
        """A client that did not reply: next time it is sent everything (its seeds and history)."""
        self.synced.pop(node, None)

    def arrays(self) -> dict[str, np.ndarray]:
        deltas = np.stack(self.deltas) if self.deltas else np.zeros((0, len(self.seeds)), np.float32)
        return {"seeds": self.seeds, "deltas": deltas, "abs_sum": self.abs_sum, "count": self.count}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.seeds, self.abs_sum, self.count = arrays["seeds"], arrays["abs_sum"], arrays["count"]
        self.deltas = list(arrays["deltas"])

    def model(self) -> Built:
        """The global model: w0 with every round replayed."""
        built = build(self.cfg)
        for delta in self.deltas:
            K.replay_round(built.params(), self.seeds, delta, self.cfg.train.lr)
        return built


class AvgServer:
    """Federated averaging of the method's trained tensors (FedAvg of LoRA adapters with lora)."""

    def __init__(self, cfg: C.RunConfig):
        self.cfg = cfg
        built = build(cfg)
        self.global_ = {n: t.detach().float().numpy().copy() for n, t in built.method.trainable_state(built.model).items()}
        self.round = 0

    def message(self, node: int, round_: int) -> Message:
        return dict(self.global_), {"round": round_}

    def aggregate(self, round_: int, replies: dict[int, Message]) -> None:
        by_examples = self.cfg.federated.weighting == "examples"
        weights = {n: (s["num_examples"] if by_examples else 1.0) for n, (_, s) in replies.items()}
        total, order = sum(weights.values()), sorted(weights, key=lambda n: replies[n][1]["partition"])
        self.global_ = {k: sum(replies[n][0][k].astype(np.float64) * (weights[n] / total) for n in order).astype(np.float32)
                        for k in self.global_}
        self.round = round_

    def lost(self, node: int) -> None:
        pass

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.global_)

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.global_ = {k: arrays[k] for k in self.global_}
        self.round = int(meta["round"])

    def model(self) -> Built:
        built = build(self.cfg)
        built.method.load_trainable_state(built.model, {k: torch.from_numpy(v) for k, v in self.global_.items()})
        return built


SERVERS = {"fedkseed": KSeedServer, "fedavg": AvgServer}


def checkpoints(out: Path) -> list[Path]:
    root = out / "federated"
    found = [p for p in root.glob("round-*") if p.name.split("-")[1].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_server(cfg: C.RunConfig, log=print):
    """The server for cfg.federated.algorithm, resumed from its newest valid checkpoint if any."""
    server = SERVERS[cfg.federated.algorithm](cfg)
    for path in reversed(checkpoints(Path(cfg.output))):
        found = read_state(path)
        if found is None:
            log(f"warning: {path} is incomplete or damaged; trying an older checkpoint")
            continue
        server.restore(*found)
        log(f"resuming {cfg.output} after round {found[1]['round']} ({path})")
        break
    return server


def save_server(server, out: Path, keep: int = 2) -> None:
    import shutil
    write_state(out / "federated" / f"round-{server.round}", server.arrays(), {"round": server.round})
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class Transport(Protocol):
    def nodes(self, at_least: int, timeout: float) -> list[int]: ...
    def send(self, messages: dict[int, Message], timeout: float) -> dict[int, Message]: ...
    def encoded_bytes(self, message: Message) -> int:
        """What the message takes in the transport's own encoding."""
        ...


def traffic(sent: dict[int, Message], replies: dict[int, Message], transport) -> dict:
    """Bytes per client of a round (the most any replying client moved): payload (arrays + 8 per
    scalar; the paper's count), and in the transport's encoding; the one-time candidate seeds apart."""
    pairs = [(without_seeds(sent[n]), r) for n, r in replies.items()]
    out = {"download_bytes_per_client": max(payload_bytes(d) for d, _ in pairs),
           "upload_bytes_per_client": max(payload_bytes(u) for _, u in pairs),
           "bytes_per_client": max(payload_bytes(d) + payload_bytes(u) for d, u in pairs),
           "seed_bytes": sum(seed_bytes(m) for m in sent.values())}
    if hasattr(transport, "encoded_bytes"):
        out["encoded_bytes_per_client"] = max(transport.encoded_bytes(d) + transport.encoded_bytes(u) for d, u in pairs)
    return out


def one_round(server, transport: Transport, round_: int, fc, log) -> dict:
    """Send, collect, retry when too few replied; aggregate. The round's figures."""
    t0 = time.perf_counter()
    for attempt in range(fc.max_retries + 1):
        nodes = transport.nodes(fc.min_replies, fc.round_timeout)
        sent = {n: server.message(n, round_) for n in nodes}
        replies = transport.send(sent, fc.round_timeout)
        for n in set(sent) - set(replies):
            server.lost(n)
        if len(replies) >= fc.min_replies:
            break
        log(f"round {round_}: {len(replies)} of {len(sent)} clients replied (need {fc.min_replies}); "
            f"retrying ({attempt + 1} of {fc.max_retries})")
    else:
        raise TunelabError(f"round {round_}: fewer than federated.min_replies={fc.min_replies} clients replied "
                           f"after {fc.max_retries} retries; the server state after round {round_ - 1} is saved: "
                           "run the same `tunelab federate` command again to resume")
    server.aggregate(round_, replies)
    return {"kind": "round", "clients": len(replies), "missing": len(sent) - len(replies), "attempts": attempt + 1,
            "loss": float(np.mean([r[1]["loss"] for r in replies.values()])), **traffic(sent, replies, transport),
            "round_s": time.perf_counter() - t0}


def run_rounds(server, transport: Transport, cfg: C.RunConfig, log_line, say=print) -> None:
    """Rounds after the server's last completed one up to federated.rounds, each checkpointed."""
    for round_ in range(server.round + 1, cfg.federated.rounds + 1):
        figures = one_round(server, transport, round_, cfg.federated, say)
        save_server(server, Path(cfg.output))
        log_line({"step": round_, **figures})
        pause_point(f"server:round-{round_}")  # between rounds: this one checkpointed, the next not begun
        say(f"round {round_}: {figures['clients']} clients, loss {figures['loss']:.4f}, "
            f"{figures['bytes_per_client']} bytes per client, {figures['round_s']:.1f} s")

"""The messages of the two federated algorithms, as plain data: named numpy arrays plus a few
scalars. The Flower apps carry them as an ArrayRecord and a ConfigRecord; tests and the byte
counts read them here, without Flower.

FedKSeed, server -> client, round r:
    deltas (n, K) fp32   the aggregated per-seed scalars of the rounds the client has not applied
                         (n = 1 in steady state; 0 in round 1)
    probs  (K,) fp32     FedKSeed-Pro's seed probabilities (Pro only)
    seeds  (K,) int64    the candidate seeds, only to a node that has not had them
client -> server:
    idx (tau,) int32, g (tau,) fp32   one (seed index, projected gradient) pair per local step

FedAvg of adapters: the trained tensors (fp32) both ways.
Scalars (round numbers, example counts, losses) ride along in `config` and count 8 bytes each.
"""
from __future__ import annotations

import numpy as np

Message = tuple[dict[str, np.ndarray], dict[str, float | int | str]]
"""(arrays, scalars)."""


def kseed_download(deltas: np.ndarray, probs: np.ndarray | None, seeds: np.ndarray | None = None,
                   **scalars) -> Message:
    deltas = np.asarray(deltas, dtype=np.float32).reshape(-1, deltas.shape[-1])
    arrays = {"deltas": deltas}
    if probs is not None:
        arrays["probs"] = np.asarray(probs, dtype=np.float32)
    if seeds is not None:
        arrays["seeds"] = np.asarray(seeds, dtype=np.int64)
    return arrays, dict(scalars)


def kseed_upload(idx: np.ndarray, g: np.ndarray, **scalars) -> Message:
    return {"idx": np.asarray(idx, dtype=np.int32), "g": np.asarray(g, dtype=np.float32)}, dict(scalars)


def payload_bytes(message: Message) -> int:
    """Bytes of the message's content: its arrays' bytes plus 8 per scalar."""
    arrays, scalars = message
    return sum(a.nbytes for a in arrays.values()) + 8 * len(scalars)


def without_seeds(message: Message) -> Message:
    """The message less its candidate seeds (sent once per node: counted apart from the rounds)."""
    arrays, scalars = message
    return {k: v for k, v in arrays.items() if k != "seeds"}, scalars


def seed_bytes(message: Message) -> int:
    """Bytes of the candidate seeds the message carries (0 once a node has them)."""
    return int(message[0]["seeds"].nbytes) if "seeds" in message[0] else 0


def array_bytes(message: Message) -> int:
    """Bytes of the message's arrays alone (what grows with K, tau or the adapter)."""
    return sum(a.nbytes for a in message[0].values())

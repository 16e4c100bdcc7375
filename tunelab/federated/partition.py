"""Sharing data.train out among clients: IID (a seeded shuffle cut into even parts) or non-IID
(for each category, a Dirichlet(alpha) draw says which share of its records each client gets, as
in FedKSeed's Dolly split).

A record's category (`category`): for builtin:arith-style answers, the sequence of operators of
its solution lines ("+-", "*+", ...), the problem's kind; for other records, the length bucket of
the reply (short / medium / long by thirds of the data). Every client gets at least one record."""
from __future__ import annotations

import re

import numpy as np

_STEP = re.compile(r"=?\s*\d+\s*([-+*/])\s*\d+\s*=")


def reply_of(record) -> str:
    if getattr(record, "messages", None):
        return " ".join(m["content"] for m in record.messages if m.get("role") == "assistant")
    return getattr(record, "text", "") or ""


def category(record) -> str:
    ops = _STEP.findall(reply_of(record))
    return "".join(ops) if ops else ""


def categories(records) -> list[str]:
    """Each record's category; records without solution steps get a length tercile."""
    cats = [category(r) for r in records]
    lengths = [len(reply_of(r)) for r in records]
    cuts = np.quantile(lengths, [1 / 3, 2 / 3]) if lengths else [0, 0]
    return [c or ("short", "medium", "long")[int(np.searchsorted(cuts, n, side="right"))] for c, n in zip(cats, lengths)]


def iid(n: int, num_clients: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def non_iid(cats: list[str], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cat in sorted(set(cats)):
        members = rng.permutation([i for i, c in enumerate(cats) if c == cat])
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client] += chunk.tolist()
    for client, part in enumerate(parts):  # no empty client: take one record from the largest
        if not part:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            part.append(parts[donor].pop())
    return [sorted(p) for p in parts]


def split(records, num_clients: int, how: str, alpha: float, seed: int) -> list[list[int]]:
    """Indices of `records` per client."""
    if len(records) < num_clients:
        raise ValueError(f"{len(records)} training records cannot be shared among {num_clients} clients")
    if how == "iid":
        return iid(len(records), num_clients, seed)
    return non_iid(categories(records), num_clients, alpha, seed)

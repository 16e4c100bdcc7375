"""The federated pieces without Flower: partitions, server messages and aggregation, checkpoints,
and the byte counts of real messages."""
import numpy as np
import pytest

from tunelab.data.records import Record
from tunelab.federated import partition as P
from tunelab.federated.config import FederatedConfig
from tunelab.errors import ConfigError


def _arith(n=200):
    from tunelab.data.builtin import load_builtin
    return load_builtin(f"builtin:arith?n={n}&split=train&seed=0")


def test_iid_partition_covers_every_record_once_and_evenly():
    parts = P.split(_arith(), 3, "iid", 0.5, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(200)) and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_non_iid_partition_skews_categories_and_keeps_every_client():
    records = _arith()
    cats = P.categories(records)
    assert len(set(cats)) > 3 and all(set(c) <= set("+-*/") for c in cats)
    parts = P.split(records, 4, "non-iid", 0.1, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(200)) and all(parts)
    share = lambda p: np.array([sum(cats[i] == c for i in p) for c in sorted(set(cats))]) / len(p)
    overall = share(range(200))
    assert max(np.abs(share(p) - overall).sum() for p in parts) > 0.5  # far from the IID mixture
    iid = P.split(records, 4, "iid", 0.1, seed=0)
    assert max(np.abs(share(p) - overall).sum() for p in iid) < max(np.abs(share(p) - overall).sum() for p in parts)


def test_records_without_steps_fall_back_to_length_terciles():
    recs = [Record(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * n}]) for n in range(1, 31)]
    assert set(P.categories(recs)) == {"short", "medium", "long"}


def test_federated_options_are_validated():
    with pytest.raises(ConfigError, match="num_seeds"):
        FederatedConfig(num_seeds=0)
    with pytest.raises(ConfigError, match="algorithm"):
        FederatedConfig(algorithm="fedsgd")


def test_kseed_server_sends_each_client_what_it_lacks_and_resumes_identically(tmp_path, tiny_dir):
    from tunelab import config as C
    from tunelab.federated.server import KSeedServer, load_server, save_server
    from tunelab.federated.protocol import array_bytes

    cfg = C.load(None, [f"model.name={tiny_dir}", "method.name=full", "federated.num_seeds=16", "federated.local_steps=3",
                        f"output={tmp_path / 'run'}"])
    s = KSeedServer(cfg)
    first = s.message(7, 1)
    assert "seeds" in first[0] and first[0]["deltas"].shape == (0, 16)
    for r in (1, 2):
        replies = {n: ({"idx": np.array([1, 2, 2], np.int32), "g": np.array([0.5, -1, 2], np.float32)},
                       {"num_examples": 10 * (n + 1), "synced_round": r - 1, "loss": 1.0, "partition": n}) for n in (0, 1)}
        for n in (0, 1):
            s.message(n, r)
        s.aggregate(r, replies)
    assert s.deltas[0][2] == pytest.approx(1.0) and s.deltas[0][1] == pytest.approx(0.5)
    steady = s.message(0, 3)
    assert "seeds" not in steady[0] and steady[0]["deltas"].shape == (1, 16) and array_bytes(steady) == 4 * 16
    late = s.message(99, 3)  # a new node gets the seeds and both rounds
    assert late[0]["deltas"].shape == (2, 16) and late[1]["first_round"] == 1
    save_server(s, tmp_path / "run")
    again = load_server(cfg, log=lambda m: None)
    assert again.round == 2 and all(np.array_equal(a, b) for a, b in zip(again.deltas, s.deltas))

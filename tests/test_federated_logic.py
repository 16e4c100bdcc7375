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


def _lora_cfg(tmp_path, tiny_dir, *extra):
    import json
    from tiny import chat_rows
    from tunelab import config as C
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    return C.load(None, [f"model.name={tiny_dir}", f"data.train={data}", "data.eval=null", "method.name=lora",
                         "method.r=2", "train.micro_batch_size=2", "train.lr=1e-2", "train.precision=fp32",
                         "federated.algorithm=fedavg", "federated.local_steps=2", f"output={tmp_path / 'run'}", *extra])


def test_fedavg_client_trains_only_the_adapter_and_the_server_averages_by_examples(tmp_path, tiny_dir):
    """The first-order baseline: a client round starts from the global adapter, takes local_steps
    optimizer steps and sends back the adapter tensors alone (their bytes: the adapter's fp32 size);
    the server's new global adapter is the example-weighted mean of the replies."""
    from tunelab.federated.client import client_round
    from tunelab.federated.protocol import array_bytes
    from tunelab.federated.server import AvgServer

    cfg = _lora_cfg(tmp_path, tiny_dir)
    server = AvgServer(cfg)
    assert server.global_ and all("lora_" in k for k in server.global_)
    replies = {n: client_round(cfg, n, 2, server.message(n, 1)) for n in (0, 1)}
    for arrays, scalars in replies.values():
        assert set(arrays) == set(server.global_) and scalars["num_examples"] > 0
        assert any(not np.array_equal(arrays[k], server.global_[k]) for k in arrays)  # it trained
    assert array_bytes(replies[0]) == sum(4 * v.size for v in server.global_.values())
    w = {n: replies[n][1]["num_examples"] for n in (0, 1)}
    server.aggregate(1, replies)
    for k, v in server.global_.items():
        want = (replies[0][0][k] * w[0] + replies[1][0][k] * w[1]) / (w[0] + w[1])
        np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-7)


def test_fedavg_clients_train_with_dp_sgd(tmp_path, tiny_dir, monkeypatch):
    """privacy.dp_sgd applies inside a FedAvg client's local steps: its step function is the run's,
    which then takes DP-SGD's gradients (seen being called once per local step)."""
    from tunelab.federated.client import client_round
    from tunelab.federated.server import AvgServer
    from tunelab.privacy import PrivateGradients

    calls = []
    real = PrivateGradients.forward_backward
    monkeypatch.setattr(PrivateGradients, "forward_backward", lambda self, *a: calls.append(1) or real(self, *a))
    cfg = _lora_cfg(tmp_path, tiny_dir, "privacy.dp_sgd=true", "privacy.noise_multiplier=0.5")
    arrays, scalars = client_round(cfg, 0, 2, AvgServer(cfg).message(0, 1))
    assert arrays and np.isfinite(scalars["loss"]) and len(calls) == cfg.federated.local_steps


@pytest.mark.parametrize("extra,field", [
    (["privacy.dp_sgd=true"], "privacy.dp_sgd: FedKSeed"),
    (["federated.algorithm=fedavg", "privacy.dp_sgd=true", "method.name=greentrainer"], "cannot train with DP-SGD"),
    (["federated.num_clients=40"], "federated.num_clients: 40 clients"),
    (["federated.min_replies=3"], "federated.min_replies"),
])
def test_a_federated_run_that_cannot_work_is_refused_before_any_process_starts(tmp_path, tiny_dir, extra, field):
    import json
    from tiny import chat_rows
    from tunelab import config as C
    from tunelab.federated.flower.launch import federate

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    cfg = C.load(None, [f"model.name={tiny_dir}", f"data.train={data}", f"output={tmp_path / 'run'}", *extra])
    with pytest.raises(ConfigError, match=field):
        federate(cfg)
    assert not (tmp_path / "run" / "flower").exists()


@pytest.mark.parametrize("recipe", sorted((__import__("pathlib").Path(__file__).parent.parent / "examples" / "federated").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_federated_and_private_recipes_load_and_pass_the_checks(recipe):
    """Each recipe is a valid config that `tunelab federate` (or `train`, for DP-SGD) accepts."""
    from tunelab import config as C
    from tunelab.federated.run import check

    from tunelab.privacy import check_supported
    from tunelab.registry import METHODS, OBJECTIVES

    cfg = C.load(recipe)
    assert cfg.output.endswith(recipe.stem)
    if recipe.stem.startswith("dp-"):  # a `tunelab train` recipe
        assert cfg.privacy.dp_sgd and not cfg.data.packing
        check_supported(cfg.privacy, METHODS.get(cfg.method.name)(cfg.method.options),
                        OBJECTIVES.get(cfg.objective.name)(cfg.objective.options), False)
    else:
        assert cfg.federated.algorithm in recipe.stem
        check(cfg)

"""FedKSeed's framework-free core (tunelab/federated/kseed.py): replaying the seed-scalar history
reproduces the weights bit for bit, aggregation is FedAvg of the client models, the projected
gradient is a directional derivative, Pro's probabilities, and fixed message sizes."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tiny import tiny_model
from tunelab.federated import kseed as K


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _loss_fn(model, seed=0):
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(seed))
    return lambda: float(model(input_ids=ids, labels=ids).loss)


@settings(max_examples=6, deadline=None)
@given(steps=st.integers(1, 6), k=st.integers(1, 8), lr=st.floats(1e-5, 1e-2), seed=st.integers(0, 1000))
def test_replaying_the_seed_scalar_history_reproduces_the_weights_bit_for_bit(steps, k, lr, seed):
    """A client's local ZO steps, replayed from the same start by another copy, give identical
    tensors (torch.equal, not close), also when seeds repeat."""
    trained, fresh = tiny_model(), tiny_model()
    seeds = K.candidate_seeds(seed, k)
    idx = K.sample_indices(k, steps, np.random.default_rng(seed))
    pairs = [(int(i), K.zo_step(_params(trained), _loss_fn(trained, t), int(seeds[i]), 1e-3, lr))
             for t, i in enumerate(idx)]
    assert any(g != 0 for _, g in pairs)
    K.replay(_params(fresh), seeds, pairs, lr)
    assert all(torch.equal(a, b) for a, b in zip(_params(trained), _params(fresh)))


def test_round_replay_is_the_same_on_every_party_and_equals_fedavg_of_client_updates():
    """Two parties replaying the same aggregated round get identical weights; the result is the
    weighted average of the client models' updates (linearity), up to fp32 rounding."""
    seeds, k, lr = K.candidate_seeds(3, 16), 16, 1e-3
    start = tiny_model()
    clients, replies = [], []
    for c, w in ((0, 3.0), (1, 1.0)):
        m = tiny_model()
        idx = K.sample_indices(k, 4, np.random.default_rng(c))
        g = np.array([K.zo_step(_params(m), _loss_fn(m, c * 10 + t), int(seeds[i]), 1e-3, lr)
                      for t, i in enumerate(idx)], dtype=np.float32)
        clients.append(m)
        replies.append((idx, g, w))
    delta = K.aggregate(replies, k)
    a, b = tiny_model(), tiny_model()
    K.replay_round(_params(a), seeds, delta, lr)
    K.replay_round(_params(b), seeds, delta, lr)
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))
    for pa, p0, p1, p2 in zip(_params(a), _params(start), _params(clients[0]), _params(clients[1])):
        want = p0 + 0.75 * (p1 - p0) + 0.25 * (p2 - p0)
        torch.testing.assert_close(pa, want, atol=1e-6, rtol=1e-5)


def test_projected_gradient_is_the_directional_derivative():
    """On L(theta) = 1/2 ||theta||^2, g = z . theta exactly up to O(eps^2) (here: exact in theory)."""
    theta = [torch.randn(50, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4)]
    z = list(K.directions(theta, 123))
    want = float(sum((a * b).sum() for a, b in zip(theta, z)))
    loss = lambda: 0.5 * float(sum(t.double().pow(2).sum() for t in theta))
    g = K.zo_step(theta, loss, 123, 1e-3, 0.0)
    assert g == pytest.approx(want, rel=1e-3)


def test_zo_steps_and_replay_name_their_devices():
    from devicetrap import DeviceTrap
    model, seeds = tiny_model(), K.candidate_seeds(0, 4)
    with DeviceTrap() as trap:
        g = K.zo_step(_params(model), _loss_fn(model), int(seeds[1]), 1e-3, 1e-3)
        K.replay_round(_params(model), seeds, np.array([0, g, 0, 1], np.float32), 1e-3)
    assert not trap.found, trap.found


def test_directions_depend_on_the_seed_and_the_parameter_order():
    a, b = torch.zeros(5), torch.zeros(7)
    z1, z2 = list(K.directions([a, b], 9)), list(K.directions([a, b], 9))
    assert all(torch.equal(x, y) for x, y in zip(z1, z2))
    assert not torch.equal(list(K.directions([b, a], 9))[1], z1[0])  # a drawn after b: another z
    assert not torch.equal(list(K.directions([a, b], 10))[0], z1[0])


def test_pro_probabilities_are_uniform_for_equal_histories_and_bounded_by_e():
    k = 32
    p = K.pro_probabilities(np.zeros(k), np.ones(k))
    assert np.allclose(p, 1 / k) and p.sum() == pytest.approx(1)
    abs_sum, count = np.zeros(k), np.ones(k)
    rng = np.random.default_rng(0)
    K.pro_record(abs_sum, count, rng.integers(0, k, 200), rng.normal(0, 50, 200) * np.where(rng.random(200) < .1, 100, 1), clip=30.0)
    p = K.pro_probabilities(abs_sum, count)
    assert p.sum() == pytest.approx(1) and p.max() / p.min() == pytest.approx(np.e, rel=1e-9)
    assert (abs_sum / np.maximum(count - 1, 1)).max() <= 30.0  # clipped history


@pytest.mark.parametrize("k,steps", [(1024, 200), (4096, 200), (4096, 50)])
def test_message_size_depends_on_k_and_local_steps_only(k, steps):
    """The round's message holds a fixed-size K-vector down and `steps` pairs up, whatever the
    round, the data or the values: counted on encoded messages of different rounds."""
    from tunelab.federated.protocol import array_bytes, kseed_download, kseed_upload

    sizes = set()
    for r in range(3):
        delta = np.random.default_rng(r).normal(size=k).astype(np.float32) * (r > 0)
        idx = K.sample_indices(k, steps, np.random.default_rng(r))
        g = np.random.default_rng(r + 7).normal(size=steps).astype(np.float32)
        sizes.add((array_bytes(kseed_download(delta, None)), array_bytes(kseed_upload(idx, g))))
    assert len(sizes) == 1
    down, up = sizes.pop()
    want = K.message_bytes(k, steps, False)
    assert (down, up) == (want["download"], want["upload"])


def test_paper_setting_communicates_under_18_kilobytes_per_client_per_round():
    """K = 4096 seeds and 200 local steps (the paper's defaults): 16,384 B down + 1,600 B up."""
    assert K.message_bytes(4096, 200, pro=False)["total"] < 18 * 1024
    assert K.message_bytes(1024, 200, pro=True)["total"] < 18 * 1024

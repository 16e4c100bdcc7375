"""DP-SGD and its accountant: per-example clipping bounds every example's contribution, the noise
has std sigma*C, the accountant matches an independent numerical integration, and a training run
reports epsilon; methods that cannot run it say so before training."""
import json
import math

import pytest
import torch

import tunelab
from tiny import chat_rows, tiny_model
from tunelab.errors import ConfigError
from tunelab.privacy import PrivacyConfig, PrivateGradients, epsilon
from tunelab.privacy.accountant import log_a
from tunelab.privacy.dpsgd import add_noise, clip_factor, per_example_grads
from tunelab.training.parallel import OneProcess
from tunelab.run.dist import SINGLE


# ----------------------------------------------------------------------------- accountant

def _log_a_by_quadrature(q: float, sigma: float, alpha: int) -> float:
    """log E_{x~N(0,s^2)}[((1-q) + q N(x;1,s^2)/N(x;0,s^2))^alpha], by the trapezoid rule."""
    x = torch.linspace(-40 * sigma, 40 * sigma + 1, 400_001, dtype=torch.float64)
    log_p0 = -x ** 2 / (2 * sigma ** 2) - math.log(sigma * math.sqrt(2 * math.pi))
    ratio = torch.exp((2 * x - 1) / (2 * sigma ** 2))  # N(x;1,s^2) / N(x;0,s^2)
    integrand = torch.exp(log_p0 + alpha * torch.log((1 - q) + q * ratio))
    return math.log(float(torch.trapezoid(integrand, x)))


@pytest.mark.parametrize("q,sigma,alpha", [(0.01, 1.0, 2), (0.05, 0.8, 8), (0.2, 2.0, 16), (0.5, 1.5, 5)])
def test_rdp_closed_form_matches_numerical_integration(q, sigma, alpha):
    assert log_a(q, sigma, alpha) == pytest.approx(_log_a_by_quadrature(q, sigma, alpha), rel=1e-6, abs=1e-9)


def test_rdp_without_subsampling_is_the_gaussian_mechanism():
    for alpha in (2, 7, 30):
        assert log_a(1.0, 1.3, alpha) / (alpha - 1) == pytest.approx(alpha / (2 * 1.3 ** 2))


def test_epsilon_grows_with_steps_and_rate_and_shrinks_with_noise():
    e = lambda q, s, t: epsilon(q, s, t, 1e-5)[0]
    assert e(0.01, 1.0, 100) < e(0.01, 1.0, 1000) < e(0.02, 1.0, 1000)
    assert e(0.01, 2.0, 1000) < e(0.01, 1.0, 1000) < e(0.01, 0.7, 1000)
    assert epsilon(0.01, 0.0, 10, 1e-5)[0] == math.inf and epsilon(0.01, 1.0, 0, 1e-5)[0] == 0.0


# ----------------------------------------------------------------------------- clipping and noise

def _batch(n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(length).expand(n, -1),
            "targets": torch.cat([ids[:, 1:], torch.full((n, 1), -100)], 1)}


def _runner(model):
    from tunelab.objectives.sft import SFT
    parallel = OneProcess(SINGLE, torch.device("cpu"))
    parallel.wrap(model, SFT())
    return parallel


def test_clipped_per_example_norms_are_at_most_c():
    from tunelab.run.context import OUTSIDE_TRAINING
    model = tiny_model()
    params = [p for p in model.parameters()]
    for clip in (1e-3, 0.1, 1.0):
        norms = []
        for grads, _, _ in per_example_grads(_runner(model), _batch(), params, "fp32", "cpu", OUTSIDE_TRAINING):
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            clipped = [g * clip_factor(norm, clip) for g in grads]
            norms.append((norm, math.sqrt(sum(float(g.pow(2).sum()) for g in clipped))))
        assert all(after <= clip * (1 + 1e-6) for _, after in norms)
        assert all(after == pytest.approx(min(before, clip), rel=1e-5) for before, after in norms)


def test_per_example_gradients_are_each_examples_own():
    """The loop's gradient of example i equals the gradient of a batch holding only example i."""
    from tunelab.run.context import OUTSIDE_TRAINING
    model, batch = tiny_model(), _batch()
    params = list(model.parameters())
    got = list(per_example_grads(_runner(model), batch, params, "fp32", "cpu", OUTSIDE_TRAINING))
    for i in (0, 3):
        out = model(input_ids=batch["input_ids"][i:i + 1])
        logits, tgt = out.logits[0], batch["targets"][i]
        loss = torch.nn.functional.cross_entropy(logits[tgt != -100], tgt[tgt != -100])
        want = torch.autograd.grad(loss, params)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got[i][0], want))


def test_noise_std_is_sigma_times_c_within_ten_percent():
    for sigma, clip in ((0.5, 1.0), (1.0, 0.3), (2.0, 2.0)):
        g = [torch.zeros(10_000)]
        add_noise(g, sigma * clip, torch.Generator().manual_seed(1))
        assert float(g[0].std()) == pytest.approx(sigma * clip, rel=0.10)
        assert abs(float(g[0].mean())) < 0.05 * sigma * clip


def test_step_gradient_is_the_noised_mean_of_clipped_example_gradients():
    """With sigma = 0 and a huge C the DP step's gradient is the mean of the examples' own
    gradients; with a tiny C each example contributes exactly C in norm."""
    from tunelab.run.context import StepContext
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    micro = [_batch(3, seed=1), _batch(2, seed=2)]
    pg = PrivateGradients(PrivacyConfig(dp_sgd=True, clip_norm=1e9, noise_multiplier=0.0), 100, 5)
    ctx = StepContext(step=1, total_steps=1, num_micro_batches=2)
    pg.forward_backward(_runner(model), None, micro, opt, _Tc(), "cpu", ctx)
    got = [p.grad.clone() for p in model.parameters()]
    want = [torch.zeros_like(p) for p in model.parameters()]
    for b in micro:
        for grads, _, _ in per_example_grads(_runner(model), b, list(model.parameters()), "fp32", "cpu", ctx):
            for w, g in zip(want, grads):
                w.add_(g / 5)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(got, want))


class _Tc:
    precision = "fp32"


# ----------------------------------------------------------------------------- a training run

def _cfg(tiny_dir, tmp_path, **privacy):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(40)))
    return {"model": {"name": str(tiny_dir)}, "data": {"train": str(data), "eval": None, "max_length": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"steps": 3, "micro_batch_size": 4, "lr": 1e-3, "save_every": 0, "progress": False,
                      "precision": "fp32"},
            "diagnostics": {"after_train": []}, "privacy": {"dp_sgd": True, **privacy}, "output": str(tmp_path / "run")}


def test_training_with_dp_sgd_reports_epsilon(tiny_dir, tmp_path):
    from devicetrap import DeviceTrap
    with DeviceTrap() as trap:  # every tensor DP-SGD makes names its device
        run = tunelab.train(_cfg(tiny_dir, tmp_path, noise_multiplier=1.0, clip_norm=0.5, delta=1e-4))
    assert not trap.found, trap.found
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eps = [x["dp_epsilon"] for x in lines if x.get("kind") == "train"]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
    assert eps[-1] == pytest.approx(epsilon(4 / 40, 1.0, 3, 1e-4)[0])
    assert all(x["dp_delta"] == 1e-4 for x in lines if x.get("kind") == "train")
    from tunelab.report.run_page import write_report
    page = write_report(run).read_text()
    assert 'data-key="dp_epsilon"' in page and f'data-value="{json.dumps(eps[-1])}"' in page  # the report says it


@pytest.mark.parametrize("method", ["greentrainer", "spiel"])
def test_methods_that_cannot_run_dp_sgd_say_so_before_training(tiny_dir, tmp_path, method):
    cfg = _cfg(tiny_dir, tmp_path)
    cfg["method"] = {"name": method}
    with pytest.raises(ConfigError, match=f"privacy.dp_sgd: method '{method}' cannot train with DP-SGD"):
        tunelab.train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_privacy_options_are_validated():
    with pytest.raises(ConfigError, match="clip_norm"):
        PrivacyConfig(dp_sgd=True, clip_norm=0)
    with pytest.raises(ConfigError, match="delta"):
        PrivacyConfig(delta=1.5)

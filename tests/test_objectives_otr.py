"""One-Token Rollout's own properties (arXiv 2509.26313): Eq. 8 by hand, the exact mode's closed
form, DFT at τ = 1 and β = 0, and the warning when most of the loss sits in tokens OTR cannot learn.
The shared objective properties run in tests/test_objectives_sstoken_qtuning.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from test_objectives_sstoken_qtuning import batch_of, make, sft_loss
from tunelab.objectives import trained_logits
from tunelab.objectives.otr import OTRConfig, otr_token_losses

pytestmark = pytest.mark.filterwarnings("ignore:otr. tokens with a hit rate")

# ------------------------------------------------------------------------------ OTR

def _with_argmax_targets(model, batch):
    """The batch with every target replaced by the model's own most likely token."""
    with torch.no_grad():
        logits, _ = trained_logits(model, batch)
    batch = dict(batch, targets=batch["targets"].clone())
    batch["targets"][batch["targets"] != -100] = logits.argmax(-1)
    return batch


@pytest.mark.parametrize("beta", [-0.5, 0.3])
def test_otr_equals_cross_entropy_when_every_sample_hits(model, beta):
    """τ → 0 makes π' one-hot on the argmax; with argmax targets every sample hits, whatever β."""
    batch = _with_argmax_targets(model, batch_of(3))
    out = make("otr", num_samples=8, temperature=1e-4, beta=beta).loss(model, batch)
    assert out.metrics["hit_rate"] == 1.0
    ref, count = sft_loss(model, batch)
    assert out.num_tokens == count
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-6, atol=1e-6)
    params = list(model.parameters())
    for g, r in zip(torch.autograd.grad(out.loss_sum, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_otr_exact_is_the_mean_of_many_samples():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 12) * 2, torch.randint(0, 12, (6,))
    cfg = dict(temperature=1.5, beta=-0.2)
    exact, _ = otr_token_losses(logits, targets, OTRConfig(mode="exact", **cfg))
    K = 20000
    mc, _ = otr_token_losses(logits, targets, OTRConfig(mode="mc", num_samples=K, **cfg))
    # σ of one sample's term r log π(a), from the exact distribution
    logp, q = logits.log_softmax(-1), (logits / 1.5).softmax(-1)
    r = torch.full_like(q, -0.2).scatter(1, targets[:, None], 1.0)
    second = (q * (r * logp) ** 2).sum(-1)
    sigma = (second - exact ** 2).clamp_min(0).sqrt() / math.sqrt(K)
    assert ((mc - exact).abs() < 4 * sigma + 1e-6).all()


def test_otr_exact_gradient_is_the_mean_of_sampled_gradients():
    torch.manual_seed(1)
    base, targets = torch.randn(3, 8), torch.randint(0, 8, (3,))
    grads = []
    for cfg in (OTRConfig(mode="exact", temperature=2.0), OTRConfig(num_samples=40000, temperature=2.0)):
        logits = base.clone().requires_grad_()
        otr_token_losses(logits, targets, cfg)[0].sum().backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=0.02, rtol=0)


def test_otr_exact_at_tau_one_beta_zero_is_dft():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 10), torch.randint(0, 10, (5,))
    losses, hits = otr_token_losses(logits, targets, OTRConfig(mode="exact", beta=0.0))
    logp = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(losses, -(logp.exp() * logp))
    torch.testing.assert_close(hits, logp.exp())


def test_otr_beta_zero_weights_cross_entropy_by_hit_rate():
    torch.manual_seed(0)
    base, targets = torch.randn(5, 6), torch.randint(0, 6, (5,))
    logits = base.clone().requires_grad_()
    losses, hits = otr_token_losses(logits, targets, OTRConfig(num_samples=16, beta=0.0))
    assert not hits.requires_grad and (hits > 0).any()
    ce = F.cross_entropy(base, targets, reduction="none")
    torch.testing.assert_close(losses, hits * ce)
    losses.sum().backward()
    ref = base.clone().requires_grad_()
    (hits * F.cross_entropy(ref, targets, reduction="none")).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_otr_mc_is_equation_8_on_fixed_samples(monkeypatch):
    """Eq. 8 by hand on one position: V = 4, target 2, the K = 4 samples fixed to [2, 0, 2, 1], β = -0.3:
    L = -(1/4)(log π2 + β log π0 + log π2 + β log π1), and ∂L/∂z = -(1/4) Σ_k R_k (e_{a_k} - π).
    Catches a flipped β and a dropped rollout (β) term; the β = 0 and all-hit tests cannot."""
    import tunelab.objectives.otr as otr
    samples = torch.tensor([[2, 0, 2, 1]])
    monkeypatch.setattr(otr.torch, "multinomial", lambda q, k, replacement: samples)
    z = torch.tensor([[0.5, -1.0, 2.0, 0.25]], requires_grad=True)
    loss, hits = otr_token_losses(z, torch.tensor([2]), OTRConfig(num_samples=4, beta=-0.3))
    p = torch.exp(torch.tensor([0.5, -1.0, 2.0, 0.25])) / torch.exp(torch.tensor([0.5, -1.0, 2.0, 0.25])).sum()
    logp = p.log()
    expected = -(logp[2] - 0.3 * logp[0] + logp[2] - 0.3 * logp[1]) / 4
    torch.testing.assert_close(loss, expected.reshape(1))
    assert hits.tolist() == [0.5]
    loss.sum().backward()
    eye = torch.eye(4)
    by_hand = -sum(r * (eye[a] - p) for r, a in zip([1.0, -0.3, 1.0, -0.3], [2, 0, 2, 1])) / 4
    torch.testing.assert_close(z.grad[0], by_hand)


@pytest.mark.parametrize("beta", [-0.1, -0.5, 0.4])
def test_otr_exact_closed_form_and_its_gradient_is_dft_times_one_minus_beta(beta):
    """Reviewer 2's closed form with β ≠ 0 (τ = 2): E[L] = -π'(x) log π(x) - β Σ_{a≠x} π'(a) log π(a);
    and at τ = 1 its gradient is exactly (1 - β) times DFT's (reviewer 1: β only rescales the LR).
    A flipped β gives (1 + β), a dropped β term gives 1: both fail."""
    torch.manual_seed(3)
    base, targets = torch.randn(5, 7) * 2, torch.randint(0, 7, (5,))
    losses, _ = otr_token_losses(base, targets, OTRConfig(mode="exact", beta=beta, temperature=2.0))
    logp, q = base.log_softmax(-1), (base / 2.0).softmax(-1)
    hit = F.one_hot(targets, 7).bool()
    expected = -(q * logp).masked_fill(~hit, 0).sum(-1) - beta * (q * logp).masked_fill(hit, 0).sum(-1)
    torch.testing.assert_close(losses, expected)
    otr_z, dft_z = base.clone().requires_grad_(), base.clone().requires_grad_()
    otr_token_losses(otr_z, targets, OTRConfig(mode="exact", beta=beta))[0].sum().backward()
    lp = dft_z.log_softmax(-1).gather(1, targets[:, None])
    (-(lp.detach().exp() * lp)).sum().backward()
    torch.testing.assert_close(otr_z.grad, (1 - beta) * dft_z.grad)


def test_otr_starved_share_weighs_tokens_by_their_cross_entropy():
    """Few starved tokens can hold most of the loss: 1 of 4 tokens below the hit threshold, holding
    3.0 of the batch's 3.0 + 3 x 0.1 cross-entropy, is a share of 3/3.3, over the threshold; by count
    it would be 25%. With the loss spread evenly the same token holds 25% and no warning is due."""
    import warnings

    from tunelab.objectives.otr import STARVED_SHARE, starved_share, starved_warning

    hits = torch.tensor([0.05, 0.9, 0.8, 0.95])
    assert starved_share(hits, torch.tensor([3.0, 0.1, 0.1, 0.1])) == pytest.approx(3.0 / 3.3)
    assert starved_share(hits, torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(0.25) and 0.25 < STARVED_SHARE
    assert starved_share(hits, torch.zeros(4)) == 0.0
    with pytest.warns(UserWarning, match="hold 91%"):
        starved_warning(3.0 / 3.3, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        starved_warning(0.25, 1.0)


def test_otr_warns_once_when_the_model_finds_most_targets_unlikely(model):
    """A random tiny model gives each target ~1/V: OTR cannot learn it (DFT-like weighting), and says so
    on the first batch only; targets the model already predicts raise no warning."""
    obj = make("otr", num_samples=16)
    with pytest.warns(UserWarning, match="otr: tokens with a hit rate below 0.1 hold .* cross-entropy"):
        obj.loss(model, batch_of(3))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj.loss(model, batch_of(3))  # once per run
        make("otr", num_samples=8, temperature=1e-4).loss(model, _with_argmax_targets(model, batch_of(3)))

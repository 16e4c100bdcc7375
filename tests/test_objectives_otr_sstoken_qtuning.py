"""OTR, ssToken and Q-Tuning: the shared objective properties and each paper's own."""
import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.data import collate
from tunelab.errors import ConfigError
from tunelab.objectives import OBJECTIVES, trained_logits
from tunelab.objectives._segments import segment_ids
from tunelab.objectives.otr import OTRConfig, otr_token_losses
from tunelab.objectives.qtuning import bisect_quadrants, quadrant_masks, smoothed_scores, top_up
from tunelab.objectives.sstoken import keep_counts, select_tokens
from tunelab.run.context import StepContext

NAMES = ["otr", "sstoken", "qtuning"]
pytestmark = pytest.mark.filterwarnings("ignore:(qtuning. a micro-batch|sstoken reads attention|otr. [0-9])")


from tiny import random_examples as examples  # noqa: E402


def batch_of(n=3, packing=True, **kw):
    return collate(examples(n, **kw), packing=packing, pad_id=0)


def make(name, **options):
    return OBJECTIVES.get(name)(OBJECTIVES.get(name).Config(**options))


def sft_loss(model, batch):
    logits, targets = trained_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


# ------------------------------------------------------------------------------ shared properties

def test_segment_ids_packed_and_padded():
    packed, padded = batch_of(3, True), batch_of(3, False)
    assert segment_ids(packed).tolist() == [[0] * 6 + [1] * 10 + [2] * 14]
    seg = segment_ids(padded)
    assert seg.tolist() == [[0] * 6 + [-1] * 8, [1] * 10 + [-1] * 4, [2] * 14]
    no_cu = {k: v for k, v in packed.items() if k != "cu_seqlens"}
    assert torch.equal(segment_ids(no_cu), segment_ids(packed))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("size", [1, 3])
def test_finite_loss_and_gradients_only_where_trained(name, packing, size, model):
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1" in n)
    out = OBJECTIVES.get(name)().loss(model.train(), batch_of(size, packing))
    (out.loss_sum / out.num_tokens).backward()
    assert torch.isfinite(out.loss_sum) and out.num_tokens > 0
    assert out.metrics and all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("layers.1" in n), n


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed_and_packed_equals_padded(name, model):
    results = []
    for packing in (True, True, False):
        torch.manual_seed(0)
        out = OBJECTIVES.get(name)().loss(model, batch_of(5, packing))
        results.append((out.loss_sum.detach(), out.num_tokens, out.metrics))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1:] == results[1][1:]
    torch.testing.assert_close(results[0][0], results[2][0], rtol=1e-4, atol=1e-4)
    assert results[0][1] == results[2][1]


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_raise_config_error(name):
    bad = {"otr": [{"num_samples": 0}, {"temperature": 0.0}, {"beta": 1.0}, {"mode": "x"}],
           "sstoken": [{"keep_ratio": 0.0}, {"gamma": 1.5}, {"history": "x"}, {"ema_decay": 1.0}],
           "qtuning": [{"sample_ratio": 0.0}, {"token_ratio": 1.5}, {"neighbor_weight": -0.1}, {"prune": "x"}]}
    for options in bad[name]:
        with pytest.raises(ConfigError, match=next(iter(options))):
            OBJECTIVES.get(name).Config(**options)


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


# ------------------------------------------------------------------------------ ssToken

@pytest.mark.parametrize("packing", [True, False])
def test_sstoken_keeps_exactly_the_fraction_and_never_a_prompt_token(model, packing):
    batch = batch_of(4, packing, prompt=3)
    obj = make("sstoken", keep_ratio=0.6)
    kept = obj.kept_positions(model, batch)
    trained = batch["targets"] != -100
    assert not (kept & ~trained).any()
    seg = segment_ids(batch)
    for i in range(4):
        n = int((trained & (seg == i)).sum())
        assert int((kept & (seg == i)).sum()) == math.ceil(0.6 * n - 1e-9)
    out = obj.loss(model, batch)
    assert out.num_tokens == int(kept.sum())


def test_sstoken_keep_all_is_sft(model):
    batch = batch_of(3)
    out = make("sstoken", keep_ratio=1.0).loss(model, batch)
    ref, count = sft_loss(model, batch)
    assert out.num_tokens == count
    torch.testing.assert_close(out.loss_sum, ref)


def test_sstoken_gamma_one_keeps_top_excess_loss(model):
    from tiny import tiny_model
    batch = batch_of(3)
    obj = make("sstoken", gamma=1.0)
    obj._history = tiny_model(seed=1)  # a history whose losses differ from the model's
    kept = obj.kept_positions(model, batch)
    trained = batch["targets"] != -100
    with torch.no_grad():
        cur = F.cross_entropy(*trained_logits(model, batch), reduction="none")
        his = F.cross_entropy(*trained_logits(obj._history, batch), reduction="none")
    rel, seg = his - cur, segment_ids(batch)[trained]
    for i in range(3):
        r = rel[seg == i]
        expect = torch.zeros_like(r, dtype=torch.bool)
        expect[r.topk(math.ceil(0.6 * r.numel())).indices] = True
        assert torch.equal(kept[trained][seg == i], expect)


def test_sstoken_gamma_zero_keeps_top_prompt_attention(model):
    """Reference: each example alone, last-layer attention of each trained row summed over the keys
    whose (unshifted) label is -100, head-averaged; the packed batch must select the same tokens."""
    exs = examples(3, prompt=5)
    batch = collate(exs, packing=True, pad_id=0)
    kept = make("sstoken", gamma=0.0).kept_positions(model, batch)  # also switches model to eager
    assert model.config._attn_implementation == "eager"
    start = 0
    for ex in exs:
        att = model(torch.tensor([ex.input_ids]), output_attentions=True).attentions[-1][0].mean(0)  # (T, T)
        labels = torch.tensor(ex.labels)
        mass = att[:, labels == -100].sum(-1)  # (T,)
        rows = torch.nonzero(torch.tensor(ex.labels[1:] + [-100]) != -100).squeeze(1)
        expect = rows[mass[rows].topk(math.ceil(0.6 * rows.numel())).indices]
        got = torch.nonzero(kept[0, start:start + len(ex)]).squeeze(1)
        assert sorted(got.tolist()) == sorted(expect.tolist())
        start += len(ex)


def test_select_tokens_per_example_topk():
    assert keep_counts(torch.tensor([1, 2, 5, 10, 7]), 0.6).tolist() == [1, 2, 3, 6, 5]
    assert keep_counts(torch.tensor([10]), 0.7).tolist() == [7]  # 0.7 * 10 = 7.000000000000001
    rel = torch.tensor([0.0, 5.0, 1.0, 9.0, 9.0, 3.0, 2.0])
    attn = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    seg = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    # γ = 0.5: example 0 scores .45 .5 .05 -> keep 2 of 3: idx 0, 1; example 1: .5 .5 0 .5+ -> keep 3 of 4
    kept = select_tokens(rel, attn, seg, keep_ratio=0.6, gamma=0.5)
    assert kept.tolist() == [True, True, False, True, True, False, True]


def test_sstoken_gradient_only_through_kept_tokens(model):
    batch = batch_of(3)
    obj = make("sstoken")
    kept = obj.kept_positions(model, batch)[batch["targets"] != -100]
    captured = {}

    def hook(_mod, _inp, out):
        out.retain_grad()
        captured["logits"] = out

    handle = model.get_output_embeddings().register_forward_hook(hook)
    obj.loss(model, batch).loss_sum.backward()
    handle.remove()
    row_has_grad = captured["logits"].grad.abs().sum(-1) > 0
    assert torch.equal(row_has_grad, kept) and 0 < kept.sum() < kept.numel()


def _step(model, scale=0.01):
    """Stand-in for an optimizer step: change every trainable weight in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_sstoken_ema_history_moves_once_per_step(model):
    obj = make("sstoken", history="ema", ema_decay=0.9)
    batch = batch_of(2)
    obj.loss(model, batch, StepContext(step=1, total_steps=2, num_micro_batches=2))  # the history = the model
    obj.loss(model, batch, StepContext(step=1, total_steps=2, micro_batch=1, num_micro_batches=2))
    old = {n: p.detach().clone() for n, p in obj._history.named_parameters()}
    assert all(torch.equal(old[n], p) for n, p in model.named_parameters())  # step 1 moved nothing
    _step(model)
    obj.loss(model, batch, StepContext(step=2, total_steps=2, num_micro_batches=2))
    obj.loss(model, batch, StepContext(step=2, total_steps=2, micro_batch=1, num_micro_batches=2))  # no 2nd update
    for n, p in model.named_parameters():
        torch.testing.assert_close(dict(obj._history.named_parameters())[n], 0.9 * old[n] + 0.1 * p.detach(),
                                   rtol=1e-6, atol=1e-7)
    state = obj.state_dict()
    assert state and all(k.startswith("history.") for k in state)
    fresh = make("sstoken", history="ema", ema_decay=0.9)
    fresh.load_state_dict(state)
    fresh.setup(model, None)
    for n, h in fresh._history.named_parameters():
        assert torch.equal(h, dict(obj._history.named_parameters())[n])


def test_sstoken_frozen_history_is_the_initial_model(model):
    obj = make("sstoken", gamma=1.0)
    obj.setup(model, None)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, 0.05)
    obj.loss(model, batch_of(2))
    for n, h in obj._history.named_parameters():
        assert torch.equal(h, initial[n])
    assert obj.state_dict() == {}


# ------------------------------------------------------------------------------ Q-Tuning

def test_quadrants_of_four_hand_placed_samples():
    # A: high error, low uncertainty (Q2); B: low, high (Q4); C: high, high (Q1); D: low, low (Q3)
    ppl = torch.tensor([10.0, 1.0, 9.0, 2.0], dtype=torch.float64)
    ent = torch.tensor([1.0, 10.0, 8.0, 2.0], dtype=torch.float64)
    q2, q4 = quadrant_masks(ppl, ent, 0.25)
    assert q2.tolist() == [True, False, False, False] and q4.tolist() == [False, True, False, False]
    q2, q4, _ = bisect_quadrants(ppl, ent, 0.5)
    assert q2.tolist() == [True, False, False, False] and q4.tolist() == [False, True, False, False]
    q2, q4 = top_up(ppl, ent, q2, q4, 0.75)  # C has s2 = 8/9 - 7/9 > |s2 of D| = 0: joins as Q2
    assert q2.tolist() == [True, False, True, False] and q4.tolist() == [False, True, False, False]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.9])
def test_bisection_properties(ratio):
    g = torch.Generator().manual_seed(3)
    ppl, ent = torch.rand(16, generator=g, dtype=torch.float64) * 50, torch.rand(16, generator=g, dtype=torch.float64)
    q2, q4, a = bisect_quadrants(ppl, ent, ratio)
    assert not (q2 & q4).any() and 0 < a <= 0.49
    lv = torch.tensor([a, 1 - a], dtype=torch.float64)
    (ppl_lo, ppl_hi), (ent_lo, ent_hi) = torch.quantile(ppl, lv), torch.quantile(ent, lv)
    assert ((ppl[q2] > ppl_hi) & (ent[q2] <= ent_lo)).all() and ((ppl[q4] <= ppl_lo) & (ent[q4] > ent_hi)).all()
    q2b, q4b = top_up(ppl, ent, q2, q4, ratio)
    assert not (q2b & q4b).any() and (q2b >= q2).all() and (q4b >= q4).all()
    assert int((q2b | q4b).sum()) >= max(1, round(ratio * 16))


def test_smoothed_score_by_hand():
    # one packed row, two examples: [p p r r p | p r r]; token PPL 0 where there is no target
    ppl = torch.tensor([[0.0, 0.0, 2.0, 4.0, 0.0, 0.0, 3.0, 5.0]])
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    s = smoothed_scores(ppl, seg, 0.5)
    assert s[0, [2, 3, 6, 7]].tolist() == [3.0, 3.0, 4.0, 4.0]  # 0.5*2 + 0.5*(0+4); right edge adds 0
    # the last response token of one example never borrows from the next example's first
    s = smoothed_scores(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0, 0, 0, 1, 1]]), 0.5)
    assert s[0].tolist() == [0.5, 1.5, 1.5, 3.5, 3.5]


@pytest.mark.parametrize("packing", [True, False])
def test_qtuning_full_budget_is_sft(model, packing):
    batch = batch_of(5, packing)
    out = make("qtuning", sample_ratio=1.0, token_ratio=1.0).loss(model, batch)
    ref, count = sft_loss(model, batch)
    assert out.num_tokens == count
    torch.testing.assert_close(out.loss_sum, ref)
    p = _plan(sample_ratio=1.0, token_ratio=1.0)
    assert p.kept.all() and int((p.q2 | p.q4).sum()) == p.q2.numel()


def _plan(n=8, seed=0, **options):
    """A Q-Tuning plan on hand-made per-token CE/entropy for n examples (packed)."""
    batch = batch_of(n)
    trained = batch["targets"] != -100
    g = torch.Generator().manual_seed(seed)
    N = int(trained.sum())
    ce, ent = torch.rand(N, generator=g) * 6, torch.rand(N, generator=g) * 5
    return make("qtuning", **options).plan(ce, ent, batch)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("token_ratio", [0.5, 0.8])
def test_qtuning_prunes_only_misconception_samples_to_the_budget(seed, token_ratio):
    p = _plan(seed=seed, sample_ratio=0.5, token_ratio=token_ratio)
    kept_sample = (p.q2 | p.q4)[p.seg]
    assert p.kept[p.q4[p.seg]].all()  # calibration samples stay whole
    assert not p.kept[~kept_sample].any()  # Q1/Q3 samples are dropped
    pruned = kept_sample & ~p.kept
    assert p.q2[p.seg][pruned].all()  # pruned tokens lie in Q2 samples
    for s in torch.nonzero(p.q2).squeeze(1):
        assert p.kept[p.seg == s].any()  # a kept sample keeps at least one token
    n_ks = int(kept_sample.sum())
    spare = int(p.q2[p.seg].sum()) - int(p.q2.sum())  # Q2 tokens that may go (one stays per sample)
    assert int(p.kept.sum()) == n_ks - max(0, min(n_ks - p.target, spare))
    if 0 <= n_ks - p.target <= spare:
        assert int(p.kept.sum()) == p.target


def test_qtuning_prunes_the_highest_smoothed_ppl_first():
    hi = _plan(sample_ratio=1.0, token_ratio=0.5, neighbor_weight=0.0)
    lo = _plan(sample_ratio=1.0, token_ratio=0.5, neighbor_weight=0.0, prune="low")
    assert int(hi.kept.sum()) == int(lo.kept.sum())
    in_q2 = hi.q2[hi.seg]
    ce = torch.rand(in_q2.numel(), generator=torch.Generator().manual_seed(0)) * 6  # _plan's CE (λ = 0)
    protected = torch.zeros_like(in_q2)
    for s in torch.nonzero(hi.q2).squeeze(1):
        idx = torch.nonzero(hi.seg == s).squeeze(1)
        protected[idx[ce[idx].argmin()]] = True
    dropped, spared = in_q2 & ~hi.kept, in_q2 & hi.kept & ~protected
    assert dropped.any() and (not spared.any() or ce[dropped].min() >= ce[spared].max())
    assert not torch.equal(hi.kept, lo.kept)


def test_qtuning_single_sample_micro_batch(model):
    with pytest.warns(UserWarning, match="degenerate"):
        out = make("qtuning").loss(model, batch_of(1))
    assert out.metrics["q2_samples"] == 1.0 and out.num_tokens >= 1


def test_example_configs_load():
    from pathlib import Path

    from tunelab import config as C
    root = Path(__file__).parent.parent / "examples" / "objectives"
    for name in NAMES:
        cfg = C.load(root / f"{name}.yaml")
        assert cfg.objective.name == name and isinstance(cfg.objective.options, OBJECTIVES.get(name).Config)


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

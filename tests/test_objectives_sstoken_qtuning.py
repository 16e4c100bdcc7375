"""ssToken and Q-Tuning, and the shared objective properties of OTR, ssToken and Q-Tuning (OTR's own
properties: tests/test_objectives_otr.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.data import collate
from tunelab.errors import ConfigError
from tunelab.objectives import OBJECTIVES, trained_logits
from tunelab.objectives._segments import segment_ids
from tunelab.objectives.qtuning import bisect_quadrants, quadrant_masks, smoothed_scores, top_up
from tunelab.objectives.sstoken import keep_counts, select_tokens
from tunelab.run.context import StepContext

NAMES = ["otr", "sstoken", "qtuning"]
pytestmark = pytest.mark.filterwarnings("ignore:(qtuning. a micro-batch|sstoken reads attention|otr. tokens with a hit rate)")


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

"""Side-effect diagnostics: TuCo, KL drift, intruder dimensions, knowledge probes, retained
knowledge with conjugate prompts (config and `tunelab diagnose` end to end: test_diagnose_runs.py)."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

from tunelab.diagnostics._generation import right_padded
from tunelab.diagnostics._probes import Probe
from tunelab.diagnostics._transforms import TRANSFORMS
from tunelab.diagnostics.forgetting import retention, token_kl
from tunelab.diagnostics.intruder import IntruderDimensions, count_intruders, matrix_rows
from tunelab.diagnostics.tuco import decompose, tuco_forward

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]


def perturbed(model, scale=0.05, seed=1, only=None):
    """A copy of `model` with Gaussian noise on every parameter (or those whose name contains `only`)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if only is None or only in n:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def batch():
    ids, mask = right_padded(PROMPTS, 0)
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- TuCo

def test_tuco_is_zero_for_the_base_against_itself(model):
    dec = decompose(model, model, **batch())
    assert torch.equal(dec.ftc, torch.zeros_like(dec.ftc)) and torch.equal(dec.tuco, torch.zeros(3))
    assert (dec.ptc.norm(dim=-1) > 0).all()


@pytest.mark.parametrize("only", [None, "layers"], ids=["all-weights-incl-embeddings", "decoder-layers-only"])
def test_tuco_forward_alpha_0_is_base_and_alpha_1_is_tuned(model, only):
    tuned, b = perturbed(model, only=only), batch()
    keep = b["attention_mask"].bool()
    with torch.no_grad():
        base_logits, tuned_logits = model(**b).logits, tuned(**b).logits
    assert (base_logits - tuned_logits)[keep].abs().max() > 0.1  # the two models do differ
    torch.testing.assert_close(tuco_forward(model, tuned, b, 0.0)[keep], base_logits[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tuco_forward(model, tuned, b, 1.0)[keep], tuned_logits[keep], atol=1e-5, rtol=1e-5)
    half = tuco_forward(model, tuned, b, 0.5)[keep]
    assert not torch.allclose(half, base_logits[keep]) and not torch.allclose(half, tuned_logits[keep])


def test_tuco_forward_on_a_lora_model(model):
    """The tuned model may be a method-transformed model (LoRA layers swapped in)."""
    from tunelab.methods import METHODS

    method = METHODS.get("lora")(METHODS.get("lora").Config(r=4))
    tuned = method.apply(copy.deepcopy(model))
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    b = batch()
    keep = b["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(tuco_forward(model, tuned, b, 0.0)[keep], model(**b).logits[keep],
                                   atol=1e-5, rtol=1e-5)
        with method.disabled(tuned):
            assert decompose(model, tuned, **b).tuco.max() == 0
    assert (decompose(model, tuned, **b).tuco > 0).all()


def test_tuco_grows_with_the_size_of_the_change(model):
    delta = perturbed(model, scale=1.0, only="layers")
    values = []
    for t in (0.01, 0.03, 0.1):
        tuned = copy.deepcopy(model)
        with torch.no_grad():
            for (n, p), d, b in zip(tuned.named_parameters(), delta.parameters(), model.parameters()):
                p.copy_(b + t * (d - b))
        values.append(decompose(model, tuned, **batch()).tuco)
    assert all(((0 < v) & (v < 1)).all() for v in values)
    assert (values[0] < values[1]).all() and (values[1] < values[2]).all()


def test_ftc_is_zero_in_layers_that_did_not_change(model):
    dec = decompose(model, perturbed(model, only="layers.1."), **batch())
    assert torch.equal(dec.ftc_norms[0], torch.zeros(3)) and (dec.ftc_norms[1] > 0).all()


def method_rows():
    from test_methods import METHOD_ROWS
    return METHOD_ROWS


@pytest.mark.parametrize("row", method_rows(), ids=[r[0] for r in method_rows()])
def test_every_method_can_be_diagnosed(model, row):
    """KL, TuCo and (where the method merges) alpha-steering and intruder counts run on every method
    of the shared table; alpha = 0 is the base model for methods that merge into plain weights."""
    from test_methods import make
    from tunelab.methods._shared import select_linears

    _, name, options, _ = row
    method = make(name, options)
    tuned = method.apply(copy.deepcopy(model)).eval()
    with torch.no_grad():
        for p in (p for p in tuned.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    kl = token_kl(model, tuned, [[5, 6, 7]], [[8, 9]], pad_id=0)
    assert kl[0].shape == (2,) and (kl[0] >= -1e-6).all() and kl[0].sum() > 0
    tuco = decompose(model, tuned, **batch()).tuco
    if options.get("only") == "embeddings_head":  # TuCo counts blocks only: a change outside them is 0
        assert (tuco == 0).all()
    else:
        assert ((0 < tuco) & (tuco < 1)).all(), "the method changes what its blocks add"
    if method.supports_merge:
        b = batch()
        keep = b["attention_mask"].bool()
        torch.testing.assert_close(tuco_forward(model, tuned, b, 0.0)[keep], model(**b).logits[keep].detach(),
                                   atol=1e-5, rtol=1e-5)
        merged = method.merge(tuned)
        rows = matrix_rows(model, merged, select_linears(model, ["all-linear"]), 10, 0.5)
        assert len(rows) == 14 and any(r[3] for r in rows) != (options.get("only") == "embeddings_head")
        assert all((r[4] > 0) == (r[5] < 0.5) for r in rows), "a count disagrees with its best cosine"


# ----------------------------------------------------------------------------- KL drift

def test_kl_drift_is_zero_for_the_base_against_itself_and_positive_otherwise(model):
    prompts, replies = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]]
    same = token_kl(model, model, prompts, replies, pad_id=0, batch_size=1)
    assert [k.shape[0] for k in same] == [4, 1] and all(torch.equal(k, torch.zeros_like(k)) for k in same)
    moved = token_kl(model, perturbed(model), prompts, replies, pad_id=0, batch_size=2)
    assert all((k > 0).all() for k in moved)


def test_kl_is_the_same_batched_or_alone(model):
    tuned = perturbed(model)
    prompts, replies = [[5, 6, 7], [8, 9, 30, 31, 32]], [[10, 11], [14, 15, 16]]
    a, b = token_kl(model, tuned, prompts, replies, 0, 1), token_kl(model, tuned, prompts, replies, 0, 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- intruder dimensions

def planted(n=64, scale=100.0, seed=0):
    """W and W + s u v^T where u (v) is the normalised sum of all of W's left (right) singular
    vectors: |cos(u, u_i)| = 1/sqrt(n) = 0.125 for every base vector, far below epsilon = 0.5."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g)
    u0, s0, vh0 = torch.linalg.svd(w)
    u, v = u0.sum(1) / n ** 0.5, vh0.sum(0) / n ** 0.5
    return w, w + scale * s0[0] * torch.outer(u, v), u


def test_no_intruders_without_change_or_with_a_tiny_change():
    w, _, _ = planted()
    g = torch.Generator().manual_seed(1)
    assert count_intruders(w, w.clone()) == 0
    assert count_intruders(w, w + 1e-4 * torch.randn(w.shape, generator=g)) == 0


def test_a_planted_high_norm_direction_is_an_intruder():
    w, tuned, u = planted()
    from tunelab.diagnostics.intruder import best_cosines

    cos = best_cosines(w, tuned, 10)
    assert cos[0] < 0.2 and count_intruders(w, tuned) >= 1  # the top tuned vector is the planted one
    assert count_intruders(w, planted(scale=1e-6)[1]) == 0
    assert count_intruders(-w, -tuned) == count_intruders(w, tuned)  # |cos|: signs do not matter


def test_intruders_are_counted_per_matrix_module_and_layer(model):
    tuned = copy.deepcopy(model)
    w = tuned.model.layers[1].mlp.up_proj.weight  # (128, 64)
    u0, s0, vh0 = torch.linalg.svd(w.detach())
    with torch.no_grad():
        w.add_(100 * s0[0] * torch.outer(u0.sum(1) / 8, vh0.sum(0) / 8))
    from tunelab.methods._shared import select_linears
    rows = matrix_rows(model, tuned, select_linears(model, ["all-linear"]), 10, 0.5)
    changed = [r for r in rows if r[3]]
    assert [r[0] for r in changed] == ["model.layers.1.mlp.up_proj"]
    assert changed[0][1:3] == [1, "up_proj"] and changed[0][4] >= 1
    assert sum(r[4] for r in rows) == changed[0][4]


def test_intruder_is_not_applicable_to_methods_that_cannot_merge():
    ctx = SimpleNamespace(method=SimpleNamespace(supports_merge=False),
                          cfg=SimpleNamespace(method=SimpleNamespace(name="x")))
    assert "cannot merge" in IntruderDimensions().not_applicable(ctx)
    ctx.method.supports_merge = True
    assert IntruderDimensions().not_applicable(ctx) is None


# ----------------------------------------------------------------------------- knowledge (FineTuneBench)

def test_a_lookup_table_model_memorises_but_does_not_generalise():
    from tunelab.data.builtin import load_builtin
    from tunelab.diagnostics.knowledge import knowledge_scores, probe_sets, question

    table = {question(r): r.messages[1]["content"] for r in load_builtin("builtin:facts?n_entities=6&split=train")}
    lookup = lambda qs: [table.get(q, "I do not know.") for q in qs]  # noqa: E731
    scores, _ = knowledge_scores(lookup, probe_sets("builtin:facts?n_entities=6", 100))
    assert scores["verbatim_accuracy"] == 1.0 and scores["rephrased_accuracy"] == 0.0
    assert scores["updated_new_accuracy"] == 0.0 and scores["updated_old_accuracy"] == 1.0
    updates = {question(r): r.messages[1]["content"]
               for r in load_builtin("builtin:facts?n_entities=6&split=update_train")}
    scores, _ = knowledge_scores(lambda qs: [updates.get(q) or table.get(q, "") for q in qs],
                                 probe_sets("builtin:facts?n_entities=6", 100))
    assert scores["updated_new_accuracy"] == 1.0 and scores["updated_old_accuracy"] == 0.0


def test_knowledge_world_follows_the_run_data():
    from tunelab.diagnostics.knowledge import world_spec

    assert world_spec(None, "builtin:facts?n_entities=7&split=train&seed=3") == "builtin:facts?n_entities=7&seed=3"
    assert world_spec(None, "data.jsonl") == "builtin:facts"
    assert world_spec("builtin:facts?seed=2", "builtin:facts?n_entities=7") == "builtin:facts?seed=2"


# ----------------------------------------------------------------------------- forgetting: probes

PROBES = [Probe(f"What is item {i}?", (f"answer{i}",), "cat" + str(i % 2)) for i in range(8)]


def table_model(knows: set[int], form=lambda q: q):
    """A fake model that answers probe i correctly when i in `knows` and the question is in `form`."""
    answers = {form(p.question): f"It is answer{i}." for i, p in enumerate(PROBES) if i in knows}
    return lambda qs: [answers.get(q, "No idea.") for q in qs]


def test_retained_knowledge_keeps_exactly_the_probes_the_base_answers():
    base_knows, tuned_knows = {0, 2, 3, 5, 7}, {0, 1, 3, 4}
    up = TRANSFORMS["uppercase"]
    found = retention(table_model(base_knows), table_model(tuned_knows), PROBES, up)
    assert found.details["kept_probes"] == [PROBES[i].question for i in sorted(base_knows)]
    s = found.summary
    assert s["base_probe_accuracy"] == 5 / 8 and s["num_probes_kept"] == 5
    assert s["retained_accuracy"] == 2 / 5  # probes 0 and 3: what the tuned model knows of the kept ones
    assert s["num_probes_lost"] == 3 and s["conjugate_tuned_accuracy"] == 0.0


def test_no_probe_kept_is_not_measured_rather_than_zero_accuracy():
    # a base that answers none of the probes leaves nothing to retain: None ("n/a"), never 0.0
    s = retention(table_model(set()), table_model({0, 1}), PROBES, TRANSFORMS["uppercase"]).summary
    assert s["base_probe_accuracy"] == 0.0 and s["num_probes_kept"] == 0
    for key in ("retained_accuracy", "conjugate_base_accuracy", "conjugate_tuned_accuracy", "recovered_by_conjugate"):
        assert s[key] is None, key
    from tunelab.diagnostics._runner import _brief

    line = _brief({"name": "forgetting", "summary": s | {"kl_drift": 0.125}, "details": {}})
    assert "retained_accuracy n/a" in line and "kl_drift 0.125" in line


def conjugated_model(plain_knows: set[int], upper_knows: set[int]):
    """A fake model that knows some probes when asked plainly and others when asked in upper case."""
    plain, upper = table_model(plain_knows), table_model(upper_knows, str.upper)
    return lambda qs: [(upper if q.isupper() else plain)([q])[0] for q in qs]


def test_conjugate_prompts_separate_suppressed_from_lost_knowledge():
    # the tuned model lost probes 2 and 3 in plain form, but still answers 2 when asked in upper case
    base, tuned = conjugated_model({0, 1, 2, 3}, {0, 1, 2, 3}), conjugated_model({0, 1}, {0, 1, 2})
    s = retention(base, tuned, PROBES[:4], TRANSFORMS["uppercase"]).summary
    assert s["retained_accuracy"] == 0.5 and s["num_probes_lost"] == 2
    assert s["conjugate_base_accuracy"] == 1.0 and s["conjugate_tuned_accuracy"] == 0.75
    assert s["recovered_by_conjugate"] == 0.5


@pytest.mark.parametrize("name", ["piglatin", "uppercase", "leetspeak"])
def test_conjugate_transforms_invert_on_the_probe_questions(name):
    from tunelab.diagnostics.build_probes import candidates

    t = TRANSFORMS[name]
    for q in (c["question"] for c in candidates()):
        assert t.forward(q) != q
        back = t.inverse(t.forward(q))
        if name == "piglatin":
            assert back == q
        elif name == "uppercase":
            assert back.lower() == q.lower()
        else:  # leetspeak: words that keep a letter come back (up to case); "is" -> "15" reads as a number
            assert [w for w in back.lower().split() if not w.strip("?").isdigit()] == \
                   [w for w, f in zip(q.lower().split(), t.forward(q).split()) if not f.strip("?").isdigit()]


def test_builtin_probes_file_is_consistent_with_its_builder():
    from tunelab.diagnostics._probes import BUILTIN_PROBES, load_probes
    from tunelab.diagnostics.build_probes import candidates

    data = json.loads(BUILTIN_PROBES.read_text())
    meta, probes = data["meta"], load_probes()
    assert 0 < len(probes) == meta["kept"] <= 64 and meta["candidates_tried"] == len(candidates())
    assert meta["kept"] <= meta["candidates_correct"] <= meta["candidates_tried"]
    by_question = {c["question"]: c for c in candidates()}
    assert all(p.question in by_question and list(p.answers) == by_question[p.question]["answers"] for p in probes)
    assert {"model", "decoding", "date", "base_accuracy_by_conjugate_form"} <= set(meta)


def test_round_robin_balances_categories():
    from tunelab.diagnostics.build_probes import round_robin

    rows = [{"category": c, "i": i} for i, c in enumerate("aaaaabbc")]
    got = round_robin(rows, 5)
    assert [r["category"] for r in got] == ["a", "b", "c", "a", "b"] and round_robin(rows, 100) != rows
    assert sorted(r["i"] for r in round_robin(rows, 100)) == list(range(8))


def with_top_vector(u1: torch.Tensor) -> torch.Tensor:
    """An 8 x 8 matrix whose top left singular vector is u1 (singular values 10, 1, 0.9, ...)."""
    q, _ = torch.linalg.qr(torch.cat([u1[:, None], torch.randn(8, 7, generator=torch.Generator().manual_seed(0))], 1))
    return q @ torch.diag(torch.tensor([10.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])) @ q.T


@pytest.mark.parametrize("best", [0.4, 0.7])
def test_intruder_criterion_and_its_default_epsilon_by_hand(best):
    """Base diag(8..1) has the unit vectors as left singular vectors; a tuned matrix whose top
    vector is u1 = (-best, r, ..., r) (r = sqrt((1 - best²)/7) < best) has best |cos| = `best` with
    the base. The paper's ε = 0.5 (the default, in IntruderConfig and count_intruders): 0.4 is an
    intruder, 0.7 is not. ε = 0.3 or 0.9 would turn either verdict."""
    from tunelab.diagnostics.intruder import IntruderConfig, best_cosines

    base = torch.diag(torch.arange(8.0, 0.0, -1.0))
    r = ((1 - best ** 2) / 7) ** 0.5
    tuned = with_top_vector(torch.tensor([-best] + [r] * 7))
    torch.testing.assert_close(best_cosines(base, tuned, 1), torch.tensor([best]))
    assert IntruderConfig().epsilon == 0.5
    expected = int(best < 0.5)
    assert count_intruders(base, tuned, top_k=1) == expected
    assert count_intruders(base, tuned, top_k=1, epsilon=IntruderConfig().epsilon) == expected


class _Shift(torch.nn.Module):
    """A residual block x -> x + scale * x + shift (a decoder layer returning a tuple)."""

    def __init__(self, scale: float, shift: list[float]):
        super().__init__()
        self.scale, self.shift = scale, torch.tensor(shift)

    def forward(self, hidden_states, **kwargs):
        return (hidden_states + self.scale * hidden_states + self.shift,)


class _Toy(torch.nn.Module):
    """Embedding (1 token -> (1, 0)), two _Shift blocks, identity norm and a head: a model whose
    PTC and FTC are known by hand."""

    def __init__(self, blocks):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.embed = torch.nn.Embedding(1, 2)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0, 0.0]]))
        self.layers = torch.nn.ModuleList(blocks)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)[0]
        return SimpleNamespace(logits=x)


def test_tuco_by_hand_on_a_known_pair():
    """Base blocks: +(0, 1), then +0.5 x. Tuned blocks: +(1, 1), then +0.5 x + (0, 2). On the tuned
    stream: x1 = (2, 1); PTC = (0, 1) + 0.5 x1 = (1, 1.5); FTC = (1, 0) + (0, 2) = (1, 2);
    TuCo = √5 / (√3.25 + √5) = 0.55364. Swapping base and tuned, or the PTC and FTC roles, or
    scoring the base stream instead of the tuned one, gives another number."""
    base = _Toy([_Shift(0.0, [0.0, 1.0]), _Shift(0.5, [0.0, 0.0])])
    tuned = _Toy([_Shift(0.0, [1.0, 1.0]), _Shift(0.5, [0.0, 2.0])])
    ids = torch.zeros(1, 1, dtype=torch.long)
    dec = decompose(base, tuned, ids)
    torch.testing.assert_close(dec.ptc, torch.tensor([[1.0, 1.5]]))
    torch.testing.assert_close(dec.ftc, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(dec.ftc_norms, torch.tensor([[1.0], [2.0]]))
    torch.testing.assert_close(dec.ptc_norms, torch.tensor([[1.0], [1.25 ** 0.5]]))
    torch.testing.assert_close(dec.tuco, torch.tensor([5 ** 0.5 / (3.25 ** 0.5 + 5 ** 0.5)]))
    assert abs(float(dec.tuco) - 0.55364) < 1e-5

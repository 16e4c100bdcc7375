"""Data stages (tunelab.curate): the properties of each paper's brief, on tiny inputs. Edit spans
and GOT-D are pure functions (property tests); S3FT and pseudo-labelling run against a scripted
model (a Workspace whose generate is a table), so judge and precedence logic is tested exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny import tiny_tokenizer
from tunelab.curate import Workspace, build_stage, run_stage
from tunelab.curate import edit_spans as E
from tunelab.curate import got_d as G
from tunelab.errors import ConfigError, TunelabError

# ----------------------------------------------------------------------------- edit spans

WORDS = st.lists(st.sampled_from(["a", "b", "c", "the", "dog", "x1", "-", "ran."]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(WORDS, WORDS)
def test_edit_spans_round_trip_exactly(src, tgt):
    source, target = " ".join(src), " ".join(tgt)
    edits = E.extract(source, target)
    assert E.apply(source, edits) == target
    assert E.parse_edits(E.format_edits(edits)) == edits
    assert E.apply_model_output(source, E.format_edits(edits)) == target
    E.check(edits, len(src))  # sorted, non-overlapping, inside the source


@settings(max_examples=200, deadline=None)
@given(WORDS, st.data())
def test_random_edit_scripts_apply_and_round_trip(src, data):
    """A random valid edit script applied to a source gives a target whose extracted edits
    reproduce it (not necessarily the same script: alignment may find a shorter one)."""
    n, pos, edits = len(src), 0, []
    while pos <= n and data.draw(st.booleans()):
        start = data.draw(st.integers(pos, n))
        end = data.draw(st.integers(start, n))
        words = tuple(data.draw(st.lists(st.sampled_from(["q", "zz", "the"]), max_size=2)))
        if (start == end and not words) or (edits and start == end == edits[-1].start == edits[-1].end):
            break
        edits.append(E.Edit(start, end, words))
        pos = end if end > start else end + 1
    source = " ".join(src)
    target = E.apply(source, edits)
    assert E.apply(source, E.extract(source, target)) == target


def test_no_change_is_no_edit_and_says_so():
    assert E.extract("the cat sat", "the cat sat") == []
    assert E.format_edits([]) == "NONE" and E.parse_edits("NONE") == []
    assert E.apply_model_output("the  cat sat", "NONE") == "the cat sat"


@pytest.mark.parametrize("output", ["", "hello", "1", "x y z", "3 1 a", "0 99 a", "2 3 a\n1 2 b", "-1 0 a"])
def test_malformed_model_output_falls_back_to_the_source(output):
    assert E.apply_model_output("the cat sat on the mat", output) == "the cat sat on the mat"


@pytest.mark.parametrize("edits, message", [
    ([E.Edit(2, 9, ("x",))], "edit 0 (2 9) lies outside the source's 3 words"),
    ([E.Edit(-1, 0, ())], "lies outside the source's 3 words"),
    ([E.Edit(1, 2, ()), E.Edit(0, 1, ())], "edit 1 (0 1) starts before the previous edit ends (2)"),
    ([E.Edit(1, 1, ("a",)), E.Edit(1, 1, ("b",))], "both insert before word 1"),
])
def test_an_edit_span_outside_the_source_is_a_clear_error(edits, message):
    with pytest.raises(E.EditError, match=message.replace("(", r"\(").replace(")", r"\)")):
        E.apply("the cat sat", edits)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text("abcdefghij", min_size=1, max_size=8), min_size=10, max_size=40), st.data())
def test_edit_targets_are_shorter_when_few_words_change(words, data):
    """At most 20% of the words replaced: the edit list has fewer whitespace tokens than the target."""
    changed = data.draw(st.lists(st.integers(0, len(words) - 1), max_size=len(words) // 5, unique=True))
    target = list(words)
    for i in changed:
        target[i] = target[i] + "z"
    edits = E.format_edits(E.extract(" ".join(words), " ".join(target)))
    assert len(edits.split()) < len(target)


def test_edit_spans_stage_on_builtin_typos(tmp_path):
    stage = build_stage("edit_spans", {"input": "builtin:typos?n=40&split=test"}, verb="edits")
    summary = run_stage(stage, Workspace(), tmp_path / "e.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert summary["rows"] == 40 and summary["kinds"] == {"edits": 40}  # every typos row has an error
    for r in rows:
        p = r["provenance"]
        assert E.apply(p["source_text"], E.parse_edits(r["messages"][-1]["content"])) == p["target_text"]
        assert r["answer"] == r["messages"][-1]["content"]


# ----------------------------------------------------------------------------- GOT-D

def toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cand = torch.cat([torch.randn(900, 2, generator=g) * 0.5, torch.randn(100, 2, generator=g) * 0.5 + 5])
    return cand, torch.randn(60, 2, generator=g) * 0.1 + 5


def test_got_d_selects_the_candidates_near_the_target():
    cand, target = toy()
    chosen, _, info = G.select(cand, target, k=100)
    assert sum(i >= 900 for i in chosen) >= 90 and info["marginal_error"] < 1e-3


def test_sinkhorn_meets_both_marginals():
    cand, target = toy(1)
    cost = G.sq_cost(target, cand[::10])
    f, g, _, err = G.sinkhorn(cost, eps=0.1, tol=1e-8, max_iters=5000)
    plan = G.transport_plan(f, g, cost, 0.1)
    assert torch.allclose(plan.sum(1), torch.full((60,), 1 / 60, dtype=plan.dtype), atol=1e-8)
    assert torch.allclose(plan.sum(0), torch.full((100,), 1 / 100, dtype=plan.dtype), atol=1e-8)


@pytest.mark.parametrize("shift", [-3.0, 0.5, 1e3])
def test_a_constant_added_to_the_potential_changes_nothing(shift):
    cand, target = toy(2)
    f, g, _, _ = G.sinkhorn(G.sq_cost(target, cand), eps=0.1)
    assert G.rank_by_potential(g + shift, 50) == G.rank_by_potential(g, 50)
    cost = G.sq_cost(target, cand)  # the dual pair (f + c, g - c) is the same transport plan
    assert torch.allclose(G.transport_plan(f + shift, g - shift, cost, 0.1), G.transport_plan(f, g, cost, 0.1))


def test_the_potential_is_the_gradient_of_the_transport_cost():
    """Moving mass toward a candidate changes the OT value by about delta * (g_j - <g, b>): for the
    chosen (lowest-potential) candidates it falls, for the highest it rises (finite differences)."""
    g0 = torch.Generator().manual_seed(3)
    target, cand = torch.randn(6, 2, generator=g0) + 2, torch.randn(5, 2, generator=g0) * 2
    cost, eps, delta = G.sq_cost(target, cand), 0.5, 1e-4
    _, g, _, _ = G.sinkhorn(cost, eps, max_iters=20000, tol=1e-12)
    b = torch.full((5,), 0.2, dtype=torch.float64)
    base = G.ot_value(cost, eps)
    for j in range(5):
        moved = (1 - delta) * b + delta * torch.nn.functional.one_hot(torch.tensor(j), 5).double()
        change = G.ot_value(cost, eps, moved) - base
        predicted = delta * float(g[j] - (g * b).sum())
        assert change == pytest.approx(predicted, rel=0.05, abs=1e-9)
    assert G.ot_value(cost, eps, (1 - 0.1) * b + 0.1 * torch.eye(5, dtype=torch.float64)[int(g.argmin())]) < base


def test_k_at_least_n_returns_everything_deterministically():
    cand, target = toy(4)
    assert sorted(G.select(cand[:30], target, k=30)[0]) == list(range(30))
    assert sorted(G.select(cand[:30], target, k=99)[0]) == list(range(30))
    assert G.select(cand, target, k=77)[0] == G.select(cand, target, k=77)[0]
    assert G.calibrated_gradient(torch.tensor([3.0, 1.0, 2.0])).argsort().tolist() == [1, 2, 0]


class Embedder(Workspace):
    """A workspace whose embedding is a fixed feature of the row (is it arithmetic?)."""

    def embed(self, records, batch_size, max_length):
        return torch.tensor([[5.0 if r.meta.get("domain", "arith") == "arith" else 0.0, float(i % 3)]
                             for i, r in enumerate(records)])


def test_got_d_stage_picks_on_target_rows_of_the_pool(tmp_path):
    stage = build_stage("got_d", {"pool": "builtin:pool?n=200&on_target=0.2", "k": 40,
                                  "target": "builtin:arith?n=20&split=test"}, verb="select")
    run_stage(stage, Embedder(), tmp_path / "s.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all("####" in r["messages"][-1]["content"] for r in rows)
    assert [r["provenance"]["rank"] for r in rows] == list(range(40))


@pytest.mark.parametrize("name", ["got_d", "random"])
def test_k_larger_than_the_pool_is_a_clear_error(tmp_path, name):
    stage = build_stage(name, {"pool": "builtin:arith?n=10", "k": 11}, verb="select")
    with pytest.raises(ConfigError, match=r"k: 11 is larger than the pool \(10 rows in builtin:arith\?n=10\)"):
        run_stage(stage, Embedder(), tmp_path / "s.jsonl")


EMPTY = "EMPTY"
EMPTY_INPUTS = {  # stage -> (its options with one input EMPTY, the option the error must name)
    "random": ({"pool": EMPTY, "k": 1}, "pool"),
    "got_d": ({"pool": EMPTY, "k": 1}, "pool"),
    "got_d target": ({"target": EMPTY, "k": 1, "pool": "builtin:arith?n=3"}, "target"),
    "s3ft": ({"input": EMPTY}, "input"),
    "pseudo_label": ({"input": EMPTY}, "input"),
    "edit_spans": ({"input": EMPTY}, "input"),
    "task_mix": ({"tasks": {"a": "builtin:arith?n=3", "b": EMPTY}}, "tasks.b"),
    "task_mix input": ({"input": EMPTY}, "input"),
}


def test_every_data_stage_has_an_empty_input_case():
    from tunelab.registry import DATA_STAGES

    assert {case.split()[0] for case in EMPTY_INPUTS} == set(DATA_STAGES.names())


@pytest.mark.parametrize("case", sorted(EMPTY_INPUTS))
def test_an_empty_pool_is_a_clear_error(tmp_path, case):
    """Every stage, before any model runs: the error names the option and the source."""
    (tmp_path / "empty.jsonl").write_text("")
    options, what = EMPTY_INPUTS[case]
    options = json.loads(json.dumps(options).replace(EMPTY, str(tmp_path / "empty.jsonl")))
    stage = build_stage(case.split()[0], options)
    with pytest.raises(TunelabError, match=f"^{what}: {tmp_path}/empty.jsonl: no rows \\(the file is empty\\)"):
        run_stage(stage, Embedder(loaded=(None, tiny_tokenizer())), tmp_path / "out.jsonl")


def test_random_selection_is_seeded_and_distinct(tmp_path):
    def pick(seed):
        run_stage(build_stage("random", {"pool": "builtin:arith?n=50", "k": 20, "seed": seed}), Workspace(),
                  tmp_path / "r.jsonl")
        return [json.loads(x)["provenance"]["index"] for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert pick(1) == pick(1) != pick(2) and len(set(pick(1))) == 20


# ----------------------------------------------------------------------------- S3FT and pseudo-labels

class Scripted(Workspace):
    """A model that answers from a table (prompt text -> reply), counting its generate calls."""

    def __init__(self, replies: dict[str, str], default: str = "no idea"):
        super().__init__(loaded=(None, tiny_tokenizer()))
        self.replies, self.default, self.calls = replies, default, []

    def generate(self, prompts, max_new_tokens, batch_size):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.calls.append(texts)
        return [next((r for q, r in self.replies.items() if q in t), self.default) for t in texts]


def arith_rows(tmp_path: Path, n: int = 4) -> str:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}\n#### {2 * i}"}]} for i in range(n)]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "gold.jsonl")


def always(record, candidate, gold):
    return True


def never(record, candidate, gold):
    return False


def broken(record, candidate, gold):
    raise KeyError("score")


def undecided(record, candidate, gold):
    return 0.7  # a score, not a verdict


def s3ft(tmp_path, ws, judge="final_answer"):
    stage = build_stage("s3ft", {"input": arith_rows(tmp_path), "judge": judge, "chunk": 2}, verb="relabel")
    run_stage(stage, ws, tmp_path / "s3ft.jsonl")
    return [json.loads(x) for x in (tmp_path / "s3ft.jsonl").read_text().splitlines()]


def test_s3ft_judge_always_keeps_the_model_answers_and_never_paraphrases(tmp_path):
    ws = Scripted({f"{i} plus {i}": f"mine {i}" for i in range(4)})
    rows = s3ft(tmp_path, ws, "test_curate:always")
    assert [r["messages"][-1]["content"] for r in rows] == [f"mine {i}" for i in range(4)]
    assert {r["provenance"]["kind"] for r in rows} == {"self"}
    assert all("Rewrite" not in t for call in ws.calls for t in call)  # no paraphrase was generated


def test_s3ft_judge_never_keeps_gold(tmp_path):
    rows = s3ft(tmp_path, Scripted({}), "test_curate:never")
    assert [r["messages"][-1]["content"] for r in rows] == [f"{i} + {i} = {2 * i}\n#### {2 * i}" for i in range(4)]
    assert [r["provenance"]["kind"] for r in rows] == ["gold"] * 4


def test_s3ft_precedence_self_then_paraphrase_then_gold(tmp_path):
    """Row 0: the model is right (self). Row 1: wrong, its paraphrase right (paraphrase). Row 2:
    both wrong (gold). Row 3: right. Paraphrases are asked only for rows 1 and 2."""
    ws = Scripted({"Question: What is 1 plus 1": "Adding: #### 2", "Question: What is 2 plus 2": "#### 5",
                   "What is 0 plus 0": "#### 0", "What is 1 plus 1": "#### 3", "What is 2 plus 2": "#### 9",
                   "What is 3 plus 3": "so 6"})
    rows = s3ft(tmp_path, ws)
    assert [r["provenance"]["kind"] for r in rows] == ["self", "paraphrase", "gold", "self"]
    assert [r["messages"][-1]["content"] for r in rows][:3] == ["#### 0", "Adding: #### 2", "2 + 2 = 4\n#### 4"]
    paraphrased = [t for call in ws.calls for t in call if "Rewrite" in t]
    assert len(paraphrased) == 2 and "1 plus 1" in paraphrased[0] and "2 plus 2" in paraphrased[1]


def test_s3ft_is_deterministic_and_resumes_from_its_chunks(tmp_path):
    ws = Scripted({"0 plus 0": "#### 0"})
    ws.work_dir = tmp_path / "work"
    first = s3ft(tmp_path, ws)
    again = Scripted({})  # knows nothing: every chunk must come from the progress file
    again.work_dir = tmp_path / "work"
    assert s3ft(tmp_path, again) == first and again.calls == []


def test_a_judge_that_raises_is_a_clear_error(tmp_path):
    with pytest.raises(TunelabError, match=r"judge 'test_curate:broken' raised KeyError: 'score' \(on row .*gold.jsonl:1"):
        s3ft(tmp_path, Scripted({}), "test_curate:broken")
    with pytest.raises(TunelabError, match=r"judge 'test_curate:undecided' returned 0.7 on row .*gold.jsonl:1; "
                       "a judge returns True or False"):
        s3ft(tmp_path, Scripted({}), "test_curate:undecided")
    with pytest.raises(ConfigError, match="judge: unknown judge 'exactish'"):
        build_stage("s3ft", {"judge": "exactish"})
    with pytest.raises(ConfigError, match="judge: cannot import 'test_curate:nowhere'"):
        build_stage("s3ft", {"judge": "test_curate:nowhere"})


def test_pseudo_labels_take_the_model_answer_and_drop_unanswered(tmp_path, monkeypatch):
    import tunelab.curate.pseudo_label as PL

    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?"}) + "\n" for i in range(3)))
    monkeypatch.setattr(PL, "confidence", lambda model, prompts, answers: [-0.1 * (i + 1) for i in range(len(prompts))])
    stage = build_stage("pseudo_label", {"input": str(tmp_path / "pool.jsonl"), "drop_unanswered": True})
    run_stage(stage, Scripted({"0 plus 0": "#### 0", "1 plus 1": "It is 2"}), tmp_path / "p.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == ["#### 0"] and rows[0]["answer"] == "0"
    assert rows[0]["provenance"] == {"stage": "pseudo_label", "kind": "pseudo", "source": f"{tmp_path}/pool.jsonl:1",
                                     "confidence": -0.1}


def test_pseudo_label_confidence_is_the_mean_token_log_probability():
    from tiny import tiny_model
    from tunelab.curate.pseudo_label import confidence

    model = tiny_model()
    prompt, answer = [5, 6, 7], [8, 9]
    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0], -1)
    expected = (logp[2, 8] + logp[3, 9]).item() / 2
    assert confidence(model, [prompt], [answer])[0] == pytest.approx(expected, abs=1e-5)

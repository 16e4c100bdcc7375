"""Built-in synthetic tasks (builtin:arith, builtin:facts), their spec parsing, and answer metrics."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from tunelab.data.builtin import list_builtin, load_builtin, parse_spec
from tunelab.data.builtin.arith import split_of
from tunelab.errors import ConfigError
from tunelab.eval.metrics import contains_match, exact_match, extract_answer, normalize

STEP = re.compile(r"^Step (\d+): (\d+) ([-+*]) (\d+) = (-?\d+)$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
FACT_SPLITS = ["train", "probe_verbatim", "probe_rephrased", "update_train", "probe_updated", "probe_locality"]


def arith(split: str, n: int = 300, seed: int = 0):
    return load_builtin(f"builtin:arith?n={n}&split={split}&seed={seed}")


def facts(split: str, n: int = 20, seed: int = 0):
    return load_builtin(f"builtin:facts?n_entities={n}&split={split}&seed={seed}")


def user(r) -> str:
    return r.messages[0]["content"]


def assistant(r) -> str:
    return r.messages[-1]["content"]


def parse_steps(solution: str) -> list[tuple[int, str, int, int]]:
    lines = solution.splitlines()
    assert lines[-1].startswith("#### ")
    steps = []
    for i, line in enumerate(lines[:-1], 1):
        m = STEP.match(line)
        assert m, f"bad step line {line!r}"
        assert int(m.group(1)) == i
        steps.append((int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))))
    return steps


# ---- registry and spec parsing -------------------------------------------------------------

def test_list_builtin_names_and_descriptions():
    tasks = list_builtin()
    assert {"arith", "facts"} <= set(tasks)
    assert all(isinstance(d, str) and d for d in tasks.values())


def test_parse_spec():
    assert parse_spec("builtin:arith?n=5&split=test") == ("arith", {"n": "5", "split": "test"})
    assert parse_spec("builtin:facts") == ("facts", {})


@pytest.mark.parametrize("spec, needles", [
    ("builtin:nope", ["nope", "arith", "facts"]),
    ("builtin:arith?m=3", ["'m'", "n=1000", "split", "seed"]),
    ("builtin:arith?n=abc", ["'n'", "abc"]),
    ("builtin:arith?n=0", ["'n'", ">= 1"]),
    ("builtin:arith?split=dev", ["'split'", "train", "test", "ood"]),
    ("builtin:arith?seed=1.5", ["'seed'"]),
    ("builtin:arith?n=3&n=4", ["'n'", "twice"]),
    ("builtin:facts?split=probe", ["'split'", "probe_verbatim", "probe_updated"]),
    ("builtin:facts?n=3", ["'n'", "n_entities"]),
    ("arith?n=3", ["builtin:NAME"]),
    ("builtin:arith?n", ["key=value"]),
])
def test_spec_errors_name_the_culprit(spec, needles):
    with pytest.raises(ConfigError) as err:
        load_builtin(spec)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


# ---- arith -----------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_arith_deterministic_and_counted(split):
    a, b = arith(split, 50, seed=3), arith(split, 50, seed=3)
    assert a == b and len(a) == 50
    assert [user(r) for r in a] != [user(r) for r in arith(split, 50, seed=4)]
    assert [r.source for r in a] == [f"builtin:arith:{split}:{i}" for i in range(50)]
    assert all(r.meta["split"] == split for r in a)
    assert len({user(r) for r in a}) == 50  # no duplicates within a split


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_arith_solutions_are_correct(split):
    for r in arith(split):
        assert [m["role"] for m in r.messages] == ["user", "assistant"]
        steps = parse_steps(assistant(r))
        for a, op, b, c in steps:
            assert OPS[op](a, b) == c >= 0
        assert r.answer == str(steps[-1][3]) == assistant(r).splitlines()[-1][5:]
        assert r.meta["steps"] == len(steps)
        assert exact_match(assistant(r), r.answer)
        known = {int(x) for x in re.findall(r"\d+", user(r))}
        for a, op, b, c in steps:  # operands come from the problem or earlier steps (or doubles/triples)
            scaled = op == "*" and {2: "doubles", 3: "triples"}.get(b, "?") in user(r)
            assert a in known and (b in known or scaled)
            known.add(c)


def test_arith_train_test_disjoint():
    train, test = arith("train", 2000), arith("test", 500)
    assert not {user(r) for r in train} & {user(r) for r in test}
    assert not {assistant(r) for r in train} & {assistant(r) for r in test}
    assert all(split_of(parse_steps(assistant(r))) == "train" for r in train)
    assert all(split_of(parse_steps(assistant(r))) == "test" for r in test)


def test_arith_in_distribution_shape():
    for split in ("train", "test"):
        rows = arith(split)
        assert {r.meta["steps"] for r in rows} == {2, 3}
        assert max(max(a, b) for r in rows for a, _, b, _ in parse_steps(assistant(r))) <= 150
        assert max(len(user(r)) + len(assistant(r)) for r in rows) < 90 * 4  # roughly <= 90 tokens


def test_arith_ood_is_harder():
    def operands(rows):
        return [max(a, b) for r in rows for a, op, b, _ in parse_steps(assistant(r)) if op != "*"]
    iid, ood = arith("train"), arith("ood")
    assert min(r.meta["steps"] for r in ood) > max(r.meta["steps"] for r in iid)
    assert {r.meta["steps"] for r in ood} == {4, 5}
    assert max(operands(ood)) > 300 >= max(operands(iid))
    assert sum(operands(ood)) / len(operands(ood)) > 3 * sum(operands(iid)) / len(operands(iid))


def test_arith_wording_varies():
    rows = arith("train", 200)
    assert len({user(r).split(".")[0].split()[1] for r in rows}) >= 3  # several opening verbs
    assert len({user(r).split(". ")[-1] for r in rows}) >= 3  # several question templates


# ---- facts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("split", FACT_SPLITS)
def test_facts_deterministic_and_counted(split):
    rows = facts(split, 20, seed=5)
    assert rows == facts(split, 20, seed=5)
    per_entity = {"train": 6, "probe_verbatim": 5, "probe_rephrased": 5, "update_train": 1, "probe_updated": 1,
                  "probe_locality": 1}
    assert len(rows) == 20 * per_entity[split]
    assert [r.source for r in rows] == [f"builtin:facts:{split}:{i}" for i in range(len(rows))]
    assert len({r.meta["entity"] for r in rows}) == 20
    assert facts(split, 20, seed=6) != rows


def test_facts_default_and_prefix_worlds():
    assert len({r.meta["entity"] for r in load_builtin("builtin:facts")}) == 50
    small, big = facts("probe_verbatim", 10), facts("probe_verbatim", 30)
    assert [(user(r), r.answer) for r in small] == [(user(r), r.answer) for r in big[:len(small)]]


def test_facts_probes_consistent_with_train():
    train = facts("train")
    train_qa = {user(r): assistant(r) for r in train}
    bios = {r.meta["entity"]: assistant(r) for r in train if r.meta["attribute"] == "*"}
    truth = {}
    for r in facts("probe_verbatim"):
        assert train_qa[user(r)] == assistant(r)  # same question, same answer as trained
        assert contains_match(assistant(r), r.answer) and contains_match(bios[r.meta["entity"]], r.answer)
        truth[r.meta["entity"], r.meta["attribute"]] = r.answer
    rephrased = facts("probe_rephrased")
    for r in rephrased:
        assert user(r) not in train_qa
        assert r.answer == truth[r.meta["entity"], r.meta["attribute"]]
    assert len(truth) == len(rephrased)


def test_facts_rephrased_differs_from_verbatim():
    verbatim = {(r.meta["entity"], r.meta["attribute"]): user(r) for r in facts("probe_verbatim")}
    for r in facts("probe_rephrased"):
        assert user(r) != verbatim[r.meta["entity"], r.meta["attribute"]]
        assert r.meta["entity"] in user(r)


def test_facts_updates():
    truth = {(r.meta["entity"], r.meta["attribute"]): r.answer for r in facts("probe_verbatim")}
    update, probe = facts("update_train"), facts("probe_updated")
    assert [(user(r), r.answer) for r in update] == [(user(r), r.answer) for r in probe]
    for r in probe:
        old = r.meta["old_answer"]
        assert old == truth[r.meta["entity"], r.meta["attribute"]] != r.answer
        assert contains_match(assistant(r), r.answer) and not contains_match(assistant(r), old)
    assert len({r.meta["attribute"] for r in probe}) > 1  # different attributes get updated


def test_facts_locality_probes_ask_a_fact_the_update_leaves_alone():
    truth = {(r.meta["entity"], r.meta["attribute"]): r.answer for r in facts("probe_verbatim")}
    updated = {r.meta["entity"]: r.meta["attribute"] for r in facts("update_train")}
    for r in facts("probe_locality"):
        assert r.meta["attribute"] != updated[r.meta["entity"]] == r.meta["updated"]
        assert r.answer == truth[r.meta["entity"], r.meta["attribute"]]


def test_facts_names_are_unique_and_invented():
    names = {r.meta["entity"] for r in facts("train", 500)}
    assert len(names) == 500
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", n) for n in names)


# ---- metrics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Step 1: 3 + 4 = 7\n#### 7", "7"),
    ("#### 5\nthen more\n#### 6\n", "6"),
    ("#### 14 \nTrailing words 99", "14"),
    ("no marker, it ends with 3 then 1,234.5", "1234.5"),
    ("the total is 42.", "42"),
    ("it dropped to -3!\n", "-3"),
    ("the range is 5-3", "3"),  # '-' is a sign only after a non-word
    # without a marker, a number counts only where the output ends with it (#16.11e)
    ("1 + 28 + 13 = 36 +", "1 + 28 + 13 = 36 +"),
    ("no marker, but 3 then 1,234.5 here", "no marker, but 3 then 1,234.5 here"),
    ("it dropped to -3 degrees", "it dropped to -3 degrees"),
    ("Step 1: 3 + 4 = 7\n#### ", "Step 1: 3 + 4 = 7\n####"),
    ("  Velmora lives in Quenth. ", "Velmora lives in Quenth."),
    ("", ""),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_custom_pattern():
    assert extract_answer("Answer: 12\nAnswer: 13", r"Answer:\s*(\d+)") == "13"
    assert extract_answer("The answer is (B).", r"\(([A-D])\)") == "B"


@pytest.mark.parametrize("raw, expected", [
    ("12.0", "12"), ("12", "12"), (" 12. ", "12"), ("1,200", "1200"), ("12.50", "12.5"), ("-0", "0"),
    ("$5", "5"), (".5", "0.5"), ("Quenth.", "quenth"), ("  Teal ", "teal"), ("1e3", "1e3"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_a_number_in_the_middle_of_a_generation_is_not_its_answer():
    assert not exact_match("1 + 28 + 13 = 36 +", "36")
    assert not exact_match("36 is close, but 5 + 9", "36")
    assert exact_match("1 + 28 + 13 = 42", "42") and exact_match("#### 36\nand then 1 + 2", "36")


def test_exact_and_contains_match():
    assert exact_match("Step 1: 12 + 7 = 19\n#### 19", "19")
    assert exact_match("so the total is 1,200.", "1200")
    assert exact_match("#### 12.0", "12")
    assert not exact_match("#### 13", "12")
    assert not exact_match("Velmora lives in Quenth.", "Quenth")  # whole sentence != value
    assert exact_match("quenth.", "Quenth")
    assert contains_match("Velmora lives in Quenth.", "quenth")
    assert contains_match("It is a   pet\nferret", "pet ferret")
    assert not contains_match("Velmora lives in Quenthwick.", "Quenth")
    assert not contains_match("anything", "")
    assert contains_match("born in 1979.", "1979") and not contains_match("born in 19790", "1979")


@given(st.integers(-10**9, 10**9))
def test_integers_round_trip(n):
    assert exact_match(f"Step 1: ...\n#### {n}", str(n))
    assert exact_match(f"the answer is {n:,}", str(n))
    assert normalize(f"{n}.0") == normalize(str(n)) == str(n)

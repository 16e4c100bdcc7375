"""The built-in long-context task (builtin:longctx) and accuracy by length bucket."""
import re

import pytest
import torch

from tunelab.data import load_records
from tunelab.data.builtin.longctx import CHARS_PER_TOKEN, OVERHEAD, ladder
from tunelab.data.config import DataConfig
from tunelab.errors import ConfigError


def records(spec):
    return load_records(spec, DataConfig())


def test_deterministic_and_splits_differ():
    spec = "builtin:longctx?n=6&length=256&max_length=1024"
    a, b = records(spec), records(spec)
    assert [r.messages for r in a] == [r.messages for r in b]
    assert [r.messages for r in records(spec + "&seed=1")] != [r.messages for r in a]
    assert [r.answer for r in records(spec + "&split=test")] != [r.answer for r in a]


def test_buckets_follow_the_doubling_ladder():
    assert ladder(512, 8192) == [512, 1024, 2048, 4096, 8192] and ladder(512, 0) == [512]
    rs = records("builtin:longctx?n=20&length=256&max_length=2048")
    lengths = [r.meta["length"] for r in rs]
    assert sorted(set(lengths)) == [256, 512, 1024, 2048] and all(lengths.count(x) == 5 for x in set(lengths))
    for r in rs:  # context size as calibrated (characters: no tokenizer here)
        chars = (r.meta["length"] - OVERHEAD) * CHARS_PER_TOKEN[r.meta["kind"]]
        assert chars - 80 <= len(r.messages[0]["content"]) <= chars + 200


def test_each_answer_is_found_exactly_one_way():
    """The needle is in the context once, and the distractors never answer the question."""
    for r in records("builtin:longctx?n=30&length=512&max_length=2048"):
        text, answer, kind = r.messages[0]["content"], r.answer, r.meta["kind"]
        question = text.rsplit("Question: ", 1)[1]
        assert r.messages[1]["content"] == answer and re.fullmatch(r"\d{5}", answer)
        if kind == "passkey":
            assert text.count(f"The pass key is {answer}.") == 1
        elif kind == "kv":
            name = re.search(r"code of (\S+)\?", question).group(1)
            assert re.findall(rf"The code of {name} is (\d+)\.", text) == [answer]
        else:
            start = re.search(r"that (\S+) points to", question).group(1)
            middle = re.findall(rf"(?<![\w-]){start} points to (\S+)\.", text)
            assert len(middle) == 1
            assert re.findall(rf"(?<![\w-]){middle[0]} holds (\d+)\.", text) == [answer]
        assert 0 <= r.meta["depth"] <= 1


def test_bad_options_are_errors():
    with pytest.raises(ConfigError, match="length"):
        records("builtin:longctx?length=10")
    with pytest.raises(ConfigError, match="kind"):
        records("builtin:longctx?kind=essay")


def test_rows_fit_the_calibrated_length_with_smollm2_tokenizer():
    """With SmolLM2's tokenizer (when cached), rows land within -8%..+1% of their bucket."""
    from tunelab.models.builtin import is_complete, model_cache_dir
    if not is_complete(model_cache_dir("smollm2-135m")):
        pytest.skip("SmolLM2 is not cached here")
    from tunelab.data import encode
    from tunelab.models import load_tokenizer
    from tunelab.models.config import ModelConfig
    tok = load_tokenizer(ModelConfig())
    rs = records("builtin:longctx?n=12&length=512&max_length=4096")
    for r, ex in zip(rs, encode(rs, tok, DataConfig(max_length=10**6))):
        assert 0.92 * r.meta["length"] <= len(ex) <= 1.01 * r.meta["length"], (r.meta, len(ex))


def test_hit_is_greedy_decoding_and_nll_is_the_answer_ce():
    from tiny import tiny_model
    from tunelab.data.records import Example
    from tunelab.eval.long_context import by_bucket, score_examples

    model = tiny_model()
    prompt = torch.randint(3, 300, (40,)).tolist()
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 40:].tolist()
    right = Example(prompt + greedy, [-100] * 40 + greedy)
    wrong_ids = greedy[:2] + [(greedy[2] + 1) % 300 + 3] + greedy[3:]
    wrong = Example(prompt + wrong_ids, [-100] * 40 + wrong_ids)
    s = score_examples(model, [right, wrong])
    assert [x["hit"] for x in s] == [True, False]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + greedy])).logits[0, 39:43]
    want = torch.nn.functional.cross_entropy(logits, torch.tensor(greedy))
    assert s[0]["nll"] == pytest.approx(float(want), rel=1e-5)
    from tunelab.data.records import Record
    rs = [Record(text="x", meta={"length": 512}), Record(text="y", meta={"length": 1024})]
    assert by_bucket(rs, s) == {512: {"accuracy": 1.0, "answer_nll": s[0]["nll"], "mean_tokens": 44, "num_examples": 1},
                                1024: {"accuracy": 0.0, "answer_nll": s[1]["nll"], "mean_tokens": 44, "num_examples": 1}}


def test_answer_accuracy_by_length_bucket():
    """eval.json's `by_length`: accuracy per `meta["length"]` bucket, absent without buckets."""
    from tunelab.data.records import Record
    from tunelab.eval.task import by_length

    rs = [Record(text=str(i), meta={"length": n}) for i, n in enumerate([1024, 512, 512, 1024, 512])]
    assert by_length(rs, [True, False, True, False, False]) == {"by_length": {
        512: {"accuracy": 1 / 3, "num_examples": 3}, 1024: {"accuracy": 0.5, "num_examples": 2}}}
    assert by_length([Record(text="x")], [True]) == {}

"""Fine-tuning vs RAG (Barnett et al. 2024; methods-analysis.md §5): the RAG data format, the BM25
retriever over the builtin:facts collection, the judges and the harness."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from tunelab.data import DataConfig, encode
from tunelab.data.formats import to_records
from tunelab.data.render import IGNORE
from tunelab.errors import DataError, TunelabError
from tunelab.rag import BM25Retriever, compare, facts_collection, model_generator, score, token_overlap_judge

ROW = {"question": "Where does Zorblax live?", "contexts": ["Zorblax lives in Quenth.", "Velmora lives in Dravolis."],
       "answer": "Quenth"}


def rows(*items):
    return [(i + 1, r) for i, r in enumerate(items)]


def test_rag_rows_train_on_the_answer_only_with_passages_in_order(tok):
    records = to_records(rows(ROW), "rag.jsonl")
    assert records.format == "rag"  # detected from `contexts`
    user = records[0].messages[0]["content"]
    assert user.index("Passage 1: Zorblax") < user.index("Passage 2: Velmora") < user.index("Question: Where")
    ex = encode(records, tok, DataConfig(max_length=256))[0]
    trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert tok.decode(trained) == "Quenth<|im_end|>"
    prompt = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE])
    assert all(c in prompt for c in ROW["contexts"]) and ROW["question"] in prompt


WORDS = st.text(alphabet="abcdefgh XYZ.,", min_size=1, max_size=40).filter(str.strip)


@settings(max_examples=40, deadline=None)
@given(question=WORDS, contexts=st.lists(WORDS, max_size=5), answer=WORDS)
def test_only_the_answer_trains_whatever_the_passages(question, contexts, answer):
    """Any question, 0-5 passages and answer: the trained tokens are the answer's and the end of the
    turn, nothing of the question or the passages; the passages are in the prompt in their order."""
    from tiny import tiny_tokenizer

    tok, row = tiny_tokenizer(), {"question": question, "contexts": contexts, "answer": answer}
    ex = encode(to_records(rows(row), "rag.jsonl", "rag"), tok, DataConfig(max_length=2048))[0]
    trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert tok.decode(trained) == answer + "<|im_end|>"
    prompt = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE])
    at = [prompt.index(f"Passage {i + 1}: {c}\n") for i, c in enumerate(contexts)]
    asked = prompt.index(f"Question: {question}" if contexts else question)
    assert at == sorted(at) and asked > max(at, default=-1)


def test_a_context_list_over_max_length_is_an_error_naming_the_row():
    from tiny import tiny_tokenizer

    long = dict(ROW, contexts=ROW["contexts"] * 20)
    records = to_records(rows(ROW, long), "rag.jsonl")
    with pytest.raises(DataError, match=r"rag.jsonl:2: field 'contexts': the question, its 40 passages and the "
                                        r"answer take at least \d+ tokens, over data.max_length=128"):
        encode(records, tiny_tokenizer(), DataConfig(max_length=128))


@pytest.mark.parametrize("row, field", [({"question": "Q?", "contexts": ["a"]}, "answer"),
                                        ({"question": "Q?", "contexts": "a", "answer": "x"}, "contexts"),
                                        ({"question": "Q?", "contexts": ["a", ""], "answer": "x"}, "contexts[1]")])
def test_bad_rag_rows_name_the_field(row, field):
    with pytest.raises(DataError, match=rf"rag.jsonl:1: field '{field.replace('[', '.').replace(']', '.')}'"):
        to_records(rows(row), "rag.jsonl", "rag")


def test_the_collection_holds_every_answer_and_a_namesake_per_person():
    docs, qas = facts_collection(12, seed=3)
    assert (docs, qas) == facts_collection(12, seed=3)
    by_id = {d.doc_id: d.text for d in docs}
    assert len(docs) == 24 and len(qas) == 60
    for q in qas:
        assert q.answer in by_id[q.doc_id] and q.entity in q.question
        fake = by_id[q.doc_id.replace("person", "distractor")]
        assert q.entity not in fake and fake.split()[0] == q.entity.split()[0]


def test_bm25_finds_the_right_person_among_namesakes():
    pytest.importorskip("bm25s")  # the [rag] extra (also in [test])
    docs, qas = facts_collection(30)
    found = BM25Retriever(docs).retrieve([q.question for q in qas], k=2)
    hits = [q.doc_id in {d.doc_id for d in ds} for q, ds in zip(qas, found)]
    assert sum(hits) / len(hits) >= 0.95 and all(len(ds) == 2 for ds in found)


def test_missing_bm25s_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[rag\]'"):
        BM25Retriever(facts_collection(2)[0])


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="abcdefgh XYZ.,", min_size=1, max_size=30))
def test_the_overlap_judge_gives_full_marks_to_the_reference_itself(ref):
    from tunelab.eval.metrics import squad_normalize
    marks = token_overlap_judge("q", ref, ref)
    assert marks["completeness"] == marks["accuracy"] == float(bool(squad_normalize(ref)))


def test_the_overlap_judge_scores_partial_answers():
    assert token_overlap_judge("q", "He lives in Quenth.", "Quenth") == {"accuracy": 1.0, "completeness": 1.0,
                                                                        "precision": 1 / 4}
    assert token_overlap_judge("q", "Golden", "the Golden Gate")["completeness"] == 0.5


def test_the_harness_scores_base_vs_base_identically(model, tok):
    pytest.importorskip("bm25s")  # the [rag] extra (also in [test])
    docs, qas = facts_collection(4)
    ctx = [[d.text for d in ds] for ds in BM25Retriever(docs).retrieve([q.question for q in qas[:6]], 2)]
    questions, refs = [q.question for q in qas[:6]], [q.answer for q in qas[:6]]
    gen = model_generator(model, tok, max_new_tokens=4)
    out = compare({"a": gen, "b": model_generator(model, tok, max_new_tokens=4)}, questions, refs,
                  token_overlap_judge, ctx)
    assert set(out) == {"a", "a+rag", "b", "b+rag"}
    assert out["a"] == out["b"] and out["a+rag"] == out["b+rag"]


def test_the_harness_passes_the_passages_and_counts_correct_answers():
    seen = []

    def echo(prompts):  # answers with the last passage's last word
        seen.extend(prompts)
        return [re.findall(r"Passage \d+: (.*)", p)[-1].split()[-1] if "Passage" in p else "no idea" for p in prompts]
    s = score(echo, ["Where?", "Who?"], ["Quenth", "Velmora"], token_overlap_judge,
              [["Zorblax lives in Quenth"], ["It is Dravolis"]])["summary"]
    assert s["accuracy"] == 0.5 and s["num_correct"] == 1 and "Passage 1: Zorblax lives in Quenth" in seen[0]
    assert score(echo, ["Where?"], ["Quenth"], token_overlap_judge)["summary"]["accuracy"] == 0.0

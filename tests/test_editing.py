"""LocFT-BF model editing (Yang et al. 2025; methods-analysis.md §9): the properties the brief lists,
on the tiny 2-layer model in fp32."""
import copy
import json

import pytest
import torch
from devicetrap import DeviceTrap
from hypothesis import given, settings, strategies as st

from tunelab.data.render import IGNORE
from tunelab.editing import BreadthFirst, DepthFirst, EditConfig, EditRequest, load_requests
from tunelab.editing.trainer import EditLoss, encode_request, train_edits
from tunelab.errors import DataError
from tunelab.eval.metrics import squad_normalize, token_overlap

FP32 = {"precision": "fp32"}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 12), epochs=st.integers(1, 4), seed=st.integers(0, 9))
def test_breadth_first_visits_every_request_once_per_epoch(n, batch, epochs, seed):
    visits = []
    log = BreadthFirst(batch, epochs, threshold=0.01, seed=seed).run(n, lambda idx: visits.append(idx) or 1.0)
    per_epoch = -(-n // batch)
    assert len(log) == epochs and len(visits) == epochs * per_epoch
    for e in range(epochs):
        batches = visits[e * per_epoch:(e + 1) * per_epoch]
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(1 <= len(b) <= batch for b in batches)


def test_breadth_first_stops_when_an_epoch_is_below_the_threshold():
    losses = iter([1.0, 0.5, 0.005, 0.004] + [1.0] * 20)
    log = BreadthFirst(2, 10, threshold=0.01).run(4, lambda idx: next(losses))
    assert [round(r["loss"], 4) for r in log] == [0.75, 0.0045]


@settings(max_examples=30, deadline=None)
@given(need=st.lists(st.integers(1, 6), min_size=1, max_size=8), cap=st.integers(1, 5))
def test_depth_first_finishes_request_i_before_i_plus_1(need, cap):
    """Request i takes need[i] steps to fall below the threshold, at most `cap`: visits are i, i, ..., i+1, ..."""
    seen, left = [], list(need)

    def step(idx):
        seen.append(idx[0])
        left[idx[0]] -= 1
        return 0.0 if left[idx[0]] <= 0 else 1.0
    DepthFirst(cap, threshold=0.01).run(len(need), step)
    assert seen == [i for i, k in enumerate(need) for _ in range(min(k, cap))]


def test_target_has_a_leading_space_and_eos_and_only_it_has_labels(tok):
    ex = encode_request(EditRequest("Where does Zorblax live?", "Quenth"), tok, EditConfig())
    prompt = tok("Where does Zorblax live?")["input_ids"]
    target = tok(" Quenth", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt + target
    assert ex.labels == [IGNORE] * len(prompt) + target
    chat = encode_request(EditRequest("Where?", "Quenth"), tok, EditConfig(template="chat"))
    assert tok.decode(chat.input_ids).endswith("<|im_start|>assistant\nQuenth<|im_end|>")


def test_edit_loss_is_the_mean_over_requests_of_each_requests_mean(model, tok):
    from tunelab.data import collate

    reqs = [EditRequest("Where does Zorblax live?", "Quenth Marrowick Talsenby"), EditRequest("Hello", "world")]
    b = collate([encode_request(r, tok, EditConfig()) for r in reqs], packing=False, pad_id=0)
    out = EditLoss().loss(model, b)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["targets"], reduction="none")
    keep = b["targets"] != IGNORE
    means = [ce[i][keep[i]].mean() for i in range(2)]
    assert out.num_tokens == 2
    torch.testing.assert_close(out.loss_sum, sum(means), atol=1e-5, rtol=1e-5)


def _apply(model, method, **opts):
    from tunelab.config import from_dict
    from tunelab.methods import METHODS
    cls = METHODS.get(method)
    return cls(from_dict(cls.Config, opts, "method")).apply(model)


REQUESTS = [EditRequest("Where does Zorblax live?", "Quenth"), EditRequest("What is 12 plus 7?", "nineteen"),
            EditRequest("The quick brown fox", "sleeps"), EditRequest("Hello world!", "goodbye")]


@pytest.mark.parametrize("schedule, layer, module, prefix", [
    ("breadth_first", 1, "mlp.down_proj", "model.layers.1.mlp.down_proj."),
    ("depth_first", 1, "mlp.down_proj", "model.layers.1.mlp.down_proj."),
    ("breadth_first", 0, "self_attn.v_proj", "model.layers.0.self_attn.v_proj."),
    ("depth_first", -1, "", "model.layers.1.")])
def test_only_the_chosen_modules_weights_change(model, tok, schedule, layer, module, prefix):
    """All other parameters are bit-identical after real edit steps; every weight of the chosen
    module changed."""
    cfg = EditConfig(lr=1e-2, epochs=3, batch_size=2, schedule=schedule, **FP32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _apply(model, "locft", layer=layer, module=module)
    _, stepper = train_edits(model, [encode_request(r, tok, cfg) for r in REQUESTS], cfg, "cpu", 0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    chosen = {n for n in before if n.startswith(prefix)}
    assert stepper.steps > 0 and changed == chosen


def test_a_batch_below_the_loss_threshold_takes_no_step(model, tok):
    cfg = EditConfig(lr=1e-2, epochs=2, batch_size=4, loss_threshold=1e9, **FP32)
    before = copy.deepcopy(model.state_dict())
    _apply(model, "locft", layer=0)
    log, stepper = train_edits(model, [encode_request(r, tok, cfg) for r in REQUESTS], cfg, "cpu", 0)
    assert stepper.steps == 0 and stepper.skipped == 1 and len(log) == 1  # and the epoch stopped training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_locft_layer_and_module_errors(model):
    from tunelab.errors import ConfigError
    with pytest.raises(ConfigError, match=r"method.layer: 5 is out of range; the model has 2 blocks"):
        _apply(model, "locft", layer=5)
    with pytest.raises(ConfigError, match=r"method.module: no module 'mlp.nope' in block 1; a block has: .*down_proj"):
        _apply(model, "locft", layer=1, module="mlp.nope")


@pytest.mark.parametrize("a, b", [("The Golden Gate.", "golden gate"), ("  an Apple,  pie ", "apple pie"),
                                  ("Quenth!", "quenth")])
def test_squad_normalisation(a, b):
    assert squad_normalize(a) == squad_normalize(b) == b


def test_token_overlap():
    assert token_overlap("The answer is Quenth.", "Quenth") == (1 / 3, 1.0)
    assert token_overlap("Quenth", "quenth") == (1.0, 1.0) and token_overlap("", "x") == (0.0, 0.0)


def test_request_files_name_the_missing_field(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text('{"src": "Where?", "alt": "There", "loc": "Who?"}\n{"prompt": "What?", "rephrase": "Which?"}\n')
    with pytest.raises(DataError, match=r"edits.jsonl:2: field 'target': missing field"):
        load_requests(str(path))
    path.write_text('{"prompt": "Where?", "target": "There", "rephrase": ["A?", 3]}\n')
    with pytest.raises(DataError, match=r"edits.jsonl:1: field 'rephrase\[1\]': expected a string"):
        load_requests(str(path))
    path.write_text('{"src": "Where?", "alt": "There", "loc": "Who?"}\n')
    assert load_requests(str(path))[0] == EditRequest("Where?", "There", [], ["Who?"], source=f"{path}:1")


def test_facts_requests_are_the_worlds_updates():
    from tunelab.data.builtin import load_builtin

    reqs = load_requests("builtin:facts?n_entities=6&seed=2")
    updates = load_builtin("builtin:facts?n_entities=6&seed=2&split=update_train")
    assert [(r.prompt, r.target) for r in reqs] == [(u.messages[0]["content"], u.answer) for u in updates]
    # locality asks an unrelated general-knowledge question, the forgetting diagnostic's probes in order
    from tunelab.diagnostics._probes import load_probes

    assert [r.locality for r in reqs] == [[p.question] for p in load_probes(limit=6)]
    from tunelab.data.builtin.facts import make_world

    names = [e.name for e in make_world(6, 2)]
    assert all(name in r.prompt for name, r in zip(names, reqs))
    assert not any(part in q for r in reqs for q in r.locality for name in names for part in name.split())
    assert all(len(r.rephrase) == 1 and r.rephrase[0] != r.prompt for r in reqs)


def test_tunelab_edit_end_to_end(tiny_dir, tmp_path):
    """The CLI edits a tiny model (reliability rises from 0: one 64x128 matrix of a random model cannot
    hold every edit), writes a run directory that load_trained rebuilds with the same weights, and
    the layer sweep picks one of the layers it tried."""
    from tunelab.cli import main
    from tunelab.training.final import load_trained

    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps({"prompt": r.prompt, "target": r.target, "rephrase": r.prompt + " ",
                                        "locality": "Question Answer"}) + "\n" for r in REQUESTS))
    out = tmp_path / "edit"
    with DeviceTrap() as trap:  # every tensor the edit makes names its device (tests/devicetrap.py)
        assert main(["edit", str(path), "--model", str(tiny_dir), "--layer", "1", "--out", str(out),
                     "lr=2e-2", "precision=fp32", "max_new_tokens=6", "batch_size=2"]) == 0
    assert not trap.found, sorted(trap.found)
    found = json.loads((out / "edit.json").read_text())
    assert found["after"]["reliability"] > found["before"]["reliability"] == 0.0
    assert found["module"] == "model.layers.1.mlp.down_proj" and found["train"]["steps"] > 0
    _, tuned, _, method = load_trained(out)
    assert method.name == "locft" and method.module_name == found["module"]
    from safetensors.torch import load_file
    saved = load_file(str(out / "final" / "tunelab_adapter.safetensors"))
    assert list(saved) == ["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(tuned.model.layers[1].mlp.down_proj.weight, saved["model.layers.1.mlp.down_proj.weight"])
    swept = tmp_path / "swept"
    assert main(["edit", str(path), "--model", str(tiny_dir), "--sweep", "0,1", "--out", str(swept),
                 "lr=2e-2", "precision=fp32", "max_new_tokens=6", "epochs=3", "sweep_requests=2"]) == 0
    found = json.loads((swept / "edit.json").read_text())
    assert [r[0] for r in found["sweep"]] == [0, 1] and found["layer"] in (0, 1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(0, 80), seed=st.integers(0, 5))
def test_a_scored_sample_is_a_seeded_subset_in_order(n, k, seed):
    from tunelab.editing.edit import scored

    reqs = [EditRequest(f"p{i}", "t") for i in range(n)]
    got = scored(reqs, EditConfig(num_scored=k, seed=seed))
    assert len(got) == (n if k == 0 else min(k, n))
    positions = [reqs.index(r) for r in got]
    assert positions == sorted(set(positions)) and got == scored(reqs, EditConfig(num_scored=k, seed=seed))


def test_the_example_recipe_loads_and_a_bad_field_is_named(tmp_path):
    from pathlib import Path

    from tunelab.editing import load_config
    from tunelab.editing.edit import method_options
    from tunelab.errors import ConfigError

    recipe = Path(__file__).resolve().parent.parent / "examples" / "editing" / "locft_bf.yaml"
    cfg = load_config(str(recipe), ["epochs=3"], layer=None, model="x")
    assert (cfg.method, cfg.schedule, cfg.epochs, cfg.model, cfg.layer) == ("locft", "breadth_first", 3, "x", 22)
    assert Path(cfg.output).is_absolute() and Path(cfg.output).name == "locft_bf"
    with pytest.raises(ConfigError, match="lr"):
        load_config(str(recipe), ["lr=-1"])


@pytest.mark.parametrize("reply, cut_to", [(" Quenth.", "Quenth"), ("\n\nHe lives in Quenth. Then", "He lives in Quenth"),
                                           ("Quenth\nMore", "Quenth"), ("   ", ""), ("a.b", "a")])
def test_replies_are_cut_at_the_first_stop_after_their_first_visible_character(reply, cut_to):
    from tunelab.editing.score import cut
    assert cut(reply) == cut_to


def test_a_layer_sweep_needs_a_method_that_edits_one_layer():
    """`--sweep` tries layers, so it needs a method with a layer to choose (locft), not full fine-tuning;
    the options given to the method follow from its Config, not from its name."""
    from tunelab.editing import load_config
    from tunelab.editing.edit import method_options
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="a layer sweep needs a method that edits one layer"):
        load_config(None, [], method="full", sweep=[1])
    cfg = load_config(None, [], method="locft", sweep=[1], module="mlp.up_proj")
    assert method_options(cfg, 3) == {"layer": 3, "module": "mlp.up_proj"}
    assert method_options(load_config(None, [], method="full"), 3) == {}

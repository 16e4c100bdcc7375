"""Activation patching and CMAP on entity tracking (Prakash et al. 2024; methods-analysis.md §6):
the properties the brief lists, on the tiny 2-layer model in fp32."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from devicetrap import DeviceTrap

from tunelab.data.builtin import load_builtin
from tunelab.errors import TunelabError
from tunelab.mechanisms import Site, patch_activations, record_activations
from tunelab.mechanisms.cmap import attribution_scores, exact_scores, ranked_heads, recovery
from tunelab.mechanisms.entity_tracking import encode, head_sites, last_logits, out_projections


def ids(seed=0, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 320, (B, T), generator=g), "use_cache": False}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def perturbed(model, seed=1, scale=0.5):
    """A copy with every decoder weight changed (the 'fine-tuned' model); the final norm and head
    are kept (a shared head)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if ".layers." in n:
                p.add_(scale * torch.randn(p.shape, generator=g) * p.std())
    return other


SITES = [Site("model.layers.0"), Site("model.layers.1.mlp", positions=(-1, 2)),
         Site("model.layers.1.self_attn.o_proj", head=2), Site("model.layers.0.self_attn.o_proj", head=0, positions=(-1,))]


@pytest.mark.parametrize("k", range(len(SITES)))
def test_self_patching_leaves_logits_unchanged(model, k):
    x = ids()
    cache = record_activations(model, SITES[:k + 1], **x)
    with patch_activations(model, cache, SITES[:k + 1]):
        patched = logits(model, x)
    torch.testing.assert_close(patched, logits(model, x), atol=1e-5, rtol=1e-5)


MODULES = ["model.layers.0", "model.layers.1", "model.layers.0.mlp", "model.layers.1.self_attn",
           "model.layers.0.mlp.down_proj", "model.embed_tokens", "model.norm"]
SITE = st.one_of(
    st.builds(Site, st.sampled_from(MODULES), st.none(),
              st.one_of(st.none(), st.lists(st.integers(-9, 8), min_size=1, max_size=4, unique=True).map(tuple))),
    st.builds(Site, st.sampled_from(["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
              st.integers(0, 3), st.one_of(st.none(), st.tuples(st.integers(-9, 8)))))


@settings(max_examples=25, deadline=None)
@given(sites=st.lists(SITE, min_size=1, max_size=4, unique_by=lambda s: (s.module, s.head)), seed=st.integers(0, 9))
def test_self_patching_any_sites_leaves_logits_unchanged(sites, seed):
    from tiny import tiny_model

    model, x = tiny_model(), ids(seed)
    with patch_activations(model, record_activations(model, sites, **x), sites):
        patched = logits(model, x)
    torch.testing.assert_close(patched, logits(model, x), atol=1e-5, rtol=1e-5)


def test_last_layer_output_from_b_gives_bs_logits(model):
    """A and B share the final norm and head, so B's last-block output at every position is B."""
    b = perturbed(model)
    x = ids(1)
    assert not torch.allclose(logits(model, x), logits(b, x), atol=1e-3)
    sites = [Site("model.layers.1")]
    with patch_activations(model, record_activations(b, sites, **x), sites):
        patched = logits(model, x)
    torch.testing.assert_close(patched, logits(b, x), atol=1e-5, rtol=1e-5)


def test_patching_a_head_changes_outputs_only_when_that_head_differs(model):
    """B differs from A only in head 1's query rows of layer 0 (queries are per head, unlike keys
    and values under grouped-query attention): patching head 1 changes A's logits, heads 0, 2, 3 not."""
    b = copy.deepcopy(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        b.model.layers[0].self_attn.q_proj.weight[d:2 * d].mul_(-3.0)
    x = ids(2)
    for head in range(model.config.num_attention_heads):
        sites = [Site("model.layers.0.self_attn.o_proj", head=head)]
        with patch_activations(model, record_activations(b, sites, **x), sites):
            patched = logits(model, x)
        if head == 1:
            assert not torch.allclose(patched, logits(model, x), atol=1e-4)
        else:
            torch.testing.assert_close(patched, logits(model, x), atol=1e-6, rtol=1e-6)


def test_positions_limit_the_patch(model):
    """Patching only the last position leaves every earlier position's logits as they were (causal)."""
    b, x = perturbed(model), ids(3)
    sites = [Site("model.layers.0", positions=(-1,))]
    with patch_activations(model, record_activations(b, sites, **x), sites):
        patched = logits(model, x)
    torch.testing.assert_close(patched[:, :-1], logits(model, x)[:, :-1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(patched[:, -1], logits(model, x)[:, -1], atol=1e-4)


def test_hooks_are_removed_after_the_context(model):
    b, x = perturbed(model), ids(4)
    sites = [Site("model.layers.1")]
    with patch_activations(model, record_activations(b, sites, **x), sites):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_site_naming_no_module_is_a_clear_error(model):
    with pytest.raises(TunelabError, match=r"site module 'model.layers.7.mlp': no such module.*did you mean"):
        record_activations(model, [Site("model.layers.7.mlp")], **ids())
    with pytest.raises(TunelabError, match="no such module"):
        with patch_activations(model, {}, [Site("model.layer.0")]):
            pass
    with pytest.raises(TunelabError, match="head 9 out of range"):
        sites = [Site("model.layers.0.self_attn.o_proj", head=9)]
        with patch_activations(model, record_activations(model, sites, **ids()), sites):
            logits(model, ids())


def test_entity_tracking_rows_are_well_formed():
    rows = load_builtin("builtin:entity_tracking?n=50&num_boxes=4&seed=3")
    assert rows == load_builtin("builtin:entity_tracking?n=50&num_boxes=4&seed=3")
    for r in rows:
        boxes, objects = r.meta["boxes"], r.meta["objects"]
        assert len(set(boxes)) == len(boxes) == 4 and len(set(objects)) == 4
        assert r.answer == objects[boxes.index(r.meta["query_box"])]
        assert r.meta["prompt"].endswith(f"Box {r.meta['query_box']} contains the")
        assert r.text == f"{r.meta['prompt']} {r.answer}."


def test_cmap_on_tiny_models(model, tok):
    """Attribution ranks the one changed head first and agrees in sign with exact patching; patching
    every head of the changed layer from the tuned model recovers its last-token logits' accuracy."""
    tuned = copy.deepcopy(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight[2 * d:3 * d].mul_(4.0)
    with DeviceTrap() as trap:  # every tensor these make names its device (tests/devicetrap.py)
        prompts = encode(load_builtin("builtin:entity_tracking?n=12&num_boxes=2&seed=0"), tok)
        exact = exact_scores(model, tuned, prompts, batch_size=5)
        attr = attribution_scores(model, tuned, prompts, batch_size=5)
        rec = recovery(model, tuned, prompts, ranked_heads(exact.abs()), [1, 8], batch_size=5)
    assert not trap.found, sorted(trap.found)
    changed = exact.abs() > 1e-6
    assert changed.sum() == 1 and changed[1, 2]
    assert (attr[~changed].abs() < 1e-5).all() and torch.sign(attr[1, 2]) == torch.sign(exact[1, 2])
    assert ranked_heads(exact.abs())[0] == (1, 2)
    tuned_logits = last_logits(tuned, prompts)
    all_heads = last_logits(model, prompts, 4, tuned, head_sites(model, [(1, h) for h in range(4)]))
    torch.testing.assert_close(all_heads, tuned_logits, atol=1e-5, rtol=1e-5)
    assert rec.rows[0][1] == rec.rows[1][1] == rec.tuned_accuracy  # only head (1, 2) differs
    assert out_projections(model) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_diagnose_mechanisms_on_a_tiny_run_and_its_chart(tiny_dir, tmp_path):
    """`tunelab diagnose RUN --only mechanisms` writes base/tuned accuracy and the recovery curve;
    the report shows them as a chart."""
    import json

    import tunelab
    from tunelab.cli import main
    from tunelab.report import write_report

    run = tunelab.train({
        "model": {"name": str(tiny_dir)}, "data": {"train": "builtin:entity_tracking?n=16", "max_length": 64},
        "method": {"name": "lora", "r": 2}, "train": {"steps": 2, "micro_batch_size": 4, "lr": 1e-2, "progress": False},
        "eval": {"before": False}, "diagnostics": {"after_train": [], "options": {"mechanisms": {
            "num_prompts": 6, "ks": [1, 2], "top_k": 12, "batch_size": 4}}},  # 12: more than its 8 heads
        "output": str(tmp_path / "run")})
    with DeviceTrap() as trap:
        assert main(["diagnose", str(run), "--only", "mechanisms"]) == 0
    assert not trap.found, sorted(trap.found)
    result = json.loads((run / "diagnostics" / "mechanisms.json").read_text())
    s, rec = result["summary"], result["details"]["recovery"]
    assert 0 <= s["base_accuracy"] <= 1 and 0 <= s["tuned_accuracy"] <= 1 and s["num_prompts"] + s["num_skipped"] == 6
    assert [r[0] for r in rec["rows"]] == [1, 2, 8] and s["top_k"] == 8  # all heads
    assert len(result["details"]["top_heads"]["rows"]) == 8  # 2 layers x 4 heads
    html = write_report(run).read_text()
    assert "entity tracking: base, tuned, base with the tuned model" in html


def test_the_example_recipe_loads():
    from pathlib import Path

    from tunelab import config as C

    cfg = C.load(Path(__file__).resolve().parent.parent / "examples" / "mechanisms" / "arith_lora_cmap.yaml")
    assert cfg.method.name == "lora" and cfg.diagnostics.options["mechanisms"]["scoring"] == "attribution"

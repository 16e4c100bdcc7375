"""Every objective recipe composes with every method: examples/objectives/*.yaml run as given,
with only the model and data swapped for tiny ones, under LoRA and full fine-tuning, and each
objective's own metrics land in metrics.jsonl."""
import json
import math
from pathlib import Path

import pytest
import yaml

import tunelab
from tunelab import config as C
from tunelab.methods import METHODS

RECIPES = sorted((Path(__file__).parent.parent / "examples" / "objectives").glob("*.yaml"))
METHOD_NAMES = METHODS.names()


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from tiny import save_tiny_model_dir
    root = tmp_path_factory.mktemp("compose")
    rows = [{"messages": [{"role": "user", "content": f"call add({i}, 3)"},
                          {"role": "assistant", "content": f"add({i}, 3) = {i + 3}\n#### {i + 3}"}]} for i in range(8)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return save_tiny_model_dir(root / "m"), root / "d.jsonl"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_with_every_method(recipe, method, tiny_setup, tmp_path):
    model_dir, data = tiny_setup
    raw = yaml.safe_load(recipe.read_text())
    raw["method"] = {"name": method, **({"r": 2} if method == "lora" else {})}
    cfg = C.load(None, [f"model.name={model_dir}", f"data.train={data}", "data.eval=null",
                        "data.max_length=64", "train.steps=2", "train.micro_batch_size=2",
                        "train.progress=false", "train.save_every=0", "diagnostics.after_train=[]",
                        f"output={tmp_path / 'run'}"], base=raw)
    run = tunelab.train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(x["loss"]) for x in steps)
    # something trains (GreenTrainer's first step is its probe, which updates nothing: the last step)
    assert all(math.isfinite(x["grad_norm"]) for x in steps) and steps[-1]["grad_norm"] > 0
    own = set(steps[0]) - {"step", "kind", "loss", "lr", "grad_norm", "tokens", "trained_tokens",
                           "tokens_per_s", "step_s"}
    assert own, f"{recipe.stem} reports no metrics of its own"
    assert (run / "final").is_dir()

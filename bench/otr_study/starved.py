"""How much of the cross-entropy OTR's starved tokens hold, on the bench's first 4 batches of 8
builtin:arith examples with the base SmolLM2 (at τ = 1 a token's expected hit rate is its probability p).

    PYTHONPATH=$PWD python bench/otr_study/starved.py > bench/results/otr-starved-first-batches.json
"""
import json, sys
sys.path.insert(0, "bench")
import torch
from common import Settings, examples
from tunelab.data import collate
from tunelab.models import load_model
from tunelab.models.config import ModelConfig
from tunelab.objectives import trained_logits
from tunelab.objectives.otr import STARVED_HIT, starved_share

torch.manual_seed(0)
s = Settings()
tok, exs = examples(s)
model, _ = load_model(ModelConfig(name="smollm2-135m"))
out = {}
with torch.no_grad():
    for b in range(4):
        logits, targets = trained_logits(model, collate(exs[b * 8:(b + 1) * 8], packing=True, pad_id=tok.pad_token_id))
        logp = torch.log_softmax(logits.float(), -1)
        ce = -logp.gather(-1, targets[:, None])[:, 0]
        out[b] = {"tokens": targets.numel(), "starved_count_share": float(((-ce).exp() < STARVED_HIT).float().mean()),
                  "starved_ce_share": starved_share((-ce).exp(), ce), "mean_ce": float(ce.mean()), "mean_p": float((-ce).exp().mean())}
print(json.dumps(out))

import sys; sys.path.insert(0,'bench')
import torch
from torch.profiler import ProfilerActivity, profile
from common import Settings, examples
from tunelab.data import collate
from tunelab.methods.lora import LoRA, LoRAConfig
from tunelab.models import load_model
from tunelab.models.config import ModelConfig
from tunelab.objectives.sft import SFT
s = Settings(); tok, exs = examples(s)
model, _ = load_model(ModelConfig(name="smollm2-135m"))
model = LoRA(LoRAConfig(r=s.lora_r, alpha=s.lora_alpha)).apply(model).train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, foreach=True)
def step(i):
    out = SFT().loss(model, collate(exs[i * 8:(i + 1) * 8], packing=True, pad_id=tok.pad_token_id))
    out.loss_sum.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step(0)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    step(1)
tot = sum(e.self_cpu_time_total for e in prof.key_averages())
print("total ms", tot/1e3)
for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:40]:
    print("%5.2f%% %5d %-45s %s" % (100*e.self_cpu_time_total/tot, e.count, e.key, str(e.input_shapes)[:110]))

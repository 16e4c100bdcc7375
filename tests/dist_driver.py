"""Run under torchrun by tests/test_distributed.py and tests/test_gpu.py: train each config of a
JSON list in turn, in one process group (so the 5-10 s of importing torch and starting processes is
paid once), then print the process group's backend (gloo, nccl).
Usage: torchrun --standalone --nproc-per-node N tests/dist_driver.py CONFIGS.json"""
import json
import sys

import torch

import tunelab

for cfg in json.loads(open(sys.argv[1]).read()):
    tunelab.train(cfg)
if torch.distributed.is_initialized():
    print(f"process group backend: {torch.distributed.get_backend()}, world size {torch.distributed.get_world_size()}")

"""Run under torchrun by tests/test_distributed.py: train each config of a JSON list in turn, in
one process group (so the 5-10 s of importing torch and starting processes is paid once).
Usage: torchrun --standalone --nproc-per-node N tests/dist_driver.py CONFIGS.json"""
import json
import sys

import tunelab

for cfg in json.loads(open(sys.argv[1]).read()):
    tunelab.train(cfg)

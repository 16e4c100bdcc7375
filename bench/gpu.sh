#!/usr/bin/env bash
# On a lent GPU machine (bench/GPU.md): install the carried wheels, run the GPU checks, then a plan.
#   bash bench/gpu.sh checks | gpu | gpu-1b
# Results land in bench/results/ and, where $OUT is set, are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BENCH_KIT="$PWD/.gpu/kit"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
case "${1:-checks}" in
  checks) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py ;;
  *) python3 bench/run.py "$1" ;;
esac
if [ -n "${OUT:-}" ]; then cp bench/results/*-gpu*.* docs/results/performance.md "$OUT"/ 2>/dev/null || true; fi

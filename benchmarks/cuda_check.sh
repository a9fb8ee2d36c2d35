#!/usr/bin/env bash
# The GPU check run on a lent CUDA machine (the project's image: python3 with torch,
# transformers, pytest, pytest-xdist, pytest-timeout; no install): the CUDA tests, the layer
# benchmark on the GPU, then the core's CPU tests under that machine's torch. Logs and the
# benchmark's JSON go to $OUT (or ./cuda_check_out).
set -uo pipefail
OUT=${OUT:-cuda_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 240 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider --timeout 120 2>&1 | tee "$OUT/test_cuda.log" | tail -40
timeout 200 python3 benchmarks/moe_cuda.py --rounds 20 --json "$OUT/moe_cuda.json" 2>&1 | tee "$OUT/moe_cuda.log"
timeout 200 python3 -m pytest tests/moe tests/hf -q -p no:cacheprovider -n 8 --timeout 120 2>&1 | tee "$OUT/suite.log" | tail -25

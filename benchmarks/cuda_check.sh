#!/usr/bin/env bash
# The GPU check run on a lent CUDA machine (the project's image: python3 with torch,
# transformers, pytest, pytest-xdist, pytest-timeout; no install; a newer transformers can be
# carried as wheels in .whl/): the CUDA tests, the core's and the HF backend's tests under that
# machine's torch, then the layer benchmark on the GPU. Logs and the benchmark's JSON go to $OUT
# (or ./cuda_check_out).
set -uo pipefail
OUT=${OUT:-cuda_check_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -p no:benchmark --timeout 100 2>&1 | tee "$OUT/test_cuda.log" | tail -40
timeout 215 python3 -m pytest tests/moe tests/hf tests/infer/test_generation.py -v -p no:cacheprovider -p no:benchmark -n 16 --timeout 90 --tb=line -W ignore 2>&1 | grep -v " PASSED " | tee "$OUT/suite.log" | tail -25
timeout 150 python3 benchmarks/moe_cuda.py --rounds 10 --json "$OUT/moe_cuda.json" 2>&1 | tee "$OUT/moe_cuda.log"

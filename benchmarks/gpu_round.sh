#!/usr/bin/env bash
# One device round: install fastdit on the GPU machine's own stack (no network), run the test suite
# there (CUDA-only tests included), then the benchmark files given as arguments. Logs and results go
# to $OUT (the device tool brings them back). Usage: bash benchmarks/gpu_round.sh [benchmark files...]
set -uo pipefail
OUT=${OUT:-/tmp/fastdit-gpu-round}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import torch, triton, fastdit, fastdit.kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())" \
  || { echo "install failed"; exit 1; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [ "$#" -gt 0 ]; then
  python3 -m pytest -q -p no:cacheprovider "$@" --benchmark-columns=min,median,max \
    --fastdit-json "$OUT/bench.json" --fastdit-md "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log" | tail -80
fi

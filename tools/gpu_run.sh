#!/bin/bash
# One call on the device machine: GPU tests, then the benchmark. Usage:
#   tools/gpu_run.sh "<pytest args>" "<bench args>"
set -o pipefail
source tools/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__)"
if [ -n "$1" ]; then
  eval timeout 420 python3 -m pytest "$1" 2>&1 | tee "$OUT/pytest.log" | grep -v "^$" | tail -60
fi
if [ -n "$2" ]; then
  timeout 300 python3 tools/bench.py $2 --json "$OUT/bench.json" --out "$OUT/BENCHMARKS.md" 2>&1 | tee "$OUT/bench.log"
fi

#!/bin/bash
# A/B timing on the device machine, baseline against variants in alternating fresh processes:
#   tools/ab.sh "<bench args>" ROUNDS "<--set overrides of variant 1>" ["<variant 2>" ...]
set -o pipefail
source tools/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
bench=$1; rounds=$2; shift 2
for r in $(seq 1 "$rounds"); do
  i=0
  for extra in "" "$@"; do
    echo "== round $r variant $i: ${extra:-baseline}"
    eval python3 tools/bench.py $bench $extra --json "$OUT/ab_${r}_$i.json" --out /dev/null 2>&1 \
      | grep -v "^set \|Warn\|cpu =\|^ \|^{\|^}" | sed 's/^/  /'
    i=$((i + 1))
  done
done

#!/bin/bash
# A/B timing on the device machine, baseline against variants in alternating fresh processes:
#   tools/ab.sh "<bench args>" ROUNDS "<--set overrides of variant 1>" ["<variant 2>" ...]
set -o pipefail
source tools/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
bench=$1; rounds=$2; shift 2
variants=("" "$@")
for r in $(seq 1 "$rounds"); do
  # Even rounds run the variants in reverse order (a process's place in the sequence can shift its times).
  order=($(seq 0 $((${#variants[@]} - 1))))
  if [ $((r % 2)) -eq 0 ]; then order=($(seq $((${#variants[@]} - 1)) -1 0)); fi
  for i in "${order[@]}"; do
    extra=${variants[i]}
    echo "== round $r variant $i: ${extra:-baseline}"
    eval python3 tools/bench.py $bench $extra --json "$OUT/ab_${r}_$i.json" --out /dev/null 2>&1 \
      | grep -v "^set \|Warn\|cpu =\|^ \|^{\|^}" | sed 's/^/  /'
  done
done

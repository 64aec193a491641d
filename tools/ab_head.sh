#!/bin/bash
# The benchmark of a baseline tree (_head/, e.g. `git archive HEAD | tar -x -C _head`) against this
# tree, alternating in fresh processes; optional further variants of this tree as --set overrides:
#   tools/ab_head.sh "<bench args>" ROUNDS ["<--set overrides of variant 1>" ...]
set -o pipefail
source tools/device_env.sh
bench=$1; rounds=$2; shift 2
specs=("_head|" ".|" "${@/#/.|}")
for r in $(seq 1 "$rounds"); do
  # Even rounds run the trees in reverse order: a process's place in the sequence can shift its times
  # (run M: 0.3 µs on the GEMM forward between byte-identical kernels).
  order=("${specs[@]}")
  if [ $((r % 2)) -eq 0 ]; then order=(); for ((i = ${#specs[@]} - 1; i >= 0; i--)); do order+=("${specs[i]}"); done; fi
  for spec in "${order[@]}"; do
    tree=${spec%%|*}; extra=${spec#*|}
    echo "== round $r tree $tree ${extra}"
    (cd "$tree" && eval PYTHONPATH=$PWD:/tmp/site python3 tools/bench.py $bench $extra --out /dev/null 2>&1 \
      | grep -v "^set \|Warn\|cpu =\|^ \|^{\|^}" | sed 's/^/  /')
  done
done

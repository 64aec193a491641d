#!/bin/bash
# The benchmark of a baseline tree (_head/, e.g. `git archive HEAD | tar -x -C _head`) against this
# tree, alternating in fresh processes: tools/ab_head.sh "<bench args>" ROUNDS
set -o pipefail
source tools/device_env.sh
for r in $(seq 1 "$2"); do
  for tree in _head .; do
    echo "== round $r tree $tree"
    (cd "$tree" && PYTHONPATH=$PWD:/tmp/site python3 tools/bench.py $1 --out /dev/null 2>&1 \
      | grep -v "^set \|Warn\|cpu =\|^ \|^{\|^}" | sed 's/^/  /')
  done
done

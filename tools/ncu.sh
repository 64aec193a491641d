#!/bin/bash
# Hardware counters of linghe kernels (Firecracker machines only): tools/ncu.sh <python script> [args]
OUT=${OUT:-/tmp/out}
ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    -k regex:linghe "$@" > "$OUT/ncu.txt" 2>&1
grep -E "linghe_|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Stall|Theoretical Occupancy|Waves Per SM|Grid Size|Block Size" "$OUT/ncu.txt" | head -80

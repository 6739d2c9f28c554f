#!/usr/bin/env bash
# Profiles the decode GEMMs of one layer with Nsight Compute (the measurement RESULTS.md section 8
# asks for next): one launch of each GEMM kernel at one token count, the sections that say
# whether a kernel is bound by DRAM, issue slots or latency.
#
#   bench/ncu_decode.sh BUILD_DIR [PRESET] [TOKENS] [OUT_FILE]
#       (defaults: kimi-k2, 8 tokens, ncu_<preset>_<tokens>.txt)
#
# MOEJIT_PLAN_OVERRIDE applies as usual (e.g. stream=0 profiles the older family). Never
# changes clocks (--clock-control none).
set -euo pipefail
build=${1:?usage: bench/ncu_decode.sh BUILD_DIR [PRESET] [TOKENS] [OUT_FILE]}
preset=${2:-kimi-k2}
tokens=${3:-8}
out=${4:-ncu_${preset}_${tokens}.txt}
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
[[ -x "$ncu" ]] || { echo "ncu not found (set NCU)" >&2; exit 2; }
"$ncu" --clock-control none --kernel-name regex:moejit_gemm --launch-count 2 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
  --section InstructionStats \
  "$build/tools/moejit" run --preset "$preset" --tokens "$tokens" --finalize on --runs 1 > "$out" 2>&1
grep -E "moejit_gemm|Duration|DRAM Throughput|Compute \(SM\)|Issued Warp|No Eligible|Warp Cycles Per Issued|Achieved Occupancy|Stall" "$out" || true
echo "full report: $out"

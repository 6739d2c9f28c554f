#!/usr/bin/env bash
# Profiles the decode GEMMs of one layer with Nsight Compute: one launch of each GEMM kernel at
# one token count, the sections that say whether a kernel is bound by DRAM, issue slots or
# latency, pipe utilisation and stall reasons; then a source-level pass (per-SASS stall samples)
# summarised per basic block by bench/ncu_source_regions.py (RESULTS.md section 9 used both).
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
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,regex:sm__inst_executed_pipe_.*avg.pct_of_peak_sustained_active' \
  "$build/tools/moejit" run --preset "$preset" --tokens "$tokens" --finalize on --runs 1 > "$out" 2>&1
grep -E "moejit_gemm|Duration|DRAM Throughput|Compute \(SM\)|Issued Warp|No Eligible|Warp Cycles Per Issued|Achieved Occupancy|Stall" "$out" || true
echo "full report: $out"
"$ncu" --clock-control none --kernel-name regex:moejit_gemm --launch-count 2 \
  --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
  "$build/tools/moejit" run --preset "$preset" --tokens "$tokens" --finalize on --runs 1 > "${out%.txt}_source.csv" 2>&1
python3 "$(dirname "$0")/ncu_source_regions.py" "${out%.txt}_source.csv" 1 || true

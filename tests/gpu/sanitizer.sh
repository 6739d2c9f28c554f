#!/usr/bin/env bash
# Runs the small differential cases (Differential.Small*: finalized and unfinalized layers,
# expert parallelism with grouped DeepSeekV3 and SwiGLU alpha/beta/limit, Precomputed with
# invalid ids, NaN/Inf inputs, zero tokens, every unit size of the stream GEMMs) under
# compute-sanitizer memcheck and racecheck.
# Unsanitized they take well under a minute, mostly NVRTC compiles.
#
#   tests/gpu/sanitizer.sh [BUILD_DIR]        (default: build)
#
# A plain run goes first: it shows the cases pass unsanitized and fills the on-disk kernel cache,
# so the sanitized runs load the kernels instead of compiling them again. Device outputs in the
# suite are allocated at their exact sizes, so memcheck sees any write past an output. The script
# exits non-zero if a test fails, a sanitizer reports an error or no case ran (no GPU), and
# prints each sanitizer's summary.
set -euo pipefail

build=${1:-build}
tests="$build/tests/moejit_gpu_tests"
filter='Differential.Small*'
sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [[ -z "$sanitizer" && -x "$candidate" ]]; then sanitizer=$candidate; fi
done

[[ -x "$tests" ]] || { echo "no $tests: build the project first" >&2; exit 2; }
[[ -x "$sanitizer" ]] || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2; exit 2; }

echo "== plain run (also warms the kernel cache)"
plain=$("$tests" --gtest_filter="$filter" 2>&1) || { echo "$plain"; exit 1; }
echo "$plain"
if ! grep -Eq '^\[diff\] summary: [1-9]' <<<"$plain"; then
  echo "no differential case ran (no GPU?): nothing to sanitize" >&2
  exit 3
fi

status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  log=$(mktemp)
  if ! "$sanitizer" --tool "$tool" --error-exitcode 99 \
      "$tests" --gtest_filter="$filter" 2>&1 | tee "$log"; then
    status=1
  fi
  echo "== $tool summary: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY' "$log" | tr '\n' ' ')"
  rm -f "$log"
done
exit $status

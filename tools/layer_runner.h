// Runs one JIT-compiled layer on the GPU for one token count and checks it against the fp64 CPU
// reference (DESIGN.md acceptance rule, reference/compare.h). Shared by `run` and `check`.
#pragma once

#include <string>
#include <vector>

#include "moejit/moejit.h"
#include "reference/compare.h"
#include "reference/device_layer.h"
#include "reference/layer_data.h"

namespace moejit_cli {

struct CaseResult {
  int tokens = 0;
  bool finalize = true;
  moejit::ref::RoutingCompareResult routing;
  moejit::ref::CompareResult output;      // finalized output (unfinalized: after moejit::finalize)
  moejit::ref::CompareResult unfinalized; // gemm2_out rows of the checked slots (finalize off)
  bool layout_ok = true;                  // unfinalized layout equals the reference dispatch
  std::string layout_error;
  int checked_tokens = 0;
  double median_us = 0;                   // whole layer, CUDA events
  int launches = 0;
  bool pass = false;
  std::string line() const;
};

struct CaseOptions {
  int max_checked_tokens = 64;  // tokens compared with the CPU reference (evenly spaced)
  int timing_runs = 20;         // 0: no timing
};

// What one case's launch produced, downloaded, and the CPU reference it was compared with (for
// `moejit check`: the GPU reference comparison and --save).
struct CaseOutputs {
  int tile = 0;                               // tile_rows(T) (finalize off)
  std::vector<uint16_t> out;                  // [T, H] bf16 (finalize off: after moejit::finalize)
  std::vector<int32_t> topk_ids;              // [T, k] global ids
  std::vector<float> topk_weights;            // [T, k]
  std::vector<float> gemm2_out;               // finalize off: [expert_offsets[L], H] fp32
  std::vector<int32_t> expanded_to_permuted;  // finalize off: [T * k]
  std::vector<int32_t> expert_offsets;        // finalize off: [L + 1]
  std::vector<int> checked_tokens;            // tokens compared with the CPU reference
  std::vector<double> reference_out;          // [checked, H] fp64 CPU reference of those tokens
};

// `layer` holds the weights (and receives fresh inputs for T); `dev` has its weights uploaded.
// With `outputs`, the launch's results and the CPU reference are also returned there.
CaseResult run_case(const moejit::MoeSpec& spec, moejit::ref::HostLayer& layer,
                    moejit::ref::DeviceLayer& dev, int T, uint64_t seed,
                    const CaseOptions& options, const moejit::ref::InputOptions& inputs = {},
                    CaseOutputs* outputs = nullptr);

}  // namespace moejit_cli

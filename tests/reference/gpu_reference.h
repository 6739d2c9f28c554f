// The prebuilt GPU reference: deliberately simple CUDA kernels (one thread per output element,
// fp32 accumulation), compiled by nvcc at build time, sharing no device code with templates/.
// Same semantics as the CPU reference (cpu_reference.cpp's header comment), in fp32.
//
// Stages, each its own kernel: route (one thread per token) -> group local slots by expert
// (counting, ascending slot order) -> gemm1 + SwiGLU per (slot, n) -> gemm2 per (slot, h) ->
// finalize per (t, h), local slots only, ascending j.
//
// Plain C++ header: no CUDA types. All pointers are device pointers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moejit/moejit.h"

namespace moejit::ref {

// Results of one run: pointers into the caller's workspace, valid until it is reused.
struct GpuReferenceResult {
  int32_t* topk_ids = nullptr;        // [T, k] global ids (Precomputed: the caller's); -1 = none
  float* topk_weights = nullptr;      // [T, k]
  int32_t* expert_counts = nullptr;   // [L] slots routed to each local expert
  int32_t* local_order = nullptr;     // [T * k] local slots grouped by expert, ascending slot;
                                      // entries past sum(counts) unused
  float* act = nullptr;               // [T * k, I] SwiGLU output; zero rows for non-local slots
  float* y = nullptr;                 // [T * k, H] gemm2 output per slot; zero for non-local
  float* out = nullptr;               // [T, H] finalized, fp32
  uint16_t* out_bf16 = nullptr;       // [T, H] finalized, bf16 bits (round to nearest even)
};

// Workspace bytes a run for this many tokens needs (regions 256-byte aligned).
size_t gpu_reference_workspace_bytes(const MoeSpec& spec, int num_tokens);

// Enqueues the reference on `stream` (no host synchronisation; the caller synchronises before
// reading results). Inputs use moejit::MoeInputs' layouts; packed weights and hidden states
// must be 16-byte aligned (cudaMalloc'd buffers are). To reproduce a kernel's routing exactly
// (e.g. at near-ties), run with spec.routing = Precomputed and the kernel's ids/weights in
// in.topk_ids / in.topk_weights. Throws std::runtime_error naming the failing CUDA call, or
// std::invalid_argument for a missing input, a short workspace or n_group > 64.
GpuReferenceResult gpu_reference_run(const MoeSpec& spec, const MoeInputs& in, int num_tokens,
                                     void* workspace, size_t workspace_bytes, Stream stream);

}  // namespace moejit::ref

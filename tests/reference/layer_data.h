// Host copies of one MoE layer's tensors and their deterministic generators.
//
// Every value is a pure function of (seed, tensor, global index), computed by a counter-based
// hash (splitmix64), so generation runs on all cores, gives the same bytes on any thread count,
// and expert e's weights do not depend on the spec's expert-parallel split (two EP ranks made
// from the same seed hold slices of one unsplit layer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "moejit/moejit.h"

namespace moejit::ref {

// std::allocator whose resize() leaves elements uninitialised: multi-GB weight buffers are
// written once by the parallel generator instead of being zeroed first on one core.
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <class U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible<U>::value) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T>
using HostBuffer = std::vector<T, DefaultInitAllocator<T>>;

struct HostLayer {
  MoeSpec spec;
  int tokens = 0;  // T of the current inputs

  // ---- inputs (make_inputs) ----
  std::vector<uint16_t> hidden;       // [T, H] bf16 bits
  std::vector<float> logits;          // [T, E] values as the kernel reads them
  std::vector<uint16_t> logits_bf16;  // [T, E] bf16 bits, iff spec.logits_dtype == BF16
  std::vector<float> bias;            // [E] iff spec.has_routing_bias
  std::vector<uint16_t> bias_bf16;    // [E] bf16 bits, iff has_routing_bias and bias_dtype BF16
  std::vector<int32_t> topk_ids;      // [T, k] global ids, iff routing == Precomputed
  std::vector<float> topk_weights;    // [T, k], iff routing == Precomputed

  // ---- weights (make_weights), indexed by global expert ----
  HostBuffer<uint8_t> w13;         // [E, 2I, H/2] two int4 per byte, low nibble = even k
  HostBuffer<uint16_t> w13_scale;  // [E, 2I, H/32] bf16 bits
  HostBuffer<uint8_t> w2;          // [E, H, I/2]
  HostBuffer<uint16_t> w2_scale;   // [E, H, I/32] bf16 bits
  std::vector<float> alpha;        // [L] iff spec.swiglu_alpha, index = expert - offset
  std::vector<float> beta;         // [L] iff spec.swiglu_beta
  std::vector<float> limit;        // [L] iff spec.swiglu_limit

  // Routing inputs as the working precision sees them (bias 0 when absent).
  double logit(int t, int e) const { return logits[static_cast<size_t>(t) * spec.num_experts + e]; }
  double bias_of(int e) const { return bias.empty() ? 0.0 : bias[e]; }

  // Row pointers into the packed weights (row r of expert e) and their scales.
  const uint8_t* w13_row(int e, int r) const;
  const uint16_t* w13_scale_row(int e, int r) const;
  const uint8_t* w2_row(int e, int h) const;
  const uint16_t* w2_scale_row(int e, int h) const;
  uint8_t* w13_row(int e, int r);
  uint16_t* w13_scale_row(int e, int r);
  uint8_t* w2_row(int e, int h);
  uint16_t* w2_scale_row(int e, int h);

  // Logits / bias in the spec's dtype, ready to copy to the device (nullptr, 0 when absent).
  const void* logits_data() const;
  size_t logits_bytes() const;
  const void* bias_data() const;
  size_t bias_bytes() const;
};

// Test-only shapes of the generated inputs.
struct InputOptions {
  double logit_std = 2.0;  // logits ~ N(0, logit_std^2)
  // DeepSeekV3 bias ~ N(0, bias_std^2). The bias is shared by all tokens, so a large one
  // concentrates routing on few experts; benchmarks use 0 for uniform routing.
  double bias_std = 0.1;
  // Every token's top-1 (for Precomputed: ids[t][0]) is this global expert; -1 = off.
  int force_expert = -1;
  // Experts no token selects (as long as at least top_k others remain and no NaN is injected).
  std::vector<int> empty_experts;
  // Exact key ties: token t % 3 == 0 ties its k-th pick a with expert a ^ 1 (the k/k+1 boundary
  // when a ^ 1 was not picked), t % 3 == 1 ties its top-1 a with a ^ 1. For DeepSeekV3 the bias
  // is made pairwise equal (bias[e] = bias[e & ~1]) so that the biased keys tie as well.
  bool ties = false;
  // Hidden: token t % 4 == 1 gets NaN at h = 31t mod H, 2 gets +Inf, 3 gets -Inf.
  bool nonfinite_hidden = false;
  // Logits: token t % 4 == 1 gets NaN at e = t mod E, 2 gets +Inf at 7t mod E, 3 -Inf at 13t mod E.
  bool nonfinite_logits = false;
  // Precomputed: token t % 5 == 2 gets id E in its last slot, t % 5 == 4 gets id -1.
  bool invalid_ids = false;
};

// A layer with every tensor the spec needs allocated and zero (for hand-built tests).
HostLayer allocate_layer(const MoeSpec& spec, int tokens);

// Weights for all E experts (and alpha/beta/limit for the local ones), deterministic in seed.
// int4 uniform in -8..7, scales U(0.5, 1.5) / sqrt(21.5 K) rounded to bf16 (21.5 = E[q^2]),
// so each GEMM output is ~N(0, 1) for N(0, 1) inputs; alpha U(0.5, 2), beta U(-0.5, 0.5),
// limit U(2, 8).
HostLayer make_weights(const MoeSpec& spec, uint64_t seed);

// (Re)generates the inputs of `layer` for T tokens, keeping its weights. hidden ~ N(0, 1) in
// bf16; logits ~ N(0, logit_std^2) (rounded to bf16 if the spec says so); bias ~ N(0, 0.1^2);
// Precomputed ids distinct per token with weights U(0.1, 1).
void make_inputs(HostLayer& layer, int tokens, uint64_t seed, const InputOptions& options = {});

// After editing `logits` or `bias` by hand: rounds them to the spec's dtype and refreshes the
// bf16 copies.
void sync_bf16(HostLayer& layer);

// Counter-based hash: a uniform 64-bit value for (seed, stream, index).
uint64_t hash64(uint64_t seed, uint64_t stream, uint64_t index);

}  // namespace moejit::ref

// Route + dispatch in one block, for small token counts (decode): saves a launch and a
// grid-wide dependency. Warp w routes tokens w, w + kWarpsPerBlock, ...; after a barrier the
// block dispatches the slots it just wrote (global writes of a block are visible to the block
// after __syncthreads).
//
// Cfg provides the constants of both moejit_route.cuh and moejit_dispatch.cuh, with
// kThreads = 32 * kWarpsPerBlock.
#pragma once

#include "moejit_dispatch.cuh"
#include "moejit_route.cuh"

namespace moejit_dev {

constexpr int kMaxTokens = 64;  // at most the tokens the planner fuses route and dispatch for (16)

template <class Cfg>
__device__ void route_dispatch_kernel(const RouteDispatchParams& p) {
  static_assert(Cfg::kThreads == 32 * Cfg::kWarpsPerBlock, "one block of routing warps");
  [[maybe_unused]] int tls = 0;  // timeline slot (diagnostic builds only)
#ifdef MOEJIT_TIMELINE
  const unsigned long long t0 = tl_now();
  if (threadIdx.x == 0) tl_next_replay();
  __syncthreads();
  tls = tl_slot();
  if (threadIdx.x == 0) tl_stamp(tls, kTlRouteStart, t0);
#endif
  // Gemm1 planning its first unit from the routed ids (p.routed set) waits for the word to read
  // 1 instead of waiting for this grid, and takes its blocks' second units before that wait
  // too. The workspace holds anything before the first launch (or another launch's data), so
  // the last warp first clears the word and zeroes gemm1's unit counter (which dispatch then
  // leaves alone), fences and only then triggers (a block's first trigger is the one that
  // counts; the other warps route meanwhile and do not trigger). PDL itself promises no
  // visibility of writes made before a trigger: that gemm1's blocks, launched after it, read 0
  // or the 1 set below, and a zero count, rests on the fence returning only once the stores
  // have reached L2, where gemm1's acquire loads and atomics are served (sm_90). The release
  // and acquire of the 1 order everything else. This kernel is launched without PDL: the
  // previous layer's gemm1 has completed.
  const bool trigger_here = p.routed == nullptr || threadIdx.x >= Cfg::kThreads - 32;
  constexpr bool kPackIds = Cfg::kExperts < kRoutedIdNone;  // (moejit_params.h, kRoutedIdSlots)
  const int slots = p.route.num_tokens * Cfg::kTopK;
  if (p.routed != nullptr && threadIdx.x == Cfg::kThreads - 32) {
    *p.routed = 0;
    if (kPackIds) *reinterpret_cast<uint4*>(p.routed + 4) = make_uint4(0u, 0u, 0u, 0u);
    *p.gemm1_counter = 0;
    __threadfence();
  }
  if (trigger_here) {
    __syncwarp();
    pdl_trigger();  // gemm1 may launch now; it waits for this grid (or the word) before reading
  }
  // The ids also go to shared memory, so the dispatch does not read them back from global
  // memory (a round trip per pass over the slots).
  __shared__ int s_ids[kMaxTokens * Cfg::kTopK];
  int* ids = p.route.num_tokens <= kMaxTokens ? s_ids : nullptr;
  // One token: every warp routes it (route_token_block; the same ids and weights).
  bool one = false;
  if constexpr (block_route_serves<Cfg>()) one = p.route.num_tokens == 1;
  if (one) {
    // (It stores the packed ids itself, as soon as it has them.)
    if constexpr (block_route_serves<Cfg>())
      route_token_block<Cfg, Cfg::kThreads>(p.route, 0, ids, tls,
                                            kPackIds && p.routed != nullptr ? p.routed + 4 : nullptr);
  } else {
    for (int t = threadIdx.x >> 5; t < p.route.num_tokens; t += Cfg::kWarpsPerBlock)
      route_token<Cfg>(p.route, t, ids, tls);
  }
  __syncthreads();
  if (threadIdx.x == 0) tl_stamp(tls, kTlRouted);
  // The ids are written (the barrier orders every warp's writes before the release). Released
  // by the last warp: up to 32 slots the dispatch runs on warp 0 alone, which this keeps off
  // the fence.
  if (p.routed != nullptr && threadIdx.x == Cfg::kThreads - 32) {
    if (kPackIds && ids != nullptr && slots <= kRoutedIdSlots && !one) {
      auto code = [&](int s) -> uint32_t {
        const int id = s < slots ? ids[s] : -1;
        return id >= 0 && id < kRoutedIdNone ? static_cast<uint32_t>(id) : kRoutedIdNone;
      };
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = 0x80000000u | (code(2 * i + 1) << 16) | code(2 * i);
      asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p.routed + 4), "r"(w[0]),
                   "r"(w[1]), "r"(w[2]), "r"(w[3])
                   : "memory");
    }
    st_release_gpu(p.routed, 1);
  }
  dispatch_block<Cfg>(p.dispatch, ids ? ids : p.route.topk_ids, tls);
  if (threadIdx.x == 0) tl_stamp(tls, kTlRouteEnd);
}

}  // namespace moejit_dev

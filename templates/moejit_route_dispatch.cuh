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

// fn(index, words) for each 16-byte vector of the T tokens' x rows this thread takes.
template <int kPer, int kVec, int kThreads, class Fn>
__device__ __forceinline__ void for_each_x_vector(const uint4* x, int T, const Fn& fn) {
#pragma unroll 1
  for (int tok = 0; tok < T; ++tok)
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i >= kVec) continue;
      const long long at = static_cast<long long>(tok) * kVec + i;
      const uint4 v = __ldg(x + at);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
      fn(at, w);
    }
}

// A chain with fp16 operands (Cfg::kConvertX; StreamConfig::f16): block 1, beside the routing
// block, writes the tokens' x as fp16 for gemm1. One factor 2^-e for the launch maps the largest
// finite |x| into [2^14, 2^15) (fp16 keeps 11 significant bits at any scale; only elements below
// 2^-29 of that largest one lose bits as subnormals). Elements k = 2, 3 (mod 4) take a further
// 1/16: gemm1's consumers decode those weight nibbles as 16x (moejit_stream.cuh). Non-finite x
// stays non-finite. The factor 2^e goes to word 1 of the routed line as float bits (never 0),
// which the block zeroed before it let gemm1 launch; gemm1's producer waits for it before its
// first x copy and its epilogue multiplies it back. On its own SM the conversion overlaps the
// routing instead of delaying it (bench/RESULTS.md section 36h: +1.3 us at one kimi-k2 token
// done first in the routing block, +0.8-1.0 overlapped there).
template <class Cfg>
__device__ void convert_x_block(const RouteDispatchParams& p) {
  constexpr int kMaxT = 4;  // chains with packed gemm2 units: at most 4 tokens
  constexpr int kVec = Cfg::kH / 8;  // 16-byte vectors per token
  constexpr int kPer = (kVec + Cfg::kThreads - 1) / Cfg::kThreads;  // per thread and token
  static_assert(Cfg::kH % 8 == 0, "x16: whole 16-byte vectors");
  const int T = p.route.num_tokens;
  if (T > kMaxT || p.routed == nullptr) __trap();  // (the host's checks)
  int* flag = p.routed + 1;
  if (threadIdx.x == 0) {
    *flag = 0;
    __threadfence();
    pdl_trigger();  // gemm1 may launch now: it reads 0 or the factor below
  }
  const uint4* x = static_cast<const uint4*>(p.x);
  // Two passes over the tokens, the second's loads served by L1: the largest finite |x|, then
  // the conversion (the values of every token at once would not fit in the registers).
  float m = 0.0f;
  for_each_x_vector<kPer, kVec, Cfg::kThreads>(x, T, [&](long long, const uint32_t(&w)[4]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float a = fabsf(__uint_as_float(w[q] << 16)), b = fabsf(__uint_as_float(w[q] & 0xffff0000u));
      if (a <= 3.4e38f) m = fmaxf(m, a);  // finite only (NaN and Inf compare false)
      if (b <= 3.4e38f) m = fmaxf(m, b);
    }
  });
  __shared__ float s_max[Cfg::kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = m;
  __syncthreads();
  m = 0.0f;
#pragma unroll
  for (int w = 0; w < Cfg::kThreads / 32; ++w) m = fmaxf(m, s_max[w]);
  // floor(log2 m) - 14 from the exponent field (subnormal m: clamped; m = 0: factor 1).
  int e = m > 0.0f ? static_cast<int>((__float_as_uint(m) >> 23) & 0xff) - 127 - 14 : 0;
  e = e < -100 ? -100 : e;
  const float f = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);  // 2^-e
  uint4* x16 = static_cast<uint4*>(p.x16);
  for_each_x_vector<kPer, kVec, Cfg::kThreads>(x, T, [&](long long at, const uint32_t(&w)[4]) {
    uint32_t o[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float g = (q & 1) ? f * 0.0625f : f;  // words 1 and 3: k = 2, 3 (mod 4)
      const __half2 h = __floats2half2_rn(__uint_as_float(w[q] << 16) * g, __uint_as_float(w[q] & 0xffff0000u) * g);
      o[q] = *reinterpret_cast<const uint32_t*>(&h);
    }
    x16[at] = make_uint4(o[0], o[1], o[2], o[3]);
  });
  // gemm1 reads x16 by bulk copies (the async proxy).
  __threadfence();
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) st_release_gpu(flag, static_cast<int>(static_cast<uint32_t>(127 + e) << 23));
}

template <class Cfg>
__device__ void route_dispatch_kernel(const RouteDispatchParams& p) {
  static_assert(Cfg::kThreads == 32 * Cfg::kWarpsPerBlock, "one block of routing warps");
  if constexpr (Cfg::kConvertX)
    if (blockIdx.x != 0) {
      convert_x_block<Cfg>(p);
      return;
    }
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
  // The ids packed beside the word (moejit_params.h): up to Cfg::kPackedIdSlots slots; more than
  // 8 (kWide) are packed and cleared by the last warp's lanes, vector i by lane i, else by its
  // lane 0 alone.
  constexpr bool kPackIds = Cfg::kExperts < kRoutedIdNone;
  constexpr bool kWide = Cfg::kPackedIdSlots > 8;
  static_assert(Cfg::kPackedIdSlots == 8 || Cfg::kPackedIdSlots == kRoutedIdSlots, "route+dispatch: 8 or 64 packed slots");
  const int slots = p.route.num_tokens * Cfg::kTopK;
  if (p.routed != nullptr && (kWide ? threadIdx.x >= Cfg::kThreads - 32 : threadIdx.x == Cfg::kThreads - 32)) {
    const int lane = kWide ? threadIdx.x & 31 : 0;
    if (lane == 0) *p.routed = 0;
    // The vectors of packed ids gemm1 may poll in this launch (vector 0 always).
    if (kPackIds && (!kWide || lane == 0 || (slots <= kRoutedIdSlots && lane < (slots + 7) / 8)))
      *reinterpret_cast<uint4*>(p.routed + routed_id_word(lane)) = make_uint4(0u, 0u, 0u, 0u);
    if (lane == 0) *p.gemm1_counter = 0;
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
      route_token_block<Cfg, Cfg::kThreads, Cfg::kPackedIdSlots>(
          p.route, 0, ids, tls, kPackIds && p.routed != nullptr ? p.routed + 4 : nullptr);
  } else {
    for (int t = threadIdx.x >> 5; t < p.route.num_tokens; t += Cfg::kWarpsPerBlock)
      route_token<Cfg>(p.route, t, ids, tls);
  }
  __syncthreads();
  if (threadIdx.x == 0) tl_stamp(tls, kTlRouted);
  // The ids are written (the barrier orders every warp's writes before the release). Packed
  // (lane i < ceil(slots / 8): vector i) and released by the last warp: up to 32 slots
  // the dispatch runs on warp 0 alone, which this keeps off the fence.
  if (p.routed != nullptr && (kWide ? threadIdx.x >= Cfg::kThreads - 32 : threadIdx.x == Cfg::kThreads - 32)) {
    const int lane = kWide ? threadIdx.x & 31 : 0;
    if (kPackIds && ids != nullptr && slots <= Cfg::kPackedIdSlots && !one && (!kWide || lane < (slots + 7) / 8)) {
      auto code = [&](int s) -> uint32_t {
        const int id = s < slots ? ids[s] : -1;
        return id >= 0 && id < kRoutedIdNone ? static_cast<uint32_t>(id) : kRoutedIdNone;
      };
      uint32_t w[4];
      packed_id_words(lane, code, w);
      st_volatile_v4(p.routed + routed_id_word(lane), w);
    }
    if (lane == 0) st_release_gpu(p.routed, 1);
  }
  dispatch_block<Cfg>(p.dispatch, ids ? ids : p.route.topk_ids, tls);
  if (threadIdx.x == 0) tl_stamp(tls, kTlRouteEnd);
}

}  // namespace moejit_dev

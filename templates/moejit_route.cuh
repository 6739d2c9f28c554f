// Route: per token, select top-k experts and their weights (DESIGN.md, Routing methods).
// One warp per token; lane i holds experts i, i+32, i+64, ... in registers.
//
// Cfg provides: kExperts, kTopK, kMethod, kNGroup, kTopkGroup, kScale (float), kHasBias,
// kLogitsBF16, kBiasBF16, kWarpsPerBlock, kBlockRoute (one-token launches of the fused
// route+dispatch block and the resident layer route with the whole block: route_token_block).
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

// The key an expert is selected by: its score (DeepSeekV3: sigmoid(logit) + bias; otherwise the
// raw logit) as rank_key orders it.
template <class Cfg>
__device__ __forceinline__ uint32_t select_key(float logit, float bias) {
  float score = Cfg::kMethod == kDeepSeekV3 ? sigmoidf_(logit) : logit;
  if constexpr (Cfg::kMethod == kDeepSeekV3) score += bias;
  return rank_key(score);
}

// The end of one token's routing, on one warp: lane j < K holds selection j (sel_id, -1 where
// none is left) and its raw logit; writes ids and weights. logit_of(i) is the raw logit of
// expert lane + 32 i (read only by the methods that normalise over every expert, in the same
// order whichever path selected, so both paths give the same bits).
template <class Cfg, class LogitOf>
__device__ __forceinline__ void route_finish(const RouteParams& p, int t, int sel_id,
                                             float sel_logit, LogitOf logit_of, int* s_ids) {
  constexpr int E = Cfg::kExperts;
  constexpr int K = Cfg::kTopK;
  constexpr int kPer = (E + 31) / 32;
  const int lane = threadIdx.x & 31;
  const bool mine = lane < K;

  float weight = 0.0f;
  if constexpr (Cfg::kMethod == kDefault || Cfg::kMethod == kRenormalizeNaive) {
    float m = neg_inf();
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < E) m = max_nan(m, logit_of(i));
    m = warp_max_nan(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < E) sum += expf(logit_of(i) - m);
    sum = warp_sum(sum);
    const float prob = mine ? expf(sel_logit - m) / sum : 0.0f;
    if constexpr (Cfg::kMethod == kDefault) {
      weight = prob;
    } else {
      const float psum = warp_sum(prob);
      weight = prob / psum;
    }
  } else if constexpr (Cfg::kMethod == kRenormalize) {
    float m = warp_max_nan(mine ? sel_logit : neg_inf());
    const float ex = mine ? expf(sel_logit - m) : 0.0f;
    weight = ex / warp_sum(ex);
  } else if constexpr (Cfg::kMethod == kDeepSeekV3) {
    const float s = mine ? sigmoidf_(sel_logit) : 0.0f;
    weight = s / (warp_sum(s) + 1e-20f) * Cfg::kScale;
  } else if constexpr (Cfg::kMethod == kLlama4 || Cfg::kMethod == kSigmoid ||
                       Cfg::kMethod == kTopKSigmoid) {
    weight = sigmoidf_(sel_logit);
  } else if constexpr (Cfg::kMethod == kTopK) {
    weight = sel_logit;
  } else if constexpr (Cfg::kMethod == kSigmoidRenorm) {
    const float s = mine ? sigmoidf_(sel_logit) : 0.0f;
    weight = s / (warp_sum(s) + 1e-20f);
  }
  if (mine) {
    p.topk_ids[t * K + lane] = sel_id;
    if (s_ids) s_ids[t * K + lane] = sel_id;
    p.topk_weights[t * K + lane] = weight;
  }
}

// s_ids (optional, shared memory): also receives the selected ids, for a dispatch in the same block.
template <class Cfg>
__device__ void route_token(const RouteParams& p, int t, int* s_ids = nullptr, int tls = 0) {
  constexpr int E = Cfg::kExperts;
  constexpr int K = Cfg::kTopK;
  constexpr int kPer = (E + 31) / 32;
  const int lane = threadIdx.x & 31;

  if constexpr (Cfg::kMethod == kPrecomputed) {
    for (int j = lane; j < K; j += 32) {
      p.topk_ids[t * K + j] = p.pre_ids[t * K + j];
      if (s_ids) s_ids[t * K + j] = p.pre_ids[t * K + j];
      p.topk_weights[t * K + j] = p.pre_weights[t * K + j];
    }
    return;
  }

  // Raw logits and the selection score of each expert this lane holds. Every load is issued
  // before any arithmetic: with the sigmoid's division (a branch to a slow path) between them,
  // the loads were serialised, one memory round trip per expert slot (~8 us of a 1-token layer).
  float logit[kPer];
  float bias[kPer];
  float score[kPer];
  uint32_t key[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + 32 * i;
    logit[i] = e < E ? load_as_float<Cfg::kLogitsBF16>(p.logits, static_cast<long long>(t) * E + e)
                     : 0.0f;
    bias[i] = 0.0f;
    if constexpr (Cfg::kMethod == kDeepSeekV3 && Cfg::kHasBias)
      if (e < E) bias[i] = load_as_float<Cfg::kBiasBF16>(p.bias, e);
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    score[i] = Cfg::kMethod == kDeepSeekV3 ? sigmoidf_(logit[i]) : logit[i];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + 32 * i;
    key[i] = 0;
    if (e < E) {
      if constexpr (Cfg::kMethod == kDeepSeekV3) score[i] += bias[i];
      key[i] = rank_key(score[i]);
    } else {
      score[i] = 0.0f;
    }
  }
  if (t == 0 && lane == 0) tl_stamp_after(tls, kTlRKeys, key[0] ^ key[kPer - 1]);

  if constexpr (Cfg::kMethod == kDeepSeekV3 && Cfg::kNGroup > 1) {
    // Group score = sum of the group's top-2 biased scores; keep the best kTopkGroup groups.
    constexpr int G = E / Cfg::kNGroup;
    __shared__ float s_score[Cfg::kWarpsPerBlock][E];
    __shared__ float s_group[Cfg::kWarpsPerBlock][Cfg::kNGroup];
    const int w = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < E) s_score[w][lane + 32 * i] = score[i];
    __syncwarp();
    for (int g = lane; g < Cfg::kNGroup; g += 32) {
      unsigned long long b1 = 0, b2 = 0;
      for (int e = g * G; e < (g + 1) * G; ++e) {
        const unsigned long long k = rank_key_index(rank_key(s_score[w][e]), e);
        if (k > b1) {
          b2 = b1;
          b1 = k;
        } else if (k > b2) {
          b2 = k;
        }
      }
      s_group[w][g] = s_score[w][index_of(b1)] + s_score[w][index_of(b2)];
    }
    __syncwarp();
    __shared__ unsigned char s_keep[Cfg::kWarpsPerBlock][Cfg::kNGroup];
    for (int g = lane; g < Cfg::kNGroup; g += 32) s_keep[w][g] = 0;
    __syncwarp();
    for (int r = 0; r < Cfg::kTopkGroup; ++r) {
      unsigned long long best = 0;
      for (int g = lane; g < Cfg::kNGroup; g += 32)
        if (!s_keep[w][g]) {
          const unsigned long long k = rank_key_index(rank_key(s_group[w][g]), g);
          best = k > best ? k : best;
        }
      best = warp_max_u64(best);
      if (lane == 0) s_keep[w][index_of(best)] = 1;
      __syncwarp();
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !s_keep[w][e / G]) key[i] = 0;
    }
  }

  // Top-k by repeated warp argmax. Each lane keeps its best remaining key (lowest expert on
  // ties), found by a tree over its keys; a round takes the warp's largest key (redux.sync), then
  // the lowest expert holding it (a second redux); the lane that held it clears it, and every
  // lane searches its keys again (the same instructions in every lane: no divergent branch, and
  // the selected logits are read back after the loop, not shuffled in it, so a round is the two
  // reductions and one search). Key 0 is never selectable; with none left, id = -1.
  uint32_t best_key;
  int best_i;  // index into key[] of the lane's best
  auto lane_best = [&]() {
    uint32_t k[kPer];
    int ix[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      k[i] = key[i];
      ix[i] = i;
    }
    // Pairwise maxima, the lower index (= lower expert) first in every pair: ties keep it.
#pragma unroll
    for (int w = 1; w < kPer; w *= 2)
#pragma unroll
      for (int i = 0; i + w < kPer; i += 2 * w)
        if (k[i + w] > k[i]) {
          k[i] = k[i + w];
          ix[i] = ix[i + w];
        }
    best_key = k[0];
    best_i = ix[0];
  };
  lane_best();
  int sel_id = -1;  // lane j < K keeps selection j
#pragma unroll 1
  for (int j = 0; j < K; ++j) {
    const uint32_t top = __reduce_max_sync(kFullMask, best_key);
    const int id = static_cast<int>(__reduce_min_sync(
        kFullMask,
        top != 0 && best_key == top ? static_cast<uint32_t>(lane + 32 * best_i) : 0xffffffffu));
    const bool owner = id == lane + 32 * best_i;
#pragma unroll
    for (int i = 0; i < kPer; ++i) key[i] = owner && i == best_i ? 0u : key[i];
    lane_best();
    if (lane == j) sel_id = id;
  }
  // Its raw logit (the load above brought the line in).
  const float sel_logit =
      lane < K && sel_id >= 0
          ? load_as_float<Cfg::kLogitsBF16>(p.logits, static_cast<long long>(t) * E + sel_id)
          : 0.0f;
  if (t == 0 && lane == 0) tl_stamp_after(tls, kTlRTopK, static_cast<uint32_t>(sel_id));
  route_finish<Cfg>(p, t, sel_id, sel_logit, [&](int i) { return logit[i]; }, s_ids);
}

// Whether route_token_block serves this routing: every method but Precomputed and DeepSeekV3
// with groups (those keep route_token).
template <class Cfg>
__host__ __device__ constexpr bool block_route_serves() {
  return Cfg::kBlockRoute && Cfg::kMethod != kPrecomputed &&
         !(Cfg::kMethod == kDeepSeekV3 && Cfg::kNGroup > 1);
}

// Lanes per group of route_token_block (a power of two up to 32): the widest whose groups that
// hold experts number at least 3 K / 2, so that the threshold leaves few candidates, as long as
// they stay at most 32 (one warp ranks their maxima; at 32 lanes they are at most the warps).
__host__ __device__ constexpr int block_route_groups(int experts, int threads, int lanes) {
  const int groups = (experts + lanes - 1) / lanes;
  return groups < threads / lanes ? groups : threads / lanes;
}
__host__ __device__ constexpr int block_route_lanes(int experts, int threads, int top_k) {
  int g = 32;
  while (g > 1 && 2 * block_route_groups(experts, threads, g) < 3 * top_k &&
         block_route_groups(experts, threads, g / 2) <= 32)
    g /= 2;
  return g;
}

// One token routed by a whole block of kThreads threads (every thread calls it; it passes two
// block barriers), with route_token's result bit for bit (H200, bench/RESULTS.md section 30:
// one warp took ~3.8 us to its routed ids at one kimi-k2 token, ~1.1 of it in 8 selection
// rounds). Thread i holds experts i, i + kThreads, ...: their logits (also into shared memory),
// their keys with the expert folded in (rank_key_index: one order, ties to the lower expert)
// and the largest. Then, without rounds:
//   1. each group's largest key (groups of kLanes lanes, block_route_lanes);
//   2. T = the K-th largest of those (1 where fewer than K groups hold a key): every one of the
//      K best keys is >= T, since the K groups whose largest is >= T each hold one;
//   3. the keys >= T are the candidates (from at most K groups: at most K kLanes kPerT);
//   4. each candidate's rank among the candidates is its selection slot where it is below K.
// Warp 0 ranks them and ends the routing as route_token does (route_finish), from shared memory.
//
// packed (optional: the fused block's RouteDispatchParams::routed + 4, vector 0 of the packed
// ids, with at most kPackSlots (8 or 64) slots and ids below kRoutedIdNone; moejit_params.h):
// warp 0 also stores the ids packed there as soon as they are selected, before the weights, so
// that gemm1's blocks polling those words plan their first units that much earlier.
template <class Cfg, int kThreads, int kPackSlots = 8>
__device__ __forceinline__ void route_token_block(const RouteParams& p, int t, int* s_ids, int tls = 0,
                                                  int* packed = nullptr) {
  static_assert(block_route_serves<Cfg>(), "route_token_block: route_token serves this method");
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "route_token_block: whole warps");
  constexpr int E = Cfg::kExperts;
  constexpr int K = Cfg::kTopK;
  static_assert(K <= 32, "route_token_block: one warp ends the routing");
  constexpr int kPerT = (E + kThreads - 1) / kThreads;
  constexpr int kLanes = block_route_lanes(E, kThreads, K);
  constexpr int kGroups = block_route_groups(E, kThreads, kLanes);  // those that hold experts
  static_assert(kGroups <= 32, "route_token_block: one warp ranks the group maxima");
  constexpr int kCand = E < K * kLanes * kPerT ? E : K * kLanes * kPerT;
  __shared__ float s_logit[E];
  __shared__ unsigned long long s_cand[kCand];
  __shared__ unsigned long long s_gmax[kGroups];
  __shared__ int s_sel[K];
  __shared__ int s_n;
  const int tid = threadIdx.x, lane = tid & 31;
  const bool holds = (tid & ~31) < E;  // the warp holds experts (warp-uniform)

  float logit[kPerT], bias[kPerT];
#pragma unroll
  for (int i = 0; i < kPerT; ++i) {
    const int e = tid + kThreads * i;
    logit[i] = e < E ? load_as_float<Cfg::kLogitsBF16>(p.logits, static_cast<long long>(t) * E + e)
                     : 0.0f;
    bias[i] = 0.0f;
    if constexpr (Cfg::kMethod == kDeepSeekV3 && Cfg::kHasBias)
      if (e < E) bias[i] = load_as_float<Cfg::kBiasBF16>(p.bias, e);
  }
  if (tid == 0) s_n = 0;
  unsigned long long c[kPerT];
  unsigned long long best = 0;
#pragma unroll
  for (int i = 0; i < kPerT; ++i) {
    const int e = tid + kThreads * i;
    c[i] = 0;
    if (e < E) {
      s_logit[e] = logit[i];
      c[i] = rank_key_index(select_key<Cfg>(logit[i], bias[i]), e);  // rank_key is never 0
    }
    best = c[i] > best ? c[i] : best;
  }
  if (t == 0 && tid == 0) tl_stamp_after(tls, kTlRKeys, static_cast<uint32_t>(best >> 32));
  // 1. The group's largest (0 where it holds no expert).
  if (holds) {
    if constexpr (kLanes == 32) {
      const uint32_t hi = __reduce_max_sync(kFullMask, static_cast<uint32_t>(best >> 32));
      const uint32_t lo = __reduce_max_sync(
          kFullMask, static_cast<uint32_t>(best >> 32) == hi ? static_cast<uint32_t>(best) : 0u);
      best = (static_cast<unsigned long long>(hi) << 32) | lo;
    } else {
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(kFullMask, best, o);
        best = other > best ? other : best;
      }
    }
    if (lane % kLanes == 0 && tid / kLanes < kGroups) s_gmax[tid / kLanes] = best;
  }
  __syncthreads();
  if (holds) {
    // 2. T (in every warp that holds experts): the nonzero maxima are distinct, so one has rank
    // K - 1.
    unsigned long long T = 1;
    const unsigned long long v = lane < kGroups ? s_gmax[lane] : 0ull;
    int r = 0;
#pragma unroll
    for (int j = 0; j < kGroups; ++j) r += s_gmax[j] > v ? 1 : 0;
    const unsigned ball = __ballot_sync(kFullMask, lane < kGroups && v != 0 && r == K - 1);
    if (ball) T = __shfl_sync(kFullMask, v, __ffs(ball) - 1);
    // 3. The candidates, appended in any order (their ranks do not depend on it).
#pragma unroll
    for (int i = 0; i < kPerT; ++i) {
      const bool is = c[i] >= T;  // T >= 1: only experts of this launch
      const unsigned m = __ballot_sync(kFullMask, is);
      if (m != 0) {
        int base = 0;
        if (lane == 0) base = atomicAdd(&s_n, __popc(m));
        base = __shfl_sync(kFullMask, base, 0);
        if (is) s_cand[base + __popc(m & ((1u << lane) - 1u))] = c[i];
      }
    }
  }
  __syncthreads();
  // 4. Ranks, on warp 0 (a warp barrier after, not a block one). With fewer than K candidates
  // every expert is one (T = 1): the rest are -1.
  if (tid < 32) {
    const int n = s_n;
    for (int i = lane; i < n; i += 32) {
      const unsigned long long v = s_cand[i];
      int r = 0;
#pragma unroll 8
      for (int j = 0; j < n; ++j) r += s_cand[j] > v ? 1 : 0;
      if (r < K) s_sel[r] = index_of(v);
    }
    if (lane >= n && lane < K) s_sel[lane] = -1;
    __syncwarp();
    const int sel_id = lane < K ? s_sel[lane] : -1;
    const float sel_logit = lane < K && sel_id >= 0 ? s_logit[sel_id] : 0.0f;
    if (t == 0 && lane == 0) tl_stamp_after(tls, kTlRTopK, static_cast<uint32_t>(sel_id));
    if constexpr (K <= kPackSlots && E < kRoutedIdNone) {
      if (packed != nullptr) {  // (the same words route_dispatch_kernel would store)
        auto code = [&](int s) {
          const int id = __shfl_sync(kFullMask, sel_id, s);
          return s < K && id >= 0 ? static_cast<uint32_t>(id) : static_cast<uint32_t>(kRoutedIdNone);
        };
        constexpr bool kOneVector = K <= 8;
        const int v = kOneVector ? 0 : lane;  // lane v < ceil(K / 8) stores vector v
        uint32_t w[4];
        packed_id_words(v, code, w);
        if (kOneVector ? lane == 0 : lane < (K + 7) / 8) st_volatile_v4(packed + (routed_id_word(v) - 4), w);
      }
    }
    route_finish<Cfg>(p, t, sel_id, sel_logit, [&](int i) { return s_logit[lane + 32 * i]; }, s_ids);
  }
}

template <class Cfg>
__device__ void route_kernel(const RouteParams& p) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {  // timeline (diagnostic builds only)
    const unsigned long long t0 = tl_now();
    tl_next_replay();
    tl_stamp(tl_slot(), kTlRouteStart, t0);
  }
  pdl_trigger();  // dispatch may launch now; it waits for this grid before reading
  const int t = blockIdx.x * Cfg::kWarpsPerBlock + (threadIdx.x >> 5);
  // Whole warps leave together, so the warp-synchronous code below sees full warps.
  if (t >= p.num_tokens) return;
  route_token<Cfg>(p, t);
}

}  // namespace moejit_dev

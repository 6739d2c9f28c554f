// Route: per token, select top-k experts and their weights (DESIGN.md, Routing methods).
// One warp per token; lane i holds experts i, i+32, i+64, ... in registers.
//
// Cfg provides: kExperts, kTopK, kMethod, kNGroup, kTopkGroup, kScale (float), kHasBias,
// kLogitsBF16, kBiasBF16, kWarpsPerBlock.
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

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
  const bool mine = lane < K;

  float weight = 0.0f;
  if constexpr (Cfg::kMethod == kDefault || Cfg::kMethod == kRenormalizeNaive) {
    float m = neg_inf();
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < E) m = max_nan(m, logit[i]);
    m = warp_max_nan(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < E) sum += expf(logit[i] - m);
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

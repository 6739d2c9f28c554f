// Dispatch: group the T*k token slots by local expert, each expert padded to a tile of rows.
// Stable: inside an expert, rows hold slots in ascending slot index, so the layout (and every
// result) is deterministic. One block does the whole job; the counts use shared atomics, the
// placement uses warp match + per-warp counts, never global atomics.
//
// Cfg provides: kTopK, kLocalOffset, kLocalExperts, kThreads.
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

// ids: the routed expert ids (p.topk_ids, or a shared-memory copy of them).
template <class Cfg>
__device__ void dispatch_block(const DispatchParams& p, const int* ids) {
  constexpr int L = Cfg::kLocalExperts;
  constexpr int kWarps = Cfg::kThreads / 32;
  __shared__ int s_count[L];
  __shared__ int s_offset[L + 1];
  __shared__ int s_base[L];     // rows of each expert placed by earlier chunks
  __shared__ int s_chunk[L];    // rows of each expert in the current chunk
  __shared__ unsigned short s_warp[kWarps][L];  // per-warp counts, then per-warp prefixes

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int slots = p.num_tokens * Cfg::kTopK;
  const int tile = p.tile;  // 8, 16, 32 or 64 rows: a power of two
  auto padded = [&](int rows) { return (rows + tile - 1) & -tile; };  // no integer division

  auto local_of = [&](int slot) {
    const int l = ids[slot] - Cfg::kLocalOffset;
    return (l >= 0 && l < L) ? l : -1;
  };

  for (int l = tid; l < L; l += Cfg::kThreads) {
    s_count[l] = 0;
    s_base[l] = 0;
  }
  __syncthreads();
  for (int s = tid; s < slots; s += Cfg::kThreads) {
    const int l = local_of(s);
    if (l >= 0) atomicAdd(&s_count[l], 1);
  }
  __syncthreads();

  // Padded exclusive scan by warp 0: lane i owns a contiguous run of experts.
  if (warp == 0) {
    constexpr int kRun = (L + 31) / 32;
    const int first = lane * kRun;
    int run = 0;
    for (int l = first; l < first + kRun && l < L; ++l) run += padded(s_count[l]);
    int incl = run;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += v;
    }
    int off = incl - run;
    for (int l = first; l < first + kRun && l < L; ++l) {
      s_offset[l] = off;
      off += padded(s_count[l]);
    }
    if (lane == 31) s_offset[L] = incl;
  }
  __syncthreads();

  const int total_rows = s_offset[L];
  for (int l = tid; l < L; l += Cfg::kThreads) {
    p.expert_counts[l] = s_count[l];
    p.expert_offsets[l] = s_offset[l];
  }
  if (tid == 0) p.expert_offsets[L] = total_rows;
  // Expert of each row tile (binary search over the padded offsets), -1 past the end.
  for (int b = tid; b < p.max_tiles; b += Cfg::kThreads) {
    const int row = b * tile;
    int e = -1;
    if (row < total_rows) {
      int lo = 0, hi = L - 1;  // last l with s_offset[l] <= row
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_offset[mid] <= row) lo = mid; else hi = mid - 1;
      }
      e = lo;
    }
    p.tile_expert[b] = e;
  }
  for (int i = tid; i < p.num_counters; i += Cfg::kThreads) p.token_counters[i] = 0;
  // Padding rows (and rows past the end) hold no slot.
  for (int r = tid; r < p.max_tiles * tile; r += Cfg::kThreads) p.permuted_to_slot[r] = -1;
  __syncthreads();

  for (int chunk = 0; chunk < slots; chunk += Cfg::kThreads) {
    for (int i = tid; i < kWarps * L; i += Cfg::kThreads) (&s_warp[0][0])[i] = 0;
    __syncthreads();
    const int s = chunk + tid;
    const int l = s < slots ? local_of(s) : -1;
    const unsigned peers = __match_any_sync(kFullMask, l);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (l >= 0 && rank == 0) s_warp[warp][l] = static_cast<unsigned short>(__popc(peers));
    __syncthreads();
    for (int e = tid; e < L; e += Cfg::kThreads) {
      int acc = 0;
      for (int w = 0; w < kWarps; ++w) {
        const int c = s_warp[w][e];
        s_warp[w][e] = static_cast<unsigned short>(acc);
        acc += c;
      }
      s_chunk[e] = acc;
    }
    __syncthreads();
    if (s < slots) {
      int row = -1;
      if (l >= 0) {
        row = s_offset[l] + s_base[l] + s_warp[warp][l] + rank;
        p.permuted_to_slot[row] = s;
      }
      p.expanded_to_permuted[s] = row;
    }
    __syncthreads();
    for (int e = tid; e < L; e += Cfg::kThreads) s_base[e] += s_chunk[e];
    __syncthreads();
  }

  // Fused finalize: a token none of whose slots is local gets a zero output row here.
  if (p.out) {
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    for (int t = warp; t < p.num_tokens; t += kWarps) {
      bool any = false;
      for (int j = 0; j < Cfg::kTopK; ++j) any |= local_of(t * Cfg::kTopK + j) >= 0;
      if (!any)
        for (int h = lane; h < p.hidden; h += 32)
          out[static_cast<long long>(t) * p.hidden + h] = __float2bfloat16_rn(0.0f);
    }
  }
}

template <class Cfg>
__device__ void dispatch_kernel(const DispatchParams& p) {
  pdl_wait();
  pdl_trigger();
  dispatch_block<Cfg>(p, p.topk_ids);
}

}  // namespace moejit_dev

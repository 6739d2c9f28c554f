// Dispatch: group the T*k token slots by local expert, each expert padded to a tile of rows.
// Stable: inside an expert, rows hold slots in ascending slot index, so the layout (and every
// result) is deterministic. One block does the whole job; the counts use shared atomics, the
// placement uses warp match + per-warp counts, never global atomics.
//
// Cfg provides: kTopK, kLocalOffset, kLocalExperts, kThreads.
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

// Fused finalize (p.out): a token none of whose slots is local gets a zero output row here.
template <class Cfg>
__device__ void dispatch_zero_unrouted(const DispatchParams& p, const int* ids) {
  if (!p.out) return;
  constexpr int kWarps = Cfg::kThreads / 32;
  const int lane = threadIdx.x & 31;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  for (int t = threadIdx.x >> 5; t < p.num_tokens; t += kWarps) {
    bool any = false;
    for (int j = 0; j < Cfg::kTopK; ++j) {
      const int l = ids[t * Cfg::kTopK + j] - Cfg::kLocalOffset;
      any |= l >= 0 && l < Cfg::kLocalExperts;
    }
    if (!any)
      for (int h = lane; h < p.hidden; h += 32)
        out[static_cast<long long>(t) * p.hidden + h] = __float2bfloat16_rn(0.0f);
  }
}

// Up to 32 slots (decode: up to 4 tokens of top-8): warp 0 places every slot with warp
// intrinsics, then the block fills the per-expert, per-tile and per-row tables from a sorted list
// of the (at most 32) routed experts in shared memory: one block barrier, where dispatch_block
// passes ten and its work per expert is serial (H200, bench/RESULTS.md section 15: 2.9 us of a
// one-token kimi-k2-tp8 layer). Same outputs as dispatch_block.
template <class Cfg>
__device__ void dispatch_small(const DispatchParams& p, const int* ids, int tls = 0) {
  constexpr int L = Cfg::kLocalExperts;
  static_assert(L < (1 << 22), "dispatch: local expert ids must fit in 22 bits");
  // Routed expert i (ascending id): {expert, first padded row, first position in s_sorted, slots}.
  __shared__ int4 s_list[32];
  __shared__ int s_sorted[32];  // the local slots in (expert, slot) order
  __shared__ int s_n, s_total;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int slots = p.num_tokens * Cfg::kTopK;  // at most 32
  const int tile = p.tile;                      // a power of two
  if (tid < 32) {
    int l = -1;
    if (lane < slots) {
      l = ids[lane] - Cfg::kLocalOffset;
      if (l < 0 || l >= L) l = -1;
    }
    const unsigned peers = __match_any_sync(kFullMask, l);
    const int rank = __popc(peers & ((1u << lane) - 1u));  // earlier slots of the same expert
    const int count = __popc(peers);
    const bool leader = l >= 0 && rank == 0;
    // Over the routed experts below this lane's: padded rows, slots, and how many.
    const int mine = leader ? (l << 8) | count : 0x7fffffff;
    int off = 0, before = 0, idx = 0;
#pragma unroll 8
    for (int j = 0; j < 32; ++j) {
      const int v = __shfl_sync(kFullMask, mine, j);
      if (l >= 0 && v < (l << 8)) {
        off += ((v & 255) + tile - 1) & -tile;
        before += v & 255;
        ++idx;
      }
    }
    const int total = static_cast<int>(
        __reduce_add_sync(kFullMask, leader ? static_cast<unsigned>((count + tile - 1) & -tile) : 0u));
    const unsigned leaders = __ballot_sync(kFullMask, leader);
    if (leader) s_list[idx] = make_int4(l, off, before, count);
    if (l >= 0) s_sorted[before + rank] = lane;
    if (lane < slots) p.expanded_to_permuted[lane] = l >= 0 ? off + rank : -1;
    if (lane == 0) {
      s_n = __popc(leaders);
      s_total = total;
      tl_stamp_after(tls, kTlDispatchWarp, static_cast<uint32_t>(total));
    }
  }
  __syncthreads();
  if (tid == 0) tl_stamp(tls, kTlDispatchBarrier);
  const int n = s_n;
  const int total = s_total;
  // Entries whose expert (by_row: first row) is below v: a binary search of fixed depth without
  // branches, so that the three searches of a thread below overlap (as three loops one after
  // the other, their dependent shared-memory loads took ~1 us of a one-token layer).
  auto count_below = [&](int v, bool by_row) {
    int c = 0;
#pragma unroll
    for (int step = 32; step > 0; step >>= 1)
      if (c + step <= n) {
        const int4 e = s_list[c + step - 1];
        if ((by_row ? e.y : e.x) < v) c += step;
      }
    return c;
  };
  const int rows_all = p.max_tiles * tile;
  const int span = max(L + 1, rows_all);  // rows_all >= max_tiles
  for (int i = tid; i < span; i += Cfg::kThreads) {
    const int ie = count_below(i, false);             // expert i: first entry at or above it
    const int ib = count_below(i * tile + 1, true) - 1;  // tile i: the entry holding its first row
    const int ir = count_below(i + 1, true) - 1;         // row i: the entry holding it
    if (i <= L) {
      const int4 e = ie < n ? s_list[ie] : make_int4(L, total, 0, 0);
      if (i < L) p.expert_counts[i] = e.x == i ? e.w : 0;
      p.expert_offsets[i] = e.y;
    }
    if (i < p.max_tiles) {
      int e = -1, rows = 0;
      if (i * tile < total) {
        const int4 h = s_list[ib];
        e = h.x;
        rows = min(tile, h.y + h.w - i * tile);
      }
      p.tile_expert[i] = e;
      p.tile_rows[i] = rows;
    }
    if (i < rows_all) {
      int slot = -1;
      if (i < total) {
        const int4 h = s_list[ir];
        if (i - h.y < h.w) slot = s_sorted[h.z + i - h.y];
      }
      p.permuted_to_slot[i] = slot;
    }
  }
  for (int i = tid; i < p.num_counters; i += Cfg::kThreads) p.token_counters[i] = 0;
}

// ids: the routed expert ids (p.topk_ids, or a shared-memory copy of them).
template <class Cfg>
__device__ void dispatch_block(const DispatchParams& p, const int* ids, int tls = 0) {
  if constexpr (Cfg::kSmallDispatch)
    if (p.num_tokens * Cfg::kTopK <= 32) {
      dispatch_small<Cfg>(p, ids, tls);
      dispatch_zero_unrouted<Cfg>(p, ids);
      return;
    }
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
    int e = -1, rows = 0;
    if (row < total_rows) {
      int lo = 0, hi = L - 1;  // last l with s_offset[l] <= row
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_offset[mid] <= row) lo = mid; else hi = mid - 1;
      }
      e = lo;
      rows = min(tile, s_offset[lo] + s_count[lo] - row);
    }
    p.tile_expert[b] = e;
    p.tile_rows[b] = rows;
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

  dispatch_zero_unrouted<Cfg>(p, ids);
}

template <class Cfg>
__device__ void dispatch_kernel(const DispatchParams& p) {
  pdl_wait();
  [[maybe_unused]] const int tls = tl_slot();  // timeline (diagnostic builds only)
  if (threadIdx.x == 0) tl_stamp(tls, kTlRouted);
  pdl_trigger();
  dispatch_block<Cfg>(p, p.topk_ids);
  if (threadIdx.x == 0) tl_stamp(tls, kTlRouteEnd);
}

}  // namespace moejit_dev

// A whole one-token layer in one kernel whose blocks hold all of their weights at once (the
// "resident" layer: finalized layers whose routed weights fit in the grid's shared memory).
//
// At one token a small layer (kimi-k2-tp8, qwen3-30b-a3b: 21-25 MB for 8 experts) is mostly fixed
// costs in the four-launch pipeline: routing, dispatch, two GEMM grids that each ramp up and drain,
// and the finalize (bench/RESULTS.md sections 12 and 15). Here every block (one per SM, grid
// Cfg::kGrid, one cooperative launch) routes the token itself (with all its warps where
// Cfg::kBlockRoute, else warp 0; the same result in every block), then copies every weight it
// needs into its own shared memory, one copy per thread: its gemm1 units' weights in
// Cfg::kKP1-deep K parts, each with its own mbarrier, Cfg::kWindow parts in flight (a part is
// issued when the one kWindow before it has landed: copies requested together land together,
// bench/RESULTS.md section 19), then gemm2's rows of every routed slot. The warps
// consume each gemm1 part as it lands. After gemm1's SwiGLU rows are written (global memory, two
// bf16 planes) one grid-wide barrier; gemm2's weights are in shared memory by then, and each block
// owns whole output features across every routed slot, so it also applies the routing weights
// and writes the finalized output: no dispatch tables, no intermediate gemm2 rows, no finalize
// launch.
//
// Work split (deterministic, fixed by blockIdx.x):
//   gemm1 units = (slot j, 8 SwiGLU features): slot-major, block b takes [b U1 / G, (b+1) U1 / G).
//     A unit is one 16-row A tile: its 8 gate rows then its 8 up rows, K = H.
//   gemm2 units = 8 output features: block b takes [b U2 / G, (b+1) U2 / G) for every slot; a
//     slot's rows of the block are one TMA box of 8 * kU2 rows (rows past the block's are read
//     and ignored), split into 16-row A tiles.
//
// The arithmetic, and its order, is the stream GEMMs' (moejit_stream.cuh), so that the output is
// bitwise the unfinalized layer's plus moejit::finalize: one lop3 turns a nibble pair into bf16x2
// (136 + v), per group part = (-136 sum_k b, by MMA of a constant A operand) + the group's MMAs
// against b in the matching k order (act_pos; gemm1's x as it lies with tiled weights, whose w13
// nibbles are in pair order), and an output row is the sum over chains c = 0, 1, ..., CW - 1
// (CW: that stream GEMM's consumer warps) of fmaf(scale, part, acc) over the groups
// of the pairs c, c + CW, ... . With one token, x is MMA column 0 (gemm1) and the activation's hi
// and lo planes are columns 0 and 1 (gemm2, packed like the stream gemm2's tiles of at most 4
// rows) or both column 0 (Cfg::kPacked2 false); the other columns are zeros.
//
// Cfg provides: the routing constants of moejit_route.cuh (kExperts, kTopK, kMethod, kNGroup,
// kTopkGroup, kScale, kHasBias, kLogitsBF16, kBiasBF16, kWarpsPerBlock = 1), kH, kI,
// kLocalOffset, kLocalExperts, kGateFirst, kHasAlpha, kHasBeta, kHasLimit, kGrid, kWarps, kKP1,
// kWindow, kU1, kU2, kChains1 / kChains2 (the stream GEMMs' consumer warps), kPacked2 (the
// stream gemm2 packs both activation planes into one MMA), kSmem (the host's dynamic shared
// memory figure less the 1 KiB alignment slack), kTiledW (WeightFormat::MxInt4G32Tiled: gemm2's
// units split along the tiled layout's blocks of w2 rows, see resident_layer; the scales by maps
// that land them as they lie there, [chunk][row][16 bytes] per box: Layout::s_at).
#pragma once

#include "moejit_route.cuh"
#include "moejit_stream.cuh"

namespace moejit_dev {

namespace resident {

// Grid-wide barrier of a cooperative launch (1-D grid; every thread of every block calls it).
// The driver gives each cooperative launch a workspace {size, barrier word}, its address in
// %envreg1 (high half) and %envreg2 (low half), as cooperative_groups' grid sync reads it (that
// header needs libcu++, which NVRTC does not get here). Block 0 adds 2^31 - (blocks - 1) and
// every other block 1, so the word's top bit flips exactly when all blocks have arrived, whatever
// its value before: no reset between launches.
__device__ __forceinline__ void grid_sync() {
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t hi, lo;
    asm volatile("mov.u32 %0, %%envreg1;\n" : "=r"(hi));
    asm volatile("mov.u32 %0, %%envreg2;\n" : "=r"(lo));
    const uint32_t* bar =
        reinterpret_cast<const uint32_t*>((static_cast<uint64_t>(hi) << 32) | lo) + 1;
    const uint32_t add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    uint32_t old, now;
    // The release orders the block's writes before it (they precede this thread's arrival through
    // the __syncthreads above), the acquire the other blocks' writes before this block's reads.
    asm volatile("atom.add.release.gpu.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(bar), "r"(add) : "memory");
    do {
      asm volatile("ld.acquire.gpu.u32 %0, [%1];\n" : "=r"(now) : "l"(bar) : "memory");
    } while (((old ^ now) & 0x80000000u) == 0);
  }
  __syncthreads();
}

// Shared-memory layout (byte offsets from a 1 KiB-aligned base), shared with the host's
// resident_smem_bytes (compiler/plan.cpp), which the generated Cfg::kSmem must equal.
template <class Cfg>
struct Layout {
  static constexpr int H = Cfg::kH, I = Cfg::kI, S = Cfg::kTopK;
  static constexpr int kRB1 = 8 * H / 2;         // 8 rows of w13, all of K: [H/256][8][128 B]
  static constexpr int kS1Row = H / 16;          // scale bytes per w13 row
  static constexpr int kR2 = 8 * Cfg::kU2;       // w2 rows per slot
  static constexpr int kT2 = (kR2 + 15) / 16;    // gemm2 A tiles per slot
  static constexpr int kS2Row = I / 16;
  // Regions start on 1 KiB (the 128-byte swizzle of the TMA boxes repeats every 8 rows of 128
  // bytes from an aligned base).
  __host__ __device__ static constexpr int al(int x) { return (x + 1023) / 1024 * 1024; }
  static constexpr int kW1 = 0;                                   // [unit][gate, up] row blocks
  static constexpr int kS1 = kW1 + Cfg::kU1 * 2 * kRB1;           // [unit][16 rows] scales
  static constexpr int kW2 = al(kS1 + Cfg::kU1 * 16 * kS1Row);    // [slot][I/256][kR2][128 B]
  static constexpr int kW2Slot = kR2 * I / 2;
  static constexpr int kS2 = kW2 + S * kW2Slot + 1024;            // + a tile's 8 overrun rows
  static constexpr int kX = al(kS2 + (S * kR2 + 8) * kS2Row);     // x
  // Gemm2's activation planes: over gemm1's weights (read by then) where they fit, else after x.
  static constexpr bool kActInW1 = 2 * S * I * 2 <= Cfg::kU1 * 2 * kRB1;
  static constexpr int kAct = kActInW1 ? kW1 : kX;
  static constexpr int kXBytes = kActInW1 || H * 2 > 2 * S * I * 2 ? H * 2 : 2 * S * I * 2;
  // The -136 corrections (see resident_layer): per group of x, then per slot, group and plane.
  static constexpr int kCorr = kX + kXBytes;
  static constexpr int kCorrFloats = H / 32 > 2 * S * (I / 32) ? H / 32 : 2 * S * (I / 32);
  static constexpr int kRed = kCorr + 4 * kCorrFloats;
  static constexpr int kPP1 = Cfg::kKP1 / 64;                      // gemm1 group pairs per part
  // The scale word of groups G, G + 1 (G even) of row r of a box of R rows at offset 0: row-major
  // [row][K / 16 bytes] (row bytes rb), or tiled [chunk][row][16 bytes] (one run per chunk of
  // the box's rows, 16-byte rows: the 8 rows of an ldmatrix-sized read hit different banks).
  __device__ static constexpr uint32_t s_at(int R, int rb, int r, int G) {
    return Cfg::kTiledW ? (G >> 3) * (R * 16) + r * 16 + (G & 7) * 2 : r * rb + G * 2;
  }
  static constexpr int kPairs2 = I / 64;
  // Gemm2 items (slot, A tile, chain set): all chains of a tile per item where the (slot, tile)
  // pairs keep every warp busy, else one chain per item.
  static constexpr int kChainSets2 = S * kT2 >= Cfg::kWarps ? 1 : Cfg::kChains2;
  static constexpr int kItems2 = S * kT2 * kChainSets2;
  static constexpr int kRedFloats = Cfg::kU1 * 16 * Cfg::kChains1 > kItems2 * 32
                                        ? Cfg::kU1 * 16 * Cfg::kChains1
                                        : kItems2 * 32;
  static constexpr int kBytes = kRed + 4 * kRedFloats;
};

// x or an activation row (bf16, act_pos order; x as it lies for tiled weights) as MMA B
// registers of a group pair: 16 bytes per group, thread t's 8 values; zeros where ok == 0.
struct PairB {
  uint4 v[2];
  __device__ void load(uint32_t addr, uint32_t ok) {
    v[0] = stream::lds128_if(addr, ok);
    v[1] = stream::lds128_if(addr + 64, ok);
  }
};

// The A registers of k-step s of a group: nibble pairs (2s, 2s + 4) and (2s + 1, 2s + 5) of rows
// g (word w0) and g + 8 (w1) as bf16x2 (136 + v).
__device__ __forceinline__ void a_frag(uint32_t (&af)[4], uint32_t w0, uint32_t w1, int s) {
  const int sh = 8 * s;
  af[0] = nib_pair(w0 >> sh);
  af[1] = nib_pair(w1 >> sh);
  af[2] = nib_pair(w0 >> (sh + 4));
  af[3] = nib_pair(w1 >> (sh + 4));
}

// One group of a 16-row A tile (words w0: row g, w1: row g + 8) against B (k-steps 0 and 1 in
// v.x/v.y and v.z/v.w): adds sum_k (136 + v) b to the 4 accumulators.
__device__ __forceinline__ void group_mma(float (&d)[4], uint32_t w0, uint32_t w1, const uint4& v) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    uint32_t af[4];
    a_frag(af, w0, w1, s);
    stream::mma16816(d, af, s ? v.z : v.x, s ? v.w : v.y);
  }
}

// part_G = (-136 sum_k b, by MMA of a constant A operand) + sum_k (136 + v) b (group_mma), each
// k-step in order: the stream GEMMs' sequence (moejit_stream.cuh). The first half is the same in
// every row and every A tile, so it is computed once per group of B.
__device__ __forceinline__ void group_corr(float (&d)[4], const uint32_t (&neg)[4], const uint4& v) {
  stream::mma16816(d, neg, v.x, v.y);
  stream::mma16816(d, neg, v.z, v.w);
}
// The same with two B operands in one column (the activation's hi and lo planes): per k-step the
// hi plane, then the lo plane (the stream gemm2's unpacked tiles).
__device__ __forceinline__ void group_corr2(float (&d)[4], const uint32_t (&neg)[4], const uint4& h,
                                            const uint4& l) {
  stream::mma16816(d, neg, h.x, h.y);
  stream::mma16816(d, neg, l.x, l.y);
  stream::mma16816(d, neg, h.z, h.w);
  stream::mma16816(d, neg, l.z, l.w);
}
// group_mma with two B operands in one column, as group_corr2.
__device__ __forceinline__ void group_mma2(float (&d)[4], uint32_t w0, uint32_t w1, const uint4& h,
                                           const uint4& l) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    uint32_t af[4];
    a_frag(af, w0, w1, s);
    stream::mma16816(d, af, s ? h.z : h.x, s ? h.w : h.y);
    stream::mma16816(d, af, s ? l.z : l.x, s ? l.w : l.y);
  }
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

}  // namespace resident

template <class Cfg>
__device__ void resident_layer(const ResidentParams& p) {
  using namespace stream;
  using Lay = resident::Layout<Cfg>;
  constexpr int H = Cfg::kH, I = Cfg::kI, S = Cfg::kTopK, L = Cfg::kLocalExperts;
  constexpr int W = Cfg::kWarps, kThreads = 32 * W;
  constexpr int G = Cfg::kGrid;
  constexpr int U1 = S * (I / 8), U2 = H / 8;
  constexpr int KP = Cfg::kKP1, P = H / KP;
  // Gemm2's units per block: [b U2 / G, (b+1) U2 / G); with tiled weights (Cfg::kTiledW), whose
  // w2 rows lie in blocks of kTiledRowsW2 (8 units), each of the H / 64 blocks is split into kP2
  // parts of consecutive units and block b takes part b % kP2 of tile block b / kP2 (blocks past
  // them none), so that a slot's rows are one box of the 4-D map.
  constexpr int kNB2 = H / kTiledRowsW2, kP2 = !Cfg::kTiledW ? 1 : G / kNB2 < 8 ? G / kNB2 : 8;
  static_assert(Cfg::kU1 == (U1 + G - 1) / G &&
                    Cfg::kU2 == (Cfg::kTiledW ? (8 + kP2 - 1) / kP2 : (U2 + G - 1) / G),
                "resident layer: units per block");
  static_assert(!Cfg::kTiledW || kP2 >= 1, "resident layer: tiled w2 needs a block per 64 rows of H");
  static_assert(H % 256 == 0 && I % 256 == 0 && H % KP == 0 && KP % 256 == 0 && KP <= 65536,
                "resident layer: H, I and the K part are multiples of 256");
  static_assert(Lay::kR2 <= (Cfg::kTiledW ? 128 : 256) && P <= 30 && S <= 32,
                "resident layer: TMA box rows (tiled scales: 2 words per row), parts, slots");
  static_assert(Lay::kBytes == Cfg::kSmem, "resident layer: host and device layouts differ");
  static_assert(Cfg::kWarpsPerBlock == 1, "resident layer: route_token's arrays for one warp");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ uint64_t bars[P + 1];  // gemm1 parts, then gemm2 (each completes once per launch)
  __shared__ int s_ids[S];
  __shared__ float s_w[S];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - smem_u32(smem_raw));
  float* red = reinterpret_cast<float*>(smem + Lay::kRed);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int b = blockIdx.x;
  const int a1 = b * U1 / G, n1 = (b + 1) * U1 / G - a1;  // gemm1 units [a1, a1 + n1)
  // gemm2 units [a2, a2 + n2) (8 features each)
  const int a2 = !Cfg::kTiledW ? b * U2 / G : b < kNB2 * kP2 ? 8 * (b / kP2) + 8 * (b % kP2) / kP2 : 0;
  const int n2 = !Cfg::kTiledW    ? (b + 1) * U2 / G - a2
                 : b < kNB2 * kP2 ? 8 * (b / kP2) + 8 * (b % kP2 + 1) / kP2 - a2
                                  : 0;
  // Timeline (diagnostic builds only): thread 0 of each block keeps its stamps until the grid
  // barrier, after which block 0's count of this replay is visible to every block.
  enum { kStart, kRouted, kIssued, kFirst, kLast, kRows, kBarrier, kG2In, kStamps };
#ifdef MOEJIT_TIMELINE
  __shared__ unsigned long long tl[kStamps];  // (in registers, 32 warps' kernels spilled)
#else
  [[maybe_unused]] unsigned long long tl[kStamps];  // never read: compiled away
#endif
  if (tid == 0) tl[kStart] = tl_now();
  if (tid == 0) {
    if (b == 0) tl_next_replay();
    for (int i = 0; i <= P; ++i) mbar_init(&bars[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if (tid == 32) {  // the maps' descriptors into cache while warp 0 routes
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&p.tma_w1)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&p.tma_w2)) : "memory");
  }

  // ---- routing: every block (the whole block where Cfg::kBlockRoute, else warp 0), into shared
  // memory; block 0 also publishes it ----
  {
    RouteParams rp = p.route;
    rp.topk_ids = s_ids;  // generic pointers to shared memory
    rp.topk_weights = s_w;
    // (The planner keeps it to 16 warps: with 32 the inlined routing made the kernel spill at
    // its 64 registers, and as a call it took qwen3-30b-a3b's routing from 1.8 to 3.1 us; H200,
    // bench/RESULTS.md section 30.)
    static_assert(!Cfg::kBlockRoute || W <= 16, "resident layer: the whole block routes with at most 16 warps");
    if constexpr (block_route_serves<Cfg>())
      route_token_block<Cfg, kThreads>(rp, 0, nullptr);
    else if (warp == 0)
      route_token<Cfg>(rp, 0);
  }
  __syncthreads();
  if (tid == 0) tl[kRouted] = tl_now();
  auto local_of = [&](int j) {
    const int l = s_ids[j] - Cfg::kLocalOffset;
    return l >= 0 && l < L ? l : -1;
  };

  // ---- the copies: thread c issues copy c, thread 0 announces each barrier's bytes ----
  // Copy c: for gemm1 unit c / kJobs1, part (c % kJobs1) % P of its gate, then its up rows, then
  // the two rows' scales; after the units, per slot, gemm2's weight box and its scales.
  constexpr int kJobs1 = 2 * P + 2;
  static_assert(Cfg::kU1 * kJobs1 + 2 * S <= kThreads, "resident layer: one copy per thread");
  const int jobs = n1 * kJobs1 + (n2 > 0 ? 2 * S : 0);
  const unsigned char* s1 = static_cast<const unsigned char*>(p.w1_scale);
  const unsigned char* s2 = static_cast<const unsigned char*>(p.w2_scale);
  auto issue = [&](int c) {
    if (c < n1 * kJobs1) {
      const int u = c / kJobs1, r = c % kJobs1;
      const int id = a1 + u, j = id / (I / 8), fb = id % (I / 8);
      const int l = local_of(j);
      if (l < 0) return;
      const int half = r < 2 * P ? r / P : r - 2 * P;  // 0: gate rows, 1: up rows
      const int row =
          (l + Cfg::kLocalOffset) * 2 * I + ((half == 0) == Cfg::kGateFirst ? 0 : I) + 8 * fb;
      if (r < 2 * P) {
        const int q = r % P;
        tma_load_4d(base + Lay::kW1 + (u * 2 + half) * Lay::kRB1 + q * (KP / 256) * 1024,
                    &p.tma_w1, 0, static_cast<unsigned>(row) % kTiledRowsW13, q * (KP / 256),
                    static_cast<unsigned>(row) / kTiledRowsW13, &bars[q]);
      } else {
        if constexpr (Cfg::kTiledW)  // (the 8 rows' run of each chunk: [chunk][8 rows][16 bytes])
          tma_load_3d(base + Lay::kS1 + (u * 16 + half * 8) * Lay::kS1Row, &p.tma_s1,
                      2 * (static_cast<unsigned>(row) % kTiledRowsW13), 0,
                      static_cast<unsigned>(row) / kTiledRowsW13, &bars[0]);
        else
          bulk_load(base + Lay::kS1 + (u * 16 + half * 8) * Lay::kS1Row,
                    s1 + static_cast<long long>(row) * Lay::kS1Row, 8 * Lay::kS1Row, &bars[0]);
      }
    } else {
      const int r = c - n1 * kJobs1, j = r >> 1;
      const int l = local_of(j);
      if (l < 0) return;
      const int row = (l + Cfg::kLocalOffset) * H + 8 * a2;
      if ((r & 1) == 0) {
        if constexpr (Cfg::kTiledW) {  // (the slot's rows lie in one block of the 4-D map)
          tma_load_4d(base + Lay::kW2 + j * Lay::kW2Slot, &p.tma_w2, 0,
                      static_cast<unsigned>(row) % kTiledRowsW2, 0,
                      static_cast<unsigned>(row) / kTiledRowsW2, &bars[P]);
        } else {
          tma_load_3d(base + Lay::kW2 + j * Lay::kW2Slot, &p.tma_w2, 0, row, 0, &bars[P]);
        }
      } else if constexpr (Cfg::kTiledW) {  // ([chunk][kR2 rows][16 bytes])
        tma_load_3d(base + Lay::kS2 + j * Lay::kR2 * Lay::kS2Row, &p.tma_s2,
                    2 * (static_cast<unsigned>(row) % kTiledRowsW2), 0,
                    static_cast<unsigned>(row) / kTiledRowsW2, &bars[P]);
      } else {
        bulk_load(base + Lay::kS2 + j * Lay::kR2 * Lay::kS2Row,
                  s2 + static_cast<long long>(row) * Lay::kS2Row, n2 * I / 2, &bars[P]);
      }
    }
  };
  // When this thread's copy goes out: -1 now, q >= 0 once gemm1's part q has landed (-2: none).
  // Cfg::kWindow parts are in flight at a time, so that DRAM delivers them one after another
  // while the warps consume the ones before (copies requested together land together:
  // bench/RESULTS.md section 19); gemm2's copies join behind gemm1's last part; the scales go
  // with part 0.
  constexpr int D = Cfg::kWindow;
  static_assert(D >= 1 && D <= P, "resident layer: 1 to P parts in flight");
  const int issue_at = tid >= jobs            ? -2
                       : tid >= n1 * kJobs1   ? max(P - D, -1)
                       : tid % kJobs1 >= 2 * P ? -1
                                               : max(tid % kJobs1 % P - D, -1);
  if (b == 0 && tid < S) {
    if (p.route.topk_ids) p.route.topk_ids[tid] = s_ids[tid];
    if (p.route.topk_weights) p.route.topk_weights[tid] = s_w[tid];
  }
  if (tid == 0) {  // (a copy that lands first takes the barrier's tx-count below zero meanwhile)
    int local1 = 0;  // local gemm1 units of this block
    for (int u = 0; u < n1; ++u) local1 += local_of((a1 + u) / (I / 8)) >= 0;
    int local2 = 0;
    for (int j = 0; j < S; ++j) local2 += local_of(j) >= 0;
    for (int q = 0; q < P; ++q)
      mbar_expect_tx(&bars[q], local1 * 8 * KP + (q == 0 ? local1 * H : 0));
    // (Tiled scales: the whole box of kR2 rows.)
    mbar_expect_tx(&bars[P], n2 > 0 ? local2 * (Lay::kW2Slot + (Cfg::kTiledW ? Lay::kR2 : 8 * n2) * Lay::kS2Row) : 0);
  }
  if (issue_at == -1) issue(tid);
  if (tid == 0) tl[kIssued] = tl_now();

  // ---- x in act_pos order, or as it lies for tiled weights (w13's nibbles in pair order,
  // moejit.h), while the copies stream ----
  {
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + Lay::kX);
    for (int i = tid; i < H / 8; i += kThreads) {
      const uint4 v = *reinterpret_cast<const uint4*>(x + 8 * i);
      uint4 o = v;
      if constexpr (!Cfg::kTiledW) {  // (x0, x4), (x1, x5), (x2, x6), (x3, x7)
        o.x = __byte_perm(v.x, v.z, 0x5410);
        o.y = __byte_perm(v.x, v.z, 0x7632);
        o.z = __byte_perm(v.y, v.w, 0x5410);
        o.w = __byte_perm(v.y, v.w, 0x7632);
      }
      *reinterpret_cast<uint4*>(xs + 8 * i) = o;
    }
  }
  __syncthreads();

  // The stream GEMMs' order of operations, so that the finalized output equals the unfinalized
  // layer's (stream kernels + moejit::finalize) bitwise: per 16-row A tile and group G,
  // part_G = (-136 sum_k b, by MMA of a constant A) + sum_k (136 + v) b (MMA, k-steps in order);
  // an output row is the sum over chains c = 0, 1, ..., CW - 1 in order, chain c being
  // acc = fmaf(scale_G, part_G, acc) over the groups 2P, 2P + 1 of the pairs P = c, c + CW, ...
  // in order (CW: that GEMM's consumer warps; their stage depth and unit size do not matter).
  const uint32_t kNeg136 = 0xC308C308u;  // bf16x2 (-136, -136)
  const uint32_t neg[4] = {kNeg136, kNeg136, kNeg136, kNeg136};
  const int lm_half = (lane >> 3) & 1, lm_gg = lane >> 4, lm_r = lane & 7;
  // ldmatrix: lane l addresses row l % 8 of matrix l / 8 = (rows 0-7, G), (rows 8-15, G),
  // (rows 0-7, G + 1), (rows 8-15, G + 1).

  float* corr = reinterpret_cast<float*>(smem + Lay::kCorr);
  // x's corrections, one group per warp at a time (column 0: lane 0's C register 0).
  for (int G = warp; G < H / 32; G += W) {
    const uint4 xv = lds128_if(base + Lay::kX + t * 16 + G * 64, g == 0);
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    resident::group_corr(d, neg, xv);
    if (lane == 0) corr[G] = d[0];
  }
  __syncthreads();

  // ---- gemm1, parts in order: items (unit, chain c), item i on warp i % W; each part adds its
  // pairs P = c, c + CW1, ... to the item's chain, kept in registers (rows g and g + 8, column 0:
  // lanes t == 0). ----
  constexpr int CW1 = Cfg::kChains1;
  constexpr int M1 = (Cfg::kU1 * CW1 + W - 1) / W;
  float acc1[M1][2];
#pragma unroll
  for (int m = 0; m < M1; ++m) acc1[m][0] = acc1[m][1] = 0.0f;
  {
    const uint32_t xb = base + Lay::kX + t * 16;
#pragma unroll 1
    for (int q = 0; q < P; ++q) {
      mbar_wait<0>(&bars[q], 0);
      if (issue_at == q) issue(tid);  // the part Cfg::kWindow after this one, or gemm2's
      if (tid == 0 && q == 0) tl[kFirst] = tl_now();
      if (tid == 0 && q == P - 1) tl[kLast] = tl_now();
#pragma unroll
      for (int m = 0; m < M1; ++m) {
        const int i = warp + m * W, u = i / CW1, c = i % CW1;
        if (i >= Cfg::kU1 * CW1 || u >= n1 || local_of((a1 + u) / (I / 8)) < 0) continue;
        const uint32_t wrow = base + Lay::kW1 + (u * 2 + lm_half) * Lay::kRB1 + lm_r * 128;
        const uint32_t srow = base + Lay::kS1 + u * 16 * Lay::kS1Row;  // the gate rows' box, then the up rows'
        // This part's first pair of chain c (its pairs are numbered from q * kPP1).
        const int pp0 = ((c - q * Lay::kPP1) % CW1 + CW1) % CW1;
#pragma unroll 2
        for (int pp = pp0; pp < Lay::kPP1; pp += CW1) {
          const int Gp = q * (KP / 32) + 2 * pp;  // first group of the pair
          const int Gm = Gp + lm_gg;
          uint32_t r4[4];
          ldmatrix_x4(wrow + (Gm >> 3) * 1024 + (((Gm & 7) ^ lm_r) << 4), r4);
          const uint32_t sg = lds32(srow + Lay::s_at(8, Lay::kS1Row, g, Gp)),
                         su = lds32(srow + 8 * Lay::kS1Row + Lay::s_at(8, Lay::kS1Row, g, Gp));
          resident::PairB xv;
          xv.load(xb + Gp * 64, g == 0);
#pragma unroll
          for (int gg = 0; gg < 2; ++gg) {
            const float cr = corr[Gp + gg];
            float d[4] = {cr, cr, cr, cr};
            resident::group_mma(d, r4[2 * gg], r4[2 * gg + 1], xv.v[gg]);
            acc1[m][0] = fmaf(gg ? resident::bf16_hi(sg) : resident::bf16_lo(sg), d[0], acc1[m][0]);
            acc1[m][1] = fmaf(gg ? resident::bf16_hi(su) : resident::bf16_lo(su), d[2], acc1[m][1]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M1; ++m) {
    const int i = warp + m * W, u = i / CW1, c = i % CW1;
    if (i < Cfg::kU1 * CW1 && t == 0) {
      red[(u * 16 + g) * CW1 + c] = acc1[m][0];
      red[(u * 16 + 8 + g) * CW1 + c] = acc1[m][1];
    }
  }
  __syncthreads();
  // SwiGLU per (unit, feature), the chains summed in order; both planes to global memory.
  if (tid < 8 * Cfg::kU1) {
    const int u = tid >> 3, r = tid & 7;
    const int id = a1 + u, j = id / (I / 8), fb = id % (I / 8);
    const int l = u < n1 ? local_of(j) : -1;
    if (l >= 0) {
      float gate = red[(u * 16 + r) * CW1], up = red[(u * 16 + 8 + r) * CW1];
      for (int c = 1; c < CW1; ++c) {
        gate += red[(u * 16 + r) * CW1 + c];
        up += red[(u * 16 + 8 + r) * CW1 + c];
      }
      float alpha = 1.0f, beta = 0.0f, limit = 0.0f;
      if constexpr (Cfg::kHasAlpha) alpha = p.alpha[l];
      if constexpr (Cfg::kHasBeta) beta = p.beta[l];
      if constexpr (Cfg::kHasLimit) limit = p.limit[l];
      __nv_bfloat16 hi, lo;
      split_bf16(swiglu<Cfg::kHasLimit>(gate, up, alpha, beta, limit), hi, lo);
      __nv_bfloat16* act = static_cast<__nv_bfloat16*>(p.act);
      const int o = j * I + act_pos(8 * fb + r);
      act[o] = hi;
      act[S * I + o] = lo;
    }
  }
  if (tid == 0) tl[kRows] = tl_now();
  resident::grid_sync();  // every block's activation rows are written
  if (tid == 0) tl[kBarrier] = tl_now();

  // ---- gemm2: the activation of every local slot (both planes) into shared memory ----
  {
    const __nv_bfloat16* act = static_cast<const __nv_bfloat16*>(p.act);
    __nv_bfloat16* hs = reinterpret_cast<__nv_bfloat16*>(smem + Lay::kAct);
    for (int i = tid; i < S * I / 8; i += kThreads) {
      if (local_of(i / (I / 8)) < 0) continue;
      // Written by other blocks before the grid barrier: .cg loads, past L1.
      *reinterpret_cast<uint4*>(hs + 8 * i) = __ldcg(reinterpret_cast<const uint4*>(act + 8 * i));
      *reinterpret_cast<uint4*>(hs + S * I + 8 * i) =
          __ldcg(reinterpret_cast<const uint4*>(act + S * I + 8 * i));
    }
  }
  __syncthreads();
  // The activation's corrections per (slot, group), where a slot has several A tiles (else each
  // item computes its own): columns 0 and 1 (hi, lo) where packed, else column 0 (both planes).
#pragma unroll 4
  for (int i = warp; i < (Lay::kT2 > 1 ? S * (I / 32) : 0); i += W) {
    const int j = i / (I / 32), G = i % (I / 32);
    if (local_of(j) < 0) continue;
    const uint32_t plane = base + Lay::kAct + t * 16 + (j * I + G * 32) * 2;
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (Cfg::kPacked2) {
      resident::group_corr(d, neg, lds128_if(plane + (g == 1 ? S * I * 2 : 0), g < 2));
    } else {
      resident::group_corr2(d, neg, lds128_if(plane, g == 0), lds128_if(plane + S * I * 2, g == 0));
    }
    if (lane == 0) {
      corr[2 * i] = d[0];
      corr[2 * i + 1] = d[1];
    }
  }
  __syncthreads();
  mbar_wait<0>(&bars[P], 0);
  if (tid == 0) tl[kG2In] = tl_now();
  // Items (slot, A tile, chain set): the stream gemm2's packed tiles (at most 4 rows: the hi
  // plane in one MMA column, the lo plane in another, y = chains' hi + chains' lo) or, with
  // Cfg::kPacked2 false, both planes into one column (plane by plane per k-step). Where the
  // (slot, tile) pairs keep every warp busy a warp runs all CW2 chains of its tile in registers
  // and stores y per plane; else one chain per item, summed in the output pass.
  constexpr int CW2 = Cfg::kChains2;
  constexpr int kSets = Lay::kChainSets2, kPerItem = CW2 / kSets;
  constexpr int M2 = (Lay::kItems2 + W - 1) / W;
  {
    // B columns: the hi plane in column 0 (lanes g = 0), the lo plane in column 1 (g = 1) or,
    // unpacked, both in column 0 (two B operands).
    const uint32_t hb = base + Lay::kAct + t * 16;
#pragma unroll
    for (int m = 0; m < M2; ++m) {
      const int i = warp + m * W;
      if (i >= Lay::kItems2) continue;
      const int cs = i % kSets, tile = (i / kSets) % Lay::kT2, j = i / (kSets * Lay::kT2);
      if (16 * tile >= 8 * n2 || local_of(j) < 0) continue;
      const uint32_t wslot = base + Lay::kW2 + j * Lay::kW2Slot;
      const int row = 16 * tile + 8 * lm_half + lm_r;
      const uint32_t srow = base + Lay::kS2 + j * Lay::kR2 * Lay::kS2Row;  // the slot's box
      float acc[kPerItem][4];  // rows g, g + 8 x (hi, lo): C registers 0, 2 (hi) and 1, 3 (lo)
#pragma unroll
      for (int k = 0; k < kPerItem; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[k][e] = 0.0f;
#pragma unroll
      for (int k = 0; k < kPerItem; ++k) {
#pragma unroll 2
        for (int pp = cs + k * kSets; pp < Lay::kPairs2; pp += CW2) {
          const int Gp = 2 * pp, Gm = Gp + lm_gg;
          uint32_t r4[4];
          ldmatrix_x4(wslot + (Gm >> 3) * (Lay::kR2 * 128) + row * 128 + (((Gm & 7) ^ lm_r) << 4), r4);
          const uint32_t s0 = lds32(srow + Lay::s_at(Lay::kR2, Lay::kS2Row, 16 * tile + g, Gp)),
                         s8 = lds32(srow + Lay::s_at(Lay::kR2, Lay::kS2Row, 16 * tile + g + 8, Gp));
          const uint32_t plane = j * I * 2 + Gp * 64;
          resident::PairB hv, lv;  // packed: hv has hi (g = 0) and lo (g = 1); else hi, lo (g = 0)
          if constexpr (Cfg::kPacked2) {
            hv.load(hb + (g == 1 ? S * I * 2 : 0) + plane, g < 2);
          } else {
            hv.load(hb + plane, g == 0);
            lv.load(hb + S * I * 2 + plane, g == 0);
          }
#pragma unroll
          for (int gg = 0; gg < 2; ++gg) {
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if constexpr (Lay::kT2 > 1) {
              const float ch = corr[2 * (j * (I / 32) + Gp + gg)], cl = corr[2 * (j * (I / 32) + Gp + gg) + 1];
              d[0] = d[2] = ch;
              d[1] = d[3] = cl;
            } else if constexpr (Cfg::kPacked2) {
              resident::group_corr(d, neg, hv.v[gg]);
            } else {
              resident::group_corr2(d, neg, hv.v[gg], lv.v[gg]);
            }
            if constexpr (Cfg::kPacked2)
              resident::group_mma(d, r4[2 * gg], r4[2 * gg + 1], hv.v[gg]);
            else
              resident::group_mma2(d, r4[2 * gg], r4[2 * gg + 1], hv.v[gg], lv.v[gg]);
            const float sg = gg ? resident::bf16_hi(s0) : resident::bf16_lo(s0);
            const float s8g = gg ? resident::bf16_hi(s8) : resident::bf16_lo(s8);
            acc[k][0] = fmaf(sg, d[0], acc[k][0]);
            acc[k][1] = fmaf(sg, d[1], acc[k][1]);
            acc[k][2] = fmaf(s8g, d[2], acc[k][2]);
            acc[k][3] = fmaf(s8g, d[3], acc[k][3]);
          }
        }
      }
      // Lanes t == 0 hold column 0 (and 1) of rows g and g + 8: red[item][set chain][row][plane].
      if (t == 0) {
        float out[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          out[e] = acc[0][e];
#pragma unroll
          for (int k = 1; k < kPerItem; ++k) out[e] += acc[k][e];
        }
        float* r2 = red + i * 32;
        r2[g * 2] = out[0];
        r2[g * 2 + 1] = out[1];
        r2[(g + 8) * 2] = out[2];
        r2[(g + 8) * 2 + 1] = out[3];
      }
    }
  }
  __syncthreads();
  // out[f] = sum_j w_j y_j[f], ascending j, as the finalize kernel sums (y_j: the chains in
  // order, hi plus lo where packed); this block's 8 * n2 features.
  for (int r = tid; r < 8 * n2; r += kThreads) {
    const int tile = r >> 4, rr = r & 15;
    float o = 0.0f;
#pragma unroll 1
    for (int j = 0; j < S; ++j) {
      if (local_of(j) < 0) continue;
      const float* r2 = red + (j * Lay::kT2 + tile) * kSets * 32 + rr * 2;
      float yh = r2[0], yl = r2[1];
      for (int cs = 1; cs < kSets; ++cs) {
        yh += r2[cs * 32];
        yl += r2[cs * 32 + 1];
      }
      const float y = Cfg::kPacked2 ? yh + yl : yh;
      o += s_w[j] * y;
    }
    static_cast<__nv_bfloat16*>(p.out)[8 * a2 + r] = __float2bfloat16_rn(o);
  }
  if (tid == 0) {  // the stamps, once the work is done (each costs the thread ~0.3 us)
    const int tls = tl_slot();
    const int ev[kStamps] = {kTlRouteStart, kTlRouted,    kTlG1Issued,   kTlG1First,
                             kTlResG1Last,  kTlResG1Rows, kTlResBarrier, kTlResG2In};
    for (int e = 0; e < kStamps; ++e) tl_stamp(tls, ev[e], tl[e]);
    tl_stamp(tls, kTlG2End);
  }
}

}  // namespace moejit_dev

// Grouped MXINT4 GEMM over row tiles of the dispatched (expert-grouped) rows.
//
//   out[r, f] = epilogue( sum_k x[r, k] * dequant(W[expert(r), f, k]) )
//
// Gemm1: x rows are gathered from hidden_states (token = slot / top_k), W = w13, and the epilogue
// is SwiGLU over the (gate, up) feature pair. Gemm2: x rows are the activation in permuted order,
// W = w2, no epilogue, fp32 rows. Padding rows of a tile read zeros; Gemm2 writes zeros there.
//
// Tensor cores: mma.sync m16n8k16 bf16 with weights as the A operand (16 features) and rows as
// B (8 rows per n-tile), fp32 accumulation. Thread t of a quad loads one whole MXINT4 group (32 k
// = 16 bytes of a weight row, one 16-byte load, one scale) of a 4-group block. A nibble pair
// becomes the exact bf16 integers v with one prmt (or shift), one lop3 (magic exponent 0x43,
// 136 + v) and one subtraction of 136. The weight v * scale is never rounded to bf16 (the
// reference does not round it either; rounding cost gemm2 rows ~2.5e-3 rel L2 and failed the
// differential bounds on some shapes: bench/RESULTS.md section 49). Two ways, by tile size
// (the faster of the exact variants measured on an H200 for each, section 49):
//  * kGroupMma (tiles of >= 32 rows): a 4x4 transpose of words inside the quad (four shuffles)
//    gives thread t word t (k = 8t..8t+7) of each of the 4 groups, so that every MMA sums over
//    one group: two k-steps into a fresh fp32 accumulator, added to the result times the group's
//    scale in fp32 (acc += scale[f, group] * sum_k v x). x is read as the matching 8 k.
//  * Otherwise each thread feeds its own group over the 8 k-steps of the block (the MMA sums
//    over k in any order shared by both operands), as v * scale split exactly into bf16 hi + lo
//    (hi = bf16(v s), lo = v s - hi, which has at most 4 significant bits): one MMA more per
//    k-step (gemm2: lo times x's hi plane only; lo x lo is below 2^-16 of the product), into
//    accumulators of its own on direct-x tiles, into the hi chain on 16-row tiles (chains of
//    their own there cost registers, and with them blocks per SM, or spilled).
//
// Weights for chunk c+1 are loaded into a second register set while chunk c is multiplied, so
// every thread keeps kIters * AT * 2 16-byte loads in flight.
//
// Grid: x = row tile, y = feature block of kWarpsN * 16 features. Block: kWarpsN * kWarpsK
// warps; the kWarpsK warps of one feature slice split each K chunk and are summed in a fixed
// order at the end (deterministic).
//
// Cfg provides: kGemm1, kN (output features), kK (reduction length), kTopK, kLocalOffset,
// kTile, kWarpsN, kWarpsK, kChunkGroups, kDoubleBuffer, kDirectX, kFuseFinalize, kGateFirst, kHasAlpha, kHasBeta,
// kHasLimit, kTiledW (weights in WeightFormat::MxInt4G32Tiled).
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Streaming 16-byte load: weights are read once, keep them out of L1.
__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Pair P of a word as bf16x2 of the exact integers v. Row-major words hold k = 2P, 2P + 1 (of the
// word's 8) in the low and high nibble of byte P; kPairOrder (tiled w13, moejit.h): at nibbles P
// and P + 4. Both become bf16 136 + v (nib_pair), then 136 is subtracted (exact).
template <int P, bool kPairOrder>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t q) {
  constexpr uint32_t sel = P | (P << 4) | ((4 + P) << 8) | ((4 + P) << 12);
  // Row-major: the low nibble of byte P to bits 0-3, its high nibble to bits 16-19 (a prmt);
  // pair order: one shift.
  const uint32_t x = kPairOrder ? nib_pair(q >> (4 * P)) : nib_pair(__byte_perm(q, q >> 4, sel));
  __nv_bfloat162 r = *reinterpret_cast<const __nv_bfloat162*>(&x);
  const uint32_t k136 = 0x43084308u;  // bf16x2 (136, 136)
  r = __hsub2(r, *reinterpret_cast<const __nv_bfloat162*>(&k136));
  return *reinterpret_cast<uint32_t*>(&r);
}

// v * scale (bf16x2 each) as hi + lo, both bf16x2 and exact together.
__device__ __forceinline__ void split_scaled(uint32_t v2, uint32_t scale2, uint32_t& hi_out,
                                             uint32_t& lo_out) {
  const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&v2);
  const __nv_bfloat162 s = *reinterpret_cast<const __nv_bfloat162*>(&scale2);
  const __nv_bfloat162 hi = __hmul2(v, s);
  const __nv_bfloat162 lo = __hfma2(v, s, __hneg2(hi));
  hi_out = *reinterpret_cast<const uint32_t*>(&hi);
  lo_out = *reinterpret_cast<const uint32_t*>(&lo);
}

// One step of quad_transpose: threads t and t ^ kLane exchange two words. The thread with bit
// kLane of t sends (a0, a1) and receives into them, its partner sends and receives (b0, b1).
template <int kLane>
__device__ __forceinline__ void quad_swap(uint32_t& a0, uint32_t& a1, uint32_t& b0, uint32_t& b1,
                                          int t) {
  const bool up = t & kLane;
  const uint32_t r0 = __shfl_xor_sync(0xffffffffu, up ? a0 : b0, kLane);
  const uint32_t r1 = __shfl_xor_sync(0xffffffffu, up ? a1 : b1, kLane);
  (up ? a0 : b0) = r0;
  (up ? a1 : b1) = r1;
}

// 4x4 transpose of 32-bit words across the 4 threads of a quad (t = lane % 4): on entry word j of
// thread t is M[t][j], on return it is M[j][t]. Threads t and t ^ 2 swap the off-diagonal 2x2
// blocks, then threads t and t ^ 1 swap inside each block.
__device__ __forceinline__ uint4 quad_transpose(uint4 v, int t) {
  quad_swap<2>(v.x, v.y, v.z, v.w, t);
  quad_swap<1>(v.x, v.z, v.y, v.w, t);
  return v;
}

// The finalize fused into gemm2 (decode): after this block's y rows are written, it counts them
// per token; the block that completes a token's local slots for this feature block sums them in
// ascending j (the same arithmetic as moejit_finalize.cuh, so results do not depend on which
// block is last).
template <class Cfg, int H, int kTile, int kFeatures>
__device__ void fused_finalize(const GemmParams& p, int row0, int rows_valid) {
  constexpr int K = Cfg::kTopK;
  __shared__ int s_last[kTile];
  __threadfence();  // this thread's y stores are visible to every block
  __syncthreads();
  const int tid = threadIdx.x;
  if (tid < kTile) {
    int last = -1;
    if (tid < rows_valid) {
      const int t = p.permuted_to_slot[row0 + tid] / K;
      int local = 0;
      for (int j = 0; j < K; ++j) local += p.expanded_to_permuted[t * K + j] >= 0;
      const int seen = atomicAdd(&p.token_counters[t * gridDim.y + blockIdx.y], 1);
      if (seen == local - 1) last = t;
      __threadfence();  // order the other blocks' y stores before the reads below
    }
    s_last[tid] = last;
  }
  __syncthreads();
  const int f = blockIdx.y * kFeatures + tid;
  if (tid >= kFeatures) return;
  const float* y = static_cast<const float*>(p.out);  // fp32 rows
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.final_out);
  for (int r = 0; r < kTile; ++r) {
    const int t = s_last[r];
    if (t < 0) continue;
    float acc = 0.0f;
    for (int j = 0; j < K; ++j) {
      const int row = p.expanded_to_permuted[t * K + j];
      if (row < 0) continue;
      acc += p.weights[t * K + j] * __ldcg(y + static_cast<long long>(row) * H + f);
    }
    out[static_cast<long long>(t) * H + f] = __float2bfloat16_rn(acc);
  }
}

// A row tile's expert (-1: the tile is unused or past max_tiles) and valid rows, and each row's
// source row of x in src (-1 for padding): gemm1 the token of its slot, gemm2 the permuted row
// itself. The caller synchronises before reading src.
template <class Cfg, int kTile>
__device__ __forceinline__ int tile_rows_of(const GemmParams& p, int tile, int& rows_valid, int (&src)[kTile]) {
  const int e = tile < p.max_tiles ? p.tile_expert[tile] : -1;
  if (e < 0) return e;
  const int row0 = tile * kTile;
  rows_valid = min(kTile, p.expert_offsets[e] + p.expert_counts[e] - row0);
  for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
    int v = -1;
    if (r < rows_valid) v = Cfg::kGemm1 ? p.permuted_to_slot[row0 + r] / Cfg::kTopK : row0 + r;
    src[r] = v;
  }
  return e;
}

template <class Cfg>
__device__ void grouped_gemm(const GemmParams& p) {
  constexpr int N = Cfg::kN;
  constexpr int K = Cfg::kK;
  constexpr int KG = K / 32;               // MXINT4 groups along K
  constexpr int kTile = Cfg::kTile;
  constexpr int NT = kTile / 8;            // mma n-tiles (8 rows each)
  constexpr int WN = Cfg::kWarpsN;
  constexpr int WK = Cfg::kWarpsK;
  constexpr int CG = Cfg::kChunkGroups;    // groups per shared-memory chunk
  constexpr int CK = CG * 32;
  constexpr bool kGroupMma = NT >= 4;
  // bf16 per shared row, padded (kGroupMma: by 64 bytes, so that the 16-byte x reads of a quarter
  // warp, rows g and g + 1 at 16 t bytes, hit every bank once; otherwise by 16 bytes).
  constexpr int kStride = CK + (kGroupMma ? 32 : 8);
  constexpr int kIters = CG / (4 * WK);    // 4-group blocks per warp per chunk
  constexpr bool kGemm1 = Cfg::kGemm1;
  constexpr bool kPairW = kGemm1 && Cfg::kTiledW;  // w13 words in pair order (moejit.h)
  constexpr int AT = kGemm1 ? 2 : 1;       // A tiles per warp: (gate, up) or (down)
  constexpr int kThreads = 32 * WN * WK;
  constexpr int kRowBytes = K / 2;
  constexpr int kWRows = kGemm1 ? 2 * N : N;
  // 8-row tiles read x straight from global memory (L1) into registers: no staging, no barriers.
  constexpr bool kDirectX = Cfg::kDirectX;
  static_assert(!kDirectX || (kTile == 8 && Cfg::kDoubleBuffer), "direct x needs 8-row tiles");
  static_assert(!(kDirectX && kGroupMma), "kGroupMma reads x from shared memory");
  // Gemm2 reads the activation as hi and lo bf16 planes (two MMAs per k-step); gemm1's x is
  // bf16 input, exact in one plane.
  constexpr int kPlanes = kGemm1 ? 1 : 2;
  constexpr int kXBytes = kDirectX ? 16 : kPlanes * kTile * kStride * 2;
  constexpr int kRedBytes = WK > 1 ? WK * WN * 32 * AT * NT * 4 * 4 : 0;
  constexpr int kSmemBytes = kXBytes > kRedBytes ? kXBytes : kRedBytes;
  static_assert(CG % (4 * WK) == 0, "chunk must split evenly across the K warps");
  static_assert(N % (16 * WN) == 0, "features must split into 16-row warp tiles");
  static_assert(K % 32 == 0 && kTile % 8 == 0, "shape");

  __shared__ __align__(16) unsigned char s_raw[kSmemBytes];
  __shared__ int s_src[kTile];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(s_raw);

  // Gemm1 reads dispatch's outputs right away. Gemm2 may read them before its wait (gemm1
  // waited for dispatch before triggering gemm2), and waits only before reading gemm1's output.
  if constexpr (kGemm1) {
    pdl_wait();
    pdl_trigger();
  }
  const int tile = blockIdx.x;
  int rows_valid = 0;
  const int e = tile_rows_of<Cfg, kTile>(p, tile, rows_valid, s_src);
  if (e < 0) return;
  const int row0 = tile * kTile;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int f0 = blockIdx.y * (WN * 16) + wn * 16;
  __syncthreads();
  const int x_row = kDirectX && g < rows_valid ? s_src[g] : 0;
  const long long eg = e + Cfg::kLocalOffset;
  const uint8_t* wexp = p.w + eg * kWRows * kRowBytes;
  // Tiled weights (Cfg::kTiledW): an expert's rows are whole blocks of kWBlock rows.
  constexpr int kWBlock = kGemm1 ? kTiledRowsW13 : kTiledRowsW2;
  const __nv_bfloat16* sexp = static_cast<const __nv_bfloat16*>(p.w_scale) + eg * kWRows * KG;
  int arow[AT];
  if constexpr (kGemm1) {
    arow[0] = (Cfg::kGateFirst ? 0 : N) + f0;  // gate
    arow[1] = (Cfg::kGateFirst ? N : 0) + f0;  // up
  } else {
    arow[0] = f0;
  }

  // Independent accumulator chains: consecutive MMAs into one accumulator serialise on the MMA
  // latency. Without kGroupMma, gemm2 keeps its hi and lo planes apart and, on direct-x tiles
  // (one n-tile, one A tile), alternates two chains by k-step parity (gemm1 already has its gate
  // and up chains); there the lo weights have chains of their own (from kLoChain). kGroupMma
  // adds each group's accumulator into chain 0 (fp32 FMAs in ascending group order within a
  // thread's K share). The chains are summed in a fixed order after the K loop.
  constexpr int kPar = kDirectX && !kGemm1 ? 2 : 1;
  constexpr int kLoChain = kDirectX ? kPlanes * kPar : 0;
  constexpr int kChains = kGroupMma ? 1 : kPlanes * kPar + (kDirectX ? kPar : 0);
  float accs[kChains][AT][NT][4];
#pragma unroll
  for (int c = 0; c < kChains; ++c)
#pragma unroll
    for (int a = 0; a < AT; ++a)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) accs[c][a][n][i] = 0.0f;

  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  const __nv_bfloat16* x_lo = static_cast<const __nv_bfloat16*>(p.x_lo);

  // This warp's weights for the chunk starting at group c0 (16-byte streaming loads, zeros
  // past K). Issued one chunk ahead of their use so the loads overlap the previous chunk's MMAs.
  using WRegs = uint4[kIters][AT][2];
  using SRegs = uint32_t[kIters][AT][2];
  const bool x_row_valid = g < rows_valid;
  // Chunk-relative MXINT4 group that this thread feeds to the MMAs in stage step `it`. The four
  // threads of a quad must supply different groups to one MMA; which ones is free. A quad reads
  // 4 consecutive groups (64 contiguous bytes of a row) per load, and the K warps of a block
  // interleave, so a block's warps read whole lines together. (Giving each thread kIters
  // consecutive groups instead measured 15% slower on an H200: half-sector loads that bypass
  // L1 fetch each sector twice from L2. bench/RESULTS.md.)
  auto block_of = [&](int it) { return (wk + it * WK) * 4; };  // the block's first group
  auto group_of = [&](int it) { return block_of(it) + t; };
  auto load_weights = [&](int c0, WRegs& wq, SRegs& sc) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int grp = c0 + group_of(it);
#pragma unroll
      for (int a = 0; a < AT; ++a)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const long long row = arow[a] + g + 8 * h;
          if (grp < KG) {
            // (Tiled: arow[a] is a multiple of 16, so rows g and g + 8 lie in its block, at
            // row % 8 = g: weight_unit_offset with the block's part hoisted.)
            const uint8_t* w =
                Cfg::kTiledW
                    ? wexp + (arow[a] / kWBlock) * (kWBlock * static_cast<long long>(kRowBytes)) +
                          (arow[a] % kWBlock + g + 8 * h) * 128 + (grp >> 3) * (kWBlock * 128) +
                          (((grp & 7) ^ g) << 4)
                    : wexp + row * kRowBytes + grp * 16;
            wq[it][a][h] = load_stream(w);
            // (Tiled scales: [chunk of 8 groups][kWBlock rows][8] per block of rows.)
            const long long s_idx =
                Cfg::kTiledW ? (arow[a] / kWBlock) * (kWBlock * static_cast<long long>(KG)) + (grp >> 3) * (kWBlock * 8) +
                                   (arow[a] % kWBlock + g + 8 * h) * 8 + (grp & 7)
                             : row * KG + grp;
            const unsigned short sv = __bfloat16_as_ushort(sexp[s_idx]);
            sc[it][a][h] = sv;
          } else {
            wq[it][a][h] = make_uint4(0, 0, 0, 0);
            sc[it][a][h] = 0;
          }
        }
    }
  };
  // The tile's valid rows of x for the chunk into shared memory (zeros past K). Padding rows
  // are never stored or read: their B fragments are zero registers.
  auto fill_x = [&](int c0) {
    constexpr int kUnitsPerRow = CK / 8;
    for (int u = tid; u < rows_valid * kUnitsPerRow; u += kThreads) {
      const int r = u / kUnitsPerRow;
      const int cu = u % kUnitsPerRow;
      const int kk = c0 * 32 + cu * 8;
      const long long at = static_cast<long long>(s_src[r]) * K + kk;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (kk < K) v = *reinterpret_cast<const uint4*>(x + at);
      *reinterpret_cast<uint4*>(xs + r * kStride + cu * 8) = v;
      if constexpr (kPlanes == 2) {
        uint4 w = make_uint4(0, 0, 0, 0);
        if (kk < K) w = *reinterpret_cast<const uint4*>(x_lo + at);
        *reinterpret_cast<uint4*>(xs + (kTile + r) * kStride + cu * 8) = w;
      }
    }
  };
  // MMAs of one chunk: per 4-group block, the quad's words transposed (thread t: word t of each
  // group), then per group two k-steps into a fresh accumulator and one scaled add.
  constexpr int kGroupUnroll = AT * NT <= 4 ? 4 : 1;
  auto compute_groups = [&](int c0, const WRegs& wq, const SRegs& sc) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      uint4 wt[AT][2];
      uint32_t sp[AT];  // this thread's group's scales: row g in bits 0-15, row g + 8 in 16-31
#pragma unroll
      for (int a = 0; a < AT; ++a) {
#pragma unroll
        for (int h = 0; h < 2; ++h) wt[a][h] = quad_transpose(wq[it][a][h], t);
        sp[a] = sc[it][a][0] | (sc[it][a][1] << 16);
      }
      // Groups one after another where their accumulators are large (64-row tiles hold 64 floats
      // per group and would spill); small tiles unroll them, so the groups' MMA chains overlap.
#pragma unroll(kGroupUnroll)
      for (int j = 0; j < 4; ++j) {
        const int gi = block_of(it) + j;  // chunk-relative group
        // x from shared memory: k = 8t..8t+7 of group gi per row (k-step 0 takes the first
        // four), both planes.
        uint4 xv[kPlanes][NT];
#pragma unroll
        for (int q = 0; q < kPlanes; ++q)
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            xv[q][n] = make_uint4(0, 0, 0, 0);
            if (n * 8 + g < rows_valid)
              xv[q][n] = *reinterpret_cast<const uint4*>(
                  xs + (q * kTile + n * 8 + g) * kStride + gi * 32 + 8 * t);
          }
        float part[AT][NT][4] = {};
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int a = 0; a < AT; ++a) {
            const uint32_t w0 = word_of(wt[a][0], j);
            const uint32_t w1 = word_of(wt[a][1], j);
            uint32_t af[4];
            af[0] = s ? dequant_pair<2, kPairW>(w0) : dequant_pair<0, kPairW>(w0);
            af[1] = s ? dequant_pair<2, kPairW>(w1) : dequant_pair<0, kPairW>(w1);
            af[2] = s ? dequant_pair<3, kPairW>(w0) : dequant_pair<1, kPairW>(w0);
            af[3] = s ? dequant_pair<3, kPairW>(w1) : dequant_pair<1, kPairW>(w1);
#pragma unroll
            for (int q = 0; q < kPlanes; ++q)
#pragma unroll
              for (int n = 0; n < NT; ++n)
                if (n * 8 < rows_valid)
                  mma_bf16_16816(part[a][n], af, s ? xv[q][n].z : xv[q][n].x,
                                 s ? xv[q][n].w : xv[q][n].y);
          }
#pragma unroll
        for (int a = 0; a < AT; ++a) {
          // Group gi's scales of rows g and g + 8 from thread j of the quad.
          const uint32_t sj = __shfl_sync(0xffffffffu, sp[a], j, 4);
          const float s_lo = __uint_as_float(sj << 16);
          const float s_hi = __uint_as_float(sj & 0xffff0000u);
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i)
              accs[0][a][n][i] = fmaf(i < 2 ? s_lo : s_hi, part[a][n][i], accs[0][a][n][i]);
        }
      }
    }
  };

  // MMAs of one chunk without kGroupMma: 8 k-steps per 4-group block, each thread's own group.
  auto compute_split = [&](int c0, const WRegs& wq, const SRegs& sc) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int gi = group_of(it);  // chunk-relative group of this thread
      // Direct x: row g of the tile, this group's 32 values, 8 bytes per k-step (L1 hits after
      // the first warp; only lanes of valid rows load).
      const long long x_at = static_cast<long long>(x_row) * K + static_cast<long long>(c0 + gi) * 32;
      const uint2* xr = reinterpret_cast<const uint2*>(x + x_at);
      const uint2* xr_lo = reinterpret_cast<const uint2*>(x_lo + x_at);
      const bool x_ok = kDirectX && x_row_valid && c0 + gi < KG;
      uint32_t s2[AT][2];  // the scales as bf16x2 (s, s)
#pragma unroll
      for (int a = 0; a < AT; ++a)
#pragma unroll
        for (int h = 0; h < 2; ++h) s2[a][h] = __byte_perm(sc[it][a][h], 0, 0x1010);
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint32_t b[kPlanes][NT][2];
#pragma unroll
        for (int q = 0; q < kPlanes; ++q)
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            b[q][n][0] = b[q][n][1] = 0;
            if constexpr (kDirectX) {
              if (x_ok) {
                const uint2 v = __ldg((q ? xr_lo : xr) + s);
                b[q][n][0] = v.x;
                b[q][n][1] = v.y;
              }
            } else if (n * 8 + g < rows_valid) {
              const uint2 v = *reinterpret_cast<const uint2*>(
                  xs + (q * kTile + n * 8 + g) * kStride + gi * 32 + 4 * s);
              b[q][n][0] = v.x;
              b[q][n][1] = v.y;
            }
          }
#pragma unroll
        for (int a = 0; a < AT; ++a) {
          // Pairs 2s and 2s + 1 of the group (k = 4s..4s+3): word s / 2, pairs 2 (s % 2) + 0, 1.
          uint32_t af[4], al[4];
          const uint32_t w0 = word_of(wq[it][a][0], s / 2);
          const uint32_t w1 = word_of(wq[it][a][1], s / 2);
          split_scaled(s % 2 ? dequant_pair<2, kPairW>(w0) : dequant_pair<0, kPairW>(w0), s2[a][0], af[0], al[0]);
          split_scaled(s % 2 ? dequant_pair<2, kPairW>(w1) : dequant_pair<0, kPairW>(w1), s2[a][1], af[1], al[1]);
          split_scaled(s % 2 ? dequant_pair<3, kPairW>(w0) : dequant_pair<1, kPairW>(w0), s2[a][0], af[2], al[2]);
          split_scaled(s % 2 ? dequant_pair<3, kPairW>(w1) : dequant_pair<1, kPairW>(w1), s2[a][1], af[3], al[3]);
#pragma unroll
          for (int q = 0; q < kPlanes; ++q)
#pragma unroll
            for (int n = 0; n < NT; ++n)
              if (n * 8 < rows_valid) {
                mma_bf16_16816(accs[q * kPar + (s % kPar)][a][n], af, b[q][n][0], b[q][n][1]);
                if (q == 0)
                  mma_bf16_16816(accs[kLoChain + (s % kPar)][a][n], al, b[0][n][0], b[0][n][1]);
              }
        }
      }
    }
  };
  auto compute = [&](int c0, const WRegs& wq, const SRegs& sc) {
    if constexpr (kGroupMma) compute_groups(c0, wq, sc);
    else compute_split(c0, wq, sc);
  };

  constexpr int kChunks = (KG + CG - 1) / CG;
  WRegs wa, wb;
  SRegs sa, sb;
    if constexpr (kDirectX) {
    // No shared-memory staging and no barrier inside the K loop: x comes through L1.
    load_weights(0, wa, sa);
    if constexpr (!kGemm1) {
      pdl_wait();  // the first weights are in flight; x (gemm1's output) is read from here on
      pdl_trigger();
    }
#pragma unroll 1
    for (int c = 0; c < kChunks; c += 2) {
      if (c + 1 < kChunks) load_weights((c + 1) * CG, wb, sb);
      compute(c * CG, wa, sa);
      if (c + 1 < kChunks) {
        if (c + 2 < kChunks) load_weights((c + 2) * CG, wa, sa);
        compute((c + 1) * CG, wb, sb);
      }
    }
  } else if constexpr (!Cfg::kDoubleBuffer) {
    if constexpr (!kGemm1) {
      pdl_wait();
      pdl_trigger();
    }
    // Large tiles reuse each weight fragment NT times: MMA-bound, one register set.
#pragma unroll 1
    for (int c = 0; c < kChunks; ++c) {
      load_weights(c * CG, wa, sa);
      fill_x(c * CG);
      __syncthreads();
      compute(c * CG, wa, sa);
      __syncthreads();
    }
  } else {
  // Two register sets alternate between "in flight" and "being consumed".
  load_weights(0, wa, sa);
  if constexpr (!kGemm1) {
    pdl_wait();
    pdl_trigger();
  }
#pragma unroll 1
  for (int c = 0; c < kChunks; c += 2) {
    fill_x(c * CG);
    __syncthreads();
    if (c + 1 < kChunks) load_weights((c + 1) * CG, wb, sb);
    compute(c * CG, wa, sa);
    __syncthreads();
    if (c + 1 < kChunks) {
      fill_x((c + 1) * CG);
      __syncthreads();
      if (c + 2 < kChunks) load_weights((c + 2) * CG, wa, sa);
      compute((c + 1) * CG, wb, sb);
      __syncthreads();
    }
  }
  }

  float (&acc)[AT][NT][4] = accs[0];
#pragma unroll
  for (int c = 1; c < kChains; ++c)
#pragma unroll
    for (int a = 0; a < AT; ++a)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[a][n][i] += accs[c][a][n][i];

  // Sum the K-split warps in a fixed order (the x buffer is free now).
  if constexpr (WK > 1) {
    float* red = reinterpret_cast<float*>(s_raw);
    constexpr int kVals = AT * NT * 4;
    if (wk > 0) {
#pragma unroll
      for (int a = 0; a < AT; ++a)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            red[(((wk * WN + wn) * kVals) + (a * NT + n) * 4 + i) * 32 + lane] = acc[a][n][i];
    }
    __syncthreads();
    if (wk == 0)
    for (int w = 1; w < WK; ++w)
#pragma unroll
      for (int a = 0; a < AT; ++a)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            acc[a][n][i] += red[(((w * WN + wn) * kVals) + (a * NT + n) * 4 + i) * 32 + lane];
  }

  // Epilogue (warps with wk == 0). Accumulator i of n-tile n: feature f0 + g + 8*(i/2), row
  // n*8 + 2t + (i%2).
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  if (wk == 0) {
  float alpha = 1.0f, beta = 0.0f, limit = 0.0f;
  if constexpr (kGemm1) {
    if constexpr (Cfg::kHasAlpha) alpha = p.alpha[e];
    if constexpr (Cfg::kHasBeta) beta = p.beta[e];
    if constexpr (Cfg::kHasLimit) limit = p.limit[e];
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = n * 8 + 2 * t + (i & 1);
      const int f = f0 + g + 8 * (i >> 1);
      const long long o = static_cast<long long>(row0 + r) * N + f;
      if constexpr (kGemm1) {
        if (r >= rows_valid) continue;
        __nv_bfloat16 hi, lo;
        split_bf16(swiglu<Cfg::kHasLimit>(acc[0][n][i], acc[1][n][i], alpha, beta, limit), hi, lo);
        out[o] = hi;
        static_cast<__nv_bfloat16*>(p.x_lo)[o] = lo;
      } else {
        // Gemm2 rows stay fp32 (workspace, or the unfinalized gemm2_out): no bf16 rounding
        // before the weighted sum.
        static_cast<float*>(p.out)[o] = r < rows_valid ? acc[0][n][i] : 0.0f;
      }
    }
    (void)alpha;
    (void)beta;
    (void)limit;
  }
  if constexpr (Cfg::kFuseFinalize) fused_finalize<Cfg, N, kTile, WN * 16>(p, row0, rows_valid);
}

}  // namespace moejit_dev

// Grouped MXINT4 GEMM for row tiles of 64 or 128 rows (prefill buckets, sm_90): the older
// family's semantics (moejit_gemm.cuh: same parameters, grid, outputs and exact arithmetic) with
// the weights dequantised once per block into shared memory instead of once per warp.
//
//   out[r, f] = epilogue( sum_g scale[f, g] * sum_{k in g} x[r, k] * v[f, k] )
//
// A block computes kWRows weight rows (gemm1: the gate and the up rows of kWRows / 2 SwiGLU
// features; gemm2: kWRows output features) for kTile rows, with kWarpsF x kWarpsR warps, each
// kWarpTileRows (64 or 32) weight rows (4 or 2 MMA row tiles) by 32 rows (4 MMA column tiles).
// K advances 64 values (two MXINT4 groups) per stage through a ring of kStages stages filled by
// cp.async:
//  * the stage's weight words (16 bytes per row and group, either weight format) and scales;
//  * the tile's x rows (gemm1: gathered tokens; gemm2: both activation planes), padded to
//    144 bytes per row so that ldmatrix's eight 16-byte rows hit every bank once.
// Each stage's nibbles become the exact bf16 integers v (dequant_pair: 136 + v, minus 136) in
// one of two shared buffers, and its scales fp32; ldmatrix feeds both MMA operands from there.
// Every MMA sums over one group (16 k per MMA, two per group) into a fresh fp32 accumulator,
// which is added to the result times the group's scale (fp32 FMA), as kGroupMma does: v * scale
// is never rounded to bf16. Stage s + 1 is converted while stage s is multiplied, one barrier
// per stage.
//
// Cfg provides moejit_gemm.cuh's constants (kGemm1, kN, kK, kTopK, kLocalOffset, kTile,
// kGateFirst, kHasAlpha, kHasBeta, kHasLimit, kTiledW, kFuseFinalize = false) and kWarpsF,
// kWarpsR (kTile = 32 * kWarpsR), kWarpTileRows, kStages, kTileMajor.
#pragma once

#include "moejit_gemm.cuh"

namespace moejit_dev {
namespace big {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes, or zeros where src_bytes is 0 (nothing is read then).
__device__ __forceinline__ void cp16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_pending() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

}  // namespace big

template <class Cfg>
__device__ void grouped_gemm_big(const GemmParams& p) {
  constexpr bool kGemm1 = Cfg::kGemm1;
  constexpr int N = Cfg::kN;
  constexpr int K = Cfg::kK;
  constexpr int KG = K / 32;
  constexpr int WF = Cfg::kWarpsF;
  constexpr int WR = Cfg::kWarpsR;
  constexpr int kTile = Cfg::kTile;
  constexpr int S = Cfg::kStages;
  constexpr int kThreads = 32 * WF * WR;
  constexpr int MT = Cfg::kWarpTileRows / 16;      // a warp's 16-row MMA tiles of weight rows
  static_assert(MT == 2 || MT == 4, "a warp holds 32 or 64 weight rows");
  constexpr int kWRows = 16 * MT * WF;             // weight rows per block
  constexpr int kFeat = kGemm1 ? kWRows / 2 : kWRows;  // output features per block
  constexpr int kPlanes = kGemm1 ? 1 : 2;
  constexpr int kRowBytes = K / 2;
  constexpr int kStride = 72;                      // bf16 per shared row: 64 + 8 padding
  constexpr int kStagesK = K / 64;
  constexpr bool kPairW = kGemm1 && Cfg::kTiledW;  // w13 words in pair order (moejit.h)
  constexpr int kWBlock = kGemm1 ? kTiledRowsW13 : kTiledRowsW2;
  static_assert(kTile == 32 * WR, "a warp covers 32 rows");
  static_assert(K % 64 == 0 && N % kFeat == 0, "shape");
  static_assert(!Cfg::kFuseFinalize, "the finalize is a kernel of its own here");
  static_assert(S >= 3, "ring: stage ks + 1 lands while stage ks is multiplied");

  // Dynamic shared memory: raw weights [S][kWRows][2 groups][16 B], raw scales [S][kWRows][2]
  // bf16, x [S][kPlanes][kTile][kStride] bf16, converted weights [2][kWRows][kStride] bf16,
  // converted scales [2][kWRows][2] fp32.
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kRawW = kWRows * 32;
  constexpr int kRawS = kWRows * 4;
  constexpr int kXStage = kPlanes * kTile * kStride * 2;
  constexpr int kABuf = kWRows * kStride * 2;
  unsigned char* raw_w = smem;
  unsigned char* raw_s = raw_w + S * kRawW;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(raw_s + S * kRawS);
  __nv_bfloat16* as = xs + S * kXStage / 2;
  float* sf = reinterpret_cast<float*>(as + 2 * kABuf / 2);
  __shared__ int s_src[kTile];

  pdl_wait();
  pdl_trigger();
  // The launch's grid is (tiles, feature blocks). With kTileMajor the blocks that run together
  // take the feature blocks of one tile (its x rows read from L2 by all of them) instead of one
  // feature block of consecutive tiles.
  const int linear = blockIdx.x + blockIdx.y * gridDim.x;
  const int tile = Cfg::kTileMajor ? linear / gridDim.y : blockIdx.x;
  const int fb = Cfg::kTileMajor ? linear % gridDim.y : blockIdx.y;
  int rows_valid = 0;
  const int e = tile_rows_of<Cfg, kTile>(p, tile, rows_valid, s_src);
  if (e < 0) return;
  const int row0 = tile * kTile;
  // Thread tid: lane of warp (wf, wr); g and t its MMA fragment's row and column pair.
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int wf = (tid >> 5) % WF, wr = (tid >> 5) / WF;
  const int g = lane >> 2, t = lane & 3;
  __syncthreads();

  const long long eg = e + Cfg::kLocalOffset;
  constexpr int kExpertRows = kGemm1 ? 2 * N : N;
  const uint8_t* wexp = p.w + eg * kExpertRows * static_cast<long long>(kRowBytes);
  const unsigned char* sexp =
      static_cast<const unsigned char*>(p.w_scale) + eg * kExpertRows * static_cast<long long>(KG * 2);
  // The expert's weight row of block row r.
  auto weight_row = [&](int r) -> int {
    if constexpr (kGemm1) {
      constexpr int kHalf = kWRows / 2;
      const int f = fb * kFeat + (r % kHalf);
      const bool up = r >= kHalf;
      return (up == Cfg::kGateFirst ? N : 0) + f;
    } else {
      return fb * kFeat + r;
    }
  };

  // Each thread's copies, the same every stage but for the stage's offset: kWI weight units
  // (16 bytes, one group of one row; the thread's group gi = tid % 2 of rows tid / 2 + j * kThreads
  // / 2), a 4-byte scale pair for rows below kWRows, kXI 16-byte units of x.
  constexpr int kWI = kWRows * 2 / kThreads;
  constexpr int kXI = kPlanes * kTile * 8 / kThreads;
  static_assert(kWI >= 1 && kWRows * 2 % kThreads == 0 && kPlanes * kTile * 8 % kThreads == 0 && kXI >= 1,
                "copies split evenly across the block");
  const int gi_own = tid & 1;
  const uint8_t* w_src[kWI];
  int w_swz[kWI];  // tiled: the row's 16-byte unit swizzle (row % 8)
#pragma unroll
  for (int j = 0; j < kWI; ++j) {
    const int r = (tid >> 1) + j * (kThreads / 2);
    const long long row = weight_row(r);
    if constexpr (Cfg::kTiledW) {
      const long long blk = row / kWBlock;
      const int rr = static_cast<int>(row - blk * kWBlock);
      w_src[j] = wexp + blk * (kWBlock * static_cast<long long>(kRowBytes)) + rr * 128;
      w_swz[j] = rr & 7;
    } else {
      w_src[j] = wexp + row * kRowBytes + gi_own * 16;
      w_swz[j] = 0;
    }
  }
  const bool s_own = tid < kWRows;
  const unsigned char* s_src_ptr;
  {
    const long long row = weight_row(s_own ? tid : 0);
    if constexpr (Cfg::kTiledW) {
      const long long blk = row / kWBlock;
      const int rr = static_cast<int>(row - blk * kWBlock);
      s_src_ptr = sexp + blk * (kWBlock * static_cast<long long>(KG * 2)) + rr * 16;
    } else {
      s_src_ptr = sexp + row * (KG * 2);
    }
  }
  // x: kXR units per plane, the same rows in both planes. 64-row warps keep each unit's offset
  // (x_lo's at x's offset from x_lo); 32-row warps (128 registers) keep its source row (-1:
  // padding, filled with zeros) and form the address per stage from the kernel parameters.
  constexpr int kXR = kXI / kPlanes;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  const long long x_lo_delta = static_cast<const __nv_bfloat16*>(p.x_lo) - x;
  long long x_off[kXR];
  int x_row[kXR];
  uint32_t x_valid = 0;  // bit j: unit j's row is valid
  const uint32_t x_dst = big::smem_addr(xs + (tid >> 3) * kStride + (tid & 7) * 8);
#pragma unroll
  for (int j = 0; j < kXR; ++j) {
    const int r = (tid >> 3) + j * (kThreads / 8);
    const int src = s_src[r];
    x_row[j] = src;
    x_off[j] = src >= 0 ? static_cast<long long>(src) * K + (tid & 7) * 8 : 0;
    x_valid |= (src >= 0 ? 1u : 0u) << j;
  }
  const uint32_t raw_w_dst = big::smem_addr(raw_w + tid * 16);
  const uint32_t raw_s_dst = big::smem_addr(raw_s + tid * 4);
  // Stage ks's copies into ring slot ks % S (one commit group per stage, empty past K).
  auto issue = [&](int ks) {
    if (ks < kStagesK) {
      const int slot = ks % S;
#pragma unroll
      for (int j = 0; j < kWI; ++j) {
        // Tiled: unit 2 ks + gi of the row lies in chunk ks / 4 at (2 ks % 8 + gi) ^ (row % 8).
        const int off = Cfg::kTiledW
                            ? (ks >> 2) * (kWBlock * 128) + ((((2 * ks) & 7) + gi_own) ^ w_swz[j]) * 16
                            : ks * 32;
        big::cp16(raw_w_dst + slot * kRawW + j * kThreads * 16, w_src[j] + off, 16);
      }
      if (s_own) {
        const int off = Cfg::kTiledW ? (ks >> 2) * (kWBlock * 16) + ((2 * ks) & 7) * 2 : ks * 4;
        big::cp4(raw_s_dst + slot * kRawS, s_src_ptr + off);
      }
#pragma unroll
      for (int q = 0; q < kPlanes; ++q)
#pragma unroll
        for (int j = 0; j < kXR; ++j) {
          const uint32_t dst = x_dst + slot * kXStage + (q * kTile + j * (kThreads / 8)) * kStride * 2;
          if constexpr (MT == 2) {
            const __nv_bfloat16* base = static_cast<const __nv_bfloat16*>(q ? p.x_lo : p.x);
            const int row = x_row[j];
            big::cp16(dst, base + (row >= 0 ? static_cast<long long>(row) * K + (tid & 7) * 8 + ks * 64 : 0),
                      row >= 0 ? 16 : 0);
          } else {
            big::cp16(dst, x + (q ? x_lo_delta : 0) + x_off[j] + ks * 64, (x_valid >> j & 1) * 16);
          }
        }
    }
    big::commit();
  };
  // Stage ks's nibbles and scales (ring slot ks % S) into converted buffer ks % 2.
  const unsigned char* raw_w_own = raw_w + tid * 16;
  __nv_bfloat16* a_own = as + (tid >> 1) * kStride + gi_own * 32;
  auto convert = [&](int ks) {
    const int slot = ks % S;
    const int buf = ks & 1;
#pragma unroll
    for (int j = 0; j < kWI; ++j) {
      const uint4 q = *reinterpret_cast<const uint4*>(raw_w_own + slot * kRawW + j * kThreads * 16);
      uint32_t o[16];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t qw = word_of(q, w);
        o[4 * w + 0] = dequant_pair<0, kPairW>(qw);
        o[4 * w + 1] = dequant_pair<1, kPairW>(qw);
        o[4 * w + 2] = dequant_pair<2, kPairW>(qw);
        o[4 * w + 3] = dequant_pair<3, kPairW>(qw);
      }
      uint4* dst = reinterpret_cast<uint4*>(a_own + buf * (kABuf / 2) + j * (kThreads / 2) * kStride);
#pragma unroll
      for (int v = 0; v < 4; ++v) dst[v] = make_uint4(o[4 * v], o[4 * v + 1], o[4 * v + 2], o[4 * v + 3]);
    }
    if (s_own) {
      const uint32_t sv = *reinterpret_cast<const uint32_t*>(raw_s + slot * kRawS + tid * 4);
      *reinterpret_cast<float2*>(sf + buf * kWRows * 2 + tid * 2) =
          make_float2(__uint_as_float(sv << 16), __uint_as_float(sv & 0xffff0000u));
    }
  };

  // This warp's weight rows: MT row tiles of 16 (gemm1: its features' gate rows in tiles
  // 0 .. MT / 2 - 1, their up rows in the others).
  auto a_row = [&](int m) -> int {
    if constexpr (kGemm1) return (m / (MT / 2)) * (kWRows / 2) + wf * (8 * MT) + (m % (MT / 2)) * 16;
    else return wf * (16 * MT) + m * 16;
  };
  constexpr int NT = 4;
  float acc[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.0f;
  // Warps whose 32 rows are all padding skip the MMAs (warp-uniform; their rows stay zero).
  const bool rows_here = wr * 32 < rows_valid;
  // ldmatrix addresses: lane's row of A tile m (row lane % 16, k + 8 (lane / 16)), and of the
  // x tiles (row lane % 8 + 8 (lane / 16) of each 16-row pair, k + 8 ((lane / 8) % 2)).
  const uint32_t a_base = big::smem_addr(as + (a_row(0) + (lane & 15)) * kStride + (lane >> 4) * 8);
  const uint32_t x_addr =
      big::smem_addr(xs + (wr * 32 + (lane & 7) + ((lane >> 4) << 3)) * kStride + ((lane >> 3) & 1) * 8);

  auto compute = [&](int ks) {
    const int slot = ks % S;
    const int buf = ks & 1;
    // (With 32-row warps at two blocks per SM, one group at a time: 128 registers.)
#pragma unroll(MT == 2 ? 1 : 2)
    for (int gi = 0; gi < 2; ++gi) {
      // Both k-steps' x fragments of the group: [plane][k-step][n-tile pair][4].
      uint32_t bf[kPlanes][2][NT / 2][4];
#pragma unroll
      for (int q = 0; q < kPlanes; ++q)
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int np = 0; np < NT / 2; ++np)
            big::ldsm_x4(bf[q][s][np], x_addr + slot * kXStage +
                                           ((q * kTile + np * 16) * kStride + gi * 32 + s * 16) * 2);
      const float* sc = sf + buf * kWRows * 2;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        uint32_t af[2][4];
#pragma unroll
        for (int s = 0; s < 2; ++s) big::ldsm_x4(af[s], a_base + buf * kABuf + ((a_row(m) - a_row(0)) * kStride + gi * 32 + s * 16) * 2);
        float part[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) part[n][i] = 0.0f;
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int q = 0; q < kPlanes; ++q)
#pragma unroll
            for (int n = 0; n < NT; ++n)
              mma_bf16_16816(part[n], af[s], bf[q][s][n / 2][(n & 1) * 2], bf[q][s][n / 2][(n & 1) * 2 + 1]);
        const float s_lo = sc[(a_row(m) + g) * 2 + gi];
        const float s_hi = sc[(a_row(m) + g + 8) * 2 + gi];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[m][n][i] = fmaf(i < 2 ? s_lo : s_hi, part[n][i], acc[m][n][i]);
      }
    }
  };

  // The ring: stages 0 .. S-2 in flight, stage 0 converted; then per stage ks one barrier, after
  // which stage ks + S - 1 is issued into the slot stage ks - 1 used, stage ks + 1 is converted
  // into the buffer stage ks - 1 used, and stage ks is multiplied.
#pragma unroll 1
  for (int ks = 0; ks < S - 1; ++ks) issue(ks);
  big::wait_pending<S - 2>();
  __syncthreads();
  convert(0);
#pragma unroll 1
  for (int ks = 0; ks < kStagesK; ++ks) {
    big::wait_pending<S - 3 < 0 ? 0 : S - 3>();  // stage ks + 1 has landed (this thread's copies)
    __syncthreads();
    issue(ks + S - 1);
    if (ks + 1 < kStagesK) convert(ks + 1);
    if (rows_here) compute(ks);
  }
  big::wait_pending<0>();

  // Epilogue. Accumulator i of tiles (m, n): weight row a_row(m) + g + 8 (i / 2), row
  // wr * 32 + n * 8 + 2t + (i % 2).
  if constexpr (kGemm1) {
    float alpha = 1.0f, beta = 0.0f, limit = 0.0f;
    if constexpr (Cfg::kHasAlpha) alpha = p.alpha[e];
    if constexpr (Cfg::kHasBeta) beta = p.beta[e];
    if constexpr (Cfg::kHasLimit) limit = p.limit[e];
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    __nv_bfloat16* out_lo = static_cast<__nv_bfloat16*>(p.x_lo);
#pragma unroll
    for (int m = 0; m < MT / 2; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wr * 32 + n * 8 + 2 * t + (i & 1);
          if (r >= rows_valid) continue;
          const int f = fb * kFeat + a_row(m) + g + 8 * (i >> 1);
          __nv_bfloat16 hi, lo;
          split_bf16(swiglu<Cfg::kHasLimit>(acc[m][n][i], acc[m + MT / 2][n][i], alpha, beta, limit), hi, lo);
          const long long o = static_cast<long long>(row0 + r) * N + f;
          out[o] = hi;
          out_lo[o] = lo;
        }
    (void)alpha;
    (void)beta;
    (void)limit;
  } else {
    float* out = static_cast<float*>(p.out);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = wr * 32 + n * 8 + 2 * t + (i & 1);
          const int f = fb * kFeat + a_row(m) + g + 8 * (i >> 1);
          out[static_cast<long long>(row0 + r) * N + f] = r < rows_valid ? acc[m][n][i] : 0.0f;
        }
  }
}

}  // namespace moejit_dev

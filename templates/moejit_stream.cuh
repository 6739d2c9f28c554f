// Decode grouped MXINT4 GEMM for sm_90: persistent, warp-specialised, weights streamed by cp.async.
//
//   out[r, f] = epilogue( sum_k x[r, k] * v[f, k] * scale[f, k / 32] )   (8-row tiles)
//
// Work unit = (row tile, feature slice) of kRows weight rows: gemm1 kRows / 2 SwiGLU features
// (half gate rows, half up rows), gemm2 kRows output features. kRows is 64 by default; a kernel
// may also carry 32-row and (gemm1) 16-row paths, and each launch takes one (GemmParams::unit_rows)
// so that small token counts still give every block work.
// Units are numbered tile-fastest, so the tiles of one expert stream the same weights at about
// the same time (L2 reuse), and a block takes units blockIdx.x, blockIdx.x + gridDim.x, ...
// (grid = what fits on the card).
//
// Per block: kProducerWarps producer warps and kConsumerWarps consumer warps around a ring of kStages
// shared-memory stages. A stage holds kKC values of K for the unit's weight rows (int4), as
// kKC / 256 chunks of kRows rows x 128 bytes with 16-byte units XOR-swizzled by row, their scales,
// and the tile's valid x rows (bf16; gemm2: hi and lo planes). The producer warp fills a stage
// with 16-byte cp.async and each lane's
// cp.async.mbarrier.arrive completes the stage's "full" mbarrier; consumers release a stage on
// its "empty" mbarrier. The producers run ahead across unit boundaries, so DRAM never waits for
// an epilogue. With Cfg::kTma one producer warp fills a stage instead: lane 0 issues TMA boxes
// (gemm1: the weights of each half of the unit's rows, gate and up, as {128 bytes, rows / 2,
// kKC / 256 chunks} with the 128-byte swizzle, which is the XOR pattern above, and their scales;
// gemm2: all rows in one box, their scales in one, and x as one or two boxes of 4 rows x both
// planes) and, in gemm1, the lanes one bulk copy per gathered x row, all completing one expect_tx
// on the "full" barrier. (Earlier TMA versions
// with one 1D copy per weight row, or many small 2D boxes, were bound by the per-copy cost;
// bench/RESULTS.md sections 8 and 13.)
//
// Consumers split a stage's MXINT4 groups in pairs. Per group, a thread holds word t of the
// 16-byte group row (8 nibbles, k = 8t..8t+7) for rows g and g+8 (ldmatrix). One lop3 turns
// nibbles (j, j+4) of a word, shifted by 4j, into bf16x2 (136 + v): exact integers. The MMA sums
// over k in any order shared by both operands, so x is fed in the matching order: row-major
// gemm1 weights hold k = 8t + j at nibble j, so x is paired as (x_j, x_{j+4}) by two prmt per
// register pair; tiled gemm1 weights hold their nibbles in pair order (k = 8t + 2m at nibble m,
// 8t + 2m + 1 at m + 4; moejit.h), so the pairs are consecutive k and x is used as it lies (no
// prmt: bench/RESULTS.md section 36); gemm2's weights keep the row-major order and gemm1 stores
// the activation already paired that way (act_pos). The 136 offset is removed by one MMA per
// k-step of a constant -136 A operand (= -136 * sum x over the group, per row), and the group's
// result is scaled in fp32 once:
// acc += scale[f, group] * (sum_k (136 + v) x - 136 sum_k x). No bf16 rounding of v * scale.
// Non-finite x: an Inf in a group makes that group's sum NaN (Inf - Inf) where v * x alone would
// give +-Inf, and |x| above ~1e36 overflows the -136 sum x term; the layer's output for such a
// token is NaN either way once gemm2 sums over I (the differential NaN/Inf cases pass).
//
// fp16 operands (Cfg::kF16, StreamConfig::f16: a chain of 64-row units, tiled w13, packed gemm2
// units, behind the fused route+dispatch block). An fp16 mantissa holds two nibbles of a half
// in place: bits 0-3 as 1032 + v and bits 4-7 as 1152 + 16 v (exponent 25, bit 3 of the nibble
// flipped), so a word takes 4 LOP3 + 1 SHF instead of 4 + 3 (bench/RESULTS.md section 37). The
// B operand pays for it: x arrives as fp16 times 2^-e, one factor per launch written by the
// fused kernel's second block (moejit_route_dispatch.cuh), with the k = 2, 3 (mod 4) elements
// (those the hi nibbles multiply) by a further 1/16; gemm1's epilogue multiplies 2^e back. x
// keeps 11 significant bits at any scale (elements below 2^-29 of a launch's largest finite |x|
// lose bits as subnormals). By default gemm2 keeps bf16 operands. With an fp16 gemm2 as well
// (its Cfg::kF16, gemm1's Cfg::kF16Act; "f16a=1"), gemm1 writes the activation as fp16 hi and
// lo planes times 2^-d per (row tile, 8 features) (odd features by a further 1/16) and the word
// fp16x2 (1032 2^d) to GemmParams::act_magic; gemm2 copies the words of its tile beside the
// activation and XORs its nibbles with them, which makes its A operand 2^d (1032 + v), so the
// MMA undoes the factor. The corrections are -1032 and -1152 (times 2^d). d is clamped to [-24,
// 5]: activations beyond about 2^21 become +-Inf.
//
// Consumer warps sum their partial accumulators through shared memory in a fixed order
// (deterministic), consumer warp 0 runs the epilogue. The finalize is its own kernel: fusing it
// (a fence and an atomic per unit, then the last unit of a token sums its rows) stalled the
// consumers for several L2 round trips per unit and measured slower (bench/RESULTS.md).
//
// Cfg provides: kGemm1, kN, kK, kTopK, kLocalOffset, kLocalExperts, kKC, kStages,
// kConsumerWarps, kProducerWarps, kStageBytes (the host's figure, checked), kGateFirst,
// kHasAlpha, kHasBeta, kHasLimit, kSuspendNs, kPackPlanes, kUnitRows, kAltRows, kKC16, kKC32,
// kRingBytes, kSplitEpilogue, kTma, kDynamicUnits, kXBoxes, kEarlyUnit, kTileReady, kEarlyFetch,
// kEvictFirst, kTiledW (weights in WeightFormat::MxInt4G32Tiled; see weight_box), kF16, kF16Act.
//
// Tile-ready hand-off (Cfg::kTileReady, both GEMMs of a bucket): units are numbered tile-major
// (a tile's units one after another, so tiles complete one after another instead of all at the
// end); gemm1 adds each finished unit's features to its tile's word (GemmParams::tile_ready,
// zeroed by dispatch) and gemm2's producer waits, per unit, until its tile's word reaches K (= I)
// instead of waiting for gemm1's whole grid. Gemm2's blocks, which start on the SMs that gemm1's
// blocks leave, then stream the weights of finished tiles during gemm1's tail.
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

namespace stream {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// Waits for the phase with the given parity. A suspend-time hint (kSuspendNs > 0) lets the
// hardware park the warp until the phase completes (SASS: NANOSLEEP.SYNCS) instead of spinning
// on issue slots; 0 uses the plain try_wait.
template <unsigned kSuspendNs>
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  do {
    if constexpr (kSuspendNs > 0)
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n"
          " selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity), "r"(kSuspendNs)
          : "memory");
    else
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          " selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(addr), "r"(parity)
          : "memory");
  } while (!done);
}

// 16-byte asynchronous copy global -> shared (LSU path, not cached in L1). No L2 cache-policy
// operand: with one (createpolicy evict_first) in the producers' divergent copy loops, the
// H200 raised "illegal instruction" at the copy (SASS LDGSTS ... desc[UR]).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// Arrive on bar once this thread's earlier cp.async copies have landed (counts against the
// barrier's initial arrival count).
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar))
               : "memory");
}

// Not volatile (it may be scheduled among the MMAs), but it reads memory: the clobber keeps it
// after the mbarrier wait.
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Shared-memory loads at 32-bit shared addresses (base + constant folds into the instruction's
// offset). Not volatile; the clobber keeps them after the mbarrier wait.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm("ld.shared.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}
// A 16-byte shared-memory load where ok != 0, else zeros (no access).
__device__ __forceinline__ uint4 lds128_if(uint32_t addr, uint32_t ok) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  asm("{\n .reg .pred p;\n setp.ne.u32 p, %5, 0;\n"
      " @p ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "r"(addr), "r"(ok)
      : "memory");
  return v;
}

__device__ __forceinline__ void consumer_barrier(int threads) {
  asm volatile("bar.sync 1, %0;\n" ::"r"(threads) : "memory");
}
// Named barrier for threads that may arrive from divergent code (not .aligned).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// TMA (Cfg::kTma): the issuing thread announces the stage's bytes on its "full" barrier, then
// each box completes its share of them there.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
// A box of a 2-D / 3-D tensor map (desc: the generic address of a __grid_constant__ parameter).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* desc, int c0, int c1,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}
// A contiguous global -> shared bulk copy (16-byte aligned, a multiple of 16 bytes).
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* desc, int c0, int c1, int c2,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory");
}

// The same boxes with an L2 cache policy (createpolicy's 64-bit handle): Cfg::kEvictFirst.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* desc, int c0, int c1,
                                            uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(c0), "r"(c1), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* desc, int c0, int c1, int c2,
                                            uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* desc, int c0, int c1, int c2,
                                            int c3, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
      : "memory");
}

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* desc, int c0, int c1, int c2,
                                            int c3, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar)),
      "l"(policy)
      : "memory");
}
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint64_t* bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}

// A stage's weight box of `rows` rows from `row` (in one block of kBlock rows) and the chunks
// from k0: from a 4-D weight map (GemmParams::tma_w, either weight format), or with tiled
// weights (WeightFormat::MxInt4G32Tiled) and a box of a whole block, whose stage bytes are then
// contiguous, as one bulk copy. With `hint`, the L2 evict-first policy.
template <bool kTiledBlockCopy, int kBlock, int kRowBytes, uint32_t kBytes>
__device__ __forceinline__ void weight_box(uint32_t dst, const GemmParams& p, int row, int k0,
                                           uint64_t* bar, bool hint, uint64_t policy) {
  if constexpr (kTiledBlockCopy) {
    const uint8_t* src = p.w + static_cast<long long>(row) * kRowBytes + (k0 / 256) * (kBlock * 128);
    if (hint) bulk_load(dst, src, kBytes, bar, policy);
    else bulk_load(dst, src, kBytes, bar);
  } else {
    const int r = static_cast<unsigned>(row) % kBlock, blk = static_cast<unsigned>(row) / kBlock;
    if (hint) tma_load_4d(dst, &p.tma_w, 0, r, k0 / 256, blk, bar, policy);
    else tma_load_4d(dst, &p.tma_w, 0, r, k0 / 256, blk, bar);
  }
}

// A stage's scale box (kBytes: rows x the stage's chunks x 16 bytes) as weight_box: canonical
// scales by the 2-D map {K / 16 bytes, row} (landing as [row][chunks x 16 bytes]), tiled ones by
// the 3-D map {8-byte words of a chunk's block rows, chunk, block} (landing as [chunk][row][16
// bytes]) or, for a box of a whole block, as one bulk copy.
template <bool kTiled, bool kTiledBlockCopy, int kBlock, int kRowBytes, uint32_t kBytes>
__device__ __forceinline__ void scale_box(uint32_t dst, const GemmParams& p, int row, int k0,
                                          uint64_t* bar, bool hint, uint64_t policy) {
  if constexpr (kTiledBlockCopy) {
    const unsigned char* src = static_cast<const unsigned char*>(p.w_scale) +
                               static_cast<long long>(row) * kRowBytes + (k0 / 256) * (kBlock * 16);
    if (hint) bulk_load(dst, src, kBytes, bar, policy);
    else bulk_load(dst, src, kBytes, bar);
  } else if constexpr (kTiled) {
    const int r = static_cast<unsigned>(row) % kBlock, blk = static_cast<unsigned>(row) / kBlock;
    if (hint) tma_load_3d(dst, &p.tma_s, 2 * r, k0 / 256, blk, bar, policy);
    else tma_load_3d(dst, &p.tma_s, 2 * r, k0 / 256, blk, bar);
  } else {
    if (hint) tma_load_2d(dst, &p.tma_s, k0 / 16, row, bar, policy);
    else tma_load_2d(dst, &p.tma_s, k0 / 16, row, bar);
  }
}

// Not volatile: the compiler may interleave independent MMA chains. bf16 operands, or fp16 ones
// (kFp16: StreamConfig::f16).
#define MOEJIT_MMA16816(T)                                                                    \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
      "{%8,%9}, {%0,%1,%2,%3};\n"                                                           \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <bool kFp16 = false>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (kFp16)
    MOEJIT_MMA16816("f16");
  else
    MOEJIT_MMA16816("bf16");
}
#undef MOEJIT_MMA16816
// d = a b + c (c not overwritten); bf16 operands, or fp16 ones.
#define MOEJIT_MMA16816C(T)                                                                              \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "    \
      "{%10,%11,%12,%13};\n"                                                                              \
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), \
        "f"(c[3]))
template <bool kFp16>
__device__ __forceinline__ void mma16816_c(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                           const float (&c)[4]) {
  if constexpr (kFp16)
    MOEJIT_MMA16816C("f16");
  else
    MOEJIT_MMA16816C("bf16");
}
#undef MOEJIT_MMA16816C

// Storage position of activation feature f inside its 8-feature block: the order
// (0, 4, 1, 5, 2, 6, 3, 7), so one 16-byte load gives the B registers of a group's two k-steps.
__host__ __device__ constexpr int act_pos(int f) { return (f & ~7) | ((f & 3) << 1) | ((f >> 2) & 1); }

// First weight row of a unit's rows [0, kRows / 2) and [kRows / 2, kRows) (gemm1: gate and up
// rows of its feature slice), in the type of eg (the global expert): int for TMA coordinates,
// 64-bit where they scale pointers.
template <class Cfg, int kRows, class I>
__device__ __forceinline__ void first_rows(I eg, int slice, I& row_lo, I& row_hi) {
  constexpr int N = Cfg::kN;
  constexpr int kHalfRows = kRows / 2;
  if constexpr (Cfg::kGemm1) {
    row_lo = eg * 2 * N + (Cfg::kGateFirst ? 0 : N) + slice * kHalfRows;
    row_hi = eg * 2 * N + (Cfg::kGateFirst ? N : 0) + slice * kHalfRows;
  } else {
    row_lo = eg * N + slice * kRows;
    row_hi = row_lo + kHalfRows;
  }
}

// Gemm1 with Cfg::kEarlyUnit: the producer warp plans the block's first unit (blockIdx.x)
// itself, before waiting for dispatch, from the routed ids (GemmParams::topk_ids) of the route
// kernel two launches back (complete when this block starts) or of the fused route+dispatch
// block (once GemmParams::routed reads 1). As dispatch does, it counts the slots
// of each local expert, pads each expert to 8-row tiles in expert order, and places an expert's
// slots in ascending slot order. So the first unit's weights and token rows are copied while
// dispatch still runs; dispatch's tables are read from the second unit on, after the wait.
// For at most kEarlySlotRegs * 32 slots (the caller checks). scratch: kLocalExperts + 8 ints of
// shared memory.
// The row tile of unit `id`: units are numbered tile-fastest (the tiles of one expert stream its
// weights together), or tile-major with Cfg::kTileReady (see the top). kSlices: units per tile.
template <class Cfg, int kSlices, class I>
__device__ __forceinline__ I unit_tile(I id, I n_tiles) {
  return Cfg::kTileReady ? id / kSlices : id % n_tiles;
}

// A chain (Cfg::kChain, stream_chain below): a block streams its gemm1 units and then its gemm2
// units through one ring, so its producer issues gemm2's first stages while its consumers finish
// gemm1's last. What the second phase takes over from the first, per thread: the producer's
// place in the ring, the consumers', and the unit queue entries used.
struct ChainState {
  int p_slot = 0;
  uint32_t p_so = 0, p_parity = 1;  // the first pass finds every slot free ("empty" phase 1)
  int c_slot = 0;
  uint32_t c_parity = 0;
  int q_base = 0;
};
// Gemm2's entries in the unit queue of a chain carry this bit in their rows, so that the
// consumers leave gemm1's loop at the first of them (without consuming it).
constexpr int kChainG2Rows = 0x100;

struct EarlyUnit {
  int n_tiles, e, rows;
  int token;  // lane r < 8: the token of the unit's tile row r (padding rows: 0)
};
constexpr int kEarlySlotRegs = 16;  // routed ids per lane held in registers

// The fused block's packed ids (beside RouteDispatchParams::routed: lane i < 8 reads vector i,
// moejit_params.h), read until every word carries its bit 31 (each word is written whole; the
// block clears them before gemm1 launches).
__device__ __forceinline__ uint4 ld_volatile_v4(const int* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// A unit taken from a counter (GemmParams::unit_counter) by one thread; with Cfg::kEarlyFetch a
// float's bits (atom_take_gpu), read back by count_of where the count is first needed.
template <class Cfg>
__device__ __forceinline__ int take_unit(int* counter) {
  if constexpr (Cfg::kEarlyFetch) return __float_as_int(atom_take_gpu(counter));
  else return atomicAdd(counter, 1);
}
template <class Cfg>
__device__ __forceinline__ int count_of(int taken) {
  if constexpr (Cfg::kEarlyFetch) return static_cast<int>(__int_as_float(taken));
  else return taken;
}

// Slot 32 j + lane's local expert (-1: none, or not this rank's) from the packed ids, of which
// lane i < 8 holds vector i (slots 8i..8i + 7); kOne: at most 8 slots, all in lane 0's. Every
// lane takes part (shuffles).
template <class Cfg, bool kOne>
__device__ __forceinline__ int packed_slot_expert(const uint4& ids, int j, int lane, int slots) {
  const int src = kOne ? 0 : 4 * j + (lane >> 3);  // the lane that holds the slot's word
  const uint32_t w0 = __shfl_sync(kFullMask, ids.x, src), w1 = __shfl_sync(kFullMask, ids.y, src);
  const uint32_t w2 = __shfl_sync(kFullMask, ids.z, src), w3 = __shfl_sync(kFullMask, ids.w, src);
  const int q = (lane >> 1) & 3;
  const uint32_t word = q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3;
  const int code = static_cast<int>((lane & 1 ? word >> 16 : word) & kRoutedIdNone);
  int l = -1;
  if (slots > (kOne ? lane : 32 * j + lane) && code != kRoutedIdNone) l = code - Cfg::kLocalOffset;
  if (l < 0 || l >= Cfg::kLocalExperts) l = -1;
  return l;
}

// packed: ids is this lane's part of the packed ids (at most Cfg::kRoutedIds slots; lanes >= 8
// hold none); else the slots' ids come from GemmParams::topk_ids. unit: with
// kUnitGiven (a chain's gemm1) the block's first unit, taken from the counter; else the first
// unit is blockIdx.x.
template <class Cfg, int kRows, bool kUnitGiven = false>
__device__ __forceinline__ void early_first_unit(const GemmParams& p, int* scratch, int lane, int unit,
                                                 EarlyUnit& out, bool packed = false,
                                                 uint4 ids = make_uint4(0u, 0u, 0u, 0u)) {
  constexpr int L = Cfg::kLocalExperts;
  constexpr int C = (L + 31) / 32;  // lane l counts the tiles of experts [l * C, l * C + C)
  constexpr int kSlices = Cfg::kN / (kRows / 2);
  const int slots = p.num_tokens * Cfg::kTopK;
  int* cnt = scratch;
  int* tok = scratch + L;
  if (Cfg::kEarlyRouted && slots <= 32) {
    if (lane < 8) tok[lane] = 0;
    // Behind the fused block with at most one slot per lane (decode: up to 4 tokens of top-8):
    // the lanes of one local expert found by a match, each expert's first tile by a pass over
    // the 32 lanes, without the per-expert counts in shared memory (H200, one kimi-k2 token: the
    // earliest block knew its first unit 1.4 us after reading the word, 1.8 with the counts;
    // bench/RESULTS.md section 24).
    static_assert(L < (1 << 22), "early first unit: local expert ids must fit in 22 bits");
    int l = -1;
    if (packed) {
      l = packed_slot_expert<Cfg, kUnitGiven || Cfg::kRoutedIds <= 8>(ids, 0, lane, slots);
    } else if (lane < slots) {
      l = __ldcg(p.topk_ids + lane) - Cfg::kLocalOffset;
      if (l < 0 || l >= L) l = -1;
    }
    const unsigned peers = __match_any_sync(kFullMask, l);
    const int rank = __popc(peers & ((1u << lane) - 1u));  // earlier slots of the same expert
    const int count = __popc(peers);
    const bool leader = l >= 0 && rank == 0;
    const int mine = leader ? (l << 8) | count : -1;  // count <= 32, l < 2^22 (as dispatch_small packs them)
    int start = 0, total = 0;  // this lane's expert's first tile; the tiles of all experts
#pragma unroll 8
    for (int j = 0; j < 32; ++j) {
      const int v = __shfl_sync(kFullMask, mine, j);
      const int t = v >= 0 ? ((v & 255) + 7) >> 3 : 0;
      total += t;
      if (l >= 0 && (v >> 8) < l) start += t;
    }
    out.n_tiles = total;
    out.e = 0;
    out.rows = 0;
    out.token = 0;
    if ((kUnitGiven ? unit : static_cast<int>(blockIdx.x)) >= total * kSlices) return;  // no unit (every lane)
    const int tile = kUnitGiven ? unit_tile<Cfg, kSlices>(unit, total)
                                : unit_tile<Cfg, kSlices>(blockIdx.x, static_cast<unsigned>(total));
    const bool hit = leader && tile >= start && tile < start + ((count + 7) >> 3);
    const int src = __ffs(__ballot_sync(kFullMask, hit)) - 1;
    const int e = __shfl_sync(kFullMask, l, src);
    const int rank0 = (tile - __shfl_sync(kFullMask, start, src)) * 8;  // rank of tile row 0
    __syncwarp();
    if (l == e && rank >= rank0 && rank < rank0 + 8) tok[rank - rank0] = lane / Cfg::kTopK;
    __syncwarp();
    out.e = e;
    out.rows = min(8, __shfl_sync(kFullMask, count, src) - rank0);
    out.token = lane < 8 ? tok[lane] : 0;
    return;
  }
  for (int e = lane; e < L; e += 32) cnt[e] = 0;
  if (lane < 8) tok[lane] = 0;
  __syncwarp();
  int id[kEarlySlotRegs];  // local expert of slot 32 j + lane, -1: none
  bool from_packed = false;  // (more than 8 slots packed: a chain's gemm1 reads at most 8)
  if constexpr (!kUnitGiven && Cfg::kRoutedIds > 8) from_packed = packed;
  if (from_packed) {
#pragma unroll
    for (int j = 0; j < kEarlySlotRegs; ++j)
      id[j] = j * 32 < Cfg::kRoutedIds ? packed_slot_expert<Cfg, false>(ids, j, lane, slots) : -1;
  } else {
#pragma unroll
    for (int j = 0; j < kEarlySlotRegs; ++j) {
      const int s = j * 32 + lane;
      const int l = s < slots ? __ldcg(p.topk_ids + s) - Cfg::kLocalOffset : -1;
      id[j] = l >= 0 && l < L ? l : -1;
    }
  }
  // Registers that hold a slot (warp-uniform): behind the fused block (up to 16 tokens) the
  // loops over them stop there (H200, bench/RESULTS.md section 44: 0.5 us of 8 qwen3-30b-a3b
  // tokens; above 16 tokens no change was measured, and a chain's gemm1 (kUnitGiven), which
  // plans here only above 32 slots, keeps its code).
  const int n_regs = Cfg::kEarlyRouted && !kUnitGiven ? (slots + 31) / 32 : kEarlySlotRegs;
#pragma unroll
  for (int j = 0; j < kEarlySlotRegs; ++j) {
    if (j >= n_regs) break;
    if (id[j] >= 0) atomicAdd(&cnt[id[j]], 1);
  }
  __syncwarp();
  int tiles = 0;
#pragma unroll
  for (int j = 0; j < C; ++j)
    if (lane * C + j < L) tiles += (cnt[lane * C + j] + 7) >> 3;
  int incl = tiles;  // inclusive scan over the lanes
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  out.n_tiles = __shfl_sync(kFullMask, incl, 31);
  out.e = 0;
  out.rows = 0;
  out.token = 0;
  if ((kUnitGiven ? unit : static_cast<int>(blockIdx.x)) >= out.n_tiles * kSlices) return;  // no unit
  const int tile = kUnitGiven ? unit_tile<Cfg, kSlices>(unit, out.n_tiles)
                              : unit_tile<Cfg, kSlices>(blockIdx.x, static_cast<unsigned>(out.n_tiles));
  int found = -1, first = 0;  // the tile's expert and that expert's first tile
  if (tile >= incl - tiles && tile < incl) {
    int t = incl - tiles;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const int e = lane * C + j;
      const int n = e < L ? (cnt[e] + 7) >> 3 : 0;
      if (found < 0 && tile < t + n) {
        found = e;
        first = t;
      }
      t += n;
    }
  }
  const int src = __ffs(__ballot_sync(kFullMask, found >= 0)) - 1;
  const int e = __shfl_sync(kFullMask, found, src);
  const int rank0 = (tile - __shfl_sync(kFullMask, first, src)) * 8;  // rank of tile row 0
  const int rows = min(8, cnt[e] - rank0);
  int before = 0;  // slots of expert e in the registers before j
#pragma unroll
  for (int j = 0; j < kEarlySlotRegs; ++j) {
    if (j >= n_regs) break;
    const unsigned m = __ballot_sync(kFullMask, id[j] == e);
    const int r = before + __popc(m & ((1u << lane) - 1u)) - rank0;
    if (id[j] == e && r >= 0 && r < 8) tok[r] = (j * 32 + lane) / Cfg::kTopK;
    before += __popc(m);
  }
  __syncwarp();
  out.e = e;
  out.rows = rows;
  out.token = lane < 8 ? tok[lane] : 0;
}

}  // namespace stream

constexpr int kMaxStages = 8;  // the host's kMaxStreamStages
constexpr int kUnitQ = 16;     // dynamic units published to the consumers (> kMaxStages)

namespace stream {
// The static shared memory of a stream kernel (stream_gemm, stream_chain), shared by its paths
// and a chain's two phases (static shared memory is allocated per variable, so arrays per path
// would add up): the mbarriers (full, empty, and the tile-ready hand-off's), the hand-off's
// tiles, the reduction buffer, the unit queue and gemm1's plan of its first unit
// (Cfg::kEarlyUnit: expert counts and a tile's tokens). Smem: what stream_gemm_rows reads.
struct Smem {
  uint64_t* bars;
  float* red;
  int4* unit_q;
  int* early;
  int* epi_tile;
  unsigned short* fin_count = nullptr;  // a chain's gemm2 with Cfg::kChainFinalize: units per slice
  const uint4* zero = nullptr;          // with Cfg::kGroupCols: 64 zero bytes
};
template <class Cfg>
struct Shared {
  uint64_t bars[2 * kMaxStages + 4];
  int epi_tile[2];
  float red[Cfg::kConsumerWarps * (Cfg::kUnitRows / 4) * 32];
  int4 unit_q[kUnitQ];
  int early[Cfg::kGemm1 && Cfg::kTma && Cfg::kDynamicUnits && Cfg::kEarlyUnit ? Cfg::kLocalExperts + 8 : 1];
  __device__ Smem view() { return {bars, red, unit_q, early, epi_tile}; }
};
// A chain's finalize (Cfg::kChainFinalize, stream_chain): per slice of gemm2's output (a unit's
// features), the units this block wrote (its consumer thread 0 counts them during the phase);
// at the end, in the reduction buffer (free by then), the slices the block finalizes and the
// launch's first kFinSlots row map entries and routing weights.
constexpr int kFinSlots = 32;
template <int kSlices>
struct FinEnd {
  int list[kSlices];
  int n_list;
  int rows[kFinSlots];
  float ws[kFinSlots];
};

// The end of a chain's gemm2 phase with Cfg::kChainFinalize, by its CW consumer warps (the
// finalize kernel's work without its launch): after the block's last unit, each slice it wrote
// adds the block's units of it to the slice's word (GemmParams::token_counters, zeroed by
// dispatch; one acq_rel atomic per slice, all at once: the release covers the block's y rows,
// ordered before it by the consumers' barrier), and the block whose addition completes a slice
// (n_tiles units) finalizes that slice for every token with the finalize kernel's arithmetic
// (weighted_rows8: the same bits). No hand-off per unit, which bench/RESULTS.md section 26e
// measured at 1-2.3 us. With no row tile at all (no local slot) no unit counts a slice: block b
// then writes the zeros of slices b, b + grid, ... . (H200, one to four kimi-k2 tokens: the same
// time as the finalize kernel behind the chain in section 29, slower since: the planner leaves it
// off by default, bench/RESULTS.md section 46.)
// pre_row / pre_w: thread tid's entry of the row map and routing weights (tid < kFinSlots),
// loaded at the start of the gemm2 phase so that their round trip is not in the tail.
template <class Cfg, int kRows>
__device__ void chain_finalize(const GemmParams& p, const unsigned short* count, float* red, int n_tiles, int tid,
                               int pre_row, float pre_w) {
  constexpr int N = Cfg::kN, K = Cfg::kTopK, kSlices = N / kRows, kThreads = Cfg::kConsumerWarps * 32;
  constexpr int kPer = kRows / 8;  // items (8 features) per slice and token
  static_assert(sizeof(FinEnd<kSlices>) <= sizeof(float) * Cfg::kConsumerWarps * (Cfg::kUnitRows / 4) * 32,
                "chain finalize: its list fits in the reduction buffer");
  FinEnd<kSlices>& f = *reinterpret_cast<FinEnd<kSlices>*>(red);
  static_assert(kFinSlots <= kThreads, "chain finalize: one staged entry per consumer thread");
  if (tid < p.num_tokens * K && tid < kFinSlots) {
    f.rows[tid] = pre_row;
    f.ws[tid] = pre_w;
  }
  if (tid == 0) f.n_list = 0;
  [[maybe_unused]] const int tls = tl_slot();  // (timeline builds: a load, back by the end)
  consumer_barrier(kThreads);  // the block's y rows, all written
  [[maybe_unused]] const unsigned long long t_rows = tl_now();
  if (n_tiles == 0) {
    if (tid == 0)
      for (int s = blockIdx.x; s < kSlices; s += gridDim.x) f.list[f.n_list++] = s;
  } else {
    for (int s = tid; s < kSlices; s += kThreads) {
      const int c = count[s];
      if (c > 0 && atom_add_acq_rel_gpu(p.token_counters + s, c) + c == n_tiles) f.list[atomicAdd(&f.n_list, 1)] = s;
    }
  }
  consumer_barrier(kThreads);  // (the list; and the acquires before the other threads' loads)
  [[maybe_unused]] const unsigned long long t_list = tl_now();
  const int items = f.n_list * p.num_tokens * kPer;
  const float* y = static_cast<const float*>(p.out);
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.final_out);
  for (int item = tid; item < items; item += kThreads) {
    const int per_slice = p.num_tokens * kPer;
    const int s = f.list[item / per_slice], r = item % per_slice;
    const int t = r / kPer, h = s * kRows + (r % kPer) * 8;
    int rows[K];
    float ws[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int i = t * K + j;
      rows[j] = i < kFinSlots ? f.rows[i] : __ldcg(p.expanded_to_permuted + i);
      ws[j] = i < kFinSlots ? f.ws[i] : __ldcg(p.weights + i);
    }
    const uint4 o = weighted_rows8<K, true>(y, N, rows, ws, h);
    *reinterpret_cast<uint4*>(out + static_cast<long long>(t) * N + h) = o;
  }
  // Timeline: a finalizing block's rows written (the first barrier), its list known (the second:
  // the release and the counts' round trips) and its output stores issued (the y loads'),
  // reported as the finalize kernel's block start, gemm2 waited and block end.
  if (tid == 0 && items > 0) {
    tl_stamp(tls, kTlFinStart, t_rows);
    tl_stamp(tls, kTlFinWaited, t_list);
    tl_stamp(tls, kTlFinEnd);
  }
}
}  // namespace stream

// One unit-size path. kRows: weight rows per unit (Cfg::kUnitRows, or a smaller size of
// Cfg::kAltRows); KC: its K values per stage (a multiple of 256). The path divides the ring
// (Cfg::kRingBytes) into as many stages as fit, at most 8 (the default path: Cfg::kStages).
// sm: the kernel's static shared memory (stream::Shared; its reduction buffer is sized for the
// default path's rows, which the smaller paths fit in).
// chain: Cfg::kChain 1 (gemm1) or 2 (gemm2) of stream_chain, which passes the state between them.
template <class Cfg, int kRows, int KC>
__device__ void stream_gemm_rows(const GemmParams& p, const stream::Smem& sm, stream::ChainState* chain = nullptr) {
  using namespace stream;
  uint64_t* bars = sm.bars;
  float* red = sm.red;
  int4* unit_q = sm.unit_q;
  int* early_scratch = sm.early;
  int* epi_tile = sm.epi_tile;
  constexpr bool kGemm1 = Cfg::kGemm1;
  constexpr int N = Cfg::kN;
  constexpr int K = Cfg::kK;
  constexpr int KG = K / 32;
  constexpr int CW = Cfg::kConsumerWarps;
  constexpr int kPlanes = kGemm1 ? 1 : 2;
  // Weight rows per unit: 32 (two 16-row A tiles: gemm1 16 gate + 16 up rows, gemm2 32 output
  // features); 64 (four A tiles: gemm1 32 gate + 32 up rows, gemm2 64 features), which halves
  // the x bytes, x loads and the -136 correction MMAs per weight byte and the per-unit costs;
  // or for gemm1 16 (one A tile, rows 0-7 gate and 8-15 up of 8 features): twice the units, for
  // layers whose 32-row units would leave blocks idle (kimi-k2-tp8 at one token: 128 units for
  // 264 blocks).
  constexpr int kA = kRows / 16;      // A tiles per unit
  constexpr int kHalfRows = kRows / 2;  // gemm1: gate rows, then up rows
  static_assert(kRows == 32 || kRows == 64 || (kGemm1 && kRows == 16),
                "stream GEMM: units of 32 or 64 rows, or 16 for gemm1");
  constexpr int kUnitFeatures = kGemm1 ? kRows / 2 : kRows;
  constexpr int kSlices = N / kUnitFeatures;
  constexpr int kStagesPerUnit = (K + KC - 1) / KC;
  constexpr bool kEven = K % KC == 0;  // every stage full: no bounds tests in the loops
  // Gemm2 multiplies the same weights by the activation's hi and lo planes. The MMA's 8 columns
  // are the tile's rows; with at most 4 valid rows a unit puts hi in columns 0-3 and lo in 4-7
  // of one plane and adds the halves once in its epilogue: half the MMAs and x loads.
  constexpr bool kPackable = !kGemm1 && Cfg::kPackPlanes;
  // Shared-memory rows, padded so that ldmatrix (8 rows x 16 bytes), the scale words and the
  // 16-byte x loads of a warp hit 32 different banks.
  // Weights: kKC / 256 chunks of kRows rows x 128 bytes, 16-byte unit c of row r stored at
  // c ^ (r % 8), so ldmatrix's 8 rows hit different banks. Scales: kRows rows x kKC / 16 bytes.
  // x rows padded by 64 bytes (16-byte loads conflict-free).
  constexpr int kChunks = KC / 256;
  constexpr int kSRow = KC / 16;
  constexpr int kXRow = KC * 2 + 64;
  constexpr int kChunkBytes = kRows * 128;
  constexpr int kWBytes = kChunks * kChunkBytes;
  constexpr int kSBytes = kRows * kSRow;
  // TMA: gemm1's weights of a stage as two boxes (gate rows, up rows), [half][chunk][kHalfRows
  // rows][128 bytes] (each half's rows hold the same XOR pattern, kHalfRows being a multiple of
  // 8); gemm2's, whose unit rows are contiguous, as one box in the cp.async layout. Every stage
  // starts on 1 KiB (the 128-byte swizzle repeats every 8 rows of 128 bytes from an aligned base).
  constexpr bool kTma = Cfg::kTma;
  static_assert(!Cfg::kEvictFirst || kTma, "stream GEMM: the L2 evict-first hint is on TMA copies");
  constexpr int kHalfBytes = kChunks * kHalfRows * 128;
  constexpr bool kWHalves = kTma && kGemm1;
  // The weight maps are 4-D over blocks of kWBlock rows (moejit_params.h); tiled weights
  // (Cfg::kTiledW) in boxes of whole blocks (64-row units) are copied as one contiguous run per
  // box instead (weight_box; whole stages only, kEven).
  constexpr int kWBlock = kGemm1 ? kTiledRowsW13 : kTiledRowsW2;
  constexpr int kBoxRows = kWHalves ? kHalfRows : kRows;
  constexpr uint32_t kBoxBytes = kWHalves ? kHalfBytes : kWBytes;
  static_assert(!kTma || kWBlock % kBoxRows == 0, "stream GEMM: a weight box lies in one block of the weight map");
  constexpr bool kBlockCopy = Cfg::kTiledW && kBoxRows == kWBlock && kEven;
  // Scales of a box (kBoxRows rows, the stage's chunks): canonical ones land as [row][kSRow
  // bytes], tiled ones as [chunk][row][16 bytes] (8 groups), boxes one after another.
  constexpr uint32_t kSBoxBytes = kBoxRows * kSRow;
  // cp.async copies of tiled weights: a stage k0 further lies k0 / 2 * kWBlock bytes on.
  constexpr int kWStageMul = Cfg::kTiledW ? kWBlock : 1;
  // Gemm2 by TMA with Cfg::kXBoxes copies its x (both planes) as boxes of 4 rows
  // (GemmParams::tma_x): the stage's x is [box (rows 0-3, 4-7)][plane][group][row][64 bytes], one
  // box where the tile has at most 4 valid rows. Otherwise x is copied row by row (gemm1: gathered
  // token rows) into padded rows.
  constexpr bool kXBox = kTma && !kGemm1 && Cfg::kXBoxes;
  // Cfg::kPackedOnly (gemm2 of a chain, tiles of at most 4 valid rows): the stage holds one x
  // plane of 8 padded rows, the packed units' hi rows 0-3 and lo rows 4-7.
  constexpr bool kPackedOnly = !kGemm1 && Cfg::kPackedOnly;
  static_assert(!kPackedOnly || (Cfg::kPackPlanes && !kXBox), "stream GEMM: packed-only stages hold packed row copies");
  constexpr int kChain = Cfg::kChain;
  static_assert(kChain == 0 || (kRows == Cfg::kUnitRows && kTma && Cfg::kDynamicUnits && Cfg::kTileReady),
                "stream GEMM: a chain streams 64-row units by TMA from the counter, per tile");
  constexpr int kXOff = kWBytes + kSBytes;
  static_assert(kXBoxRows == 4 && kXBoxGroup == 32, "stream GEMM: x boxes of 4 rows of 32-element groups");
  constexpr int kXSlot = kXBoxRows * KC * 2;     // 4 rows of one plane
  constexpr int kXBoxBytes = kPlanes * kXSlot;  // one box
  constexpr int kXBytes = kXBox ? 2 * kXBoxBytes : kPackedOnly ? 8 * kXRow : kPlanes * 8 * kXRow;
  // fp16 operands (Cfg::kF16, StreamConfig::f16; the top of this file): gemm2's stage also holds
  // the activation's dequantisation words of its tile, one per 8 features (GemmParams::act_magic).
  constexpr bool kF16 = Cfg::kF16;
  static_assert(!kF16 || (kChain != 0 && kRows == 64 && Cfg::kSplitEpilogue && CW == 4 &&
                          (kGemm1 ? Cfg::kTiledW && Cfg::kEarlyRouted : kPackedOnly)),
                "stream GEMM: fp16 operands in a chain of 64-row units, tiled w13, packed gemm2 units");
  static_assert(!Cfg::kF16Act || (kGemm1 && kF16), "stream GEMM: an fp16 gemm2 behind an fp16 gemm1");
  // Group columns (Cfg::kGroupCols; the unit loop's `gc` path) on this path: 64-row units with
  // tiled weights and the split epilogue; gemm1: 512-deep stages by TMA; gemm2: packed units
  // (bf16 operands) of 256- or 512-deep stages.
  static_assert(Cfg::kGroupCols >= 0 && Cfg::kGroupCols <= (kGemm1 ? 2 : 1),
                "stream GEMM: group columns for tiles of at most 2 (gemm1) or 1 (gemm2) valid rows");
  constexpr bool kGroupCols =
      Cfg::kGroupCols > 0 && kRows == 64 &&
      (Cfg::kGemm1 ? KC == 512 : (KC == 256 || KC == 512) && Cfg::kPackPlanes && !Cfg::kF16);
  constexpr int kMagicOff = kXOff + kXBytes;
  constexpr int kMagicBytes = kF16 && !kGemm1 ? KC / 2 : 0;
  constexpr int kStageBytes = kTma ? (kXOff + kXBytes + kMagicBytes + 1023) / 1024 * 1024
                                   : kXOff + kXBytes + kMagicBytes;  // = stream_stage_bytes
  constexpr int kFit = Cfg::kRingBytes / kStageBytes;
  constexpr int NS = kRows == Cfg::kUnitRows ? Cfg::kStages : (kFit < kMaxStages ? kFit : kMaxStages);
  static_assert(kRows != Cfg::kUnitRows || kStageBytes == Cfg::kStageBytes,
                "stream GEMM: host and device stage sizes differ");
  // A slot of the ring: a stage, or in a chain the larger of its two GEMMs' stages.
  constexpr int kSlot = kChain ? Cfg::kSlotBytes : kStageBytes;
  static_assert(kSlot >= kStageBytes && kSlot % (kTma ? 1024 : 16) == 0, "stream GEMM: a slot holds a stage");
  static_assert(NS >= 2 && NS <= kMaxStages && NS * kSlot <= Cfg::kRingBytes,
                "stream GEMM: the ring holds 2 to 8 stages of every path");
  static_assert(KC % 256 == 0 && K % 256 == 0, "stream GEMM: K and the stage must be multiples of 256");
  static_assert(N % kUnitFeatures == 0, "stream GEMM: features must split into units");
  static_assert((KC / 64) % CW == 0, "stream GEMM: a stage's group pairs must split across warps");

  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full_bar = bars;
  uint64_t* empty_bar = bars + kMaxStages;
  // kSplit (four consumer warps, 32- or 64-row units): every consumer warp writes part of a
  // unit's epilogue; otherwise warp 0 writes all of it.
  constexpr bool kSplit = Cfg::kSplitEpilogue && CW == 4 && kA >= 2;
  static_assert(!kGroupCols || (kEven && kSplit && Cfg::kTiledW && (kGemm1 ? kWHalves && !kXBox : kPackable)),
                "stream GEMM: group columns in whole stages, the split epilogue, tiled weights (w13 by TMA)");
  // Tile-ready hand-off (see the top), gemm1: the unit's writers arrive on epi_bar[i % 2] for
  // the block's i-th unit after their stores (thread 0 first puts the unit's tile, or -1 after
  // the last unit, in epi_tile[i % 2]); the signal warp (warp CW + 1) then adds the unit's
  // features to the tile's word (its release covers the stores: they precede its acquire of
  // the mbarrier) and arrives on epi_free[i % 2], which thread 0 waits for before reusing the
  // entry. So no consumer waits for the release (a fence: one L2 round trip per unit).
  constexpr bool kReady = Cfg::kTileReady;
  constexpr bool kSignal = kGemm1 && kReady;
  // A chain's gemm2 that finalizes the layer's output at its end (stream::chain_finalize).
  constexpr bool kFinal = kChain == 2 && Cfg::kChainFinalize;
  uint64_t* epi_bar = bars + 2 * kMaxStages;
  uint64_t* epi_free = epi_bar + 2;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  // kFinal: consumer thread tid's entry of dispatch's row map and of the routing weights
  // (complete: every consumer waited for dispatch in the gemm1 phase), loaded now, used at the end.
  [[maybe_unused]] int fin_row = -1;
  [[maybe_unused]] float fin_w = 0.0f;
  if constexpr (kFinal)
    if (warp < CW && tid < p.num_tokens * Cfg::kTopK && tid < stream::kFinSlots && p.final_out != nullptr) {
      fin_row = __ldcg(p.expanded_to_permuted + tid);
      fin_w = __ldcg(p.weights + tid);
    }
  // Timeline events (diagnostic builds only; see moejit_common.cuh).
  constexpr int kEvStart = kGemm1 ? kTlG1Start : kTlG2Start;
  constexpr int kEvWaited = kGemm1 ? kTlG1Waited : kTlG2Waited;
  constexpr int kEvIssued = kGemm1 ? kTlG1Issued : kTlG2Issued;
  constexpr int kEvFirst = kGemm1 ? kTlG1First : kTlG2First;
  constexpr int kEvEnd = kGemm1 ? kTlG1End : kTlG2End;
  [[maybe_unused]] const unsigned long long tl_t0 = tl_now();
  [[maybe_unused]] const int tls = tl_slot();
  if (tid == 0) tl_stamp(tls, kEvStart, tl_t0);
  constexpr int kTlK = kGemm1 ? 0 : 1;  // per-block record (timeline builds)
  if (tid == 0) {
    tl_block(kTlK, kTbSlot, tls);
    tl_block(kTlK, kTbSm, smid());
    tl_block(kTlK, kTbStart, tl_t0);
  }
  // A chain's second phase finds the mbarriers initialised and runs on without a block barrier.
  if (kChain != 2 && tid == 0) {
    for (int s = 0; s < NS; ++s) {
      // One cp.async arrive per producer thread (TMA: the issuing thread's expect_tx alone).
      mbar_init(&full_bar[s], kTma ? 1 : Cfg::kProducerWarps * 32);
      mbar_init(&empty_bar[s], CW * 32);  // every consumer thread releases its reads
    }
    if constexpr (kSignal)
      for (int i = 0; i < 2; ++i) {
        mbar_init(&epi_bar[i], kSplit ? CW * 32 : 32);
        mbar_init(&epi_free[i], 1);
      }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (kChain != 2) __syncthreads();
  // The unit queue's first entry of this GEMM (a chain's gemm2 continues after gemm1's).
  const int q_base = kChain == 2 ? chain->q_base : 0;

  // Gemm1 with Cfg::kEarlyUnit (p.topk_ids set): the producer
  // warp plans its first unit without dispatch's tables (in early_scratch), and every warp
  // waits for dispatch after its first unit instead of before it. The consumers take each
  // unit's tile count from the unit queue, not from dispatch's offsets.
  constexpr bool kEarly = kGemm1 && kTma && Cfg::kDynamicUnits && Cfg::kEarlyUnit;
  // Tile-ready hand-off (see the top): gemm2's producer is the TMA one. Dispatch zeroes the
  // words: gemm1's signal warp adds to them only after gemm1's wait for it.
  static_assert(!kReady || kTma, "stream GEMM: tile-ready with TMA");
  // A chain's gemm1 (kChain 1) takes every unit from the counter, its first too: gemm2's units
  // wait for gemm1's tiles in the same grid, so no unit may belong to a block that is not yet
  // resident (a grid that fits the card can still wait for SMs other work holds). Its first unit
  // is then planned before dispatch only behind the fused block, which zeroes the counter before
  // gemm1 launches.
  constexpr bool kTakeFirst = kChain == 1;
  const bool early = kEarly && p.topk_ids != nullptr &&
                     p.num_tokens * Cfg::kTopK <= 32 * stream::kEarlySlotRegs &&
                     (!kTakeFirst || Cfg::kEarlyRouted);
  int first_id = blockIdx.x;  // kTakeFirst: the producer warp's first unit
  // Behind a separate dispatch kernel, which zeroes the unit counter, an early block takes its
  // second unit after its wait for dispatch, at its first unit's last stage; behind the fused
  // block (Cfg::kEarlyRouted), which zeroes it before gemm1 launches, when its first unit starts, as
  // other blocks do (it still waits for dispatch before loading that unit's tables).
  const bool take_after_wait = early && !Cfg::kEarlyRouted;
  [[maybe_unused]] stream::EarlyUnit eu{};
  if constexpr (kEarly)
    if (early && warp == CW) {
      int taken = 0;  // kTakeFirst: issued before the poll, so that its round trip overlaps it
      if (kTakeFirst && lane == 0) taken = stream::take_unit<Cfg>(p.unit_counter);
      // Behind the fused route+dispatch block (Cfg::kEarlyRouted; the host sets p.routed), the
      // ids are readable once its word reads 1: lane 0 polls, its acquire orders what follows
      // after the block's writes, and the warp barrier passes that on to the other lanes.
      // With at most Cfg::kRoutedIds slots the ids come packed beside the word
      // (moejit_params.h): up to 8 lanes poll them instead of the word, and no load of the ids
      // follows (one L2 round trip less before the first copy, and no wait for the block's
      // release). A chain's gemm1 reads them packed up to 8 slots only (and the planner packs
      // more only where no bucket runs a chain: Plan::routed_id_slots).
      const int n_slots = p.num_tokens * Cfg::kTopK;
      constexpr int kPackedSlots = kTakeFirst && Cfg::kRoutedIds > 8 ? 8 : Cfg::kRoutedIds;
      const bool packed_ids = Cfg::kRoutedIds && n_slots <= kPackedSlots;
      uint4 ids = make_uint4(0u, 0u, 0u, 0u);
      if (Cfg::kEarlyRouted) {
        if (kPackedSlots > 8 && packed_ids && n_slots > 8) {  // lane i < ceil(slots / 8) polls vector i
          bool have = lane >= (n_slots + 7) / 8;
          do {
            if (!have) {
              ids = stream::ld_volatile_v4(p.routed + routed_id_word(lane));
              have = (ids.x & ids.y & ids.z & ids.w & 0x80000000u) != 0u;
            }
          } while (!__all_sync(kFullMask, have));
          if (lane == 0) tl_stamp(tls, kTlG1PRouted);
        } else if (lane == 0) {
          if (packed_ids) {
            do {
              ids = stream::ld_volatile_v4(p.routed + 4);  // (vector 0: routed_id_word(0))
            } while ((ids.x & ids.y & ids.z & ids.w & 0x80000000u) == 0u);
          } else {
            while (ld_acquire_gpu(p.routed) != 1) {
            }
          }
          tl_stamp(tls, kTlG1PRouted);
        }
        __syncwarp();
      }
      if constexpr (kTakeFirst) first_id = stream::count_of<Cfg>(__shfl_sync(kFullMask, taken, 0));
      if (lane == 0) tl_stamp_after(tls, kTlG1PTaken, static_cast<uint32_t>(first_id));
      stream::early_first_unit<Cfg, kRows, kTakeFirst>(p, early_scratch, lane, first_id, eu,
                                           Cfg::kEarlyRouted && packed_ids, ids);
      if (lane == 0) tl_stamp_after(tls, kTlG1PPlanned, static_cast<uint32_t>(eu.e ^ eu.token));
    }
  // Gemm1 reads dispatch's outputs: wait for it. Gemm2 reads them without waiting (gemm1
  // waited for dispatch before it triggered gemm2) and waits only before reading gemm1's output
  // (the producer, before its first x copy).
  if constexpr (kGemm1) {
    if (!early) {
      pdl_wait();
      if (tid == 0) tl_stamp(tls, kEvWaited);
      if (tid == 0) tl_block(kTlK, kTbWaited, tl_now());
      if (tid == CW * 32) tl_stamp(tls, kTlG1PWaited);
      pdl_trigger();
      if (kTakeFirst && warp == CW) {  // the counter is zeroed once the wait has passed
        int taken = 0;
        if (lane == 0) taken = stream::take_unit<Cfg>(p.unit_counter);
        first_id = stream::count_of<Cfg>(__shfl_sync(kFullMask, taken, 0));
      }
    }
  }
  // The producer's source row of tile row `lane` < 8 (gemm1: its token; padding rows read -1
  // and are never used).
  auto x_src_of_tile = [&](int tile) {
    if (lane >= 8) return 0;
    const int row = tile * 8 + lane;
    return kGemm1 ? p.permuted_to_slot[row] / Cfg::kTopK : row;
  };
  // kReady: the first unit's tile, blockIdx.x / kSlices, does not depend on the tile count, so
  // the producer loads what it needs of it (with dynamic units its expert, rows and x sources;
  // gemm2: its ready word, last, since the acquire orders what follows) together with the count:
  // one memory round trip before its first copy instead of two or three.
  const int tile0 = (kTakeFirst ? static_cast<unsigned>(first_id) : blockIdx.x) / kSlices;  // (producer warp)
  const bool first_here = kReady && !early && warp == CW && tile0 < p.max_tiles;
  int e_first = 0, rows_first = 0, x_first = 0, ready_first = 0;
  if (Cfg::kDynamicUnits && first_here) {
    e_first = p.tile_expert[tile0];
    rows_first = p.tile_rows[tile0];
    if (!kXBox) x_first = x_src_of_tile(tile0);
  }
  const int n_tiles = early ? eu.n_tiles : p.expert_offsets[Cfg::kLocalExperts] / 8;
  if (!kGemm1 && first_here && lane == 0) ready_first = ld_acquire_gpu(p.tile_ready + tile0);
  const int n_units = n_tiles * kSlices;
  const int my_units = blockIdx.x < n_units ? (n_units - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  // Dynamic units (Cfg::kDynamicUnits, TMA only): a block's first unit is blockIdx.x as above;
  // each later one is gridDim.x + the next value of a counter (GemmParams::unit_counter, zeroed
  // by dispatch or by the fused block), taken by the producer when it starts the unit before. Blocks that
  // stream faster (H200: by up to 13% within one kernel, bench/RESULTS.md section 16) or start
  // earlier then take more units. The producer publishes each unit {id, expert, rows} in
  // unit_q[i % kUnitQ] before its first stage's "full" barrier completes (lane 0 writes it and
  // then arrives there: release), and {-1} after the block's last unit; consumers read it after
  // that wait. Entry i is rewritten kUnitQ units later, after the consumers released a stage
  // past unit i's first (kUnitQ > kMaxStages).
  constexpr bool dyn = Cfg::kDynamicUnits && Cfg::kTma;
  if (!dyn && tid == 0) tl_block(kTlK, kTbUnits, my_units);

  // The block's units, their expert and valid rows (two independent loads: dispatch writes
  // both per tile, where the rows used to be a load at an address that depends on the expert)
  // fetched two units ahead, so that neither role waits on a global load at a unit boundary.
  // (Loading them when a unit starts cost a few L2 round trips per unit, which measured as the
  // per-block throughput limit. The first unit's loads still follow the tile count's; loading the
  // first 32 tiles' entries together with it changed nothing measurable: bench/RESULTS.md
  // section 15.)
  // Unit `id` of expert e with `rows` valid rows (one division): numbered tile-fastest, or
  // tile-major with kReady.
  struct Unit {
    int tile, slice, e, row0, rows_valid;
    __device__ static int tile_of(int id, int n_tiles) { return stream::unit_tile<Cfg, kSlices>(id, n_tiles); }
    __device__ Unit(int id, int n_tiles, int e_, int rows) : e(e_), rows_valid(rows) {
      if constexpr (kReady) {
        tile = id / kSlices;
        slice = id - tile * kSlices;
      } else {
        slice = id / n_tiles;
        tile = id - slice * n_tiles;
      }
      row0 = tile * 8;
    }
  };
  // A producer's place in the ring: the slot of its next stage, that slot's byte offset, and the
  // "empty" phase to wait for there.
  struct Ring {
    int slot;
    uint32_t so, parity;
    __device__ void advance() {
      so += kSlot;
      if (++slot == NS) {
        slot = 0;
        so = 0;
        parity ^= 1;
      }
    }
  };
  struct UnitQueue {
    const GemmParams& p;
    int n_tiles, my_units;
    int e0 = 0, e1 = 0, r0 = 0, r1 = 0;
    __device__ int id(int i) const { return blockIdx.x + i * gridDim.x; }
    __device__ void load(int i, int& e, int& rows) const {
      e = i < my_units ? p.tile_expert[Unit::tile_of(id(i), n_tiles)] : 0;
      rows = i < my_units ? p.tile_rows[Unit::tile_of(id(i), n_tiles)] : 0;
    }
    __device__ void start() {
      load(0, e0, r0);
      load(1, e1, r1);
    }
    // Unit i (called for i = 0, 1, 2, ... in order); issues the loads for unit i + 2.
    __device__ Unit next(int i) {
      const Unit u(id(i), n_tiles, e0, r0);
      e0 = e1;
      r0 = r1;
      load(i + 2, e1, r1);
      return u;
    }
  };
  UnitQueue units{p, n_tiles, my_units};
  if (!dyn && my_units > 0) units.start();

  // Gemm2 blocks without units still wait for gemm1, so that this grid completes only after its
  // predecessor (what a PDL-launched successor's wait relies on).
  if constexpr (!kGemm1)
    if (my_units == 0) pdl_wait();

  if constexpr (kSignal) {
    if (warp == CW + 1) {  // ---------------- signal warp (see kSignal) ----------------
      if (early) pdl_wait();  // dispatch zeroes the words (the other warps wait after a unit)
      if (lane == 0)
        for (int i = 0;; ++i) {
          mbar_wait<Cfg::kSuspendNs>(&epi_bar[i & 1], (i >> 1) & 1);
          const int tile = epi_tile[i & 1];
          if (tile < 0) break;
          tl_block(kTlK, kTbSigGot, tl_now());
          red_release_gpu(p.tile_ready + tile, kUnitFeatures);
          tl_block(kTlK, kTbSigEnd, tl_now());
          mbar_arrive(&epi_free[i & 1]);
        }
      return;
    }
  }
  if (warp >= CW) {
    // ---------------- producers ----------------
    // Shared by both copy paths: x sources fetched one unit ahead (x_src_of_tile, above).
    auto x_src_of_id = [&](int id) { return id < n_units ? x_src_of_tile(Unit::tile_of(id, n_tiles)) : 0; };
    auto x_src_of = [&](int i) { return i < my_units ? x_src_of_id(units.id(i)) : 0; };
    // Gemm2, before its first x copy: x is gemm1's output (kReady: per unit, see wait_tile).
    bool waited = kGemm1 || kReady;
    auto wait_for_x = [&](bool stamp) {
      pdl_wait();
      if (stamp) tl_stamp(tls, kEvWaited);
      if (stamp) tl_block(kTlK, kTbWaited, tl_now());
      pdl_trigger();
      waited = true;
    };
    Ring ring{0, 0, 1};  // the first pass finds every slot free ("empty" phase 1)
    if constexpr (kChain == 2) ring = Ring{chain->p_slot, chain->p_so, chain->p_parity};
    // (A chain's signal warp comes here too, after gemm1's phase.)
    if (!kGemm1 && warp == CW && lane == 0) tl_block(kTlK, kTbP2In, tl_now());
    // kProducerWarps warps fill each stage with 16-byte cp.async: one warp cannot keep enough
    // copies in flight (measured: a block with one producer warp streamed ~2.4 GB/s whatever the
    // ring depth). Each producer thread's cp.async.mbarrier.arrive completes its share of the
    // stage's "full" barrier.
    if constexpr (kTma) {
      // TMA (one producer warp): per stage, lane 0 announces the stage's bytes on its "full"
      // barrier and issues four boxes (weights and scales of each half of the unit's rows;
      // past K, in a partial last stage, boxes are zero-filled and still count their full
      // bytes); then lane q < kPlanes * 8 copies x row q of the stage with one bulk copy
      // (gathered rows: gemm1 tokens, gemm2 permuted rows; rows past the tile's valid ones are
      // not copied and never read).
      static_assert(Cfg::kProducerWarps == 1, "stream GEMM: TMA takes one producer warp");
      if (warp > CW) return;
      const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
      // Cfg::kEvictFirst: weights and scales (usually read by one unit; an expert with more
      // than one row tile reads them once per tile, then maybe from DRAM again) leave L2 before
      // the rows the layer's kernels read again (x, gemm1's activation, gemm2's y). Scales take
      // the policy only together with the weights: hinted alone, a scale line (shared by several
      // stages) was evicted between them (bench/RESULTS.md section 23c). Each launch chooses
      // (GemmParams::evict_first).
      const bool hint = Cfg::kEvictFirst && p.evict_first != 0;
      [[maybe_unused]] const uint64_t w_policy = Cfg::kEvictFirst ? l2_evict_first_policy() : 0;
      // kReady, gemm2: the unit's x is its tile's SwiGLU rows, complete once the tile's word
      // reaches K (lane 0's acquire loads: ready_ahead, loaded when the unit's id became known,
      // then polls). The acquire orders the copies after gemm1's writes (the warp barrier
      // passes it on to the other lanes), the proxy fence makes those generic-proxy writes
      // visible to the copies (async proxy). The block triggers its dependents at once and waits
      // for gemm1's grid at its end.
      constexpr bool kWaitTiles = kReady && !kGemm1;
      int ready_ahead = 0;
      auto load_ready = [&](int tile) {
        if (kWaitTiles && lane == 0) ready_ahead = ld_acquire_gpu(p.tile_ready + tile);
      };
      auto wait_tile = [&](int tile, bool stamp) {
        if (lane == 0)
          while (ready_ahead < K) ready_ahead = ld_acquire_gpu(p.tile_ready + tile);
        __syncwarp();
        asm volatile("fence.proxy.async.global;\n" ::: "memory");
        if (stamp && lane == 0) {
          tl_stamp(tls, kEvWaited);
          tl_block(kTlK, kTbWaited, tl_now());
        }
      };
      if constexpr (kWaitTiles) pdl_trigger();
      // Static units: the queue's. Dynamic: the block's first unit, then each next one taken
      // (lane 0's atomic) when the unit before starts, its expert, rows and x sources loaded once
      // that unit's second stage is issued (Cfg::kEarlyFetch: the count is back by then, and the
      // tables by the next unit's first stage; H200, bench/RESULTS.md section 22), else its last.
      constexpr int kFetchStage = Cfg::kEarlyFetch && kStagesPerUnit > 1 ? 1 : kStagesPerUnit - 1;
      int id = kTakeFirst ? first_id : static_cast<int>(blockIdx.x), e_cur = 0, rows_cur = 0;
      if (dyn && (kTakeFirst ? id < n_units : my_units > 0)) {
        e_cur = early ? eu.e : kReady ? e_first : p.tile_expert[Unit::tile_of(id, n_tiles)];
        rows_cur = early ? eu.rows : kReady ? rows_first : p.tile_rows[Unit::tile_of(id, n_tiles)];
      }
      int x_src_next = kXBox  ? 0
                       : early ? eu.token
                       : dyn   ? (kReady ? x_first : x_src_of_id(id))
                               : x_src_of(0);
      int ui = 0;
      if (kGemm1 && lane == 0) tl_stamp_after(tls, kTlG1PLoop, static_cast<uint32_t>(x_src_next ^ e_cur));
      for (; dyn ? id < n_units : ui < my_units; ++ui) {
        const Unit u = dyn ? Unit(id, n_tiles, e_cur, rows_cur) : units.next(ui);
        if (ui == 0)
          ready_ahead = ready_first;
        else if (!dyn)
          load_ready(u.tile);  // (later dynamic units: loaded ahead, below)
        // Lane 0 takes the next unit from the counter; the count (with Cfg::kEarlyFetch a float's
        // bits, see atom_take_gpu) is read where the next unit's tables are loaded.
        int taken = 0;
        if (dyn && lane == 0 && !(take_after_wait && ui == 0))
          taken = stream::take_unit<Cfg>(p.unit_counter);
        int id_next = n_units;
        const int x_src = x_src_next;
        if (!dyn && !kXBox) x_src_next = x_src_of(ui + 1);
        int row_lo, row_hi;  // TMA box coordinates
        stream::first_rows<Cfg, kRows>(u.e + Cfg::kLocalOffset, u.slice, row_lo, row_hi);
        const bool packed = kPackable && u.rows_valid <= 4;
        const int qr = lane;
        const int r = packed ? qr & 3 : qr & 7;
        const bool lo_plane = packed ? (qr & 4) != 0 : qr >= 8;
        const int src = kXBox ? 0 : __shfl_sync(kFullMask, x_src, r);
        const bool copy = !kXBox && qr < kPlanes * 8 && r < u.rows_valid && (!packed || qr < 8) &&
                          (!kPackedOnly || qr < 8);
        const __nv_bfloat16* xrow =
            static_cast<const __nv_bfloat16*>(lo_plane ? p.x_lo : p.x) + static_cast<long long>(src) * K;
        // x of a stage: gemm2's boxes (one for a tile of at most 4 valid rows) count whole, rows
        // past the tile's valid ones and past K included; row copies count what they copy.
        const uint32_t x_boxes = u.rows_valid > kXBoxRows ? 2 : 1;
        const uint32_t x_rows = kXBox ? 0u : __popc(__ballot_sync(kFullMask, copy));
        const uint32_t x_dst = base + kXOff + qr * kXRow;
#pragma unroll 1
        for (int ks = 0; ks < kStagesPerUnit; ++ks) {
          const int k0 = ks * KC;
          const int kc = kEven ? KC : min(KC, K - k0);
          const uint32_t so = ring.so;
          uint64_t* bar = &full_bar[ring.slot];
          // Every lane waits for the slot itself (its x copy is then ordered after the
          // consumers' release without a warp barrier); a bulk copy completing before lane 0's
          // expect_tx only takes the barrier's tx-count below zero for a moment.
          const bool first_copy = ui == 0 && ks == 0 && lane == 0;  // (timeline stamps)
          if (first_copy) {
            tl_stamp_after(tls, kGemm1 ? kTlG1PUnit : kTlG2PUnit, x_rows ^ static_cast<uint32_t>(row_lo));
            if (!kGemm1) tl_block(kTlK, kTbP2Unit, tl_now());
          }
          const uint32_t x_bytes = kXBox ? x_boxes * kXBoxBytes : x_rows * kc * 2;
          mbar_wait<Cfg::kSuspendNs>(&empty_bar[ring.slot], ring.parity);
          if (!kGemm1 && first_copy) {
            tl_stamp(tls, kTlG2PSlot);
            tl_block(kTlK, kTbP2Slot, tl_now());
          }
          if (dyn && ks == 0 && lane == 0)
            unit_q[(q_base + ui) % kUnitQ] =
                make_int4(id, u.e, u.rows_valid | (kChain == 2 ? stream::kChainG2Rows : 0), n_tiles);
          if (lane == 0) {
            mbar_expect_tx(bar, kWBytes + kSBytes + x_bytes + (kMagicBytes > 0 ? kc / 2 : 0));
            weight_box<kBlockCopy, kWBlock, K / 2, kBoxBytes>(base + so, p, row_lo, k0, bar, hint, w_policy);
            if constexpr (kWHalves)
              weight_box<kBlockCopy, kWBlock, K / 2, kBoxBytes>(base + so + kHalfBytes, p, row_hi, k0, bar, hint,
                                                                w_policy);
            scale_box<Cfg::kTiledW, kBlockCopy, kWBlock, K / 16, kSBoxBytes>(base + so + kWBytes, p, row_lo, k0,
                                                                               bar, hint, w_policy);
            if constexpr (kWHalves)
              scale_box<Cfg::kTiledW, kBlockCopy, kWBlock, K / 16, kSBoxBytes>(
                  base + so + kWBytes + kSBoxBytes, p, row_hi, k0, bar, hint, w_policy);
            if (ui == 0 && ks == 0) tl_stamp(tls, kEvIssued);
          }
          if (!waited) wait_for_x(lane == 0);
          if (kWaitTiles && ks == 0) wait_tile(u.tile, ui == 0);
          if constexpr (kXBox) {
            if (lane == 0) {
              tma_load_4d(base + so + kXOff, &p.tma_x, 0, u.row0, k0 / kXBoxGroup, 0, bar);
              if (x_boxes > 1)
                tma_load_4d(base + so + kXOff + kXBoxBytes, &p.tma_x, 0, u.row0 + kXBoxRows, k0 / kXBoxGroup, 0, bar);
            }
          } else if (copy) {
            // fp16 x (kF16): written by the fused kernel's second block, whose word (the factor)
            // turns nonzero once it is out; every block waits before its first copy.
            if constexpr (kF16 && kGemm1)
              if (ui == 0 && ks == 0) {
                while (ld_acquire_gpu(p.routed + 1) == 0) {
                }
                asm volatile("fence.proxy.async.global;\n" ::: "memory");
              }
            bulk_load(x_dst + so, xrow + k0, kc * 2, bar);
          }
          if constexpr (kMagicBytes > 0)  // after wait_tile: gemm1 wrote them before the tile's word
            if (lane == 8) bulk_load(base + so + kMagicOff, p.act_magic + static_cast<long long>(u.tile) * (K / 8) + k0 / 8, kc / 2, bar);
          ring.advance();
          // The next unit: its id, then what it needs (kFetchStage, above).
          if (dyn && ks == ((take_after_wait && ui == 0) ? kStagesPerUnit - 1 : kFetchStage)) {
            if (early && ui == 0) {  // wait for dispatch's tables
              pdl_wait();
              if (lane == 0) tl_stamp(tls, kTlG1PWaited);
              pdl_trigger();
              if (take_after_wait && lane == 0) taken = stream::take_unit<Cfg>(p.unit_counter);
            }
            id_next = (kTakeFirst ? 0 : static_cast<int>(gridDim.x)) + stream::count_of<Cfg>(__shfl_sync(kFullMask, taken, 0));
            const int tile_next = Unit::tile_of(id_next, n_tiles);
            if (id_next < n_units) {
              e_cur = p.tile_expert[tile_next];
              rows_cur = p.tile_rows[tile_next];
              load_ready(tile_next);
            }
            if constexpr (!kXBox) x_src_next = id_next < n_units ? x_src_of_tile(tile_next) : 0;
          }
        }
        if (dyn) id = id_next;
      }
      if constexpr (dyn) {  // no more units: the consumers stop at this entry
        if (early && ui == 0) {  // a block without units still waits before its trigger
          pdl_wait();
          pdl_trigger();
        }
        if constexpr (kChain == 1) {  // gemm2's units follow in the same ring
          chain->p_slot = ring.slot;
          chain->p_so = ring.so;
          chain->p_parity = ring.parity;
          chain->q_base = ui;
          return;
        }
        mbar_wait<Cfg::kSuspendNs>(&empty_bar[ring.slot], ring.parity);
        if (lane == 0) {
          unit_q[(q_base + ui) % kUnitQ] = make_int4(-1, 0, 0, 0);
          mbar_arrive(&full_bar[ring.slot]);
        }
      }
      if constexpr (kWaitTiles) pdl_wait();  // this grid completes after gemm1's
      return;
    }
    constexpr int PT = Cfg::kProducerWarps * 32;
    const int pt = tid - CW * 32;
    // Each producer thread copies the same chunks of every stage: its 16-byte units of the
    // weight rows, scale rows and x rows are fixed, so their shared-memory offsets are computed
    // once, the global pointers once per unit, and per stage only the ring slot and the k offset
    // change (no division, and no bounds test where K is a multiple of the stage).
    constexpr int kWc = KC / 32;   // 16-byte chunks per weight row per stage
    constexpr int kSc = KC / 256;  // per scale row
    constexpr int kXc = KC / 8;    // per x row
    constexpr int kWj = kRows * kWc / PT;
    constexpr int kSj = (kRows * kSc + PT - 1) / PT;
    constexpr int kXj = kPlanes * 8 * kXc / PT;
    static_assert(kRows * kWc % PT == 0 && kPlanes * 8 * kXc % PT == 0, "chunks split evenly");
    const uint32_t base = smem_u32(smem);
    const unsigned char* scales = static_cast<const unsigned char*>(p.w_scale);
    uint32_t w_dst[kWj], s_dst[kSj], x_dst[kXj];
#pragma unroll
    for (int j = 0; j < kWj; ++j) {
      const int c = pt + j * PT, r = c / kWc, col = c % kWc;
      w_dst[j] = base + (col >> 3) * kChunkBytes + r * 128 + (((col & 7) ^ (r & 7)) << 4);
    }
#pragma unroll
    for (int j = 0; j < kSj; ++j) {
      const int c = pt + j * PT, r = c / kSc, col = c % kSc;
      s_dst[j] = base + kWBytes + (Cfg::kTiledW ? col * (kRows * 16) + r * 16 : r * kSRow + col * 16);
    }
#pragma unroll
    for (int j = 0; j < kXj; ++j) {
      const int c = pt + j * PT, qr = c / kXc, col = c % kXc;
      x_dst[j] = base + kWBytes + kSBytes + qr * kXRow + col * 16;
    }
    // Which chunks this thread copies at all, and (K not a multiple of the stage) which of them
    // lie before a stage's end: their column in the stage.
    int w_col[kWj], x_col[kXj];
    bool s_mine[kSj];
#pragma unroll
    for (int j = 0; j < kWj; ++j) w_col[j] = (pt + j * PT) % kWc;
#pragma unroll
    for (int j = 0; j < kXj; ++j) x_col[j] = (pt + j * PT) % kXc;
#pragma unroll
    for (int j = 0; j < kSj; ++j) s_mine[j] = pt + j * PT < kRows * kSc;
    int x_src_next = x_src_of(0);
    for (int ui = 0; ui < my_units; ++ui) {
      const Unit u = units.next(ui);
      const int x_src = x_src_next;
      x_src_next = x_src_of(ui + 1);
      long long row_lo, row_hi;  // 64-bit: they scale global pointers
      stream::first_rows<Cfg, kRows>(static_cast<long long>(u.e + Cfg::kLocalOffset), u.slice, row_lo,
                                     row_hi);
      auto row_of = [&](int r) { return r < kHalfRows ? row_lo + r : row_hi + (r - kHalfRows); };
      const uint8_t* w_src[kWj];
      const unsigned char* s_src[kSj];
      const __nv_bfloat16* x_src_p[kXj];  // nullptr for padding rows
#pragma unroll
      for (int j = 0; j < kWj; ++j) {
        const int r = (pt + j * PT) / kWc;
        w_src[j] = p.w + weight_unit_offset<Cfg::kTiledW, kWBlock, K / 2>(row_of(r), w_col[j]);
      }
#pragma unroll
      for (int j = 0; j < kSj; ++j) {
        const int c = pt + j * PT, r = (c / kSc) % kRows, col = c % kSc;
        s_src[j] = scales + weight_unit_offset<Cfg::kTiledW, kWBlock, K / 16, 1>(row_of(r), col);
      }
      // Gemm2 with at most 4 valid rows (most decode tiles): x rows 0-3 of plane 0 take the hi
      // plane, rows 4-7 the lo plane, and plane 1 stays unused (see kPackable).
      const bool packed = kPackable && u.rows_valid <= 4;
#pragma unroll
      for (int j = 0; j < kXj; ++j) {
        const int qr = (pt + j * PT) / kXc;
        const int r = packed ? qr & 3 : qr & 7;
        const bool lo = packed ? (qr & 4) != 0 : qr >= 8;
        const int src = __shfl_sync(kFullMask, x_src, r);
        const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(lo ? p.x_lo : p.x);
        const bool copy = r < u.rows_valid && (!packed || qr < 8);
        x_src_p[j] = copy ? x + static_cast<long long>(src) * K + x_col[j] * 8 : nullptr;
      }
#pragma unroll 1
      for (int ks = 0; ks < kStagesPerUnit; ++ks) {
        const int k0 = ks * KC;
        const int kc = kEven ? KC : min(KC, K - k0);  // a multiple of 256
        // One producer thread waits for the slot and releases the others at a named barrier:
        // waiting warps poll (each arrival in the block wakes a suspended try_wait), and with
        // all four polling, ncu counted a fifth of the kernel's instructions in this loop.
        // Then every thread checks the (completed) phase once itself, so that its copies are
        // ordered after the consumers' release by its own acquire: with the named barrier alone,
        // compute-sanitizer's racecheck reported them as races with the consumers' reads
        // (kimi-k2-tp8 at 8 tokens; bench/RESULTS.md section 13).
        const uint32_t so = ring.so;
        if (pt == 0) mbar_wait<Cfg::kSuspendNs>(&empty_bar[ring.slot], ring.parity);
        named_barrier(2, PT);
        mbar_wait<0>(&empty_bar[ring.slot], ring.parity);
#pragma unroll
        for (int j = 0; j < kWj; ++j)
          if (kEven || w_col[j] * 32 < kc) cp_async16(w_dst[j] + so, w_src[j] + k0 / 2 * kWStageMul);
#pragma unroll
        for (int j = 0; j < kSj; ++j)
          if (s_mine[j] && (kEven || ((pt + j * PT) % kSc) * 256 < kc))
            cp_async16(s_dst[j] + so, s_src[j] + k0 / 16 * kWStageMul);
        if (pt == 0 && ui == 0 && ks == 0) tl_stamp(tls, kEvIssued);
        if (!waited) wait_for_x(pt == 0);  // gemm2: everything above is independent of gemm1
#pragma unroll
        for (int j = 0; j < kXj; ++j)
          if (x_src_p[j] != nullptr && (kEven || x_col[j] * 8 < kc))
            cp_async16(x_dst[j] + so, x_src_p[j] + k0);
        cp_async_arrive(&full_bar[ring.slot]);
        ring.advance();
      }
    }
    // Returning with copies in flight is safe: the consumers wait for every stage's "full"
    // barrier, so the block outlives them.
    return;
  }

  // ---------------- consumers ----------------
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint32_t kNeg136 = 0xC308C308u;  // bf16x2 (-136, -136)
  const uint32_t neg[4] = {kNeg136, kNeg136, kNeg136, kNeg136};
  // Per-thread shared-memory offsets inside a stage. Warp w takes the group pairs w, w + CW, ...
  // (pair pi of the warp = groups G = 2 (w + pi CW) and G + 1). ldmatrix: lane l addresses row
  // (l / 8 -> A tile, half) l % 8 of the 8x16-byte matrices, 16-byte unit XOR-swizzled by row.
  // 16-row units: one ldmatrix.x4 reads both groups of a pair (lanes 16-31 address group G + 1).
  // 64-row units: two per group (rows 0-31, then 32-63).
  constexpr int kPairs = KC / 64 / CW;  // pairs per warp in a full stage
  constexpr int kLdm = kA == 1 ? 1 : kA;  // ldmatrix.x4 per pair: [group][32-row half]
  constexpr int kHalves = kA / 2;         // 32-row halves per group (0 for 16-row units)
  const int lm_row = kA >= 2 ? ((lane >> 4) & 1) * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)
                             : ((lane >> 3) & 1) * 8 + (lane & 7);
  uint32_t lm_off[kPairs][kLdm];
#pragma unroll
  for (int pi = 0; pi < kPairs; ++pi)
#pragma unroll
    for (int l = 0; l < kLdm; ++l) {
      const int gg = kA >= 2 ? l / kHalves : (lane >> 4) & 1;
      const int row = kA >= 2 ? lm_row + 32 * (l % kHalves) : lm_row;
      const int G = 2 * (warp + pi * CW) + gg;
      lm_off[pi][l] = kWHalves ? (row / kHalfRows) * kHalfBytes + (G >> 3) * (kHalfRows * 128) +
                                 (row % kHalfRows) * 128 + (((G & 7) ^ (row & 7)) << 4)
                           : (G >> 3) * kChunkBytes + row * 128 + (((G & 7) ^ (row & 7)) << 4);
      if constexpr (Cfg::kTiledW) asm volatile("" : "+r"(lm_off[pi][l]));
    }
  // Scales: row (a * 16 + h * 8 + g), bytes 2G..2G+3 (groups G, G + 1). x: plane q row g,
  // group G + gg at byte (G + gg) * 64, thread t's 16 bytes.
  // Tiled scales (kBoxRows rows per box, [chunk][row][16 bytes]): pair p = warp + pi CW at chunk
  // p / 4, bytes 4 (p % 4); with CW a multiple of 4, warp's part (in s_off) plus pi CW / 4 chunks.
  constexpr bool kFours = CW % 4 == 0;
  uint32_t s_off = !Cfg::kTiledW ? kWBytes + g * kSRow + warp * 4
                   : kFours      ? kWBytes + g * 16 + (warp >> 2) * (kBoxRows * 16) + (warp & 3) * 4
                                 : kWBytes + g * 16;
  // (Opaque registers, here and for lm_off and x_off: without them the compiler recomputed these
  // offsets inside the consumer loop for tiled weights, +53 SASS instructions per stage of
  // kimi-k2's gemm1; ncu had the one-token chain kernel at 57.2-57.6 us instead of 54.9-55.1.
  // bench/RESULTS.md section 28.)
  if constexpr (Cfg::kTiledW) asm volatile("" : "+r"(s_off));
  // A's rows a * 16 + h * 8 (+ g) and pair pi's scale offset from s_off.
  auto s_at = [warp](int a, int h, int pi) -> uint32_t {
    const int rb = a * 16 + h * 8;
    const int pair = warp + pi * CW;
    return !Cfg::kTiledW ? rb * kSRow + pi * CW * 4
           : kFours      ? (rb / kBoxRows) * kSBoxBytes + (rb % kBoxRows) * 16 + pi * (CW / 4) * (kBoxRows * 16)
                         : (rb / kBoxRows) * kSBoxBytes + (rb % kBoxRows) * 16 + (pair >> 2) * (kBoxRows * 16) +
                          (pair & 3) * 4;
  };
  // Padded x rows: row g of plane q at q * 8 * kXRow; gemm2's boxes (kXBox): column g is row
  // g % 4 of box g / 4, plane q at slot 2 (g / 4) + q, or in a packed unit (hi rows 0-3 in columns
  // 0-3, lo rows 0-3 in 4-7; one box) slot g / 4. Group G at G * 256 there.
  uint32_t x_off = kXBox ? kXOff + (g & 3) * 64 + warp * 512 + t * 16
                         : kXOff + g * kXRow + warp * 128 + t * 16;
  // (See s_off. Not with gemm2's x boxes: at four blocks per SM, 96 registers, that kernel
  // spilled 8 bytes with x_off held opaque, and measured no slower without it; bench/RESULTS.md
  // section 31.)
  if constexpr (Cfg::kTiledW && !kXBox) asm volatile("" : "+r"(x_off));
  constexpr uint32_t kXPair = kXBox ? CW * 512 : CW * 128;  // per pair of the warp
  constexpr uint32_t kXGroup = kXBox ? 256 : 64;            // the pair's second group
  const uint32_t smem_base = kTma ? (smem_u32(smem) + 1023u) & ~1023u : smem_u32(smem);

  // kSignal: the writers' hand-off of the block's i-th unit (tile < 0: no more units).
  auto signal_unit = [&](int i, int tile) {
    if (tid == 0) {
      if (i >= 2) mbar_wait<Cfg::kSuspendNs>(&epi_free[i & 1], ((i >> 1) - 1) & 1);
      epi_tile[i & 1] = tile;
    }
    mbar_arrive(&epi_bar[i & 1]);
  };
  int slot = kChain == 2 ? chain->c_slot : 0;
  uint32_t parity = kChain == 2 ? chain->c_parity : 0;
  int ui = 0;
  for (;; ++ui) {
    int4 q = make_int4(0, 0, 0, 0);  // dynamic units: {id, expert, rows, tiles}, or {-1} at the end
    if constexpr (dyn) {
      if (early && ui == 1) {  // the first unit is done: wait for dispatch (see kEarly)
        pdl_wait();
        if (tid == 0) tl_stamp(tls, kEvWaited);
        pdl_trigger();
      }
      mbar_wait<Cfg::kSuspendNs>(&full_bar[slot], parity);  // the unit's first stage (or the end)
      q = unit_q[(q_base + ui) % kUnitQ];
      if (q.x < 0) break;
      // A chain's gemm1 stops at gemm2's first entry, which its gemm2 phase then reads again.
      if (kChain == 1 && (q.z & stream::kChainG2Rows) != 0) break;
      if constexpr (kChain == 2) q.z &= ~stream::kChainG2Rows;
      // The host runs a chain only where no tile has more than 4 valid rows.
      if (kPackedOnly && q.z > 4) __trap();
    } else if (ui >= my_units) {
      break;
    }
    const Unit u = dyn ? Unit(q.x, q.w, q.y, q.z) : units.next(ui);
    // SwiGLU parameters of the unit's expert, loaded now and used in the epilogue.
    float alpha = 1.0f, beta = 0.0f, limit = 0.0f;
    if constexpr (kGemm1 && Cfg::kHasAlpha) alpha = p.alpha[u.e];
    if constexpr (kGemm1 && Cfg::kHasBeta) beta = p.beta[u.e];
    if constexpr (kGemm1 && Cfg::kHasLimit) limit = p.limit[u.e];
    float acc[kA][4];
#pragma unroll
    for (int a = 0; a < kA; ++a)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][i] = 0.0f;

    int xf_bits = 0;  // gemm1 with kF16: the launch's x factor (float bits), read at its first stage
    // The factor for the epilogue (the load above normally has it; read again should it be 0).
    auto x_factor = [&]() {
      int xb = xf_bits;
      while (xb == 0) xb = ld_relaxed_gpu(p.routed + 1);
      return __int_as_float(xb);
    };
    // The unit's stages; nq = activation planes multiplied per stage (1 for gemm1 and packed
    // gemm2 units, 2 otherwise). Called with constants: once inlined, the tests on nq fold away.
    auto run_stages = [&](const int nq) {
      // The tile's x row of this thread (the MMA's column g): rows past the valid ones are not
      // copied into the stage; they are read as zeros instead of whatever an earlier unit left
      // there, so that nothing depends on earlier units (their outputs are discarded anyway).
      const uint32_t x_ok = ((kPackable && nq == 1) ? (g & 3) : g) < u.rows_valid;
      auto x_plane = [&](int q) -> uint32_t {
        if constexpr (kXBox)
          return ((kPackable && nq == 1) ? (g >> 2) : 2 * (g >> 2) + q) * kXSlot;
        else
          return q * 8 * kXRow;
      };
  #pragma unroll 1
      for (int ks = 0; ks < kStagesPerUnit; ++ks) {
        const uint32_t st = smem_base + slot * kSlot;
        const int pairs = kEven ? KC / 64 : min(KC, K - ks * KC) / 64;
        mbar_wait<Cfg::kSuspendNs>(&full_bar[slot], parity);
        // (The producer waited for the factor's word before the stage's x copy; relaxed: nothing
        // here waits for the load until the epilogue, which reads it again should it be 0.)
        if constexpr (kF16 && kGemm1)
          if (ks == 0) xf_bits = ld_relaxed_gpu(p.routed + 1);
        if (tid == 0 && ui == 0 && ks == 0) tl_stamp(tls, kEvFirst);
        if (tid == 0 && ui == 0 && ks == 0) tl_block(kTlK, kTbFirst, tl_now());
  #pragma unroll
        for (int pi = 0; pi < kPairs; ++pi) {
          if (!kEven && warp + pi * CW >= pairs) continue;
          // Loads first: weights [group][matrix] (matrix m = A tile m / 2, rows +8 * (m % 2)),
          // scales [A tile][half] (groups G low, G + 1 high), x [plane][group].
          uint32_t wq[2][2 * kA];
          if constexpr (kA >= 2) {
  #pragma unroll
            for (int gg = 0; gg < 2; ++gg)
  #pragma unroll
              for (int h = 0; h < kHalves; ++h) {
                uint32_t r4[4];
                ldmatrix_x4(st + lm_off[pi][gg * kHalves + h], r4);
  #pragma unroll
                for (int m = 0; m < 4; ++m) wq[gg][4 * h + m] = r4[m];
              }
          } else {
            uint32_t r4[4];  // matrices: (group G, rows 0-7), (G, 8-15), (G + 1, 0-7), (G + 1, 8-15)
            ldmatrix_x4(st + lm_off[pi][0], r4);
            wq[0][0] = r4[0];
            wq[0][1] = r4[1];
            wq[1][0] = r4[2];
            wq[1][1] = r4[3];
          }
          uint32_t sw[kA][2];
  #pragma unroll
          for (int a = 0; a < kA; ++a)
  #pragma unroll
            for (int h = 0; h < 2; ++h)
              sw[a][h] = lds32(st + s_off + s_at(a, h, pi));
          // fp16 operands (kF16): the dequantisation constants of group G + gg, word t: nibbles
          // at bits 0-3 (lo, k-step registers a0/a1) as (w & 0x000f000f) ^ mlo, at bits 4-7 (hi,
          // a2/a3) as (w & 0x00f000f0) ^ mhi, and the correction operands (the same with the
          // sign set: -1032 and -1152 times 2^d). Gemm1: d = 0 (x carries the launch's factor);
          // gemm2: the tile's word of the thread's 8 features, from the stage.
          uint32_t mlo[2], mhi[2], clo[2], chi[2];
          if constexpr (kF16) {
  #pragma unroll
            for (int gg = 0; gg < 2; ++gg) {
              mlo[gg] = kGemm1 ? 0x64086408u : lds32(st + kMagicOff + ((2 * (warp + pi * CW) + gg) * 4 + t) * 4);
              mhi[gg] = mlo[gg] ^ 0x00880088u;
              clo[gg] = mlo[gg] | 0x80008000u;
              chi[gg] = mhi[gg] | 0x80008000u;
            }
          }
          uint4 xv[kPlanes][2];
  #pragma unroll
          for (int q = 0; q < nq; ++q)
  #pragma unroll
            for (int gg = 0; gg < 2; ++gg)
              xv[q][gg] = lds128_if(st + x_off + x_plane(q) + pi * kXPair + gg * kXGroup, x_ok);
          // B registers [group][plane][k-step][b0/b1]: the x of weight nibble pair (j, j + 4) of
          // word t. Row-major gemm1 weights: x_(8t + j) paired with x_(8t + j + 4). Gemm2 (x in
          // act_pos order) and tiled gemm1 weights (nibbles in pair order, moejit.h): the x words
          // as they lie.
          uint32_t b[2][kPlanes][2][2];
  #pragma unroll
          for (int gg = 0; gg < 2; ++gg)
  #pragma unroll
            for (int q = 0; q < nq; ++q) {
              const uint4 v = xv[q][gg];
              if constexpr (kGemm1 && !Cfg::kTiledW) {
                b[gg][q][0][0] = __byte_perm(v.x, v.z, 0x5410);
                b[gg][q][0][1] = __byte_perm(v.x, v.z, 0x7632);
                b[gg][q][1][0] = __byte_perm(v.y, v.w, 0x5410);
                b[gg][q][1][1] = __byte_perm(v.y, v.w, 0x7632);
              } else {
                b[gg][q][0][0] = v.x;
                b[gg][q][0][1] = v.y;
                b[gg][q][1][0] = v.z;
                b[gg][q][1][1] = v.w;
              }
            }
          // -136 * sum_k x per row, per group (the chains of both groups interleave).
          // Per group: -136 * sum_k x per row (its correction), then one chain per A tile
          // starting from it, scaled into acc. kGS groups' chains interleave (64-row units take
          // one group at a time: their four A tiles are enough independent chains, and two
          // groups' partial sums would not fit in the registers).
          constexpr int kGS = kA == 4 ? 1 : 2;
  #pragma unroll
          for (int g0 = 0; g0 < 2; g0 += kGS) {
            float corr[kGS][4];
  #pragma unroll
            for (int j = 0; j < kGS; ++j)
  #pragma unroll
              for (int i = 0; i < 4; ++i) corr[j][i] = 0.0f;
  #pragma unroll
            for (int s = 0; s < 2; ++s)
  #pragma unroll
              for (int q = 0; q < nq; ++q)
  #pragma unroll
                for (int j = 0; j < kGS; ++j) {
                  if constexpr (kF16) {
                    const int gg = g0 + j;
                    const uint32_t cn[4] = {clo[gg], clo[gg], chi[gg], chi[gg]};
                    mma16816<true>(corr[j], cn, b[gg][q][s][0], b[gg][q][s][1]);
                  } else {
                    mma16816(corr[j], neg, b[g0 + j][q][s][0], b[g0 + j][q][s][1]);
                  }
                }
            float part[kGS][kA][4];
  #pragma unroll
            for (int j = 0; j < kGS; ++j)
  #pragma unroll
              for (int a = 0; a < kA; ++a)
  #pragma unroll
                for (int i = 0; i < 4; ++i) part[j][a][i] = corr[j][i];
  #pragma unroll
            for (int s = 0; s < 2; ++s) {
              const int sh = 8 * s;  // k-step s: nibble pairs (2s, 2s+4) and (2s+1, 2s+5)
  #pragma unroll
              for (int j = 0; j < kGS; ++j)
  #pragma unroll
                for (int a = 0; a < kA; ++a) {
                  const int gg = g0 + j;
                  const uint32_t w0 = wq[gg][2 * a], w1 = wq[gg][2 * a + 1];  // rows g, g + 8
                  if constexpr (kF16) {
                    const uint32_t v0 = w0 >> sh, v1 = w1 >> sh;
                    const uint32_t af[4] = {lop3_and_xor<0x000f000fu>(v0, mlo[gg]), lop3_and_xor<0x000f000fu>(v1, mlo[gg]),
                                            lop3_and_xor<0x00f000f0u>(v0, mhi[gg]), lop3_and_xor<0x00f000f0u>(v1, mhi[gg])};
  #pragma unroll
                    for (int q = 0; q < nq; ++q)
                      mma16816<true>(part[j][a], af, b[gg][q][s][0], b[gg][q][s][1]);
                  } else {
                    const uint32_t af[4] = {nib_pair(w0 >> sh), nib_pair(w1 >> sh),
                                            nib_pair(w0 >> (sh + 4)), nib_pair(w1 >> (sh + 4))};
  #pragma unroll
                    for (int q = 0; q < nq; ++q)
                      mma16816(part[j][a], af, b[gg][q][s][0], b[gg][q][s][1]);
                  }
                }
            }
  #pragma unroll
            for (int j = 0; j < kGS; ++j)
  #pragma unroll
              for (int a = 0; a < kA; ++a) {
                const int gg = g0 + j;
                const float s_g = __uint_as_float(gg ? (sw[a][0] & 0xffff0000u) : (sw[a][0] << 16));
                const float s_g8 = __uint_as_float(gg ? (sw[a][1] & 0xffff0000u) : (sw[a][1] << 16));
                acc[a][0] = fmaf(s_g, part[j][a][0], acc[a][0]);
                acc[a][1] = fmaf(s_g, part[j][a][1], acc[a][1]);
                acc[a][2] = fmaf(s_g8, part[j][a][2], acc[a][2]);
                acc[a][3] = fmaf(s_g8, part[j][a][3], acc[a][3]);
              }
          }
        }
        // Each thread releases its own reads of the stage (one warp-wide arrive instruction).
        // A lane-0 arrive after __syncwarp orders them as well, but with it compute-sanitizer's
        // racecheck reported the next copies into the slot as races with these reads (kimi-k2-tp8
        // at 1, 2 and 8 tokens; bench/RESULTS.md section 13).
        mbar_arrive(&empty_bar[slot]);
        if (++slot == NS) {
          slot = 0;
          parity ^= 1;
        }
      }
    };
    // Tiles of at most Cfg::kGroupCols valid rows (gemm1: 1 or 2; gemm2: 1) with groups as MMA
    // columns (where the launch's GemmParams::group_cols allows; gemm1's 64-row path of 512-deep stages, bf16 or
    // fp16 operands; gemm2's 64-row packed units, bf16 operands).
    // The tile's MMA columns would be x rows 0-7, of which only row 0 is valid. Instead warp w
    // takes a quarter of the stage's groups for all four A tiles: chunk c = w & 1, groups
    // 8 c + 2 j + e (j = 0..3, e = w >> 1), so that the 16-byte loads of a phase (rows 2p, 2p + 1;
    // groups of one parity) hit 8 different units of the swizzle. MMA column j is group
    // 8 c + 2 j + e: k-pairs j and j + 4 carry its weights in every row (thread (g, t): a0 / a1 its
    // rows g / g + 8, a2 / a3 the same rows' next nibble pair, of word m / 2 in MMA m = 0..7), and B
    // holds x row 0 of group j in column j only (thread (n, t) with n == t holds its words 2m,
    // 2m + 1 as b0, b1; every other thread zeros, read from a zero block). So 8 MMAs give a 16-row
    // x 4-group block whose sums lie in threads t = 0, 1 (columns 4-7 are not used), scaled by 4
    // FFMA per 8 MMAs instead of 16; the chains start from the groups' corrections (2 MMAs of the
    // constant A against x in the dense order, column j = group j), so there are no correction
    // MMAs per A tile. The sums' order differs from the default path's (the outputs agree to
    // rounding, not bitwise). H200, bench/RESULTS.md section 41: 17% fewer SASS instructions per
    // stage in kimi-k2's chain (no faster there); 0.9-1.4 us less at 8 qwen3-30b-a3b tokens in
    // A/B runs of one process.
    // Gemm1's tiles of two valid rows take the same path with x row 1 in columns 4-7 (column
    // j + 4 is row 1 of group j; threads t = 2, 3 hold its sums), which costs the one-row units
    // nothing: their columns 4-7 are zeros or discarded.
    // Gemm2 (packed units: x's hi plane in column j, its lo plane in column j + 4, both group j,
    // so every thread's two columns carry sums) multiplies the same weights by both planes; its
    // 256-deep stages hold 8 groups, so warp w takes groups 2 j + (w & 1) of the A tiles
    // 2 (w >> 1) and 2 (w >> 1) + 1 (chunk 0); 512-deep ones are split as gemm1's.
    bool gc = false;
    if constexpr (kGroupCols) gc = p.group_cols != 0 && u.rows_valid <= Cfg::kGroupCols;
    if constexpr (kGroupCols) {
      if (gc) {
        constexpr bool kHalfA = !kGemm1 && KC == 256;  // a warp takes half the A tiles
        constexpr int kGA = kHalfA ? kA / 2 : kA;       // A tiles per warp
        const int c = kHalfA ? 0 : warp & 1, e = kHalfA ? warp & 1 : warp >> 1;
        const int a0 = kHalfA ? kGA * (warp >> 1) : 0;  // the warp's first A tile
        const int gq = t;                                   // the thread's weight group (column t)
        const int gx = g & 3;                               // the group of its correction column
        // Column g's x row (gemm1: row g / 4; gemm2: x row 0 of plane g / 4, packed: hi row 0,
        // lo row 4) and a group's stride.
        constexpr uint32_t kXGStride = kXBox ? 256 : 64;
        const uint32_t x_row = (g >> 2) * (kGemm1 ? kXRow : kXBox ? kXSlot : 4 * kXRow);
        const uint32_t x_b = t == gx && (!kGemm1 || (g >> 2) < u.rows_valid)
                                 ? kXOff + x_row + (8 * c + 2 * gq + e) * kXGStride
                                 : 0xffffffffu;
        const uint32_t x_c = kXOff + x_row + (8 * c + 2 * gx + e) * kXGStride + t * 16;
        const uint32_t zero = smem_u32(sm.zero);
        // Weights: gemm1 [half][chunk][32 rows][128 bytes], gemm2 [chunk][64 rows][128 bytes].
        const uint32_t w_off = c * (kBoxRows * 128) + (16 * a0 + g) * 128 + (((2 * gq + e) ^ g) << 4);
        auto w_tile = [](int i, int rr) -> uint32_t {
          return kGemm1 ? (i / 2) * kHalfBytes + ((i % 2) * 16 + rr * 8) * 128 : (i * 16 + rr * 8) * 128;
        };
        // Scales of rows g and g + 8: groups 8 c + 4 t .. + 3 (8 bytes), of which the thread's
        // columns 2t, 2t + 1 take groups 4t + e and 4t + 2 + e (t = 0, 1; gemm2's t = 2, 3 as 0, 1).
        const uint32_t s_off8 = kWBytes + (16 * a0 + g) * 16 + c * (kBoxRows * 16) + (t & 1) * 8;
        auto s_tile = [](int i) -> uint32_t { return kGemm1 ? (i / 2) * kSBoxBytes + (i % 2) * 256 : i * 256; };
        const uint32_t s_sel = e ? 0x3276u : 0x1054u;  // prmt: that bf16 as the high half, zeros below
        // The corrections' constant A: fp16 -1032 (lo nibbles) and -1152 (hi), or bf16 -136.
        const uint32_t cn[4] = {kF16 ? 0xE408E408u : kNeg136, kF16 ? 0xE408E408u : kNeg136,
                                kF16 ? 0xE480E480u : kNeg136, kF16 ? 0xE480E480u : kNeg136};
  #pragma unroll 1
        for (int ks = 0; ks < kStagesPerUnit; ++ks) {
          const uint32_t st = smem_base + slot * kSlot;
          mbar_wait<Cfg::kSuspendNs>(&full_bar[slot], parity);
          if constexpr (kF16)
            if (ks == 0) xf_bits = ld_relaxed_gpu(p.routed + 1);
          if (tid == 0 && ui == 0 && ks == 0) tl_stamp(tls, kEvFirst);
          if (tid == 0 && ui == 0 && ks == 0) tl_block(kTlK, kTbFirst, tl_now());
          const uint32_t xb = x_b != 0xffffffffu ? st + x_b : zero;
          uint4 bx[4];  // B: words 2m, 2m + 1 of x (group gq) in MMA m, or zeros
  #pragma unroll
          for (int v = 0; v < 4; ++v) bx[v] = lds128(xb + 16 * v);
          float corr[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          {
            const uint4 xc = lds128(st + x_c);
            mma16816<kF16>(corr, cn, xc.x, xc.y);
            mma16816<kF16>(corr, cn, xc.z, xc.w);
          }
          uint4 wv[kGA][2];  // [A tile][row g, g + 8]: the 4 words of group gq
  #pragma unroll
          for (int i = 0; i < kGA; ++i)
  #pragma unroll
            for (int rr = 0; rr < 2; ++rr) wv[i][rr] = lds128(st + w_off + w_tile(i, rr));
          float part[kGA][4];
  #pragma unroll
          for (int m = 0; m < 8; ++m) {
            const int sh = 8 * (m & 1);
            const uint32_t b0 = (m & 1) ? bx[m >> 1].z : bx[m >> 1].x;
            const uint32_t b1 = (m & 1) ? bx[m >> 1].w : bx[m >> 1].y;
  #pragma unroll
            for (int a = 0; a < kGA; ++a) {
              const uint4& w0 = wv[a][0];
              const uint4& w8 = wv[a][1];
              const int u2 = m >> 1;
              const uint32_t v0 = (u2 == 0 ? w0.x : u2 == 1 ? w0.y : u2 == 2 ? w0.z : w0.w) >> sh;
              const uint32_t v8 = (u2 == 0 ? w8.x : u2 == 1 ? w8.y : u2 == 2 ? w8.z : w8.w) >> sh;
              // fp16: nibbles at bits 0-3 and 4-7 in place (the top of this file); bf16: the
              // nibble pairs of the word shifted by 8 (m % 2) and by 4 more (nib_pair).
              uint32_t af[4];
              if constexpr (kF16) {
                af[0] = lop3_and_xor<0x000f000fu>(v0, 0x64086408u);
                af[1] = lop3_and_xor<0x000f000fu>(v8, 0x64086408u);
                af[2] = lop3_and_xor<0x00f000f0u>(v0, 0x64806480u);
                af[3] = lop3_and_xor<0x00f000f0u>(v8, 0x64806480u);
              } else {
                af[0] = nib_pair(v0);
                af[1] = nib_pair(v8);
                af[2] = nib_pair(v0 >> 4);
                af[3] = nib_pair(v8 >> 4);
              }
              if (m == 0)
                mma16816_c<kF16>(part[a], af, b0, b1, corr);
              else
                mma16816<kF16>(part[a], af, b0, b1);
            }
          }
  #pragma unroll
          for (int a = 0; a < kGA; ++a) {
            const uint32_t so = st + s_off8 + s_tile(a);
            const uint2 s0 = lds64(so), s8 = lds64(so + 128);
            acc[a][0] = fmaf(__uint_as_float(__byte_perm(s0.x, 0u, s_sel)), part[a][0], acc[a][0]);
            acc[a][1] = fmaf(__uint_as_float(__byte_perm(s0.y, 0u, s_sel)), part[a][1], acc[a][1]);
            acc[a][2] = fmaf(__uint_as_float(__byte_perm(s8.x, 0u, s_sel)), part[a][2], acc[a][2]);
            acc[a][3] = fmaf(__uint_as_float(__byte_perm(s8.y, 0u, s_sel)), part[a][3], acc[a][3]);
          }
          mbar_arrive(&empty_bar[slot]);
          if (++slot == NS) {
            slot = 0;
            parity ^= 1;
          }
        }
        // Rows 16 a + g (+ 8): the thread's two columns, then threads t = 0, 1 (groups 0-3 of
        // the warp's quarter; gemm1: t = 2, 3 hold x row 1's; gemm2: then t = 2, 3, the lo plane's),
        // then the warps that took the row's groups in order through shared memory; every warp
        // then holds what the split epilogue reads (acc[a][0]: A row 16 a + g + 8 (w >> 1), gemm1's
        // tile row w & 1, gemm2's row 0).
  #pragma unroll
        for (int a = 0; a < kGA; ++a)
  #pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            float r = acc[a][2 * rr] + acc[a][2 * rr + 1];
            r += __shfl_xor_sync(kFullMask, r, 1);
            if constexpr (!kGemm1) r += __shfl_xor_sync(kFullMask, r, 2);
            if (kGemm1 ? (t & 1) == 0 : t == 0)
              red[(t >> 1) * 256 + warp * 64 + 16 * (a0 + a) + 8 * rr + g] = r;
          }
        consumer_barrier(CW * 32);
  #pragma unroll
        for (int a = 0; a < kA; ++a) {
          const int row = (kGemm1 ? (warp & 1) * 256 : 0) + 16 * a + g + 8 * (warp >> 1);
          if constexpr (kHalfA)  // warps 2 (a / 2) and 2 (a / 2) + 1
            acc[a][0] = red[(a / kGA) * 128 + row] + red[(a / kGA) * 128 + 64 + row];
          else
            acc[a][0] = ((red[row] + red[64 + row]) + red[128 + row]) + red[192 + row];
        }
        consumer_barrier(CW * 32);
      }
    }
    const bool packed = kPackable && u.rows_valid <= 4;
    if (!gc) {
      if (packed)
        run_stages(1);
      else
        run_stages(kPlanes);
    }

    // Sum the consumer warps in a fixed order (warp 0, 1, ...). The second barrier keeps the
    // next unit's writes out of the buffer until every sum has read it. kSplit (four consumer
    // warps, 32- or 64-row units): warp w sums and stores accumulator index i = w of every A
    // tile (rows 2t + (w & 1), features g + 8 (w >> 1)), so the four epilogues run in parallel;
    // otherwise warp 0 sums everything and runs the whole epilogue.
    if (gc) {
      // (summed above)
    } else if constexpr (kSplit) {
#pragma unroll
      for (int a = 0; a < kA; ++a)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (i != warp) red[((warp * kA + a) * 4 + i) * 32 + lane] = acc[a][i];
      consumer_barrier(CW * 32);
      // The sums land in acc[a][0] (a register: selects, no indexing by warp).
#pragma unroll
      for (int a = 0; a < kA; ++a) {
        float own = acc[a][0];
#pragma unroll
        for (int i = 1; i < 4; ++i) own = i == warp ? acc[a][i] : own;
        float sum = warp == 0 ? own : red[(a * 4 + warp) * 32 + lane];
#pragma unroll
        for (int w = 1; w < CW; ++w) sum += w == warp ? own : red[((w * kA + a) * 4 + warp) * 32 + lane];
        acc[a][0] = sum;
      }
      consumer_barrier(CW * 32);
    } else if constexpr (CW > 1) {
      if (warp > 0)
#pragma unroll
        for (int a = 0; a < kA; ++a)
#pragma unroll
          for (int i = 0; i < 4; ++i) red[((warp - 1) * kA * 4 + a * 4 + i) * 32 + lane] = acc[a][i];
      consumer_barrier(CW * 32);
      if (warp == 0)
        for (int w = 1; w < CW; ++w)
#pragma unroll
          for (int a = 0; a < kA; ++a)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[a][i] += red[((w - 1) * kA * 4 + a * 4 + i) * 32 + lane];
      consumer_barrier(CW * 32);
    }

    // Epilogue (consumer warp 0, or with kSplit every warp for its accumulator index i = warp,
    // summed into acc[a][0]). Accumulator i: feature +g + 8 * (i / 2), row 2t + (i % 2). A
    // packed unit's lo-plane sums sit in columns 4-7, two threads over (t ^ 2): add them in.
    constexpr int kSlots = kSplit ? 1 : 4;  // accumulators per A tile this warp stores
    if (kSplit || warp == 0) {
      if (packed && !gc)  // (group columns: summed above)
#pragma unroll
        for (int a = 0; a < kA; ++a)
#pragma unroll
          for (int ii = 0; ii < kSlots; ++ii) acc[a][ii] += __shfl_xor_sync(kFullMask, acc[a][ii], 2);
      if constexpr (kGemm1 && kF16 && Cfg::kF16Act) {
        // fp16 operands: the launch's x factor back in, SwiGLU, then per 8-feature block of the
        // unit (warp w, a = 0, 1: features 16a + 8 (w >> 1) + g of rows 2t + (w & 1), block
        // 2a + (w >> 1); warps w and w ^ 1 share a block) the largest finite |h| over the tile's
        // valid rows sets d: h 2^-d (odd features, the hi nibbles, a further 1/16) lands in
        // [2^14, 2^15), written as fp16 hi and lo planes (about 22 significant bits), and the
        // block's word (1032 2^d as fp16x2: exponent 25 + d) goes to GemmParams::act_magic.
        // d is clamped to [-24, 5] (the constant's exponent range): activations beyond about
        // 2^21 overflow to +-Inf, tiny blocks keep their bits. Non-finite h stays non-finite.
        const float xf = x_factor();
        const int r = 2 * t + (warp & 1);
        const bool valid = r < u.rows_valid;
        float h[2], mx[2];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          h[a] = swiglu<Cfg::kHasLimit>(acc[a][0] * xf, acc[a + 2][0] * xf, alpha, beta, limit);
          const float ah = fabsf(h[a]);
          mx[a] = valid && ah <= 3.4e38f ? ah : 0.0f;
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) mx[a] = fmaxf(mx[a], __shfl_xor_sync(kFullMask, mx[a], o));
        }
        __shared__ float s_mx[2][4][2];  // [unit parity][warp][a]
        if (lane == 0) {
          s_mx[ui & 1][warp][0] = mx[0];
          s_mx[ui & 1][warp][1] = mx[1];
        }
        consumer_barrier(CW * 32);
        __half* out = static_cast<__half*>(p.out);
        __half* out_lo = static_cast<__half*>(p.x_lo);
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const float m = fmaxf(mx[a], s_mx[ui & 1][warp ^ 1][a]);
          int d = m > 0.0f ? static_cast<int>((__float_as_uint(m) >> 23) & 0xff) - 127 - 14 : -24;
          d = d < -24 ? -24 : (d > 5 ? 5 : d);
          const int f = u.slice * kUnitFeatures + a * 16 + 8 * (warp >> 1) + g;
          if (valid) {
            const float sc = __uint_as_float(static_cast<uint32_t>(127 - d - ((f & 1) ? 4 : 0)) << 23);
            const float v = h[a] * sc;
            const __half hi = __float2half_rn(v);
            const float hv = __half2float(hi);
            const long long o = static_cast<long long>(u.row0 + r) * N + act_pos(f);
            out[o] = hi;
            out_lo[o] = __float2half_rn(isfinite(hv) ? v - hv : 0.0f);
          }
          if ((warp & 1) == 0 && lane == 0)
            p.act_magic[static_cast<long long>(u.tile) * (N / 8) + u.slice * (kUnitFeatures / 8) + 2 * a + (warp >> 1)] =
                (static_cast<uint32_t>(25 + d) << 10 | 8u) * 0x10001u;
        }
      } else if constexpr (kGemm1) {
        float xf = 1.0f;  // fp16 gemm1 (kF16) with a bf16 activation: x's factor back in
        if constexpr (kF16) xf = x_factor();
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
        __nv_bfloat16* out_lo = static_cast<__nv_bfloat16*>(p.x_lo);
        // 32/64-row units: gate in A tiles [0, kA/2), up in [kA/2, kA); tile a holds features
        // 16a + g and 16a + g + 8. 16-row units: gate in rows 0-7 (accumulators 0, 1), up in
        // rows 8-15 (2, 3) of feature g.
        constexpr int kGateTiles = kA >= 2 ? kA / 2 : 1;
        constexpr int kSlotsG = kA >= 2 ? kSlots : 2;
#pragma unroll
        for (int ai = 0; ai < kGateTiles * kSlotsG; ++ai) {
          const int a = ai / kSlotsG, ii = ai % kSlotsG;
          const int i = kSplit ? warp : ii;
          const int r = 2 * t + (i & 1);
          if (r >= u.rows_valid) continue;
          const int f = u.slice * kUnitFeatures + a * 16 + g + 8 * (i >> 1);
          float gate = acc[a][ii] * xf, up;
          if constexpr (kA >= 2)
            up = acc[a + kGateTiles][ii] * xf;
          else
            up = acc[0][ii + 2] * xf;
          __nv_bfloat16 hi, lo;
          split_bf16(swiglu<Cfg::kHasLimit>(gate, up, alpha, beta, limit), hi, lo);
          const long long o = static_cast<long long>(u.row0 + r) * N + act_pos(f);
          out[o] = hi;
          out_lo[o] = lo;
        }
      } else {
        float* y = static_cast<float*>(p.out);  // fp32 rows, zeros in padding rows
#pragma unroll
        for (int a = 0; a < kA; ++a)
#pragma unroll
          for (int ii = 0; ii < kSlots; ++ii) {
            const int i = kSplit ? warp : ii;
            const int r = 2 * t + (i & 1);
            const int f = u.slice * kRows + a * 16 + g + 8 * (i >> 1);
            y[static_cast<long long>(u.row0 + r) * N + f] = r < u.rows_valid ? acc[a][ii] : 0.0f;
          }
      }
    }

    if constexpr (kSignal)
      if (kSplit || warp == 0) signal_unit(ui, u.tile);  // the unit's features are written
    if constexpr (kFinal)
      if (tid == 0) ++sm.fin_count[u.slice];

    (void)alpha;
    (void)beta;
    (void)limit;
  }
  if (early && ui == 0) {  // a block without units still waits before its trigger
    pdl_wait();
    pdl_trigger();
  }
  if constexpr (kSignal)
    if (kSplit || warp == 0) signal_unit(ui, -1);  // the end
  if constexpr (kChain == 1) {  // the consumers' place for the chain's gemm2: gemm2's first entry
    chain->c_slot = slot;
    chain->c_parity = parity;
    chain->q_base = ui;
  }
  if (tid == 0 && ui > 0) tl_stamp(tls, kEvEnd);
  if (tid == 0) tl_block(kTlK, kTbEnd, tl_now());
  if (dyn && tid == 0) tl_block(kTlK, kTbUnits, ui);
  if constexpr (kFinal)
    if (warp < CW && p.final_out != nullptr) stream::chain_finalize<Cfg, kRows>(p, sm.fin_count, red, n_tiles, tid, fin_row, fin_w);
}

// Takes the unit-size path of p.unit_rows where it is compiled (Cfg::kAltRows), else the default.
// The paths share the static shared memory (stream::Shared).
template <class Cfg>
__device__ void stream_gemm(const GemmParams& p) {
  __shared__ stream::Shared<Cfg> sh;
  // Tiles with Cfg::kGroupCols read B's zero registers from here (the path's
  // first block barrier orders these stores before them).
  __shared__ uint4 zero16[Cfg::kGroupCols ? 4 : 1];
  if (Cfg::kGroupCols && threadIdx.x < 4) zero16[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
  stream::Smem v = sh.view();
  v.zero = zero16;
  static_assert((Cfg::kAltRows & ~(16 | 32)) == 0 && (Cfg::kGemm1 || (Cfg::kAltRows & 16) == 0) &&
                    (Cfg::kAltRows == 0 || Cfg::kAltRows < Cfg::kUnitRows),
                "stream GEMM: smaller paths of 16 (gemm1) or 32 rows below the default");
  if constexpr ((Cfg::kAltRows & 16) != 0)
    if (p.unit_rows == 16) {
      stream_gemm_rows<Cfg, 16, Cfg::kKC16>(p, v);
      return;
    }
  if constexpr ((Cfg::kAltRows & 32) != 0)
    if (p.unit_rows == 32) {
      stream_gemm_rows<Cfg, 32, Cfg::kKC32>(p, v);
      return;
    }
  stream_gemm_rows<Cfg, Cfg::kUnitRows, Cfg::kKC>(p, v);
}

// Both GEMMs in one persistent kernel (StreamConfig::chain; where gemm2's stages hold one x
// plane, Cfg2::kPackedOnly, the host launches it only where no tile has more than 4 valid rows):
// each block streams gemm1's units, then gemm2's, through one ring of Cfg1::kStages slots of
// Cfg1::kSlotBytes, so that its producer issues gemm2's first stages while its consumers finish
// gemm1's last, and gemm2 needs no blocks of its own to start on the SMs gemm1's blocks leave.
// Gemm2's units wait for their tiles as with Cfg::kTileReady. The phases share the static shared
// memory (the mbarriers, the unit queue with gemm2's entries marked, stream::kChainG2Rows, and
// the reduction buffer); the signal warp publishes gemm1's tiles and leaves. With
// Cfg2::kChainFinalize the blocks also finalize the output at their end (stream::chain_finalize).
template <class Cfg1, class Cfg2>
__device__ void stream_chain(const ChainParams& p) {
  static_assert(Cfg1::kChain == 1 && Cfg2::kChain == 2 && Cfg1::kGemm1 && !Cfg2::kGemm1,
                "stream chain: gemm1 then gemm2");
  static_assert(Cfg1::kStages == Cfg2::kStages && Cfg1::kSlotBytes == Cfg2::kSlotBytes &&
                    Cfg1::kRingBytes == Cfg2::kRingBytes && Cfg1::kConsumerWarps == Cfg2::kConsumerWarps &&
                    Cfg1::kUnitRows == Cfg2::kUnitRows && Cfg1::kAltRows == 0 && Cfg2::kAltRows == 0,
                "stream chain: one ring, the same consumer warps and unit rows, one path each");
  __shared__ stream::Shared<Cfg1> sh;  // (gemm1's: its early plan; the reduction buffer fits both)
  // Tiles with Cfg1::kGroupCols or Cfg2::kGroupCols read B's zero registers from here.
  constexpr bool kZero = Cfg1::kGroupCols || Cfg2::kGroupCols;
  __shared__ uint4 zero16[kZero ? 4 : 1];  // (ordered as in stream_gemm)
  if (kZero && threadIdx.x < 4) zero16[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
  // Gemm2's finalize (Cfg2::kChainFinalize): its per-slice unit counts start at zero (gemm1's
  // first block barrier orders this before them).
  constexpr int kFinSlices = Cfg2::kChainFinalize ? Cfg2::kN / Cfg2::kUnitRows : 1;
  __shared__ unsigned short fin_count[kFinSlices];
  if constexpr (Cfg2::kChainFinalize)
    for (int i = threadIdx.x; i < kFinSlices; i += blockDim.x) fin_count[i] = 0;
  stream::ChainState chain;
  stream::Smem v1 = sh.view();
  v1.zero = zero16;
  stream_gemm_rows<Cfg1, Cfg1::kUnitRows, Cfg1::kKC>(p.g1, v1, &chain);
  stream::Smem v2 = sh.view();
  v2.zero = zero16;
  v2.fin_count = fin_count;
  stream_gemm_rows<Cfg2, Cfg2::kUnitRows, Cfg2::kKC>(p.g2, v2, &chain);
}

}  // namespace moejit_dev

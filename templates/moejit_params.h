// Kernel parameter blocks, shared by the host launcher (runtime/) and the device templates.
// Plain C structs of fixed-width fields so host and device agree on the layout; each kernel
// takes one of them by value. Compile-time shape constants are template arguments, not fields.
#pragma once

#ifdef __CUDACC_RTC__
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

namespace moejit_dev {

// Timeline (a diagnostic: `moejit bench --timeline`, plan override "tl=0xADDRESS"), shared with
// the bench tool that reads the buffer. With MOEJIT_TIMELINE defined (codegen: the address of a
// device buffer of u64), the kernels record per layer replay the earliest and the latest
// %globaltimer (ns) of the events below: word 0 counts replays (the layer's first kernel adds
// one), then replay slot (count - 1) % kTlSlots holds kTlEvents pairs {min, max}.
constexpr int kTlSlots = 64;
enum TlEvent : int {
  kTlRouteStart, kTlRouted, kTlRouteEnd,                      // route(+dispatch)
  kTlG1Start, kTlG1Waited, kTlG1Issued, kTlG1First, kTlG1End,  // gemm1
  kTlG2Start, kTlG2Issued, kTlG2Waited, kTlG2First, kTlG2End,  // gemm2
  kTlFinStart, kTlFinWaited, kTlFinEnd,                       // finalize
  kTlG1PWaited, kTlG1PUnit, kTlG2PUnit, kTlG2PSlot,           // producer lane 0 (TMA path)
  kTlRKeys, kTlRTopK,                                         // routing of token 0
  kTlDispatchWarp, kTlDispatchBarrier,                        // dispatch_small (thread 0)
  kTlResG1Last, kTlResG1Rows, kTlResBarrier, kTlResG2In,      // resident layer (thread 0)
  kTlG1PRouted,                                               // gemm1 producer: routed word read 1
  kTlG1PTaken, kTlG1PPlanned, kTlG1PLoop,                     // ... first unit's count, plan, unit loop
  kTlEvents                                                   // (the count)
};
// Per-block records of the stream GEMMs (the latest replay's, overwritten by each): after the
// slots, for gemm1 then gemm2, kTlMaxBlocks blocks x kTlBlockFields words.
constexpr int kTlMaxBlocks = 1024;
constexpr int kTlBlockFields = 10;
// Gemm1's records: kTbSigGot / kTbSigEnd, its signal warp took the block's latest unit / added
// it to the tile's word. Gemm2's: kTbP2In, its producer began (a chain's: its gemm2 phase);
// kTbP2Unit, it knew its first unit; kTbP2Slot, that unit's first slot was free.
enum TlBlockField : int {
  kTbSlot, kTbSm, kTbStart, kTbWaited, kTbFirst, kTbEnd, kTbUnits,
  kTbSigGot = 7, kTbSigEnd = 8, kTbP2Unit = 7, kTbP2Slot = 8, kTbP2In = 9
};

// Route: logits [T, E] (+ bias [E]) -> topk_ids [T, k] global ids, topk_weights [T, k] fp32.
// Precomputed routing copies (and range-checks) pre_ids / pre_weights instead.
struct RouteParams {
  const void* logits;         // [T, E] fp32 or bf16
  const void* bias;           // [E] fp32 or bf16, or null
  const int32_t* pre_ids;     // [T, k], Precomputed only
  const float* pre_weights;   // [T, k], Precomputed only
  int32_t* topk_ids;          // [T, k] out
  float* topk_weights;        // [T, k] out
  int32_t num_tokens;
};

// Dispatch: groups the T*k slots by local expert (stable: ascending slot index inside an
// expert), each expert's rows padded to `tile` rows.
struct DispatchParams {
  const int32_t* topk_ids;         // [T*k]
  int32_t* expert_counts;          // [L] routed slots per local expert
  int32_t* expert_offsets;         // [L+1] first permuted row of each expert (padded)
  int32_t* tile_expert;            // [max_tiles] local expert of each row tile, -1 if unused
  int32_t* expanded_to_permuted;   // [T*k] permuted row of slot t*k+j, -1 if not local
  int32_t* permuted_to_slot;       // [max_tiles*tile] slot of each permuted row (padding: -1)
  int32_t num_tokens;
  int32_t tile;
  int32_t max_tiles;
  // Counters to zero (the fused finalize's per-token ones, or the stream GEMMs' unit counters;
  // else null / 0), and (fused finalize, else null) the output rows of tokens with no local slot
  // to zero (no GEMM block finalizes them).
  int32_t* token_counters;
  int32_t num_counters;
  void* out;                       // [T, H] bf16
  int32_t hidden;
  int32_t* tile_rows;              // [max_tiles] slots (valid rows) of each row tile, 0 if unused
};

// Route and dispatch fused into one block (small token counts).
struct RouteDispatchParams {
  RouteParams route;
  DispatchParams dispatch;
  // Where gemm1 plans its first unit from the routed ids (GemmParams::routed), else null: the
  // block sets the word to 0 before it lets gemm1 launch and to 1 once the ids are written, and
  // zeroes gemm1's unit counter (GemmParams::unit_counter; then not among dispatch's counters)
  // before it lets gemm1 launch.
  int32_t* routed;
  int32_t* gemm1_counter;
  // A chain with fp16 operands (Cfg::kConvertX, StreamConfig::f16): x16 non-null launches a
  // second block, which writes the tokens' x [T, H] as fp16 times 2^-e (k = 2, 3 mod 4 by a
  // further 1/16) to x16 and publishes the factor 2^e as float bits in word 1 of the routed line
  // (zeroed before the block lets gemm1 launch; gemm1's producer waits for it before its first x
  // copy).
  const void* x;
  void* x16;
};
// With at most Cfg::kPackedIdSlots (8, or kRoutedIdSlots where the planner chose it:
// Plan::routed_id_slots) slots and expert ids below 0x7fff, the fused block also packs the
// routed ids beside its word (RouteDispatchParams::routed) in vectors of four words: a word holds
// two slots (bits 0-14 and 16-30; 0x7fff for none or an id out of range) and bit 31 set, vector i
// slots 8i..8i + 7 at word routed_id_word(i) (moejit_common.cuh): vector 0 in words 4-7 of the
// word's own line (one token of top-8 reads only that line), vectors 1-7 in words
// kRoutedIdWord + 4i of the next one. Gemm1 (Cfg::kRoutedIds, the same count) then reads the ids
// with its poll (lane i < 8 of its producer polls vector i) instead of after the word. The host
// gives the word 128 bytes, 256 with more than 8 slots.
enum : int { kRoutedIdSlots = 64, kRoutedIdWord = 32, kRoutedIdNone = 0x7fff };

// Gemm2's x boxes (GemmParams::tma_x): rows of a tile per box, and bf16 elements per innermost
// box row (one MXINT4 group: 64 bytes, so that a quarter-warp's 16-byte loads of two rows of one
// group are 128 contiguous bytes).
enum : int { kXBoxRows = 4, kXBoxGroup = 32 };  // an enum: nothing emitted where unused

// Weight rows per block of WeightFormat::MxInt4G32Tiled (moejit.h): w13 (gate and up rows in
// blocks of their own) and w2. The TMA maps of the weights (both formats) are 4-D, {128 bytes,
// row in block, K / 256 chunks, block}, so that kernels address either format the same way.
enum : int { kTiledRowsW13 = 32, kTiledRowsW2 = 64 };

// An opaque TMA tensor-map descriptor (CUtensorMap: 128 bytes, 64-byte aligned), encoded by the
// host (cuTensorMapEncodeTiled) and read by cp.async.bulk.tensor from the kernel's parameters.
struct alignas(64) TmaDesc {
  uint64_t opaque[16];
};

// One grouped GEMM over row tiles: out[r, :] = f(x[r, :] @ W[expert(r)]^T).
// Gemm1 gathers x rows from hidden_states through permuted_to_slot (token = slot / k) and
// applies SwiGLU; Gemm2 reads x rows (the activation) in permuted order.
struct GemmParams {
  const void* x;                   // gemm1: hidden [T, H]; gemm2: act [P, I] (high part); bf16
  // Gemm1 writes the activation as two bf16 planes, hi = bf16(a) and lo = bf16(a - hi), and
  // gemm2 multiplies both: the activation enters gemm2 without a bf16 rounding.
  void* x_lo;                      // [P, I] bf16: gemm1 writes it, gemm2 reads it
  const int32_t* permuted_to_slot;
  const uint8_t* w;                // [E, N_rows, K/2]
  const void* w_scale;             // [E, N_rows, K/32] bf16
  const int32_t* expert_counts;
  const int32_t* expert_offsets;
  const int32_t* tile_expert;
  const float* alpha;              // [L] or null
  const float* beta;               // [L] or null
  const float* limit;              // [L] or null
  void* out;                       // gemm1: act [P, I] bf16; gemm2: y [P, H] fp32
  int32_t num_tokens;
  int32_t max_tiles;
  // Gemm2 with the finalize fused (Cfg::kFuseFinalize): the last block to write a token's rows
  // of a feature block sums them: final_out[t, f] = sum_j weights[t*k+j] * y[perm[t*k+j], f].
  // A chain's gemm2 with Cfg::kChainFinalize: the block completing a 64-feature slice does
  // (stream::chain_finalize); token_counters then holds one word per slice.
  int32_t* token_counters;         // [T, gridDim.y] or [H / 64] (chain), zeroed by dispatch
  const int32_t* expanded_to_permuted;
  const float* weights;
  void* final_out;                 // [T, H] bf16
  // Stream GEMMs compiled with smaller unit sizes too (Cfg::kAltRows): the weight rows per unit
  // of this launch (16, 32 or 64; the host's choose_unit_rows). Other values take the default.
  int32_t unit_rows;
  // Stream GEMMs with Cfg::kTma: the weights as {128 bytes, row, K / 256 chunks} (box
  // {128, R, k_stage / 256}, 128-byte swizzle) and the scales as {K / 16 bytes, row} (box
  // {k_stage / 16, R}), for this launch's unit size: R = unit_rows / 2 for gemm1 (its gate and up
  // rows lie apart), unit_rows for gemm2. Zero otherwise.
  TmaDesc tma_w;
  TmaDesc tma_s;
  // Gemm2 with Cfg::kXBoxes: the activation's two planes (x, then x_lo at x + rows * I) as
  // {kXBoxGroup elements, row, I / kXBoxGroup groups, plane} (bf16), box {kXBoxGroup, kXBoxRows,
  // k_stage / kXBoxGroup, 2}: four rows of a tile, both planes, one stage, in one copy. Zero
  // otherwise.
  TmaDesc tma_x;
  // Valid rows of each row tile (dispatch's tile_rows; the stream GEMMs read it beside
  // tile_expert, one memory round trip per unit instead of two).
  const int32_t* tile_rows;
  // Stream GEMMs with Cfg::kDynamicUnits: the count of units taken after each block's first
  // (one per GEMM; dispatch zeroes it, except gemm1's behind the fused route+dispatch block with
  // Cfg::kEarlyRouted, which that block zeroes before gemm1 launches). With Cfg::kEarlyFetch the word holds the count as a
  // float (atom_take_gpu; zero bits are 0.0f).
  int32_t* unit_counter;
  // Gemm1 with Cfg::kEarlyUnit: the routed ids [T*k], read before the wait for dispatch to plan
  // the block's first unit; null: the first unit from dispatch's tables after the wait. Written
  // by a route kernel two launches back (complete and visible when the block starts), or with
  // `routed` set by the fused route+dispatch block just before (see RouteDispatchParams::routed).
  const int32_t* topk_ids;
  // Stream GEMMs with Cfg::kTileReady: per row tile [max_tiles], the SwiGLU features gemm1 has
  // written (dispatch zeroes them); gemm2 reads a tile's rows once its word reaches I.
  int32_t* tile_ready;
  // Stream GEMMs with Cfg::kEvictFirst: nonzero copies this launch's weights and scales with an
  // L2 evict-first policy (the host's evict_first_for).
  int32_t evict_first;
  // Gemm1 with Cfg::kEarlyRouted (early first units behind the fused route+dispatch block): the
  // producer reads topk_ids once this word reads 1 (acquire); null otherwise.
  const int32_t* routed;
  // A chain with fp16 operands (Cfg::kF16): gemm1 writes, gemm2 copies beside its activation, one
  // word per (row tile, 8 activation features) [max_tiles, I / 8]: fp16x2 (1032 * 2^d), the
  // dequantisation constant of w2 nibbles at bits 0-3 for activations stored times 2^-d.
  uint32_t* act_magic;
  // With Cfg::kGroupCols > 0: nonzero lets tiles of at most that many valid rows take the
  // group-column path. The host clears it for one-token launches outside a chain:
  // a finalized one-token layer may be the resident one, whose arithmetic order the unfinalized
  // layer must keep (its output plus moejit::finalize equals the resident's bitwise).
  int32_t group_cols;
};

// Both stream GEMMs of a bucket in one persistent kernel (moejit_stream.cuh, stream_chain): the
// parameters of each, as the two kernels would take them.
struct ChainParams {
  GemmParams g1;
  GemmParams g2;
};

// The resident one-token layer (moejit_resident.cuh): route, both GEMMs and the finalize in one
// cooperative launch of Cfg::kGrid blocks.
struct ResidentParams {
  RouteParams route;     // num_tokens = 1; topk_ids / topk_weights: block 0 publishes the routing
  const void* x;         // hidden [1, H] bf16
  const void* w1_scale;  // [E, 2I, H/32] bf16
  const void* w2_scale;  // [E, H, I/32] bf16
  const float* alpha;    // [L] or null
  const float* beta;     // [L] or null
  const float* limit;    // [L] or null
  void* act;             // [2][k][I] bf16: the SwiGLU rows' hi and lo planes (act_pos order)
  void* out;             // [1, H] bf16
  // w13 as {128 bytes, row in block, H / 256 chunks, block}, box {128, 8, kKP1 / 256, 1}; w2 as
  // {128 bytes, row, I / 256}, box {128, 8 * kU2, I / 256} (tiled: the 4-D map, box {128, 8 kU2,
  // I / 256, 1}); landing with the 128-byte swizzle. Tiled weights only: their scales as 8-byte
  // words {2 rows in block, K / 256 chunks, block}, boxes of 8 (w13) or 8 kU2 (w2) rows and every
  // chunk, landing as [chunk][row][16 bytes] (moejit_resident.cuh, Layout::s_at).
  TmaDesc tma_w1;
  TmaDesc tma_w2;
  TmaDesc tma_s1;
  TmaDesc tma_s2;
};

// Finalize: out[t, :] = sum_j w[t*k+j] * y[perm[t*k+j], :] in ascending j, fp32 accumulation.
struct FinalizeParams {
  const void* y;                          // [P, H] fp32
  const float* weights;                   // [T*k]
  const int32_t* expanded_to_permuted;    // [T*k], -1 = contributes nothing
  void* out;                              // [T, H] bf16
  int32_t num_tokens;
  int32_t layer_rows;  // nonzero: H is the layer's, not the kernels' padded one (moejit_finalize.cuh)
};

// Rows of one width copied to rows of another (moejit_prepare.cuh, copy_rows): each output row
// the input row's first dst_row_bytes bytes, zeros past its src_row_bytes. A layer whose tiled
// weights pad H (moejit.h) copies x [T, H] to [T, H'] before its kernels and their [rows, H']
// outputs to the caller's [rows, H] after them. Both widths multiples of 16 bytes.
struct RowsParams {
  const uint8_t* src;
  uint8_t* dst;
  long long rows;
  int32_t src_row_bytes;
  int32_t dst_row_bytes;
};

// Layer::prepare_weights (moejit_prepare.cuh): output rows of row_bytes bytes in blocks of
// `block` rows (rows a multiple of it), chunks of chunk_units 16-byte units per row (8: weights,
// 1: scales). The padding of tiled H and I (moejit.h): the output rows form segments
// of seg_rows rows, of which the first src_seg_rows are source rows (output row
// seg_rows * s + j is source row src_seg_rows * s + j) and the rest zero; a source row has
// src_row_bytes bytes (at most row_bytes, even), and the rest of the output row is zero.
struct PrepareParams {
  const uint8_t* src;  // row-major
  uint8_t* dst;        // tiled
  long long rows;
  int32_t row_bytes;
  int32_t block;
  int32_t chunk_units;
  int32_t pair_order;  // w13's weights: each 32-bit word's nibbles in pair order (moejit.h)
  int32_t seg_rows;
  int32_t src_seg_rows;
  int32_t src_row_bytes;
};

}  // namespace moejit_dev

// Planning: which stages fuse into which kernels, and one GEMM configuration per token bucket.
// The token count is a run-time argument; a bucket covers a range of it.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "moejit/moejit.h"

namespace moejit::compiler {

// One grouped-GEMM kernel shape (templates/gemm.cuh). A block computes warps_n * 16 output
// features for one row tile of tile_rows permuted rows; warps_k warps split K inside the block;
// K is staged through shared memory k_chunk_groups * 32 elements at a time.
struct GemmConfig {
  int warps_n = 1;
  int warps_k = 1;
  int k_chunk_groups = 4;  // a multiple of 4 * warps_k
  bool double_buffer = true;  // prefetch the next chunk's weights during the current MMAs
  bool direct_x = false;      // 8-row tiles: x through L1 into registers, no shared memory
  int min_blocks = 0;         // __launch_bounds__ minimum blocks per SM (register cap); 0 = none
  // Tiles of 32 * big_wr rows on sm_90 (templates/moejit_gemm_big.cuh): big_wf x big_wr warps,
  // each big_warp_rows weight rows by 32 rows; the weights of a 64-deep stage dequantised once per block
  // into shared memory, a ring of big_stages stages (cp.async), big_smem bytes of dynamic shared
  // memory. warps_n then gives the features per block (16 * warps_n) and warps_k is 1.
  bool big = false;
  bool big_tile_major = true;  // blocks numbered tile-major (Cfg::kTileMajor)
  int big_wf = 0, big_wr = 0, big_stages = 0, big_smem = 0;
  int big_warp_rows = 64;  // weight rows per warp (Cfg::kWarpTileRows): 64, or 32 at 2 blocks per SM

  int threads() const { return big ? 32 * big_wf * big_wr : 32 * warps_n * warps_k; }
  bool operator==(const GemmConfig& o) const {
    return warps_n == o.warps_n && warps_k == o.warps_k && k_chunk_groups == o.k_chunk_groups &&
           double_buffer == o.double_buffer && direct_x == o.direct_x &&
           min_blocks == o.min_blocks && big == o.big && big_wf == o.big_wf &&
           big_wr == o.big_wr && big_stages == o.big_stages && big_smem == o.big_smem &&
           big_tile_major == o.big_tile_major && big_warp_rows == o.big_warp_rows;
  }
};

// The decode GEMM family for sm_90 (templates/moejit_stream.cuh): a persistent grid of blocks,
// each with producer_warps warps streaming k_stage values of K per stage (16-byte cp.async, or
// with `tma` TMA boxes and bulk copies issued by one producer warp) into
// a ring of `stages` shared-memory stages, and consumer_warps warps splitting each stage's groups.
struct StreamConfig {
  int consumer_warps = 4;
  int k_stage = 512;  // a multiple of 256 with (k_stage / 64) % consumer_warps == 0
  int stages = 4;
  int producer_warps = 4;
  // mbarrier try_wait suspend-time hint in ns (0: none). H200, kimi-k2: 2000 beat 10^7 by 3-7%
  // at 33-64 tokens and matched it at 1-8 (bench/RESULTS.md section 9).
  int suspend_ns = 2000;
  // gemm2: tiles with <= 4 valid rows put the activation's hi and lo planes in one MMA.
  bool pack_planes = true;
  // Weight rows per work unit (the kernel's default path): 64, 32, or for gemm1 16.
  int unit_rows = 64;
  // Smaller unit sizes compiled into the same kernel (a mask of 16 and 32), each with its own
  // k_stage and as many stages as fit in the ring; the host picks one per launch
  // (choose_unit_rows). 0 = the default path only.
  int alt_rows = 0;
  int k_stage16 = 0, k_stage32 = 0;  // k_stage of the 16- and 32-row paths (0 = not compiled)
  int ring_bytes = 0;  // dynamic shared memory: the largest path's stages (set_unit_paths)
  // Four consumer warps share each unit's warp sum and epilogue (warp w: accumulator w of every
  // A tile) instead of warp 0 doing both.
  bool split_epilogue = true;
  // Weights and scales copied by TMA (cp.async.bulk.tensor boxes issued by one thread) instead
  // of 16-byte cp.async; stages padded to 1 KiB (the 128-byte swizzle's alignment).
  bool tma = false;
  // With TMA: blocks take their units after the first from a counter (dispatch zeroes it), so
  // that faster blocks take more; false: units dealt round-robin (blockIdx.x + i * gridDim.x).
  // The planner sets it per GEMM and bucket (see make_plan).
  bool dynamic_units = true;
  // Gemm2 with TMA: x (both activation planes) as boxes of 4 rows (GemmParams::tma_x) instead of
  // one bulk copy per valid row and plane into padded rows. The planner sets it per bucket.
  bool x_boxes = false;
  // Gemm1 with TMA and dynamic units: the producer plans each block's first unit from the
  // routed ids (GemmParams::topk_ids) as dispatch would, and copies it before waiting for
  // dispatch. The ids are those of the route kernel two launches back (complete when the block
  // starts), or of the fused route+dispatch block once its word reads 1 (GemmParams::routed).
  // The planner sets it per bucket.
  bool early_unit = false;
  // Both GEMMs of a bucket with TMA: units numbered tile-major, gemm1 counts each tile's
  // finished features (GemmParams::tile_ready, zeroed by dispatch) and gemm2's producer waits
  // per unit for its tile there instead of for gemm1's grid, so gemm2 streams finished tiles
  // during gemm1's tail. The planner sets it per bucket (on both configs of the bucket).
  bool tile_ready = false;
  // Dynamic units: the producer takes the next unit from the counter without waiting for the
  // count there (a float atomic: ptxas turns an integer one into a warp-aggregated atomic that
  // waits for its result at once), and loads its tables after the current unit's second stage
  // instead of its last. The planner clears it where a launch's units could reach 2^24 (the
  // float count's exact range); "uf=0|1" overrides below that.
  bool early_fetch = true;
  // With TMA: the kernel can copy weights and scales with an L2 evict-first policy, so that the
  // streamed weights leave L2 before the rows the layer's kernels read again (x, gemm1's
  // activation, gemm2's y); each launch switches it on or off (GemmParams::evict_first,
  // evict_first_for).
  bool evict_first = false;
  // Blocks per SM the kernel is compiled for (__launch_bounds__) and its ring is sized for.
  int min_blocks = 2;
  // The GEMM's phase in a chain kernel (Bucket::chain_tokens): 0 none, 1 gemm1, 2 gemm2; the
  // ring's slots of slot_bytes (the larger of the two GEMMs' stages).
  int chain = 0;
  int slot_bytes = 0;
  // Gemm2 whose tiles have at most 4 valid rows (a chain's): its stages hold one x plane of 8
  // padded rows, the packed units' (pack_planes) hi and lo rows.
  bool packed_only = false;
  // Gemm1 with early_unit behind the fused route+dispatch block: up to Plan::routed_id_slots
  // routed slots, the ids read packed beside the block's word (RouteDispatchParams::routed)
  // instead of after it.
  bool routed_ids = true;
  // A chain's gemm2 (chain 2) of a finalized layer: each block counts its units per 64-feature
  // slice as it writes them, adds the counts to the slices' words after its last unit and
  // finalizes the slices it completes (stream::chain_finalize), so that the layer has no
  // finalize kernel. Off unless "chx=1" (slower: bench/RESULTS.md section 46). (The host's
  // slice words follow the tile-ready words: the chain needs tile_ready and 64-row units, which
  // runtime/layer.cpp checks.)
  bool chain_finalize = false;
  // A chain's GEMM (packed-only gemm2 stages, tiled weights, the fused route+dispatch block)
  // with fp16 MMA operands (bench/RESULTS.md section 37): the weights' nibbles take 4 LOP3 + 1
  // SHF per word instead of 4 + 3. Gemm1 (c1): a second block of the fused kernel writes x as
  // fp16 times one power of two per launch (k = 2, 3 mod 4 by a further 1/16), which gemm1's
  // epilogue multiplies back. Gemm2 (c2, only with c1's): gemm1 writes the activation as fp16 hi
  // and lo planes times a power of two per (tile, 8 features), whose dequantisation constants
  // gemm2 copies beside the activation; otherwise the activation stays bf16.
  bool f16 = false;
  // Gemm1 (TMA, tiled w13, 512-deep stages, the split epilogue): units of 64 rows whose tile
  // has one valid row put groups in the MMA's columns instead of the tile's rows (stream GEMM,
  // Cfg::kGroupCols), so that a warp scales 4 partial sums per 8 MMAs instead of 16; with two
  // valid rows, row 1 takes columns 4-7. Gemm2 (TMA, tiled w2, packed units, bf16 operands, 256-
  // or 512-deep stages): the same for its one-row tiles, x's hi plane in columns 0-3 and its lo
  // plane in 4-7. The value: the most valid rows of a tile that takes the path (0: off; gemm1
  // 1 or 2, gemm2 1), compiled into the kernel as Cfg::kGroupCols; GemmParams::group_cols
  // switches the path per launch.
  int group_cols = 0;

  // Gemm1 with tile_ready has one more warp, which publishes its finished units.
  int threads(bool gemm1) const { return 32 * (consumer_warps + producer_warps + (gemm1 && tile_ready)); }
  // The k_stage of the path for units of `rows` rows (the default path's, or a smaller one's).
  int k_stage_for(int rows) const {
    return rows == unit_rows ? k_stage : rows == 16 ? k_stage16 : k_stage32;
  }
  bool operator==(const StreamConfig& o) const {
    return consumer_warps == o.consumer_warps && k_stage == o.k_stage && stages == o.stages &&
           producer_warps == o.producer_warps && suspend_ns == o.suspend_ns && pack_planes == o.pack_planes &&
           unit_rows == o.unit_rows && alt_rows == o.alt_rows && k_stage16 == o.k_stage16 &&
           k_stage32 == o.k_stage32 && ring_bytes == o.ring_bytes &&
           split_epilogue == o.split_epilogue && tma == o.tma && dynamic_units == o.dynamic_units &&
           x_boxes == o.x_boxes && early_unit == o.early_unit && tile_ready == o.tile_ready &&
           early_fetch == o.early_fetch && evict_first == o.evict_first && min_blocks == o.min_blocks &&
           chain == o.chain && slot_bytes == o.slot_bytes && packed_only == o.packed_only &&
           routed_ids == o.routed_ids && chain_finalize == o.chain_finalize && f16 == o.f16 &&
           group_cols == o.group_cols;
  }
};

// Most stages a stream ring may have (kMaxStages in moejit_stream.cuh: its mbarrier arrays).
constexpr int kMaxStreamStages = 8;

// Dynamic shared memory of a big-tile GEMM (templates/moejit_gemm_big.cuh, its layout) of wf x wr
// warps of warp_rows weight rows, `stages` stages and `planes` x planes: per stage the raw weights
// (32 bytes per weight row), scales (4) and x rows (144 bytes per plane), then two converted
// weight buffers (144 bytes per row) and their fp32 scales.
int big_smem_bytes(int wf, int wr, int stages, int planes, int warp_rows = 64);

// Shared-memory bytes of one stream stage (must equal kStageBytes in moejit_stream.cuh; the
// generated code static_asserts it).
// x_boxes: gemm2's x by 4-row TMA boxes (StreamConfig::x_boxes; with tma only).
// packed_only: gemm2's x as one plane of 8 padded rows (StreamConfig::packed_only).
// f16_magic: gemm2 with StreamConfig::f16, whose stage also holds the activation's
// dequantisation words (one per 8 features: k_stage / 2 bytes).
int stream_stage_bytes(int k_stage, bool gemm1, int unit_rows = 32, bool tma = false,
                       bool x_boxes = false, bool packed_only = false, bool f16_magic = false);
int stream_stage_bytes(const StreamConfig& c, bool gemm1);

// Upper bound on the work units of a stream GEMM with `unit_rows`-row units at `tokens` tokens:
// row tiles (Plan::max_tiles with 8-row tiles) x weight rows of an expert (gemm1 2I, gemm2 H)
// / unit_rows.
long long stream_units(const MoeSpec& spec, bool gemm1, int unit_rows, int tokens);

// The unit size a launch of `tokens` tokens takes, from the ones compiled into c: the one whose
// busiest block (units dealt round-robin over the persistent grid) streams the fewest rows,
// counting a unit's fixed costs as 16 rows; ties go to larger units. Fitted to H200
// measurements (bench/RESULTS.md sections 10, 11 and 14): kimi-k2-tp8 gemm1 at one token takes
// 16-row units (one round either way), qwen3-30b-a3b gemm1 64-row ones (192 units in one round
// beat 384 of 32 rows in two by 3%).
int choose_unit_rows(const StreamConfig& c, const MoeSpec& spec, bool gemm1, int tokens,
                     long long grid);

// The resident one-token layer (templates/moejit_resident.cuh): one cooperative launch of `grid`
// blocks (one per SM) that each route the token, copy every weight they need (their gemm1 units
// in K parts, then their gemm2 features of all routed experts) into shared memory, and after one
// grid-wide barrier write the finalized output. For finalized layers whose routed weights fit in
// the grid's shared memory (kimi-k2-tp8, qwen3-30b-a3b).
struct ResidentConfig {
  int grid = 0;        // blocks, one per SM (the launch needs at least this many SMs); 0: none
  int warps = 16;
  int k_part1 = 0;     // gemm1's K per copy part (each part has its own mbarrier)
  int window = 1;      // gemm1 parts in flight at a time (gemm2's copies follow the last)
  int units1 = 0;      // most gemm1 units (slot, 8 SwiGLU features) per block
  int units2 = 0;      // most gemm2 units (8 output features, every slot) per block
  // The bucket's stream GEMMs' consumer warps and gemm2's plane packing: the resident layer
  // follows their order of operations, so that its output equals the unfinalized layer's +
  // moejit::finalize bitwise.
  int chains1 = 4, chains2 = 4;
  bool packed2 = true;
  int smem = 0;        // dynamic shared memory, less the 1 KiB alignment slack
  // The token routed by the whole block (moejit_route.cuh, route_token_block; Plan::block_route,
  // at most 16 warps, where its static shared memory fits too).
  bool block_route = false;

  int threads() const { return 32 * warps; }
  bool operator==(const ResidentConfig& o) const {
    return grid == o.grid && warps == o.warps && k_part1 == o.k_part1 && window == o.window &&
           units1 == o.units1 && units2 == o.units2 && chains1 == o.chains1 &&
           chains2 == o.chains2 && packed2 == o.packed2 && smem == o.smem &&
           block_route == o.block_route;
  }
};

// The resident layer's shared-memory bytes (moejit_resident.cuh's resident::Layout, which
// static_asserts that it equals the generated Cfg::kSmem).
int resident_smem_bytes(const MoeSpec& spec, const ResidentConfig& c);

// The resident configuration of `spec` on a `grid`-block card, or grid = 0 where the layer does
// not qualify (not finalized, H or I not multiples of 256, or more than fits in shared memory).
// k_part1 > 0 forces gemm1's K part (override "rkp=N"), window > 0 the parts in flight
// ("rwin=N"), warps > 0 the block's warps ("rw=N": 8, 16 or 32).
// chains1 / chains2 / packed2: the bucket's stream GEMMs' (StreamConfig::consumer_warps,
// gemm2's pack_planes); block_route: Plan::block_route.
ResidentConfig pick_resident(const MoeSpec& spec, int grid = 132, int k_part1 = 0, int window = 0,
                             int warps = 0, int chains1 = 4, int chains2 = 4, bool packed2 = true,
                             bool block_route = false);

// Static shared memory of route_token_block (moejit_route.cuh) at most: the logits, the
// candidates (at most one per expert), the group maxima, the selection and alignment.
long long block_route_smem_bytes(const MoeSpec& spec);

struct Bucket {
  int min_tokens = 1;
  int max_tokens = 0;  // inclusive; 0 = no upper bound
  int tile_rows = 8;   // rows per tile (multiple of 8) = dispatch padding
  GemmConfig gemm1;    // N = I (SwiGLU features), K = H
  GemmConfig gemm2;    // N = H, K = I
  bool stream = false;          // both GEMMs use the stream family (s1, s2) instead of gemm1/2
  StreamConfig s1, s2;
  bool fused_finalize = false;  // gemm2 also finalizes (decode buckets of finalized layers)
  bool fused_route = false;     // one block routes and dispatches (kernel "route_dispatch")
  // One token runs the resident layer (kernel "resident_b<i>", one launch) instead of the
  // bucket's pipeline where res.grid > 0.
  ResidentConfig res;
  bool resident() const { return res.grid > 0; }
  // Launches of at most chain_tokens tokens run both GEMMs as one chain kernel (kernel
  // "chain_b<i>", templates/moejit_stream.cuh stream_chain) with the configurations c1 (gemm1)
  // and c2 (gemm2) instead of the two stream kernels; 0: never. Where c2 is packed_only (tiles
  // of at most 4 valid rows), chain_tokens is at most 4 and Precomputed routing, which may repeat
  // an expert within a token, takes the chain only up to 4 slots.
  int chain_tokens = 0;
  // The chain's fewest tokens: 2 where one token of the finalized layer of this shape runs the
  // resident layer, whose sums follow the pipeline's order and not the chain's; one token of the
  // unfinalized layer then takes the pipeline too, so that the two layer kinds stay equal bitwise.
  int chain_min_tokens = 1;
  StreamConfig c1, c2;
  bool chain_covers(int tokens) const { return tokens >= chain_min_tokens && tokens <= chain_tokens; }
  bool chain_for(int tokens, int top_k, bool precomputed) const {
    return chain_covers(tokens) &&
           (!c2.packed_only || !precomputed || static_cast<long long>(tokens) * top_k <= 4);
  }

  bool contains(int tokens) const {
    return tokens >= min_tokens && (max_tokens == 0 || tokens <= max_tokens);
  }
};

// Prepare: Layer::prepare_weights's kernel (tiled weight formats only), not part of a launch.
// Rows: where the tiled weights pad H (kernel_spec), the copy of x to padded rows before the
// layer's kernels and of their padded output rows to the caller's after them.
enum class KernelRole { Route, Dispatch, RouteDispatch, Gemm1, Gemm2, Finalize, Resident, Chain, Prepare, Rows };
const char* to_string(KernelRole role);

// One kernel of the plan: the stages it implements and, for GEMMs, its bucket.
struct KernelPlan {
  std::string name;   // unique in the plan, e.g. "gemm1_b0"; also the CUDA entry symbol suffix,
                      // unless its code is an earlier kernel's (KernelSource::same_as)
  KernelRole role;
  std::vector<std::string> stages;  // IR stage names fused into this kernel
  int bucket = -1;    // index into Plan::buckets, -1 for bucket-independent kernels
};

struct Plan {
  // The spec the kernels are planned and generated for: the layer's (layer_spec), except that a
  // tiled layer's hidden and intermediate sizes are padded to multiples of 256 (kernel_spec).
  MoeSpec spec;
  MoeSpec layer_spec;  // as given to make_plan
  std::vector<Bucket> buckets;
  std::vector<KernelPlan> kernels;
  int max_tokens = 0;  // as requested from make_plan; 0 = no limit
  // Warps of the fused route+dispatch block (buckets with fused_route, at most 16 tokens): warp
  // w routes tokens w, w + warps, ...; 0 = no bucket fuses them.
  int route_dispatch_warps = 0;
  // Dispatch of at most 32 slots by one warp and one block barrier (moejit_dispatch.cuh,
  // dispatch_small); "sd=0" keeps the general block dispatch for them.
  bool small_dispatch = true;
  // One token routed by the whole fused route+dispatch block or resident block of at most 16
  // warps (moejit_route.cuh, route_token_block) instead of its first warp: where a lane of that
  // warp would hold more than 4 experts (H200, bench/RESULTS.md section 30: kimi-k2 and
  // kimi-k2-tp8, 384 experts, 1.0-1.3 us faster at one token; qwen3-30b-a3b, 128, no faster).
  // "brt=0|1" forces it (never for Precomputed or grouped DeepSeekV3). fused_block_route: the
  // fused block's, where its static shared memory fits (ResidentConfig::block_route: the
  // resident layer's).
  bool block_route = false;
  bool fused_block_route = false;
  // Threads per finalize block, 8 features each, at most kFinalizeThreads (0: by token count,
  // finalize_threads_for); "fth=N" (32, 64 or 128) forces N.
  int finalize_threads = 0;
  // Weights with the L2 evict-first policy (evict_first_for): -1 by the rule, 0 / 1 forced
  // ("ef=0|1").
  int evict_first = -1;
  // The most routed slots the fused route+dispatch block packs beside its word for gemm1
  // (StreamConfig::routed_ids; moejit_params.h): 8 (one vector, one token of top-8) or 64
  // (eight vectors, 8 tokens of top-8). 64 where no bucket runs the chain kernel (H200,
  // bench/RESULTS.md section 44a: 0.9 / 0.3 us off 4 / 8 qwen3-30b-a3b tokens); 8 beside a
  // chain, where a wider block cost one kimi-k2 token 0.3-0.4 us (section 43b) and the block
  // compiles as before. "ids=8|64" forces it.
  int routed_id_slots = 8;

  int bucket_for(int tokens) const;  // throws InvalidArgument if no bucket covers it
  // Upper bound of row tiles (and of permuted rows = tiles * tile_rows) for T tokens.
  static long long max_tiles(int tokens, int top_k, int local_experts, int tile_rows);
};

// Threads of the finalize kernel's blocks at most (its launch bound), 8 features each.
constexpr int kFinalizeThreads = 128;
// Threads per finalize block for T tokens: plan.finalize_threads where an override forced it,
// else 32 up to 64 tokens (four times the blocks of 128-thread ones: each token's features
// spread over more SMs; H200, bench/RESULTS.md section 22) and kFinalizeThreads (128) above.
int finalize_threads_for(const Plan& plan, int tokens);

// Whether a launch of T tokens copies the stream GEMMs' weights with the L2 evict-first policy
// (where the bucket's kernels carry it, StreamConfig::evict_first): plan.evict_first where an
// override forced it, else up to 8 tokens, for layers with H <= 4096 up to T * H = 131072
// (qwen3-30b-a3b's 64 tokens, 32 at H = 4096), and for H <= 2048 up to T * H = 262144 (128 tokens
// at H = 2048). A rule fitted to measurements, not derived (H200, bench/RESULTS.md section 23):
// 1.3-4.6 us faster at 1-8 tokens for kimi-k2, kimi-k2-tp8, kimi-k2-tp4 and deepseek-v3, 1.5-2.5
// us at 8-64 tokens for qwen3-30b-a3b (H 2048), 2-3 us at 8-33 for an H = 4096 shape; but H = 7168
// layers 0.5-7% slower from 10-16 tokens up (kimi-k2 +27 us at 16, +80 at 33) and the H = 4096
// shape 0.7% at 64. At 65-128 tokens (section 51) qwen3-30b-a3b with tiled weights gained 3.0-4.0
// us at 65, 1.4-2.8 at 96 and 0.3-1.0 at 128 (row-major: 2.0, 0.8, none); kimi-k2 and kimi-k2-tp8
// lost up to 3% there.
bool evict_first_for(const Plan& plan, int tokens);
bool evict_first_rule(const MoeSpec& spec, int tokens);

// Bucket boundaries: [1,16], [17,64], [65,128], [129,256], [257,512], [513,1024], [1025, inf). A
// plan without the stream family (not sm_90, H or I not a multiple of 256, or stream=0) has
// [129,512] and [513, inf) instead of the last four; a plan with it whose experts would get more
// than 128 rows each at 1024 tokens has [513, inf) instead of the last two.
const std::vector<std::pair<int, int>>& bucket_ranges();

// Picks the tile and GEMM shapes for each bucket; max_tokens > 0 drops buckets above it.
// On sm_90, when H and I are multiples of 256, every bucket up to 512 tokens (1024 where an
// expert gets at most 128 rows at 1024 tokens) has 8-row tiles and uses the stream family. MOEJIT_PLAN_OVERRIDE (a tuning switch, e.g. "g1=1x8x64,g2=2x4x64,mb1=5" or
// "s1=4x512x5x4,s2=4x512x4", "sns=0", "pack=0", or "stream=0") replaces the GEMM shapes of the decode buckets:
// gN = warps_n x warps_k x k_chunk_groups, mbN = minimum blocks per SM, sN = consumer warps x
// k_stage x stages [x producer warps], at most 8 warps; stream=0 selects the older family, stream=1 the stream
// family wherever it is eligible; ff=0 turns off the older family's fused finalize.
Plan make_plan(const MoeSpec& spec, int max_tokens = 0, const std::string& arch = "sm_90a");

// The spec a layer's kernels are generated for: `spec`, with a tiled layer's hidden and
// intermediate sizes rounded up to multiples of 256 (moejit.h, tiled_weight_bytes: the tiled
// weights hold the padding as zeros, so the padded layer's output is the layer's, in its first H
// features; a padded H also pads x and the output rows: KernelRole::Rows).
MoeSpec kernel_spec(const MoeSpec& spec);

// The override in force ("" when none); part of a compiled layer's identity.
std::string plan_override();

// An override text's items (separated by ',', ';' or white space) as KEY -> VALUE. Throws
// InvalidArgument unless every item is KEY=VALUE with a key the planner or the code generator
// reads, given once, and a value of that key's form (0 or 1, a number, AxBxC, AxBxC[xD], a hex
// address); make_plan parses the override in force, so that a mistyped item is an error, not a
// plan left as it was. Values of the right form are checked where they are used.
using OverrideItems = std::map<std::string, std::string>;
OverrideItems parse_plan_override(const std::string& text);
// The value of `key` in the override in force (parsed as above), if it is there.
std::optional<std::string> plan_override_value(const char* key);

// A one-line-per-kernel description (used by `moejit dump --emit plan` and tests).
std::string describe(const Plan& plan);

}  // namespace moejit::compiler

#include "plan.h"

#include "moejit_params.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <optional>
#include <regex>

namespace moejit::compiler {

const char* to_string(KernelRole role) {
  switch (role) {
    case KernelRole::Route: return "route";
    case KernelRole::Dispatch: return "dispatch";
    case KernelRole::RouteDispatch: return "route_dispatch";
    case KernelRole::Gemm1: return "gemm1";
    case KernelRole::Gemm2: return "gemm2";
    case KernelRole::Finalize: return "finalize";
    case KernelRole::Resident: return "resident";
    case KernelRole::Chain: return "chain";
    case KernelRole::Prepare: return "prepare";
    case KernelRole::Rows: return "rows";
  }
  return "?";
}

// The stream family's buckets (bench/RESULTS.md sections 50, 52 and 53); make_plan merges
// 129-256 and 257-512 into one bucket for a layer the stream family does not take, and 513-1024
// and 1025 up where it does not take 513-1024.
const std::vector<std::pair<int, int>>& bucket_ranges() {
  static const std::vector<std::pair<int, int>> ranges = {
      {1, 16}, {17, 64}, {65, 128}, {129, 256}, {257, 512}, {513, 1024}, {1025, 0}};
  return ranges;
}

bool evict_first_rule(const MoeSpec& spec, int tokens) {
  const long long th = static_cast<long long>(tokens) * spec.hidden;
  return tokens <= 8 || (spec.hidden <= 4096 && th <= 131072) || (spec.hidden <= 2048 && th <= 262144);
}

bool evict_first_for(const Plan& plan, int tokens) {
  if (plan.evict_first >= 0) return plan.evict_first == 1;
  return evict_first_rule(plan.spec, tokens);
}

int finalize_threads_for(const Plan& plan, int tokens) {
  if (plan.finalize_threads > 0) return plan.finalize_threads;
  return tokens <= 64 ? 32 : kFinalizeThreads;
}

int Plan::bucket_for(int tokens) const {
  if (tokens < 0)
    throw Error(ErrorKind::InvalidArgument, fmt::format("num_tokens = {} is negative", tokens));
  for (size_t i = 0; i < buckets.size(); ++i)
    if (buckets[i].contains(tokens)) return static_cast<int>(i);
  throw Error(ErrorKind::InvalidArgument,
              fmt::format("num_tokens = {} is outside every compiled token bucket: the layer was "
                          "compiled with max_tokens = {}, so its buckets end at {} tokens; "
                          "compile without a limit or with a larger one",
                          tokens, max_tokens, buckets.empty() ? 0 : buckets.back().max_tokens));
}

long long Plan::max_tiles(int tokens, int top_k, int local_experts, int tile_rows) {
  // Each non-empty expert adds at most tile_rows - 1 padding rows; every tile holds >= 1 slot.
  long long slots = static_cast<long long>(tokens) * top_k;
  long long nonempty = std::min<long long>(local_experts, slots);
  return std::min(slots, (slots + nonempty * (tile_rows - 1)) / tile_rows);
}

namespace {

constexpr int kSmemBudget = 32 * 1024;  // bytes of staged activations per block

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Shape of one GEMM for a given tile: N output features, K reduction length (both % 32 == 0);
// swiglu: the GEMM produces (gate, up) pairs, so each warp streams two weight tiles.
GemmConfig pick_gemm(int n, int k, int tile_rows, bool swiglu) {
  GemmConfig c;
  const int k_groups = k / 32;
  const int k_blocks = (k_groups + 3) / 4;  // a warp consumes 4 groups (128 k) per step
  // Groups of x that fit in shared memory; gemm2's x (the activation) is two bf16 planes.
  const int planes = swiglu ? 1 : 2;
  const int max_chunk = kSmemBudget / (tile_rows * 32 * 2 * planes);
  int iters = 1;  // 4-group blocks per warp per pipeline stage
  if (tile_rows == 8) {
    // Decode: weight streaming. x comes through L1; each warp keeps 2 stages of 16-byte loads
    // in flight (gate+up: 2 blocks per stage, down: 4), which measured best on an H200
    // (bench/RESULTS.md).
    c.direct_x = true;
    c.warps_n = swiglu ? 1 : (n % 64 == 0 ? 4 : (n % 32 == 0 ? 2 : 1));
    c.warps_k = std::clamp(k_blocks, 1, swiglu ? 4 : 2);
    iters = swiglu ? 2 : 4;
    // Four blocks per stage spill (ptxas holds these kernels to 128 registers) once the K
    // loop runs more than two stages, as for seed-test's I = 7168.
    if (!swiglu && k_blocks > 2 * iters * c.warps_k) iters = 2;
  } else if (tile_rows <= 16) {
    // One warp of features per block, K split across warps so each block has loads in flight.
    c.warps_n = 1;
    c.warps_k = std::clamp(k_blocks, 1, std::min(8, max_chunk / 4));
    iters = max_chunk / (4 * c.warps_k);
  } else {
    // Many rows: reuse each weight fragment across more rows, split features across warps.
    c.warps_n = (n % 64 == 0) ? 4 : 2;
    c.warps_k = 1;
    c.double_buffer = false;
    iters = max_chunk / 4;
  }
  const int step = 4 * c.warps_k;
  c.k_chunk_groups = std::min(iters * step, round_up(k_groups, step));
  return c;
}

// A big-tile configuration for tiles of tile_rows (64 or 128) rows and warps of warp_rows (64 or
// 32) weight rows: 8 warps where the features split into blocks of warp_rows * wf weight rows,
// else 4; as many stages (stages_wanted down to 3) as fit in 220 KiB, or with 32-row warps, which
// run two blocks per SM, in 110 KiB. big stays false where no block size divides the features or
// K is not a multiple of 64.
GemmConfig pick_big(int n, int k, int tile_rows, bool swiglu, int stages_wanted, int warp_rows) {
  GemmConfig c;
  const int wr = tile_rows / 32;
  const int blocks = warp_rows == 32 ? 2 : 1;
  if (k % 64 != 0 || (tile_rows != 64 && tile_rows != 128)) return c;
  for (int warps : {8, 4}) {
    const int wf = warps / wr;
    const int feat = swiglu ? warp_rows / 2 * wf : warp_rows * wf;
    // (Each thread copies and converts whole weight units: 2 per weight row, a multiple of the
    // block's threads.)
    if (wf < 1 || n % feat != 0 || 2 * warp_rows * wf % (32 * warps) != 0) continue;
    for (int st = stages_wanted; st >= 3; --st) {
      const int bytes = big_smem_bytes(wf, wr, st, swiglu ? 1 : 2, warp_rows);
      if (bytes > 220 * 1024 / blocks) continue;
      c.big = true;
      c.big_wf = wf;
      c.big_wr = wr;
      c.big_stages = st;
      c.big_smem = bytes;
      c.big_warp_rows = warp_rows;
      c.warps_n = feat / 16;
      c.warps_k = 1;
      c.double_buffer = false;
      c.min_blocks = blocks;
      return c;
    }
  }
  return c;
}

// Applies "g1=WNxWKxCG,g2=WNxWKxCG" (either part optional) and "mb1=N,mb2=N" to a GEMM of n
// features, k length.
void apply_override(const OverrideItems& items, const char* which, int n, int k, int tile,
                    GemmConfig& c) {
  const int planes = which[1] == '1' ? 1 : 2;
  if (const auto mb = items.find(std::string("mb") + which[1]); mb != items.end())
    c.min_blocks = std::stoi(mb->second);
  const auto it = items.find(which);
  if (it == items.end()) return;
  static const std::regex re("([0-9]+)x([0-9]+)x([0-9]+)");
  std::smatch m;
  std::regex_match(it->second, m, re);  // (the form is checked by parse_plan_override)
  GemmConfig o = c;
  o.warps_n = std::stoi(m[1]);
  o.warps_k = std::stoi(m[2]);
  o.k_chunk_groups = std::stoi(m[3]);
  const bool ok = o.warps_n >= 1 && o.warps_k >= 1 && o.warps_n * o.warps_k <= 32 &&
                  n % (16 * o.warps_n) == 0 && o.k_chunk_groups % (4 * o.warps_k) == 0 &&
                  planes * tile * (o.k_chunk_groups * 32 + 8) * 2 <= 48 * 1024 && k >= 32;
  if (!ok)
    throw Error(ErrorKind::InvalidArgument,
                fmt::format("MOEJIT_PLAN_OVERRIDE: {}={}x{}x{} breaks a GEMM rule (features {} "
                            "divisible by 16*warps_n, k_chunk_groups a multiple of 4*warps_k, "
                            "tile x chunk within 48 KiB of shared memory)",
                            which, o.warps_n, o.warps_k, o.k_chunk_groups, n));
  c = o;
}

// The ring bytes of one stream GEMM block at min_blocks blocks per SM: 104 KiB at two (TMA: 102
// KiB, leaving room for the 1 KiB alignment slack beside the static shared memory: mbarriers and
// 8 KiB of partial sums), 64 KiB at three, 40 KiB at four (gemm2 only: two 256-deep stages).
int stream_ring_budget(int min_blocks, bool tma) {
  return min_blocks >= 4 ? 40 * 1024 : min_blocks >= 3 ? 64 * 1024 : tma ? 102 * 1024 : 104 * 1024;
}

// Stream stages: gemm1 takes k_stage = 1024 where it divides K (4 group pairs per consumer warp
// and stage: more independent work per wait), else 512 where it divides K, else 256; gemm2 at
// most 512 (at 1024 its two activation planes push it past 128 registers). As many stages as
// fit in 104 KiB of shared memory, so that two blocks share an SM (228 KiB). Measured on an
// H200 (bench/RESULTS.md section 9): k_stage 1024 beat 512 by 2-5% for gemm1, and 3 + 4 stages
// of 104 KiB beat 2 + 2 of ~70 / 52 KiB by 3-6% at 1-33 tokens. (Section 8's older finding,
// fewer stages beat deeper rings, was made with 4-6 blocks per SM competing for the copies.)
StreamConfig pick_stream(int k, bool gemm1, int unit_rows = 64, bool tma = false, int min_blocks = 2,
                         bool x_boxes = false) {
  StreamConfig c;
  c.tma = tma;
  c.x_boxes = x_boxes;
  c.min_blocks = min_blocks;
  if (tma) c.producer_warps = 1;  // one thread issues the boxes; the warp copies x
  c.consumer_warps = 4;
  c.unit_rows = unit_rows;
  // 64-row units: gemm1 at most 512 (a 1024-deep stage of 64 rows, 53 KiB, leaves room for
  // one), gemm2 256 (at 512 ptxas spills a few bytes; 256 measured the same on an H200).
  // Three blocks per SM (64 KiB rings): 256 for every unit size, so that every path's ring
  // keeps 3-8 stages within the budget (a 1024-deep stage of 32 rows alone is 35 KiB).
  if (min_blocks >= 3)
    c.k_stage = 256;
  else if (unit_rows <= 32)
    c.k_stage = gemm1 && k % 1024 == 0 ? 1024 : k % 512 == 0 ? 512 : 256;
  else
    c.k_stage = gemm1 && k % 512 == 0 ? 512 : 256;
  const int budget = stream_ring_budget(min_blocks, tma);
  const int sb = stream_stage_bytes(c.k_stage, gemm1, c.unit_rows, tma, x_boxes);
  c.stages = std::clamp(budget / sb, 2, kMaxStreamStages);
  c.ring_bytes = c.stages * sb;
  return c;
}

// Compiles the smaller unit sizes in `alt` (a mask of 16 and 32) into c as well: each path keeps
// the k_stage it would have alone, and the ring is the largest of the paths' own rings (the
// default path's stage count is re-derived from it, at most 8). A path whose k_stage does not
// split over c.consumer_warps (an s1= / s2= override) is left out.
void set_unit_paths(StreamConfig& c, int alt, int k, bool gemm1) {
  c.alt_rows = 0;
  c.k_stage16 = c.k_stage32 = 0;
  c.ring_bytes = c.stages * stream_stage_bytes(c.k_stage, gemm1, c.unit_rows, c.tma, c.x_boxes);
  for (int rows : {16, 32}) {
    if (!(alt & rows)) continue;
    const StreamConfig p = pick_stream(k, gemm1, rows, c.tma, c.min_blocks, c.x_boxes);
    if ((p.k_stage / 64) % c.consumer_warps != 0) continue;
    c.alt_rows |= rows;
    (rows == 16 ? c.k_stage16 : c.k_stage32) = p.k_stage;
    c.ring_bytes = std::max(c.ring_bytes, p.ring_bytes);
  }
  if (c.alt_rows)
    c.stages = std::min(kMaxStreamStages, c.ring_bytes / stream_stage_bytes(c.k_stage, gemm1, c.unit_rows, c.tma, c.x_boxes));
}

// Units of 16 (gemm1), 32 or 64 weight rows; k_stage and the stages are picked again for them.
void set_unit_rows(StreamConfig& c, int rows, int k, bool gemm1) {
  c.unit_rows = rows;
  const StreamConfig d = pick_stream(k, gemm1, rows, c.tma, c.min_blocks, c.x_boxes);
  c.k_stage = d.k_stage;
  c.stages = d.stages;
  set_unit_paths(c, 0, k, gemm1);
}

// "u1=R" / "u2=R": force the unit rows of gemm1 (16, 32, 64) or gemm2 (32, 64).
void apply_unit_override(const OverrideItems& items, bool gemm1, int k, StreamConfig& c) {
  const auto it = items.find(gemm1 ? "u1" : "u2");
  if (it == items.end()) return;
  const std::string& v = it->second;
  const bool ok = v == "32" || v == "64" || (gemm1 && v == "16");
  if (!ok)
    throw Error(ErrorKind::InvalidArgument,
                fmt::format("MOEJIT_PLAN_OVERRIDE: u{}={} ({} unit rows) must be {}", gemm1 ? 1 : 2,
                            v, gemm1 ? "gemm1" : "gemm2", gemm1 ? "16, 32 or 64" : "32 or 64"));
  set_unit_rows(c, std::stoi(v), k, gemm1);
}

void apply_stream_override(const OverrideItems& items, const char* which, int k, bool gemm1,
                           StreamConfig& c) {
  const auto it = items.find(which);
  if (it == items.end()) return;
  static const std::regex re("([0-9]+)x([0-9]+)x([0-9]+)(x([0-9]+))?");
  std::smatch m;
  std::regex_match(it->second, m, re);  // (the form is checked by parse_plan_override)
  StreamConfig o = c;
  o.consumer_warps = std::stoi(m[1]);
  o.k_stage = std::stoi(m[2]);
  o.stages = std::stoi(m[3]);
  if (m[5].matched) o.producer_warps = std::stoi(m[5]);
  // At most 8 warps in all: __launch_bounds__(threads, 2) caps 256 threads at 128 registers.
  const bool ok = o.consumer_warps >= 1 && o.consumer_warps + o.producer_warps <= 8 &&
                  (o.producer_warps == 1 || o.producer_warps == 2 || o.producer_warps == 4 ||
                   o.producer_warps == 8) &&
                  o.k_stage >= 256 &&
                  o.k_stage % 256 == 0 && (o.k_stage / 64) % o.consumer_warps == 0 &&
                  o.k_stage <= std::max(k, 256) && o.stages >= 2 && o.stages <= kMaxStreamStages &&
                  o.stages * stream_stage_bytes(o.k_stage, gemm1, o.unit_rows, o.tma, o.x_boxes) <= 200 * 1024 &&
                  (!o.tma || o.producer_warps == 1);
  if (!ok)
    throw Error(ErrorKind::InvalidArgument,
                fmt::format("MOEJIT_PLAN_OVERRIDE: {}={}x{}x{}x{} breaks a stream GEMM rule "
                            "(1/2/4/8 producer warps, at most 8 warps in all, k_stage a multiple of 256 and of "
                            "64 * consumer warps, at most K = {}, 2 to 8 stages within 200 KiB)",
                            which, o.consumer_warps, o.k_stage, o.stages, o.producer_warps, k));
  c = o;
  set_unit_paths(c, c.alt_rows, k, gemm1);  // the ring covers the smaller paths' rings too
  c.stages = o.stages;
  // A ring beyond its blocks-per-SM budget runs at fewer blocks per SM: compile for that.
  while (c.min_blocks >= 3 && c.ring_bytes > stream_ring_budget(c.min_blocks, c.tma)) --c.min_blocks;
}

bool arch_is_90(const std::string& arch) { return arch == "sm_90" || arch == "sm_90a"; }

}  // namespace

int big_smem_bytes(int wf, int wr, int stages, int planes, int warp_rows) {
  const int wrows = warp_rows * wf;
  return stages * (wrows * 32 + wrows * 4 + planes * 32 * wr * 144) + 2 * wrows * 144 + 2 * wrows * 2 * 4;
}

int stream_stage_bytes(int k_stage, bool gemm1, int unit_rows, bool tma, bool x_boxes, bool packed_only,
                       bool f16_magic) {
  const int planes = gemm1 || packed_only ? 1 : 2;
  const int weights_scales = k_stage / 256 * unit_rows * 128 + unit_rows * (k_stage / 16);
  // x: 8 rows per plane, padded by 64 bytes (gemm1, and gemm2 by cp.async or row copies; one
  // plane where gemm2's units are all packed); gemm2 by TMA boxes: two boxes of 4 rows x both
  // planes, unpadded.
  const int x = tma && !gemm1 && x_boxes ? 2 * 4 * planes * k_stage * 2 : planes * 8 * (k_stage * 2 + 64);
  const int bytes = weights_scales + x + (f16_magic ? k_stage / 2 : 0);
  return tma ? (bytes + 1023) / 1024 * 1024 : bytes;
}

int stream_stage_bytes(const StreamConfig& c, bool gemm1) {
  return stream_stage_bytes(c.k_stage, gemm1, c.unit_rows, c.tma, c.x_boxes, !gemm1 && c.packed_only,
                            !gemm1 && c.f16);
}

long long stream_units(const MoeSpec& spec, bool gemm1, int unit_rows, int tokens) {
  const long long rows = gemm1 ? 2ll * spec.intermediate : spec.hidden;
  return Plan::max_tiles(tokens, spec.top_k, spec.local_experts(), 8) * (rows / unit_rows);
}

int choose_unit_rows(const StreamConfig& c, const MoeSpec& spec, bool gemm1, int tokens,
                     long long grid) {
  // The busiest block streams `rounds` units; each costs its rows plus a fixed part worth
  // kUnitCostRows rows (unit fetch, ring refill, reduction, epilogue). Ties go to the larger
  // units.
  constexpr long long kUnitCostRows = 16;
  int best = c.unit_rows;
  long long best_cost = -1;
  for (int rows : {c.unit_rows, 32, 16}) {
    if (rows != c.unit_rows && !(rows < c.unit_rows && (c.alt_rows & rows))) continue;
    const long long units = stream_units(spec, gemm1, rows, tokens);
    const long long rounds = grid > 0 ? (units + grid - 1) / grid : units;
    const long long cost = rounds * (rows + kUnitCostRows);
    if (best_cost < 0 || cost < best_cost) {
      best = rows;
      best_cost = cost;
    }
  }
  return best;
}

int resident_smem_bytes(const MoeSpec& spec, const ResidentConfig& c) {
  // Mirrors resident::Layout in templates/moejit_resident.cuh.
  const long long H = spec.hidden, I = spec.intermediate, S = spec.top_k;
  auto al = [](long long x) { return (x + 1023) / 1024 * 1024; };
  const long long r2 = 8ll * c.units2;
  const long long s1 = c.units1 * 2 * (8 * H / 2);
  const long long w2 = al(s1 + c.units1 * 16 * (H / 16));
  const long long s2 = w2 + S * (r2 * I / 2) + 1024;
  const long long x = al(s2 + (S * r2 + 8) * (I / 16));
  // Gemm2's activation planes over gemm1's weights where they fit, else after x.
  const bool act_in_w1 = 2 * S * I * 2 <= c.units1 * 2 * (8 * H / 2);
  const long long corr = x + (act_in_w1 ? H * 2 : std::max(H * 2, 2 * S * I * 2));
  const long long red = corr + 4 * std::max(H / 32, 2 * S * (I / 32));
  const long long tiles2 = (r2 + 15) / 16;
  const long long items2 = S * tiles2 * (S * tiles2 >= c.warps ? 1 : c.chains2);
  const long long bytes = red + 4 * std::max<long long>(c.units1 * 16ll * c.chains1, items2 * 32);
  return bytes > (1ll << 30) ? (1 << 30) : static_cast<int>(bytes);
}

long long block_route_smem_bytes(const MoeSpec& spec) {
  return 12ll * spec.num_experts + 8 * 32 + 4ll * spec.top_k + 4 + 8;  // (+ alignment)
}

ResidentConfig pick_resident(const MoeSpec& spec, int grid, int k_part1, int window, int warps,
                             int chains1, int chains2, bool packed2, bool block_route) {
  ResidentConfig c;
  c.chains1 = chains1;
  c.chains2 = chains2;
  c.packed2 = packed2;
  if (warps > 0) {
    if (warps != 8 && warps != 16 && warps != 32)
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("MOEJIT_PLAN_OVERRIDE: rw={} (the resident layer's warps) must be "
                              "8, 16 or 32", warps));
    c.warps = warps;
  }
  const long long H = spec.hidden, I = spec.intermediate;
  if (!spec.finalize || H % 256 != 0 || I % 256 != 0 || spec.top_k > 32 || grid <= 0) return c;
  // Gemm1's weights in two parts of H / 2 (where that is a multiple of 256), the second issued
  // once the first has landed, and gemm2's once the second has: DRAM then delivers each part
  // while the warps consume the one before, where copies issued all at once land all at the end
  // (H200, bench/RESULTS.md section 19: kimi-k2-tp8 20.0 us against 22.3 with seven parts three
  // in flight, qwen3-30b-a3b 17.3 against 19.3 with four parts two in flight).
  c.units1 = static_cast<int>((spec.top_k * (I / 8) + grid - 1) / grid);
  // 32 warps where gemm1 has more (unit, chain) items than 16 warps take in one round (H200,
  // bench/RESULTS.md section 19f: qwen3-30b-a3b's 24 items 17.5 against 17.8 us in two runs;
  // kimi-k2-tp8's 8 items were 21.0 against 20.1 with 32 warps).
  if (warps == 0 && c.units1 * chains1 > 16) c.warps = 32;
  int kp = H % 512 == 0 ? static_cast<int>(H / 2) : static_cast<int>(H);
  if (k_part1 > 0) {
    if (k_part1 % 256 != 0 || H % k_part1 != 0)
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("MOEJIT_PLAN_OVERRIDE: rkp={} (the resident layer's gemm1 K part) "
                              "must be a multiple of 256 that divides H = {}", k_part1, H));
    kp = k_part1;
  }
  // One thread issues each copy: 2 per gemm1 part and unit, 2 scale copies per unit, 2 per slot;
  // at most 30 parts (the kernel's mbarriers).
  if (H / kp > 30 || c.units1 * (2 * H / kp + 2) + 2 * spec.top_k > c.threads()) return c;
  c.k_part1 = kp;
  c.window = window > 0 ? static_cast<int>(std::min<long long>(window, H / kp)) : 1;
  c.units2 = static_cast<int>((H / 8 + grid - 1) / grid);
  if (spec.weight_format == WeightFormat::MxInt4G32Tiled) {
    // Tiled w2: each block's units inside one 64-row block of the layout (moejit_resident.cuh).
    const long long blocks = H / moejit_dev::kTiledRowsW2;
    if (blocks > grid) return c;
    const long long parts = std::min<long long>(8, grid / blocks);
    c.units2 = static_cast<int>((8 + parts - 1) / parts);
  }
  if (8 * c.units2 > 256) return c;  // one TMA box of a slot's rows
  c.smem = resident_smem_bytes(spec, c);
  // 227 KiB per block on sm_90: the dynamic part, its 1 KiB alignment slack, and the static part
  // (mbarriers, routing ids and weights, grouped DeepSeekV3's scores, with room to spare).
  const bool grouped = spec.routing == RoutingMethod::DeepSeekV3 && spec.n_group > 1;
  const long long static_bytes =
      8 * (H / kp + 1) + 8ll * spec.top_k + (grouped ? 4ll * spec.num_experts + 5 * spec.n_group : 0) + 256;
  // The whole block routes where its static shared memory fits too, else warp 0.
  c.block_route = block_route && c.warps <= 16 &&
                  c.smem + 1024 + static_bytes + block_route_smem_bytes(spec) <= 227 * 1024;
  if (c.smem + 1024 + static_bytes > 227 * 1024) return c;
  c.grid = grid;
  return c;
}

std::string plan_override() {
  const char* v = std::getenv("MOEJIT_PLAN_OVERRIDE");
  return v ? v : "";
}

OverrideItems parse_plan_override(const std::string& text) {
  // Every key make_plan and the code generator (tl) read, and the form of its value; a new
  // override key goes here too.
  enum Form { kFlag, kNumber, kShape, kStreamShape, kAddress };
  static const std::map<std::string, Form> keys = {
      {"big", kFlag},    {"bo", kFlag},     {"bps", kNumber},    {"bps1", kNumber}, {"bps2", kNumber},
      {"brt", kFlag},    {"bst", kNumber},  {"bt", kNumber},     {"bw", kNumber},  {"ch", kFlag},
      {"chk2", kNumber}, {"chpo", kFlag},   {"chx", kFlag},      {"dyn", kFlag},   {"dyn1", kFlag},
      {"dyn2", kFlag},   {"ef", kFlag},     {"eu", kFlag},       {"f16", kFlag},   {"f16a", kFlag},
      {"ff", kFlag},     {"fr", kFlag},     {"fth", kNumber},    {"g1", kShape},   {"g2", kShape},
      {"gc", kFlag},     {"gc2", kFlag},    {"gcr", kNumber},    {"ids", kNumber}, {"idw", kFlag},
      {"mb1", kNumber},  {"mb2", kNumber},  {"pack", kFlag},     {"rdw", kNumber}, {"res", kFlag},
      {"rkp", kNumber},  {"rw", kNumber},   {"rwin", kNumber},   {"s1", kStreamShape},
      {"s2", kStreamShape}, {"sd", kFlag},  {"sep", kFlag},      {"sns", kNumber}, {"stream", kFlag},
      {"tl", kAddress},  {"tma", kFlag},    {"tma1", kFlag},     {"tma2", kFlag},  {"trd", kFlag},
      {"u1", kNumber},   {"u2", kNumber},   {"uf", kFlag},       {"xb", kFlag}};
  // (Numbers of at most 9 digits fit an int; shapes' parts as well.)
  static const std::regex forms[] = {std::regex("0|1"), std::regex("[0-9]{1,9}"),
                                     std::regex("[0-9]{1,4}x[0-9]{1,6}x[0-9]{1,4}"),
                                     std::regex("[0-9]{1,4}x[0-9]{1,6}x[0-9]{1,4}(x[0-9]{1,4})?"),
                                     std::regex("0x[0-9a-fA-F]{1,16}")};
  static const char* const form_names[] = {"0 or 1", "a number (at most 9 digits)", "AxBxC",
                                           "AxBxC or AxBxCxD", "a hex address 0x..."};
  static const std::regex item("[^,;\\s]+");
  OverrideItems items;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), item); it != std::sregex_iterator(); ++it) {
    const std::string kv = it->str();
    const size_t eq = kv.find('=');
    const auto key = keys.find(kv.substr(0, eq));
    if (eq == std::string::npos || eq == 0 || key == keys.end()) {
      std::string known;
      for (const auto& [name, form] : keys) known += (known.empty() ? "" : " ") + name;
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("MOEJIT_PLAN_OVERRIDE: '{}' is not KEY=VALUE with a known key (known: {})",
                              kv, known));
    }
    const std::string value = kv.substr(eq + 1);
    if (!std::regex_match(value, forms[key->second]))
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("MOEJIT_PLAN_OVERRIDE: '{}': {} takes {}", kv, key->first,
                              form_names[key->second]));
    if (!items.emplace(key->first, value).second)
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("MOEJIT_PLAN_OVERRIDE: '{}': {} is given twice", kv, key->first));
  }
  return items;
}

std::optional<std::string> plan_override_value(const char* key) {
  const OverrideItems items = parse_plan_override(plan_override());
  const auto it = items.find(key);
  if (it == items.end()) return std::nullopt;
  return it->second;
}

MoeSpec kernel_spec(const MoeSpec& spec) {
  MoeSpec k = spec;
  if (spec.weight_format == WeightFormat::MxInt4G32Tiled) {
    const TiledWeightBytes t = tiled_weight_bytes(spec);
    k.hidden = t.hidden;
    k.intermediate = t.intermediate;
  }
  return k;
}

Plan make_plan(const MoeSpec& given, int max_tokens, const std::string& arch) {
  given.validate();
  if (max_tokens < 0)
    throw Error(ErrorKind::InvalidArgument,
                fmt::format("max_tokens = {} is negative (0 compiles every token bucket)",
                            max_tokens));
  Plan plan;
  plan.layer_spec = given;
  plan.spec = kernel_spec(given);
  const MoeSpec& spec = plan.spec;
  plan.max_tokens = max_tokens;
  const int local = spec.local_experts();
  // The fused route+dispatch block (buckets of at most 16 tokens): 16 warps, one token each, or
  // 8 where 16 would take more than 44 KiB of static shared memory (per warp: grouped
  // DeepSeekV3's score and group rows, dispatch's per-warp counts). H200 (bench/RESULTS.md
  // section 11): at 16 tokens 16 warps beat 8 by 1-2 us; at one token they tie.
  const bool grouped = spec.routing == RoutingMethod::DeepSeekV3 && spec.n_group > 1;
  long long fused_smem = 0;
  for (const long long w : {16, 8}) {
    const long long smem = (grouped ? w * (4 * spec.num_experts + 5 * spec.n_group) : 0) +
                           4ll * (4 * local + 1) + 2 * w * local + 4ll * 64 * spec.top_k +
                           648;  // dispatch_small's list
    if (smem <= 44 * 1024) {
      plan.route_dispatch_warps = static_cast<int>(w);
      fused_smem = smem;
      break;
    }
  }
  const OverrideItems overrides = parse_plan_override(plan_override());
  // The value of "key=value" in the override, if the key is there (its form already checked).
  auto value_text = [&](const char* key) -> std::optional<std::string> {
    const auto it = overrides.find(key);
    if (it == overrides.end()) return std::nullopt;
    return it->second;
  };
  // A 0|1 switch of the override ("key=0" / "key=1"), else fallback; any other value is an error.
  auto flag_of = [&](const char* key, bool fallback, const char* what) {
    const auto v = value_text(key);
    if (!v) return fallback;
    if (*v != "0" && *v != "1")
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("MOEJIT_PLAN_OVERRIDE: {}={} ({}) must be 0 or 1", key, *v, what));
    return *v == "1";
  };
  // One of a few numbers ("key=N"), else fallback; any other value is an error.
  auto choice_of = [&](const char* key, std::initializer_list<int> allowed, int fallback, const char* what) {
    const auto v = value_text(key);
    if (!v) return fallback;
    for (const int n : allowed)
      if (*v == std::to_string(n)) return n;
    throw Error(ErrorKind::InvalidArgument,
                fmt::format("MOEJIT_PLAN_OVERRIDE: {}={} ({}) must be one of {}", key, *v, what,
                            fmt::join(allowed, ", ")));
  };
  // Tuning: at most this many warps in the fused route+dispatch block.
  if (const int w = choice_of("rdw", {8, 16}, 0, "route+dispatch warps"); w > 0 && plan.route_dispatch_warps > 0)
    plan.route_dispatch_warps = std::min(plan.route_dispatch_warps, w);
  // H200, bench/RESULTS.md section 15: the general dispatch block took 2.9 us of a one-token
  // kimi-k2-tp8 layer.
  if (!flag_of("sd", true, "the small dispatch")) plan.small_dispatch = false;
  // The fused block routes one token with all its warps only where the routing's shared memory
  // fits beside the dispatch's in 44 KiB (the resident blocks decide for themselves).
  // (Not Precomputed or grouped DeepSeekV3 routing: route_token_block does not serve them.)
  plan.block_route = flag_of("brt", spec.num_experts > 4 * 32, "one token routed by the whole block") &&
                     spec.routing != RoutingMethod::Precomputed && !grouped;
  plan.fused_block_route =
      plan.block_route && fused_smem + block_route_smem_bytes(spec) <= 44 * 1024;
  plan.finalize_threads = choice_of("fth", {32, 64, 128}, plan.finalize_threads, "finalize threads");
  if (value_text("ef"))
    plan.evict_first = flag_of("ef", false, "weights with an L2 evict-first policy") ? 1 : 0;
  const bool resident_wanted = flag_of("res", true, "the resident one-token layer");
  const bool big_wanted = flag_of("big", true, "the big-tile GEMMs");
  // The stream family's conditions on the shape and the card; "stream=0" turns it off. Where it
  // takes a layer (stream_takes) it runs every bucket up to 512 tokens with 8-row tiles, however
  // many rows an expert gets: an expert with more rows takes more tiles, each of which streams its
  // weights again, and still measured faster than the older family's 16- to 64-row tiles at every
  // token count and shape tried but one (H200, bench/RESULTS.md section 53: 1.3-2.5x for the
  // presets at 129-512 tokens; 2.3x at 24 tokens for 32 experts at top-8, 1.0-1.3x at 192-512;
  // Mixtral's 8 experts at top-2 1.8x at 48 tokens, 1.0x at 512; 32 experts at 448 tokens 2%
  // slower, at 112 rows per expert). It also takes 513-1024 tokens where an expert gets at most
  // 128 rows at 1024 (split_513; section 53: the presets 1.1-2.6x faster there, 64 experts at
  // top-6 1.1x); elsewhere 513 up is one older-family bucket. Where the stream family does not
  // take the layer, the older family's tile holds each bucket's rows per expert, and 129-512 is
  // one bucket.
  const bool stream_fits = arch_is_90(arch) && spec.hidden % 256 == 0 && spec.intermediate % 256 == 0;
  const bool stream_wanted = !value_text("stream") || flag_of("stream", true, "the stream family");
  const bool stream_takes = stream_fits && stream_wanted;
  auto rows_per_expert_at = [&](long long top) { return (top * spec.top_k + local - 1) / local; };
  const bool split_513 = stream_takes && rows_per_expert_at(1024) <= 128;
  for (auto [lo, hi] : bucket_ranges()) {
    if (max_tokens > 0 && lo > max_tokens) break;
    if (lo == 257 && !stream_takes) continue;
    if (lo == 129 && !stream_takes) hi = 512;
    if (lo == 1025 && !split_513) continue;
    if (lo == 513 && !split_513) hi = 0;
    Bucket b;
    b.min_tokens = lo;
    b.max_tokens = hi;
    // A stream bucket: 8-row tiles. Else the older family's tile holds the rows per expert.
    b.stream = stream_takes && hi != 0 && hi <= 1024;
    const long long rows_per_expert = rows_per_expert_at(hi == 0 ? 4096 : hi);
    b.tile_rows = 8;
    while (!b.stream && b.tile_rows < 64 && b.tile_rows < rows_per_expert) b.tile_rows *= 2;
    b.gemm1 = pick_gemm(spec.intermediate, spec.hidden, b.tile_rows, true);
    b.gemm2 = pick_gemm(spec.hidden, spec.intermediate, b.tile_rows, false);
    // The older family's 64-row buckets on sm_90 take the big-tile GEMMs (both or neither):
    // tiles of "bt=" 64 (default) or 128 rows, "bst=" stages (default 4), "big=0" off.
    if (!b.stream && b.tile_rows == 64 && arch_is_90(arch) && big_wanted) {
      const int tile = choice_of("bt", {64, 128}, 64, "big-tile rows");
      const int stages = choice_of("bst", {3, 4, 5, 6}, 4, "big-tile stages");
      // 32 weight rows per warp at two blocks per SM (H200, bench/RESULTS.md section 55h: 9-12%
      // faster than 64 at one block per SM at 2048-8192 tokens); 64 where two blocks' shared
      // memory does not fit (128-row tiles), or with "bw=64".
      const int warp_rows = choice_of("bw", {32, 64}, 32, "big-tile weight rows per warp");
      auto pick = [&](int n, int k, bool swiglu) {
        GemmConfig c = pick_big(n, k, tile, swiglu, stages, warp_rows);
        return c.big || warp_rows == 64 ? c : pick_big(n, k, tile, swiglu, stages, 64);
      };
      const GemmConfig g1 = pick(spec.intermediate, spec.hidden, true);
      const GemmConfig g2 = pick(spec.hidden, spec.intermediate, false);
      if (g1.big && g2.big) {
        b.tile_rows = tile;
        b.gemm1 = g1;
        b.gemm2 = g2;
        b.gemm1.big_tile_major = b.gemm2.big_tile_major = flag_of("bo", true, "big tiles tile-major");
      }
    }
    // Stream family (the conditions above): measured on an H200 against the older family,
    // bench/RESULTS.md section 9 (kimi-k2 16-22% faster at 1-64 tokens, kimi-k2-tp8 5-10%,
    // qwen3-30b-a3b at 1 and 64 tokens; 5% slower for qwen3 at 8), section 50 (65-128 tokens:
    // kimi-k2 2.2-2.4x, qwen3-30b-a3b 2.1-2.6x), section 52 (129-256: kimi-k2 2.2-2.5x,
    // kimi-k2-tp8 2.2-2.3x, deepseek-v3 2.0-2.4x) and section 53 (the rest). Only up to 1024
    // tokens (what was measured) and only sm_90 (the Hopper family it was tuned and validated on).
    if (b.stream) {
      // The bucket's largest token count a launch can have (hi of a stream bucket is finite).
      const int top_tokens = max_tokens > 0 ? std::min(hi, max_tokens) : hi;
      // 64-row units: measured on an H200 against 32-row ones (bench/RESULTS.md section 11),
      // faster at 1-64 tokens for kimi-k2 (8-13% at 8-64), qwen3-30b-a3b and kimi-k2-tp8 except
      // where they leave blocks idle. Gemm1 also carries the smaller unit sizes that some token
      // count of the bucket would take on a 132-SM card's persistent grid (choose_unit_rows):
      // kimi-k2-tp8 at one token takes 16-row units (256 of them; 30.3 -> 27.5 us against
      // 32-row units, section 10), at two tokens 32-row ones, like qwen3-30b-a3b (section 14).
      // Weights and scales by TMA with one producer warp (H200, bench/RESULTS.md section 13:
      // 2-10% faster than 16-byte cp.async by four producer warps at 8 tokens, 1-6% at one
      // for kimi-k2 and kimi-k2-tp8; section 14 for 17-64 tokens). "tma=0" selects cp.async;
      // "bps=N", "bps1=N", "bps2=N": blocks per SM of the TMA GEMMs (3: rings of at most
      // 64 KiB).
      // Since gemm2 runs at three blocks per SM, TMA is the default in every stream bucket:
      // at 17-64 tokens gemm2 by TMA was 11% faster for kimi-k2-tp8 and 1-6% for qwen3-30b-a3b
      // and kimi-k2 at 33 tokens, and gemm1 by TMA on top of it another 1-8% for all three
      // (H200, bench/RESULTS.md section 14). "tma1=0|1" / "tma2=0|1" set one GEMM only.
      // "tma=0|1" (1: the default), "tma1=0|1", "tma2=0|1"; any other value is an error.
      auto tma_of = [&](const char* key, bool fallback) { return flag_of(key, fallback, "TMA copies"); };
      const bool tma = tma_of("tma", true);
      const bool tma1 = tma_of("tma1", tma), tma2 = tma_of("tma2", tma);
      // "bps=N" sets the blocks per SM of both GEMMs where they copy by TMA, "bps1=N" / "bps2=N"
      // one of them (cp.async GEMMs stay at two: with four producer warps, 256-thread blocks
      // leave too few registers at three).
      auto blocks_per_sm = [&](const char* key, int fallback, bool with_tma) {
        const auto v = value_text(key);
        if (!v) return fallback;
        // Four only for gemm2 (its 256-deep stages; gemm1's would be too shallow).
        const bool four = std::string(key) == "bps2" && *v == "4";
        if (*v != "2" && *v != "3" && !four)
          throw Error(ErrorKind::InvalidArgument,
                      fmt::format("MOEJIT_PLAN_OVERRIDE: {}={} (stream blocks per SM) must be 2 "
                                  "or 3{}", key, *v, std::string(key) == "bps2" ? " (or 4)" : ""));
        return with_tma ? std::stoi(*v) : 2;
      };
      // Gemm2 of the TMA buckets at three blocks per SM (H200, bench/RESULTS.md section 14:
      // layers 1-4% faster at 8 and 16 tokens for kimi-k2, qwen3-30b-a3b and kimi-k2-tp8, and
      // at one token for the latter two; kimi-k2 at one token ~1 us slower); gemm1 at two (at
      // three its stages shrink from 512 to 256 deep: 2-16% slower, except for qwen3-30b-a3b at
      // one token).
      const int bps1 = blocks_per_sm("bps", 2, tma1), bps2 = blocks_per_sm("bps", tma2 ? 3 : 2, tma2);
      b.s1 = pick_stream(spec.hidden, true, 64, tma1, blocks_per_sm("bps1", bps1, tma1));
      b.s2 = pick_stream(spec.intermediate, false, 64, tma2, blocks_per_sm("bps2", bps2, tma2));
      // Gemm2's x by 4-row TMA boxes (x_boxes) in buckets above 16 tokens whose gemm2 units are
      // at most three stages deep; elsewhere one bulk copy per valid row and plane. H200
      // (bench/RESULTS.md section 17): with boxes kimi-k2-tp8 (one-stage units) took 197.0 /
      // 271.2 us at 33 / 64 tokens against 199.6 / 277.9, qwen3-30b-a3b (three) 114.3 against
      // 115.8 at 64; kimi-k2 (eight) was slower at every token count (1211 against 1173 us at
      // 33: a 4-row box reads 4 KiB of x per stage where its 1-2 row tiles need 1-2), and all
      // three were 0.2-3 us slower at 1-8 tokens. And only where the bucket's largest token count
      // gives a touched expert 3 rows or more on average (uniform routing), so that a box is
      // mostly valid rows: kimi-k2-tp8 (1.8 rows at 64 tokens) measured 1-2 us faster without
      // boxes at 17-33 tokens and 48, within 1 us at 40, 56 and 64 (H200, bench/RESULTS.md
      // section 22); qwen3-30b-a3b (4.1 rows) keeps them (without: 0.4-0.9 us faster at 17-33
      // tokens, 0.6-2.3 slower at 48-64). "xb=0|1" overrides.
      const bool short_units = (spec.intermediate + b.s2.k_stage - 1) / b.s2.k_stage <= 3;
      const double slots = static_cast<double>(top_tokens) * spec.top_k, experts = spec.num_experts;
      const double touched = experts * (1.0 - std::pow(1.0 - spec.top_k / experts, top_tokens));
      const bool full_boxes = slots >= 3.0 * touched;
      const bool xb2 = flag_of("xb", tma2 && lo > 16 && short_units && full_boxes, "gemm2 x by 4-row TMA boxes");
      // Gemm2 at four blocks per SM (two 256-deep stages, 96 registers) where it copies tiled
      // weights by TMA and its units are at most three stages deep (with row-major weights
      // some of these kernels spill at 96 registers). H200 (bench/RESULTS.md section 31; four /
      // three): qwen3-30b-a3b 25.2 / 25.7 us at 2 tokens, 64.8 / 65.5 at 16, 78.3 / 79.0 at 24,
      // 101.4 / 104.9 at 64, the same at 8; kimi-k2-tp8 60.9 / 62.3 at 8, 185.2 / 188.2 at 33,
      // 251.6 / 258.9 at 64; kimi-k2-tp4 306.2 / 314.8 at 33, 435.0 / 448.6 at 64; kimi-k2
      // (eight-stage units) 1-4 us slower at 8-16. A short unit's fixed costs (its tables, the
      // reduction, the epilogue) are latency that more blocks per SM overlap; the ring's depth
      // did not matter (two stages measured as three). "bps=N" / "bps2=N" override.
      // (blocks_per_sm returns the fallback, 0, where neither key is given.)
      const bool four2 = tma2 && short_units && spec.weight_format == WeightFormat::MxInt4G32Tiled &&
                         blocks_per_sm("bps2", blocks_per_sm("bps", 0, true), true) == 0;
      if (four2 || xb2 != b.s2.x_boxes)
        b.s2 = pick_stream(spec.intermediate, false, 64, tma2, four2 ? 4 : blocks_per_sm("bps2", bps2, tma2), xb2);
      // Gemm1 also carries every smaller unit size some token count of the bucket takes on a
      // 132-SM card.
      StreamConfig all = b.s1;
      set_unit_paths(all, 16 | 32, spec.hidden, true);
      int alt = 0;
      for (int t = lo; t <= top_tokens; ++t) {
        const int rows = choose_unit_rows(all, spec, true, t, 132ll * b.s1.min_blocks);
        if (rows < b.s1.unit_rows) alt |= rows;
      }
      set_unit_paths(b.s1, alt, spec.hidden, true);
      // Units taken from a counter (dynamic_units) where the bucket's smallest token count gives
      // a GEMM more units than a 132-SM card's persistent grid has blocks, or for units of one
      // stage (K = k_stage), whose hand-off lies between every two stages, more than four
      // rounds. H200 (bench/RESULTS.md section 16): 1-7% faster at 8-64 tokens, kimi-k2's gemm2
      // at one token (896 units for 396 blocks) 3 us faster; where one token gives a GEMM one
      // round of units (qwen3-30b-a3b's both, kimi-k2-tp8's gemm1) the kernel that takes units
      // from the counter was 0.4-1 us slower at one and two tokens, and kimi-k2-tp8's gemm2
      // (one stage per unit, 2.3 rounds) 0.1-0.8 us.
      auto dynamic = [&](long long units, int k, int k_stage, long long grid) {
        return units > ((k + k_stage - 1) / k_stage > 1 ? 1 : 4) * grid;
      };
      // Also where the bucket's largest token count gives a GEMM more than two rounds: dealt
      // round-robin, blocks then idle for up to a unit at the end (H200, bench/RESULTS.md section
      // 22, the 1-16 bucket: kimi-k2-tp8 4-9 us faster at 8-16 tokens, qwen3-30b-a3b 0.5-1.7, and
      // 0.1-0.7 us slower at 2-4 tokens; the finalized layers' one token runs the resident layer,
      // an unfinalized one's takes units from the counter too: 0.4-1 us slower in section 16).
      const long long grid1 = 132ll * b.s1.min_blocks, grid2 = 132ll * b.s2.min_blocks;
      auto units_at = [&](bool g1, int t, long long grid) {
        const int rows = g1 ? choose_unit_rows(b.s1, spec, true, t, grid) : b.s2.unit_rows;
        return stream_units(spec, g1, rows, t);
      };
      const int rows1 = choose_unit_rows(b.s1, spec, true, lo, grid1);
      b.s1.dynamic_units = dynamic(units_at(true, lo, grid1), spec.hidden, b.s1.k_stage_for(rows1), grid1) ||
                           units_at(true, top_tokens, grid1) > 2 * grid1;
      b.s2.dynamic_units = dynamic(units_at(false, lo, grid2), spec.intermediate, b.s2.k_stage, grid2) ||
                           units_at(false, top_tokens, grid2) > 2 * grid2;
      // Gemm2 keeps 64-row units only: with the 32-row path compiled in, qwen3-30b-a3b took
      // 1 us longer at 1-3 tokens, whether or not a launch took it (H200, section 14).
      // Dynamic units fetched early (StreamConfig::early_fetch; H200, bench/RESULTS.md section
      // 22: qwen3-30b-a3b 2-3 us faster at 33-64 tokens, the others within their spread).
      // The float count is exact below 2^24, and the counter's values stay below a launch's
      // units (a take at or past them ends the block's loop): bound those (row tiles at most
      // P / 8 + E, units at least 8 weight rows of the larger GEMM), at the bucket's own top: a plan
      // accepts launches up to it even where max_tokens is lower (Plan::bucket_for). "uf=1" cannot
      // force it past the bound.
      const long long max_units =
          (static_cast<long long>(hi) * spec.top_k / 8 + spec.local_experts()) *
          (std::max(2 * spec.intermediate, spec.hidden) / 8);
      b.s1.early_fetch = b.s2.early_fetch =
          flag_of("uf", true, "dynamic units fetched early") && max_units < (1 << 24);
      // Weights and scales copied with an L2 evict-first policy (StreamConfig::evict_first) where
      // some launch of the bucket takes it (evict_first_for; the rule holds at the bucket's
      // smallest token count if at any, since it only switches off as tokens grow).
      {
        const bool ef = plan.evict_first == 1 || (plan.evict_first < 0 && evict_first_rule(spec, lo));
        b.s1.evict_first = ef && b.s1.tma;
        b.s2.evict_first = ef && b.s2.tma;
      }
    }
    if (!overrides.empty() && b.tile_rows == 8) {
      apply_override(overrides, "g1", spec.intermediate, spec.hidden, b.tile_rows, b.gemm1);
      apply_override(overrides, "g2", spec.hidden, spec.intermediate, b.tile_rows, b.gemm2);
      if (b.stream) {
        apply_unit_override(overrides, true, spec.hidden, b.s1);
        apply_unit_override(overrides, false, spec.intermediate, b.s2);
        apply_stream_override(overrides, "s1", spec.hidden, true, b.s1);
        apply_stream_override(overrides, "s2", spec.intermediate, false, b.s2);
        // (The hint is a 32-bit count of ns; at most 9 digits, below one second.)
        if (const auto sns = value_text("sns")) b.s1.suspend_ns = b.s2.suspend_ns = std::stoi(*sns);
        if (!flag_of("pack", true, "gemm2's hi and lo planes packed")) b.s2.pack_planes = false;
        if (!flag_of("sep", true, "the split epilogue")) b.s1.split_epilogue = b.s2.split_epilogue = false;
        if (value_text("dyn")) b.s1.dynamic_units = b.s2.dynamic_units = flag_of("dyn", true, "dynamic units");
        b.s1.dynamic_units = flag_of("dyn1", b.s1.dynamic_units, "gemm1's dynamic units");
        b.s2.dynamic_units = flag_of("dyn2", b.s2.dynamic_units, "gemm2's dynamic units");
      }
    }
    // Decode: the last gemm2 block of a token sums its rows, saving the finalize launch.
    // (Not with the stream family: its units would stall on the fence and atomic; measured.)
    b.fused_finalize = spec.finalize && !b.stream && b.gemm2.direct_x;
    if (b.tile_rows == 8 && !flag_of("ff", true, "the older family's fused finalize"))
      b.fused_finalize = false;
    // Up to 16 tokens one block routes (a token per warp) and dispatches, when the two kernels'
    // static shared memory fits in one block (see route_dispatch_warps). Above, routing on one
    // SM costs more than the launch it saves: H200, 64 tokens, ncu: the fused block 33 us with 8
    // warps, 21.6 with 32 (it issues ~1300 warp-instructions per token on one SM), against
    // route 4.8 us (16 blocks) + dispatch 7.0; layer times in bench/RESULTS.md section 11.
    b.fused_route = hi != 0 && hi <= 16 && plan.route_dispatch_warps > 0;
    if (!flag_of("fr", true, "the fused route+dispatch block")) b.fused_route = false;
    // Gemm1 plans its blocks' first units from the routed ids and copies them before its wait
    // for dispatch (StreamConfig::early_unit): at 17-64 tokens DRAM otherwise idles from the
    // route kernel's start to gemm1's first copy, ~8 us, 3.6 of them dispatch's (H200,
    // bench/RESULTS.md section 18). Behind the fused route+dispatch block gemm1 reads the ids
    // once the block's word says they are written (RouteDispatchParams::routed), about 2 us
    // before the block ends (section 24). "eu=0|1" overrides.
    if (b.stream && b.s1.tma && b.s1.dynamic_units)
      b.s1.early_unit = flag_of("eu", true, "gemm1's first unit before its wait");
    // Up to Plan::routed_id_slots routed slots gemm1 reads the ids packed beside the fused
    // block's word (StreamConfig::routed_ids). "idw=0|1" overrides.
    b.s1.routed_ids = flag_of("idw", true, "routed ids packed beside the fused block's word");
    // Gemm2 per tile behind gemm1 (StreamConfig::tile_ready) where both GEMMs copy by TMA, up to
    // 16 tokens, and above where gemm2's units are more than one stage. H200 (bench/RESULTS.md
    // section 21): kimi-k2 2-3% faster at 1-16 tokens and 1-3% at 33-64, qwen3-30b-a3b and
    // kimi-k2-tp8 1-4% at 2-16; at 33-64 qwen3-30b-a3b (three-stage units) within 0.4 us and
    // kimi-k2-tp8 (one stage) 2-4% slower. "trd=0|1" overrides.
    const bool multi_stage2 = (spec.intermediate + b.s2.k_stage - 1) / b.s2.k_stage > 1;
    if (b.stream && b.s1.tma && b.s2.tma)
      b.s1.tile_ready = b.s2.tile_ready =
          flag_of("trd", b.fused_route || multi_stage2, "gemm2 per tile behind gemm1");
    // Gemm1's units whose tile has one or two valid rows with the stage's groups as MMA columns
    // (StreamConfig::group_cols; its 64-row, 512-deep path in whole stages, so not where an
    // "s1=" override sets 512-deep stages over an H that is not a multiple of 512; a chain's
    // gemm1 inherits it). "gc=0|1" overrides.
    if (b.stream && b.s1.tma && b.s1.split_epilogue && b.s1.consumer_warps == 4 && b.s1.k_stage == 512 &&
        spec.hidden % b.s1.k_stage == 0 && spec.weight_format == WeightFormat::MxInt4G32Tiled)
      b.s1.group_cols = flag_of("gc", true, "group columns for gemm1's one-row tiles") ? 2 : 0;
    // Gemm1 takes tiles of up to two valid rows (x row 1 in the MMA's columns 4-7); "gcr=1"
    // keeps it to one-row tiles.
    if (b.s1.group_cols > 0)
      b.s1.group_cols = choice_of("gcr", {1, 2}, b.s1.group_cols, "gemm1's most rows with group columns");
    // The same for gemm2's packed units (bf16 operands; 256- or 512-deep whole stages, e.g. not
    // "s2=4x512x2" over qwen3-30b-a3b's I = 768; a chain's gemm2 inherits it where its operands
    // stay bf16). "gc2=0|1" overrides.
    if (b.stream && b.s2.tma && b.s2.split_epilogue && b.s2.consumer_warps == 4 && b.s2.pack_planes &&
        (b.s2.k_stage == 256 || b.s2.k_stage == 512) && spec.intermediate % b.s2.k_stage == 0 &&
        spec.weight_format == WeightFormat::MxInt4G32Tiled)
      b.s2.group_cols = flag_of("gc2", true, "group columns for gemm2's one-row tiles") ? 1 : 0;
    // One token of a finalized layer whose routed weights fit in the grid's shared memory: the
    // resident layer (one launch; bench/RESULTS.md section 19). "res=0|1" overrides.
    // one_token_resident: the finalized layer of this shape has one (an unfinalized layer's
    // chain then leaves it one token: Bucket::chain_min_tokens).
    bool one_token_resident = false;
    if (b.stream && lo == 1 && resident_wanted) {
      // "rkp=N", "rwin=N", "rw=N": gemm1's K part, the parts in flight, the warps.
      auto value_of = [&](const char* key) {
        const auto v = value_text(key);
        return v ? std::stoi(*v) : 0;
      };
      MoeSpec finalized = spec;
      finalized.finalize = true;
      const ResidentConfig res = pick_resident(finalized, 132, value_of("rkp"), value_of("rwin"), value_of("rw"),
                                               b.s1.consumer_warps, b.s2.consumer_warps, b.s2.pack_planes,
                                               plan.block_route);
      one_token_resident = res.grid > 0;
      if (spec.finalize) b.res = res;
    }
    // Both GEMMs as one chain kernel: a block streams its gemm1 units, then gemm2's, through
    // gemm1's ring (slots of gemm1's stage), so that gemm2 starts as each block's gemm1 ends.
    // Gemm2's stage is the deepest (512 or 256) that fits in a slot with both x planes; where
    // none is deeper than 256 but a 512-deep one with one plane would fit (packed units: tiles
    // of at most 4 valid rows), that one, for launches of at most 4 tokens.
    // By default only where gemm2's stages are 512 deep and its units at least two of them, and
    // gemm1's 64-row units fill the grid at the bucket's smallest token count (H200,
    // bench/RESULTS.md section 26: kimi-k2 at 1 / 2 / 4 tokens 60.0-60.5 / 105.9-106.3 / 181.2-181.8
    // us against 62.0-62.6 / 108.8-109.3 / 183.3-184.2, deepseek-v3 62.5 / 108.7 / 202.4 against
    // 64.0 / 110.2 / 202.1; slower with 256-deep gemm2 stages: qwen3-30b-a3b +1.3 / +3.8 / +8 us
    // at 16 / 33 / 64 tokens, kimi-k2-tp8 +1.5 to +4 at 2-16, kimi-k2 +13 / +28 at 8 / 16; and
    // kimi-k2-tp4, whose gemm1 takes smaller units at one token and whose gemm2 units are one
    // stage, +3.6 to +5.4 at 1 and 4). "ch=0|1" overrides (1: wherever it fits);
    // "chk2=256|512" forces gemm2's depth, "chpo=0|1" one plane or two.
    if (b.stream && b.s1.tma && b.s2.tma && b.s1.dynamic_units && b.s2.dynamic_units &&
        b.s1.tile_ready && b.s2.pack_planes && b.s1.consumer_warps == b.s2.consumer_warps) {
      StreamConfig c1 = b.s1, c2 = b.s2;
      c1.unit_rows = c2.unit_rows = 64;
      c1.k_stage = pick_stream(spec.hidden, true, 64, true, 2).k_stage;
      c2.x_boxes = false;
      c1.alt_rows = c2.alt_rows = 0;
      c1.k_stage16 = c1.k_stage32 = c2.k_stage16 = c2.k_stage32 = 0;
      c1.min_blocks = c2.min_blocks = 2;
      c2.early_unit = false;
      const int slot1 = stream_stage_bytes(c1, true);
      auto fits = [&](int k_stage, bool packed_only) {
        StreamConfig t = c2;
        t.k_stage = k_stage;
        t.packed_only = packed_only;
        return spec.intermediate % k_stage == 0 && (k_stage / 64) % t.consumer_warps == 0 &&
               stream_stage_bytes(t, false) <= slot1;
      };
      const int forced_k = choice_of("chk2", {256, 512}, 0, "the chain's gemm2 k_stage");
      const bool forced_po = value_text("chpo").has_value();
      int k2 = 0;
      bool po = false;
      for (const int k : {512, 256}) {
        if (forced_k && k != forced_k) continue;
        for (const bool one : {false, true}) {
          if (forced_po && one != flag_of("chpo", false, "the chain's gemm2 with one x plane")) continue;
          if (!forced_po && one && k == 256) continue;  // two planes fit wherever one does at 256
          if (k2 == 0 && fits(k, one)) {
            k2 = k;
            po = one;
          }
        }
      }
      const bool faster = k2 == 512 && spec.intermediate >= 2 * k2 &&
                          choose_unit_rows(b.s1, spec, true, lo, 132ll * b.s1.min_blocks) == 64;
      if (k2 > 0 && (c1.k_stage / 64) % c1.consumer_warps == 0 && (!po || lo <= 4) &&
          flag_of("ch", faster, "both GEMMs as one chain kernel")) {
        c2.k_stage = k2;
        c2.packed_only = po;
        // fp16 operands (StreamConfig::f16) in gemm1 where gemm2's units are all packed, the
        // fused block can publish x's conversion on its word and w13's nibbles lie in pair order;
        // in gemm2 too only with "f16a=1": there its per-block words cost about what its
        // cheaper dequantisation saves (H200, bench/RESULTS.md section 37k: kimi-k2 at one token
        // 55.1 / 55.1 us with gemm1's alone, 55.3 / 55.1 with both, 56.7 / 56.9 with neither).
        // "f16=0|1" overrides.
        c1.f16 = po && b.fused_route && c1.early_unit && c1.split_epilogue && c2.split_epilogue &&
                 c1.consumer_warps == 4 && spec.weight_format == WeightFormat::MxInt4G32Tiled &&
                 flag_of("f16", true, "fp16 operands in the chain");
        c2.f16 = c1.f16 && flag_of("f16a", false, "fp16 operands in the chain's gemm2 as well");
        if (c2.f16) c2.group_cols = 0;  // (group columns with bf16 operands only)
        const int slot = std::max(slot1, stream_stage_bytes(c2, false));
        c1.stages = c2.stages = std::clamp(102 * 1024 / slot, 2, kMaxStreamStages);
        c1.slot_bytes = c2.slot_bytes = slot;
        c1.ring_bytes = c2.ring_bytes = c1.stages * slot;
        c1.chain = 1;
        c2.chain = 2;
        // The finalize kernel after the chain; "chx=1": the chain's blocks finalize the slices
        // they complete (StreamConfig::chain_finalize). Their counts are added after each block's
        // last unit, so most slices complete in the last blocks, which then finalize many each:
        // H200, kimi-k2 at 1 / 2 / 4 tokens 55.6 / 101.6 / 173.4 us with it against 55.4 / 100.9 /
        // 171.6 after it (bench/RESULTS.md section 46).
        c2.chain_finalize = spec.finalize && flag_of("chx", false, "the chain's finalize in its blocks");
        b.c1 = c1;
        b.c2 = c2;
        b.chain_tokens = po ? std::min(4, hi) : hi;
        b.chain_min_tokens = one_token_resident ? 2 : 1;
      }
    }
    plan.buckets.push_back(b);
  }

  // The fused block packs up to 64 routed slots where no bucket runs a chain (Plan::routed_id_slots).
  bool any_chain = false;
  for (const Bucket& b : plan.buckets) any_chain = any_chain || b.chain_tokens > 0;
  plan.routed_id_slots = choice_of("ids", {8, 64}, any_chain ? 8 : 64, "routed slots packed beside the fused block's word");
  auto any_bucket = [&](bool fused_route) {
    for (const Bucket& b : plan.buckets)
      if (b.fused_route == fused_route) return true;
    return false;
  };
  if (any_bucket(false)) {
    plan.kernels.push_back({"route", KernelRole::Route, {"route"}, -1});
    plan.kernels.push_back({"dispatch", KernelRole::Dispatch, {"dispatch"}, -1});
  }
  if (any_bucket(true))
    plan.kernels.push_back(
        {"route_dispatch", KernelRole::RouteDispatch, {"route", "dispatch"}, -1});
  for (size_t i = 0; i < plan.buckets.size(); ++i) {
    const int bi = static_cast<int>(i);
    plan.kernels.push_back({fmt::format("gemm1_b{}", i), KernelRole::Gemm1, {"gemm1"}, bi});
    std::vector<std::string> stages = {"gemm2"};
    if (plan.buckets[i].fused_finalize) stages.push_back("finalize");
    plan.kernels.push_back({fmt::format("gemm2_b{}", i), KernelRole::Gemm2, stages, bi});
    if (plan.buckets[i].resident())
      plan.kernels.push_back({fmt::format("resident_b{}", i), KernelRole::Resident,
                              {"route", "gemm1", "gemm2", "finalize"}, bi});
    if (plan.buckets[i].chain_tokens > 0)
      plan.kernels.push_back({fmt::format("chain_b{}", i), KernelRole::Chain,
                              plan.buckets[i].c2.chain_finalize ? std::vector<std::string>{"gemm1", "gemm2", "finalize"}
                                                                : std::vector<std::string>{"gemm1", "gemm2"},
                              bi});
  }
  // The finalize kernel is also what moejit::finalize() launches for an unfinalized layer.
  plan.kernels.push_back({"finalize", KernelRole::Finalize, {"finalize"}, -1});
  if (spec.weight_format == WeightFormat::MxInt4G32Tiled)
    plan.kernels.push_back({"prepare", KernelRole::Prepare, {}, -1});
  if (spec.hidden != given.hidden) plan.kernels.push_back({"rows", KernelRole::Rows, {}, -1});
  return plan;
}

std::string describe(const Plan& plan) {
  std::string out;
  for (size_t i = 0; i < plan.buckets.size(); ++i) {
    const Bucket& b = plan.buckets[i];
    out += fmt::format(
        "bucket {} tokens=[{},{}] tile_rows={} fused_finalize={}{} gemm1(warps_n={} warps_k={} k_chunk={} "
        "double_buffer={} direct_x={}) gemm2(warps_n={} warps_k={} k_chunk={} double_buffer={} "
        "direct_x={}){}\n",
        i, b.min_tokens, b.max_tokens == 0 ? std::string("inf") : std::to_string(b.max_tokens),
        b.tile_rows, b.fused_finalize ? 1 : 0,
        b.stream ? fmt::format(" stream1(consumer_warps={} producer_warps={} k_stage={} stages={}{}) "
                               "stream2(consumer_warps={} producer_warps={} k_stage={} stages={}{})",
                               b.s1.consumer_warps, b.s1.producer_warps, b.s1.k_stage, b.s1.stages,
                               (b.s1.suspend_ns == StreamConfig{}.suspend_ns ? std::string() : fmt::format(" suspend_ns={}", b.s1.suspend_ns)) +
                                   (b.s1.unit_rows == 64 ? "" : fmt::format(" unit_rows={}", b.s1.unit_rows)) +
                                   (b.s1.alt_rows ? fmt::format(" alt_rows={}", b.s1.alt_rows) : "") +
                                   (b.s1.tma ? fmt::format(" tma=1 blocks_per_sm={}", b.s1.min_blocks) : "") +
                                   (b.s1.tma && !b.s1.dynamic_units ? " dynamic_units=0" : "") +
                                   (b.s1.tma && b.s1.dynamic_units && !b.s1.early_fetch ? " early_fetch=0" : "") +
                                   (b.s1.tma && b.s1.evict_first ? " evict_first=1" : "") +
                                   (b.s1.tma && b.s1.early_unit ? " early_unit=1" : "") +
                                   (b.s1.tile_ready ? " tile_ready=1" : "") +
                                   (b.s1.group_cols ? fmt::format(" group_cols={}", b.s1.group_cols) : ""),
                               b.s2.consumer_warps,
                               b.s2.producer_warps, b.s2.k_stage, b.s2.stages,
                               (b.s2.suspend_ns == StreamConfig{}.suspend_ns ? std::string() : fmt::format(" suspend_ns={}", b.s2.suspend_ns)) +
                                   (b.s2.unit_rows == 64 ? "" : fmt::format(" unit_rows={}", b.s2.unit_rows)) +
                                   (b.s2.alt_rows ? fmt::format(" alt_rows={}", b.s2.alt_rows) : "") +
                                   (b.s2.pack_planes ? "" : " pack_planes=0") +
                                   (b.s2.tma ? fmt::format(" tma=1 blocks_per_sm={}", b.s2.min_blocks) : "") +
                                   (b.s2.tma && !b.s2.dynamic_units ? " dynamic_units=0" : "") +
                                   (b.s2.tma && b.s2.dynamic_units && !b.s2.early_fetch ? " early_fetch=0" : "") +
                                   (b.s2.tma && b.s2.evict_first ? " evict_first=1" : "") +
                                   (b.s2.tma && b.s2.x_boxes ? " x_boxes=1" : "") +
                                   (b.s2.group_cols ? fmt::format(" group_cols={}", b.s2.group_cols) : ""))
                 : std::string(),
        b.gemm1.warps_n, b.gemm1.warps_k, b.gemm1.k_chunk_groups,
        b.gemm1.double_buffer ? 1 : 0, b.gemm1.direct_x ? 1 : 0, b.gemm2.warps_n, b.gemm2.warps_k,
        b.gemm2.k_chunk_groups, b.gemm2.double_buffer ? 1 : 0, b.gemm2.direct_x ? 1 : 0,
        (b.resident() ? fmt::format(" resident(tokens=1 grid={} warps={} k_part1={} window={} "
                                  "units1={} units2={} smem={}{})",
                                  b.res.grid, b.res.warps, b.res.k_part1, b.res.window, b.res.units1,
                                  b.res.units2, b.res.smem, b.res.block_route ? " block_route=1" : "")
                      : std::string()) +
            (b.chain_tokens > 0 ? fmt::format(" chain(tokens<={}{} k_stage1={} k_stage2={} stages={} slot_bytes={}{}{}{})",
                                              b.chain_tokens,
                                              b.chain_min_tokens > 1 ? fmt::format(" tokens>={}", b.chain_min_tokens) : "",
                                              b.c1.k_stage, b.c2.k_stage, b.c1.stages,
                                              b.c1.slot_bytes, b.c2.packed_only ? " packed_only=1" : "",
                                              b.c1.f16 ? (b.c2.f16 ? " f16=2" : " f16=1") : "",
                                              b.c2.chain_finalize ? " finalize=1" : "")
                                : std::string()) +
            (b.gemm1.big ? fmt::format(" big(warps={}x{} {}x{} stages={} {} smem={} {} warp_rows={} {})",
                                       b.gemm1.big_wf, b.gemm1.big_wr, b.gemm2.big_wf, b.gemm2.big_wr,
                                       b.gemm1.big_stages, b.gemm2.big_stages, b.gemm1.big_smem,
                                       b.gemm2.big_smem, b.gemm1.big_warp_rows, b.gemm2.big_warp_rows)
                         : std::string()));
  }
  for (const KernelPlan& k : plan.kernels) {
    std::string stages;
    for (const auto& s : k.stages) stages += (stages.empty() ? "" : "+") + s;
    out += fmt::format("kernel {} role={} stages={} bucket={}{}\n", k.name, to_string(k.role),
                       stages, k.bucket,
                       k.role == KernelRole::RouteDispatch ? fmt::format(" routed_id_slots={}", plan.routed_id_slots)
                                                           : std::string());
  }
  const MoeSpec &k = plan.spec, &l = plan.layer_spec;
  if (k.hidden != l.hidden || k.intermediate != l.intermediate)
    out += fmt::format("kernels for hidden={} intermediate={} (the tiled weights' padding of {} and {})\n",
                       k.hidden, k.intermediate, l.hidden, l.intermediate);
  return out;
}

}  // namespace moejit::compiler

// Planner (compiler/plan.h): token buckets, tile choice, GEMM configuration constraints, the
// kernel list, max_tokens, Plan::max_tiles laws and bucket_for.
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <functional>
#include <iterator>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "compiler/codegen.h"
#include "compiler/plan.h"
#include "moejit/moejit.h"
#include "tests/scoped_plan_override.h"

namespace moejit::compiler {
namespace {

using ::testing::HasSubstr;

// Sets MOEJIT_PLAN_OVERRIDE for one scope (make_plan reads it).
using ScopedOverride = ::moejit_test::ScopedPlanOverride;

std::vector<int> tile_rows_of(const Plan& plan) {
  std::vector<int> out;
  for (const Bucket& b : plan.buckets) out.push_back(b.tile_rows);
  return out;
}

// Presets plus shapes that stress the configuration rules (small and odd multiples of 32, EP).
std::vector<MoeSpec> specs_under_test() {
  std::vector<MoeSpec> specs;
  for (const std::string& name : preset_names()) specs.push_back(preset(name));
  const int dims[][2] = {{32, 32}, {96, 160}, {4096, 1408}, {65536, 32}, {160, 65536}};
  for (const auto& d : dims) {
    for (int experts : {1, 8, 64}) {
      MoeSpec s = preset("qwen3-30b-a3b");
      s.hidden = d[0];
      s.intermediate = d[1];
      s.num_experts = experts;
      s.top_k = std::min(experts, 4);
      specs.push_back(s);
    }
  }
  MoeSpec ep = preset("kimi-k2");
  ep.local_expert_offset = 48;
  ep.local_num_experts = 48;
  specs.push_back(ep);
  return specs;
}

TEST(PlanBuckets, Ranges) {
  const std::vector<std::pair<int, int>> expected = {{1, 16},    {17, 64},   {65, 128},  {129, 256},
                                                     {257, 512}, {513, 1024}, {1025, 0}};
  EXPECT_EQ(bucket_ranges(), expected);
  const Plan plan = make_plan(preset("kimi-k2"));
  ASSERT_EQ(plan.buckets.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(plan.buckets[i].min_tokens, expected[i].first);
    EXPECT_EQ(plan.buckets[i].max_tokens, expected[i].second);
  }
  // 129-256 and 257-512 are buckets where the stream family takes the layer (sm_90, H and I
  // multiples of 256, however many rows an expert gets: qwen3-30b-a3b has 16 and 32 at 256 and
  // 512 tokens); elsewhere 129-512 is one bucket, with the older family's tile for 512 tokens.
  // 513-1024 is one where an expert also gets at most 128 rows at 1024 tokens (qwen3-30b-a3b 64);
  // elsewhere 513 up is one bucket.
  const std::vector<std::pair<int, int>> merged = {{1, 16}, {17, 64}, {65, 128}, {129, 512}, {513, 0}};
  const std::vector<std::pair<int, int>> open_513 = {{1, 16},   {17, 64},   {65, 128},
                                                     {129, 256}, {257, 512}, {513, 0}};
  auto ranges_of = [](const Plan& p) {
    std::vector<std::pair<int, int>> r;
    for (const Bucket& b : p.buckets) r.emplace_back(b.min_tokens, b.max_tokens);
    return r;
  };
  EXPECT_EQ(ranges_of(make_plan(preset("qwen3-30b-a3b"))), expected);
  EXPECT_EQ(ranges_of(make_plan(preset("kimi-k2"), 0, "sm_80")), merged);
  MoeSpec odd = preset("qwen3-30b-a3b");
  odd.intermediate = 640;  // not a multiple of 256: no stream family
  EXPECT_EQ(ranges_of(make_plan(odd)), merged);
  {
    const ScopedOverride off("stream=0");
    EXPECT_EQ(ranges_of(make_plan(preset("kimi-k2"))), merged);
    EXPECT_EQ(ranges_of(make_plan(preset("kimi-k2"), 200)),
              (std::vector<std::pair<int, int>>{{1, 16}, {17, 64}, {65, 128}, {129, 512}}));
  }
  MoeSpec few = preset("qwen3-30b-a3b");
  few.num_experts = 32;  // 256 rows per expert at 1024 tokens
  EXPECT_EQ(ranges_of(make_plan(few)), open_513);
  // A limit inside 513-1024 keeps the bucket where the layer has it; without, 513 up is open.
  EXPECT_EQ(ranges_of(make_plan(few, 600)), open_513);
  few.num_experts = 64;  // 128
  EXPECT_EQ(ranges_of(make_plan(few)), expected);
  EXPECT_EQ(ranges_of(make_plan(few, 600)),
            (std::vector<std::pair<int, int>>{{1, 16}, {17, 64}, {65, 128}, {129, 256}, {257, 512}, {513, 1024}}));
  // A limit inside the merged bucket keeps it whole; one below 257 drops 257-512.
  EXPECT_EQ(ranges_of(make_plan(odd, 200)),
            (std::vector<std::pair<int, int>>{{1, 16}, {17, 64}, {65, 128}, {129, 512}}));
  EXPECT_EQ(ranges_of(make_plan(preset("kimi-k2"), 200)),
            (std::vector<std::pair<int, int>>{{1, 16}, {17, 64}, {65, 128}, {129, 256}}));
}

// The older family (sm_80 here): rows per expert = ceil(top * k / local experts), top = the
// bucket's max (4096 when open); tile_rows = the smallest of 8, 16, 32, 64 that holds them, else
// 64. Where the stream family takes the layer (sm_90, H and I multiples of 256) every bucket up to
// 512 tokens (1024 where an expert gets at most 128 rows there) has 8-row tiles, and the open one
// the older family's.
TEST(PlanTiles, ChosenFromRowsPerExpert) {
  // kimi-k2, 384 experts, k = 8: rows 1, 2, 3, 11 (129-512), 86.
  EXPECT_EQ(tile_rows_of(make_plan(preset("kimi-k2"), 0, "sm_80")), (std::vector<int>{8, 8, 8, 16, 64}));
  // qwen3, 128 experts, k = 8: rows 1, 4, 8, 32, 256.
  EXPECT_EQ(tile_rows_of(make_plan(preset("qwen3-30b-a3b"), 0, "sm_80")), (std::vector<int>{8, 8, 8, 32, 64}));
  // kimi-k2 with 48 local experts: rows 3, 11, 22, 86, 683.
  MoeSpec ep = preset("kimi-k2");
  ep.local_num_experts = 48;
  EXPECT_EQ(tile_rows_of(make_plan(ep, 0, "sm_80")), (std::vector<int>{8, 16, 32, 64, 64}));
  // 1 expert, k = 1: rows 16, 64, 128, 512, 4096.
  MoeSpec one = preset("qwen3-30b-a3b");
  one.num_experts = 1;
  one.top_k = 1;
  EXPECT_EQ(tile_rows_of(make_plan(one, 0, "sm_80")), (std::vector<int>{16, 64, 64, 64, 64}));
  // 513-1024 too where an expert gets at most 128 rows at 1024 tokens (kimi-k2 22, qwen3 64);
  // ep (171) and one (1024) have one bucket from 513 tokens.
  for (const MoeSpec& s : {preset("kimi-k2"), preset("qwen3-30b-a3b")})
    EXPECT_EQ(tile_rows_of(make_plan(s)), (std::vector<int>{8, 8, 8, 8, 8, 8, 64}));
  for (const MoeSpec& s : {ep, one})
    EXPECT_EQ(tile_rows_of(make_plan(s)), (std::vector<int>{8, 8, 8, 8, 8, 64}));
  for (const MoeSpec& s : {preset("kimi-k2"), preset("qwen3-30b-a3b"), ep, one}) {
    const ScopedOverride off("stream=0");
    EXPECT_EQ(tile_rows_of(make_plan(s)), tile_rows_of(make_plan(s, 0, "sm_80")));
  }
}

// The older family's buckets; the stream family's have 8-row tiles and end at most at 1024 tokens.
TEST(PlanTiles, SmallestPowerOfTwoThatHoldsTheRows) {
  for (const MoeSpec& spec : specs_under_test())
  for (const char* arch : {"sm_90a", "sm_80"}) {
    const Plan plan = make_plan(spec, 0, arch);
    int previous = 0;
    for (const Bucket& b : plan.buckets) {
      if (b.stream) {
        EXPECT_EQ(b.tile_rows, 8);
        EXPECT_TRUE(b.max_tokens > 0 && b.max_tokens <= 1024) << b.max_tokens;
        previous = 8;
        continue;
      }
      const long long top = b.max_tokens == 0 ? 4096 : b.max_tokens;
      const long long rows = (top * spec.top_k + spec.local_experts() - 1) / spec.local_experts();
      EXPECT_TRUE(b.tile_rows == 8 || b.tile_rows == 16 || b.tile_rows == 32 || b.tile_rows == 64);
      EXPECT_TRUE(b.tile_rows >= rows || b.tile_rows == 64) << b.tile_rows << " " << rows;
      EXPECT_TRUE(b.tile_rows == 8 || b.tile_rows / 2 < rows) << b.tile_rows << " " << rows;
      EXPECT_GE(b.tile_rows, previous);
      previous = b.tile_rows;
    }
  }
}

// The contract of templates/gemm.cuh for one GEMM of N output features and K reduction.
void expect_valid_gemm(const GemmConfig& c, int n, int k, int tile_rows) {
  SCOPED_TRACE(::testing::Message()
               << "n=" << n << " k=" << k << " tile_rows=" << tile_rows << " warps_n=" << c.warps_n
               << " warps_k=" << c.warps_k << " k_chunk_groups=" << c.k_chunk_groups);
  EXPECT_GE(c.warps_n, 1);
  EXPECT_GE(c.warps_k, 1);
  EXPECT_LE(c.threads(), 1024);
  EXPECT_GT(c.k_chunk_groups, 0);
  EXPECT_EQ(c.k_chunk_groups % (4 * c.warps_k), 0);
  // Staged activations: tile_rows x k_chunk_groups x 32 bf16 (64 bytes a group per row).
  EXPECT_LE(static_cast<long long>(tile_rows) * c.k_chunk_groups * 64, 32 * 1024);
  EXPECT_EQ(n % (16 * c.warps_n), 0);
  // No chunk longer than K rounded up to one step of the split.
  const int step = 4 * c.warps_k;
  EXPECT_LE(c.k_chunk_groups, (k / 32 + step - 1) / step * step);
}

TEST(PlanGemm, ConfigsObeyTheKernelContract) {
  for (const MoeSpec& spec : specs_under_test()) {
    for (const Bucket& b : make_plan(spec).buckets) {
      EXPECT_EQ(b.tile_rows % 8, 0);
      // The dispatch pads row counts with a mask: tile rows must be a power of two.
      EXPECT_EQ(b.tile_rows & (b.tile_rows - 1), 0) << b.tile_rows;
      expect_valid_gemm(b.gemm1, spec.intermediate, spec.hidden, b.tile_rows);
      expect_valid_gemm(b.gemm2, spec.hidden, spec.intermediate, b.tile_rows);
    }
  }
}

// Hand-computed for kimi-k2 (H 7168 = 224 groups, I 2048 = 64 groups).
TEST(PlanGemm, KimiK2Configs) {
  const Plan plan = make_plan(preset("kimi-k2"));
  // Tile 8 (decode, x through L1): gate+up on one warp of features with K over 4 warps and
  // 2 blocks of 4 groups per stage; down on 4 warps of features (N % 64 == 0), K over 2 warps,
  // 4 blocks per stage. Both double-buffered.
  EXPECT_EQ(plan.buckets[0].gemm1, (GemmConfig{1, 4, 32, true, true}));
  EXPECT_EQ(plan.buckets[0].gemm2, (GemmConfig{4, 2, 32, true, true}));
  // On sm_90a (the default target) the decode buckets run the stream family instead: units of
  // 64 weight rows, gate/up staged 512 at a time, down 256, no smaller unit paths (one token has
  // 512 gemm1 units); the finalize stays its own kernel. One producer warp issues TMA copies
  // into stages padded to 1 KiB: gemm1 at two blocks per SM, as many stages as fit in 102 KiB
  // (3 of 27648 B), gemm2 at three, in 64 KiB (3 of 18432 B); the same from 17 tokens. With
  // tma=0 four producer warps copy with cp.async at two blocks per SM, as many stages as fit in
  // 104 KiB (3 of 27136 B, 5 of 18432 B).
  EXPECT_TRUE(plan.buckets[0].stream);
  StreamConfig s1{4, 512, 3, 1};
  s1.ring_bytes = 3 * 27648;
  s1.tma = true;
  StreamConfig s2{4, 256, 3, 1};
  s2.ring_bytes = 3 * 18432;
  s2.tma = true;
  s2.x_boxes = false;  // eight stages per unit: x row by row
  s2.min_blocks = 3;
  // Gemm2 waits per tile for gemm1 (tile_ready): up to 16 tokens, and above since its units
  // are eight stages.
  s1.tile_ready = s2.tile_ready = true;
  // Weights with an L2 evict-first policy up to 8 tokens (the kernels carry it up to 16, each
  // launch chooses), not from 17.
  s1.evict_first = s2.evict_first = true;
  // Gemm1 plans its blocks' first units from the routed ids: behind the fused route+dispatch
  // block up to 16 tokens (GemmParams::routed, Cfg::kEarlyRouted), behind the route kernel
  // from 17.
  s1.early_unit = true;
  EXPECT_EQ(plan.buckets[0].s1, s1);
  EXPECT_EQ(plan.buckets[0].s2, s2);
  s1.evict_first = s2.evict_first = false;
  EXPECT_EQ(stream_stage_bytes(512, true, 64, true), 27648);
  EXPECT_EQ(stream_stage_bytes(256, false, 64, true, false), 18432);
  // With x by two 4-row boxes of both planes (8 KiB, unpadded) instead of padded rows.
  EXPECT_EQ(stream_stage_bytes(256, false, 64, true, true), 17408);
  EXPECT_FALSE(plan.buckets[0].fused_finalize);
  EXPECT_TRUE(plan.buckets[1].stream);
  // From 17 tokens route and dispatch are two kernels; up to 16 one block does both. Either
  // way gemm1 plans its first unit from the routed ids and copies it before its wait
  // (early_unit): behind the fused block once its word says the ids are written.
  EXPECT_TRUE(plan.buckets[0].fused_route);
  EXPECT_FALSE(plan.buckets[1].fused_route);
  EXPECT_EQ(plan.buckets[1].s1, s1);
  s1.early_unit = false;
  EXPECT_EQ(plan.buckets[1].s2, s2);
  {
    // "eu=0|1" overrides the rule where it can hold (TMA, units from the counter), with the
    // fused block or without it (fr=0).
    const ScopedOverride off("eu=0");
    for (const Bucket& b : make_plan(preset("kimi-k2"), 64, "sm_90a").buckets) EXPECT_FALSE(b.s1.early_unit);
    const ScopedOverride split("eu=0,fr=0");
    for (const Bucket& b : make_plan(preset("kimi-k2"), 64, "sm_90a").buckets) EXPECT_FALSE(b.s1.early_unit);
  }
  {
    for (const Bucket& b : make_plan(preset("kimi-k2"), 64, "sm_90a").buckets)
      EXPECT_EQ(b.s1.early_unit, b.stream);
    const ScopedOverride split("fr=0");
    for (const Bucket& b : make_plan(preset("kimi-k2"), 64, "sm_90a").buckets) {
      EXPECT_EQ(b.s1.early_unit, b.stream);
      EXPECT_FALSE(b.fused_route);
    }
    const ScopedOverride bad("eu=2");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error);
  }
  {
    // tile_ready from 17 tokens only where gemm2's units are more than one stage: kimi-k2-tp8's
    // (I = 256 = k_stage) are one; qwen3-30b-a3b's (768) three. "trd=0|1" overrides.
    const Plan tp8 = make_plan(preset("kimi-k2-tp8"), 64, "sm_90a");
    EXPECT_TRUE(tp8.buckets[0].s1.tile_ready && tp8.buckets[0].s2.tile_ready);
    EXPECT_FALSE(tp8.buckets[1].s1.tile_ready || tp8.buckets[1].s2.tile_ready);
    EXPECT_TRUE(make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a").buckets[1].s2.tile_ready);
    const ScopedOverride off("trd=0");
    for (const Bucket& b : make_plan(preset("kimi-k2"), 64, "sm_90a").buckets)
      EXPECT_FALSE(b.s1.tile_ready || b.s2.tile_ready);
    const ScopedOverride on("trd=1");
    for (const Bucket& b : make_plan(preset("kimi-k2-tp8"), 64, "sm_90a").buckets)
      EXPECT_EQ(b.s2.tile_ready, b.stream);
    const ScopedOverride bad("trd=2");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error);
  }
  {
    // Dynamic units fetched early in every stream bucket ("uf=0|1" overrides); describe names
    // the override where units come from the counter.
    for (const char* name : {"kimi-k2", "kimi-k2-tp8", "qwen3-30b-a3b"})
      for (const Bucket& b : make_plan(preset(name), 64, "sm_90a").buckets)
        EXPECT_TRUE(!b.stream || (b.s1.early_fetch && b.s2.early_fetch)) << name;
    EXPECT_EQ(describe(make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a")).find("early_fetch"), std::string::npos);
    const ScopedOverride off("uf=0");
    const Plan q = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a");
    for (const Bucket& b : q.buckets) EXPECT_FALSE(b.s1.early_fetch || b.s2.early_fetch);
    EXPECT_NE(describe(q).find("stream2(consumer_warps=4 producer_warps=1 k_stage=256 stages=3 tma=1 "
                               "blocks_per_sm=3 early_fetch=0"),
              std::string::npos);
    const ScopedOverride bad("uf=2");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error);
  }
  {
    // Weights with an L2 evict-first policy (per launch: evict_first_for) up to 8 tokens, where
    // H <= 4096 up to T * H = 131072, and where H <= 2048 up to T * H = 262144: the kernels of
    // qwen3-30b-a3b's three stream buckets (H 2048: to 128 tokens) and of the 1-16 bucket of
    // kimi-k2 and kimi-k2-tp8 carry it, not their 17-64 or 65-128 ones; at H = 4096 launches up to
    // 32 tokens take it. "ef=0|1" forces it off / on for every launch.
    const Plan q = make_plan(preset("qwen3-30b-a3b"), 128, "sm_90a");
    for (int i = 0; i < 3; ++i)
      EXPECT_TRUE(q.buckets[i].s1.evict_first && q.buckets[i].s2.evict_first) << i;
    for (const char* name : {"kimi-k2", "kimi-k2-tp8"}) {
      const Plan k = make_plan(preset(name), 64, "sm_90a");
      EXPECT_TRUE(k.buckets[0].s1.evict_first && k.buckets[0].s2.evict_first) << name;
      EXPECT_FALSE(k.buckets[1].s1.evict_first || k.buckets[1].s2.evict_first) << name;
      const Plan k128 = make_plan(preset(name), 128, "sm_90a");
      EXPECT_FALSE(k128.buckets[2].s1.evict_first || k128.buckets[2].s2.evict_first) << name;
    }
    const Plan k = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_TRUE(evict_first_for(k, 1) && evict_first_for(k, 8));
    EXPECT_FALSE(evict_first_for(k, 9) || evict_first_for(k, 16) || evict_first_for(k, 64));
    EXPECT_TRUE(evict_first_for(q, 16) && evict_first_for(q, 64) && evict_first_for(q, 128));
    EXPECT_FALSE(evict_first_for(q, 129));
    MoeSpec h4096 = preset("qwen3-30b-a3b");
    h4096.hidden = 4096;
    h4096.intermediate = 1536;
    const Plan w = make_plan(h4096, 64, "sm_90a");
    EXPECT_TRUE(w.buckets[1].s1.evict_first && w.buckets[1].s2.evict_first);  // 17-32 take it
    EXPECT_TRUE(evict_first_for(w, 32));
    EXPECT_FALSE(evict_first_for(w, 33) || evict_first_for(w, 64) || evict_first_for(w, 128));
    MoeSpec h2304 = h4096;
    h2304.hidden = 2304;  // above 2048: the 128-token bound does not apply (T * H = 131072 does)
    const Plan w3 = make_plan(h2304, 128, "sm_90a");
    EXPECT_TRUE(evict_first_for(w3, 56));
    EXPECT_FALSE(evict_first_for(w3, 57) || evict_first_for(w3, 100));
    h4096.hidden = 4352;  // above 4096: up to 8 tokens only
    const Plan w2 = make_plan(h4096, 64, "sm_90a");
    EXPECT_TRUE(evict_first_for(w2, 8));
    EXPECT_FALSE(evict_first_for(w2, 9) || w2.buckets[1].s1.evict_first);
    {
      const ScopedOverride on("ef=1");
      const Plan k1 = make_plan(preset("kimi-k2"), 64, "sm_90a");
      EXPECT_TRUE(k1.buckets[1].s1.evict_first && k1.buckets[1].s2.evict_first);
      EXPECT_TRUE(evict_first_for(k1, 64));
      const ScopedOverride cp_async("ef=1,tma=0");  // the hint is on TMA copies only
      for (const Bucket& b : make_plan(preset("kimi-k2"), 64, "sm_90a").buckets)
        EXPECT_FALSE(b.s1.evict_first || b.s2.evict_first);
    }
    {
      const ScopedOverride off("ef=0");
      const Plan q0 = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a");
      for (const Bucket& b : q0.buckets) EXPECT_FALSE(b.s1.evict_first || b.s2.evict_first);
      EXPECT_FALSE(evict_first_for(q0, 1));
    }
    const ScopedOverride bad("ef=2");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error);
  }
  {
    // The float count is exact below 2^24: a layer whose launches could take that many units
    // (1024 experts, I = 65536: (16 + 1024) tiles x 16384 units per tile at 16 tokens) keeps
    // the integer atomic, and "uf=1" does not force it past the bound.
    MoeSpec big = preset("qwen3-30b-a3b");
    big.num_experts = 1024;
    big.intermediate = 65536;
    for (const Bucket& b : make_plan(big, 64, "sm_90a").buckets)
      EXPECT_FALSE(b.s1.early_fetch || b.s2.early_fetch);
    const ScopedOverride on("uf=1");
    for (const Bucket& b : make_plan(big, 64, "sm_90a").buckets)
      EXPECT_FALSE(b.s1.early_fetch || b.s2.early_fetch);
  }
  {
    // Finalize blocks of 32 threads up to 64 tokens, 128 above; "fth=N" forces N.
    const Plan k = make_plan(preset("kimi-k2"), 0, "sm_90a");
    EXPECT_EQ(finalize_threads_for(k, 1), 32);
    EXPECT_EQ(finalize_threads_for(k, 64), 32);
    EXPECT_EQ(finalize_threads_for(k, 65), kFinalizeThreads);
    const ScopedOverride forced("fth=64");
    EXPECT_EQ(finalize_threads_for(make_plan(preset("kimi-k2"), 0, "sm_90a"), 1000), 64);
    const ScopedOverride bad("fth=256");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 0, "sm_90a"), Error);
  }
  {
    const ScopedOverride cp_async("tma=0");
    const Plan c = make_plan(preset("kimi-k2"), 64, "sm_90a");
    StreamConfig c1{4, 512, 3, 4};
    c1.ring_bytes = 3 * 27136;
    StreamConfig c2{4, 256, 5, 4};
    c2.ring_bytes = 5 * 18432;
    for (const Bucket& b : c.buckets) {
      if (!b.stream) continue;
      EXPECT_EQ(b.s1, c1);
      EXPECT_EQ(b.s2, c2);
    }
  }
  EXPECT_EQ(stream_stage_bytes(512, true, 64), 27136);
  EXPECT_EQ(stream_stage_bytes(256, false, 64), 18432);
  // 65-128 up to 513-1024 tokens: 8-row tiles (3, 6, 11 and 22 rows per expert at 128, 256, 512
  // and 1024), the stream family; from 1025 tokens the older family.
  for (int i : {2, 3, 4, 5}) {
    EXPECT_TRUE(plan.buckets[i].stream) << i;
    EXPECT_EQ(plan.buckets[i].tile_rows, 8) << i;
  }
  EXPECT_FALSE(plan.buckets[6].stream);
  // For sm_80 the older family keeps the finalize fused into gemm2.
  const Plan ampere = make_plan(preset("kimi-k2"), 0, "sm_80");
  EXPECT_FALSE(ampere.buckets[0].stream);
  EXPECT_TRUE(ampere.buckets[0].fused_finalize);
  // Tile 16 (sm_80's 129-512): 32 groups fit in shared memory; the split is capped at 32 / 4 = 8
  // warps.
  EXPECT_EQ(ampere.buckets[3].tile_rows, 16);
  EXPECT_EQ(ampere.buckets[3].gemm1, (GemmConfig{1, 8, 32, true, false}));
  EXPECT_FALSE(ampere.buckets[3].fused_finalize);
  // Tile 64 (sm_80's last bucket, 513 up): 4 warps of features (N % 64 == 0), no K split, 8
  // groups (64 x 8 x 64 B = 32 KiB).
  const Bucket& last = ampere.buckets.back();
  EXPECT_EQ(last.min_tokens, 513);
  EXPECT_EQ(last.tile_rows, 64);
  EXPECT_EQ(last.gemm1, (GemmConfig{4, 1, 8, false, false}));
  // gemm2 stages its activation as two bf16 planes (hi + lo): half the groups.
  EXPECT_EQ(last.gemm2, (GemmConfig{4, 1, 4, false, false}));
  // On sm_90 that bucket runs the big-tile GEMMs (PlanGemm.BigTiles).
  EXPECT_TRUE(plan.buckets[6].gemm1.big && plan.buckets[6].gemm2.big);
}

// The big-tile GEMMs (templates/moejit_gemm_big.cuh) in the older family's 64-row buckets on
// sm_90: 8 warps of 32 weight rows by 32 rows at two blocks per SM (as many stages as fit in
// 110 KiB), the features per block in warps_n (16 each); "bw=64" warps of 64 weight rows at one
// block per SM (220 KiB), "bt=128" 128-row tiles (whose shared memory only fits one block:
// 64-row warps), "bst=" the stages, "big=0" the older family's kernels, "bo=0" blocks numbered
// feature-block-major.
TEST(PlanGemm, BigTiles) {
  const Plan plan = make_plan(preset("kimi-k2"), 0, "sm_90a");
  const Bucket& b = plan.buckets[6];
  EXPECT_EQ(b.tile_rows, 64);
  GemmConfig g1;
  g1.big = true;
  g1.big_wf = 4;
  g1.big_wr = 2;
  g1.big_stages = 4;
  g1.big_warp_rows = 32;
  g1.warps_n = 4;  // 64 SwiGLU features: 128 weight rows
  g1.double_buffer = false;
  g1.min_blocks = 2;
  g1.big_smem = 4 * (128 * 32 + 128 * 4 + 64 * 144) + 2 * 128 * 144 + 2 * 128 * 2 * 4;
  EXPECT_EQ(g1.big_smem, 94208);
  EXPECT_EQ(b.gemm1, g1);
  EXPECT_EQ(b.gemm1.threads(), 256);
  // Gemm2 (two x planes): four stages would take 131072 bytes, three fit.
  GemmConfig g2 = g1;
  g2.warps_n = 8;  // 128 output features
  g2.big_stages = 3;
  g2.big_smem = 3 * (128 * 32 + 128 * 4 + 2 * 64 * 144) + 2 * 128 * 144 + 2 * 128 * 2 * 4;
  EXPECT_EQ(b.gemm2, g2);
  EXPECT_EQ(big_smem_bytes(4, 2, 3, 2, 32), g2.big_smem);
  EXPECT_GT(big_smem_bytes(4, 2, 4, 2, 32), 110 * 1024);
  EXPECT_NE(describe(plan).find(" big(warps=4x2 4x2 stages=4 3 smem=94208 108032 warp_rows=32 32)"),
            std::string::npos);
  {
    const ScopedOverride o("bw=64");
    const Bucket& t = make_plan(preset("kimi-k2"), 0, "sm_90a").buckets[6];
    GemmConfig w1 = g1;
    w1.big_warp_rows = 64;
    w1.warps_n = 8;  // 128 SwiGLU features: 256 weight rows
    w1.min_blocks = 1;
    w1.big_smem = 4 * (256 * 32 + 256 * 4 + 64 * 144) + 2 * 256 * 144 + 2 * 256 * 2 * 4;
    EXPECT_EQ(w1.big_smem, 151552);
    EXPECT_EQ(t.gemm1, w1);
    GemmConfig w2 = w1;
    w2.warps_n = 16;  // 256 output features
    w2.big_smem = 4 * (256 * 32 + 256 * 4 + 2 * 64 * 144) + 2 * 256 * 144 + 2 * 256 * 2 * 4;
    EXPECT_EQ(t.gemm2, w2);
    EXPECT_EQ(big_smem_bytes(4, 2, 4, 2), w2.big_smem);
  }
  {
    const ScopedOverride o("bt=128");
    const Bucket& t = make_plan(preset("kimi-k2"), 0, "sm_90a").buckets[6];
    EXPECT_EQ(t.tile_rows, 128);
    // 32-row warps: 2 x 4 warps hold 64 weight rows, fewer than the block's 256 threads copy
    // (two 16-byte units per row); and gemm2's two blocks would not fit. 64-row warps at one
    // block per SM.
    EXPECT_EQ(t.gemm1.big_warp_rows, 64);
    EXPECT_EQ(t.gemm1.min_blocks, 1);
    EXPECT_EQ(t.gemm1.big_wf, 2);
    EXPECT_EQ(t.gemm1.big_wr, 4);
    EXPECT_EQ(t.gemm1.warps_n, 4);
    EXPECT_EQ(t.gemm2.big_warp_rows, 64);
    EXPECT_EQ(t.gemm2.min_blocks, 1);
    EXPECT_EQ(t.gemm2.warps_n, 8);
    EXPECT_EQ(t.gemm2.big_stages, 4);
    EXPECT_EQ(t.gemm2.big_smem, 204800);
  }
  {
    // Six stages of gemm2 would take 243712 bytes: five.
    const ScopedOverride o("bst=6,bw=64");
    const Bucket& t = make_plan(preset("kimi-k2"), 0, "sm_90a").buckets[6];
    EXPECT_EQ(t.gemm1.big_stages, 6);
    EXPECT_EQ(t.gemm2.big_stages, 5);
    EXPECT_LE(t.gemm2.big_smem, 220 * 1024);
    EXPECT_GT(big_smem_bytes(4, 2, 6, 2), 220 * 1024);
  }
  {
    const ScopedOverride o("big=0");
    const Bucket& t = make_plan(preset("kimi-k2"), 0, "sm_90a").buckets[6];
    EXPECT_FALSE(t.gemm1.big || t.gemm2.big);
    EXPECT_EQ(t.gemm1, (GemmConfig{4, 1, 8, false, false}));
  }
  {
    const ScopedOverride o("bo=0");
    EXPECT_FALSE(make_plan(preset("kimi-k2"), 0, "sm_90a").buckets[6].gemm1.big_tile_major);
    const ScopedOverride bad("bt=96");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 0, "sm_90a"), Error);
  }
  // Features that 8 warps' blocks do not divide: 4 warps (I 192 with 64-row warps: 64 features
  // per block; 32-row warps divide it with 8).
  MoeSpec narrow = preset("qwen3-30b-a3b");
  narrow.hidden = 640;
  narrow.intermediate = 192;
  {
    const ScopedOverride o("bw=64");
    const Bucket& n = make_plan(narrow, 0, "sm_90a").buckets.back();
    EXPECT_TRUE(n.gemm1.big && n.gemm2.big);
    EXPECT_EQ(n.gemm1.big_wf, 2);
    EXPECT_EQ(n.gemm1.threads(), 128);
    EXPECT_EQ(16 * n.gemm1.warps_n, 64);
    EXPECT_EQ(16 * n.gemm2.warps_n, 128);
  }
  narrow.hidden = 576;  // 32-row warps: gemm2's 8 warps' 128 features do not divide it, 4 warps' 64 do
  const Bucket& n = make_plan(narrow, 0, "sm_90a").buckets.back();
  EXPECT_TRUE(n.gemm1.big && n.gemm2.big);
  EXPECT_EQ(n.gemm1.big_wf, 4);
  EXPECT_EQ(n.gemm2.big_wf, 2);
  EXPECT_EQ(n.gemm2.big_warp_rows, 32);
  EXPECT_EQ(n.gemm2.threads(), 128);
  EXPECT_EQ(16 * n.gemm2.warps_n, 64);
  // K not a multiple of 64, or no block size dividing the features: the older family.
  MoeSpec odd = preset("qwen3-30b-a3b");
  odd.intermediate = 96;
  EXPECT_FALSE(make_plan(odd, 0, "sm_90a").buckets.back().gemm2.big);  // K = I = 96
  odd.intermediate = 80;  // not a multiple of 32 features
  EXPECT_THROW(make_plan(odd, 0, "sm_90a"), Error);
  MoeSpec odd_h = preset("qwen3-30b-a3b");
  odd_h.hidden = 2080;  // % 64 = 32
  EXPECT_FALSE(make_plan(odd_h, 0, "sm_90a").buckets.back().gemm2.big);
}

TEST(PlanGemm, NarrowOutputUsesTwoWarps) {
  MoeSpec s = preset("qwen3-30b-a3b");
  s.intermediate = 96;  // 96 % 64 != 0
  const Plan plan = make_plan(s);
  EXPECT_EQ(plan.buckets[4].tile_rows, 64);
  EXPECT_EQ(plan.buckets[4].gemm1.warps_n, 2);
  EXPECT_EQ(plan.buckets[4].gemm2.warps_n, 4);  // N = 2048
}

TEST(PlanGemm, ShortKSplitsLess) {
  MoeSpec s = preset("qwen3-30b-a3b");
  s.intermediate = 256;  // 8 groups = 2 warp steps of 4 groups
  const Plan plan = make_plan(s);
  EXPECT_EQ(plan.buckets[0].gemm2, (GemmConfig{4, 2, 8, true, true}));
}

TEST(PlanKernels, FullList) {
  const Plan plan = make_plan(preset("kimi-k2"));
  struct Expected {
    const char* name;
    KernelRole role;
    std::vector<std::string> stages;
    int bucket;
  };
  // The decode buckets (tile 8) run the stream GEMMs (sm_90a), the finalize its own kernel.
  const Expected expected[] = {
      {"route", KernelRole::Route, {"route"}, -1},
      {"dispatch", KernelRole::Dispatch, {"dispatch"}, -1},
      // Buckets up to 16 tokens route and dispatch in one block.
      {"route_dispatch", KernelRole::RouteDispatch, {"route", "dispatch"}, -1},
      {"gemm1_b0", KernelRole::Gemm1, {"gemm1"}, 0},
      {"gemm2_b0", KernelRole::Gemm2, {"gemm2"}, 0},
      // Up to 4 tokens both GEMMs as one kernel (Bucket::chain_tokens), the finalize kernel after it.
      {"chain_b0", KernelRole::Chain, {"gemm1", "gemm2"}, 0},
      {"gemm1_b1", KernelRole::Gemm1, {"gemm1"}, 1},
      {"gemm2_b1", KernelRole::Gemm2, {"gemm2"}, 1},
      {"gemm1_b2", KernelRole::Gemm1, {"gemm1"}, 2},
      {"gemm2_b2", KernelRole::Gemm2, {"gemm2"}, 2},
      {"gemm1_b3", KernelRole::Gemm1, {"gemm1"}, 3},
      {"gemm2_b3", KernelRole::Gemm2, {"gemm2"}, 3},
      {"gemm1_b4", KernelRole::Gemm1, {"gemm1"}, 4},
      {"gemm2_b4", KernelRole::Gemm2, {"gemm2"}, 4},
      {"gemm1_b5", KernelRole::Gemm1, {"gemm1"}, 5},
      {"gemm2_b5", KernelRole::Gemm2, {"gemm2"}, 5},
      {"gemm1_b6", KernelRole::Gemm1, {"gemm1"}, 6},
      {"gemm2_b6", KernelRole::Gemm2, {"gemm2"}, 6},
      {"finalize", KernelRole::Finalize, {"finalize"}, -1},
  };
  ASSERT_EQ(plan.kernels.size(), std::size(expected));
  for (size_t i = 0; i < plan.kernels.size(); ++i) {
    const KernelPlan& k = plan.kernels[i];
    EXPECT_EQ(k.name, expected[i].name);
    EXPECT_EQ(k.role, expected[i].role);
    EXPECT_EQ(k.stages, expected[i].stages);
    EXPECT_EQ(k.bucket, expected[i].bucket);
  }
}

TEST(PlanKernels, UnfinalizedLayerKeepsTheFinalizeKernel) {
  MoeSpec s = preset("kimi-k2");
  s.finalize = false;
  const Plan plan = make_plan(s);
  EXPECT_EQ(plan.kernels.back().name, "finalize");
  EXPECT_EQ(plan.spec, s);
}

TEST(PlanKernels, NamesUniqueAndRolesNamed) {
  for (const MoeSpec& spec : specs_under_test()) {
    const Plan plan = make_plan(spec);
    std::vector<std::string> names;
    for (const KernelPlan& k : plan.kernels) {
      names.push_back(k.name);
      EXPECT_THAT(k.name, ::testing::StartsWith(to_string(k.role)));
      EXPECT_LT(k.bucket, static_cast<int>(plan.buckets.size()));
    }
    std::sort(names.begin(), names.end());
    EXPECT_EQ(std::unique(names.begin(), names.end()), names.end());
  }
}

TEST(PlanMaxTokens, DropsBucketsAbove) {
  const MoeSpec s = preset("qwen3-30b-a3b");
  const std::pair<int, size_t> cases[] = {{0, 7},    {1, 1},   {16, 1},   {17, 2},   {64, 2},
                                          {65, 3},    {100, 3}, {128, 3},  {129, 4},  {256, 4},
                                          {257, 5},   {512, 5}, {513, 6},  {1024, 6}, {1025, 7},
                                          {100000, 7}};
  for (auto [max_tokens, buckets] : cases) {
    const Plan plan = make_plan(s, max_tokens);
    EXPECT_EQ(plan.buckets.size(), buckets) << max_tokens;
    // Two kernels per bucket plus finalize, route_dispatch and the resident layer (the bucket up
    // to 16 tokens), and route and dispatch (buckets above 16 tokens).
    const size_t extra = 1 + 2 + (max_tokens == 0 || max_tokens > 16 ? 2 : 0);
    EXPECT_EQ(plan.kernels.size(), 2 * buckets + extra) << max_tokens;
    EXPECT_TRUE(max_tokens == 0 || plan.buckets.back().contains(max_tokens)) << max_tokens;
  }
}

TEST(PlanMaxTokens, TokensAboveTheLastBucketAreRejected) {
  const Plan plan = make_plan(preset("qwen3-30b-a3b"), 100);
  EXPECT_EQ(plan.bucket_for(128), 2);
  try {
    plan.bucket_for(129);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("num_tokens = 129"));
    EXPECT_THAT(e.what(), HasSubstr("max_tokens = 100"));
    EXPECT_THAT(e.what(), HasSubstr("end at 128 tokens"));
  }
}

TEST(PlanBucketFor, Boundaries) {
  const Plan plan = make_plan(preset("kimi-k2"));
  const std::pair<int, int> cases[] = {{1, 0},   {16, 0},  {17, 1},   {64, 1},    {65, 2},   {128, 2},
                                       {129, 3}, {256, 3}, {257, 4},  {512, 4},   {513, 5},  {1024, 5},
                                       {1025, 6}, {1 << 20, 6}};
  for (auto [tokens, bucket] : cases) EXPECT_EQ(plan.bucket_for(tokens), bucket) << tokens;
  const Plan qwen3 = make_plan(preset("qwen3-30b-a3b"));
  for (auto [tokens, bucket] : {std::pair<int, int>{128, 2}, {129, 3}, {256, 3}, {257, 4}, {512, 4}, {513, 5}, {1025, 6}})
    EXPECT_EQ(qwen3.bucket_for(tokens), bucket) << tokens;
  // Without the stream family 129-512 is one bucket.
  const Plan ampere = make_plan(preset("qwen3-30b-a3b"), 0, "sm_80");
  for (auto [tokens, bucket] : {std::pair<int, int>{128, 2}, {129, 3}, {256, 3}, {257, 3}, {512, 3}, {513, 4}})
    EXPECT_EQ(ampere.bucket_for(tokens), bucket) << tokens;
}

TEST(PlanBucketFor, NonPositiveTokensAreRejected) {
  const Plan plan = make_plan(preset("kimi-k2"));
  for (int tokens : {0, -1}) {
    try {
      plan.bucket_for(tokens);
      ADD_FAILURE() << tokens;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr("num_tokens = " + std::to_string(tokens)));
      // A negative count is named as such, not as a count beyond the compiled buckets.
      if (tokens < 0) {
        EXPECT_THAT(e.what(), HasSubstr("is negative"));
      }
    }
  }
}

TEST(PlanMaxTokens, NegativeIsRejected) {
  try {
    make_plan(preset("kimi-k2"), -5);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("max_tokens = -5 is negative"));
  }
}

TEST(PlanMake, RejectsAnInvalidSpec) {
  MoeSpec s = preset("kimi-k2");
  s.hidden = 100;
  EXPECT_THROW(make_plan(s), Error);
}

TEST(PlanDescribe, OneLinePerBucketAndKernel) {
  const std::string text = describe(make_plan(preset("kimi-k2"), 16));
  EXPECT_EQ(text,
            "bucket 0 tokens=[1,16] tile_rows=8 fused_finalize=0 stream1(consumer_warps=4 "
            "producer_warps=1 k_stage=512 stages=3 tma=1 blocks_per_sm=2 evict_first=1 early_unit=1 tile_ready=1) "
            "stream2(consumer_warps=4 producer_warps=1 k_stage=256 stages=3 tma=1 "
            "blocks_per_sm=3 evict_first=1) gemm1(warps_n=1 warps_k=4 k_chunk=32 double_buffer=1 "
            "direct_x=1) gemm2(warps_n=4 warps_k=2 k_chunk=32 double_buffer=1 direct_x=1) "
            "chain(tokens<=4 k_stage1=512 k_stage2=512 stages=3 slot_bytes=27648 packed_only=1)\n"
            "kernel route_dispatch role=route_dispatch stages=route+dispatch bucket=-1 routed_id_slots=8\n"
            "kernel gemm1_b0 role=gemm1 stages=gemm1 bucket=0\n"
            "kernel gemm2_b0 role=gemm2 stages=gemm2 bucket=0\n"
            "kernel chain_b0 role=chain stages=gemm1+gemm2 bucket=0\n"
            "kernel finalize role=finalize stages=finalize bucket=-1\n");
}

// ---- the stream family -----------------------------------------------------------------------

// Shared memory of one stage: 32 weight rows x k/2 bytes, 32 scale rows x k/16 bytes, and 8 x rows
// (two planes for gemm2) of k bf16 padded by 64 bytes.
TEST(PlanStream, StageBytes) {
  EXPECT_EQ(stream_stage_bytes(512, true), 32 * 256 + 32 * 32 + 8 * 1088);
  EXPECT_EQ(stream_stage_bytes(512, false), 32 * 256 + 32 * 32 + 16 * 1088);
  EXPECT_EQ(stream_stage_bytes(256, false), 32 * 128 + 32 * 16 + 16 * 576);
}

// The chain kernel (Bucket::chain_tokens): kimi-k2's and deepseek-v3's 1-16 bucket take it up to
// 4 tokens, gemm2 with 512-deep stages of one x plane (16 KiB of weights, 2 KiB of scales, 8
// padded rows of 1088 bytes = 26.5 KiB) in gemm1's 27 KiB slots; layers whose gemm2 stages would
// be 256 deep (qwen3-30b-a3b, kimi-k2-tp8) or whose gemm1 takes smaller units at one token
// (kimi-k2-tp4) do not, unless forced (ch=1), and then with both planes up to the bucket's end.
// Precomputed routing (an expert may repeat within a token) takes a one-plane chain only up to 4
// slots.
// Where the finalized layer's one token runs the resident layer and the bucket also has a chain
// (tiled H = I = 1024, top-8: both fit), the chain starts at two tokens in both layer kinds, so
// that one token of the unfinalized layer runs the pipeline, whose sums the resident layer
// follows (bitwise equal outputs; found by Differential's random sweep of tiled shapes).
TEST(PlanStream, ChainLeavesOneTokenToTheResidentLayer) {
  MoeSpec s = preset("qwen3-30b-a3b");
  s.hidden = 1024;
  s.intermediate = 1024;
  s.num_experts = 64;
  s.weight_format = WeightFormat::MxInt4G32Tiled;
  for (const bool fin : {true, false}) {
    s.finalize = fin;
    const Plan p = make_plan(s, 64, "sm_90a");
    const Bucket& b = p.buckets[0];
    EXPECT_EQ(b.resident(), fin);
    EXPECT_EQ(b.chain_tokens, 4);
    EXPECT_EQ(b.chain_min_tokens, 2);
    EXPECT_FALSE(b.chain_for(1, 8, false));
    EXPECT_TRUE(b.chain_for(2, 8, false));
    EXPECT_NE(describe(p).find(" chain(tokens<=4 tokens>=2 "), std::string::npos);
    const ScopedOverride no_resident("res=0");
    EXPECT_EQ(make_plan(s, 64, "sm_90a").buckets[0].chain_min_tokens, 1);
  }
  for (const char* name : {"kimi-k2", "deepseek-v3"}) {
    MoeSpec k = preset(name);
    k.weight_format = WeightFormat::MxInt4G32Tiled;
    EXPECT_EQ(make_plan(k, 64, "sm_90a").buckets[0].chain_min_tokens, 1) << name;
  }
}

TEST(PlanStream, ChainRuleAndOverrides) {
  EXPECT_EQ(stream_stage_bytes(512, false, 64, true, false, true), 27648);  // 27136 padded
  EXPECT_EQ(stream_stage_bytes(512, false, 64, true, false, false), 35840);  // both planes: > 27 KiB
  for (const char* name : {"kimi-k2", "deepseek-v3"}) {
    const Plan p = make_plan(preset(name), 64, "sm_90a");
    const Bucket& b = p.buckets[0];
    EXPECT_EQ(b.chain_tokens, 4) << name;
    EXPECT_EQ(p.buckets[1].chain_tokens, 0) << name;
    EXPECT_EQ(b.c1.chain, 1);
    EXPECT_EQ(b.c2.chain, 2);
    EXPECT_EQ(b.c1.k_stage, 512);
    EXPECT_EQ(b.c2.k_stage, 512);
    EXPECT_TRUE(b.c2.packed_only);
    EXPECT_EQ(b.c1.slot_bytes, stream_stage_bytes(512, true, 64, true));
    EXPECT_EQ(b.c2.slot_bytes, b.c1.slot_bytes);
    EXPECT_EQ(b.c1.stages, 3);
    EXPECT_EQ(b.c1.ring_bytes, 3 * b.c1.slot_bytes);
    EXPECT_EQ(b.c1.min_blocks, 2);
    EXPECT_EQ(b.c1.alt_rows, 0);
    EXPECT_TRUE(b.chain_for(4, 8, false));
    EXPECT_FALSE(b.chain_for(5, 8, false));
    EXPECT_FALSE(b.chain_for(1, 8, true));  // 8 slots
    EXPECT_TRUE(b.chain_for(1, 4, true));   // 4 slots
    // The finalize kernel follows the chain; with chx=1 the chain finalizes a finalized layer in
    // its blocks (no finalize kernel), never an unfinalized one.
    EXPECT_FALSE(b.c2.chain_finalize) << name;
    EXPECT_FALSE(b.c1.chain_finalize) << name;
    const ScopedOverride on("chx=1");
    EXPECT_TRUE(make_plan(preset(name), 64, "sm_90a").buckets[0].c2.chain_finalize) << name;
    EXPECT_FALSE(make_plan(preset(name), 64, "sm_90a").buckets[0].c1.chain_finalize) << name;
    MoeSpec unfinalized = preset(name);
    unfinalized.finalize = false;
    EXPECT_FALSE(make_plan(unfinalized, 64, "sm_90a").buckets[0].c2.chain_finalize) << name;
  }
  for (const char* name : {"qwen3-30b-a3b", "kimi-k2-tp8", "kimi-k2-tp4"}) {
    const Plan p = make_plan(preset(name), 64, "sm_90a");
    EXPECT_EQ(p.buckets[0].chain_tokens, 0) << name;
    EXPECT_EQ(p.buckets[1].chain_tokens, 0) << name;
    for (const KernelPlan& k : p.kernels) EXPECT_NE(k.role, KernelRole::Chain) << name;
  }
  {
    const ScopedOverride on("ch=1");
    const Plan q = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a");
    EXPECT_EQ(q.buckets[0].chain_tokens, 16);
    EXPECT_EQ(q.buckets[1].chain_tokens, 64);
    EXPECT_EQ(q.buckets[0].c2.k_stage, 256);  // I = 768
    EXPECT_FALSE(q.buckets[0].c2.packed_only);
    EXPECT_TRUE(q.buckets[0].chain_for(16, 8, true));
  }
  {
    const ScopedOverride two_planes("ch=1,chk2=256");
    const Plan k = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_EQ(k.buckets[0].chain_tokens, 16);
    EXPECT_FALSE(k.buckets[0].c2.packed_only);
  }
  {
    const ScopedOverride off("ch=0");
    EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].chain_tokens, 0);
  }
  for (const char* bad : {"chk2=128", "chk2=x", "ch=2", "chpo=3"}) {
    const ScopedOverride o(bad);
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error) << bad;
  }
}

// The routed slots the fused route+dispatch block packs beside its word (Plan::routed_id_slots):
// 64 where no bucket runs the chain kernel, 8 beside one; "ids=8|64" forces it. The kernels
// carry it: the block as Cfg::kPackedIdSlots, gemm1 behind it as Cfg::kRoutedIds (0 with
// "idw=0"; a chain's gemm1 reads at most 8 of them whatever the count).
TEST(PlanStream, RoutedIdSlots) {
  auto constant = [](const Plan& p, const std::string& kernel, const std::string& name) {
    const std::regex re("static constexpr (?:int|bool) " + name + " = ([a-z0-9]+);");
    for (const KernelSource& k : generate_all(p))
      if (k.name == kernel) {
        std::smatch m;
        if (std::regex_search(k.source, m, re)) return m[1].str();
      }
    return std::string("(none)");
  };
  for (const char* name : {"qwen3-30b-a3b", "kimi-k2-tp8", "kimi-k2-tp4"}) {
    const Plan p = make_plan(preset(name), 64, "sm_90a");
    EXPECT_EQ(p.routed_id_slots, 64) << name;
    EXPECT_EQ(constant(p, "route_dispatch", "kPackedIdSlots"), "64") << name;
    EXPECT_EQ(constant(p, "gemm1_b0", "kRoutedIds"), "64") << name;
    EXPECT_EQ(constant(p, "gemm1_b1", "kRoutedIds"), "0") << name;  // (17-64 tokens: no fused block)
    EXPECT_NE(describe(p).find("kernel route_dispatch role=route_dispatch stages=route+dispatch bucket=-1 "
                               "routed_id_slots=64\n"),
              std::string::npos)
        << name;
  }
  for (const char* name : {"kimi-k2", "deepseek-v3"}) {
    const Plan p = make_plan(preset(name), 64, "sm_90a");
    EXPECT_EQ(p.routed_id_slots, 8) << name;
    EXPECT_EQ(constant(p, "route_dispatch", "kPackedIdSlots"), "8") << name;
    EXPECT_EQ(constant(p, "gemm1_b0", "kRoutedIds"), "8") << name;
    EXPECT_EQ(constant(p, "chain_b0", "kRoutedIds"), "8") << name;
  }
  {
    const ScopedOverride wide("ids=64");
    EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").routed_id_slots, 64);
  }
  {
    const ScopedOverride narrow("ids=8");
    const Plan p = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a");
    EXPECT_EQ(p.routed_id_slots, 8);
    EXPECT_EQ(constant(p, "gemm1_b0", "kRoutedIds"), "8");
  }
  {
    const ScopedOverride chain("ch=1");  // a chain on qwen3-30b-a3b: the narrow block
    EXPECT_EQ(make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a").routed_id_slots, 8);
  }
  {
    const ScopedOverride off("idw=0");
    EXPECT_EQ(constant(make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a"), "gemm1_b0", "kRoutedIds"), "0");
  }
  for (const char* bad : {"ids=16", "ids=x", "ids="}) {
    const ScopedOverride o(bad);
    EXPECT_THROW(make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a"), Error) << bad;
  }
}

// fp16 operands (StreamConfig::f16) in the chains of tiled weights with packed gemm2 units behind
// the fused route+dispatch block: gemm1's by default, gemm2's too with "f16a=1", whose stage then
// holds k_stage / 2 bytes of dequantisation words more (kimi-k2: 27136 + 256 bytes, still one
// 27 KiB slot); not for row-major weights, two-plane chains, "f16=0", or without the fused block
// ("fr=0") or the split epilogue ("sep=0").
TEST(PlanStream, ChainFp16Rule) {
  EXPECT_EQ(stream_stage_bytes(512, false, 64, true, false, true, true), 27648);
  EXPECT_EQ(stream_stage_bytes(512, false, 64, false, false, true, true), 27136 + 256);
  MoeSpec tiled = preset("kimi-k2");
  tiled.weight_format = WeightFormat::MxInt4G32Tiled;
  {
    const Plan p = make_plan(tiled, 64, "sm_90a");
    const Bucket& b = p.buckets[0];
    ASSERT_EQ(b.chain_tokens, 4);
    EXPECT_TRUE(b.c1.f16);
    EXPECT_FALSE(b.c2.f16);
    EXPECT_EQ(b.c1.slot_bytes, 27648);
    EXPECT_FALSE(b.s1.f16);  // the bucket's two-kernel path beyond 4 tokens
    EXPECT_FALSE(b.s2.f16);
    EXPECT_NE(describe(p).find(" f16=1"), std::string::npos);
  }
  {
    const ScopedOverride both("f16a=1");
    const Plan p = make_plan(tiled, 64, "sm_90a");
    EXPECT_TRUE(p.buckets[0].c1.f16);
    EXPECT_TRUE(p.buckets[0].c2.f16);
    EXPECT_EQ(p.buckets[0].c1.slot_bytes, 27648);
    EXPECT_NE(describe(p).find(" f16=2"), std::string::npos);
  }
  EXPECT_FALSE(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].c1.f16);  // row-major
  for (const char* off : {"f16=0", "f16=0,f16a=1", "fr=0", "sep=0", "ch=1,chk2=256"}) {
    const ScopedOverride o(off);
    const Plan p = make_plan(tiled, 64, "sm_90a");
    EXPECT_FALSE(p.buckets[0].c1.f16 || p.buckets[0].c2.f16) << off;
  }
}

// 16-row gemm1 units: half the weight and scale rows, the same x rows.
TEST(PlanStream, StageBytesOfSmallUnits) {
  EXPECT_EQ(stream_stage_bytes(1024, true, 16), 16 * 512 + 16 * 64 + 8 * 2112);
  EXPECT_EQ(stream_stage_bytes(1024, true, 32), stream_stage_bytes(1024, true));
}

// Unit sizes: 64 rows by default; gemm1 also carries the 32- and 16-row paths that some token
// count of its bucket (up to max_tokens) would take on a 132-SM grid, and a launch takes the
// compiled size whose busiest block streams the fewest rows, a unit's fixed part counted as 16
// rows (ties to larger units). Gemm2 keeps 64-row units only. u1= / u2= force one size.
TEST(PlanStream, UnitRowsRule) {
  const MoeSpec tp8 = preset("kimi-k2-tp8");  // I = 256: gemm1 512 rows, gemm2 7168 per expert
  EXPECT_EQ(stream_units(tp8, true, 16, 1), 256);  // 8 tiles x 512 / 16
  EXPECT_EQ(stream_units(tp8, true, 64, 2), 128);
  EXPECT_EQ(stream_units(tp8, false, 64, 1), 896);
  const Plan p8 = make_plan(tp8, 64, "sm_90a");
  const StreamConfig& g1 = p8.buckets[0].s1;
  EXPECT_EQ(g1.unit_rows, 64);
  EXPECT_EQ(g1.alt_rows, 16 | 32);
  EXPECT_EQ(g1.k_stage16, 1024);
  EXPECT_EQ(g1.k_stage32, 1024);
  // The ring is the largest path's own (TMA, stages padded to 1 KiB, 102 KiB): 3 stages of
  // 64 rows x 512 (27648 B) beat 3 of 16 rows x 1024 (26624 B) and 2 of 32 rows x 1024 (35840 B).
  EXPECT_EQ(g1.ring_bytes, 3 * 27648);
  EXPECT_EQ(g1.stages, 3);
  EXPECT_NE(describe(p8).find("stages=3 alt_rows=48 tma=1 blocks_per_sm=2 evict_first=1 early_unit=1 tile_ready=1)"),
            std::string::npos);
  {
    // With cp.async (tma=0): 3 stages of 32 rows x 1024 (35328 B) make the ring.
    const ScopedOverride o("tma=0");
    const StreamConfig& c = make_plan(tp8, 64, "sm_90a").buckets[0].s1;
    EXPECT_EQ(c.ring_bytes, 3 * 35328);
    EXPECT_EQ(c.stages, 3);
    EXPECT_FALSE(c.tma);
    EXPECT_EQ(c.producer_warps, 4);
  }
  // Rows the busiest block streams, a unit's fixed part counted as 16 rows (rounds x (rows + 16)).
  EXPECT_EQ(choose_unit_rows(g1, tp8, true, 1, 264), 16);  // 64/128/256 units: 1 round each
  EXPECT_EQ(choose_unit_rows(g1, tp8, true, 2, 264), 32);  // 1 x 80, 1 x 48, 2 x 32
  EXPECT_EQ(choose_unit_rows(g1, tp8, true, 4, 264), 64);  // 1 x 80, 2 x 48, 4 x 32
  EXPECT_EQ(choose_unit_rows(g1, tp8, true, 1, 60), 32);   // 2 x 80, 3 x 48, 5 x 32
  EXPECT_EQ(choose_unit_rows(g1, tp8, true, 1, 120), 64);  // 1 x 80, 2 x 48, 3 x 32
  EXPECT_EQ(p8.buckets[1].s1.alt_rows, 0);  // 17-64 tokens: 64 rows only
  EXPECT_EQ(p8.buckets[0].s2.alt_rows, 0);  // gemm2: 64-row units only
  EXPECT_EQ(choose_unit_rows(p8.buckets[0].s2, tp8, false, 1, 396), 64);
  // qwen3-30b-a3b gemm1: one token has 192 units of 64 rows (one round), 384 of 32 (two); two
  // tokens 384 (two rounds) and 768 (three). kimi-k2: 64 rows from one token on.
  const MoeSpec qwen = preset("qwen3-30b-a3b");
  const Plan pq = make_plan(qwen, 64, "sm_90a");
  EXPECT_EQ(pq.buckets[0].s1.alt_rows, 32);
  EXPECT_EQ(choose_unit_rows(pq.buckets[0].s1, qwen, true, 1, 264), 64);
  EXPECT_EQ(choose_unit_rows(pq.buckets[0].s1, qwen, true, 2, 264), 32);
  EXPECT_EQ(choose_unit_rows(pq.buckets[0].s1, qwen, true, 3, 264), 64);  // 3 x 80 = 5 x 48: tie
  EXPECT_EQ(choose_unit_rows(pq.buckets[0].s1, qwen, true, 4, 264), 64);
  // A plan for at most one token compiles only the size one token takes.
  EXPECT_EQ(make_plan(qwen, 1, "sm_90a").buckets[0].s1.alt_rows, 0);
  EXPECT_EQ(make_plan(tp8, 1, "sm_90a").buckets[0].s1.alt_rows, 16);
  EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s1.alt_rows, 0);
  {
    const ScopedOverride o("u1=16");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    for (const Bucket& b : p.buckets) {
      if (!b.stream) continue;
      EXPECT_EQ(b.s1.unit_rows, 16);
      EXPECT_EQ(b.s1.alt_rows, 0);
      const int budget = b.s1.tma ? 102 * 1024 : 104 * 1024;  // stages re-picked
      EXPECT_EQ(b.s1.stages, budget / stream_stage_bytes(1024, true, 16, b.s1.tma));
      EXPECT_EQ(b.s2.unit_rows, 64);
    }
  }
  {
    const ScopedOverride o("u1=32,u2=32");
    const Plan p = make_plan(tp8, 64, "sm_90a");
    EXPECT_EQ(p.buckets[0].s1.alt_rows, 0);
    EXPECT_EQ(p.buckets[0].s1.unit_rows, 32);
    EXPECT_EQ(p.buckets[0].s1.k_stage, 1024);
    EXPECT_EQ(p.buckets[0].s2.unit_rows, 32);
    EXPECT_EQ(p.buckets[0].s2.k_stage, 256);  // three blocks per SM (and K = 256)
    EXPECT_EQ(choose_unit_rows(p.buckets[0].s1, tp8, true, 1, 264), 32);  // the only one
  }
  for (const char* bad : {"u1=8", "u2=16", "u2=128"}) {
    const ScopedOverride o(bad);
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error) << bad;
  }
}

// Tiled weights of an intermediate size that is not a multiple of 256 (a TP8 shard of
// qwen3-235b-a22b: I 192; GLM-4.5-Air: 1408) are planned as the layer of the padded size
// (kernel_spec): the stream family, the resident one-token layer where it fits, the padded size
// in the plan's text; Plan::layer_spec keeps the layer's. Row-major weights of the same shape keep
// the older family; the kernels of a padded tiled layer are those of the padded size, by text.
// Likewise a padded H, with the kernel that copies rows.
TEST(PlanStream, TiledSizesPaddedTo256) {
  MoeSpec s = preset("qwen3-30b-a3b");
  s.hidden = 4096;
  s.intermediate = 192;
  s.weight_format = WeightFormat::MxInt4G32Tiled;
  const Plan p = make_plan(s, 0, "sm_90a");
  EXPECT_EQ(p.spec.intermediate, 256);
  EXPECT_EQ(p.layer_spec, s);
  EXPECT_EQ(kernel_spec(s), p.spec);
  EXPECT_TRUE(p.buckets[0].stream);
  EXPECT_TRUE(p.buckets[0].resident());
  const std::string padding = "kernels for hidden=4096 intermediate=256 (the tiled weights' padding of 4096 and 192)\n";
  EXPECT_NE(describe(p).find(padding), std::string::npos);
  MoeSpec same = s;
  same.intermediate = 256;
  EXPECT_EQ(describe(make_plan(same, 0, "sm_90a")) + padding, describe(p));
  const auto a = generate_all(p), b = generate_all(make_plan(same, 0, "sm_90a"));
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].source, b[i].source) << a[i].name;
  MoeSpec row_major = s;
  row_major.weight_format = WeightFormat::MxInt4G32;
  EXPECT_EQ(kernel_spec(row_major), row_major);
  EXPECT_FALSE(make_plan(row_major, 0, "sm_90a").buckets[0].stream);
  s.intermediate = 1408;
  EXPECT_EQ(make_plan(s, 0, "sm_90a").spec.intermediate, 1536);
  EXPECT_TRUE(make_plan(s, 0, "sm_90a").buckets[0].stream);
  s.intermediate = 1536;
  EXPECT_EQ(make_plan(s, 0, "sm_90a").spec.intermediate, 1536);
  // No copy of rows where H is not padded; one kernel for both where it is (gpt-oss-120b's H
  // 2880), and a finalize kernel that knows the layer's H for moejit::finalize.
  auto has_rows = [](const Plan& plan) {
    return std::any_of(plan.kernels.begin(), plan.kernels.end(),
                       [](const KernelPlan& k) { return k.role == KernelRole::Rows; });
  };
  EXPECT_FALSE(has_rows(p));
  s.hidden = 2880;
  s.intermediate = 2880;
  const Plan g = make_plan(s, 0, "sm_90a");
  EXPECT_EQ(g.spec.hidden, 3072);
  EXPECT_EQ(g.spec.intermediate, 3072);
  EXPECT_TRUE(g.buckets[0].stream);
  EXPECT_TRUE(has_rows(g));
  for (const KernelSource& src : generate_all(g)) {
    if (src.name == "finalize") {
      EXPECT_THAT(src.source, HasSubstr("kLayerHidden = 2880;"));
    }
  }
}

// Buckets of at most 64 tokens with 8-row tiles on sm_90, H and I multiples of 256.
TEST(PlanStream, ChosenForDecodeOnHopper) {
  auto decode_stream = [](const MoeSpec& s, const std::string& arch) {
    return make_plan(s, 64, arch).buckets[0].stream;
  };
  EXPECT_TRUE(decode_stream(preset("kimi-k2"), "sm_90a"));       // 24.8 MB experts
  EXPECT_TRUE(decode_stream(preset("deepseek-v3"), "sm_90a"));
  EXPECT_FALSE(decode_stream(preset("kimi-k2"), "sm_100a"));  // not measured there
  EXPECT_FALSE(decode_stream(preset("kimi-k2"), "sm_80"));
  EXPECT_FALSE(decode_stream(preset("kimi-k2"), "sm_89"));
  EXPECT_TRUE(decode_stream(preset("qwen3-30b-a3b"), "sm_90a"));  // 2.6 MB experts
  EXPECT_TRUE(decode_stream(preset("kimi-k2-tp8"), "sm_90a"));    // 3.1 MB experts
  MoeSpec odd = preset("kimi-k2");
  odd.hidden = 7168 + 32;  // H % 256 != 0
  EXPECT_FALSE(decode_stream(odd, "sm_90a"));
  // An open-ended bucket keeps 8-row tiles when local experts >= 512 x top_k, but never the
  // stream family (not measured there; its row offsets are 32-bit).
  MoeSpec wide = preset("kimi-k2");
  wide.num_experts = 1024;
  wide.top_k = 1;
  wide.routing = moejit::RoutingMethod::Renormalize;
  wide.n_group = 1;
  wide.topk_group = 1;
  wide.has_routing_bias = false;
  wide.routed_scaling_factor = 1.0;
  const Plan w = make_plan(wide, 0, "sm_90a");
  EXPECT_EQ(w.buckets.back().tile_rows, 8);
  EXPECT_FALSE(w.buckets.back().stream);
  EXPECT_TRUE(w.buckets[0].stream);
  // qwen3's gemm2 (K = I = 768): 256 per stage, 3 stages of 64 rows (18432 B, TMA) in 64 KiB
  // at three blocks per SM; gemm2 never carries smaller unit paths. From 17 tokens its units of
  // three stages take x by 4-row boxes (17408 B stages).
  const Plan q = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a");
  EXPECT_TRUE(q.buckets[0].stream);
  StreamConfig q2{4, 256, 3, 1};
  q2.ring_bytes = 3 * 18432;
  q2.tma = true;
  q2.min_blocks = 3;
  q2.dynamic_units = true;  // 256 units at one token (one round), 128 tiles x 32 at 16 tokens
  q2.x_boxes = false;
  q2.tile_ready = true;  // gemm2 per tile behind gemm1 (up to 16 tokens, and three-stage units)
  q2.evict_first = true;  // H = 2048: at every token count
  EXPECT_EQ(q.buckets[0].s2, q2);
  q2.ring_bytes = 3 * 17408;
  q2.dynamic_units = true;
  q2.x_boxes = true;
  EXPECT_EQ(q.buckets[1].s2, q2);
  {
    // The rule's override, both ways; the stage size follows.
    const ScopedOverride off("xb=0");
    const StreamConfig c = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a").buckets[1].s2;
    EXPECT_FALSE(c.x_boxes);
    EXPECT_EQ(c.ring_bytes, 3 * 18432);
    const ScopedOverride on("xb=1");
    for (const Bucket& b : make_plan(preset("kimi-k2"), 64, "sm_90a").buckets) {
      if (b.stream) {
        EXPECT_TRUE(b.s2.x_boxes);
      }
    }
    const ScopedOverride bad("xb=2");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error);
  }
  // kimi-k2-tp8 (I = 256: one stage per unit, 384 experts): 64 tokens give a touched expert
  // 1.8 rows on average, too few for 4-row boxes. Qwen3-30b-a3b capped at 17 tokens: 1.6 rows.
  const Plan t = make_plan(preset("kimi-k2-tp8"), 64, "sm_90a");
  EXPECT_FALSE(t.buckets[0].s2.x_boxes);
  EXPECT_FALSE(t.buckets[1].s2.x_boxes);
  EXPECT_FALSE(make_plan(preset("qwen3-30b-a3b"), 17, "sm_90a").buckets[1].s2.x_boxes);
  EXPECT_FALSE(q.buckets[0].fused_finalize);
}

// TMA copies (one producer warp, stages padded to 1 KiB) in every stream bucket, gemm1 at two
// blocks per SM and gemm2 at three; tma=0 selects cp.async, tma1= / tma2= one GEMM's copies;
// bps=3: three blocks per SM (the kernel's __launch_bounds__ and 64 KiB rings with k_stage 256).
TEST(PlanStream, TmaRuleAndOverrides) {
  const Plan d = make_plan(preset("kimi-k2"), 64, "sm_90a");
  for (int i : {0, 1}) {
    EXPECT_TRUE(d.buckets[i].s1.tma && d.buckets[i].s2.tma);
    EXPECT_EQ(d.buckets[i].s1.producer_warps, 1);
    EXPECT_EQ(d.buckets[i].s1.min_blocks, 2);
    EXPECT_EQ(d.buckets[i].s2.min_blocks, 3);
  }
  EXPECT_EQ(stream_stage_bytes(256, true, 64, true), 14336);  // 13568 padded to 1 KiB
  {
    const ScopedOverride one("tma1=0");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_FALSE(p.buckets[1].s1.tma);
    EXPECT_EQ(p.buckets[1].s1.producer_warps, 4);
    EXPECT_TRUE(p.buckets[1].s2.tma);
    EXPECT_EQ(p.buckets[1].s2.min_blocks, 3);
  }
  {
    const ScopedOverride two("tma=0,tma2=1");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_FALSE(p.buckets[0].s1.tma);
    EXPECT_TRUE(p.buckets[0].s2.tma);
    EXPECT_EQ(p.buckets[0].s2.producer_warps, 1);
  }
  {
    // bps1= / bps2= set one GEMM; on a cp.async GEMM three blocks per SM do not apply.
    const ScopedOverride one("bps1=3");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_EQ(p.buckets[0].s1.min_blocks, 3);
    EXPECT_EQ(p.buckets[0].s1.k_stage, 256);
    EXPECT_EQ(p.buckets[0].s2.min_blocks, 3);
    const ScopedOverride two("bps2=2");
    EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s2.min_blocks, 2);
    const ScopedOverride cp_async("tma=0,bps=3");
    const Plan c = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_EQ(c.buckets[0].s1.min_blocks, 2);
    EXPECT_EQ(c.buckets[0].s2.min_blocks, 2);
  }
  {
    // An s2= ring beyond the three-block budget (4 x 18432 B > 64 KiB) compiles for two.
    const ScopedOverride big("s2=4x256x4");
    const StreamConfig& c = make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s2;
    EXPECT_EQ(c.stages, 4);
    EXPECT_EQ(c.min_blocks, 2);
  }
  {
    const ScopedOverride off("tma=0");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_FALSE(p.buckets[0].s1.tma || p.buckets[0].s2.tma);
    EXPECT_EQ(p.buckets[0].s1.producer_warps, 4);
  }
  {
    const ScopedOverride three("tma=1,bps=3");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    for (const Bucket& b : p.buckets) {
      if (!b.stream) continue;
      for (const StreamConfig* c : {&b.s1, &b.s2}) {
        EXPECT_EQ(c->min_blocks, 3);
        EXPECT_EQ(c->k_stage, 256);
        EXPECT_LE(c->ring_bytes, 64 * 1024);
        EXPECT_GE(c->stages, 3);  // gemm1 4 of 14336 B, gemm2 3 of 18432 B
      }
    }
    EXPECT_NE(describe(p).find("tma=1 blocks_per_sm=3"), std::string::npos);
  }
  // Presets whose gemm1 also carries 16- and 32-row paths: those take k_stage 256 as well, so
  // that three blocks with their rings, the 1 KiB alignment slack, the static shared memory
  // (8 KiB of partial sums and the mbarriers) and the 1 KiB the driver reserves per block fit
  // in an SM's 228 KiB.
  for (const char* name : {"kimi-k2-tp8", "qwen3-30b-a3b", "seed-test"}) {
    const ScopedOverride three("tma=1,bps=3");
    const Plan p = make_plan(preset(name), 64, "sm_90a");
    for (const Bucket& b : p.buckets) {
      if (!b.stream) continue;
      for (const StreamConfig* c : {&b.s1, &b.s2}) {
        EXPECT_EQ(c->k_stage, 256) << name;
        EXPECT_TRUE(c->k_stage16 == 0 || c->k_stage16 == 256) << name;
        EXPECT_TRUE(c->k_stage32 == 0 || c->k_stage32 == 256) << name;
        EXPECT_LE(c->ring_bytes, 64 * 1024) << name;
        EXPECT_LE(3 * (c->ring_bytes + 1024 + 8192 + 128 + 1024), 228 * 1024) << name;
      }
    }
  }
  EXPECT_GT(make_plan(preset("kimi-k2-tp8"), 64, "sm_90a").buckets[0].s1.alt_rows, 0);
  {
    const ScopedOverride two("bps=2");
    EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s1.min_blocks, 2);
  }
}

// Gemm2 at four blocks per SM (two 256-deep stages, rings within 40 KiB) where it copies tiled
// weights by TMA and its units are at most three stages deep: both decode buckets of
// qwen3-30b-a3b (x boxes above 16 tokens) and kimi-k2-tp8, not row-major weights, not kimi-k2's
// eight-stage units; bps= / bps2= keep their value; four only for gemm2.
TEST(PlanStream, FourGemm2BlocksRule) {
  auto tiled = [](const char* name) {
    MoeSpec s = preset(name);
    s.weight_format = WeightFormat::MxInt4G32Tiled;
    return s;
  };
  const Plan q = make_plan(tiled("qwen3-30b-a3b"), 64, "sm_90a");
  EXPECT_EQ(q.buckets[0].s2.min_blocks, 4);
  EXPECT_EQ(q.buckets[0].s2.stages, 2);
  EXPECT_EQ(q.buckets[0].s2.k_stage, 256);
  EXPECT_LE(q.buckets[0].s2.ring_bytes, 40 * 1024);
  // Rings, alignment slack, static shared memory and the driver's 1 KiB: four fit in 228 KiB.
  EXPECT_LE(4 * (q.buckets[0].s2.ring_bytes + 1024 + 8192 + 128 + 1024), 228 * 1024);
  EXPECT_TRUE(q.buckets[1].s2.x_boxes);
  EXPECT_EQ(q.buckets[1].s2.min_blocks, 4);
  EXPECT_LE(q.buckets[1].s2.ring_bytes, 40 * 1024);
  EXPECT_NE(describe(q).find("blocks_per_sm=4"), std::string::npos);
  const Plan t = make_plan(tiled("kimi-k2-tp8"), 64, "sm_90a");
  EXPECT_EQ(t.buckets[0].s2.min_blocks, 4);
  EXPECT_EQ(t.buckets[1].s2.min_blocks, 4);
  EXPECT_EQ(t.buckets[0].s1.min_blocks, 2);
  for (const char* name : {"qwen3-30b-a3b", "kimi-k2-tp8"}) {
    const Plan r = make_plan(preset(name), 64, "sm_90a");  // row-major
    EXPECT_EQ(r.buckets[0].s2.min_blocks, 3) << name;
  }
  // Gemm2's blocks per SM of a spec's bucket, with an override.
  auto blocks2 = [](const MoeSpec& s, const char* o, int bucket = 0) {
    const ScopedOverride scoped(o);
    return make_plan(s, 64, "sm_90a").buckets[bucket].s2.min_blocks;
  };
  EXPECT_EQ(blocks2(tiled("kimi-k2"), "", 0), 3);
  EXPECT_EQ(blocks2(tiled("kimi-k2"), "", 1), 3);
  EXPECT_EQ(blocks2(tiled("kimi-k2-tp8"), "bps2=3"), 3);
  EXPECT_EQ(blocks2(tiled("qwen3-30b-a3b"), "bps=3"), 3);
  EXPECT_EQ(blocks2(preset("kimi-k2"), "bps2=4"), 4);
  {
    const ScopedOverride four("bps2=4");
    EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s2.stages, 2);
  }
  for (const char* bad : {"bps=4", "bps1=4", "bps2=5"}) {
    const ScopedOverride o(bad);
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error) << bad;
  }
}

// Group columns for tiles of few rows (StreamConfig::group_cols: gemm1 up to two rows, "gcr=1"
// one; gemm2 one): stream buckets whose gemm1 copies tiled w13 by TMA in 512-deep stages with the
// split epilogue, and whose gemm2 copies tiled w2 by TMA in packed units of 256- or 512-deep
// stages; a chain's GEMMs as well (its gemm2 only with bf16 operands); not row-major weights;
// "gc=0" / "gc2=0" switch each off. The kernels carry it as Cfg::kGroupCols.
TEST(PlanStream, GroupColumnsRule) {
  auto tiled = [](const char* name) {
    MoeSpec s = preset(name);
    s.weight_format = WeightFormat::MxInt4G32Tiled;
    return s;
  };
  // Cfg::kGroupCols of each stream configuration in a kernel's source ("2,1" for a chain).
  auto gc_rows = [](const Plan& p, const char* kernel) {
    static const std::regex re("kGroupCols = ([0-9]+);");
    for (const KernelSource& k : generate_all(p))
      if (k.name == kernel) {
        std::string rows;
        for (std::sregex_iterator it(k.source.begin(), k.source.end(), re), end; it != end; ++it)
          rows += (rows.empty() ? "" : ",") + (*it)[1].str();
        return rows;
      }
    ADD_FAILURE() << "no kernel " << kernel;
    return std::string();
  };
  auto count = [](const std::string& text, const std::string& word) {
    size_t n = 0;
    for (size_t at = text.find(word); at != std::string::npos; at = text.find(word, at + 1)) ++n;
    return n;
  };
  for (const char* name : {"qwen3-30b-a3b", "kimi-k2-tp8", "kimi-k2"}) {
    const Plan t = make_plan(tiled(name), 64, "sm_90a");
    EXPECT_EQ(t.buckets[0].s1.group_cols, 2) << name;  // gemm1: tiles of up to two rows
    EXPECT_EQ(t.buckets[0].s2.group_cols, 1) << name;
    EXPECT_GE(count(describe(t), "group_cols=2"), 2u) << name;  // both GEMMs of buckets 0 and 1
    EXPECT_GE(count(describe(t), "group_cols=1"), 2u) << name;
    EXPECT_EQ(gc_rows(t, "gemm1_b0"), "2") << name;
    EXPECT_EQ(gc_rows(t, "gemm2_b0"), "1") << name;
    EXPECT_EQ(gc_rows(t, "gemm2_b1"), "1") << name;
    const Plan r = make_plan(preset(name), 64, "sm_90a");  // row-major
    EXPECT_EQ(r.buckets[0].s1.group_cols, 0) << name;
    EXPECT_EQ(r.buckets[0].s2.group_cols, 0) << name;
    EXPECT_EQ(gc_rows(r, "gemm1_b0"), "0") << name;
    EXPECT_EQ(gc_rows(r, "gemm2_b0"), "0") << name;
  }
  const Plan k = make_plan(tiled("kimi-k2"), 64, "sm_90a");
  ASSERT_GT(k.buckets[0].chain_tokens, 0);
  EXPECT_EQ(k.buckets[0].c1.group_cols, 2);
  EXPECT_EQ(k.buckets[0].c2.group_cols, 1);  // bf16 operands in the chain's gemm2 by default
  EXPECT_EQ(gc_rows(k, "chain_b0"), "2,1");
  {
    const ScopedOverride f16a("f16a=1");  // fp16 operands in the chain's gemm2: no group columns
    const Plan o = make_plan(tiled("kimi-k2"), 64, "sm_90a");
    ASSERT_TRUE(o.buckets[0].c2.f16);
    EXPECT_EQ(o.buckets[0].c1.group_cols, 2);
    EXPECT_EQ(o.buckets[0].c2.group_cols, 0);
  }
  // Each override switches its GEMM off and leaves the other on.
  for (const bool first : {true, false}) {
    const ScopedOverride off(first ? "gc=0" : "gc2=0");
    const Plan o = make_plan(tiled("qwen3-30b-a3b"), 64, "sm_90a");
    EXPECT_EQ(o.buckets[0].s1.group_cols, first ? 0 : 2);
    EXPECT_EQ(o.buckets[0].s2.group_cols, first ? 1 : 0);
    EXPECT_EQ(gc_rows(o, "gemm1_b0"), first ? "0" : "2");
    EXPECT_EQ(gc_rows(o, "gemm2_b0"), first ? "1" : "0");
  }
  {  // "gcr=1": gemm1's one-row tiles only
    const ScopedOverride one("gcr=1");
    const Plan o = make_plan(tiled("qwen3-30b-a3b"), 64, "sm_90a");
    EXPECT_EQ(o.buckets[0].s1.group_cols, 1);
    EXPECT_EQ(gc_rows(o, "gemm1_b0"), "1");
  }
  {
    const ScopedOverride bad("gcr=3");
    EXPECT_THROW(make_plan(tiled("qwen3-30b-a3b"), 64, "sm_90a"), Error);
  }
  // Only in whole stages (the kernels assert it): an "s2=" depth that does not divide I (768 =
  // 1.5 x 512) or an "s1=" depth that does not divide H (2304 = 4.5 x 512) leaves them off.
  {
    const ScopedOverride deep("s2=4x512x2");
    const Plan o = make_plan(tiled("qwen3-30b-a3b"), 64, "sm_90a");
    EXPECT_EQ(o.buckets[0].s2.k_stage, 512);
    EXPECT_EQ(o.buckets[0].s2.group_cols, 0);
    EXPECT_EQ(o.buckets[0].s1.group_cols, 2);
    EXPECT_EQ(gc_rows(o, "gemm2_b0"), "0");
  }
  {
    MoeSpec wide = tiled("qwen3-30b-a3b");
    wide.hidden = 2304;
    EXPECT_EQ(make_plan(wide, 64, "sm_90a").buckets[0].s1.k_stage, 256);  // (the default divides H)
    const ScopedOverride deep("s1=4x512x3");
    const Plan o = make_plan(wide, 64, "sm_90a");
    EXPECT_EQ(o.buckets[0].s1.k_stage, 512);
    EXPECT_EQ(o.buckets[0].s1.group_cols, 0);
    EXPECT_EQ(o.buckets[0].s2.group_cols, 1);
    EXPECT_EQ(gc_rows(o, "gemm1_b0"), "0");
  }
}

TEST(PlanStream, OverrideSwitchesAndShapes) {
  {
    const ScopedOverride off("stream=0");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_FALSE(p.buckets[0].stream);
    EXPECT_TRUE(p.buckets[0].fused_finalize);
  }
  {
    const ScopedOverride hint("sns=0");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_EQ(p.buckets[0].s1.suspend_ns, 0);
    EXPECT_EQ(p.buckets[0].s2.suspend_ns, 0);
    EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s1.suspend_ns, 0);
  }
  EXPECT_EQ(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s1.suspend_ns, 2000);
  EXPECT_TRUE(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s2.pack_planes);
  {
    const ScopedOverride huge("sns=99999999999");
    EXPECT_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"), Error);
  }
  EXPECT_TRUE(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].s1.split_epilogue);
  {
    // Gemm1's early first unit behind the fused route+dispatch block (Cfg::kEarlyRouted): the
    // 1-16 bucket's gemm1 only, and neither with the route kernel (fr=0) nor with eu=0.
    auto routed_in = [](const char* kernel) {
      for (const KernelSource& k : generate_all(make_plan(preset("kimi-k2"), 64, "sm_90a")))
        if (k.name == kernel) return k.source.find("kEarlyRouted = true;") != std::string::npos;
      ADD_FAILURE() << "no kernel " << kernel;
      return false;
    };
    EXPECT_TRUE(routed_in("gemm1_b0"));
    EXPECT_FALSE(routed_in("gemm1_b1"));
    EXPECT_FALSE(routed_in("gemm2_b0"));
    for (const char* o : {"fr=0", "eu=0"}) {
      const ScopedOverride off(o);
      EXPECT_FALSE(routed_in("gemm1_b0")) << o;
    }
  }
  {
    const ScopedOverride joint("sep=0");  // warp 0 sums and stores every unit alone
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_FALSE(p.buckets[0].s1.split_epilogue);
    EXPECT_FALSE(p.buckets[1].s2.split_epilogue);
  }
  // Units from a counter where the bucket's smallest token count gives a GEMM more units than
  // blocks on 132 SMs (units of one stage: more than four rounds), as at one kimi-k2 token
  // (gemm1 512 > 264, gemm2 896 > 396), or where its largest gives more than two rounds: the
  // 1-16 bucket of kimi-k2-tp8 (one token: gemm1 256 16-row units, gemm2 896 one-stage units)
  // and of qwen3-30b-a3b (one token: 192 and 256 units), from their counts at 16 tokens; from 17
  // tokens every GEMM already at the smallest count. Round-robin where neither holds:
  // kimi-k2-tp8's gemm1 in a plan capped at 2 tokens (256 32-row units for 264 blocks; its
  // gemm2's 1792 one-stage units are 4.5 rounds).
  const Plan tp8_2 = make_plan(preset("kimi-k2-tp8"), 2, "sm_90a");
  EXPECT_FALSE(tp8_2.buckets[0].s1.dynamic_units);
  EXPECT_TRUE(tp8_2.buckets[0].s2.dynamic_units);
  for (const char* name : {"kimi-k2", "kimi-k2-tp8", "qwen3-30b-a3b"}) {
    const Plan p = make_plan(preset(name), 64, "sm_90a");
    EXPECT_TRUE(p.buckets[0].s1.dynamic_units) << name;
    EXPECT_TRUE(p.buckets[0].s2.dynamic_units) << name;
    EXPECT_TRUE(p.buckets[1].s1.dynamic_units) << name;
    EXPECT_TRUE(p.buckets[1].s2.dynamic_units) << name;
  }
  {
    const ScopedOverride all("dyn=1");
    EXPECT_TRUE(make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a").buckets[0].s1.dynamic_units);
  }
  {
    const ScopedOverride rr("dyn=0");  // units dealt round-robin
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_FALSE(p.buckets[0].s1.dynamic_units);
    EXPECT_FALSE(p.buckets[1].s2.dynamic_units);
    EXPECT_NE(describe(p).find("dynamic_units=0"), std::string::npos);
  }
  {
    const ScopedOverride unpacked("pack=0");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    EXPECT_FALSE(p.buckets[0].s2.pack_planes);
    EXPECT_NE(describe(p).find("pack_planes=0"), std::string::npos);
  }
  {
    const ScopedOverride shapes("tma=0,s1=4x1024x2x2,s2=4x256x6");
    const Plan p = make_plan(preset("kimi-k2"), 64, "sm_90a");
    StreamConfig s1{4, 1024, 2, 2}, s2{4, 256, 6, 4};  // s2: producer warps kept
    s1.ring_bytes = 2 * stream_stage_bytes(1024, true, 64);
    s2.ring_bytes = 6 * stream_stage_bytes(256, false, 64);
    EXPECT_EQ(p.buckets[0].s1, s1);
    EXPECT_EQ(p.buckets[0].s2, s2);
  }
  {
    const ScopedOverride unfused("stream=0,ff=0");
    EXPECT_FALSE(make_plan(preset("kimi-k2"), 64, "sm_90a").buckets[0].fused_finalize);
  }
  {
    // Three consumer warps: the smaller gemm1 paths' k_stage (1024 = 16 group pairs) does not
    // split over them, so kimi-k2-tp8's bucket 0 leaves them out instead of failing to compile.
    const ScopedOverride three("s1=3x768x3");
    const Plan p = make_plan(preset("kimi-k2-tp8"), 64, "sm_90a");
    EXPECT_EQ(p.buckets[0].s1.consumer_warps, 3);
    EXPECT_EQ(p.buckets[0].s1.alt_rows, 0);
    EXPECT_TRUE(p.buckets[0].s1.tma);
    EXPECT_EQ(p.buckets[0].s1.ring_bytes, 3 * stream_stage_bytes(768, true, 64, true));
  }
  for (const char* bad : {"s1=4x384x3", "s1=3x512x3", "s1=4x512x1", "s1=4x512x3x3",
                          "s1=4x512x12", "s2=4x4096x2", "s1=8x512x3x4",
                          "s2=4x256x10",   // 10 stages: within 200 KiB, above the 8 mbarriers
                          "s1=4x512x3x4",  // TMA (bucket 0) takes one producer warp
                          "tma=1,bps=4", "bps2=1", "bps1=4", "tma=2", "tma1=10", "tma2=x"}) {
    const ScopedOverride o(bad);
    try {
      make_plan(preset("kimi-k2"), 64, "sm_90a");
      ADD_FAILURE() << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument) << bad;
      EXPECT_THAT(e.what(), HasSubstr("MOEJIT_PLAN_OVERRIDE")) << bad;
    }
  }
}

// ---- Plan::max_tiles -------------------------------------------------------------------------
// Calls f(counts) for every vector of `parts` non-negative counts, each <= cap, summing <= total.
void for_each_distribution(int parts, int cap, int total,
                           const std::function<void(const std::vector<int>&)>& f) {
  std::vector<int> c(parts, 0);
  std::function<void(int, int)> rec = [&](int i, int left) {
    if (i == parts) return f(c);
    for (c[i] = 0; c[i] <= std::min(cap, left); ++c[i]) rec(i + 1, left - c[i]);
    c[i] = 0;
  };
  rec(0, total);
}

long long tiles_used(const std::vector<int>& counts, int tile) {
  long long tiles = 0;
  for (int c : counts) tiles += (c + tile - 1) / tile;
  return tiles;
}

// Tokens, k, local experts and tile over a small domain; every distribution of the T*k slots to
// the local experts (slots routed elsewhere drop out) needs at most max_tiles tiles, and some
// distribution needs exactly that many.
TEST(PlanMaxTiles, TightUpperBoundOverEveryDistribution) {
  for (int tokens = 1; tokens <= 4; ++tokens)
    for (int k = 1; k <= 3; ++k)
      for (int local = 1; local <= 4; ++local)
        for (int tile : {1, 2, 3, 4, 8}) {
          const int slots = tokens * k;
          const long long bound = Plan::max_tiles(tokens, k, local, tile);
          long long most = 0;
          for_each_distribution(local, slots, slots, [&](const std::vector<int>& c) {
            most = std::max(most, tiles_used(c, tile));
          });
          EXPECT_EQ(most, bound) << tokens << " " << k << " " << local << " " << tile;
        }
}

// With each token's k experts distinct, an expert receives at most T slots. The bound still
// holds; it is not always reached then (T = 2, k = 2, L = 2, tile 2: bound 3, at most 2 used).
TEST(PlanMaxTiles, UpperBoundWithDistinctExpertsPerToken) {
  for (int tokens = 1; tokens <= 4; ++tokens)
    for (int k = 1; k <= 3; ++k)
      for (int local = 1; local <= 4; ++local)
        for (int tile : {1, 2, 8}) {
          const long long bound = Plan::max_tiles(tokens, k, local, tile);
          for_each_distribution(local, tokens, tokens * k, [&](const std::vector<int>& c) {
            EXPECT_LE(tiles_used(c, tile), bound);
          });
        }
  EXPECT_EQ(Plan::max_tiles(2, 2, 2, 2), 3);
}

TEST(PlanMaxTiles, Values) {
  EXPECT_EQ(Plan::max_tiles(1, 8, 384, 8), 8);        // each slot its own tile
  EXPECT_EQ(Plan::max_tiles(16, 8, 384, 8), 128);     // 128 slots, all on distinct experts
  EXPECT_EQ(Plan::max_tiles(4096, 8, 384, 64), 890);  // (32768 + 384 * 63) / 64
  EXPECT_EQ(Plan::max_tiles(100, 1, 1, 16), 7);       // ceil(100 / 16)
  EXPECT_EQ(Plan::max_tiles(0, 8, 384, 8), 0);
}

// The fused route+dispatch block: buckets of at most 16 tokens, 16 warps (a token each), 8 where
// 16 warps' static shared memory would pass 44 KiB; rdw= caps the warps (tuning).
TEST(PlanRoute, FusedUpToSixteenTokens) {
  const Plan kimi = make_plan(preset("kimi-k2"));
  EXPECT_EQ(kimi.route_dispatch_warps, 16);
  EXPECT_TRUE(kimi.buckets[0].fused_route);
  EXPECT_FALSE(kimi.buckets[1].fused_route);  // 17-64 tokens: route on 4-warp blocks, then dispatch
  EXPECT_EQ(make_plan(preset("deepseek-v3")).route_dispatch_warps, 16);  // grouped: 32012 B
  MoeSpec wide = preset("kimi-k2");
  wide.num_experts = 1024;  // 16 warps: 4 * 4097 + 2 * 16 * 1024 + 2048 + 648 = 51852 B
  EXPECT_EQ(make_plan(wide).route_dispatch_warps, 8);
  {
    const ScopedOverride o("rdw=8");
    EXPECT_EQ(make_plan(preset("kimi-k2")).route_dispatch_warps, 8);
  }
  {
    const ScopedOverride o("rdw=32");
    EXPECT_THROW(make_plan(preset("kimi-k2")), Error);
  }
  MoeSpec huge = preset("deepseek-v3");  // grouped routing: per warp 4 x 1024 + 5 x 8 bytes more
  huge.num_experts = 1024;  // 8 warps: 8 * 4136 + 4 * 4097 + 2 * 8 * 1024 + 2048 + 648 B: none
  EXPECT_EQ(make_plan(huge).route_dispatch_warps, 0);
  EXPECT_FALSE(make_plan(huge).buckets[0].fused_route);
  {
    const ScopedOverride o("rdw=32");  // still rejected where no fused block exists
    EXPECT_THROW(make_plan(huge), Error);
  }
  {
    const ScopedOverride o("fr=0");
    for (const Bucket& b : make_plan(preset("kimi-k2")).buckets) EXPECT_FALSE(b.fused_route);
  }
}

// One token is routed by the whole fused route+dispatch block and by every resident block
// (kBlockRoute) where a lane of one warp would hold more than 4 experts (kimi-k2-tp8's 384, not
// qwen3-30b-a3b's 128); the multi-token route kernel keeps one warp per token; "brt=0|1" forces
// it, any other value is an error.
TEST(PlanOverride, BlockRouting) {
  auto block_route_of = [](const Plan& p) {
    std::map<std::string, bool> out;
    for (const KernelSource& k : generate_all(p)) {
      const bool on = k.source.find("kBlockRoute = true") != std::string::npos;
      const bool off = k.source.find("kBlockRoute = false") != std::string::npos;
      if (on || off) out[k.name] = on;
    }
    return out;
  };
  using Kinds = std::map<std::string, bool>;
  EXPECT_TRUE(make_plan(preset("kimi-k2-tp8")).block_route);
  EXPECT_TRUE(make_plan(preset("kimi-k2")).block_route);
  EXPECT_FALSE(make_plan(preset("qwen3-30b-a3b")).block_route);
  EXPECT_EQ(block_route_of(make_plan(preset("kimi-k2-tp8"))),
            (Kinds{{"route", false}, {"route_dispatch", true}, {"resident_b0", true}}));
  EXPECT_TRUE(make_plan(preset("kimi-k2-tp8")).fused_block_route);
  EXPECT_EQ(block_route_of(make_plan(preset("qwen3-30b-a3b"))),
            (Kinds{{"route", false}, {"route_dispatch", false}, {"resident_b0", false}}));
  {
    const ScopedOverride o("brt=0");
    const Plan p = make_plan(preset("kimi-k2-tp8"));
    EXPECT_FALSE(p.block_route);
    EXPECT_EQ(block_route_of(p), (Kinds{{"route", false}, {"route_dispatch", false}, {"resident_b0", false}}));
  }
  {
    // qwen3-30b-a3b's resident blocks have 32 warps: warp 0 routes there.
    const ScopedOverride o("brt=1");
    const Plan p = make_plan(preset("qwen3-30b-a3b"));
    EXPECT_EQ(p.buckets[0].res.warps, 32);
    EXPECT_EQ(block_route_of(p), (Kinds{{"route", false}, {"route_dispatch", true}, {"resident_b0", false}}));
  }
  {
    // 1024 experts: the fused block (8 warps, 35468 B) has no room for the block's routing
    // (12588 B more than 44 KiB allows); the resident blocks have.
    MoeSpec wide = preset("kimi-k2-tp8");
    wide.num_experts = 1024;
    const Plan p = make_plan(wide);
    EXPECT_EQ(p.route_dispatch_warps, 8);
    EXPECT_TRUE(p.block_route);
    EXPECT_FALSE(p.fused_block_route);
    EXPECT_TRUE(p.buckets[0].res.block_route);
  }
  // Never for the routings it does not serve, even forced.
  for (const char* name : {"deepseek-v3"}) {
    const ScopedOverride o("brt=1");
    EXPECT_FALSE(make_plan(preset(name)).block_route) << name;
  }
  {
    MoeSpec pre = preset("kimi-k2-tp8");
    pre.routing = RoutingMethod::Precomputed;
    pre.has_routing_bias = false;
    pre.routed_scaling_factor = 1.0;
    EXPECT_FALSE(make_plan(pre).block_route);
    EXPECT_FALSE(make_plan(pre).buckets[0].res.block_route);
  }
  const ScopedOverride bad("brt=2");
  EXPECT_THROW(make_plan(preset("kimi-k2-tp8")), moejit::Error);
}

// Kernels whose code differs only in their name share the first one's entry and source
// (KernelSource::same_as), so that the runtime compiles and loads that code once: kimi-k2's
// stream GEMMs of buckets 1-5 (17-1024 tokens) are one gemm1 and one gemm2. Kernels of any other
// difference keep their own: qwen3-30b-a3b's gemm1 of 129-256 tokens copies its weights without
// the evict-first policy of 17-128, and every own-code kernel of a plan differs from every other
// (the name put back to one fixed text).
TEST(Codegen, KernelsOfEqualCodeShareTheFirstOnesEntry) {
  auto same_as = [](const std::vector<KernelSource>& srcs) {
    std::map<std::string, std::string> out;
    for (const KernelSource& s : srcs) out[s.name] = s.same_as < 0 ? "" : srcs.at(s.same_as).name;
    return out;
  };
  const Plan kimi = make_plan(preset("kimi-k2"));
  const std::vector<KernelSource> k = generate_all(kimi);
  ASSERT_EQ(k.size(), kimi.kernels.size());
  std::map<std::string, const KernelSource*> by_name;
  for (size_t i = 0; i < k.size(); ++i) {
    EXPECT_EQ(k[i].name, kimi.kernels[i].name);
    by_name[k[i].name] = &k[i];
  }
  const auto ks = same_as(k);
  for (const char* g : {"gemm1", "gemm2"}) {
    const std::string first = std::string(g) + "_b1";
    EXPECT_EQ(ks.at(std::string(g) + "_b0"), "");
    EXPECT_EQ(ks.at(first), "");
    EXPECT_EQ(ks.at(std::string(g) + "_b6"), "");
    for (int b = 2; b <= 5; ++b) {
      const KernelSource& s = *by_name.at(fmt::format("{}_b{}", g, b));
      EXPECT_EQ(ks.at(s.name), first) << s.name;
      EXPECT_EQ(s.entry, "moejit_" + first) << s.name;
      EXPECT_EQ(s.source, by_name.at(first)->source) << s.name;
      EXPECT_EQ(s.threads, by_name.at(first)->threads) << s.name;
      EXPECT_EQ(s.dynamic_smem, by_name.at(first)->dynamic_smem) << s.name;
    }
  }
  // Own-code kernels: pairwise different once their names are one text.
  auto anonymous = [](const KernelSource& s) {
    std::string t = s.source;
    for (size_t at; (at = t.find(s.name)) != std::string::npos;) t.replace(at, s.name.size(), "@");
    return t;
  };
  for (const char* name : {"kimi-k2", "qwen3-30b-a3b", "kimi-k2-tp8", "seed-test"}) {
    std::map<std::string, std::string> seen;
    for (const KernelSource& s : generate_all(make_plan(preset(name))))
      if (s.same_as < 0) {
        const auto [it, fresh] = seen.emplace(anonymous(s), s.name);
        EXPECT_TRUE(fresh) << name << ": " << s.name << " has the code of " << it->second;
      }
  }
  const auto q = same_as(generate_all(make_plan(preset("qwen3-30b-a3b"))));
  EXPECT_EQ(q.at("gemm1_b2"), "gemm1_b1");
  EXPECT_EQ(q.at("gemm1_b3"), "");
  EXPECT_EQ(q.at("gemm1_b5"), "gemm1_b3");
  // Without TMA bucket 1's GEMMs are bucket 0's (no early unit, no tile hand-off).
  const ScopedOverride o("tma=0");
  const auto c = same_as(generate_all(make_plan(preset("kimi-k2"))));
  EXPECT_EQ(c.at("gemm1_b1"), "gemm1_b0");
  EXPECT_EQ(c.at("gemm2_b1"), "gemm2_b0");
}

// sd=0 keeps the general dispatch block for up to 32 slots (the default places them with one
// warp); tl=0xADDRESS compiles the timeline stamps into every kernel, and nothing else does.
TEST(PlanOverride, SmallDispatchAndTimeline) {
  auto sources = [](const char* preset_name) {
    std::vector<std::string> out;
    for (const KernelSource& k : generate_all(make_plan(preset(preset_name)))) out.push_back(k.source);
    return out;
  };
  EXPECT_TRUE(make_plan(preset("kimi-k2")).small_dispatch);
  for (const std::string& src : sources("kimi-k2-tp8"))
    EXPECT_THAT(src, ::testing::Not(HasSubstr("MOEJIT_TIMELINE")));
  {
    const ScopedOverride o("sd=0");
    const Plan p = make_plan(preset("kimi-k2"));
    EXPECT_FALSE(p.small_dispatch);
    int dispatchers = 0;
    for (const KernelSource& k : generate_all(p))
      if (k.name == "route_dispatch" || k.name == "dispatch") {
        EXPECT_THAT(k.source, HasSubstr("kSmallDispatch = false"));
        ++dispatchers;
      }
    EXPECT_EQ(dispatchers, 2);
  }
  {
    const ScopedOverride o("tl=0x7f0000001000");
    const std::vector<std::string> srcs = sources("kimi-k2-tp8");
    ASSERT_FALSE(srcs.empty());
    for (const std::string& src : srcs)
      EXPECT_THAT(src, HasSubstr("#define MOEJIT_TIMELINE 0x7f0000001000ull"));
  }
  {
    const ScopedOverride o("tl=zz");
    EXPECT_THROW(sources("kimi-k2-tp8"), Error);
  }
}

// Every item of the override is KEY=VALUE with a key the planner or the code generator reads: a
// mistyped key is an error instead of a plan left as it was (a tuning run then compares the
// default with itself).
TEST(PlanOverride, UnknownKeysAreErrors) {
  {
    const ScopedOverride typo("chx=1,gcc=0");
    try {
      make_plan(preset("kimi-k2"), 64, "sm_90a");
      ADD_FAILURE() << "a plan with the unknown key gcc";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr("'gcc=0'"));
      EXPECT_THAT(e.what(), HasSubstr("chx"));  // the known keys are listed
    }
  }
  // Unknown, bare or empty keys; a key given twice; a value not of the key's form (0 or 1, a
  // number, AxBxC, AxBxC[xD], a hex address), which the older substring and prefix matches took
  // in part (sns=5us as 5, sd=00 as sd=0) or ignored (stream=2).
  for (const char* bad : {"ch", "=1", "ch=1;;bogus=2", "res=0 tma", "ltf=1", "gc=0,gc=1", "stream=2",
                          "sd=00", "sns=5us", "bps=3abc", "u1=32x", "bps1=2x512x3", "s1=4x512", "tl=zz",
                          "g1=1x8x64x2", "rkp=", "sns=1234567890"}) {
    const ScopedOverride o(bad);
    EXPECT_THROW(make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a"), Error) << bad;
    EXPECT_THROW(parse_plan_override(bad), Error) << bad;
  }
  // Keys match whole: bps1 does not also set s1 (the s1= regex used to match inside it).
  {
    const Plan plain = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a");
    const ScopedOverride o("bps1=2");
    const Plan p = make_plan(preset("qwen3-30b-a3b"), 64, "sm_90a");
    EXPECT_EQ(p.buckets[0].s1.consumer_warps, plain.buckets[0].s1.consumer_warps);
    EXPECT_EQ(p.buckets[0].s1.k_stage, plain.buckets[0].s1.k_stage);
  }
  {
    const OverrideItems items = parse_plan_override(" ch=1; s1=4x512x3x1,tl=0xAb ");
    ASSERT_EQ(items.size(), 3u);
    EXPECT_EQ(items.at("ch"), "1");
    EXPECT_EQ(items.at("s1"), "4x512x3x1");
    EXPECT_EQ(items.at("tl"), "0xAb");
  }
  // Items separated by ',', ';' or spaces; keys of every kind (flags, choices, shapes, the
  // older family's gN / mbN, the timeline's address).
  const char* good = "ch=1;chx=1 sd=0,ef=1,s1=4x512x3,u2=64,mb1=2,g1=1x8x64,sns=0,tl=0x10,rkp=3584";
  EXPECT_NO_THROW(parse_plan_override(good));
  EXPECT_NO_THROW(parse_plan_override(""));
  const ScopedOverride o(good);
  EXPECT_NO_THROW(make_plan(preset("kimi-k2"), 64, "sm_90a"));
}

// The resident one-token layer (templates/moejit_resident.cuh): bucket 0 of finalized layers on
// sm_90 whose routed weights fit in 132 blocks' shared memory, one extra kernel.
TEST(PlanResident, ChosenWhereTheRoutedWeightsFit) {
  auto res = [](const MoeSpec& s, const std::string& arch = "sm_90a") {
    return make_plan(s, 0, arch).buckets[0];
  };
  // kimi-k2-tp8: 2 x 256 gemm1 units of 8 features and 7168 / 8 gemm2 ones over 132 blocks.
  const Bucket tp8 = res(preset("kimi-k2-tp8"));
  ASSERT_TRUE(tp8.resident());
  EXPECT_EQ(tp8.res, (ResidentConfig{132, 16, 3584, 1, 2, 7, 4, 4, true, 214912, true}));
  EXPECT_EQ(tp8.res.smem, resident_smem_bytes(preset("kimi-k2-tp8"), tp8.res));
  // qwen3-30b-a3b: 8 x 96 gemm1 units (6 per block: 24 (unit, chain) items, so 32 warps),
  // 2048 / 8 gemm2 ones (2 per block).
  const Bucket q = res(preset("qwen3-30b-a3b"));
  ASSERT_TRUE(q.resident());
  EXPECT_EQ(q.res, (ResidentConfig{132, 32, 1024, 1, 6, 2, 4, 4, true, 177664}));
  // Too large for shared memory: kimi-k2 (8 experts of 24.8 MB), deepseek-v3.
  EXPECT_FALSE(res(preset("kimi-k2")).resident());
  EXPECT_FALSE(res(preset("deepseek-v3")).resident());
  // Not finalized, not sm_90, H not a multiple of 256: no resident kernel.
  MoeSpec unfinalized = preset("kimi-k2-tp8");
  unfinalized.finalize = false;
  EXPECT_FALSE(res(unfinalized).resident());
  EXPECT_FALSE(res(preset("kimi-k2-tp8"), "sm_80").resident());
  MoeSpec odd = preset("qwen3-30b-a3b");
  odd.hidden = 2048 + 128;
  EXPECT_FALSE(res(odd).resident());
  // Only bucket 0, and its kernel follows that bucket's GEMMs.
  const Plan plan = make_plan(preset("kimi-k2-tp8"));
  for (size_t b = 1; b < plan.buckets.size(); ++b) EXPECT_FALSE(plan.buckets[b].resident());
  std::vector<std::string> names;
  for (const KernelPlan& k : plan.kernels) names.push_back(k.name);
  const auto it = std::find(names.begin(), names.end(), "resident_b0");
  ASSERT_NE(it, names.end());
  EXPECT_EQ(*(it - 1), "gemm2_b0");
  const KernelPlan& k = plan.kernels[it - names.begin()];
  EXPECT_EQ(k.role, KernelRole::Resident);
  EXPECT_EQ(k.bucket, 0);
  EXPECT_EQ(k.stages, (std::vector<std::string>{"route", "gemm1", "gemm2", "finalize"}));
  const KernelSource src = generate(plan, k);
  EXPECT_TRUE(src.cooperative);
  EXPECT_EQ(src.grid, 132);
  EXPECT_EQ(src.threads, 512);
  EXPECT_EQ(src.dynamic_smem, 214912 + 1024);
  EXPECT_THAT(src.source, HasSubstr("static constexpr int kKP1 = 3584;"));
  EXPECT_THAT(src.source, HasSubstr("moejit_dev::resident_layer<Cfg>(p)"));
}

// Every shape the planner makes resident fits: 227 KiB per block with the slack and the static
// part, at most 30 parts, one copy per thread, one TMA box of 8 * units2 <= 256 rows per slot.
TEST(PlanResident, ConfigurationsFitTheKernel) {
  int resident = 0;
  std::vector<MoeSpec> specs = specs_under_test();
  for (const auto& d : std::vector<std::array<int, 4>>{{512, 256, 16, 4}, {2304, 768, 64, 8},
                                                      {8192, 256, 16, 4}, {16384, 512, 64, 8}}) {
    MoeSpec s = preset("qwen3-30b-a3b");
    s.hidden = d[0];
    s.intermediate = d[1];
    s.num_experts = d[2];
    s.top_k = d[3];
    specs.push_back(s);
  }
  for (MoeSpec spec : specs) {
    spec.finalize = true;
    const Plan plan = make_plan(spec);
    if (!plan.buckets[0].resident()) continue;
    ++resident;
    const ResidentConfig& r = plan.buckets[0].res;
    const int H = spec.hidden;
    EXPECT_EQ(r.smem, resident_smem_bytes(spec, r));
    EXPECT_LE(r.smem + 1024, 227 * 1024);
    EXPECT_EQ(H % r.k_part1, 0);
    EXPECT_EQ(r.k_part1 % 256, 0);
    EXPECT_LE(H / r.k_part1, 30);
    EXPECT_GE(r.window, 1);
    EXPECT_LE(r.units1 * (2 * H / r.k_part1 + 2) + 2 * spec.top_k, r.threads());
    EXPECT_EQ(r.units1, (spec.top_k * (spec.intermediate / 8) + 131) / 132);
    EXPECT_EQ(r.units2, (H / 8 + 131) / 132);
    EXPECT_LE(8 * r.units2, 256);
  }
  EXPECT_GE(resident, 5);  // kimi-k2-tp8, qwen3-30b-a3b and the shapes added here
}

TEST(PlanResident, Overrides) {
  auto bucket0 = [](const char* o, const char* name = "kimi-k2-tp8") {
    const ScopedOverride scoped(o);
    return make_plan(preset(name)).buckets[0];
  };
  EXPECT_FALSE(bucket0("res=0").resident());
  EXPECT_TRUE(bucket0("res=1").resident());
  EXPECT_EQ(bucket0("rkp=7168").res.k_part1, 7168);
  EXPECT_EQ(bucket0("rkp=1024,rwin=3").res.window, 3);
  EXPECT_EQ(bucket0("rkp=1024,rwin=30").res.window, 7);  // at most the parts
  EXPECT_EQ(bucket0("rw=8").res.warps, 8);
  EXPECT_EQ(bucket0("rw=32").res.warps, 32);
  // More than 30 parts: no resident kernel.
  {
    const ScopedOverride scoped("rkp=256");
    MoeSpec wide = preset("qwen3-30b-a3b");
    wide.hidden = 8192;
    wide.intermediate = 256;
    EXPECT_FALSE(make_plan(wide).buckets[0].resident());
  }
  for (const char* bad : {"res=2", "rkp=1000", "rkp=2048", "rw=12"})
    EXPECT_THROW(bucket0(bad), Error) << bad;
}

}  // namespace
}  // namespace moejit::compiler

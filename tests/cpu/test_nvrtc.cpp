// NVRTC without a GPU: every kernel of every preset, in every token bucket, compiled to CUBIN for
// sm_90a and sm_80 through moejit::compile_report(), and the variants that change the generated
// code (each routing method, bf16 logits and bias, UpGate, SwiGLU flags, finalize off, an expert
// range, an odd shape). A kernel passes when its CUBIN is non-empty and ptxas reports registers,
// no spill stores, no spill loads and no stack frame. A compile error fails the test with the
// kernel's name and NVRTC's log (Error::what()).
//
// Each test runs in its own process (gtest_discover_tests) with its own empty disk-cache
// directory, so every kernel really goes through NVRTC; inside one test, kernels with identical
// source are compiled once (the in-process cache), which is why variants that share their GEMMs
// are grouped into one test.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "compiler/plan.h"
#include "moejit/moejit.h"
#include "tests/scoped_plan_override.h"

namespace moejit {
namespace {

// Points MOEJIT_CACHE_DIR at a fresh directory for this process and removes it afterwards.
class FreshCacheDir : public ::testing::Environment {
 public:
  void SetUp() override {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "moejit-nvrtc-test-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << pattern;
    dir_ = pattern;
    ::setenv("MOEJIT_CACHE_DIR", dir_.c_str(), 1);
  }
  void TearDown() override {
    std::error_code ignored;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ignored);
  }

 private:
  std::string dir_;
};
[[maybe_unused]] ::testing::Environment* const kFreshCacheDir =
    ::testing::AddGlobalTestEnvironment(new FreshCacheDir);

const std::vector<std::string>& archs() {
  static const std::vector<std::string> list = {"sm_90a", "sm_80"};
  return list;
}

// "gemm2_b0 (sm_80): 17424 bytes of CUBIN, 46 registers, spill stores 4 B, spill loads 4 B,
// stack 8 B": what a failure prints (a kernel passes with a CUBIN, 1..255 registers and zeros).
std::string describe(const KernelReport& r) {
  return r.name + " (" + r.arch + "): " + std::to_string(r.cubin_bytes) + " bytes of CUBIN, " +
         std::to_string(r.registers) + " registers, spill stores " +
         std::to_string(r.spill_store_bytes) + " B, spill loads " +
         std::to_string(r.spill_load_bytes) + " B, stack " + std::to_string(r.stack_bytes) + " B";
}

// Compiles every kernel of spec's plan for arch (the buckets up to max_tokens; 0: all) and checks
// each one's resources.
void expect_clean_compile(const MoeSpec& spec, const std::string& arch, int max_tokens = 0) {
  CompileOptions options;
  options.arch = arch;
  options.max_tokens = max_tokens;
  std::vector<KernelReport> reports;
  try {
    reports = compile_report(spec, options);
  } catch (const Error& e) {
    FAIL() << "compile_report for " << arch << " threw " << to_string(e.kind()) << ":\n"
           << e.what() << "\nspec:\n"
           << spec_to_ir_text(spec);
  }
  std::map<std::string, KernelReport> by_name;
  for (const KernelReport& r : reports) {
    EXPECT_TRUE(by_name.emplace(r.name, r).second) << "kernel " << r.name << " reported twice";
  }
  const compiler::Plan plan = compiler::make_plan(spec, max_tokens, arch);
  EXPECT_EQ(reports.size(), plan.kernels.size());
  for (const compiler::KernelPlan& k : plan.kernels) {
    auto it = by_name.find(k.name);
    if (it == by_name.end()) {
      ADD_FAILURE() << "plan kernel " << k.name << " is missing from the compile report";
      continue;
    }
    const KernelReport& r = it->second;
    EXPECT_EQ(r.arch, arch) << k.name;
    if (!r.same_as.empty()) {  // compiled once, as the kernel named: the same figures, no compile time
      auto first = by_name.find(r.same_as);
      if (first == by_name.end() || !first->second.same_as.empty()) {
        ADD_FAILURE() << k.name << " shares the code of " << r.same_as << ", which is not a kernel of its own code";
        continue;
      }
      EXPECT_EQ(r.cubin_bytes, first->second.cubin_bytes) << k.name;
      EXPECT_EQ(r.registers, first->second.registers) << k.name;
      EXPECT_EQ(r.compile_ms, 0) << k.name;
    }
    const bool clean = r.cubin_bytes > 0 && r.registers > 0 && r.registers <= 255 &&
                       r.spill_store_bytes == 0 && r.spill_load_bytes == 0 && r.stack_bytes == 0;
    EXPECT_TRUE(clean) << describe(r);
  }
}

// ---- presets ----------------------------------------------------------------------------------

// A test name from a preset name and suffixes (gtest names are [A-Za-z0-9_]).
std::string param_name(std::string name) {
  for (char& c : name)
    if (c == '-') c = '_';
  return name;
}

class NvrtcPreset : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(NvrtcPreset, EveryBucketCompilesWithoutSpills) {
  const auto& [name, arch] = GetParam();
  expect_clean_compile(preset(name), arch);
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcPreset,
                         ::testing::Combine(::testing::ValuesIn(preset_names()),
                                            ::testing::ValuesIn(archs())),
                         [](const ::testing::TestParamInfo<NvrtcPreset::ParamType>& info) {
                           return param_name(std::get<0>(info.param) + "_" + std::get<1>(info.param));
                         });

// ---- the stream family forced on every preset -------------------------------------------------

// Every kernel of preset `name` compiled for sm_90a with MOEJIT_PLAN_OVERRIDE = override_text
// (expect_clean_compile); returns the plan made under it.
compiler::Plan clean_compile_with(const std::string& name, const std::string& override_text) {
  const moejit_test::ScopedPlanOverride scoped(override_text);
  const compiler::Plan plan = compiler::make_plan(preset(name), 0, "sm_90a");
  expect_clean_compile(preset(name), "sm_90a");
  return plan;
}

// MOEJIT_PLAN_OVERRIDE=stream=1: the decode buckets of every preset use the stream GEMMs (the
// default wherever H and I are multiples of 256; forced, so that a later rule change keeps this
// covered), so each preset's stage shapes (k_stage 256, 512 or 1024) compile to sm_90a CUBIN
// without spills, with the rest of the plan.
class NvrtcStreamForced : public ::testing::TestWithParam<std::string> {};

TEST_P(NvrtcStreamForced, EveryBucketCompilesWithoutSpills) {
  EXPECT_TRUE(clean_compile_with(GetParam(), "stream=1").buckets[0].stream);
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcStreamForced, ::testing::ValuesIn(preset_names()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return param_name(info.param);
                         });

// The resident one-token layer's switches (templates/moejit_resident.cuh; bucket 0 only): gemm1
// in one part (rkp = H) or in more parts with several in flight (rkp, rwin), 8 or 32 warps, and
// the timeline diagnostic. (The default configuration compiles in NvrtcPreset.)
class NvrtcResident : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(NvrtcResident, CompilesWithoutSpills) {
  const auto& [name, override_text] = GetParam();
  const moejit_test::ScopedPlanOverride scoped(override_text);
  const compiler::Plan plan = compiler::make_plan(preset(name), 1, "sm_90a");
  ASSERT_TRUE(plan.buckets[0].resident()) << override_text;
  EXPECT_TRUE(std::any_of(plan.kernels.begin(), plan.kernels.end(),
                          [](const compiler::KernelPlan& k) { return k.name == "resident_b0"; }));
  expect_clean_compile(preset(name), "sm_90a", 1);
}

INSTANTIATE_TEST_SUITE_P(
    All, NvrtcResident,
    ::testing::Values(std::make_tuple("kimi-k2-tp8", "rkp=7168"),
                      std::make_tuple("kimi-k2-tp8", "rkp=1024,rwin=3"),
                      std::make_tuple("kimi-k2-tp8", "rw=8"), std::make_tuple("kimi-k2-tp8", "rw=32"),
                      std::make_tuple("kimi-k2-tp8", "tl=0x7f0000001000"),
                      std::make_tuple("qwen3-30b-a3b", "rkp=2048"),
                      std::make_tuple("qwen3-30b-a3b", "rkp=512,rwin=2"),
                      std::make_tuple("qwen3-30b-a3b", "rw=8"),
                      std::make_tuple("qwen3-30b-a3b", "tl=0x7f0000001000")),
    [](const ::testing::TestParamInfo<NvrtcResident::ParamType>& info) {
      std::string o = std::get<1>(info.param);
      for (char& c : o)
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      return param_name(std::get<0>(info.param) + "_" + o);
    });

// The copy paths of the stream GEMMs forced on every preset: TMA with both GEMMs at three blocks
// per SM (bps=3: 64 KiB rings, __launch_bounds__(160, 3)), and cp.async in every decode bucket
// (tma=0; by default every decode bucket takes TMA, gemm1 at two blocks per SM, gemm2 at three).
class NvrtcStreamCopyPaths
    : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(NvrtcStreamCopyPaths, EveryBucketCompilesWithoutSpills) {
  const auto& [name, override_text] = GetParam();
  EXPECT_EQ(clean_compile_with(name, override_text).buckets[0].s1.tma,
            override_text.find("tma=1") != std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcStreamCopyPaths,
                         ::testing::Combine(::testing::ValuesIn(preset_names()),
                                            ::testing::Values("stream=1,tma=1,bps=3",
                                                              "stream=1,tma=0")),
                         [](const ::testing::TestParamInfo<NvrtcStreamCopyPaths::ParamType>& info) {
                           return param_name(std::get<0>(info.param) +
                                             (std::get<1>(info.param).find("tma=1") != std::string::npos
                                                  ? "_tma_bps3"
                                                  : "_cp_async"));
                         });

// Plan switches that change the stream GEMMs' code: units dealt round-robin in every bucket
// (dyn=0; by default every stream GEMM of these presets takes them from the counter), and the
// timeline diagnostic (tl=ADDRESS: %globaltimer stamps and per-block records
// compiled into every kernel, what `moejit bench --timeline` runs), alone and together; gemm2's
// x by 4-row TMA boxes in every bucket (xb=1) or in none (xb=0); gemm1's first unit copied
// before its wait in no bucket (eu=0) or in every bucket, the one-token one included (fr=0,dyn=1:
// a separate dispatch kernel and units from the counter, which its 16- and 32-row paths take);
// gemm2 per tile behind gemm1 in no bucket (trd=0: the kernels that wait for gemm1's grid) or
// in both (trd=1; kimi-k2-tp8's one-stage gemm2 units from 17 tokens included); dynamic units
// fetched at the unit's last stage with the integer atomic (uf=0).
class NvrtcStreamSwitches
    : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(NvrtcStreamSwitches, EveryBucketCompilesWithoutSpills) {
  const auto& [name, override_text] = GetParam();
  const compiler::Plan plan = clean_compile_with(name, override_text);
  EXPECT_EQ(plan.buckets[0].s1.dynamic_units, override_text.find("dyn=0") == std::string::npos);
  if (override_text.rfind("xb=", 0) == 0) {
    for (int b = 0; b < 2; ++b) EXPECT_EQ(plan.buckets[b].s2.x_boxes, override_text == "xb=1");
  }
  if (override_text == "eu=0" || override_text == "fr=0,dyn=1") {
    for (int b = 0; b < 2; ++b) EXPECT_EQ(plan.buckets[b].s1.early_unit, override_text != "eu=0");
  }
  if (override_text.rfind("trd=", 0) == 0) {
    for (int b = 0; b < 2; ++b) {
      EXPECT_EQ(plan.buckets[b].s1.tile_ready, override_text == "trd=1");
      EXPECT_EQ(plan.buckets[b].s2.tile_ready, override_text == "trd=1");
    }
  }
  if (override_text == "uf=0") {
    for (int b = 0; b < 2; ++b) EXPECT_FALSE(plan.buckets[b].s1.early_fetch || plan.buckets[b].s2.early_fetch);
  }
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcStreamSwitches,
                         ::testing::Combine(::testing::Values("kimi-k2-tp8", "qwen3-30b-a3b"),
                                            ::testing::Values("dyn=0", "tl=0x7f0000001000",
                                                              "dyn=0,tl=0x7f0000001000", "xb=1", "xb=0", "eu=0",
                                                              "fr=0,dyn=1", "trd=0", "trd=1", "uf=0")),
                         [](const ::testing::TestParamInfo<NvrtcStreamSwitches::ParamType>& info) {
                           const std::string& o = std::get<1>(info.param);
                           return param_name(std::get<0>(info.param) +
                                             (o.find("dyn=0") != std::string::npos ? "_rr" : "") +
                                             (o.find("tl=") != std::string::npos ? "_timeline" : "") +
                                             (o.rfind("xb=", 0) == 0 ? "_" + o.substr(0, 2) + o.substr(3) : "") +
                                             (o == "eu=0" ? "_eu0" : "") + (o.find("fr=0") != std::string::npos ? "_fr0" : "") +
                                             (o.rfind("trd=", 0) == 0 ? "_trd" + o.substr(4) : "") +
                                             (o == "uf=0" ? "_uf0" : ""));
                         });

// The big-tile GEMMs' settings (PlanGemm.BigTiles) compile without spills: every bucket, the
// older family's last one on big tiles.
class NvrtcBigTileSwitches : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(NvrtcBigTileSwitches, EveryBucketCompilesWithoutSpills) {
  const auto& [name, override_text] = GetParam();
  const compiler::Plan plan = clean_compile_with(name, override_text);
  EXPECT_TRUE(plan.buckets.back().gemm1.big && plan.buckets.back().gemm2.big);
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcBigTileSwitches,
                         ::testing::Values(std::make_tuple("qwen3-30b-a3b", "bt=128"),
                                           std::make_tuple("qwen3-30b-a3b", "bw=64"),
                                           std::make_tuple("kimi-k2", "bw=64,bst=6,bo=0")),
                         [](const ::testing::TestParamInfo<NvrtcBigTileSwitches::ParamType>& info) {
                           std::string o = std::get<1>(info.param);
                           for (char& c : o) c = std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
                           return param_name(std::get<0>(info.param) + "_" + o);
                         });

// The layers Differential.BigTiles runs on the GPU, with 64- and 128-row tiles: every kernel
// compiles without spills and the last bucket is on big tiles (a setting the planner allowed but
// the kernel rejected surfaced only at run time once: bench/RESULTS.md section 55h).
class NvrtcBigTileShapes : public ::testing::TestWithParam<std::string> {};

TEST_P(NvrtcBigTileShapes, EveryBucketCompilesWithoutSpills) {
  // Kimi-K2's DeepSeekV3 routing (bias, scale), grouped, on 16 experts at top-4, H 512, I 256,
  // every SwiGLU option, up/gate rows, rank [6, 16).
  MoeSpec ep = preset("kimi-k2");
  ep.hidden = 512;
  ep.intermediate = 256;
  ep.num_experts = 16;
  ep.top_k = 4;
  ep.n_group = 4;
  ep.topk_group = 2;
  ep.swiglu_alpha = ep.swiglu_beta = ep.swiglu_limit = true;
  ep.gate_up_order = GateUpOrder::UpGate;
  ep.local_expert_offset = 6;
  ep.local_num_experts = 10;
  MoeSpec tiled = preset("qwen3-30b-a3b");
  tiled.weight_format = WeightFormat::MxInt4G32Tiled;
  MoeSpec narrow = preset("qwen3-30b-a3b");  // gemm2 on blocks of 4 warps
  narrow.hidden = 576;
  narrow.intermediate = 192;
  narrow.num_experts = 8;
  narrow.top_k = 2;
  const moejit_test::ScopedPlanOverride scoped(GetParam());
  for (const MoeSpec& s : {ep, tiled, narrow}) {
    SCOPED_TRACE(spec_to_ir_text(s));
    const compiler::Plan plan = compiler::make_plan(s, 0, "sm_90a");
    EXPECT_TRUE(plan.buckets.back().gemm1.big && plan.buckets.back().gemm2.big);
    EXPECT_EQ(plan.buckets.back().tile_rows, GetParam() == "bt=128" ? 128 : 64);
    expect_clean_compile(s, "sm_90a");
  }
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcBigTileShapes, ::testing::Values("bt=64", "bt=128"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return param_name(info.param == "bt=64" ? "tile64" : "tile128");
                         });

// Stage depths set by an override that do not divide K: the planner leaves group columns off
// there, since their paths take whole stages only (an "s2=4x512x2" over qwen3-30b-a3b's I = 768
// once planned them and failed at NVRTC's static assertion, bench/RESULTS.md section 60). Tiled
// weights, the decode buckets up to 16 tokens (where the first GEMM's groups can be columns).
class NvrtcPartialStages : public ::testing::TestWithParam<std::string> {};

TEST_P(NvrtcPartialStages, CompileWithoutSpills) {
  MoeSpec s = preset("qwen3-30b-a3b");
  s.weight_format = WeightFormat::MxInt4G32Tiled;
  if (GetParam().rfind("s1=", 0) == 0) s.hidden = 2304;  // 4.5 stages of 512
  const moejit_test::ScopedPlanOverride scoped(GetParam());
  const compiler::Plan plan = compiler::make_plan(s, 16, "sm_90a");
  const compiler::StreamConfig& c = GetParam().rfind("s1=", 0) == 0 ? plan.buckets[0].s1 : plan.buckets[0].s2;
  EXPECT_EQ(c.k_stage, 512);
  EXPECT_EQ(c.group_cols, 0);
  expect_clean_compile(s, "sm_90a", 16);
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcPartialStages, ::testing::Values("s1=4x512x3", "s2=4x512x2"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return param_name(info.param.substr(0, 2));
                         });

// ---- variants ---------------------------------------------------------------------------------

// A named spec change.
struct Variant {
  std::string name;
  std::function<void(MoeSpec&)> edit;
};

// Variants of one preset compiled in one process: kernels they share are compiled once.
struct VariantGroup {
  std::string name;  // test name suffix
  std::string base;  // preset
  std::vector<Variant> variants;
};

std::vector<Variant> routing_variants() {
  std::vector<Variant> out;
  for (RoutingMethod m :
       {RoutingMethod::Default, RoutingMethod::Renormalize, RoutingMethod::RenormalizeNaive,
        RoutingMethod::TopK, RoutingMethod::SigmoidRenorm, RoutingMethod::Sigmoid,
        RoutingMethod::TopKSigmoid, RoutingMethod::Precomputed}) {
    out.push_back({to_string(m), [m](MoeSpec& s) { s.routing = m; }});
  }
  out.push_back({"DeepSeekV3 n_group=1 without bias", [](MoeSpec& s) {
                   s.routing = RoutingMethod::DeepSeekV3;
                   s.routed_scaling_factor = 2.5;
                 }});
  out.push_back({"DeepSeekV3 n_group=8 topk_group=4, bf16 logits and bias", [](MoeSpec& s) {
                   s.routing = RoutingMethod::DeepSeekV3;
                   s.n_group = 8;
                   s.topk_group = 4;
                   s.has_routing_bias = true;
                   s.logits_dtype = DType::BF16;
                   s.bias_dtype = DType::BF16;
                 }});
  out.push_back({"bf16 logits", [](MoeSpec& s) { s.logits_dtype = DType::BF16; }});
  return out;
}

std::function<void(MoeSpec&)> local_experts(int offset, int count) {
  return [=](MoeSpec& s) {
    s.local_expert_offset = offset;
    s.local_num_experts = count;
  };
}

std::function<void(MoeSpec&)> shape(int hidden, int intermediate, int experts, int top_k) {
  return [=](MoeSpec& s) {
    s.hidden = hidden;
    s.intermediate = intermediate;
    s.num_experts = experts;
    s.top_k = top_k;
  };
}

// qwen3-30b-a3b's preset with tiled weights and H, I and top-k of its own.
std::function<void(MoeSpec&)> tiled_qwen3_shape(int hidden, int intermediate, int top_k) {
  return [=](MoeSpec& s) {
    s = preset("qwen3-30b-a3b");
    shape(hidden, intermediate, s.num_experts, top_k)(s);
    s.weight_format = WeightFormat::MxInt4G32Tiled;
  };
}

const std::vector<VariantGroup>& variant_groups() {
  static const std::vector<VariantGroup> groups = {
      // Only the route kernel differs between these.
      {"routing_methods", "qwen3-30b-a3b", routing_variants()},
      // top_k = 1 changes the tiles, so every GEMM.
      {"llama4",
       "qwen3-30b-a3b",
       {{"Llama4 top_k=1",
         [](MoeSpec& s) {
           s.routing = RoutingMethod::Llama4;
           s.top_k = 1;
         }}}},
      // Only gemm1's activation epilogue differs between these.
      {"gemm1_epilogues",
       "kimi-k2",
       {{"UpGate order", [](MoeSpec& s) { s.gate_up_order = GateUpOrder::UpGate; }},
        {"swiglu alpha+beta+limit",
         [](MoeSpec& s) { s.swiglu_alpha = s.swiglu_beta = s.swiglu_limit = true; }},
        {"swiglu limit only", [](MoeSpec& s) { s.swiglu_limit = true; }},
        {"UpGate with swiglu alpha+beta",
         [](MoeSpec& s) {
           s.gate_up_order = GateUpOrder::UpGate;
           s.swiglu_alpha = s.swiglu_beta = true;
         }},
        {"finalize off", [](MoeSpec& s) { s.finalize = false; }}}},
      {"expert_range", "kimi-k2", {{"experts [96, 144)", local_experts(96, 48)}}},
      // Tiled weights: every weight-reading kernel (stream, chain, older family, resident) and
      // the prepare kernel, on the three benchmarked presets' shapes.
      {"tiled_weights",
       "kimi-k2",
       {{"kimi-k2 tiled", [](MoeSpec& s) { s.weight_format = WeightFormat::MxInt4G32Tiled; }},
        {"qwen3-30b-a3b tiled",
         [](MoeSpec& s) {
           s = preset("qwen3-30b-a3b");
           s.weight_format = WeightFormat::MxInt4G32Tiled;
         }},
        // (Gemm2 at four blocks per SM, 96 registers, with the largest SwiGLU epilogue.)
        {"qwen3-30b-a3b tiled swiglu alpha+beta+limit",
         [](MoeSpec& s) {
           s = preset("qwen3-30b-a3b");
           s.weight_format = WeightFormat::MxInt4G32Tiled;
           s.swiglu_alpha = s.swiglu_beta = s.swiglu_limit = true;
         }},
        // (An intermediate size padded from 1408 to 1536: the kernels of I 1536, by the plan; then
        // gpt-oss-120b's H and I, 2880, padded to 3072, with the kernel that copies rows.)
        {"qwen3-30b-a3b tiled H=4096 I=1408 (padded)", tiled_qwen3_shape(4096, 1408, 8)},
        {"qwen3-30b-a3b tiled H=2880 I=2880 (padded)", tiled_qwen3_shape(2880, 2880, 4)},
        {"kimi-k2-tp8 tiled experts [96, 144)",
         [](MoeSpec& s) {
           s = preset("kimi-k2-tp8");
           s.weight_format = WeightFormat::MxInt4G32Tiled;
           s.local_expert_offset = 96;
           s.local_num_experts = 48;
         }}}},
      // Multiples of 32 that are not of 64, an expert count that is not a power of two.
      {"odd_shape", "qwen3-30b-a3b", {{"H=96 I=160 E=60 k=6", shape(96, 160, 60, 6)}}},
  };
  return groups;
}

class NvrtcVariant : public ::testing::TestWithParam<std::tuple<size_t, std::string>> {};

TEST_P(NvrtcVariant, EveryBucketCompilesWithoutSpills) {
  const auto& [index, arch] = GetParam();
  const VariantGroup& group = variant_groups()[index];
  for (const Variant& v : group.variants) {
    SCOPED_TRACE(group.base + " with " + v.name);
    MoeSpec spec = preset(group.base);
    v.edit(spec);
    expect_clean_compile(spec, arch);
  }
}

INSTANTIATE_TEST_SUITE_P(All, NvrtcVariant,
                         ::testing::Combine(::testing::Range<size_t>(0, variant_groups().size()),
                                            ::testing::ValuesIn(archs())),
                         [](const ::testing::TestParamInfo<NvrtcVariant::ParamType>& info) {
                           return variant_groups()[std::get<0>(info.param)].name + "_" +
                                  std::get<1>(info.param);
                         });

}  // namespace
}  // namespace moejit

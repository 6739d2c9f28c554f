// MoeSpec: one test per validation rule (kind + a message naming field, value and rule),
// presets, equality, names of enumerators.
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <regex>
#include <string>
#include <vector>

#include "moejit/moejit.h"

namespace moejit {
namespace {

using ::testing::HasSubstr;

// A small valid spec that each case below breaks in exactly one way.
MoeSpec base_spec() {
  MoeSpec s;
  s.hidden = 256;
  s.intermediate = 128;
  s.num_experts = 8;
  s.top_k = 2;
  s.routing = RoutingMethod::Renormalize;
  return s;
}

MoeSpec deepseek(int experts, int n_group, int topk_group, int top_k) {
  MoeSpec s = base_spec();
  s.routing = RoutingMethod::DeepSeekV3;
  s.num_experts = experts;
  s.n_group = n_group;
  s.topk_group = topk_group;
  s.top_k = top_k;
  return s;
}

// Returns the message of the InvalidSpec error validate() throws, or fails the test.
std::string invalid_message(const MoeSpec& s) {
  try {
    s.validate();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidSpec);
    return e.what();
  }
  ADD_FAILURE() << "validate() accepted the spec";
  return {};
}

struct RuleCase {
  const char* name;
  std::function<void(MoeSpec&)> edit;  // applied to base_spec()
  std::vector<const char*> expected;   // substrings of the message: field, value, rule
};

class SpecRule : public ::testing::TestWithParam<RuleCase> {};

TEST_P(SpecRule, ThrowsInvalidSpecNamingFieldValueAndRule) {
  MoeSpec s = base_spec();
  GetParam().edit(s);
  const std::string message = invalid_message(s);
  for (const char* part : GetParam().expected) EXPECT_THAT(message, HasSubstr(part));
}

const RuleCase kRuleCases[] = {
    {"HiddenPositive", [](MoeSpec& s) { s.hidden = 0; }, {"hidden = 0 must be > 0"}},
    {"HiddenMultipleOf32",
     [](MoeSpec& s) { s.hidden = 100; },
     {"hidden = 100 is not a multiple of 32 (MXINT4 group size)"}},
    {"HiddenCap",
     [](MoeSpec& s) { s.hidden = 65536 + 32; },
     {"hidden = 65568", "exceeds the sanity cap of 65536"}},
    {"IntermediatePositive",
     [](MoeSpec& s) { s.intermediate = -32; },
     {"intermediate = -32 must be > 0"}},
    {"IntermediateMultipleOf32",
     [](MoeSpec& s) { s.intermediate = 48; },
     {"intermediate = 48 is not a multiple of 32"}},
    {"IntermediateCap",
     [](MoeSpec& s) { s.intermediate = 131072; },
     {"intermediate = 131072", "sanity cap of 65536"}},
    {"ExpertsAtLeastOne",
     [](MoeSpec& s) { s.num_experts = 0; },
     {"num_experts = 0 is outside [1, 1024]"}},
    {"ExpertsAtMost1024",
     [](MoeSpec& s) { s.num_experts = 1025; },
     {"num_experts = 1025 is outside [1, 1024]"}},
    {"TopKAtLeastOne", [](MoeSpec& s) { s.top_k = 0; }, {"top_k = 0 must be >= 1"}},
    {"TopKAtMostExperts", [](MoeSpec& s) { s.top_k = 9; }, {"top_k = 9 exceeds num_experts = 8"}},
    {"TopKAtMost32",
     [](MoeSpec& s) {
       s.num_experts = 64;
       s.top_k = 33;
     },
     {"top_k = 33 exceeds the maximum of 32"}},
    {"NGroupAtLeastOne",
     [](MoeSpec& s) { s = deepseek(8, 0, 1, 2); },
     {"n_group = 0 must be >= 1"}},
    {"NGroupDividesExperts",
     [](MoeSpec& s) { s = deepseek(8, 3, 1, 2); },
     {"n_group = 3 does not divide num_experts = 8"}},
    {"TopkGroupAtLeastOne",
     [](MoeSpec& s) { s = deepseek(8, 2, 0, 2); },
     {"topk_group = 0 is outside [1, n_group = 2]"}},
    {"TopkGroupAtMostNGroup",
     [](MoeSpec& s) { s = deepseek(8, 2, 3, 2); },
     {"topk_group = 3 is outside [1, n_group = 2]"}},
    {"NGroupOnlyDeepSeek",
     [](MoeSpec& s) { s.n_group = 2; },
     {"n_group = 2", "only supported with routing = DeepSeekV3", "routing = Renormalize"}},
    {"TopkGroupOnlyDeepSeek",
     [](MoeSpec& s) {
       s.n_group = 2;
       s.topk_group = 2;
     },
     {"topk_group = 2", "only supported with routing = DeepSeekV3"}},
    {"TwoExpertsPerGroup",
     [](MoeSpec& s) { s = deepseek(8, 8, 1, 1); },
     {"n_group = 8 leaves 1 expert per group", "needs >= 2", "top-2"}},
    {"TopKWithinKeptGroups",
     [](MoeSpec& s) { s = deepseek(16, 4, 1, 8); },
     {"top_k = 8 exceeds the 4 experts in the topk_group = 1 kept groups"}},
    {"ScalePositive",
     [](MoeSpec& s) { s.routed_scaling_factor = 0; },
     {"routed_scaling_factor = 0 must be finite and > 0"}},
    {"ScaleNegative",
     [](MoeSpec& s) { s.routed_scaling_factor = -2.5; },
     {"routed_scaling_factor = -2.5 must be finite"}},
    {"ScaleNotNaN",
     [](MoeSpec& s) { s.routed_scaling_factor = std::nan(""); },
     {"routed_scaling_factor = nan must be finite"}},
    {"ScaleNotInfinite",
     [](MoeSpec& s) { s.routed_scaling_factor = std::numeric_limits<double>::infinity(); },
     {"routed_scaling_factor = inf must be finite"}},
    {"ScaleUnderflowsFloat",
     [](MoeSpec& s) {
       s = deepseek(8, 1, 1, 2);
       s.routed_scaling_factor = 1e-50;
     },
     {"routed_scaling_factor = 1e-50 is outside the normal float range", "fp32"}},
    {"ScaleSubnormalFloat",
     [](MoeSpec& s) {
       s = deepseek(8, 1, 1, 2);
       s.routed_scaling_factor = 1e-40;
     },
     {"routed_scaling_factor = 1e-40 is outside the normal float range"}},
    {"ScaleOverflowsFloat",
     [](MoeSpec& s) {
       s = deepseek(8, 1, 1, 2);
       s.routed_scaling_factor = 1e39;
     },
     {"routed_scaling_factor = 1e+39 is outside the normal float range"}},
    {"ScaleOnlyDeepSeek",
     [](MoeSpec& s) { s.routed_scaling_factor = 2.5; },
     {"routed_scaling_factor = 2.5 (!= 1) is only supported with routing = DeepSeekV3",
      "routing = Renormalize"}},
    {"RoutingInEnum",
     [](MoeSpec& s) { s.routing = static_cast<RoutingMethod>(42); },
     {"routing = 42 is not one of its enumeration's values"}},
    {"LogitsDtypeInEnum",
     [](MoeSpec& s) { s.logits_dtype = static_cast<DType>(5); },
     {"logits_dtype = 5 is not one of its enumeration's values"}},
    {"BiasDtypeInEnum",
     [](MoeSpec& s) { s.bias_dtype = static_cast<DType>(-1); },
     {"bias_dtype = -1 is not one of its enumeration's values"}},
    {"GateUpOrderInEnum",
     [](MoeSpec& s) { s.gate_up_order = static_cast<GateUpOrder>(5); },
     {"gate_up_order = 5 is not one of its enumeration's values"}},
    {"BiasOnlyDeepSeek",
     [](MoeSpec& s) { s.has_routing_bias = true; },
     {"has_routing_bias = true is only supported with routing = DeepSeekV3",
      "routing = Renormalize"}},
    {"Llama4TopOne",
     [](MoeSpec& s) { s.routing = RoutingMethod::Llama4; },
     {"top_k = 2 must be 1 with routing = Llama4"}},
    {"LocalOffsetNonNegative",
     [](MoeSpec& s) { s.local_expert_offset = -1; },
     {"local_expert_offset = -1 must be >= 0"}},
    {"LocalExpertsNonNegative",
     [](MoeSpec& s) { s.local_num_experts = -4; },
     {"local_num_experts = -4 must be >= 0"}},
    {"LocalRangeInsideExperts",
     [](MoeSpec& s) {
       s.local_expert_offset = 6;
       s.local_num_experts = 4;
     },
     {"local_expert_offset + local experts = 6 + 4 = 10 exceeds num_experts = 8"}},
    {"LocalRangeAllExpertsNeedsOffsetZero",
     [](MoeSpec& s) { s.local_expert_offset = 1; },
     {"= 1 + 8 = 9 exceeds num_experts = 8"}},
    {"ActivationBF16",
     [](MoeSpec& s) { s.activation_dtype = DType::FP32; },
     {"activation_dtype = FP32", "must be BF16", "FP16 is not yet supported"}},
    {"WeightFormatMxInt4",
     [](MoeSpec& s) { s.weight_format = static_cast<WeightFormat>(3); },
     {"weight_format = unknown (3)", "must be MxInt4G32 or MxInt4G32Tiled"}},
};

INSTANTIATE_TEST_SUITE_P(Rules, SpecRule, ::testing::ValuesIn(kRuleCases),
                         [](const auto& info) { return std::string(info.param.name); });

// Values on the edge of every rule are accepted.
TEST(SpecValidate, AcceptsBoundaryValues) {
  const std::vector<std::function<void(MoeSpec&)>> edits = {
      [](MoeSpec& s) { s.hidden = 65536; },
      [](MoeSpec& s) { s.intermediate = 32; },
      [](MoeSpec& s) { s.num_experts = 1024; },
      [](MoeSpec& s) { s.top_k = 8; },
      [](MoeSpec& s) {
        s.num_experts = 64;
        s.top_k = 32;
      },
      [](MoeSpec& s) { s = deepseek(16, 8, 8, 16); },  // 2 per group, top_k = 8 * 2
      [](MoeSpec& s) { s = deepseek(16, 4, 2, 8); },   // top_k = 2 groups * 4
      [](MoeSpec& s) {
        s.routing = RoutingMethod::Llama4;
        s.top_k = 1;
      },
      [](MoeSpec& s) {
        s.local_expert_offset = 6;
        s.local_num_experts = 2;
      },
      [](MoeSpec& s) {
        s = deepseek(8, 1, 1, 2);
        s.routed_scaling_factor = std::numeric_limits<float>::min();
      },
      [](MoeSpec& s) {
        s = deepseek(8, 1, 1, 2);
        s.routed_scaling_factor = std::numeric_limits<float>::max();
      },
      [](MoeSpec& s) {
        s = deepseek(8, 1, 1, 2);
        s.routed_scaling_factor = 1e-30;
      },
  };
  for (size_t i = 0; i < edits.size(); ++i) {
    MoeSpec s = base_spec();
    edits[i](s);
    EXPECT_NO_THROW(s.validate()) << "edit " << i;
  }
}

// Tiled weights: any hidden and intermediate sizes (multiples of 32) are valid, padded to
// multiples of 256 in tiled_weight_bytes' sizes; the row-major sizes where they are already.
TEST(TiledWeightBytes, PadsHiddenAndIntermediateToMultiplesOf256) {
  MoeSpec s = base_spec();  // 8 experts
  const size_t E = 8;
  struct Want {
    int dim, padded;
  };
  const Want dims[] = {{32, 256}, {160, 256}, {256, 256}, {288, 512}, {1408, 1536}, {2880, 3072}};
  for (const Want h : dims)
    for (const Want i : dims) {
      s.hidden = h.dim;
      s.intermediate = i.dim;
      for (const WeightFormat f : {WeightFormat::MxInt4G32Tiled, WeightFormat::MxInt4G32}) {
        s.weight_format = f;
        SCOPED_TRACE(fmt::format("H {} I {} {}", h.dim, i.dim, to_string(f)));
        EXPECT_NO_THROW(s.validate());
        const TiledWeightBytes b = tiled_weight_bytes(s);
        const size_t HP = static_cast<size_t>(h.padded), IP = static_cast<size_t>(i.padded);
        EXPECT_EQ(b.hidden, h.padded);
        EXPECT_EQ(b.intermediate, i.padded);
        EXPECT_EQ(b.w13, E * 2 * IP * HP / 2);
        EXPECT_EQ(b.w13_scale, E * 2 * IP * (HP / 32) * 2);
        EXPECT_EQ(b.w2, E * HP * IP / 2);
        EXPECT_EQ(b.w2_scale, E * HP * (IP / 32) * 2);
      }
    }
  s.intermediate = 100;
  EXPECT_THROW(tiled_weight_bytes(s), Error);
}

TEST(SpecValidate, EveryRoutingMethodWithItsDefaults) {
  for (int m = 0; m <= static_cast<int>(RoutingMethod::Precomputed); ++m) {
    MoeSpec s = base_spec();
    s.routing = static_cast<RoutingMethod>(m);
    if (s.routing == RoutingMethod::Llama4) s.top_k = 1;
    EXPECT_NO_THROW(s.validate()) << to_string(s.routing);
  }
}

TEST(Presets, NamesInOrder) {
  EXPECT_EQ(preset_names(),
            (std::vector<std::string>{"kimi-k2", "kimi-k2-tp4", "kimi-k2-tp8", "qwen3-30b-a3b",
                                      "deepseek-v3", "seed-test"}));
}

TEST(Presets, EveryPresetValidatesWithCommonDefaults) {
  for (const std::string& name : preset_names()) {
    const MoeSpec s = preset(name);
    EXPECT_NO_THROW(s.validate()) << name;
    EXPECT_EQ(s.gate_up_order, GateUpOrder::GateUp) << name;
    EXPECT_TRUE(s.finalize) << name;
    EXPECT_EQ(s.top_k, 8) << name;
    EXPECT_EQ(s.local_experts(), s.num_experts) << name;
  }
}

TEST(Presets, KimiK2Fields) {
  const MoeSpec s = preset("kimi-k2");
  EXPECT_EQ(s.hidden, 7168);
  EXPECT_EQ(s.intermediate, 2048);
  EXPECT_EQ(s.num_experts, 384);
  EXPECT_EQ(s.routing, RoutingMethod::DeepSeekV3);
  EXPECT_EQ(s.n_group, 1);
  EXPECT_EQ(s.topk_group, 1);
  EXPECT_EQ(s.routed_scaling_factor, 2.827);
  EXPECT_TRUE(s.has_routing_bias);
  EXPECT_EQ(s.bias_dtype, DType::FP32);
  EXPECT_EQ(s.logits_dtype, DType::FP32);
}

TEST(Presets, VariantsDifferOnlyWhereTheyShould) {
  MoeSpec tp4 = preset("kimi-k2");
  tp4.intermediate = 512;
  EXPECT_EQ(preset("kimi-k2-tp4"), tp4);
  MoeSpec tp8 = preset("kimi-k2");
  tp8.intermediate = 256;
  EXPECT_EQ(preset("kimi-k2-tp8"), tp8);
  MoeSpec seed = preset("kimi-k2");
  seed.hidden = 512;
  seed.intermediate = 7168;
  EXPECT_EQ(preset("seed-test"), seed);
}

TEST(Presets, QwenAndDeepSeekFields) {
  const MoeSpec q = preset("qwen3-30b-a3b");
  EXPECT_EQ(q.hidden, 2048);
  EXPECT_EQ(q.intermediate, 768);
  EXPECT_EQ(q.num_experts, 128);
  EXPECT_EQ(q.routing, RoutingMethod::RenormalizeNaive);
  EXPECT_FALSE(q.has_routing_bias);
  const MoeSpec d = preset("deepseek-v3");
  EXPECT_EQ(d.num_experts, 256);
  EXPECT_EQ(d.n_group, 8);
  EXPECT_EQ(d.topk_group, 4);
  EXPECT_EQ(d.routed_scaling_factor, 2.5);
  EXPECT_TRUE(d.has_routing_bias);
}

TEST(Presets, UnknownNameListsTheValidOnes) {
  try {
    preset("kimi-k3");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("unknown preset 'kimi-k3'"));
    for (const std::string& name : preset_names()) EXPECT_THAT(e.what(), HasSubstr(name));
  }
}

// Every field takes part in ==; the scale compares by its bits.
TEST(SpecEquality, EveryFieldCounts) {
  const std::vector<std::function<void(MoeSpec&)>> edits = {
      [](MoeSpec& s) { s.hidden += 32; },
      [](MoeSpec& s) { s.intermediate += 32; },
      [](MoeSpec& s) { s.num_experts += 1; },
      [](MoeSpec& s) { s.top_k += 1; },
      [](MoeSpec& s) { s.weight_format = WeightFormat::MxInt4G32Tiled; },
      [](MoeSpec& s) { s.activation_dtype = DType::FP32; },
      [](MoeSpec& s) { s.gate_up_order = GateUpOrder::UpGate; },
      [](MoeSpec& s) { s.routing = RoutingMethod::Default; },
      [](MoeSpec& s) { s.logits_dtype = DType::BF16; },
      [](MoeSpec& s) { s.n_group = 2; },
      [](MoeSpec& s) { s.topk_group = 2; },
      [](MoeSpec& s) { s.routed_scaling_factor = std::nextafter(1.0, 2.0); },
      [](MoeSpec& s) { s.has_routing_bias = true; },
      [](MoeSpec& s) { s.bias_dtype = DType::BF16; },
      [](MoeSpec& s) { s.swiglu_alpha = true; },
      [](MoeSpec& s) { s.swiglu_beta = true; },
      [](MoeSpec& s) { s.swiglu_limit = true; },
      [](MoeSpec& s) { s.local_expert_offset = 1; },
      [](MoeSpec& s) { s.local_num_experts = 4; },
      [](MoeSpec& s) { s.finalize = false; },
  };
  const MoeSpec a = base_spec();
  EXPECT_EQ(a, base_spec());
  for (size_t i = 0; i < edits.size(); ++i) {
    MoeSpec b = base_spec();
    edits[i](b);
    EXPECT_NE(a, b) << "edit " << i;
    EXPECT_FALSE(a == b) << "edit " << i;
  }
}

TEST(SpecEquality, ScaleComparesBitwise) {
  MoeSpec a = base_spec(), b = base_spec();
  a.routed_scaling_factor = std::nan("");
  b.routed_scaling_factor = std::nan("");
  EXPECT_EQ(a, b);  // same bits: equal, so a spec is always equal to itself
  a.routed_scaling_factor = 0.0;
  b.routed_scaling_factor = -0.0;
  EXPECT_NE(a, b);
}

TEST(Names, Enumerators) {
  EXPECT_STREQ(to_string(RoutingMethod::DeepSeekV3), "DeepSeekV3");
  EXPECT_STREQ(to_string(RoutingMethod::RenormalizeNaive), "RenormalizeNaive");
  EXPECT_STREQ(to_string(RoutingMethod::Precomputed), "Precomputed");
  EXPECT_STREQ(to_string(RoutingMethod::TopKSigmoid), "TopKSigmoid");
  EXPECT_STREQ(to_string(DType::BF16), "BF16");
  EXPECT_STREQ(to_string(DType::FP32), "FP32");
  EXPECT_STREQ(to_string(GateUpOrder::GateUp), "GateUp");
  EXPECT_STREQ(to_string(GateUpOrder::UpGate), "UpGate");
  EXPECT_STREQ(to_string(WeightFormat::MxInt4G32), "MxInt4G32");
  EXPECT_STREQ(to_string(WeightFormat::MxInt4G32Tiled), "MxInt4G32Tiled");
  EXPECT_STREQ(to_string(ErrorKind::InvalidSpec), "InvalidSpec");
  EXPECT_STREQ(to_string(ErrorKind::Internal), "Internal");
  EXPECT_STREQ(to_string(static_cast<RoutingMethod>(99)), "unknown");
}

TEST(Names, RoutingMethodsAreDistinct) {
  std::vector<std::string> names;
  for (int m = 0; m <= static_cast<int>(RoutingMethod::Precomputed); ++m)
    names.push_back(to_string(static_cast<RoutingMethod>(m)));
  std::sort(names.begin(), names.end());
  EXPECT_EQ(std::unique(names.begin(), names.end()), names.end());
  EXPECT_EQ(names.size(), 10u);
}

TEST(ErrorType, CarriesKindAndMessage) {
  const Error e(ErrorKind::Cache, "disk full");
  EXPECT_EQ(e.kind(), ErrorKind::Cache);
  EXPECT_STREQ(e.what(), "disk full");
}

TEST(Version, IsMajorMinorPatch) {
  EXPECT_TRUE(std::regex_match(version(), std::regex(R"(\d+\.\d+\.\d+)"))) << version();
}

}  // namespace
}  // namespace moejit

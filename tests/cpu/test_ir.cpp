// IR: building from a spec, print/parse round trips, parse errors with their exact position,
// the Verify pass.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "compiler/ir.h"
#include "moejit/moejit.h"

namespace moejit::ir {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// The printed kimi-k2 module, one line per stage (lines 1-7).
const char* const kKimiText =
    "moejit.module version=1 activation=bf16 {\n"
    "  %route = route method=DeepSeekV3 experts=384 top_k=8 n_group=1 topk_group=1 scale=2.827 "
    "logits=fp32 bias=fp32\n"
    "  %dispatch = dispatch %route local_offset=0 local_experts=384\n"
    "  %gemm1 = gemm1 %dispatch k=7168 n=2048 weight=mxint4_g32 order=gate_up act=swiglu alpha=0 "
    "beta=0 limit=0\n"
    "  %gemm2 = gemm2 %gemm1 k=2048 n=7168 weight=mxint4_g32\n"
    "  %out = finalize %gemm2 %route top_k=8\n"
    "}\n";

// `text` with the first occurrence of `from` replaced by `to`.
std::string replace_first(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return at == std::string::npos ? text : text.replace(at, from.size(), to);
}

std::string kimi_with(const std::string& from, const std::string& to) {
  return replace_first(kKimiText, from, to);
}

// The message of the error `f` throws, after checking its kind; fails if nothing is thrown.
std::string error_of(const std::function<void()>& f, ErrorKind kind) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error thrown";
  return {};
}

void expect_round_trip(const MoeSpec& spec) {
  const std::string text = spec_to_ir_text(spec);
  const Module parsed = parse(text);
  EXPECT_EQ(print(parsed), text);
  EXPECT_NO_THROW(verify(parsed)) << text;
  EXPECT_EQ(parse_spec_text(text), spec) << text;
}

TEST(IrPrint, KimiK2Golden) { EXPECT_EQ(spec_to_ir_text(preset("kimi-k2")), kKimiText); }

TEST(IrPrint, WithoutFinalizeAndWithBf16Bias) {
  MoeSpec s = preset("deepseek-v3");
  s.finalize = false;
  s.bias_dtype = DType::BF16;
  s.logits_dtype = DType::BF16;
  s.gate_up_order = GateUpOrder::UpGate;
  s.swiglu_beta = true;
  s.local_expert_offset = 32;
  s.local_num_experts = 32;
  EXPECT_EQ(spec_to_ir_text(s),
            "moejit.module version=1 activation=bf16 {\n"
            "  %route = route method=DeepSeekV3 experts=256 top_k=8 n_group=8 topk_group=4 "
            "scale=2.5 logits=bf16 bias=bf16\n"
            "  %dispatch = dispatch %route local_offset=32 local_experts=32\n"
            "  %gemm1 = gemm1 %dispatch k=7168 n=2048 weight=mxint4_g32 order=up_gate act=swiglu "
            "alpha=0 beta=1 limit=0\n"
            "  %gemm2 = gemm2 %gemm1 k=2048 n=7168 weight=mxint4_g32\n"
            "}\n");
}

TEST(IrBuild, StagesAndWiring) {
  const Module m = build_module(preset("qwen3-30b-a3b"));
  ASSERT_EQ(m.stages.size(), 5u);
  const std::vector<std::pair<StageKind, const char*>> expected = {
      {StageKind::Route, "route"},
      {StageKind::Dispatch, "dispatch"},
      {StageKind::Gemm1, "gemm1"},
      {StageKind::Gemm2, "gemm2"},
      {StageKind::Finalize, "out"}};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(m.stages[i]->kind, expected[i].first);
    EXPECT_EQ(m.stages[i]->name, expected[i].second);
  }
  EXPECT_EQ(m.find<Dispatch>()->input, m.find<Route>());
  EXPECT_EQ(m.find<Gemm1>()->input, m.find<Dispatch>());
  EXPECT_EQ(m.find<Gemm2>()->input, m.find<Gemm1>());
  EXPECT_EQ(m.find<Finalize>()->gemm2, m.find<Gemm2>());
  EXPECT_EQ(m.find<Finalize>()->route, m.find<Route>());
  EXPECT_EQ(m.find<Gemm1>()->k, 2048);
  EXPECT_EQ(m.find<Gemm1>()->n, 768);
  EXPECT_EQ(m.find<Gemm2>()->k, 768);
  EXPECT_EQ(m.find<Gemm2>()->n, 2048);
  EXPECT_FALSE(m.find<Route>()->bias.has_value());
}

TEST(IrBuild, ValidatesTheSpecFirst) {
  MoeSpec s = preset("kimi-k2");
  s.top_k = 400;
  EXPECT_THAT(error_of([&] { build_module(s); }, ErrorKind::InvalidSpec), HasSubstr("top_k = 400"));
}

TEST(IrRoundTrip, EveryPreset) {
  for (const std::string& name : preset_names()) {
    SCOPED_TRACE(name);
    expect_round_trip(preset(name));
  }
}

TEST(IrRoundTrip, EveryRoutingMethod) {
  for (int m = 0; m <= static_cast<int>(RoutingMethod::Precomputed); ++m) {
    MoeSpec s = preset("qwen3-30b-a3b");
    s.routing = static_cast<RoutingMethod>(m);
    if (s.routing == RoutingMethod::Llama4) s.top_k = 1;
    SCOPED_TRACE(to_string(s.routing));
    expect_round_trip(s);
    EXPECT_THAT(spec_to_ir_text(s), HasSubstr(std::string("method=") + to_string(s.routing)));
  }
}

TEST(IrRoundTrip, Variants) {
  const std::vector<std::function<void(MoeSpec&)>> edits = {
      [](MoeSpec& s) { s.gate_up_order = GateUpOrder::UpGate; },
      [](MoeSpec& s) { s.finalize = false; },
      [](MoeSpec& s) {
        s.local_expert_offset = 96;
        s.local_num_experts = 48;
      },
      [](MoeSpec& s) { s.local_num_experts = 100; },
      [](MoeSpec& s) { s.swiglu_alpha = true; },
      [](MoeSpec& s) { s.swiglu_beta = true; },
      [](MoeSpec& s) { s.swiglu_limit = true; },
      [](MoeSpec& s) { s.swiglu_alpha = s.swiglu_beta = s.swiglu_limit = true; },
      [](MoeSpec& s) { s.logits_dtype = DType::BF16; },
      [](MoeSpec& s) { s.weight_format = WeightFormat::MxInt4G32Tiled; },
      [](MoeSpec& s) { s.bias_dtype = DType::BF16; },
      [](MoeSpec& s) { s.has_routing_bias = false; },
      [](MoeSpec& s) { s.routed_scaling_factor = 0.1; },
      [](MoeSpec& s) { s.routed_scaling_factor = 1.0 / 3.0; },
      [](MoeSpec& s) { s.routed_scaling_factor = 1e-20; },
      [](MoeSpec& s) { s.routed_scaling_factor = 123456789.125; },
      [](MoeSpec& s) {
        s.num_experts = 256;
        s.n_group = 8;
        s.topk_group = 4;
      },
  };
  for (size_t i = 0; i < edits.size(); ++i) {
    MoeSpec s = preset("kimi-k2");
    edits[i](s);
    SCOPED_TRACE(i);
    expect_round_trip(s);
  }
}

// Two fields the IR does not carry: a bias dtype without a bias, and an explicit local range
// that covers every expert. The spec read back is the normal form of the same layer.
TEST(IrRoundTrip, NormalFormOfEquivalentSpecs) {
  MoeSpec s = preset("qwen3-30b-a3b");
  s.bias_dtype = DType::BF16;
  s.local_num_experts = s.num_experts;
  const MoeSpec back = parse_spec_text(spec_to_ir_text(s));
  EXPECT_EQ(back.bias_dtype, DType::FP32);
  EXPECT_EQ(back.local_num_experts, 0);
  EXPECT_EQ(back, preset("qwen3-30b-a3b"));
}

TEST(IrParse, CommentsBlankLinesAndSpacing) {
  const char* text =
      "# a hand-written spec\n"
      "\n"
      "moejit.module   version=1 activation = bf16{   // header\n"
      "%r=route method=DeepSeekV3 experts=384 top_k=8 n_group=1 topk_group=1 scale=2.827 "
      "logits=fp32 bias=fp32 # route\n"
      "\t%d = dispatch %r local_offset=0 local_experts=384\n"
      "  // a comment line\n"
      "  %g1 = gemm1 %d k=7168 n=2048 weight=mxint4_g32 order=gate_up act=swiglu alpha=0 "
      "beta=0 limit=0\n"
      "  %g2 = gemm2 %g1 k=2048 n=7168 weight=mxint4_g32\n"
      "  %y = finalize %g2 %r top_k=8\n"
      "}  # end\n"
      "\n";
  EXPECT_EQ(parse_spec_text(text), preset("kimi-k2"));
  // Names are the user's; everything else prints in the canonical form.
  const std::string printed = print(parse(text));
  EXPECT_THAT(printed, HasSubstr("  %y = finalize %g2 %r top_k=8\n"));
  EXPECT_EQ(print(parse(printed)), printed);
}

TEST(IrParse, AttributesInAnyOrder) {
  const std::string text =
      kimi_with("k=2048 n=7168 weight=mxint4_g32", "weight=mxint4_g32 n=7168 k=2048");
  EXPECT_EQ(print(parse(text)), kKimiText);
}

struct ParseErrorCase {
  const char* name;
  std::function<std::string()> text;
  const char* message;  // the whole message
};

class IrParseError : public ::testing::TestWithParam<ParseErrorCase> {};

TEST_P(IrParseError, ReportsLineAndColumn) {
  const std::string text = GetParam().text();
  EXPECT_EQ(error_of([&] { parse(text); }, ErrorKind::InvalidSpec), GetParam().message);
}

// Columns are 1-based; line 2 is "  %route = route method=...", see kKimiText.
const ParseErrorCase kParseErrors[] = {
    {"UnknownStage", [] { return kimi_with("= gemm2", "= gemm3"); },
     "line 5, column 12: unknown stage 'gemm3' (expected one of route, dispatch, gemm1, gemm2, "
     "finalize)"},
    {"MissingAttribute", [] { return kimi_with(" top_k=8\n}", "\n}"); },
     "line 6, column 10: finalize is missing attribute 'top_k'"},
    {"BadInteger", [] { return kimi_with("local_experts=384", "local_experts=38x4"); },
     "line 3, column 60: bad integer '38x4' for attribute 'local_experts'"},
    {"IntegerOverflow", [] { return kimi_with("k=7168", "k=99999999999"); },
     "line 4, column 30: bad integer '99999999999' for attribute 'k'"},
    {"BadNumber", [] { return kimi_with("scale=2.827", "scale=2.8.27"); },
     "line 2, column 85: bad number '2.8.27' for attribute 'scale'"},
    {"BadEnumValue", [] { return kimi_with("logits=fp32", "logits=fp16"); },
     "line 2, column 98: unknown value 'fp16' for attribute 'logits' (expected one of bf16, "
     "fp32)"},
    {"BadFlag", [] { return kimi_with("alpha=0", "alpha=2"); },
     "line 4, column 91: bad flag '2' for attribute 'alpha' (expected 0 or 1)"},
    {"UnknownAttribute",
     [] { return kimi_with("weight=mxint4_g32\n  %out", "weight=mxint4_g32 foo=1\n  %out"); },
     "line 5, column 57: unknown attribute 'foo' for gemm2"},
    {"DuplicateAttribute", [] { return kimi_with("top_k=8\n}", "top_k=8 top_k=8\n}"); },
     "line 6, column 41: duplicate attribute 'top_k' (first at column 33)"},
    {"DuplicateStage",
     [] {
       return kimi_with("  %dispatch",
                        "  %route2 = route method=Default experts=8 top_k=2 n_group=1 "
                        "topk_group=1 scale=1 logits=fp32 bias=none\n  %dispatch");
     },
     "line 3, column 13: duplicate route stage (the first is at line 2)"},
    {"Redefinition", [] { return kimi_with("%dispatch = dispatch", "%route = dispatch"); },
     "line 3, column 3: redefinition of '%route' (first defined at line 2)"},
    {"WrongOperandKind", [] { return kimi_with("gemm2 %gemm1", "gemm2 %route"); },
     "line 5, column 18: operand 1 of gemm2 must be a gemm1 stage; '%route' is a route stage"},
    {"UndefinedOperand", [] { return kimi_with("dispatch %route", "dispatch %rout"); },
     "line 3, column 24: undefined value '%rout'"},
    {"TooFewOperands", [] { return kimi_with("%gemm2 %route top_k", "%gemm2 top_k"); },
     "line 6, column 10: finalize takes 2 operand(s) (gemm2, route), got 1"},
    {"TooManyOperands", [] { return kimi_with("gemm2 %gemm1", "gemm2 %gemm1 %route"); },
     "line 5, column 25: gemm2 takes 1 operand(s) (gemm1); unexpected '%route'"},
    {"MissingEquals", [] { return kimi_with("%out = finalize", "%out finalize"); },
     "line 6, column 8: expected '=' after '%out'"},
    {"MissingValue", [] { return kimi_with("top_k=8\n}", "top_k=\n}"); },
     "line 6, column 39: expected a value for attribute 'top_k'"},
    {"NotAStage", [] { return kimi_with("  %gemm2 =", "  gemm2 ="); },
     "line 5, column 3: expected a stage '%name = op ...' or '}', got 'gemm2'"},
    {"BadValueName", [] { return kimi_with("%out =", "%o-ut ="); },
     "line 6, column 3: bad value name '%o-ut': a name is '%' then [A-Za-z0-9_.]+"},
    {"MissingHeader", [] { return kimi_with("moejit.module", "module"); },
     "line 1, column 1: expected 'moejit.module', got 'module'"},
    {"HeaderWithoutBrace", [] { return kimi_with("bf16 {", "bf16"); },
     "line 1, column 40: expected '{' at the end of the module header"},
    {"UnsupportedVersion", [] { return kimi_with("version=1", "version=2"); },
     "line 1, column 23: unsupported version 2 (this build reads version 1)"},
    {"MissingCloseBrace", [] { return kimi_with("}\n", ""); },
     "line 7, column 1: expected '}' to close the module, got end of input"},
    {"TextAfterClose", [] { return std::string(kKimiText) + "\n# ok\njunk\n"; },
     "line 10, column 1: unexpected text after the module's closing '}'"},
    {"TokenAfterClose", [] { return kimi_with("}\n", "} }\n"); },
     "line 7, column 3: unexpected '}' after '}'"},
    {"MissingStage",
     [] {
       return kimi_with(
           "  %gemm2 = gemm2 %gemm1 k=2048 n=7168 weight=mxint4_g32\n"
           "  %out = finalize %gemm2 %route top_k=8\n",
           "");
     },
     "line 5, column 1: module has no gemm2 stage"},
    {"EmptyInput", [] { return std::string("  # nothing\n"); },
     "line 2, column 1: expected 'moejit.module', got end of input"},
    {"MakeRejectsValue", [] { return kimi_with("experts=384", "experts=0"); },
     "line 2, column 12: route.experts = 0 must be >= 1"},
};

INSTANTIATE_TEST_SUITE_P(Cases, IrParseError, ::testing::ValuesIn(kParseErrors),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(IrParse, CommentsDoNotShiftPositions) {
  const std::string text = "# header comment\n" + kimi_with("dispatch %route", "dispatch %rout");
  EXPECT_THAT(error_of([&] { parse(text); }, ErrorKind::InvalidSpec),
              StartsWith("line 4, column 24: undefined value '%rout'"));
}

// Verify: hand-edited text that parses but describes no valid layer.
struct VerifyCase {
  const char* name;
  std::string from, to;
  const char* message;
};

class IrVerifyError : public ::testing::TestWithParam<VerifyCase> {};

TEST_P(IrVerifyError, RejectsParsedModule) {
  const Module m = parse(kimi_with(GetParam().from, GetParam().to));
  EXPECT_THAT(error_of([&] { verify(m); }, ErrorKind::InvalidSpec), HasSubstr(GetParam().message));
  EXPECT_THROW(parse_spec_text(kimi_with(GetParam().from, GetParam().to)), Error);
}

const VerifyCase kVerifyErrors[] = {
    {"Gemm2NotHidden", "n=7168 weight", "n=4096 weight",
     "gemm2.n = 4096 does not match gemm1.k = 7168 (both are the hidden size)"},
    {"Gemm2KNotIntermediate", "k=2048 n=7168", "k=1024 n=7168",
     "gemm2.k = 1024 does not match gemm1.n = 2048 (both are the intermediate size)"},
    {"FinalizeTopK", "%route top_k=8", "%route top_k=4",
     "finalize.top_k = 4 does not match route.top_k = 8"},
    {"SpecRuleNGroup", "n_group=1", "n_group=5", "n_group = 5 does not divide num_experts = 384"},
    {"SpecRuleExpertRange", "local_offset=0 local_experts=384", "local_offset=380 local_experts=8",
     "local_expert_offset + local experts = 380 + 8 = 388 exceeds num_experts = 384"},
    {"SpecRuleActivation", "activation=bf16", "activation=fp32",
     "activation_dtype = FP32 is not supported"},
    {"SpecRuleBiasNeedsDeepSeek", "method=DeepSeekV3", "method=Renormalize",
     "has_routing_bias = true is only supported with routing = DeepSeekV3"},
    {"SpecRuleScaleNeedsDeepSeek", "method=DeepSeekV3 experts=384 top_k=8 n_group=1 topk_group=1 scale=2.827 logits=fp32 bias=fp32",
     "method=Renormalize experts=384 top_k=8 n_group=1 topk_group=1 scale=2.827 logits=fp32 bias=none",
     "routed_scaling_factor = 2.827 (!= 1) is only supported with routing = DeepSeekV3"},
};

INSTANTIATE_TEST_SUITE_P(Cases, IrVerifyError, ::testing::ValuesIn(kVerifyErrors),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(IrVerify, HiddenNotMultipleOf32) {
  // gemm1.k and gemm2.n agree, so the shapes pass; the spec rule rejects the value.
  const Module m = parse(replace_first(kimi_with("k=7168", "k=7000"), "n=7168", "n=7000"));
  EXPECT_THAT(error_of([&] { verify(m); }, ErrorKind::InvalidSpec),
              HasSubstr("hidden = 7000 is not a multiple of 32 (MXINT4 group size)"));
}

// Wiring faults cannot come from parse(); a pass that builds a module wrongly is a compiler bug.
TEST(IrVerify, WiringFaultsAreInternal) {
  const Module good = build_module(preset("kimi-k2"));
  Module other_route = good;
  const auto stray = Route::make("stray", RoutingMethod::DeepSeekV3, 384, 8, 1, 1, 2.827,
                                 DType::FP32, DType::FP32);
  other_route.stages[4] = Finalize::make("out", good.find<Gemm2>(), stray, 8);
  EXPECT_THAT(error_of([&] { verify(other_route); }, ErrorKind::Internal),
              HasSubstr("%out reads %stray, which is not an earlier stage of the module"));

  Module swapped = good;
  std::swap(swapped.stages[2], swapped.stages[3]);
  EXPECT_THAT(error_of([&] { verify(swapped); }, ErrorKind::Internal),
              HasSubstr("stage 2 (%gemm2) is a gemm2, expected a gemm1"));

  Module short_module = good;
  short_module.stages.resize(3);
  EXPECT_THAT(error_of([&] { verify(short_module); }, ErrorKind::Internal),
              HasSubstr("module has 3 stages, expected 4 or 5"));

  Module renamed = good;
  renamed.stages[4] = Finalize::make("gemm1", good.find<Gemm2>(), good.find<Route>(), 8);
  EXPECT_THAT(error_of([&] { verify(renamed); }, ErrorKind::Internal),
              HasSubstr("value %gemm1 is defined twice"));
  EXPECT_NO_THROW(verify(good));
}

TEST(IrMake, RejectsNullOperandsAndBadNames) {
  EXPECT_THAT(error_of([] { Dispatch::make("d", nullptr, 0, 8); }, ErrorKind::Internal),
              HasSubstr("dispatch.input is null"));
  EXPECT_THAT(error_of([] { Finalize::make("f", nullptr, nullptr, 8); }, ErrorKind::Internal),
              HasSubstr("finalize.gemm2 is null"));
  EXPECT_THAT(error_of(
                  [] {
                    Route::make("a b", RoutingMethod::TopK, 8, 2, 1, 1, 1.0, DType::FP32,
                                std::nullopt);
                  },
                  ErrorKind::Internal),
              HasSubstr("route stage named 'a b'"));
}

TEST(IrMake, RejectsImpossibleValues) {
  const auto route =
      Route::make("r", RoutingMethod::TopK, 8, 2, 1, 1, 1.0, DType::FP32, std::nullopt);
  EXPECT_THAT(error_of([&] { Dispatch::make("d", route, -1, 8); }, ErrorKind::InvalidSpec),
              HasSubstr("dispatch.local_offset = -1 must be >= 0"));
  EXPECT_THAT(error_of([&] { Dispatch::make("d", route, 0, 0); }, ErrorKind::InvalidSpec),
              HasSubstr("dispatch.local_experts = 0 must be >= 1"));
  const auto dispatch = Dispatch::make("d", route, 0, 8);
  EXPECT_THAT(error_of(
                  [&] {
                    Gemm1::make("g", dispatch, 0, 64, WeightFormat::MxInt4G32, GateUpOrder::GateUp,
                                Activation::SwiGlu, false, false, false);
                  },
                  ErrorKind::InvalidSpec),
              HasSubstr("gemm1.k = 0 must be >= 1"));
}

TEST(IrNames, StageKinds) {
  EXPECT_STREQ(to_string(StageKind::Route), "route");
  EXPECT_STREQ(to_string(StageKind::Dispatch), "dispatch");
  EXPECT_STREQ(to_string(StageKind::Gemm1), "gemm1");
  EXPECT_STREQ(to_string(StageKind::Gemm2), "gemm2");
  EXPECT_STREQ(to_string(StageKind::Finalize), "finalize");
}

}  // namespace
}  // namespace moejit::ir

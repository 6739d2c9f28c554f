// MoeSpec: names of the enumerations, validation rules, equality, presets, the version string.
#include <fmt/format.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

#include "moejit/moejit.h"

#ifndef MOEJIT_VERSION_STRING
#define MOEJIT_VERSION_STRING "0.1.0"
#endif

namespace moejit {

Error::Error(ErrorKind kind, const std::string& message)
    : std::runtime_error(message), kind_(kind) {}

namespace {

// Looks an enumerator up in a {value, name} table; "unknown" for a value outside the enum.
template <class E, size_t N>
const char* name_in(const std::pair<E, const char*> (&table)[N], E value) {
  for (const auto& [v, name] : table)
    if (v == value) return name;
  return "unknown";
}

constexpr std::pair<ErrorKind, const char*> kErrorKinds[] = {
    {ErrorKind::InvalidSpec, "InvalidSpec"},
    {ErrorKind::InvalidArgument, "InvalidArgument"},
    {ErrorKind::Compile, "Compile"},
    {ErrorKind::Cuda, "Cuda"},
    {ErrorKind::Cache, "Cache"},
    {ErrorKind::Internal, "Internal"},
};
constexpr std::pair<WeightFormat, const char*> kWeightFormats[] = {
    {WeightFormat::MxInt4G32, "MxInt4G32"}, {WeightFormat::MxInt4G32Tiled, "MxInt4G32Tiled"}};
constexpr std::pair<DType, const char*> kDTypes[] = {{DType::BF16, "BF16"}, {DType::FP32, "FP32"}};
constexpr std::pair<GateUpOrder, const char*> kOrders[] = {{GateUpOrder::GateUp, "GateUp"},
                                                           {GateUpOrder::UpGate, "UpGate"}};
constexpr std::pair<RoutingMethod, const char*> kRoutings[] = {
    {RoutingMethod::Default, "Default"},
    {RoutingMethod::Renormalize, "Renormalize"},
    {RoutingMethod::DeepSeekV3, "DeepSeekV3"},
    {RoutingMethod::Llama4, "Llama4"},
    {RoutingMethod::RenormalizeNaive, "RenormalizeNaive"},
    {RoutingMethod::TopK, "TopK"},
    {RoutingMethod::SigmoidRenorm, "SigmoidRenorm"},
    {RoutingMethod::Sigmoid, "Sigmoid"},
    {RoutingMethod::TopKSigmoid, "TopKSigmoid"},
    {RoutingMethod::Precomputed, "Precomputed"},
};

}  // namespace

const char* to_string(ErrorKind kind) { return name_in(kErrorKinds, kind); }
const char* to_string(WeightFormat v) { return name_in(kWeightFormats, v); }
const char* to_string(DType v) { return name_in(kDTypes, v); }
const char* to_string(GateUpOrder v) { return name_in(kOrders, v); }
const char* to_string(RoutingMethod v) { return name_in(kRoutings, v); }

// ---------------------------------------------------------------------------------------------
// Validation: a table of independent rules. Each returns an empty string when the spec obeys it,
// else a message naming the field, its value and the rule. A rule may assume nothing checked by
// another rule, so it guards its own preconditions (that keeps every rule testable alone).
namespace {

constexpr int kGroupSize = 32;  // MXINT4: one scale per 32 consecutive k
constexpr int kMaxDim = 65536;  // sanity cap on hidden and intermediate
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopK = 32;

using Rule = std::function<std::string(const MoeSpec&)>;

std::string dim_rule(const char* field, int value) {
  if (value <= 0) return fmt::format("{} = {} must be > 0", field, value);
  if (value % kGroupSize != 0)
    return fmt::format("{} = {} is not a multiple of {} (MXINT4 group size)", field, value,
                       kGroupSize);
  if (value > kMaxDim)
    return fmt::format("{} = {} exceeds the sanity cap of {}", field, value, kMaxDim);
  return {};
}

// A rule that only some routing methods may use a non-default value.
std::string deepseek_only(const MoeSpec& s, bool used, const std::string& what) {
  if (!used || s.routing == RoutingMethod::DeepSeekV3) return {};
  return fmt::format("{} is only supported with routing = DeepSeekV3 (routing = {})", what,
                     to_string(s.routing));
}

bool grouped_deepseek(const MoeSpec& s) {
  return s.routing == RoutingMethod::DeepSeekV3 && s.n_group > 1 && s.num_experts > 0 &&
         s.num_experts % s.n_group == 0;
}

// An enumeration field must hold one of its named values: a value cast from an integer (a
// language binding's, say) would otherwise compile as some other value or as none.
template <class E, size_t N>
std::string enum_rule(const char* field, const std::pair<E, const char*> (&table)[N], E value) {
  for (const auto& entry : table)
    if (entry.first == value) return {};
  return fmt::format("{} = {} is not one of its enumeration's values", field,
                     static_cast<int>(value));
}

const std::vector<Rule>& rules() {
  static const std::vector<Rule> table = {
      [](const MoeSpec& s) { return enum_rule("routing", kRoutings, s.routing); },
      [](const MoeSpec& s) { return enum_rule("logits_dtype", kDTypes, s.logits_dtype); },
      [](const MoeSpec& s) { return enum_rule("bias_dtype", kDTypes, s.bias_dtype); },
      [](const MoeSpec& s) { return enum_rule("gate_up_order", kOrders, s.gate_up_order); },
      [](const MoeSpec& s) { return dim_rule("hidden", s.hidden); },
      [](const MoeSpec& s) { return dim_rule("intermediate", s.intermediate); },
      [](const MoeSpec& s) -> std::string {
        if (s.num_experts >= 1 && s.num_experts <= kMaxExperts) return {};
        return fmt::format("num_experts = {} is outside [1, {}]", s.num_experts, kMaxExperts);
      },
      [](const MoeSpec& s) -> std::string {
        if (s.top_k < 1) return fmt::format("top_k = {} must be >= 1", s.top_k);
        if (s.top_k > kMaxTopK)
          return fmt::format("top_k = {} exceeds the maximum of {}", s.top_k, kMaxTopK);
        if (s.num_experts >= 1 && s.top_k > s.num_experts)
          return fmt::format("top_k = {} exceeds num_experts = {}", s.top_k, s.num_experts);
        return {};
      },
      [](const MoeSpec& s) -> std::string {
        if (s.n_group < 1) return fmt::format("n_group = {} must be >= 1", s.n_group);
        if (s.num_experts >= 1 && s.num_experts % s.n_group != 0)
          return fmt::format("n_group = {} does not divide num_experts = {}", s.n_group,
                             s.num_experts);
        return {};
      },
      [](const MoeSpec& s) -> std::string {
        if (s.topk_group >= 1 && s.topk_group <= std::max(s.n_group, 1)) return {};
        return fmt::format("topk_group = {} is outside [1, n_group = {}]", s.topk_group, s.n_group);
      },
      // topk_group first: a topk_group > 1 implies an n_group > 1, whose rule would hide it.
      [](const MoeSpec& s) {
        return deepseek_only(s, s.topk_group > 1,
                             fmt::format("topk_group = {} (> 1)", s.topk_group));
      },
      [](const MoeSpec& s) {
        return deepseek_only(s, s.n_group > 1, fmt::format("n_group = {} (> 1)", s.n_group));
      },
      [](const MoeSpec& s) -> std::string {
        if (!grouped_deepseek(s) || s.num_experts / s.n_group >= 2) return {};
        return fmt::format(
            "n_group = {} leaves {} expert per group for num_experts = {}; DeepSeekV3 needs >= 2 "
            "(a group's score is the sum of its top-2 experts)",
            s.n_group, s.num_experts / s.n_group, s.num_experts);
      },
      [](const MoeSpec& s) -> std::string {
        if (!grouped_deepseek(s) || s.topk_group < 1) return {};
        const int reachable = s.topk_group * (s.num_experts / s.n_group);
        if (s.top_k <= reachable) return {};
        return fmt::format(
            "top_k = {} exceeds the {} experts in the topk_group = {} kept groups of {} "
            "(num_experts / n_group)",
            s.top_k, reachable, s.topk_group, s.num_experts / s.n_group);
      },
      [](const MoeSpec& s) -> std::string {
        if (!(std::isfinite(s.routed_scaling_factor) && s.routed_scaling_factor > 0))
          return fmt::format("routed_scaling_factor = {} must be finite and > 0",
                             s.routed_scaling_factor);
        // The kernels multiply by it as a float: it must neither underflow (every weight 0)
        // nor overflow there.
        const float f = static_cast<float>(s.routed_scaling_factor);
        if (f >= FLT_MIN && f <= FLT_MAX) return {};
        return fmt::format("routed_scaling_factor = {} is outside the normal float range [{}, {}] "
                           "(the kernels apply it in fp32)",
                           s.routed_scaling_factor, FLT_MIN, FLT_MAX);
      },
      [](const MoeSpec& s) {
        return deepseek_only(s, s.has_routing_bias, "has_routing_bias = true");
      },
      [](const MoeSpec& s) {
        return deepseek_only(s, s.routed_scaling_factor != 1.0,
                             fmt::format("routed_scaling_factor = {} (!= 1)",
                                         s.routed_scaling_factor));
      },
      [](const MoeSpec& s) -> std::string {
        if (s.routing != RoutingMethod::Llama4 || s.top_k == 1) return {};
        return fmt::format("top_k = {} must be 1 with routing = Llama4", s.top_k);
      },
      [](const MoeSpec& s) -> std::string {
        if (s.local_expert_offset >= 0) return {};
        return fmt::format("local_expert_offset = {} must be >= 0", s.local_expert_offset);
      },
      [](const MoeSpec& s) -> std::string {
        if (s.local_num_experts >= 0) return {};
        return fmt::format("local_num_experts = {} must be >= 0", s.local_num_experts);
      },
      [](const MoeSpec& s) -> std::string {
        if (s.local_expert_offset < 0 || s.local_num_experts < 0) return {};
        const long long end = static_cast<long long>(s.local_expert_offset) + s.local_experts();
        if (end <= s.num_experts) return {};
        return fmt::format(
            "local_expert_offset + local experts = {} + {} = {} exceeds num_experts = {}",
            s.local_expert_offset, s.local_experts(), end, s.num_experts);
      },
      [](const MoeSpec& s) -> std::string {
        if (s.activation_dtype == DType::BF16) return {};
        return fmt::format(
            "activation_dtype = {} is not supported: activations must be BF16 (FP16 is not yet "
            "supported)",
            to_string(s.activation_dtype));
      },
      [](const MoeSpec& s) -> std::string {
        if (s.weight_format == WeightFormat::MxInt4G32) return {};
        // (MxInt4G32Tiled pads H and I to multiples of 256: tiled_weight_bytes.)
        if (s.weight_format == WeightFormat::MxInt4G32Tiled) return {};
        return fmt::format("weight_format = {} ({}) is not supported: must be MxInt4G32 or "
                           "MxInt4G32Tiled",
                           to_string(s.weight_format), static_cast<int>(s.weight_format));
      },
  };
  return table;
}

// The fields of a spec as one comparable value; the scale compares by its bits, so the
// relation is exact and reflexive even for NaN (the compile cache relies on that).
auto fields(const MoeSpec& s) {
  uint64_t scale_bits = 0;
  std::memcpy(&scale_bits, &s.routed_scaling_factor, sizeof scale_bits);
  return std::make_tuple(s.hidden, s.intermediate, s.num_experts, s.top_k, s.weight_format,
                         s.activation_dtype, s.gate_up_order, s.routing, s.logits_dtype, s.n_group,
                         s.topk_group, scale_bits, s.has_routing_bias, s.bias_dtype, s.swiglu_alpha,
                         s.swiglu_beta, s.swiglu_limit, s.local_expert_offset, s.local_num_experts,
                         s.finalize);
}

}  // namespace

void MoeSpec::validate() const {
  for (const Rule& rule : rules()) {
    std::string message = rule(*this);
    if (!message.empty()) throw Error(ErrorKind::InvalidSpec, message);
  }
}

bool MoeSpec::operator==(const MoeSpec& other) const { return fields(*this) == fields(other); }

// ---------------------------------------------------------------------------------------------
// Presets.
namespace {

MoeSpec make_spec(int hidden, int intermediate, int experts, int top_k, RoutingMethod routing) {
  MoeSpec s;
  s.hidden = hidden;
  s.intermediate = intermediate;
  s.num_experts = experts;
  s.top_k = top_k;
  s.routing = routing;
  return s;
}

// DeepSeekV3 routing with an fp32 bias, as the Kimi and DeepSeek checkpoints ship it.
MoeSpec deepseek_spec(int hidden, int intermediate, int experts, int n_group, int topk_group,
                      double scale) {
  MoeSpec s = make_spec(hidden, intermediate, experts, 8, RoutingMethod::DeepSeekV3);
  s.n_group = n_group;
  s.topk_group = topk_group;
  s.routed_scaling_factor = scale;
  s.has_routing_bias = true;
  s.bias_dtype = DType::FP32;
  s.logits_dtype = DType::FP32;
  return s;
}

const std::vector<std::pair<std::string, MoeSpec>>& presets() {
  static const std::vector<std::pair<std::string, MoeSpec>> table = {
      {"kimi-k2", deepseek_spec(7168, 2048, 384, 1, 1, 2.827)},
      {"kimi-k2-tp4", deepseek_spec(7168, 512, 384, 1, 1, 2.827)},
      {"kimi-k2-tp8", deepseek_spec(7168, 256, 384, 1, 1, 2.827)},
      {"qwen3-30b-a3b", make_spec(2048, 768, 128, 8, RoutingMethod::RenormalizeNaive)},
      {"deepseek-v3", deepseek_spec(7168, 2048, 256, 8, 4, 2.5)},
      {"seed-test", deepseek_spec(512, 7168, 384, 1, 1, 2.827)},
  };
  return table;
}

}  // namespace

TiledWeightBytes tiled_weight_bytes(const MoeSpec& spec) {
  spec.validate();
  TiledWeightBytes b;
  b.hidden = (spec.hidden + 255) / 256 * 256;
  b.intermediate = (spec.intermediate + 255) / 256 * 256;
  const size_t E = static_cast<size_t>(spec.num_experts), H = static_cast<size_t>(b.hidden),
               I = static_cast<size_t>(b.intermediate);
  b.w13 = E * 2 * I * (H / 2);
  b.w13_scale = E * 2 * I * (H / 32) * 2;
  b.w2 = E * H * (I / 2);
  b.w2_scale = E * H * (I / 32) * 2;
  return b;
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& entry : presets()) names.push_back(entry.first);
  return names;
}

MoeSpec preset(std::string_view name) {
  for (const auto& [preset_name, spec] : presets())
    if (preset_name == name) return spec;
  throw Error(ErrorKind::InvalidArgument, fmt::format("unknown preset '{}' (valid presets: {})",
                                                      name, fmt::join(preset_names(), ", ")));
}

const char* version() { return MOEJIT_VERSION_STRING; }

}  // namespace moejit

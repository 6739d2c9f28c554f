// The IR of one MoE layer: an ordered list of immutable stages in SSA form,
//   Route -> Dispatch -> Gemm1 -> Gemm2 -> [Finalize]
// Nodes are small structs with public fields, built only through their validating make() and
// shared as std::shared_ptr<const T>. make() throws Error(Internal) for a compiler bug (a null
// operand, an unusable value name) and Error(InvalidSpec) for a value no layer can have.
//
// Text form (print / parse; `moejit dump --emit ir` prints it, FileCheck tests read it):
// clang-format off
//   moejit.module version=1 activation=bf16 {
//     %route = route method=DeepSeekV3 experts=384 top_k=8 n_group=1 topk_group=1 scale=2.827 logits=fp32 bias=fp32
//     %dispatch = dispatch %route local_offset=0 local_experts=384
//     %gemm1 = gemm1 %dispatch k=7168 n=2048 weight=mxint4_g32 order=gate_up act=swiglu alpha=0 beta=0 limit=0
//     %gemm2 = gemm2 %gemm1 k=2048 n=7168 weight=mxint4_g32
//     %out = finalize %gemm2 %route top_k=8
//   }
// clang-format on
// One stage per line, operands before attributes, attributes in the order above. Every attribute
// is printed, defaults included; doubles in the shortest form that reads back exactly. The parser
// also accepts comments (`#` or `//` to the end of the line) and any spacing between tokens;
// print(parse(print(m))) == print(m) byte for byte.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moejit/moejit.h"

namespace moejit::ir {

// Version of the text form; parse() rejects any other.
constexpr int kTextVersion = 1;

enum class StageKind { Route, Dispatch, Gemm1, Gemm2, Finalize };
const char* to_string(StageKind kind);  // the op keyword: "route", "dispatch", ...

enum class Activation { SwiGlu };

struct Stage;
using StageRef = std::shared_ptr<const Stage>;

// Common part of every stage: its kind and its SSA value name (printed as %name).
struct Stage {
  StageKind kind;
  std::string name;

  virtual ~Stage() = default;
  // The stages this one reads, in operand order.
  virtual std::vector<StageRef> operands() const = 0;

 protected:
  Stage(StageKind k, std::string n) : kind(k), name(std::move(n)) {}
};

// Top-k expert selection per token: logits [T, E] (+ bias [E]) -> ids [T, k], weights [T, k].
struct Route : Stage {
  static constexpr StageKind kKind = StageKind::Route;
  explicit Route(std::string n) : Stage(kKind, std::move(n)) {}
  RoutingMethod method = RoutingMethod::Renormalize;
  int num_experts = 0;
  int top_k = 0;
  int n_group = 1;
  int topk_group = 1;
  double routed_scaling_factor = 1.0;
  DType logits = DType::FP32;
  std::optional<DType> bias;  // dtype of the routing bias [E], if the layer has one

  std::vector<StageRef> operands() const override { return {}; }
  static std::shared_ptr<const Route> make(std::string name, RoutingMethod method, int num_experts,
                                           int top_k, int n_group, int topk_group,
                                           double routed_scaling_factor, DType logits,
                                           std::optional<DType> bias);
};

// Groups token slots by local expert, each expert's rows padded to the tile (tile: the plan's).
struct Dispatch : Stage {
  static constexpr StageKind kKind = StageKind::Dispatch;
  explicit Dispatch(std::string n) : Stage(kKind, std::move(n)) {}
  std::shared_ptr<const Route> input;
  int local_expert_offset = 0;
  int local_experts = 0;  // resolved count: never 0

  std::vector<StageRef> operands() const override { return {input}; }
  static std::shared_ptr<const Dispatch> make(std::string name, std::shared_ptr<const Route> input,
                                              int local_expert_offset, int local_experts);
};

// Grouped GEMM over the dispatched rows with the w13 weights, then SwiGLU: [P, k] -> [P, n].
struct Gemm1 : Stage {
  static constexpr StageKind kKind = StageKind::Gemm1;
  explicit Gemm1(std::string n) : Stage(kKind, std::move(n)) {}
  std::shared_ptr<const Dispatch> input;
  int k = 0;  // hidden
  int n = 0;  // intermediate (w13 has 2n rows)
  WeightFormat weight = WeightFormat::MxInt4G32;
  GateUpOrder order = GateUpOrder::GateUp;
  Activation activation = Activation::SwiGlu;
  bool swiglu_alpha = false;
  bool swiglu_beta = false;
  bool swiglu_limit = false;

  std::vector<StageRef> operands() const override { return {input}; }
  static std::shared_ptr<const Gemm1> make(std::string name, std::shared_ptr<const Dispatch> input,
                                           int k, int n, WeightFormat weight, GateUpOrder order,
                                           Activation activation, bool swiglu_alpha,
                                           bool swiglu_beta, bool swiglu_limit);
};

// Grouped GEMM with the w2 weights: [P, k] -> [P, n].
struct Gemm2 : Stage {
  static constexpr StageKind kKind = StageKind::Gemm2;
  explicit Gemm2(std::string n) : Stage(kKind, std::move(n)) {}
  std::shared_ptr<const Gemm1> input;
  int k = 0;  // intermediate
  int n = 0;  // hidden
  WeightFormat weight = WeightFormat::MxInt4G32;

  std::vector<StageRef> operands() const override { return {input}; }
  static std::shared_ptr<const Gemm2> make(std::string name, std::shared_ptr<const Gemm1> input,
                                           int k, int n, WeightFormat weight);
};

// Weighted sum of each token's top_k Gemm2 rows with the route's weights: -> [T, hidden].
struct Finalize : Stage {
  static constexpr StageKind kKind = StageKind::Finalize;
  explicit Finalize(std::string n) : Stage(kKind, std::move(n)) {}
  std::shared_ptr<const Gemm2> gemm2;
  std::shared_ptr<const Route> route;
  int top_k = 0;

  std::vector<StageRef> operands() const override { return {gemm2, route}; }
  static std::shared_ptr<const Finalize> make(std::string name, std::shared_ptr<const Gemm2> gemm2,
                                              std::shared_ptr<const Route> route, int top_k);
};

// A layer: its stages in definition order (an operand is always defined before its use).
struct Module {
  DType activation = DType::BF16;
  std::vector<StageRef> stages;

  // The first stage of kind T, or null.
  template <class T>
  std::shared_ptr<const T> find() const {
    for (const StageRef& s : stages)
      if (s->kind == T::kKind) return std::static_pointer_cast<const T>(s);
    return nullptr;
  }
};

// The module of a spec (validated first). Names: %route %dispatch %gemm1 %gemm2 %out.
Module build_module(const MoeSpec& spec);

// The text form (see the top of this file).
std::string print(const Module& module);

// Reads the text form. Throws Error(InvalidSpec) with "line L, column C: reason" (1-based).
// Checks syntax, names and operand kinds; shapes and spec rules are verify()'s.
Module parse(std::string_view text);

// The spec a module describes. Two normalisations: the whole expert range is
// local_num_experts = 0, and a layer without a routing bias gets bias_dtype = FP32.
MoeSpec to_spec(const Module& module);

// The Verify pass: operand wiring (Internal), shape agreement between stages and the rules of
// the implied MoeSpec (InvalidSpec).
void verify(const Module& module);

}  // namespace moejit::ir

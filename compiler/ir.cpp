// IR nodes, building a module from a spec, the text form (print / parse) and the Verify pass.
#include "compiler/ir.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <functional>
#include <map>
#include <set>
#include <utility>

namespace moejit::ir {

namespace {

// ---------------------------------------------------------------------------------------------
// Spellings of enumerations in the text form: {value, text} tables used by print and parse.
template <class E>
using Spelling = std::pair<E, const char*>;

const Spelling<StageKind> kStageKinds[] = {{StageKind::Route, "route"},
                                           {StageKind::Dispatch, "dispatch"},
                                           {StageKind::Gemm1, "gemm1"},
                                           {StageKind::Gemm2, "gemm2"},
                                           {StageKind::Finalize, "finalize"}};
const Spelling<DType> kDTypes[] = {{DType::BF16, "bf16"}, {DType::FP32, "fp32"}};
const Spelling<std::optional<DType>> kBiases[] = {
    {std::nullopt, "none"}, {DType::BF16, "bf16"}, {DType::FP32, "fp32"}};
const Spelling<WeightFormat> kWeights[] = {{WeightFormat::MxInt4G32, "mxint4_g32"},
                                           {WeightFormat::MxInt4G32Tiled, "mxint4_g32_tiled"}};
const Spelling<GateUpOrder> kOrders[] = {{GateUpOrder::GateUp, "gate_up"},
                                         {GateUpOrder::UpGate, "up_gate"}};
const Spelling<Activation> kActivations[] = {{Activation::SwiGlu, "swiglu"}};

// Routing methods keep the names of their enumerators (moejit::to_string); the enumerators are
// contiguous from 0 with Precomputed last.
const std::vector<Spelling<RoutingMethod>>& routings() {
  static const std::vector<Spelling<RoutingMethod>> table = [] {
    std::vector<Spelling<RoutingMethod>> t;
    for (int i = 0; i <= static_cast<int>(RoutingMethod::Precomputed); ++i) {
      const auto m = static_cast<RoutingMethod>(i);
      t.emplace_back(m, moejit::to_string(m));
    }
    return t;
  }();
  return table;
}

template <class Table, class E>
const char* spell(const Table& table, const E& value) {
  for (const auto& [v, text] : table)
    if (v == value) return text;
  throw Error(ErrorKind::Internal, "IR value with no spelling in the text form");
}

template <class Table>
const auto* lookup(const Table& table, std::string_view text) {
  using Entry = std::remove_reference_t<decltype(*std::begin(table))>;
  for (const auto& entry : table)
    if (text == entry.second) return &entry;
  return static_cast<Entry*>(nullptr);
}

template <class Table>
std::string choices(const Table& table) {
  std::string out;
  for (const auto& entry : table) out += (out.empty() ? "" : ", ") + std::string(entry.second);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the make() functions.
bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '.';
}

bool is_name(std::string_view name) {
  if (name.empty()) return false;
  for (char c : name)
    if (!is_name_char(c)) return false;
  return true;
}

template <class T>
std::shared_ptr<T> new_stage(std::string name) {
  if (!is_name(name))
    throw Error(ErrorKind::Internal,
                fmt::format("{} stage named '{}': a value name is [A-Za-z0-9_.]+",
                            spell(kStageKinds, T::kKind), name));
  return std::make_shared<T>(std::move(name));
}

template <class T>
void require_operand(StageKind user, const char* field, const std::shared_ptr<const T>& p) {
  if (!p)
    throw Error(ErrorKind::Internal, fmt::format("{}.{} is null", spell(kStageKinds, user), field));
}

void require_at_least(StageKind stage, const char* field, int value, int minimum) {
  if (value < minimum)
    throw Error(
        ErrorKind::InvalidSpec,
        fmt::format("{}.{} = {} must be >= {}", spell(kStageKinds, stage), field, value, minimum));
}

}  // namespace

const char* to_string(StageKind kind) { return spell(kStageKinds, kind); }

// ---------------------------------------------------------------------------------------------
// make()
std::shared_ptr<const Route> Route::make(std::string name, RoutingMethod method, int num_experts,
                                         int top_k, int n_group, int topk_group,
                                         double routed_scaling_factor, DType logits,
                                         std::optional<DType> bias) {
  require_at_least(kKind, "experts", num_experts, 1);
  require_at_least(kKind, "top_k", top_k, 1);
  require_at_least(kKind, "n_group", n_group, 1);
  require_at_least(kKind, "topk_group", topk_group, 1);
  auto r = new_stage<Route>(std::move(name));
  r->method = method;
  r->num_experts = num_experts;
  r->top_k = top_k;
  r->n_group = n_group;
  r->topk_group = topk_group;
  r->routed_scaling_factor = routed_scaling_factor;
  r->logits = logits;
  r->bias = bias;
  return r;
}

std::shared_ptr<const Dispatch> Dispatch::make(std::string name, std::shared_ptr<const Route> input,
                                               int local_expert_offset, int local_experts) {
  require_operand(kKind, "input", input);
  require_at_least(kKind, "local_offset", local_expert_offset, 0);
  require_at_least(kKind, "local_experts", local_experts, 1);
  auto d = new_stage<Dispatch>(std::move(name));
  d->input = std::move(input);
  d->local_expert_offset = local_expert_offset;
  d->local_experts = local_experts;
  return d;
}

std::shared_ptr<const Gemm1> Gemm1::make(std::string name, std::shared_ptr<const Dispatch> input,
                                         int k, int n, WeightFormat weight, GateUpOrder order,
                                         Activation activation, bool swiglu_alpha, bool swiglu_beta,
                                         bool swiglu_limit) {
  require_operand(kKind, "input", input);
  require_at_least(kKind, "k", k, 1);
  require_at_least(kKind, "n", n, 1);
  auto g = new_stage<Gemm1>(std::move(name));
  g->input = std::move(input);
  g->k = k;
  g->n = n;
  g->weight = weight;
  g->order = order;
  g->activation = activation;
  g->swiglu_alpha = swiglu_alpha;
  g->swiglu_beta = swiglu_beta;
  g->swiglu_limit = swiglu_limit;
  return g;
}

std::shared_ptr<const Gemm2> Gemm2::make(std::string name, std::shared_ptr<const Gemm1> input,
                                         int k, int n, WeightFormat weight) {
  require_operand(kKind, "input", input);
  require_at_least(kKind, "k", k, 1);
  require_at_least(kKind, "n", n, 1);
  auto g = new_stage<Gemm2>(std::move(name));
  g->input = std::move(input);
  g->k = k;
  g->n = n;
  g->weight = weight;
  return g;
}

std::shared_ptr<const Finalize> Finalize::make(std::string name, std::shared_ptr<const Gemm2> gemm2,
                                               std::shared_ptr<const Route> route, int top_k) {
  require_operand(kKind, "gemm2", gemm2);
  require_operand(kKind, "route", route);
  require_at_least(kKind, "top_k", top_k, 1);
  auto f = new_stage<Finalize>(std::move(name));
  f->gemm2 = std::move(gemm2);
  f->route = std::move(route);
  f->top_k = top_k;
  return f;
}

// ---------------------------------------------------------------------------------------------
// Spec <-> module.
Module build_module(const MoeSpec& spec) {
  spec.validate();
  Module m;
  m.activation = spec.activation_dtype;
  auto route =
      Route::make("route", spec.routing, spec.num_experts, spec.top_k, spec.n_group,
                  spec.topk_group, spec.routed_scaling_factor, spec.logits_dtype,
                  spec.has_routing_bias ? std::optional<DType>(spec.bias_dtype) : std::nullopt);
  auto dispatch = Dispatch::make("dispatch", route, spec.local_expert_offset, spec.local_experts());
  auto gemm1 = Gemm1::make("gemm1", dispatch, spec.hidden, spec.intermediate, spec.weight_format,
                           spec.gate_up_order, Activation::SwiGlu, spec.swiglu_alpha,
                           spec.swiglu_beta, spec.swiglu_limit);
  auto gemm2 = Gemm2::make("gemm2", gemm1, spec.intermediate, spec.hidden, spec.weight_format);
  m.stages = {route, dispatch, gemm1, gemm2};
  if (spec.finalize) m.stages.push_back(Finalize::make("out", gemm2, route, spec.top_k));
  return m;
}

namespace {

template <class T>
std::shared_ptr<const T> require_stage(const Module& m) {
  auto s = m.find<T>();
  if (!s)
    throw Error(ErrorKind::InvalidSpec,
                fmt::format("module has no {} stage", spell(kStageKinds, T::kKind)));
  return s;
}

}  // namespace

MoeSpec to_spec(const Module& m) {
  const auto route = require_stage<Route>(m);
  const auto dispatch = require_stage<Dispatch>(m);
  const auto gemm1 = require_stage<Gemm1>(m);
  MoeSpec s;
  s.hidden = gemm1->k;
  s.intermediate = gemm1->n;
  s.num_experts = route->num_experts;
  s.top_k = route->top_k;
  s.weight_format = gemm1->weight;
  s.activation_dtype = m.activation;
  s.gate_up_order = gemm1->order;
  s.routing = route->method;
  s.logits_dtype = route->logits;
  s.n_group = route->n_group;
  s.topk_group = route->topk_group;
  s.routed_scaling_factor = route->routed_scaling_factor;
  s.has_routing_bias = route->bias.has_value();
  s.bias_dtype = route->bias.value_or(DType::FP32);
  s.swiglu_alpha = gemm1->swiglu_alpha;
  s.swiglu_beta = gemm1->swiglu_beta;
  s.swiglu_limit = gemm1->swiglu_limit;
  s.local_expert_offset = dispatch->local_expert_offset;
  const bool all_experts =
      dispatch->local_expert_offset == 0 && dispatch->local_experts == route->num_experts;
  s.local_num_experts = all_experts ? 0 : dispatch->local_experts;
  s.finalize = m.find<Finalize>() != nullptr;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Verify.
namespace {

// Wiring: names unique, each operand an earlier stage of this module, the stage kinds in the
// order Route, Dispatch, Gemm1, Gemm2 and an optional Finalize. A violation is a compiler bug:
// parse() cannot produce one.
void verify_wiring(const Module& m) {
  static const StageKind kOrder[] = {StageKind::Route, StageKind::Dispatch, StageKind::Gemm1,
                                     StageKind::Gemm2, StageKind::Finalize};
  const size_t n = m.stages.size();
  if (n < 4 || n > 5)
    throw Error(ErrorKind::Internal, fmt::format("module has {} stages, expected 4 or 5", n));
  for (size_t i = 0; i < n; ++i) {
    const Stage& s = *m.stages[i];
    if (s.kind != kOrder[i])
      throw Error(ErrorKind::Internal,
                  fmt::format("stage {} (%{}) is a {}, expected a {}", i, s.name, to_string(s.kind),
                              to_string(kOrder[i])));
    for (size_t j = 0; j < i; ++j)
      if (m.stages[j]->name == s.name)
        throw Error(ErrorKind::Internal, fmt::format("value %{} is defined twice", s.name));
    for (const StageRef& op : s.operands()) {
      const auto end = m.stages.begin() + static_cast<std::ptrdiff_t>(i);
      if (std::find(m.stages.begin(), end, op) == end)
        throw Error(ErrorKind::Internal,
                    fmt::format("%{} reads %{}, which is not an earlier stage of the module",
                                s.name, op->name));
    }
  }
}

void require_equal(const char* a, int va, const char* b, int vb, const char* meaning) {
  if (va != vb)
    throw Error(ErrorKind::InvalidSpec,
                fmt::format("{} = {} does not match {} = {} (both are {})", a, va, b, vb, meaning));
}

}  // namespace

void verify(const Module& m) {
  verify_wiring(m);
  const auto route = m.find<Route>();
  const auto gemm1 = m.find<Gemm1>();
  const auto gemm2 = m.find<Gemm2>();
  require_equal("gemm2.n", gemm2->n, "gemm1.k", gemm1->k, "the hidden size");
  require_equal("gemm2.k", gemm2->k, "gemm1.n", gemm1->n, "the intermediate size");
  if (gemm2->weight != gemm1->weight)
    throw Error(ErrorKind::InvalidSpec,
                fmt::format("gemm2.weight = {} does not match gemm1.weight = {}",
                            spell(kWeights, gemm2->weight), spell(kWeights, gemm1->weight)));
  if (const auto fin = m.find<Finalize>())
    require_equal("finalize.top_k", fin->top_k, "route.top_k", route->top_k, "the route's k");
  to_spec(m).validate();
}

// ---------------------------------------------------------------------------------------------
// Print.
namespace {

using Attr = std::pair<const char*, std::string>;

std::string flag(bool b) { return b ? "1" : "0"; }

std::vector<Attr> attributes(const Route& r) {
  return {{"method", spell(routings(), r.method)},
          {"experts", std::to_string(r.num_experts)},
          {"top_k", std::to_string(r.top_k)},
          {"n_group", std::to_string(r.n_group)},
          {"topk_group", std::to_string(r.topk_group)},
          {"scale", fmt::format("{}", r.routed_scaling_factor)},
          {"logits", spell(kDTypes, r.logits)},
          {"bias", spell(kBiases, r.bias)}};
}

std::vector<Attr> attributes(const Dispatch& d) {
  return {{"local_offset", std::to_string(d.local_expert_offset)},
          {"local_experts", std::to_string(d.local_experts)}};
}

std::vector<Attr> attributes(const Gemm1& g) {
  return {{"k", std::to_string(g.k)},
          {"n", std::to_string(g.n)},
          {"weight", spell(kWeights, g.weight)},
          {"order", spell(kOrders, g.order)},
          {"act", spell(kActivations, g.activation)},
          {"alpha", flag(g.swiglu_alpha)},
          {"beta", flag(g.swiglu_beta)},
          {"limit", flag(g.swiglu_limit)}};
}

std::vector<Attr> attributes(const Gemm2& g) {
  return {{"k", std::to_string(g.k)},
          {"n", std::to_string(g.n)},
          {"weight", spell(kWeights, g.weight)}};
}

std::vector<Attr> attributes(const Finalize& f) { return {{"top_k", std::to_string(f.top_k)}}; }

std::vector<Attr> attributes(const Stage& s) {
  switch (s.kind) {
    case StageKind::Route: return attributes(static_cast<const Route&>(s));
    case StageKind::Dispatch: return attributes(static_cast<const Dispatch&>(s));
    case StageKind::Gemm1: return attributes(static_cast<const Gemm1&>(s));
    case StageKind::Gemm2: return attributes(static_cast<const Gemm2&>(s));
    case StageKind::Finalize: return attributes(static_cast<const Finalize&>(s));
  }
  throw Error(ErrorKind::Internal, "stage of unknown kind");
}

std::string print_stage(const Stage& s) {
  std::string line = fmt::format("  %{} = {}", s.name, to_string(s.kind));
  for (const StageRef& op : s.operands()) line += fmt::format(" %{}", op->name);
  for (const auto& [key, value] : attributes(s)) line += fmt::format(" {}={}", key, value);
  return line + "\n";
}

}  // namespace

std::string print(const Module& m) {
  std::string out = fmt::format("moejit.module version={} activation={} {{\n", kTextVersion,
                                spell(kDTypes, m.activation));
  for (const StageRef& s : m.stages) out += print_stage(*s);
  return out + "}\n";
}

// ---------------------------------------------------------------------------------------------
// Parse.
namespace {

struct Token {
  enum class Kind { Word, Ref, Equals, LBrace, RBrace };
  Kind kind;
  std::string_view text;  // a Ref's text includes its '%'
  int line;
  int column;
};

[[noreturn]] void fail(int line, int column, const std::string& reason) {
  throw Error(ErrorKind::InvalidSpec, fmt::format("line {}, column {}: {}", line, column, reason));
}

[[noreturn]] void fail(const Token& at, const std::string& reason) {
  fail(at.line, at.column, reason);
}

bool comment_at(std::string_view s, size_t i) {
  return s[i] == '#' || (s[i] == '/' && i + 1 < s.size() && s[i + 1] == '/');
}

// Tokens of one line; a comment runs to the end of the line.
std::vector<Token> lex_line(std::string_view s, int line) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size() && !comment_at(s, i)) {
    const char c = s[i];
    const int column = static_cast<int>(i) + 1;
    if (c == ' ' || c == '\t' || c == '\r') {
      ++i;
    } else if (c == '=' || c == '{' || c == '}') {
      const auto kind =
          c == '=' ? Token::Kind::Equals : (c == '{' ? Token::Kind::LBrace : Token::Kind::RBrace);
      out.push_back({kind, s.substr(i, 1), line, column});
      ++i;
    } else {
      const size_t start = i;
      while (i < s.size() && std::string_view(" \t\r={}#").find(s[i]) == std::string_view::npos &&
             !comment_at(s, i))
        ++i;
      const auto kind = c == '%' ? Token::Kind::Ref : Token::Kind::Word;
      out.push_back({kind, s.substr(start, i - start), line, column});
    }
  }
  return out;
}

std::string describe(const Token& t) { return fmt::format("'{}'", t.text); }

// An empty token just past `t`: where a missing token was expected.
Token end_of(const Token& t) {
  return {t.kind, {}, t.line, t.column + static_cast<int>(t.text.size())};
}

// The key=value attributes of one line. Values are taken by key; finish() rejects the rest.
class Attrs {
 public:
  Attrs(const Token& owner, const std::vector<Token>& tokens, size_t first) : owner_(owner) {
    for (size_t i = first; i < tokens.size(); i += 3) {
      const Token& key = tokens[i];
      if (key.kind != Token::Kind::Word)
        fail(key, fmt::format("expected an attribute, got {}", describe(key)));
      if (i + 1 >= tokens.size() || tokens[i + 1].kind != Token::Kind::Equals)
        fail(i + 1 < tokens.size() ? tokens[i + 1] : end_of(key),
             fmt::format("expected '=' after attribute '{}'", key.text));
      if (i + 2 >= tokens.size() || tokens[i + 2].kind != Token::Kind::Word)
        fail(i + 2 < tokens.size() ? tokens[i + 2] : end_of(tokens[i + 1]),
             fmt::format("expected a value for attribute '{}'", key.text));
      if (auto it = entries_.find(key.text); it != entries_.end())
        fail(key, fmt::format("duplicate attribute '{}' (first at column {})", key.text,
                              it->second.first.column));
      entries_.emplace(key.text, std::make_pair(key, tokens[i + 2]));
    }
  }

  int integer(std::string_view key) { return number<int>(key, "integer"); }
  double real(std::string_view key) { return number<double>(key, "number"); }

  bool flag(std::string_view key) {
    const Token& v = take(key);
    if (v.text != "0" && v.text != "1")
      fail(v, fmt::format("bad flag {} for attribute '{}' (expected 0 or 1)", describe(v), key));
    return v.text == "1";
  }

  template <class Table>
  auto choice(std::string_view key, const Table& table) {
    const Token& v = take(key);
    const auto* found = lookup(table, v.text);
    if (!found)
      fail(v, fmt::format("unknown value {} for attribute '{}' (expected one of {})", describe(v),
                          key, choices(table)));
    return found->first;
  }

  // The value token of an attribute already taken, for errors about its value.
  const Token& value_token(std::string_view key) const { return entries_.at(key).second; }

  void finish() const {
    for (const auto& [key, entry] : entries_)
      if (!taken_.count(key))
        fail(entry.first, fmt::format("unknown attribute '{}' for {}", key, owner_.text));
  }

 private:
  // The whole value read as a T (std::from_chars: no sign '+', no spaces, no overflow).
  template <class T>
  T number(std::string_view key, const char* what) {
    const Token& v = take(key);
    const char* end = v.text.data() + v.text.size();
    T out{};
    const auto result = std::from_chars(v.text.data(), end, out);
    if (result.ec != std::errc() || result.ptr != end)
      fail(v, fmt::format("bad {} {} for attribute '{}'", what, describe(v), key));
    return out;
  }

  const Token& take(std::string_view key) {
    auto it = entries_.find(key);
    if (it == entries_.end())
      fail(owner_, fmt::format("{} is missing attribute '{}'", owner_.text, key));
    taken_.insert(std::string(key));
    return it->second.second;
  }

  const Token& owner_;
  std::map<std::string_view, std::pair<Token, Token>, std::less<>> entries_;  // key -> (key, value)
  std::set<std::string, std::less<>> taken_;
};

// One stage line being built: its name, op keyword, resolved operands and attributes.
struct StageLine {
  std::string name;
  const Token& op;
  std::vector<StageRef> operands;
  Attrs& attrs;

  template <class T>
  std::shared_ptr<const T> operand(size_t i) const {
    return std::static_pointer_cast<const T>(operands[i]);
  }
};

// Runs a make() and places any error it throws at the op keyword.
template <class F>
StageRef located(const Token& op, F&& make) {
  try {
    return make();
  } catch (const Error& e) {
    fail(op, e.what());
  }
}

StageRef parse_route(const StageLine& l) {
  const auto method = l.attrs.choice("method", routings());
  const int experts = l.attrs.integer("experts");
  const int top_k = l.attrs.integer("top_k");
  const int n_group = l.attrs.integer("n_group");
  const int topk_group = l.attrs.integer("topk_group");
  const double scale = l.attrs.real("scale");
  const DType logits = l.attrs.choice("logits", kDTypes);
  const std::optional<DType> bias = l.attrs.choice("bias", kBiases);
  l.attrs.finish();
  return located(l.op, [&] {
    return Route::make(l.name, method, experts, top_k, n_group, topk_group, scale, logits, bias);
  });
}

StageRef parse_dispatch(const StageLine& l) {
  const int offset = l.attrs.integer("local_offset");
  const int local = l.attrs.integer("local_experts");
  l.attrs.finish();
  return located(l.op, [&] { return Dispatch::make(l.name, l.operand<Route>(0), offset, local); });
}

StageRef parse_gemm1(const StageLine& l) {
  const int k = l.attrs.integer("k");
  const int n = l.attrs.integer("n");
  const WeightFormat weight = l.attrs.choice("weight", kWeights);
  const GateUpOrder order = l.attrs.choice("order", kOrders);
  const Activation act = l.attrs.choice("act", kActivations);
  const bool alpha = l.attrs.flag("alpha");
  const bool beta = l.attrs.flag("beta");
  const bool limit = l.attrs.flag("limit");
  l.attrs.finish();
  return located(l.op, [&] {
    return Gemm1::make(l.name, l.operand<Dispatch>(0), k, n, weight, order, act, alpha, beta,
                       limit);
  });
}

StageRef parse_gemm2(const StageLine& l) {
  const int k = l.attrs.integer("k");
  const int n = l.attrs.integer("n");
  const WeightFormat weight = l.attrs.choice("weight", kWeights);
  l.attrs.finish();
  return located(l.op, [&] { return Gemm2::make(l.name, l.operand<Gemm1>(0), k, n, weight); });
}

StageRef parse_finalize(const StageLine& l) {
  const int top_k = l.attrs.integer("top_k");
  l.attrs.finish();
  return located(l.op, [&] {
    return Finalize::make(l.name, l.operand<Gemm2>(0), l.operand<Route>(1), top_k);
  });
}

// Per op keyword: the kinds of its operands and how to build it.
struct OpRule {
  StageKind kind;
  std::vector<StageKind> operands;
  StageRef (*build)(const StageLine&);
};

const std::vector<OpRule>& op_rules() {
  static const std::vector<OpRule> rules = {
      {StageKind::Route, {}, parse_route},
      {StageKind::Dispatch, {StageKind::Route}, parse_dispatch},
      {StageKind::Gemm1, {StageKind::Dispatch}, parse_gemm1},
      {StageKind::Gemm2, {StageKind::Gemm1}, parse_gemm2},
      {StageKind::Finalize, {StageKind::Gemm2, StageKind::Route}, parse_finalize},
  };
  return rules;
}

std::string operand_list(const OpRule& rule) {
  std::string out;
  for (StageKind k : rule.operands) out += (out.empty() ? "" : ", ") + std::string(to_string(k));
  return out.empty() ? "none" : out;
}

class Parser {
 public:
  explicit Parser(std::string_view text) {
    int line = 1;
    size_t start = 0;
    for (size_t i = 0; i <= text.size(); ++i) {
      if (i == text.size() || text[i] == '\n') {
        lines_.push_back(lex_line(text.substr(start, i - start), line++));
        end_column_ = static_cast<int>(i - start) + 1;
        start = i + 1;
      }
    }
  }

  Module run() {
    size_t i = next_nonempty(0);
    if (i == lines_.size())
      fail(end_line(), end_column_, "expected 'moejit.module', got end of input");
    parse_header(lines_[i]);
    for (i = next_nonempty(i + 1); i < lines_.size(); i = next_nonempty(i + 1)) {
      const std::vector<Token>& tokens = lines_[i];
      if (tokens[0].kind == Token::Kind::RBrace) {
        close(tokens);
        return std::move(module_);
      }
      parse_stage(tokens);
    }
    fail(end_line(), end_column_, "expected '}' to close the module, got end of input");
  }

 private:
  size_t next_nonempty(size_t i) const {
    while (i < lines_.size() && lines_[i].empty()) ++i;
    return i;
  }
  int end_line() const { return static_cast<int>(lines_.size()); }

  void parse_header(const std::vector<Token>& tokens) {
    const Token& head = tokens[0];
    if (head.kind != Token::Kind::Word || head.text != "moejit.module")
      fail(head, fmt::format("expected 'moejit.module', got {}", describe(head)));
    const Token& last = tokens.back();
    if (last.kind != Token::Kind::LBrace)
      fail(end_of(last), "expected '{' at the end of the module header");
    std::vector<Token> attr_tokens(tokens.begin(), tokens.end() - 1);
    Attrs attrs(head, attr_tokens, 1);
    const int version = attrs.integer("version");
    if (version != kTextVersion)
      fail(attrs.value_token("version"),
           fmt::format("unsupported version {} (this build reads version {})", version,
                       kTextVersion));
    module_.activation = attrs.choice("activation", kDTypes);
    attrs.finish();
  }

  void parse_stage(const std::vector<Token>& tokens) {
    const Token& def = tokens[0];
    if (def.kind != Token::Kind::Ref)
      fail(def, fmt::format("expected a stage '%name = op ...' or '}}', got {}", describe(def)));
    const std::string name = value_name(def);
    if (auto it = defined_.find(name); it != defined_.end())
      fail(def,
           fmt::format("redefinition of '%{}' (first defined at line {})", name, it->second.first));
    if (tokens.size() < 2 || tokens[1].kind != Token::Kind::Equals)
      fail(tokens.size() < 2 ? end_of(def) : tokens[1],
           fmt::format("expected '=' after '%{}'", name));
    if (tokens.size() < 3 || tokens[2].kind != Token::Kind::Word)
      fail(tokens.size() < 3 ? end_of(tokens[1]) : tokens[2], "expected a stage keyword after '='");
    const Token& op = tokens[2];
    const OpRule& rule = find_rule(op);
    size_t i = 3;
    std::vector<StageRef> operands;
    for (; i < tokens.size() && tokens[i].kind == Token::Kind::Ref; ++i)
      operands.push_back(resolve(tokens[i], rule, operands.size()));
    if (operands.size() != rule.operands.size())
      fail(op, fmt::format("{} takes {} operand(s) ({}), got {}", op.text, rule.operands.size(),
                           operand_list(rule), operands.size()));
    Attrs attrs(op, tokens, i);
    StageRef stage = rule.build(StageLine{name, op, std::move(operands), attrs});
    defined_.emplace(name, std::make_pair(def.line, stage));
    kinds_.emplace(rule.kind, def.line);
    module_.stages.push_back(stage);
  }

  const OpRule& find_rule(const Token& op) const {
    const auto* kind = lookup(kStageKinds, op.text);
    if (!kind)
      fail(op, fmt::format("unknown stage {} (expected one of {})", describe(op),
                           choices(kStageKinds)));
    if (auto it = kinds_.find(kind->first); it != kinds_.end())
      fail(op, fmt::format("duplicate {} stage (the first is at line {})", op.text, it->second));
    for (const OpRule& r : op_rules())
      if (r.kind == kind->first) return r;
    throw Error(ErrorKind::Internal, "stage keyword with no parse rule");
  }

  StageRef resolve(const Token& ref, const OpRule& rule, size_t index) const {
    const std::string name = value_name(ref);
    auto it = defined_.find(name);
    if (it == defined_.end()) fail(ref, fmt::format("undefined value '%{}'", name));
    const StageRef& s = it->second.second;
    if (index >= rule.operands.size())
      fail(ref, fmt::format("{} takes {} operand(s) ({}); unexpected '%{}'", to_string(rule.kind),
                            rule.operands.size(), operand_list(rule), name));
    if (s->kind != rule.operands[index])
      fail(ref, fmt::format("operand {} of {} must be a {} stage; '%{}' is a {} stage", index + 1,
                            to_string(rule.kind), to_string(rule.operands[index]), name,
                            to_string(s->kind)));
    return s;
  }

  void close(const std::vector<Token>& tokens) {
    if (tokens.size() > 1)
      fail(tokens[1], fmt::format("unexpected {} after '}}'", describe(tokens[1])));
    for (const OpRule& r : op_rules())
      if (r.kind != StageKind::Finalize && !kinds_.count(r.kind))
        fail(tokens[0], fmt::format("module has no {} stage", to_string(r.kind)));
    const size_t rest = next_nonempty(static_cast<size_t>(tokens[0].line));
    if (rest < lines_.size())
      fail(lines_[rest][0], "unexpected text after the module's closing '}'");
  }

  static std::string value_name(const Token& ref) {
    std::string_view name = ref.text.substr(1);
    if (!is_name(name))
      fail(ref, fmt::format("bad value name {}: a name is '%' then [A-Za-z0-9_.]+", describe(ref)));
    return std::string(name);
  }

  std::vector<std::vector<Token>> lines_;  // tokens of each source line (index = line - 1)
  int end_column_ = 1;                     // column just past the last character of the text
  Module module_;
  std::map<std::string, std::pair<int, StageRef>, std::less<>> defined_;  // name -> (line, stage)
  std::map<StageKind, int> kinds_;                                        // kind -> line
};

}  // namespace

Module parse(std::string_view text) { return Parser(text).run(); }

}  // namespace moejit::ir

namespace moejit {

std::string spec_to_ir_text(const MoeSpec& spec) { return ir::print(ir::build_module(spec)); }

MoeSpec parse_spec_text(std::string_view text) {
  ir::Module m = ir::parse(text);
  ir::verify(m);
  return ir::to_spec(m);
}

}  // namespace moejit

// Tests of the CPU reference (tests/reference/): hand-computed layers and routing, the laws of
// int4 packing and dispatch, expert-parallel and finalize identities, and the acceptance rule.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <unistd.h>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "moejit/moejit.h"
#include "reference/compare.h"
#include "reference/cpu_reference.h"
#include "reference/layer_data.h"
#include "reference/mxint4.h"
#include "reference/npy.h"

namespace moejit::ref {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();
constexpr float kInff = std::numeric_limits<float>::infinity();

size_t sz(long long v) { return static_cast<size_t>(v); }

// ---- bf16 and int4 ------------------------------------------------------------------------------

TEST(RefMxint4, Bf16RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.0p-8f), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1.0p-8f), 0x3f82);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.0p-8f + 0x1.0p-20f), 0x3f81);  // above halfway
  EXPECT_EQ(float_to_bf16(kInff), 0x7f80);
  EXPECT_EQ(float_to_bf16(-kInff), 0xff80);
  EXPECT_EQ(float_to_bf16(3.4e38f), 0x7f80);  // overflow rounds to Inf
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(kNaNf))));
  // A NaN whose payload lives only in the low 16 bits must not become Inf.
  float low_nan;
  const uint32_t bits = 0x7f800001u;
  std::memcpy(&low_nan, &bits, 4);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(low_nan))));
  for (uint32_t b = 0; b < 0x10000; ++b) {  // every non-NaN bf16 round-trips
    const auto h = static_cast<uint16_t>(b);
    if (std::isnan(bf16_to_float(h))) continue;
    ASSERT_EQ(float_to_bf16(bf16_to_float(h)), h) << b;
  }
}

TEST(RefMxint4, PackUnpackRoundTripsEveryValueAtEveryNibble) {
  EXPECT_EQ(pack_int4(3, -2), 0xE3);  // the header's worked example
  for (int lo = -8; lo <= 7; ++lo)
    for (int hi = -8; hi <= 7; ++hi) {
      const uint8_t b = pack_int4(lo, hi);
      ASSERT_EQ(unpack_int4_lo(b), lo);
      ASSERT_EQ(unpack_int4_hi(b), hi);
    }
  // Rows: set every k of a 64-element row to every value; neighbours stay untouched.
  for (size_t k = 0; k < 64; ++k)
    for (int v = -8; v <= 7; ++v) {
      std::vector<uint8_t> row(32, 0x5A);  // nibbles 0xA (-6) low, 0x5 high
      int4_set(row.data(), k, v);
      for (size_t k2 = 0; k2 < 64; ++k2)
        ASSERT_EQ(int4_get(row.data(), k2), k2 == k ? v : (k2 & 1 ? 5 : -6)) << k << " " << v;
      ASSERT_EQ(row[k / 2] & (k & 1 ? 0xf0 : 0x0f), (static_cast<unsigned>(v) & 0xf) << (k & 1 ? 4 : 0));
    }
  // Dequant: value x the scale of its 32-group.
  std::vector<uint8_t> row(32, 0);
  std::vector<uint16_t> sc = {float_to_bf16(0.5f), float_to_bf16(-0.25f)};
  int4_set(row.data(), 31, -8);
  int4_set(row.data(), 32, 7);
  EXPECT_EQ(dequant(row.data(), sc.data(), 31), -4.0);
  EXPECT_EQ(dequant(row.data(), sc.data(), 32), -1.75);
}

// ---- hand-computed layer --------------------------------------------------------------------------

MoeSpec small_spec(RoutingMethod m, int E, int k) {
  MoeSpec s;
  s.hidden = 32;
  s.intermediate = 32;
  s.num_experts = E;
  s.top_k = k;
  s.routing = m;
  return s;
}

// Row r of w13 (in the spec's gate/up order: `gate` says which half is meant) = q at columns.
void set_row(HostLayer& L, bool w13, int e, int r, float scale, const std::vector<std::pair<int, int>>& q) {
  uint8_t* row = w13 ? L.w13_row(e, r) : L.w2_row(e, r);
  uint16_t* sc = w13 ? L.w13_scale_row(e, r) : L.w2_scale_row(e, r);
  for (auto [k, v] : q) int4_set(row, sz(k), v);
  sc[0] = float_to_bf16(scale);
}

// 2 experts, H = I = 32.
//  expert 0: gate[n] = x[n] (q 1, scale 1), up[n] = x[n] (q 2, scale 0.5), y[h] = a[h] (q 1, scale 1)
//  expert 1: gate[n] = 0.25 sum(x) (q 1 everywhere), up[n] = 7 x[n] (q 7, scale 1),
//            y[h] = -a[(h+1) % 32] (q -8, scale 0.125)
HostLayer hand_layer(const MoeSpec& s, int T) {
  HostLayer L = allocate_layer(s, T);
  const int I = s.intermediate;
  const bool gu = s.gate_up_order == GateUpOrder::GateUp;
  for (int n = 0; n < I; ++n) {
    const int rg = gu ? n : I + n, ru = gu ? I + n : n;
    set_row(L, true, 0, rg, 1.0f, {{n, 1}});
    set_row(L, true, 0, ru, 0.5f, {{n, 2}});
    std::vector<std::pair<int, int>> all;
    for (int k = 0; k < 32; ++k) all.emplace_back(k, 1);
    set_row(L, true, 1, rg, 0.25f, all);
    set_row(L, true, 1, ru, 1.0f, {{n, 7}});
  }
  for (int h = 0; h < s.hidden; ++h) {
    set_row(L, false, 0, h, 1.0f, {{h, 1}});
    set_row(L, false, 1, h, 0.125f, {{(h + 1) % 32, -8}});
  }
  auto x = [&](int t, int h, float v) { L.hidden[sz(t) * 32 + sz(h)] = float_to_bf16(v); };
  x(0, 0, 1.f), x(0, 1, 2.f), x(0, 2, -1.f);  // token 0
  if (T > 1) x(1, 0, 1.f), x(1, 1, 1.f), x(1, 5, 2.f);  // token 1: sum 4
  return L;
}

void expect_row(const std::vector<double>& v, size_t row, const std::vector<std::pair<int, double>>& nz) {
  for (int h = 0; h < 32; ++h) {
    double want = 0;
    for (auto [i, val] : nz)
      if (i == h) want = val;
    EXPECT_NEAR(v[row * 32 + sz(h)], want, 1e-9) << "row " << row << " h " << h;
  }
}

TEST(RefLayer, HandComputedTopKBothGateUpOrders) {
  for (GateUpOrder order : {GateUpOrder::GateUp, GateUpOrder::UpGate}) {
    MoeSpec s = small_spec(RoutingMethod::TopK, 2, 1);
    s.gate_up_order = order;
    HostLayer L = hand_layer(s, 4);
    // token 0 -> expert 0 with weight 0.5; token 1 -> expert 1 with weight 2; tokens 2, 3 -> 0.
    const std::vector<float> logits = {0.5f, -1.f, -1.f, 2.f, 3.f, 1.f, -4.f, 1.f};
    L.logits = logits;
    const ReferenceOutput R = reference_layer(s, L, 4);
    ASSERT_EQ(R.ids, (std::vector<int32_t>{0, 1, 0, 1}));
    // token 0: a = silu(x) * x = {0.7310585786, 3.5231883119, 0.2689414214}
    expect_row(R.y, 0, {{0, 0.7310585786300049}, {1, 3.5231883119115293}, {2, 0.2689414213699951}});
    expect_row(R.out, 0, {{0, 0.36552928931500245}, {1, 1.7615941559557646}, {2, 0.13447071068499755}});
    // token 1: g = 1, u = {7, 7, .., 14 at 5}: a = silu(1) u; y[h] = -a[h + 1]
    expect_row(R.y, 1, {{31, -5.117410050410034}, {0, -5.117410050410034}, {4, -10.234820100820068}});
    expect_row(R.out, 1, {{31, -10.234820100820068}, {0, -10.234820100820068}, {4, -20.469640201640136}});
    expect_row(R.out, 2, {});  // zero hidden -> zero output
  }
}

TEST(RefLayer, HandComputedSwigluAlphaBetaLimit) {
  MoeSpec s = small_spec(RoutingMethod::TopK, 2, 1);
  s.swiglu_alpha = s.swiglu_beta = s.swiglu_limit = true;
  HostLayer L = hand_layer(s, 1);
  L.logits = {1.f, 0.f};
  L.alpha = {2.f, 1.f};
  L.beta = {0.5f, 0.f};
  L.limit = {1.5f, 100.f};
  const ReferenceOutput R = reference_layer(s, L, 1);
  // g = u = x; a = min(g, 1.5) sigmoid(2 min(g, 1.5)) (clamp(u, +-1.5) + 0.5)
  expect_row(R.y, 0, {{0, 1.3211956169668235}, {1, 2.8577223804673}, {2, 0.05960146101105877}});
}

TEST(RefLayer, FinalizeSumsLocalSlotsAndSkipsNonLocal) {
  MoeSpec s = small_spec(RoutingMethod::Renormalize, 2, 2);
  HostLayer L = hand_layer(s, 2);
  L.logits = {0.f, 0.f, 0.f, 0.f};  // weights 0.5, 0.5
  ReferenceOutput R = reference_layer(s, L, 2);
  ASSERT_EQ(R.ids, (std::vector<int32_t>{0, 1, 0, 1}));
  for (int h = 0; h < 32; ++h)
    EXPECT_NEAR(R.out[sz(h)], 0.5 * R.y[sz(h)] + 0.5 * R.y[32 + sz(h)], 1e-12);
  // EP rank holding expert 1 only: the partial sum is the expert-1 half.
  s.local_expert_offset = 1;
  s.local_num_experts = 1;
  const ReferenceOutput P = reference_layer(s, L, 2);
  EXPECT_EQ(P.local, (std::vector<uint8_t>{0, 1, 0, 1}));
  for (int h = 0; h < 32; ++h) EXPECT_NEAR(P.out[sz(h)], 0.5 * R.y[32 + sz(h)], 1e-12);
  // A Precomputed id outside [0, E) contributes nothing (not a multiply by 0: NaN stays out).
  MoeSpec p = small_spec(RoutingMethod::Precomputed, 2, 2);
  HostLayer Q = hand_layer(p, 1);
  Q.topk_ids = {0, 7};
  Q.topk_weights = {2.f, kNaNf};
  const ReferenceOutput RQ = reference_layer(p, Q, 1);
  expect_row(RQ.out, 0, {{0, 1.4621171572600098}, {1, 7.0463766238230586}, {2, 0.5378828427399902}});
}

// ---- routing ------------------------------------------------------------------------------------

HostLayer routing_layer(const MoeSpec& s, const std::vector<std::vector<float>>& rows) {
  HostLayer L = allocate_layer(s, static_cast<int>(rows.size()));
  L.logits.clear();
  for (const auto& r : rows) L.logits.insert(L.logits.end(), r.begin(), r.end());
  sync_bf16(L);
  return L;
}

void expect_route(const MoeSpec& s, const HostLayer& L, int t, std::vector<int32_t> ids,
                  std::vector<double> w) {
  const TokenRoute r = route(s, L, t);
  EXPECT_EQ(r.ids, ids) << to_string(s.routing) << " token " << t;
  ASSERT_EQ(r.weights.size(), w.size());
  for (size_t j = 0; j < w.size(); ++j) {
    if (std::isnan(w[j])) {
      EXPECT_TRUE(std::isnan(r.weights[j]));
    } else if (std::isinf(w[j])) {
      EXPECT_EQ(r.weights[j], w[j]);
    } else {
      EXPECT_NEAR(r.weights[j], w[j], 1e-12) << to_string(s.routing) << " token " << t << " j " << j;
    }
  }
}

TEST(RefRouting, EachMethodOnHandPickedLogits) {
  const std::vector<float> l = {0.5f, 2.0f, -1.0f, 1.0f, -3.0f};  // top-2: experts 1, 3
  using M = RoutingMethod;
  auto check = [&](M m, std::vector<double> w) {
    const MoeSpec s = small_spec(m, 5, 2);
    expect_route(s, routing_layer(s, {l}), 0, {1, 3}, w);
  };
  check(M::Default, {0.606967519754451, 0.22329087197648378});  // softmax over all 5
  check(M::Renormalize, {0.7310585786300049, 0.2689414213699951});  // softmax over {2, 1}
  check(M::RenormalizeNaive, {0.7310585786300049, 0.2689414213699951});
  check(M::TopK, {2.0, 1.0});
  check(M::Sigmoid, {0.8807970779778823, 0.7310585786300049});
  check(M::TopKSigmoid, {0.8807970779778823, 0.7310585786300049});
  check(M::SigmoidRenorm, {0.5464491031607007, 0.4535508968392993});
  const MoeSpec s4 = small_spec(M::Llama4, 5, 1);
  expect_route(s4, routing_layer(s4, {l}), 0, {1}, {0.8807970779778823});
}

TEST(RefRouting, TiesGoToLowerIndexAndNaNRanksFirst) {
  const MoeSpec s = small_spec(RoutingMethod::TopK, 4, 2);
  const HostLayer L = routing_layer(
      s, {{1.f, 2.f, 2.f, 2.f},          // boundary tie: 1, 2
          {1.f, kNaNf, 3.f, kNaNf},      // two NaNs first, lower index first
          {kInff, 1.f, -kInff, kNaNf},   // NaN above +Inf
          {-0.0f, 0.0f, -1.f, -1.f},     // -0 == +0: lower index
          {-kInff, -kInff, -kInff, -kInff}});
  expect_route(s, L, 0, {1, 2}, {2.0, 2.0});
  expect_route(s, L, 1, {1, 3}, {kNaN, kNaN});
  expect_route(s, L, 2, {3, 0}, {kNaN, kInf});
  expect_route(s, L, 3, {0, 1}, {0.0, 0.0});
  expect_route(s, L, 4, {0, 1}, {-kInf, -kInf});
  const MoeSpec s3 = small_spec(RoutingMethod::TopK, 4, 3);
  expect_route(s3, L, 1, {1, 3, 2}, {kNaN, kNaN, 3.0});
  // NaN anywhere poisons a full softmax.
  const MoeSpec d = small_spec(RoutingMethod::Default, 4, 1);
  expect_route(d, L, 1, {1}, {kNaN});
  for (int t = 0; t < 5; ++t) EXPECT_FALSE(route(s, L, t).near_tie) << t;  // exact ties only
}

TEST(RefRouting, Bf16LogitsAreReadAsBf16) {
  MoeSpec s = small_spec(RoutingMethod::TopK, 2, 1);
  s.logits_dtype = DType::BF16;
  // 1 + 2^-9 rounds to 1 in bf16: a tie, so expert 0 wins although expert 1 is larger in fp32.
  const HostLayer L = routing_layer(s, {{1.0f, 1.0f + 0x1.0p-9f}});
  EXPECT_EQ(L.logits_bf16, (std::vector<uint16_t>{0x3f80, 0x3f80}));
  expect_route(s, L, 0, {0}, {1.0});
}

TEST(RefRouting, DeepSeekV3UngroupedSelectsOnBiasedSigmoid) {
  MoeSpec s = small_spec(RoutingMethod::DeepSeekV3, 4, 2);
  s.has_routing_bias = true;
  s.routed_scaling_factor = 2.5;
  HostLayer L = routing_layer(s, {{0.f, 0.f, 2.f, -2.f}});
  L.bias = {0.5f, 0.f, 0.f, 0.6f};
  // keys s + b = {1.0, 0.5, 0.8808, 0.7192}: picks 0 and 2 (expert 3's bias lifts it above 1
  // but not above 2); weights = s / sum(s) * 2.5 with s = {0.5, 0.8808}.
  expect_route(s, L, 0, {0, 2}, {0.9052742216333274, 1.5947257783666728});
}

TEST(RefRouting, DeepSeekV3GroupedHandCase) {
  MoeSpec s = small_spec(RoutingMethod::DeepSeekV3, 8, 3);
  s.n_group = 4;
  s.topk_group = 2;
  s.has_routing_bias = true;
  s.routed_scaling_factor = 2.5;
  HostLayer L = routing_layer(s, {{1.f, -1.f, 0.f, 0.5f, 2.f, -3.f, 0.f, 0.f}});
  L.bias = {0.f, 0.f, 0.1f, 0.f, -0.5f, 0.f, 0.2f, 0.2f};
  // keys = {0.7311, 0.2689 | 0.6, 0.6225 | 0.3808, 0.0474 | 0.7, 0.7}
  // group scores (sum of top 2) = {1.0, 1.2225, 0.4282, 1.4}: keep groups 3 and 1.
  // Expert 0 (key 0.7311, second best overall) is dropped with its group.
  // Candidates 2 (0.6), 3 (0.6225), 6 (0.7), 7 (0.7): top-3 = 6, 7 (tie: lower first), 3.
  // Weights: s = {0.5, 0.5, sigmoid(0.5)} / sum * 2.5.
  expect_route(s, L, 0, {6, 7, 3}, {0.7704353360118117, 0.7704353360118117, 0.9591293279763768});
  // Tied group scores: the lower group stays.
  MoeSpec t = small_spec(RoutingMethod::DeepSeekV3, 4, 1);
  t.n_group = 2;
  t.topk_group = 1;
  const HostLayer T = routing_layer(t, {{0.f, 0.f, 0.f, 0.f}, {-5.f, 0.f, 0.f, 0.f}, {-0.7f, 1.3f, 0.f, kNaNf}});
  expect_route(t, T, 0, {0}, {1.0});
  expect_route(t, T, 1, {2}, {1.0});  // group 1 (1.0) beats group 0 (0.5067)
  expect_route(t, T, 2, {3}, {kNaN}); // NaN group first, NaN expert first
}

TEST(RefRouting, NearTiesAreFlaggedAndAcceptedOnlyThere) {
  const MoeSpec s = small_spec(RoutingMethod::TopK, 3, 1);
  const HostLayer L = routing_layer(s, {{1.0f, 1.0f + 0x1.0p-23f, 0.f}, {1.0f, 1.1f, 0.f}, {1.f, 1.f, 0.f}});
  EXPECT_TRUE(route(s, L, 0).near_tie);
  EXPECT_FALSE(route(s, L, 1).near_tie);
  EXPECT_FALSE(route(s, L, 2).near_tie);  // exact tie of identical inputs: deterministic
  const int32_t zero = 0, one = 1, two = 2;
  EXPECT_TRUE(ids_acceptable(s, L, 0, &one));
  EXPECT_TRUE(ids_acceptable(s, L, 0, &zero));
  EXPECT_FALSE(ids_acceptable(s, L, 0, &two));
  EXPECT_FALSE(ids_acceptable(s, L, 1, &zero));
  EXPECT_FALSE(ids_acceptable(s, L, 2, &one));
  // DeepSeekV3: different inputs giving keys equal up to 1e-7 are a near-tie.
  MoeSpec d = small_spec(RoutingMethod::DeepSeekV3, 2, 1);
  d.has_routing_bias = true;
  HostLayer D = routing_layer(d, {{0.f, 0.f}});
  D.bias = {0.25f, 0.25f + 0x1.0p-24f};
  EXPECT_TRUE(route(d, D, 0).near_tie);
  EXPECT_EQ(route(d, D, 0).ids, (std::vector<int32_t>{1}));
  EXPECT_TRUE(ids_acceptable(d, D, 0, &zero));
}

// ---- dispatch laws --------------------------------------------------------------------------------

TEST(RefDispatch, PermutationIsAStableBijectionOntoNonPaddingRows) {
  MoeSpec s = small_spec(RoutingMethod::Precomputed, 16, 4);
  s.local_expert_offset = 4;
  s.local_num_experts = 8;
  const int T = 37;
  for (int tile : {1, 8, 16}) {
    std::vector<int32_t> ids(sz(T) * 4);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(hash64(tile, 1, i) % 18) - 1;
    const Dispatch D = reference_dispatch(s, ids, T, tile);
    ASSERT_EQ(D.expert_offsets.size(), 9u);
    std::vector<int> hits(D.permuted_to_slot.size(), 0);
    for (size_t sl = 0; sl < ids.size(); ++sl) {
      const bool local = ids[sl] >= 4 && ids[sl] < 12;
      const int row = D.expanded_to_permuted[sl];
      if (!local) {
        ASSERT_EQ(row, -1);
        continue;
      }
      const int l = ids[sl] - 4;
      ASSERT_GE(row, D.expert_offsets[sz(l)]);
      ASSERT_LT(row, D.expert_offsets[sz(l)] + D.counts[sz(l)]);  // not in the padding
      ASSERT_EQ(D.permuted_to_slot[sz(row)], static_cast<int>(sl));
      ++hits[sz(row)];
    }
    for (int l = 0; l < 8; ++l) {
      const int b = D.expert_offsets[sz(l)], e = D.expert_offsets[sz(l) + 1];
      ASSERT_EQ(b % tile, 0);
      ASSERT_EQ(e - b, (D.counts[sz(l)] + tile - 1) / tile * tile);
      for (int r = b; r < e; ++r) {
        const bool real = r < b + D.counts[sz(l)];
        ASSERT_EQ(hits[sz(r)], real ? 1 : 0);  // bijection; padding never referenced
        ASSERT_EQ(D.permuted_to_slot[sz(r)] >= 0, real);
        if (real && r > b) {
          ASSERT_LT(D.permuted_to_slot[sz(r) - 1], D.permuted_to_slot[sz(r)]);  // stable
        }
      }
    }
  }
}

// ---- identities on generated layers ---------------------------------------------------------------

MoeSpec gen_spec(RoutingMethod m) {
  MoeSpec s;
  s.hidden = 128;
  s.intermediate = 64;
  s.num_experts = 8;
  s.top_k = 3;
  s.routing = m;
  s.swiglu_alpha = s.swiglu_beta = s.swiglu_limit = true;
  return s;
}

TEST(RefLayer, ExpertParallelPartialsSumToTheUnsplitOutput) {
  const MoeSpec full = gen_spec(RoutingMethod::Renormalize);
  MoeSpec r0 = full, r1 = full;
  r0.local_num_experts = r1.local_num_experts = 4;
  r1.local_expert_offset = 4;
  HostLayer Lf = make_weights(full, 7), L0 = make_weights(r0, 7), L1 = make_weights(r1, 7);
  for (HostLayer* L : {&Lf, &L0, &L1}) make_inputs(*L, 20, 11);
  const ReferenceOutput F = reference_layer(full, Lf, 20), P0 = reference_layer(r0, L0, 20),
                        P1 = reference_layer(r1, L1, 20);
  double norm = 0;
  for (double v : F.out) norm = std::max(norm, std::fabs(v));
  ASSERT_GT(norm, 0.1);
  for (size_t i = 0; i < F.out.size(); ++i) ASSERT_NEAR(P0.out[i] + P1.out[i], F.out[i], 1e-12 * norm);
}

TEST(RefLayer, UnfinalizedPlusFinalizeEqualsFinalized) {
  MoeSpec s = gen_spec(RoutingMethod::DeepSeekV3);
  s.n_group = 4;
  s.topk_group = 2;
  s.has_routing_bias = true;
  s.routed_scaling_factor = 2.5;
  s.local_expert_offset = 2;
  s.local_num_experts = 5;
  HostLayer L = make_weights(s, 3);
  make_inputs(L, 33, 5);
  const ReferenceOutput R = reference_layer(s, L, 33);
  const Dispatch D = reference_dispatch(s, R.ids, 33, 8);
  const std::vector<double> rows = reference_unfinalized(D, R);
  const std::vector<double> out =
      reference_finalize(33, s.top_k, s.hidden, rows.data(), R.weights.data(), D.expanded_to_permuted.data());
  ASSERT_EQ(out.size(), R.out.size());
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], R.out[i], 1e-12);
  for (size_t r = 0; r < D.permuted_to_slot.size(); ++r) {
    if (D.permuted_to_slot[r] >= 0) continue;
    for (int h = 0; h < s.hidden; ++h) ASSERT_EQ(rows[r * sz(s.hidden) + sz(h)], 0.0);
  }
}

TEST(RefLayer, SubsetAndRoutingOverrideMatchTheFullRun) {
  const MoeSpec s = gen_spec(RoutingMethod::Default);
  HostLayer L = make_weights(s, 1);
  make_inputs(L, 16, 2);
  const ReferenceOutput F = reference_layer(s, L, 16);
  const ReferenceOutput S = reference_layer(s, L, 16, {9, 3});
  for (int h = 0; h < s.hidden; ++h) {
    EXPECT_EQ(S.out[sz(h)], F.out[9 * sz(s.hidden) + sz(h)]);
    EXPECT_EQ(S.out[sz(s.hidden) + sz(h)], F.out[3 * sz(s.hidden) + sz(h)]);
  }
  // Overriding token 3's routing with other ids changes exactly that token.
  Routing o = route_all(s, L, 16);
  o.ids[3 * 3] = (o.ids[3 * 3] + 1) % 8 == o.ids[3 * 3 + 1] ? (o.ids[3 * 3] + 2) % 8 : (o.ids[3 * 3] + 1) % 8;
  const ReferenceOutput O = reference_layer(s, L, 16, {3, 4}, &o);
  EXPECT_NE(O.out[0], F.out[3 * sz(s.hidden)]);
  EXPECT_EQ(O.out[sz(s.hidden)], F.out[4 * sz(s.hidden)]);
}

// ---- generated data -------------------------------------------------------------------------------

TEST(RefData, GenerationIsDeterministicAcrossThreadCounts) {
  MoeSpec s = gen_spec(RoutingMethod::DeepSeekV3);
  s.has_routing_bias = true;
  s.logits_dtype = DType::BF16;
  setenv("MOEJIT_REF_THREADS", "1", 1);
  HostLayer a = make_weights(s, 42);
  make_inputs(a, 50, 9);
  setenv("MOEJIT_REF_THREADS", "3", 1);
  HostLayer b = make_weights(s, 42);
  make_inputs(b, 50, 9);
  unsetenv("MOEJIT_REF_THREADS");
  EXPECT_TRUE(a.w13 == b.w13 && a.w13_scale == b.w13_scale && a.w2 == b.w2 && a.w2_scale == b.w2_scale);
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(a.logits_bf16, b.logits_bf16);
  EXPECT_EQ(a.bias, b.bias);
  HostLayer c = make_weights(s, 43);
  EXPECT_FALSE(a.w13 == c.w13);
  // Scales within U(0.5, 1.5) / sqrt(21.5 H) (+ bf16 rounding); every int4 value occurs.
  const double base = 1.0 / std::sqrt(21.5 * s.hidden);
  for (uint16_t v : a.w13_scale) {
    ASSERT_GE(bf16_to_float(v), 0.49 * base);
    ASSERT_LE(bf16_to_float(v), 1.51 * base);
  }
  std::set<int> seen;
  for (size_t k = 0; k < 2 * a.w13.size(); ++k) seen.insert(int4_get(a.w13.data(), k));
  EXPECT_EQ(seen.size(), 16u);
  ASSERT_EQ(a.logits_bytes(), 50u * 8 * 2);
  ASSERT_EQ(a.alpha.size(), 8u);
}

TEST(RefData, OptionsShapeTheRouting) {
  const MoeSpec s = gen_spec(RoutingMethod::Renormalize);
  HostLayer L = make_weights(s, 1);
  InputOptions o;
  o.force_expert = 5;
  o.empty_experts = {0, 2};
  make_inputs(L, 40, 3, o);
  for (int t = 0; t < 40; ++t) {
    const TokenRoute r = route(s, L, t);
    EXPECT_EQ(r.ids[0], 5);
    for (int id : r.ids) EXPECT_TRUE(id != 0 && id != 2);
  }
  for (RoutingMethod m : {RoutingMethod::TopK, RoutingMethod::DeepSeekV3}) {
    MoeSpec t = gen_spec(m);
    t.has_routing_bias = m == RoutingMethod::DeepSeekV3;
    HostLayer T = make_weights(t, 1);
    InputOptions ties;
    ties.ties = true;
    make_inputs(T, 30, 4, ties);
    int tied = 0;
    for (int tok = 0; tok < 30; tok += 3) {
      const TokenRoute r = route(t, T, tok);
      const int a = r.ids[2], p = a ^ 1;
      EXPECT_EQ(T.logit(tok, a), T.logit(tok, p));
      tied += std::find(r.ids.begin(), r.ids.end(), std::min(a, p)) != r.ids.end();
    }
    EXPECT_EQ(tied, 10) << to_string(m);  // the lower index of each tied pair is picked
  }
  MoeSpec p = gen_spec(RoutingMethod::Precomputed);
  HostLayer P = make_weights(p, 1);
  InputOptions inv;
  inv.invalid_ids = true;
  make_inputs(P, 20, 3, inv);
  for (int t = 0; t < 20; ++t) {
    std::set<int> ids(P.topk_ids.begin() + t * 3, P.topk_ids.begin() + t * 3 + 3);
    EXPECT_EQ(ids.size(), 3u);
    for (int j = 0; j < 3; ++j) EXPECT_GT(P.topk_weights[sz(t) * 3 + sz(j)], 0.f);
  }
  EXPECT_EQ(P.topk_ids[2 * 3 + 2], 8);
  EXPECT_EQ(P.topk_ids[4 * 3 + 2], -1);
}

TEST(RefData, NonFiniteInputsPropagateByKind) {
  const MoeSpec s = gen_spec(RoutingMethod::Renormalize);
  HostLayer L = make_weights(s, 1);
  InputOptions o;
  o.nonfinite_hidden = true;
  make_inputs(L, 8, 3, o);
  const ReferenceOutput R = reference_layer(s, L, 8);
  auto count_nonfinite = [&](int t) {
    int c = 0;
    for (int h = 0; h < s.hidden; ++h) c += !std::isfinite(R.out[sz(t) * sz(s.hidden) + sz(h)]);
    return c;
  };
  EXPECT_EQ(count_nonfinite(0), 0);
  EXPECT_EQ(count_nonfinite(4), 0);
  EXPECT_EQ(count_nonfinite(1), s.hidden);  // NaN in x reaches every output of the token
  EXPECT_GT(count_nonfinite(2), 0);
}

// ---- the acceptance rule --------------------------------------------------------------------------

std::vector<double> smooth(size_t n) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::sin(0.37 * static_cast<double>(i)) + 0.1;
  return v;
}

TEST(RefCompare, CraftedInputs) {
  const std::vector<double> ref = smooth(10000);
  auto noisy = [&](double rel) {
    std::vector<double> g(ref);
    for (size_t i = 0; i < g.size(); ++i) g[i] *= 1.0 + rel * (hash64(1, 2, i) % 2 ? 1 : -1);
    return g;
  };
  const CompareResult ok = compare_output(ref, noisy(1e-3));
  EXPECT_TRUE(ok.pass) << ok.summary;
  EXPECT_NEAR(ok.rel_l2, 1e-3, 1e-5);
  EXPECT_EQ(ok.frac_within, 1.0);
  const CompareResult bad = compare_output(ref, noisy(5e-2));
  EXPECT_FALSE(bad.pass) << bad.summary;
  // A NaN the reference does not have (an unwritten element of a NaN-filled buffer) fails.
  std::vector<double> got = ref;
  got[1234] = kNaN;
  const CompareResult unwritten = compare_output(ref, got);
  EXPECT_FALSE(unwritten.pass);
  EXPECT_EQ(unwritten.nonfinite_mismatch, 1u);
  EXPECT_NE(unwritten.summary.find("FAIL"), std::string::npos);
  // Non-finite reference elements must match by kind.
  std::vector<double> r2 = ref, g2 = ref;
  r2[1] = g2[1] = kNaN;
  r2[2] = g2[2] = kInf;
  r2[3] = g2[3] = -kInf;
  EXPECT_TRUE(compare_output(r2, g2).pass);
  g2[2] = -kInf;
  EXPECT_FALSE(compare_output(r2, g2).pass);
  g2[2] = 1e30;
  EXPECT_FALSE(compare_output(r2, g2).pass);
  // 0.2% of elements far off: rel_l2 may pass but the element rule does not.
  std::vector<double> g3 = ref;
  for (size_t i = 0; i < 20; ++i) g3[i * 500] += 0.1;
  const CompareResult few = compare_output(ref, g3);
  EXPECT_LT(few.rel_l2, 1e-2);
  EXPECT_FALSE(few.pass) << few.summary;
  // bf16 rounding of the result passes.
  std::vector<uint16_t> b(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) b[i] = float_to_bf16(static_cast<float>(ref[i]));
  EXPECT_TRUE(compare_output_bf16(ref, b).pass);
  // All-zero reference: exact zeros pass, anything else fails.
  EXPECT_TRUE(compare_output(std::vector<double>(8, 0.0), std::vector<double>(8, 0.0)).pass);
  EXPECT_FALSE(compare_output(std::vector<double>(8, 0.0), std::vector<double>(8, 1e-3)).pass);
}

// One wrong row of a large output passes the whole-tensor figures; the per-row bound catches it,
// and keeps passing rounding noise and rows of small norm.
TEST(RefCompare, RowBoundCatchesOneWrongRow) {
  constexpr size_t kRows = 4096, kWidth = 800;
  const std::vector<double> ref = smooth(kRows * kWidth);
  std::vector<double> got = ref;
  for (size_t i = 0; i < kWidth; ++i) got[1000 * kWidth + i] *= 1.5;  // row 1000 50% off
  const CompareResult whole = compare_output(ref, got);
  EXPECT_TRUE(whole.pass) << "the case this bound is for: " << whole.summary;
  const CompareResult rows = compare_output(ref, got, by_rows(kWidth));
  EXPECT_FALSE(rows.pass) << rows.summary;
  EXPECT_EQ(rows.worst_row, 1000u);
  EXPECT_NEAR(rows.worst_row_rel, 0.5, 1e-9);
  std::vector<double> zero_row = ref;
  std::fill(zero_row.begin() + 7 * kWidth, zero_row.begin() + 8 * kWidth, 0.0);
  EXPECT_FALSE(compare_output(ref, zero_row, by_rows(kWidth)).pass);
  // bf16 rounding everywhere passes.
  std::vector<uint16_t> b(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) b[i] = float_to_bf16(static_cast<float>(ref[i]));
  const CompareResult rounded = compare_output_bf16(ref, b, by_rows(kWidth));
  EXPECT_TRUE(rounded.pass) << rounded.summary;
  // A row of tiny norm with an error small against the tensor's scale passes (the floor).
  std::vector<double> r2 = ref, g2 = ref;
  for (size_t i = 0; i < kWidth; ++i) {
    r2[5 * kWidth + i] = 1e-6 * ref[i];
    g2[5 * kWidth + i] = r2[5 * kWidth + i] + 1e-4 * (i % 2 ? 1 : -1);
  }
  const CompareResult tiny = compare_output(r2, g2, by_rows(kWidth));
  EXPECT_TRUE(tiny.pass) << tiny.summary;
  EXPECT_EQ(tiny.worst_row, 5u);
}

TEST(RefCompare, RoutingAcceptsNearTiesOnly) {
  const MoeSpec s = small_spec(RoutingMethod::TopK, 3, 1);
  const HostLayer L = routing_layer(s, {{1.0f, 1.0f + 0x1.0p-23f, 0.f}, {1.0f, 1.1f, 0.f}});
  std::vector<int32_t> ids = {1, 1};
  std::vector<float> w = {1.0f + 0x1.0p-23f, 1.1f};
  RoutingCompareResult r = compare_routing(s, L, 2, ids.data(), w.data());
  EXPECT_TRUE(r.pass) << r.summary;
  ids[0] = 0;  // the other side of the near-tie: accepted, weight of expert 0 expected
  w[0] = 1.0f;
  r = compare_routing(s, L, 2, ids.data(), w.data());
  EXPECT_TRUE(r.pass) << r.summary;
  EXPECT_EQ(r.near_tie_accepted, 1);
  EXPECT_EQ(r.accepted.ids[0], 0);
  ids[1] = 0;  // not a near-tie
  r = compare_routing(s, L, 2, ids.data(), w.data());
  EXPECT_FALSE(r.pass);
  EXPECT_EQ(r.id_mismatch, 1);
  ids[1] = 1;
  w[1] = 1.1f * (1 + 3e-5f);
  r = compare_routing(s, L, 2, ids.data(), w.data());
  EXPECT_FALSE(r.pass);
  EXPECT_EQ(r.weight_mismatch, 1);
  EXPECT_TRUE(weight_close(1.0, 1.0 + 5e-6));
  EXPECT_TRUE(weight_close(kNaN, kNaN));
  EXPECT_FALSE(weight_close(kInf, 1e38));
}

// ---- npy / manifest ------------------------------------------------------------------------------

std::string read_all(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

TEST(RefNpy, HeaderIsVersion1AlignedAndDescribesTheArray) {
  const std::string h = npy_header(NpyType::F32, {3, 4});
  ASSERT_EQ(h.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  EXPECT_EQ(h.size() % 64, 0u);
  EXPECT_EQ(static_cast<size_t>(static_cast<unsigned char>(h[8]) | (static_cast<unsigned char>(h[9]) << 8)),
            h.size() - 10);
  EXPECT_EQ(h.back(), '\n');
  EXPECT_NE(h.find("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"), std::string::npos);
  EXPECT_NE(npy_header(NpyType::I32, {5}).find("'shape': (5,)"), std::string::npos);
  EXPECT_NE(npy_header(NpyType::U8, {}).find("'descr': '|u1'"), std::string::npos);
  EXPECT_NE(npy_header(NpyType::BF16, {2}).find("'descr': '<u2'"), std::string::npos);
  EXPECT_NE(npy_header(NpyType::F64, {0, 2}).find("'shape': (0, 2)"), std::string::npos);
}

TEST(RefNpy, DirWritesArraysAndManifest) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("moejit_npy_test_" + std::to_string(hash64(static_cast<uint64_t>(getpid()), 0, 0)));
  {
    NpyDir d((dir / "sub").string());
    const std::vector<int32_t> ids = {1, -2, 3};
    const std::vector<uint16_t> out = {float_to_bf16(1.5f), float_to_bf16(-2.0f)};
    d.save("ids", NpyType::I32, ids, {3});
    d.save("out", NpyType::BF16, out, {1, 2});
    d.meta("spec", "kimi-k2 \"tp\"\n");
    d.meta("tokens", 64);
    d.meta("rel_l2", 1.5e-3);
    d.meta("nan", kNaN);
    d.meta("pass", true);
    d.write_manifest();
    const std::string f = read_all(dir / "sub" / "ids.npy");
    const std::string h = npy_header(NpyType::I32, {3});
    ASSERT_EQ(f.size(), h.size() + 12);
    EXPECT_EQ(f.substr(0, h.size()), h);
    int32_t back[3];
    std::memcpy(back, f.data() + h.size(), 12);
    EXPECT_EQ(back[1], -2);
    const std::string m = read_all(dir / "sub" / "manifest.json");
    EXPECT_EQ(m, d.manifest_json());
    EXPECT_NE(m.find("\"spec\": \"kimi-k2 \\\"tp\\\"\\n\""), std::string::npos) << m;
    EXPECT_NE(m.find("\"tokens\": 64"), std::string::npos);
    EXPECT_NE(m.find("\"nan\": \"NaN\""), std::string::npos);
    EXPECT_NE(m.find("\"pass\": true"), std::string::npos);
    EXPECT_NE(m.find("{\"name\": \"out\", \"file\": \"out.npy\", \"dtype\": \"bfloat16\", "
                     "\"npy_dtype\": \"<u2\", \"shape\": [1, 2]"),
              std::string::npos)
        << m;
  }
  std::filesystem::remove_all(dir);
  EXPECT_THROW(write_npy("/nonexistent-dir/x.npy", NpyType::U8, "", {0}), std::runtime_error);
  EXPECT_EQ(json_quote(std::string("a\x01" "b", 3)), "\"a\\u0001b\"");
}

}  // namespace
}  // namespace moejit::ref

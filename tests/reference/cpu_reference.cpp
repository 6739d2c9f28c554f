// Semantics (shared with the JIT kernels and the GPU reference):
//  * Ranking: descending key; NaN above every number; equal keys (or two NaNs): lower index first.
//  * Selection keys: the raw logit l for every method except DeepSeekV3, which selects on
//    sigmoid(l) + bias (monotone-equivalent for the softmax/sigmoid methods, without saturation
//    ties).
//  * Grouped DeepSeekV3: group g holds experts [g * E/n_group, (g+1) * E/n_group); its score is
//    the sum of its top-2 biased keys; the best topk_group groups stay.
//  * Softmax is max-subtracted, the max taken over non-NaN values (a NaN anywhere makes every
//    weight NaN anyway).
#include "reference/cpu_reference.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "reference/mxint4.h"
#include "reference/parallel.h"

namespace moejit::ref {
namespace {

size_t sz(long long v) { return static_cast<size_t>(v); }

// A selection key with what near-tie detection needs: its magnitude scale (the sum of the
// magnitudes of its terms) and the inputs it was computed from.
struct Key {
  double v = 0;
  double mag = 0;
  std::array<double, 4> src{};
};

// True if (a, ia) ranks strictly above (b, ib).
bool ranks_above(double a, int ia, double b, int ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

bool near_tie(const Key& a, const Key& b) {
  if (!std::isfinite(a.v) || !std::isfinite(b.v)) return false;
  if (a.src == b.src) return false;  // identical inputs: a deterministic exact tie
  return std::fabs(a.v - b.v) <= kNearTieRel * std::max(a.mag, b.mag);
}

// Sorts `idx` by rank of keys[idx].
void rank_sort(std::vector<int>& idx, const std::vector<Key>& keys) {
  std::sort(idx.begin(), idx.end(),
            [&](int a, int b) { return ranks_above(keys[sz(a)].v, a, keys[sz(b)].v, b); });
}

bool is_dsv3(const MoeSpec& s) { return s.routing == RoutingMethod::DeepSeekV3; }
bool grouped(const MoeSpec& s) { return is_dsv3(s) && s.n_group > 1; }

// Everything route() decides for one token.
struct Selection {
  std::vector<Key> keys;         // [E]
  std::vector<Key> group_keys;   // [n_group] (grouped only)
  std::vector<char> group_kept;  // [n_group] (grouped only)
  std::vector<int> candidates;   // experts eligible (kept groups), ranked
  std::vector<int> group_order;  // ranked groups
  bool near_tie = false;
};

Selection select(const MoeSpec& s, const HostLayer& L, int t) {
  const int E = s.num_experts;
  Selection sel;
  sel.keys.resize(sz(E));
  for (int e = 0; e < E; ++e) {
    const double l = L.logit(t, e);
    Key& k = sel.keys[sz(e)];
    if (is_dsv3(s)) {
      const double sg = sigmoid(l), b = L.bias_of(e);
      k.v = sg + b;
      k.mag = std::fabs(sg) + std::fabs(b);
      k.src = {l, b, 0, 0};
    } else {
      k.v = l;
      k.mag = std::fabs(l);
      k.src = {l, 0, 0, 0};
    }
  }
  if (grouped(s)) {
    const int G = s.n_group, gs = E / G;
    sel.group_keys.resize(sz(G));
    for (int g = 0; g < G; ++g) {
      std::vector<int> members(sz(gs));
      std::iota(members.begin(), members.end(), g * gs);
      rank_sort(members, sel.keys);
      Key gk = sel.keys[sz(members[0])];
      if (gs >= 2) {
        const Key& k2 = sel.keys[sz(members[1])];
        gk.v += k2.v;
        gk.mag += k2.mag;
        gk.src[2] = k2.src[0];
        gk.src[3] = k2.src[1];
      }
      sel.group_keys[sz(g)] = gk;
    }
    sel.group_order.resize(sz(G));
    std::iota(sel.group_order.begin(), sel.group_order.end(), 0);
    rank_sort(sel.group_order, sel.group_keys);
    sel.group_kept.assign(sz(G), 0);
    const int keep = std::min(s.topk_group, G);
    for (int i = 0; i < keep; ++i) sel.group_kept[sz(sel.group_order[sz(i)])] = 1;
    if (keep < G &&
        near_tie(sel.group_keys[sz(sel.group_order[sz(keep - 1)])],
                 sel.group_keys[sz(sel.group_order[sz(keep)])]))
      sel.near_tie = true;
    for (int e = 0; e < E; ++e)
      if (sel.group_kept[sz(e / gs)]) sel.candidates.push_back(e);
  } else {
    sel.candidates.resize(sz(E));
    std::iota(sel.candidates.begin(), sel.candidates.end(), 0);
  }
  rank_sort(sel.candidates, sel.keys);
  const size_t pairs = std::min(sz(s.top_k), sel.candidates.size() - 1);
  for (size_t i = 0; i < pairs; ++i)
    if (near_tie(sel.keys[sz(sel.candidates[i])], sel.keys[sz(sel.candidates[i + 1])]))
      sel.near_tie = true;
  return sel;
}

// Softmax over values v (max-subtracted, max over non-NaN).
std::vector<double> softmax(const std::vector<double>& v) {
  double m = -std::numeric_limits<double>::infinity();
  for (double x : v)
    if (!std::isnan(x)) m = std::max(m, x);
  std::vector<double> p(v.size());
  double sum = 0;
  for (size_t i = 0; i < v.size(); ++i) sum += (p[i] = std::exp(v[i] - m));
  for (double& x : p) x /= sum;
  return p;
}

}  // namespace

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

double swiglu(double g, double u, double alpha, double beta, bool has_limit, double limit) {
  if (has_limit) {
    g = g > limit ? limit : g;
    u = u > limit ? limit : (u < -limit ? -limit : u);
  }
  return g * sigmoid(alpha * g) * (u + beta);
}

std::vector<double> weights_for_ids(const MoeSpec& s, const HostLayer& L, int t,
                                    const int32_t* ids) {
  const int E = s.num_experts, k = s.top_k;
  std::vector<double> w(sz(k), 0.0);
  auto valid = [&](int j) { return ids[j] >= 0 && ids[j] < E; };
  if (s.routing == RoutingMethod::Precomputed) {
    const int32_t* given = L.topk_ids.data() + sz(t) * sz(k);
    for (int j = 0; j < k; ++j) {
      if (ids[j] != given[j]) throw std::invalid_argument("weights_for_ids: Precomputed ids differ");
      w[sz(j)] = L.topk_weights[sz(t) * sz(k) + sz(j)];
    }
    return w;
  }
  auto logit = [&](int j) { return L.logit(t, ids[j]); };
  switch (s.routing) {
    case RoutingMethod::Default:
    case RoutingMethod::RenormalizeNaive: {
      std::vector<double> all(sz(E));
      for (int e = 0; e < E; ++e) all[sz(e)] = L.logit(t, e);
      const std::vector<double> p = softmax(all);
      double sum = 0;
      for (int j = 0; j < k; ++j)
        if (valid(j)) sum += (w[sz(j)] = p[sz(ids[j])]);
      if (s.routing == RoutingMethod::RenormalizeNaive)
        for (double& x : w) x /= sum;
      break;
    }
    case RoutingMethod::Renormalize: {
      std::vector<double> sel;
      for (int j = 0; j < k; ++j)
        if (valid(j)) sel.push_back(logit(j));
      const std::vector<double> p = softmax(sel);
      for (int j = 0, n = 0; j < k; ++j)
        if (valid(j)) w[sz(j)] = p[sz(n++)];
      break;
    }
    case RoutingMethod::TopK:
      for (int j = 0; j < k; ++j)
        if (valid(j)) w[sz(j)] = logit(j);
      break;
    case RoutingMethod::Sigmoid:
    case RoutingMethod::TopKSigmoid:
    case RoutingMethod::Llama4:
      for (int j = 0; j < k; ++j)
        if (valid(j)) w[sz(j)] = sigmoid(logit(j));
      break;
    case RoutingMethod::SigmoidRenorm:
    case RoutingMethod::DeepSeekV3: {
      double sum = 0;
      for (int j = 0; j < k; ++j)
        if (valid(j)) sum += (w[sz(j)] = sigmoid(logit(j)));
      const double scale = s.routing == RoutingMethod::DeepSeekV3 ? s.routed_scaling_factor : 1.0;
      for (double& x : w) x = x / (sum + 1e-20) * scale;
      break;
    }
    case RoutingMethod::Precomputed:
      break;
  }
  return w;
}

TokenRoute route(const MoeSpec& s, const HostLayer& L, int t) {
  const int k = s.top_k;
  TokenRoute r;
  if (s.routing == RoutingMethod::Precomputed) {
    r.ids.assign(L.topk_ids.begin() + static_cast<long>(sz(t) * sz(k)),
                 L.topk_ids.begin() + static_cast<long>(sz(t + 1) * sz(k)));
    r.weights = weights_for_ids(s, L, t, r.ids.data());
    return r;
  }
  const Selection sel = select(s, L, t);
  r.ids.assign(sz(k), -1);
  for (size_t j = 0; j < sz(k) && j < sel.candidates.size(); ++j) r.ids[j] = sel.candidates[j];
  r.weights = weights_for_ids(s, L, t, r.ids.data());
  r.near_tie = sel.near_tie;
  return r;
}

Routing route_all(const MoeSpec& s, const HostLayer& L, int T) {
  Routing R;
  R.tokens = T;
  R.top_k = s.top_k;
  R.ids.resize(sz(T) * sz(s.top_k));
  R.weights.resize(R.ids.size());
  R.near_tie.resize(sz(T));
  parallel_for(sz(T), 64, [&](size_t b, size_t e) {
    for (size_t t = b; t < e; ++t) {
      const TokenRoute r = route(s, L, static_cast<int>(t));
      std::copy(r.ids.begin(), r.ids.end(), R.ids.begin() + static_cast<long>(t * sz(s.top_k)));
      std::copy(r.weights.begin(), r.weights.end(),
                R.weights.begin() + static_cast<long>(t * sz(s.top_k)));
      R.near_tie[t] = r.near_tie;
    }
  });
  return R;
}

bool ids_acceptable(const MoeSpec& s, const HostLayer& L, int t, const int32_t* ids) {
  const int E = s.num_experts, k = s.top_k;
  const TokenRoute ref = route(s, L, t);
  if (std::equal(ref.ids.begin(), ref.ids.end(), ids)) return true;
  if (!ref.near_tie || s.routing == RoutingMethod::Precomputed) return false;
  std::vector<char> chosen(sz(E), 0);
  for (int j = 0; j < k; ++j) {
    if (ids[j] < 0 || ids[j] >= E || chosen[sz(ids[j])]) return false;
    chosen[sz(ids[j])] = 1;
  }
  const Selection sel = select(s, L, t);
  auto clearly_above = [](const Key& a, int ia, const Key& b, int ib) {
    return ranks_above(a.v, ia, b.v, ib) && !near_tie(a, b);
  };
  // Groups: a chosen expert's group may not have topk_group groups clearly above it; an
  // unchosen expert only counts against the choice if its group is certainly kept.
  std::vector<char> may_keep(sz(E), 1), must_keep(sz(E), 1);
  if (grouped(s)) {
    const int G = s.n_group, gs = E / G;
    for (int g = 0; g < G; ++g) {
      int above = 0, not_below = 0;
      for (int h = 0; h < G; ++h) {
        if (h == g) continue;
        const Key &kh = sel.group_keys[sz(h)], &kg = sel.group_keys[sz(g)];
        above += clearly_above(kh, h, kg, g);
        not_below += !clearly_above(kg, g, kh, h);
      }
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        may_keep[sz(e)] = above < s.topk_group;
        must_keep[sz(e)] = not_below < s.topk_group;
      }
    }
  }
  for (int j = 0; j < k; ++j) {
    const int x = ids[j];
    if (!may_keep[sz(x)]) return false;
    for (int y = 0; y < E; ++y) {
      const bool later = !chosen[sz(y)] ? must_keep[sz(y)]
                                        : std::find(ids + j + 1, ids + k, y) != ids + k;
      if (later && clearly_above(sel.keys[sz(y)], y, sel.keys[sz(x)], x)) return false;
    }
  }
  return true;
}

Routing routing_from(int tokens, int top_k, const int32_t* ids, const float* weights) {
  Routing R;
  R.tokens = tokens;
  R.top_k = top_k;
  R.ids.assign(ids, ids + sz(tokens) * sz(top_k));
  R.weights.assign(weights, weights + sz(tokens) * sz(top_k));
  R.near_tie.assign(sz(tokens), 0);
  return R;
}

// ---- the layer ------------------------------------------------------------------------------------
namespace {

// int4 value of each nibble as a double.
constexpr double kNib[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};

// Unpacks a packed row of K int4 into q[K] (unscaled).
void unpack_row(const uint8_t* row, int K, double* q) {
  for (int b = 0; b < K / 2; ++b) {
    q[2 * b] = kNib[row[b] & 0xf];
    q[2 * b + 1] = kNib[row[b] >> 4];
  }
}

// sum_k q[k] * scale[k/32] * x[k]
double dot_q(const double* q, const uint16_t* scales, const double* x, int K) {
  double total = 0;
  for (int g = 0; g < K / kGroupSize; ++g) {
    const double* qg = q + g * kGroupSize;
    const double* xg = x + g * kGroupSize;
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int i = 0; i < kGroupSize; i += 4) {
      a0 += qg[i] * xg[i];
      a1 += qg[i + 1] * xg[i + 1];
      a2 += qg[i + 2] * xg[i + 2];
      a3 += qg[i + 3] * xg[i + 3];
    }
    total += ((a0 + a1) + (a2 + a3)) * static_cast<double>(bf16_to_float(scales[g]));
  }
  return total;
}

constexpr int kRowBlock = 32;  // rows of one expert per task

}  // namespace

ReferenceOutput reference_layer(const MoeSpec& s, const HostLayer& L, int T,
                                const std::vector<int>& tokens, const Routing* routing) {
  const int H = s.hidden, I = s.intermediate, k = s.top_k, E = s.num_experts;
  const int off = s.local_expert_offset, Lc = s.local_experts();
  if (T > L.tokens) throw std::invalid_argument("reference_layer: T exceeds the layer's tokens");
  if (routing && routing->tokens < T)
    throw std::invalid_argument("reference_layer: routing covers fewer than T tokens");
  ReferenceOutput R;
  R.top_k = k;
  R.hidden = H;
  R.intermediate = I;
  R.tokens = tokens;
  if (R.tokens.empty()) {
    R.tokens.resize(sz(T));
    std::iota(R.tokens.begin(), R.tokens.end(), 0);
  }
  const size_t n = R.tokens.size(), slots = n * sz(k);
  for (int t : R.tokens)
    if (t < 0 || t >= T) throw std::invalid_argument("reference_layer: token out of range");

  // Routing of the computed tokens.
  R.ids.resize(slots);
  R.weights.resize(slots);
  R.local.resize(slots);
  parallel_for(n, 16, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      const int t = R.tokens[i];
      for (int j = 0; j < k; ++j) {
        const size_t src = sz(t) * sz(k) + sz(j);
        if (routing) {
          R.ids[i * sz(k) + sz(j)] = routing->ids[src];
          R.weights[i * sz(k) + sz(j)] = routing->weights[src];
        }
      }
      if (!routing) {
        const TokenRoute r = route(s, L, t);
        std::copy(r.ids.begin(), r.ids.end(), R.ids.begin() + static_cast<long>(i * sz(k)));
        std::copy(r.weights.begin(), r.weights.end(),
                  R.weights.begin() + static_cast<long>(i * sz(k)));
      }
    }
  });
  // Slots of each local expert (ascending slot index).
  std::vector<std::vector<size_t>> by_expert(sz(Lc));
  for (size_t sl = 0; sl < slots; ++sl) {
    const int id = R.ids[sl];
    R.local[sl] = id >= off && id < off + Lc && id < E;
    if (R.local[sl]) by_expert[sz(id - off)].push_back(sl);
  }
  // Hidden rows in double.
  std::vector<double> x(n * sz(H));
  parallel_for(n, 16, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i)
      for (int h = 0; h < H; ++h)
        x[i * sz(H) + sz(h)] = bf16_to_float(L.hidden[sz(R.tokens[i]) * sz(H) + sz(h)]);
  });

  // Tasks: (local expert, block of rows) for experts with slots.
  auto make_tasks = [&](int rows) {
    std::vector<std::pair<int, int>> tasks;
    for (int l = 0; l < Lc; ++l)
      if (!by_expert[sz(l)].empty())
        for (int r = 0; r < rows; r += kRowBlock) tasks.emplace_back(l, r);
    return tasks;
  };
  const bool gate_first = s.gate_up_order == GateUpOrder::GateUp;

  // Gemm1 + SwiGLU.
  R.act.assign(slots * sz(I), 0.0);
  const auto t1 = make_tasks(I);
  parallel_for(t1.size(), 1, [&](size_t b, size_t e) {
    std::vector<double> qg(sz(H)), qu(sz(H));
    for (size_t ti = b; ti < e; ++ti) {
      const int l = t1[ti].first, ge = off + l;
      const double alpha = s.swiglu_alpha ? L.alpha[sz(l)] : 1.0;
      const double beta = s.swiglu_beta ? L.beta[sz(l)] : 0.0;
      const double lim = s.swiglu_limit ? L.limit[sz(l)] : 0.0;
      for (int nn = t1[ti].second; nn < std::min(I, t1[ti].second + kRowBlock); ++nn) {
        const int rg = gate_first ? nn : I + nn, ru = gate_first ? I + nn : nn;
        unpack_row(L.w13_row(ge, rg), H, qg.data());
        unpack_row(L.w13_row(ge, ru), H, qu.data());
        for (size_t sl : by_expert[sz(l)]) {
          const double* xs = x.data() + (sl / sz(k)) * sz(H);
          const double g = dot_q(qg.data(), L.w13_scale_row(ge, rg), xs, H);
          const double u = dot_q(qu.data(), L.w13_scale_row(ge, ru), xs, H);
          R.act[sl * sz(I) + sz(nn)] = swiglu(g, u, alpha, beta, s.swiglu_limit, lim);
        }
      }
    }
  });

  // Gemm2.
  R.y.assign(slots * sz(H), 0.0);
  const auto t2 = make_tasks(H);
  parallel_for(t2.size(), 1, [&](size_t b, size_t e) {
    std::vector<double> q(sz(I));
    for (size_t ti = b; ti < e; ++ti) {
      const int l = t2[ti].first, ge = off + l;
      for (int h = t2[ti].second; h < std::min(H, t2[ti].second + kRowBlock); ++h) {
        unpack_row(L.w2_row(ge, h), I, q.data());
        for (size_t sl : by_expert[sz(l)])
          R.y[sl * sz(H) + sz(h)] = dot_q(q.data(), L.w2_scale_row(ge, h), R.act.data() + sl * sz(I), I);
      }
    }
  });

  // Finalize: local slots only, ascending j.
  R.out.assign(n * sz(H), 0.0);
  parallel_for(n, 4, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i)
      for (int j = 0; j < k; ++j) {
        const size_t sl = i * sz(k) + sz(j);
        if (!R.local[sl]) continue;
        for (int h = 0; h < H; ++h) R.out[i * sz(H) + sz(h)] += R.weights[sl] * R.y[sl * sz(H) + sz(h)];
      }
  });
  return R;
}

// ---- dispatch and finalize ------------------------------------------------------------------------

Dispatch reference_dispatch(const MoeSpec& s, const std::vector<int32_t>& ids, int T, int tile) {
  const int k = s.top_k, off = s.local_expert_offset, Lc = s.local_experts();
  if (tile <= 0) throw std::invalid_argument("reference_dispatch: tile must be positive");
  if (ids.size() < sz(T) * sz(k)) throw std::invalid_argument("reference_dispatch: ids too short");
  Dispatch D;
  D.tile = tile;
  D.counts.assign(sz(Lc), 0);
  const size_t slots = sz(T) * sz(k);
  auto local_of = [&](size_t sl) {
    const int id = ids[sl];
    return id >= off && id < off + Lc ? id - off : -1;
  };
  for (size_t sl = 0; sl < slots; ++sl)
    if (local_of(sl) >= 0) ++D.counts[sz(local_of(sl))];
  D.expert_offsets.assign(sz(Lc) + 1, 0);
  for (int l = 0; l < Lc; ++l)
    D.expert_offsets[sz(l) + 1] = D.expert_offsets[sz(l)] + (D.counts[sz(l)] + tile - 1) / tile * tile;
  D.expanded_to_permuted.assign(slots, -1);
  D.permuted_to_slot.assign(sz(D.expert_offsets[sz(Lc)]), -1);
  std::vector<int32_t> fill(D.expert_offsets.begin(), D.expert_offsets.end() - 1);
  for (size_t sl = 0; sl < slots; ++sl) {
    const int l = local_of(sl);
    if (l < 0) continue;
    const int row = fill[sz(l)]++;
    D.expanded_to_permuted[sl] = row;
    D.permuted_to_slot[sz(row)] = static_cast<int32_t>(sl);
  }
  return D;
}

std::vector<double> reference_unfinalized(const Dispatch& D, const ReferenceOutput& ref) {
  const size_t H = sz(ref.hidden), k = sz(ref.top_k);
  for (size_t i = 0; i < ref.tokens.size(); ++i)
    if (ref.tokens[i] != static_cast<int>(i))
      throw std::invalid_argument("reference_unfinalized: ref must cover tokens 0..T-1 in order");
  std::vector<double> rows(D.permuted_to_slot.size() * H, 0.0);
  for (size_t r = 0; r < D.permuted_to_slot.size(); ++r) {
    const int sl = D.permuted_to_slot[r];
    if (sl < 0) continue;
    if (sz(sl) >= ref.tokens.size() * k)
      throw std::invalid_argument("reference_unfinalized: dispatch has more slots than ref");
    std::copy_n(ref.y.begin() + static_cast<long>(sz(sl) * H), H,
                rows.begin() + static_cast<long>(r * H));
  }
  return rows;
}

std::vector<double> reference_finalize(int T, int top_k, int H, const double* rows,
                                       const double* weights, const int32_t* e2p) {
  std::vector<double> out(sz(T) * sz(H), 0.0);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < top_k; ++j) {
      const size_t sl = sz(t) * sz(top_k) + sz(j);
      if (e2p[sl] < 0) continue;
      const double* row = rows + sz(e2p[sl]) * sz(H);
      for (int h = 0; h < H; ++h) out[sz(t) * sz(H) + sz(h)] += weights[sl] * row[h];
    }
  return out;
}

}  // namespace moejit::ref

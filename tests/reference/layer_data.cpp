#include "reference/layer_data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "reference/cpu_reference.h"
#include "reference/mxint4.h"
#include "reference/parallel.h"

namespace moejit::ref {
namespace {

// Stream ids of the generated tensors (part of the hash input: never renumber).
enum TensorStream : uint64_t {
  kHidden = 1,
  kLogits = 2,
  kBias = 3,
  kIds = 4,
  kWeights = 5,
  kW13 = 6,
  kW13Scale = 7,
  kW2 = 8,
  kW2Scale = 9,
  kAlpha = 10,
  kBeta = 11,
  kLimit = 12,
};

uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Hash stream of one tensor: value i is mix64(key + i * golden), the splitmix64 sequence.
struct Rng {
  uint64_t key;
  Rng(uint64_t seed, uint64_t stream) : key(mix64(seed ^ mix64(stream))) {}
  uint64_t bits(uint64_t i) const { return mix64(key + i * 0x9E3779B97F4A7C15ull); }
  // Uniform in [0, 1).
  double uniform(uint64_t i) const { return static_cast<double>(bits(i) >> 11) * 0x1.0p-53; }
  double uniform(uint64_t i, double lo, double hi) const { return lo + (hi - lo) * uniform(i); }
  // Standard normal (Box-Muller on the two 32-bit halves of one hash).
  double normal(uint64_t i) const {
    const uint64_t h = bits(i);
    const double u1 = (static_cast<double>(h >> 32) + 0.5) * 0x1.0p-32;
    const double u2 = (static_cast<double>(h & 0xffffffffu) + 0.5) * 0x1.0p-32;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

void check_shapes(const MoeSpec& s) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("layer_data: " + what); };
  if (s.hidden <= 0 || s.hidden % 32) fail("hidden must be a positive multiple of 32");
  if (s.intermediate <= 0 || s.intermediate % 32) fail("intermediate must be a positive multiple of 32");
  if (s.num_experts <= 0) fail("num_experts must be positive");
  if (s.top_k <= 0 || s.top_k > s.num_experts) fail("top_k must be in [1, num_experts]");
  if (s.local_expert_offset < 0 || s.local_expert_offset + s.local_experts() > s.num_experts)
    fail("local experts out of range");
}

size_t sz(long long v) { return static_cast<size_t>(v); }

// Fills a packed int4 tensor with uniform -8..7 (every byte is 8 random bits).
void fill_int4(HostBuffer<uint8_t>& buf, const Rng& rng) {
  const size_t words = buf.size() / 8;  // rows are multiples of 16 bytes
  parallel_for(words, 1 << 16, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      const uint64_t v = rng.bits(i);
      std::memcpy(buf.data() + 8 * i, &v, 8);
    }
  });
}

// Scales U(0.5, 1.5) / sqrt(21.5 K) in bf16.
void fill_scales(HostBuffer<uint16_t>& buf, const Rng& rng, int k) {
  const double base = 1.0 / std::sqrt(21.5 * k);
  parallel_for(buf.size(), 1 << 16, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i)
      buf[i] = float_to_bf16(static_cast<float>(rng.uniform(i, 0.5, 1.5) * base));
  });
}

void fill_local(std::vector<float>& v, bool on, const MoeSpec& s, const Rng& rng, double lo,
                double hi) {
  v.clear();
  if (!on) return;
  v.resize(sz(s.local_experts()));
  for (int l = 0; l < s.local_experts(); ++l)
    v[sz(l)] = static_cast<float>(rng.uniform(sz(s.local_expert_offset + l), lo, hi));
}

}  // namespace

uint64_t hash64(uint64_t seed, uint64_t stream, uint64_t index) {
  return Rng(seed, stream).bits(index);
}

// ---- HostLayer --------------------------------------------------------------------------------

const uint8_t* HostLayer::w13_row(int e, int r) const {
  return w13.data() + (sz(e) * 2 * sz(spec.intermediate) + sz(r)) * sz(spec.hidden / 2);
}
const uint16_t* HostLayer::w13_scale_row(int e, int r) const {
  return w13_scale.data() + (sz(e) * 2 * sz(spec.intermediate) + sz(r)) * sz(spec.hidden / 32);
}
const uint8_t* HostLayer::w2_row(int e, int h) const {
  return w2.data() + (sz(e) * sz(spec.hidden) + sz(h)) * sz(spec.intermediate / 2);
}
const uint16_t* HostLayer::w2_scale_row(int e, int h) const {
  return w2_scale.data() + (sz(e) * sz(spec.hidden) + sz(h)) * sz(spec.intermediate / 32);
}
uint8_t* HostLayer::w13_row(int e, int r) {
  return const_cast<uint8_t*>(static_cast<const HostLayer*>(this)->w13_row(e, r));
}
uint16_t* HostLayer::w13_scale_row(int e, int r) {
  return const_cast<uint16_t*>(static_cast<const HostLayer*>(this)->w13_scale_row(e, r));
}
uint8_t* HostLayer::w2_row(int e, int h) {
  return const_cast<uint8_t*>(static_cast<const HostLayer*>(this)->w2_row(e, h));
}
uint16_t* HostLayer::w2_scale_row(int e, int h) {
  return const_cast<uint16_t*>(static_cast<const HostLayer*>(this)->w2_scale_row(e, h));
}

const void* HostLayer::logits_data() const {
  if (spec.routing == RoutingMethod::Precomputed) return nullptr;
  return spec.logits_dtype == DType::BF16 ? static_cast<const void*>(logits_bf16.data())
                                          : static_cast<const void*>(logits.data());
}
size_t HostLayer::logits_bytes() const {
  if (spec.routing == RoutingMethod::Precomputed) return 0;
  return spec.logits_dtype == DType::BF16 ? logits_bf16.size() * 2 : logits.size() * 4;
}
const void* HostLayer::bias_data() const {
  if (!spec.has_routing_bias) return nullptr;
  return spec.bias_dtype == DType::BF16 ? static_cast<const void*>(bias_bf16.data())
                                        : static_cast<const void*>(bias.data());
}
size_t HostLayer::bias_bytes() const {
  if (!spec.has_routing_bias) return 0;
  return spec.bias_dtype == DType::BF16 ? bias_bf16.size() * 2 : bias.size() * 4;
}

// ---- generators ---------------------------------------------------------------------------------

void sync_bf16(HostLayer& layer) {
  const MoeSpec& s = layer.spec;
  const bool lb = s.logits_dtype == DType::BF16;
  const bool bb = s.bias_dtype == DType::BF16;
  layer.logits_bf16.clear();
  layer.bias_bf16.clear();
  if (lb) {
    layer.logits_bf16.resize(layer.logits.size());
    for (size_t i = 0; i < layer.logits.size(); ++i) {
      layer.logits_bf16[i] = float_to_bf16(layer.logits[i]);
      layer.logits[i] = bf16_to_float(layer.logits_bf16[i]);
    }
  }
  if (s.has_routing_bias && bb) {
    layer.bias_bf16.resize(layer.bias.size());
    for (size_t i = 0; i < layer.bias.size(); ++i) {
      layer.bias_bf16[i] = float_to_bf16(layer.bias[i]);
      layer.bias[i] = bf16_to_float(layer.bias_bf16[i]);
    }
  }
}

HostLayer allocate_layer(const MoeSpec& spec, int tokens) {
  check_shapes(spec);
  HostLayer L;
  L.spec = spec;
  L.tokens = tokens;
  const size_t E = sz(spec.num_experts), H = sz(spec.hidden), I = sz(spec.intermediate);
  const size_t T = sz(tokens), k = sz(spec.top_k);
  L.hidden.assign(T * H, 0);
  if (spec.routing == RoutingMethod::Precomputed) {
    L.topk_ids.assign(T * k, 0);
    L.topk_weights.assign(T * k, 0.f);
  } else {
    L.logits.assign(T * E, 0.f);
  }
  if (spec.has_routing_bias) L.bias.assign(E, 0.f);
  L.w13.assign(E * 2 * I * H / 2, 0);
  L.w13_scale.assign(E * 2 * I * H / 32, 0);
  L.w2.assign(E * H * I / 2, 0);
  L.w2_scale.assign(E * H * I / 32, 0);
  const size_t Lc = sz(spec.local_experts());
  if (spec.swiglu_alpha) L.alpha.assign(Lc, 1.f);
  if (spec.swiglu_beta) L.beta.assign(Lc, 0.f);
  if (spec.swiglu_limit) L.limit.assign(Lc, std::numeric_limits<float>::infinity());
  sync_bf16(L);
  return L;
}

HostLayer make_weights(const MoeSpec& spec, uint64_t seed) {
  check_shapes(spec);
  HostLayer L;
  L.spec = spec;
  const size_t E = sz(spec.num_experts), H = sz(spec.hidden), I = sz(spec.intermediate);
  L.w13.resize(E * 2 * I * H / 2);
  L.w13_scale.resize(E * 2 * I * H / 32);
  L.w2.resize(E * H * I / 2);
  L.w2_scale.resize(E * H * I / 32);
  fill_int4(L.w13, Rng(seed, kW13));
  fill_scales(L.w13_scale, Rng(seed, kW13Scale), spec.hidden);
  fill_int4(L.w2, Rng(seed, kW2));
  fill_scales(L.w2_scale, Rng(seed, kW2Scale), spec.intermediate);
  fill_local(L.alpha, spec.swiglu_alpha, spec, Rng(seed, kAlpha), 0.5, 2.0);
  fill_local(L.beta, spec.swiglu_beta, spec, Rng(seed, kBeta), -0.5, 0.5);
  fill_local(L.limit, spec.swiglu_limit, spec, Rng(seed, kLimit), 2.0, 8.0);
  return L;
}

namespace {

void make_precomputed(HostLayer& L, uint64_t seed, const InputOptions& o) {
  const MoeSpec& s = L.spec;
  const int E = s.num_experts, k = s.top_k, T = L.tokens;
  std::vector<char> excluded(sz(E), 0);
  for (int e : o.empty_experts)
    if (e >= 0 && e < E) excluded[sz(e)] = 1;
  int allowed = 0;
  for (int e = 0; e < E; ++e) allowed += !excluded[sz(e)];
  if (allowed < k) std::fill(excluded.begin(), excluded.end(), 0);  // cannot honour: ignore
  const Rng ids(seed, kIds), wts(seed, kWeights);
  L.topk_ids.assign(sz(T) * sz(k), 0);
  L.topk_weights.assign(sz(T) * sz(k), 0.f);
  for (int t = 0; t < T; ++t) {
    int32_t* row = L.topk_ids.data() + sz(t) * sz(k);
    uint64_t draw = sz(t) << 20;
    for (int j = 0; j < k; ++j) {
      int e = 0;
      if (j == 0 && o.force_expert >= 0 && o.force_expert < E) {
        e = o.force_expert;
      } else {
        for (;;) {  // rejection: distinct, not excluded
          e = static_cast<int>(ids.bits(draw++) % sz(E));
          if (excluded[sz(e)] && e != o.force_expert) continue;
          if (std::find(row, row + j, e) == row + j) break;
        }
      }
      row[j] = e;
      L.topk_weights[sz(t) * sz(k) + sz(j)] =
          static_cast<float>(wts.uniform(sz(t) * sz(k) + sz(j), 0.1, 1.0));
    }
    if (o.invalid_ids && t % 5 == 2) row[k - 1] = E;
    if (o.invalid_ids && t % 5 == 4) row[k - 1] = -1;
  }
}

void make_logits(HostLayer& L, uint64_t seed, const InputOptions& o) {
  const MoeSpec& s = L.spec;
  const int E = s.num_experts, T = L.tokens;
  const bool dsv3 = s.routing == RoutingMethod::DeepSeekV3;
  const Rng lr(seed, kLogits);
  L.logits.resize(sz(T) * sz(E));
  parallel_for(L.logits.size(), 1 << 14, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) L.logits[i] = static_cast<float>(o.logit_std * lr.normal(i));
  });
  L.bias.clear();
  if (s.has_routing_bias) {
    const Rng br(seed, kBias);
    L.bias.resize(sz(E));
    for (int e = 0; e < E; ++e) L.bias[sz(e)] = static_cast<float>(o.bias_std * br.normal(sz(e)));
    if (o.ties && dsv3)
      for (int e = 0; e < E; ++e) L.bias[sz(e)] = L.bias[sz(e & ~1)];
  }
  float bmin = 0.f, bmax = 0.f;
  if (!L.bias.empty()) {
    bmin = *std::min_element(L.bias.begin(), L.bias.end());
    bmax = *std::max_element(L.bias.begin(), L.bias.end());
  }
  // Empty experts: far below every other key; forced expert: far above.
  for (int e : o.empty_experts) {
    if (e < 0 || e >= E) continue;
    if (!L.bias.empty()) L.bias[sz(e)] = bmin - 2.f;
    for (int t = 0; t < T; ++t) L.logits[sz(t) * sz(E) + sz(e)] = dsv3 ? -20.f : -1000.f;
  }
  if (o.force_expert >= 0 && o.force_expert < E) {
    if (!L.bias.empty()) L.bias[sz(o.force_expert)] = bmax + 2.f;
    for (int t = 0; t < T; ++t) {
      float* row = L.logits.data() + sz(t) * sz(E);
      const float mx = *std::max_element(row, row + E);
      row[o.force_expert] = dsv3 ? 20.f : mx + std::max(1.f, std::fabs(mx) * 0.1f);
    }
  }
  if (o.nonfinite_logits) {
    const float inf = std::numeric_limits<float>::infinity();
    for (int t = 0; t < T; ++t) {
      float* row = L.logits.data() + sz(t) * sz(E);
      if (t % 4 == 1) row[t % E] = std::numeric_limits<float>::quiet_NaN();
      if (t % 4 == 2) row[(7 * t) % E] = inf;
      if (t % 4 == 3) row[(13 * t) % E] = -inf;
    }
  }
  sync_bf16(L);
  if (o.ties) {
    const bool lb = s.logits_dtype == DType::BF16;
    for (int t = 0; t < T; ++t) {
      if (t % 3 == 2) continue;
      const TokenRoute r = route(s, L, t);
      const int a = t % 3 == 0 ? r.ids[sz(s.top_k - 1)] : r.ids[0];
      const int partner = a ^ 1;
      if (a < 0 || partner >= E) continue;
      const size_t ia = sz(t) * sz(E) + sz(a), ip = sz(t) * sz(E) + sz(partner);
      L.logits[ip] = L.logits[ia];
      if (lb) L.logits_bf16[ip] = L.logits_bf16[ia];
    }
  }
}

}  // namespace

void make_inputs(HostLayer& layer, int tokens, uint64_t seed, const InputOptions& o) {
  check_shapes(layer.spec);
  if (tokens < 0) throw std::invalid_argument("layer_data: tokens must be >= 0");
  const MoeSpec& s = layer.spec;
  layer.tokens = tokens;
  const size_t H = sz(s.hidden);
  const Rng hr(seed, kHidden);
  layer.hidden.resize(sz(tokens) * H);
  parallel_for(layer.hidden.size(), 1 << 14, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) layer.hidden[i] = float_to_bf16(static_cast<float>(hr.normal(i)));
  });
  if (o.nonfinite_hidden) {
    const uint16_t nan = 0x7fc0, pinf = 0x7f80, ninf = 0xff80;
    for (int t = 0; t < tokens; ++t) {
      const size_t i = sz(t) * H + (31 * sz(t)) % H;
      if (t % 4 == 1) layer.hidden[i] = nan;
      if (t % 4 == 2) layer.hidden[i] = pinf;
      if (t % 4 == 3) layer.hidden[i] = ninf;
    }
  }
  layer.logits.clear();
  layer.logits_bf16.clear();
  layer.topk_ids.clear();
  layer.topk_weights.clear();
  if (s.routing == RoutingMethod::Precomputed) {
    make_precomputed(layer, seed, o);
    layer.bias.clear();
    if (s.has_routing_bias) layer.bias.assign(sz(s.num_experts), 0.f);
    sync_bf16(layer);
  } else {
    make_logits(layer, seed, o);
  }
}

}  // namespace moejit::ref

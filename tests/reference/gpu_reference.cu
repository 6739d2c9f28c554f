// The prebuilt GPU reference (see gpu_reference.h). Written for obviousness, not speed: the only
// concession to speed is that slots are visited grouped by expert, so that blocks reading the
// same expert's weights run close together and share them through L2.
#include "reference/gpu_reference.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace moejit::ref {
namespace {

#define MOEJIT_REF_CUDA_CHECK(call)                                                     \
  do {                                                                                  \
    const cudaError_t err_ = (call);                                                    \
    if (err_ != cudaSuccess)                                                            \
      throw std::runtime_error(std::string("gpu_reference: ") + #call + " failed: " +   \
                               cudaGetErrorName(err_) + ": " + cudaGetErrorString(err_)); \
  } while (0)

constexpr int kThreads = 128;
constexpr int kGroup = 32;  // k values per scale

// ---- scalar helpers -----------------------------------------------------------------------------

__device__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ float load_scalar(const void* p, size_t i, bool is_bf16) {
  return is_bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(p)[i])
                 : static_cast<const float*>(p)[i];
}

__device__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// (a, ia) ranks strictly above (b, ib): descending, NaN first, ties to the lower index.
__device__ bool ranks_above(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Signed int4 of nibble i (0..7) of a 32-bit word (nibble 0 = lowest bits = lowest k).
__device__ int nibble(uint32_t word, int i) {
  const int v = static_cast<int>((word >> (4 * i)) & 0xfu);
  return v >= 8 ? v - 16 : v;
}

// ---- routing --------------------------------------------------------------------------------------

struct RouteParams {
  int tokens, num_experts, top_k;
  int method;  // RoutingMethod
  int n_group, topk_group;
  float routed_scaling_factor;
  const void* logits;
  bool logits_bf16;
  const void* bias;  // nullptr = none
  bool bias_bf16;
  const int32_t* pre_ids;
  const float* pre_weights;
  int32_t* ids;
  float* weights;
};

struct TokenView {
  const RouteParams& p;
  int t;
  __device__ float logit(int e) const {
    return load_scalar(p.logits, static_cast<size_t>(t) * p.num_experts + e, p.logits_bf16);
  }
  // Selection key: sigmoid(l) + bias for DeepSeekV3, else l.
  __device__ float key(int e) const {
    if (p.method != static_cast<int>(RoutingMethod::DeepSeekV3)) return logit(e);
    const float b = p.bias ? load_scalar(p.bias, e, p.bias_bf16) : 0.0f;
    return sigmoid_f(logit(e)) + b;
  }
};

// Best expert in [lo, hi) that ranks strictly below (prev_key, prev) (no bound if prev < 0) and
// whose group bit is set in `mask` (group size gs); -1 if none.
__device__ int next_below(const TokenView& v, int lo, int hi, int prev, float prev_key,
                          unsigned long long mask, int gs, float* out_key) {
  int best = -1;
  float best_key = 0.0f;
  for (int e = lo; e < hi; ++e) {
    if (!((mask >> (e / gs)) & 1ull)) continue;
    const float ke = v.key(e);
    if (prev >= 0 && !ranks_above(prev_key, prev, ke, e)) continue;
    if (best < 0 || ranks_above(ke, e, best_key, best)) {
      best = e;
      best_key = ke;
    }
  }
  *out_key = best_key;
  return best;
}

__device__ float group_score(const TokenView& v, int g, int gs) {
  float k1 = 0.0f, k2 = 0.0f;
  const int e1 = next_below(v, g * gs, (g + 1) * gs, -1, 0.0f, ~0ull, gs, &k1);
  if (gs < 2) return k1;
  next_below(v, g * gs, (g + 1) * gs, e1, k1, ~0ull, gs, &k2);
  return k1 + k2;
}

__global__ void route_kernel(RouteParams p) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= p.tokens) return;
  const int E = p.num_experts, k = p.top_k;
  int32_t* ids = p.ids + static_cast<size_t>(t) * k;
  float* w = p.weights + static_cast<size_t>(t) * k;
  const RoutingMethod method = static_cast<RoutingMethod>(p.method);
  if (method == RoutingMethod::Precomputed) {
    for (int j = 0; j < k; ++j) {
      ids[j] = p.pre_ids[static_cast<size_t>(t) * k + j];
      w[j] = p.pre_weights[static_cast<size_t>(t) * k + j];
    }
    return;
  }
  const TokenView v{p, t};

  // Groups kept (all, unless grouped DeepSeekV3).
  unsigned long long mask = ~0ull;
  int gs = E;
  if (method == RoutingMethod::DeepSeekV3 && p.n_group > 1) {
    gs = E / p.n_group;
    mask = 0;
    int prev = -1;
    float prev_score = 0.0f;
    for (int i = 0; i < p.topk_group && i < p.n_group; ++i) {
      int best = -1;
      float best_score = 0.0f;
      for (int g = 0; g < p.n_group; ++g) {
        const float sc = group_score(v, g, gs);
        if (prev >= 0 && !ranks_above(prev_score, prev, sc, g)) continue;
        if (best < 0 || ranks_above(sc, g, best_score, best)) {
          best = g;
          best_score = sc;
        }
      }
      if (best < 0) break;
      mask |= 1ull << best;
      prev = best;
      prev_score = best_score;
    }
  }

  // Top-k by repeated "best below the previous pick".
  int prev = -1;
  float prev_key = 0.0f;
  for (int j = 0; j < k; ++j) {
    float kj = 0.0f;
    const int e = prev >= 0 || j == 0 ? next_below(v, 0, E, prev, prev_key, mask, gs, &kj) : -1;
    ids[j] = e;
    prev = e;
    prev_key = kj;
  }

  // Weights.
  switch (method) {
    case RoutingMethod::Default:
    case RoutingMethod::RenormalizeNaive: {
      float m = -INFINITY;
      for (int e = 0; e < E; ++e) m = fmaxf(m, v.logit(e));  // fmaxf skips NaN
      float sum = 0.0f;
      for (int e = 0; e < E; ++e) sum += expf(v.logit(e) - m);
      float wsum = 0.0f;
      for (int j = 0; j < k; ++j) {
        w[j] = ids[j] >= 0 ? expf(v.logit(ids[j]) - m) / sum : 0.0f;
        wsum += w[j];
      }
      if (method == RoutingMethod::RenormalizeNaive)
        for (int j = 0; j < k; ++j) w[j] /= wsum;
      break;
    }
    case RoutingMethod::Renormalize: {
      float m = -INFINITY;
      for (int j = 0; j < k; ++j)
        if (ids[j] >= 0) m = fmaxf(m, v.logit(ids[j]));
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        w[j] = ids[j] >= 0 ? expf(v.logit(ids[j]) - m) : 0.0f;
        sum += w[j];
      }
      for (int j = 0; j < k; ++j) w[j] /= sum;
      break;
    }
    case RoutingMethod::TopK:
      for (int j = 0; j < k; ++j) w[j] = ids[j] >= 0 ? v.logit(ids[j]) : 0.0f;
      break;
    case RoutingMethod::Sigmoid:
    case RoutingMethod::TopKSigmoid:
    case RoutingMethod::Llama4:
      for (int j = 0; j < k; ++j) w[j] = ids[j] >= 0 ? sigmoid_f(v.logit(ids[j])) : 0.0f;
      break;
    case RoutingMethod::SigmoidRenorm:
    case RoutingMethod::DeepSeekV3: {
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        w[j] = ids[j] >= 0 ? sigmoid_f(v.logit(ids[j])) : 0.0f;
        sum += w[j];
      }
      const float scale =
          method == RoutingMethod::DeepSeekV3 ? p.routed_scaling_factor : 1.0f;
      for (int j = 0; j < k; ++j) w[j] = w[j] / (sum + 1e-20f) * scale;
      break;
    }
    case RoutingMethod::Precomputed:
      break;
  }
}

// ---- grouping slots by local expert ---------------------------------------------------------------

__device__ int local_index(int32_t id, int offset, int local) {
  return id >= offset && id < offset + local ? id - offset : -1;
}

// One thread per local expert: counts its slots.
__global__ void count_kernel(const int32_t* ids, int slots, int offset, int local, int32_t* counts) {
  const int l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= local) return;
  int c = 0;
  for (int s = 0; s < slots; ++s) c += local_index(ids[s], offset, local) == l;
  counts[l] = c;
}

// One thread: exclusive prefix sum, starts[local] = total.
__global__ void scan_kernel(const int32_t* counts, int local, int32_t* starts) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int acc = 0;
  for (int l = 0; l < local; ++l) {
    starts[l] = acc;
    acc += counts[l];
  }
  starts[local] = acc;
}

// One thread per local expert: lists its slots in ascending order.
__global__ void order_kernel(const int32_t* ids, int slots, int offset, int local,
                             const int32_t* starts, int32_t* order) {
  const int l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= local) return;
  int pos = starts[l];
  for (int s = 0; s < slots; ++s)
    if (local_index(ids[s], offset, local) == l) order[pos++] = s;
}

// ---- GEMMs ----------------------------------------------------------------------------------------

struct GemmParams {
  int top_k, hidden, intermediate, expert_offset;
  bool gate_first;
  const int32_t* ids;
  const int32_t* order;
  const int32_t* total;  // starts[local]
  const uint16_t* x;     // [T, H] bf16
  const uint8_t* w13;
  const uint16_t* w13_scale;
  const uint8_t* w2;
  const uint16_t* w2_scale;
  const float* alpha;
  const float* beta;
  const float* limit;
  float* act;  // [slots, I]
  float* y;    // [slots, H]
};

// sum_k int4(row[k]) * scale[k/32] * x[k], x loaded by `xval`, fp32 accumulation per group.
template <class XVal>
__device__ float dot_row(const uint8_t* row, const uint16_t* scales, int K, XVal xval) {
  float total = 0.0f;
  for (int g = 0; g < K / kGroup; ++g) {
    const uint4 packed = *reinterpret_cast<const uint4*>(row + g * (kGroup / 2));
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    float acc = 0.0f;
    for (int w = 0; w < 4; ++w)
      for (int i = 0; i < 8; ++i) acc += static_cast<float>(nibble(words[w], i)) * xval(g * kGroup + w * 8 + i);
    total += acc * bf16_bits_to_float(scales[g]);
  }
  return total;
}

// Block (pos, n-block): thread computes act[slot, n] for slot = order[pos].
__global__ void gemm1_kernel(GemmParams p) {
  const int pos = blockIdx.x;
  if (pos >= *p.total) return;
  const int n = blockIdx.y * blockDim.x + threadIdx.x;
  const int H = p.hidden, I = p.intermediate;
  if (n >= I) return;
  const int slot = p.order[pos];
  const int e = p.ids[slot], l = e - p.expert_offset;
  const uint16_t* x = p.x + static_cast<size_t>(slot / p.top_k) * H;
  auto xval = [x](int k) { return bf16_bits_to_float(x[k]); };
  const int rg = p.gate_first ? n : I + n, ru = p.gate_first ? I + n : n;
  const size_t row_g = static_cast<size_t>(e) * 2 * I + rg, row_u = static_cast<size_t>(e) * 2 * I + ru;
  float g = dot_row(p.w13 + row_g * (H / 2), p.w13_scale + row_g * (H / kGroup), H, xval);
  float u = dot_row(p.w13 + row_u * (H / 2), p.w13_scale + row_u * (H / kGroup), H, xval);
  if (p.limit) {
    const float lim = p.limit[l];
    g = g > lim ? lim : g;
    u = u > lim ? lim : (u < -lim ? -lim : u);
  }
  const float alpha = p.alpha ? p.alpha[l] : 1.0f;
  const float beta = p.beta ? p.beta[l] : 0.0f;
  p.act[static_cast<size_t>(slot) * I + n] = g * sigmoid_f(alpha * g) * (u + beta);
}

// Block (pos, h-block): thread computes y[slot, h] for slot = order[pos].
__global__ void gemm2_kernel(GemmParams p) {
  const int pos = blockIdx.x;
  if (pos >= *p.total) return;
  const int h = blockIdx.y * blockDim.x + threadIdx.x;
  const int H = p.hidden, I = p.intermediate;
  if (h >= H) return;
  const int slot = p.order[pos];
  const int e = p.ids[slot];
  const float* a = p.act + static_cast<size_t>(slot) * I;
  auto aval = [a](int k) { return a[k]; };
  const size_t row = static_cast<size_t>(e) * H + h;
  p.y[static_cast<size_t>(slot) * H + h] =
      dot_row(p.w2 + row * (I / 2), p.w2_scale + row * (I / kGroup), I, aval);
}

// One thread per (t, h): local slots only, ascending j (a non-local slot is skipped).
__global__ void finalize_kernel(int tokens, int top_k, int hidden, int offset, int local,
                                const int32_t* ids, const float* weights, const float* y,
                                float* out, uint16_t* out_bf16) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<size_t>(tokens) * hidden) return;
  const size_t t = i / hidden, h = i % hidden;
  float acc = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    const size_t slot = t * top_k + j;
    if (local_index(ids[slot], offset, local) < 0) continue;
    acc += weights[slot] * y[slot * hidden + h];
  }
  out[i] = acc;
  out_bf16[i] = float_to_bf16_bits(acc);
}

// ---- host side ------------------------------------------------------------------------------------

size_t align256(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

// Region sizes in workspace order.
struct Layout {
  size_t ids, weights, counts, starts, order, act, y, out, out_bf16;
  size_t total() const { return ids + weights + counts + starts + order + act + y + out + out_bf16; }
};

Layout layout_for(const MoeSpec& s, int T) {
  const size_t slots = static_cast<size_t>(T) * s.top_k, L = s.local_experts();
  Layout l;
  l.ids = align256(slots * 4);
  l.weights = align256(slots * 4);
  l.counts = align256(L * 4);
  l.starts = align256((L + 1) * 4);
  l.order = align256(slots * 4);
  l.act = align256(slots * s.intermediate * 4);
  l.y = align256(slots * s.hidden * 4);
  l.out = align256(static_cast<size_t>(T) * s.hidden * 4);
  l.out_bf16 = align256(static_cast<size_t>(T) * s.hidden * 2);
  return l;
}

unsigned blocks_for(size_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("gpu_reference: " + what);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gpu_reference: launch of ") + kernel + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

}  // namespace

size_t gpu_reference_workspace_bytes(const MoeSpec& spec, int num_tokens) {
  return layout_for(spec, num_tokens).total();
}

GpuReferenceResult gpu_reference_run(const MoeSpec& s, const MoeInputs& in, int T, void* workspace,
                                     size_t workspace_bytes, Stream stream_handle) {
  const Layout lay = layout_for(s, T);
  require(T >= 0, "num_tokens must be >= 0");
  require(workspace_bytes >= lay.total(),
          "workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
              std::to_string(lay.total()));
  require(s.hidden % 32 == 0 && s.intermediate % 32 == 0, "hidden and intermediate must be multiples of 32");
  require(s.n_group <= 64, "n_group > 64 is not supported by the reference");
  const bool pre = s.routing == RoutingMethod::Precomputed;
  require(in.hidden_states && in.w13 && in.w13_scale && in.w2 && in.w2_scale, "a required input is null");
  require(pre ? (in.topk_ids && in.topk_weights) : in.routing_logits != nullptr,
          pre ? "Precomputed needs topk_ids and topk_weights" : "routing_logits is null");
  require(!s.has_routing_bias || in.routing_bias, "routing_bias is null");
  require(!s.swiglu_alpha || in.swiglu_alpha, "swiglu_alpha is null");
  require(!s.swiglu_beta || in.swiglu_beta, "swiglu_beta is null");
  require(!s.swiglu_limit || in.swiglu_limit, "swiglu_limit is null");
  require(aligned16(in.w13) && aligned16(in.w2) && aligned16(in.hidden_states),
          "w13, w2 and hidden_states must be 16-byte aligned");

  auto* base = static_cast<char*>(workspace);
  GpuReferenceResult r;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    char* p = base + at;
    at += bytes;
    return p;
  };
  r.topk_ids = reinterpret_cast<int32_t*>(take(lay.ids));
  r.topk_weights = reinterpret_cast<float*>(take(lay.weights));
  r.expert_counts = reinterpret_cast<int32_t*>(take(lay.counts));
  int32_t* starts = reinterpret_cast<int32_t*>(take(lay.starts));
  r.local_order = reinterpret_cast<int32_t*>(take(lay.order));
  r.act = reinterpret_cast<float*>(take(lay.act));
  r.y = reinterpret_cast<float*>(take(lay.y));
  r.out = reinterpret_cast<float*>(take(lay.out));
  r.out_bf16 = reinterpret_cast<uint16_t*>(take(lay.out_bf16));
  if (T == 0) return r;

  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int slots = T * s.top_k, L = s.local_experts(), off = s.local_expert_offset;
  MOEJIT_REF_CUDA_CHECK(cudaMemsetAsync(r.act, 0, lay.act, stream));
  MOEJIT_REF_CUDA_CHECK(cudaMemsetAsync(r.y, 0, lay.y, stream));

  RouteParams rp{};
  rp.tokens = T;
  rp.num_experts = s.num_experts;
  rp.top_k = s.top_k;
  rp.method = static_cast<int>(s.routing);
  rp.n_group = s.n_group;
  rp.topk_group = s.topk_group;
  rp.routed_scaling_factor = static_cast<float>(s.routed_scaling_factor);
  rp.logits = in.routing_logits;
  rp.logits_bf16 = s.logits_dtype == DType::BF16;
  rp.bias = s.has_routing_bias ? in.routing_bias : nullptr;
  rp.bias_bf16 = s.bias_dtype == DType::BF16;
  rp.pre_ids = in.topk_ids;
  rp.pre_weights = in.topk_weights;
  rp.ids = r.topk_ids;
  rp.weights = r.topk_weights;
  route_kernel<<<blocks_for(T), kThreads, 0, stream>>>(rp);
  check_launch("route_kernel");

  count_kernel<<<blocks_for(L), kThreads, 0, stream>>>(r.topk_ids, slots, off, L, r.expert_counts);
  check_launch("count_kernel");
  scan_kernel<<<1, 1, 0, stream>>>(r.expert_counts, L, starts);
  check_launch("scan_kernel");
  order_kernel<<<blocks_for(L), kThreads, 0, stream>>>(r.topk_ids, slots, off, L, starts, r.local_order);
  check_launch("order_kernel");

  GemmParams gp{};
  gp.top_k = s.top_k;
  gp.hidden = s.hidden;
  gp.intermediate = s.intermediate;
  gp.expert_offset = off;
  gp.gate_first = s.gate_up_order == GateUpOrder::GateUp;
  gp.ids = r.topk_ids;
  gp.order = r.local_order;
  gp.total = starts + L;
  gp.x = static_cast<const uint16_t*>(in.hidden_states);
  gp.w13 = in.w13;
  gp.w13_scale = static_cast<const uint16_t*>(in.w13_scale);
  gp.w2 = in.w2;
  gp.w2_scale = static_cast<const uint16_t*>(in.w2_scale);
  gp.alpha = s.swiglu_alpha ? in.swiglu_alpha : nullptr;
  gp.beta = s.swiglu_beta ? in.swiglu_beta : nullptr;
  gp.limit = s.swiglu_limit ? in.swiglu_limit : nullptr;
  gp.act = r.act;
  gp.y = r.y;
  gemm1_kernel<<<dim3(static_cast<unsigned>(slots), blocks_for(s.intermediate)), kThreads, 0, stream>>>(gp);
  check_launch("gemm1_kernel");
  gemm2_kernel<<<dim3(static_cast<unsigned>(slots), blocks_for(s.hidden)), kThreads, 0, stream>>>(gp);
  check_launch("gemm2_kernel");

  finalize_kernel<<<blocks_for(static_cast<size_t>(T) * s.hidden), kThreads, 0, stream>>>(
      T, s.top_k, s.hidden, off, L, r.topk_ids, r.topk_weights, r.y, r.out, r.out_bf16);
  check_launch("finalize_kernel");
  return r;
}

}  // namespace moejit::ref

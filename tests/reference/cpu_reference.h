// The fp64 CPU reference of one MoE layer: routing, per-slot expert outputs, the finalized sum
// and the exact unfinalized (dispatch) layout. Formulas: DESIGN.md, "Routing methods", and the
// semantics restated at the top of cpu_reference.cpp. Everything runs in double.
#pragma once

#include <cstdint>
#include <vector>

#include "moejit/moejit.h"
#include "reference/layer_data.h"

namespace moejit::ref {

// Two selection keys closer than this (relative to their magnitude) are a near-tie: a kernel
// working in fp32 may legitimately order them either way. Exactly equal keys computed from
// identical inputs are not near-ties: the lower index wins everywhere.
constexpr double kNearTieRel = 1e-6;

// One token's routing.
struct TokenRoute {
  std::vector<int32_t> ids;     // [k] global ids, descending key order; -1 = no candidate left
  std::vector<double> weights;  // [k]
  // Some pair of adjacent keys among the first k + 1 ranked (or the topk_group / topk_group + 1
  // groups of grouped DeepSeekV3) is a near-tie, so the kernel's ids may differ.
  bool near_tie = false;
};

// All tokens' routing, row-major [T, k].
struct Routing {
  int tokens = 0;
  int top_k = 0;
  std::vector<int32_t> ids;
  std::vector<double> weights;
  std::vector<uint8_t> near_tie;  // [T]
};

TokenRoute route(const MoeSpec& spec, const HostLayer& layer, int t);
Routing route_all(const MoeSpec& spec, const HostLayer& layer, int tokens);

// The routing weights of token t for a given selection ids[0..k) (in that order), by the spec's
// formula; an id outside [0, E) gets weight 0 and is left out of sums. For Precomputed the
// caller's weights are returned when ids equal the caller's ids.
std::vector<double> weights_for_ids(const MoeSpec& spec, const HostLayer& layer, int t,
                                    const int32_t* ids);

// True if ids[0..k) is a selection route() could have made for token t up to near-ties: equal
// to the reference's, or distinct, in range, and no expert left out (or placed later) ranks
// above a chosen one by more than a near-tie (within the groups a grouped selection must keep).
bool ids_acceptable(const MoeSpec& spec, const HostLayer& layer, int t, const int32_t* ids);

// Routing of `tokens` from kernel-produced ids/weights (for ids_override below).
Routing routing_from(int tokens, int top_k, const int32_t* ids, const float* weights);

struct ReferenceOutput {
  std::vector<int> tokens;       // the tokens computed, in the order given
  int top_k = 0;
  int hidden = 0;
  int intermediate = 0;
  std::vector<int32_t> ids;      // [n, k] ids used
  std::vector<double> weights;   // [n, k] weights used
  std::vector<uint8_t> local;    // [n, k] 1 if the slot's expert is local
  std::vector<double> act;       // [n * k, I] SwiGLU output; zero rows for non-local slots
  std::vector<double> y;         // [n * k, H] gemm2 output; zero rows for non-local slots
  std::vector<double> out;       // [n, H] finalized: sum over local j ascending of w * y
};

// Runs the layer for `tokens` (empty = 0..T-1) of the layer's inputs. With `routing` the ids and
// weights are taken from it (indexed by token, [T, k]) instead of route(): used where a kernel
// made a legitimate different choice at a near-tie. Multithreaded over (expert, row) blocks.
ReferenceOutput reference_layer(const MoeSpec& spec, const HostLayer& layer, int T,
                                const std::vector<int>& tokens = {},
                                const Routing* routing = nullptr);

// The exact unfinalized layout for ids [T, k] and padding tile `tile` (DESIGN.md "Outputs").
struct Dispatch {
  int tile = 0;
  std::vector<int32_t> counts;                // [L] slots per local expert
  std::vector<int32_t> expert_offsets;        // [L + 1]; offsets[L] = total rows
  std::vector<int32_t> expanded_to_permuted;  // [T * k] row of slot t*k+j, -1 if not local
  std::vector<int32_t> permuted_to_slot;      // [total rows] slot of each row, -1 = padding
};
Dispatch reference_dispatch(const MoeSpec& spec, const std::vector<int32_t>& ids, int T, int tile);

// Expected gemm2_out [offsets[L], H] for a dispatch: row r = y of its slot, padding rows zero.
// `ref` must cover all tokens 0..T-1 in order.
std::vector<double> reference_unfinalized(const Dispatch& dispatch, const ReferenceOutput& ref);

// Host finalize of an unfinalized result: out[t] = sum over j ascending with e2p[t*k+j] >= 0 of
// weights[t*k+j] * rows[e2p[t*k+j]], rows [*, H].
std::vector<double> reference_finalize(int T, int top_k, int H, const double* rows,
                                       const double* weights, const int32_t* expanded_to_permuted);

// SwiGLU as the kernels compute it: gate <= limit, |up| <= limit (when has_limit; NaN passes
// through), then gate * sigmoid(alpha * gate) * (up + beta).
double swiglu(double gate, double up, double alpha, double beta, bool has_limit, double limit);
double sigmoid(double x);

}  // namespace moejit::ref

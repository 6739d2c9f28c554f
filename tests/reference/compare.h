// The acceptance rule for kernel results, in one place (tests, `moejit check`, `moejit run`).
//
// Outputs: every non-finite reference element must be matched by the same kind (NaN, +Inf,
// -Inf), and a non-finite result where the reference is finite is a mismatch. (Callers fill
// outputs with a finite ~3.4e38 before a launch, DeviceBuffer::poison_finite, so that an element
// a kernel never wrote fails by its error or its kind.) Over the finite elements:
//   rel_l2 = ||got - ref||_2 / ||ref||_2 <= 1e-2, and
//   >= 99.9% of elements satisfy |got - ref| <= 2e-2 |ref| + 1e-2 rms(ref), and, where the
//   caller gives the row width (Tolerance::row_width: a token's output, a slot's gemm2 row),
//   every row's ||got - ref||_2 <= 5e-2 max(||ref row||_2, 0.25 rms(ref) sqrt(row's finite
//   elements)): the whole-tensor figures alone let one wrong row through at large T (one token
//   row 50% off in [4096, 800] passed), the floor keeps rows of small norm to the tensor's scale.
// Routing: ids identical except at a reference near-tie, where any selection ids_acceptable()
// allows is taken; weights within 1e-5 relative + 1e-12 absolute of the fp64 weights of the
// ids taken, non-finite weights matched by kind.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "moejit/moejit.h"
#include "reference/cpu_reference.h"
#include "reference/layer_data.h"

namespace moejit::ref {

struct Tolerance {
  double rel_l2 = 1e-2;
  double elem_rel = 2e-2;      // x |ref|
  double elem_rms = 1e-2;      // x rms(ref)
  double min_within = 0.999;   // fraction of finite elements within the element bound
  size_t row_width = 0;        // > 0: also the per-row bound, rows of this many elements
  double row_rel_l2 = 5e-2;    // x max(||ref row||, row_floor rms(ref) sqrt(row elements))
  double row_floor = 0.25;
};

// The rule with its per-row bound over rows of `width` elements.
inline Tolerance by_rows(size_t width, Tolerance t = {}) {
  t.row_width = width;
  return t;
}

struct CompareResult {
  size_t count = 0;               // elements compared
  size_t finite = 0;              // finite reference elements
  double rel_l2 = 0;              // over finite reference elements (inf if ref is 0 and got not)
  double frac_within = 1;         // over finite reference elements
  double max_abs_err = 0;         // over finite reference elements with a finite result
  size_t worst_index = 0;         // index of max_abs_err
  size_t nonfinite_mismatch = 0;  // elements whose kind (finite/NaN/+Inf/-Inf) differs
  size_t first_mismatch = 0;      // index of the first of them (named in the summary)
  double worst_row_rel = 0;       // with row_width: the largest row error over its bound's norm
  size_t worst_row = 0;
  bool pass = false;
  std::string summary;            // one line
};

CompareResult compare_output(const double* ref, const double* got, size_t n,
                             const Tolerance& tol = {});
CompareResult compare_output(const std::vector<double>& ref, const std::vector<float>& got,
                             const Tolerance& tol = {});
CompareResult compare_output(const std::vector<double>& ref, const std::vector<double>& got,
                             const Tolerance& tol = {});
// got as bf16 bits.
CompareResult compare_output_bf16(const std::vector<double>& ref, const std::vector<uint16_t>& got,
                                  const Tolerance& tol = {});

// Rows `rows` of a row-major [*, width] matrix, as doubles (e.g. the reference's token subset
// out of a kernel's [T, H] output).
std::vector<double> gather_rows(const std::vector<float>& m, int width, const std::vector<int>& rows);
std::vector<double> gather_rows_bf16(const std::vector<uint16_t>& m, int width,
                                     const std::vector<int>& rows);

struct RoutingCompareResult {
  int tokens = 0;
  int id_mismatch = 0;        // tokens whose ids were not acceptable
  int near_tie_tokens = 0;    // tokens where the reference saw a near-tie
  int near_tie_accepted = 0;  // ... whose differing ids were accepted
  int weight_mismatch = 0;    // slots whose weight is out of tolerance
  double max_weight_rel_err = 0;
  bool pass = false;
  std::string summary;
  // The routing to compute the output reference with (reference_layer's `routing`): the
  // reference's, except the kernel's ids and their fp64 weights at accepted near-ties.
  Routing accepted;
};

// got_ids / got_weights: the kernel's [T, k] (global ids). got_ids may be null (a kernel that
// exposes only weights, with the reference's ids then assumed).
RoutingCompareResult compare_routing(const MoeSpec& spec, const HostLayer& layer, int T,
                                     const int32_t* got_ids, const float* got_weights);

// Weight check shared by compare_routing: |got - ref| <= 1e-5 |ref| + 1e-12, kinds equal.
bool weight_close(double ref, double got);

}  // namespace moejit::ref

#include "reference/compare.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include <fmt/format.h>

#include "reference/mxint4.h"

namespace moejit::ref {
namespace {

size_t sz(long long v) { return static_cast<size_t>(v); }

// 0 finite, 1 NaN, 2 +Inf, 3 -Inf
int kind(double v) {
  if (std::isnan(v)) return 1;
  if (std::isinf(v)) return v > 0 ? 2 : 3;
  return 0;
}

template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

}  // namespace

CompareResult compare_output(const double* ref, const double* got, size_t n, const Tolerance& tol) {
  CompareResult r;
  r.count = n;
  double ref2 = 0;
  for (size_t i = 0; i < n; ++i)
    if (kind(ref[i]) == 0) {
      ++r.finite;
      ref2 += ref[i] * ref[i];
    }
  const double rms = r.finite ? std::sqrt(ref2 / static_cast<double>(r.finite)) : 0.0;
  double err2 = 0, worst = -1;
  size_t within = 0;
  for (size_t i = 0; i < n; ++i) {
    const int kr = kind(ref[i]), kg = kind(got[i]);
    if (kr != kg && r.nonfinite_mismatch++ == 0) r.first_mismatch = i;
    if (kr != 0) continue;
    if (kg != 0) {
      err2 = std::numeric_limits<double>::infinity();
      continue;
    }
    const double d = std::fabs(got[i] - ref[i]);
    err2 += d * d;
    if (d <= tol.elem_rel * std::fabs(ref[i]) + tol.elem_rms * rms) ++within;
    if (d > worst) {
      worst = d;
      r.worst_index = i;
    }
  }
  r.max_abs_err = std::max(worst, 0.0);
  if (r.finite) {
    r.frac_within = static_cast<double>(within) / static_cast<double>(r.finite);
    r.rel_l2 = err2 == 0 ? 0.0
               : ref2 == 0 ? std::numeric_limits<double>::infinity()
                           : std::sqrt(err2 / ref2);
  }
  bool rows_ok = true;
  if (tol.row_width > 0) {
    for (size_t row = 0; row * tol.row_width < n; ++row) {
      double e2 = 0, n2 = 0;
      size_t m = 0;
      for (size_t i = row * tol.row_width; i < std::min(n, (row + 1) * tol.row_width); ++i) {
        if (kind(ref[i]) != 0) continue;
        ++m;
        n2 += ref[i] * ref[i];
        const double d = kind(got[i]) == 0 ? got[i] - ref[i] : std::numeric_limits<double>::infinity();
        e2 += d * d;
      }
      if (m == 0) continue;
      const double norm =
          std::max(std::sqrt(n2), tol.row_floor * rms * std::sqrt(static_cast<double>(m)));
      const double rel = e2 == 0 ? 0.0 : norm == 0 ? std::numeric_limits<double>::infinity()
                                                    : std::sqrt(e2) / norm;
      if (rel > r.worst_row_rel) {
        r.worst_row_rel = rel;
        r.worst_row = row;
      }
    }
    rows_ok = r.worst_row_rel <= tol.row_rel_l2;
  }
  r.pass = r.nonfinite_mismatch == 0 && r.rel_l2 <= tol.rel_l2 && r.frac_within >= tol.min_within &&
           rows_ok;
  const size_t w = r.worst_index;
  r.summary = fmt::format(
      "{} rel_l2={:.3e} (<= {:.0e}) within={:.4f}% (>= {:.1f}%) max_abs_err={:.3e} at [{}] "
      "(ref {:.6g}, got {:.6g}) nonfinite_mismatch={} n={} finite={}",
      r.pass ? "PASS" : "FAIL", r.rel_l2, tol.rel_l2, 100.0 * r.frac_within, 100.0 * tol.min_within,
      r.max_abs_err, w, n ? ref[w] : 0.0, n ? got[w] : 0.0, r.nonfinite_mismatch, n, r.finite);
  if (r.nonfinite_mismatch)
    r.summary += fmt::format(" (first at [{}]: ref {:.6g}, got {:.6g})", r.first_mismatch, ref[r.first_mismatch],
                             got[r.first_mismatch]);
  if (tol.row_width > 0)
    r.summary += fmt::format(" worst_row={:.3e} (<= {:.0e}) at row {}", r.worst_row_rel,
                             tol.row_rel_l2, r.worst_row);
  return r;
}

CompareResult compare_output(const std::vector<double>& ref, const std::vector<double>& got,
                             const Tolerance& tol) {
  if (ref.size() != got.size())
    throw std::invalid_argument(
        fmt::format("compare_output: ref has {} elements, got {}", ref.size(), got.size()));
  return compare_output(ref.data(), got.data(), ref.size(), tol);
}

CompareResult compare_output(const std::vector<double>& ref, const std::vector<float>& got,
                             const Tolerance& tol) {
  return compare_output(ref, to_double(got), tol);
}

CompareResult compare_output_bf16(const std::vector<double>& ref, const std::vector<uint16_t>& got,
                                  const Tolerance& tol) {
  std::vector<double> g(got.size());
  for (size_t i = 0; i < got.size(); ++i) g[i] = bf16_to_float(got[i]);
  return compare_output(ref, g, tol);
}

std::vector<double> gather_rows(const std::vector<float>& m, int width, const std::vector<int>& rows) {
  std::vector<double> out;
  out.reserve(rows.size() * sz(width));
  for (int r : rows)
    for (int c = 0; c < width; ++c) out.push_back(m.at(sz(r) * sz(width) + sz(c)));
  return out;
}

std::vector<double> gather_rows_bf16(const std::vector<uint16_t>& m, int width,
                                     const std::vector<int>& rows) {
  std::vector<double> out;
  out.reserve(rows.size() * sz(width));
  for (int r : rows)
    for (int c = 0; c < width; ++c) out.push_back(bf16_to_float(m.at(sz(r) * sz(width) + sz(c))));
  return out;
}

bool weight_close(double ref, double got) {
  const int kr = kind(ref), kg = kind(got);
  if (kr != 0 || kg != 0) return kr == kg;
  return std::fabs(got - ref) <= 1e-5 * std::fabs(ref) + 1e-12;
}

RoutingCompareResult compare_routing(const MoeSpec& s, const HostLayer& L, int T,
                                     const int32_t* got_ids, const float* got_weights) {
  const int k = s.top_k;
  RoutingCompareResult r;
  r.tokens = T;
  r.accepted = route_all(s, L, T);
  int first_bad_token = -1;
  for (int t = 0; t < T; ++t) {
    const size_t base = sz(t) * sz(k);
    const int32_t* ref_ids = r.accepted.ids.data() + base;
    r.near_tie_tokens += r.accepted.near_tie[sz(t)];
    if (got_ids && !std::equal(ref_ids, ref_ids + k, got_ids + base)) {
      if (r.accepted.near_tie[sz(t)] && ids_acceptable(s, L, t, got_ids + base)) {
        ++r.near_tie_accepted;
        const std::vector<double> w = weights_for_ids(s, L, t, got_ids + base);
        std::copy(got_ids + base, got_ids + base + k, r.accepted.ids.begin() + static_cast<long>(base));
        std::copy(w.begin(), w.end(), r.accepted.weights.begin() + static_cast<long>(base));
      } else {
        ++r.id_mismatch;
        if (first_bad_token < 0) first_bad_token = t;
        continue;  // weights of different experts are not comparable
      }
    }
    if (!got_weights) continue;
    for (int j = 0; j < k; ++j) {
      const double ref = r.accepted.weights[base + sz(j)], got = got_weights[base + sz(j)];
      if (!weight_close(ref, got)) {
        ++r.weight_mismatch;
        if (first_bad_token < 0) first_bad_token = t;
      }
      if (std::isfinite(ref) && std::isfinite(got) && ref != 0)
        r.max_weight_rel_err = std::max(r.max_weight_rel_err, std::fabs(got - ref) / std::fabs(ref));
    }
  }
  r.pass = r.id_mismatch == 0 && r.weight_mismatch == 0;
  std::string where;
  if (first_bad_token >= 0) {
    const size_t base = sz(first_bad_token) * sz(k);
    std::string ref_s, got_s;
    for (int j = 0; j < k; ++j) {
      ref_s += fmt::format("{}{}:{:.6g}", j ? " " : "", r.accepted.ids[base + sz(j)],
                           r.accepted.weights[base + sz(j)]);
      got_s += fmt::format("{}{}:{:.6g}", j ? " " : "", got_ids ? got_ids[base + sz(j)] : -1,
                           got_weights ? got_weights[base + sz(j)] : 0.f);
    }
    where = fmt::format(" first bad token {}: ref [{}] got [{}]", first_bad_token, ref_s, got_s);
  }
  r.summary = fmt::format(
      "{} routing: tokens={} id_mismatch={} near_tie={} (accepted {}) weight_mismatch={} "
      "max_weight_rel_err={:.3e}{}",
      r.pass ? "PASS" : "FAIL", T, r.id_mismatch, r.near_tie_tokens, r.near_tie_accepted,
      r.weight_mismatch, r.max_weight_rel_err, where);
  return r;
}

}  // namespace moejit::ref

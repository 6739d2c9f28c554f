// Finalize: out[t, :] = sum_j w[t, j] * y[perm[t*k + j], :], ascending j, fp32 accumulation,
// no atomics (deterministic). Slots of other ranks' experts (perm = -1) contribute nothing.
// Grid: x = token, y = blocks of blockDim.x * 8 features (blockDim.x at most kThreads); each
// thread owns 8 features (16 bytes).
//
// Cfg provides: kHidden, kTopK, kThreads (the launch bound), kLayerHidden. y rows are fp32 (a
// finalized layer's workspace, or an unfinalized layer's gemm2_out for moejit::finalize). Rows
// have kHidden features, the kernels' H; with FinalizeParams::layer_rows kLayerHidden, the
// layer's H where the tiled weights pad it (moejit.h): moejit::finalize on an unfinalized layer's
// gemm2_out, whose rows the layer wrote at the layer's H.
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

template <class Cfg>
__device__ void finalize_kernel(const FinalizeParams& p) {
  const int H = Cfg::kLayerHidden != Cfg::kHidden && p.layer_rows ? Cfg::kLayerHidden : Cfg::kHidden;
  constexpr int K = Cfg::kTopK;
  const int t = blockIdx.x;
  const int h = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  // The row map and the routing weights come from the routing kernels, which finished before
  // gemm1 got past its own wait and triggered gemm2, which launched this kernel early (gemm2
  // with tile_ready triggers before it waits); only y needs the wait. (From
  // moejit::finalize the launch carries no PDL attribute: the kernel starts after the work
  // before it has completed, and the wait is a no-op.)
  [[maybe_unused]] const unsigned long long t0 = tl_now();  // timeline (diagnostic builds only)
  [[maybe_unused]] const int tls = tl_slot();
  if (threadIdx.x == 0) tl_stamp(tls, kTlFinStart, t0);
  int rows[K];
  float ws[K];
  if (t < p.num_tokens && h < H)
#pragma unroll
    for (int j = 0; j < K; ++j) {
      rows[j] = p.expanded_to_permuted[t * K + j];
      ws[j] = p.weights[t * K + j];
    }
  pdl_wait();
  if (threadIdx.x == 0) tl_stamp(tls, kTlFinWaited);
  if (t >= p.num_tokens || h >= H) return;

  const uint4 o = weighted_rows8<K, false>(static_cast<const float*>(p.y), H, rows, ws, h);
  *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + static_cast<long long>(t) * H + h) = o;
  if (threadIdx.x == 0) tl_stamp(tls, kTlFinEnd);
}

}  // namespace moejit_dev

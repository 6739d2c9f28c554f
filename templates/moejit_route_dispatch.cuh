// Route + dispatch in one block, for small token counts (decode): saves a launch and a
// grid-wide dependency. Warp w routes tokens w, w + kWarpsPerBlock, ...; after a barrier the
// block dispatches the slots it just wrote (global writes of a block are visible to the block
// after __syncthreads).
//
// Cfg provides the constants of both moejit_route.cuh and moejit_dispatch.cuh, with
// kThreads = 32 * kWarpsPerBlock.
#pragma once

#include "moejit_dispatch.cuh"
#include "moejit_route.cuh"

namespace moejit_dev {

template <class Cfg>
__device__ void route_dispatch_kernel(const RouteDispatchParams& p) {
  static_assert(Cfg::kThreads == 32 * Cfg::kWarpsPerBlock, "one block of routing warps");
  pdl_trigger();  // gemm1 may launch now; it waits for this grid before reading
  for (int t = threadIdx.x >> 5; t < p.route.num_tokens; t += Cfg::kWarpsPerBlock)
    route_token<Cfg>(p.route, t);
  __syncthreads();
  dispatch_block<Cfg>(p.dispatch);
}

}  // namespace moejit_dev

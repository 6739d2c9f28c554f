// A minimal parallel loop for the CPU reference and the data generators (no thread pool state:
// each call starts and joins its own threads).
#pragma once

#include <cstddef>
#include <functional>

namespace moejit::ref {

// Threads parallel_for uses: $MOEJIT_REF_THREADS if set (>= 1), else hardware_concurrency.
int reference_threads();

// Calls fn(begin, end) for consecutive chunks of at most `grain` indices covering [0, n),
// chunks handed out dynamically to reference_threads() threads. The first exception thrown
// by fn is rethrown after all threads have joined.
void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn);

}  // namespace moejit::ref

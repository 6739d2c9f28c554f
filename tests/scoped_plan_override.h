// MOEJIT_PLAN_OVERRIDE for one scope (make_plan reads it when a layer is planned), unset again
// however the scope ends (a failed ASSERT or an exception included), so that no later test
// plans under it. Shared by the CPU, NVRTC and GPU tests.
#pragma once

#include <cstdlib>
#include <string>

namespace moejit_test {

class ScopedPlanOverride {
 public:
  explicit ScopedPlanOverride(const char* value) { ::setenv("MOEJIT_PLAN_OVERRIDE", value, 1); }
  explicit ScopedPlanOverride(const std::string& value) : ScopedPlanOverride(value.c_str()) {}
  ~ScopedPlanOverride() { ::unsetenv("MOEJIT_PLAN_OVERRIDE"); }
  ScopedPlanOverride(const ScopedPlanOverride&) = delete;
  ScopedPlanOverride& operator=(const ScopedPlanOverride&) = delete;
};

}  // namespace moejit_test

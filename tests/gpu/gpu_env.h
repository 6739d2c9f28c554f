// GPU test helpers: skip with a printed reason where no GPU is present.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "moejit/moejit.h"
#include "reference/device_buffer.h"
#include "tests/scoped_plan_override.h"

#define MOEJIT_REQUIRE_GPU()                                                       \
  do {                                                                             \
    std::string why_;                                                              \
    if (!moejit::has_gpu(&why_)) GTEST_SKIP() << "no GPU, skipping: " << why_;     \
  } while (0)

// Plan overrides (MOEJIT_PLAN_OVERRIDE) for the layers compiled in a scope.
using moejit_test::ScopedPlanOverride;

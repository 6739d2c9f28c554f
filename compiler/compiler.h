// The compiler's interface to the runtime: the one header runtime/ includes from compiler/.
// Planning (plan.h), code generation and the embedded templates (codegen.h), and NVRTC
// (nvrtc.h); nothing here depends on the runtime.
#pragma once

#include "compiler/codegen.h"
#include "compiler/nvrtc.h"
#include "compiler/plan.h"

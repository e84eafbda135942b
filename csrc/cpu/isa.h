// Runtime choice among the CPU kernel builds compiled into _C (one per instruction set).
#pragma once

#include <vector>

namespace fastddpm {
namespace cpu {

// "avx512", "avx2" or "default": the build the kernels use now. The best one the CPU (and
// ATEN_CPU_CAPABILITY, which PyTorch honours too) allows is chosen on first use.
const char* active_isa();
// The builds compiled in that this CPU can run, best first.
std::vector<const char*> runnable_isas();
// Switch to a runnable build (tests run every build this way); false if not runnable.
bool set_isa(const char* name);

}  // namespace cpu
}  // namespace fastddpm

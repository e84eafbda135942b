// Chooses, at run time, which build of the CPU kernels runs: the best one compiled in that the
// CPU supports. PyTorch's own detection decides (it honours ATEN_CPU_CAPABILITY), so the
// kernels never use an instruction set PyTorch itself would not.
#include "isa.h"

#include <ATen/Version.h>

#include <atomic>
#include <cstring>
#include <string>

#include "kernels.h"

namespace fastddpm {
namespace cpu {
namespace {

struct Build {
  const char* name;
  const KernelTable& (*table)();
  const char* aten_capability;  // the at::get_cpu_capability() that can run it
};

// Best first. setup.py defines FASTDDPM_BUILD_<ISA> for each build it compiles.
const Build kBuilds[] = {
#ifdef FASTDDPM_BUILD_AVX512
    {"avx512", &AVX512::kernel_table, "AVX512"},
#endif
#ifdef FASTDDPM_BUILD_AVX2
    {"avx2", &AVX2::kernel_table, "AVX2"},
#endif
    {"default", &DEFAULT::kernel_table, "DEFAULT"},
};

bool runnable(const Build& build) {
  static const std::string cap = at::get_cpu_capability();
  const std::string need = build.aten_capability;
  if (need == "DEFAULT") return true;
  if (need == "AVX2") return cap == "AVX2" || cap == "AVX512";
  return cap == need;
}

const Build* best() {
  for (const Build& b : kBuilds) {
    if (runnable(b)) return &b;
  }
  return &kBuilds[sizeof(kBuilds) / sizeof(kBuilds[0]) - 1];
}

std::atomic<const Build*>& active() {
  static std::atomic<const Build*> build{best()};
  return build;
}

}  // namespace

const KernelTable& kernels() { return active().load()->table(); }

const char* active_isa() { return active().load()->name; }

std::vector<const char*> runnable_isas() {
  std::vector<const char*> names;
  for (const Build& b : kBuilds) {
    if (runnable(b)) names.push_back(b.name);
  }
  return names;
}

bool set_isa(const char* name) {
  for (const Build& b : kBuilds) {
    if (std::strcmp(b.name, name) == 0 && runnable(b)) {
      active().store(&b);
      return true;
    }
  }
  return false;
}

}  // namespace cpu
}  // namespace fastddpm

// The CPU kernels' entry points, compiled once per instruction set (kernels_<isa>.cpp) and
// chosen at run time (isa.cpp). Inputs arrive checked and contiguous (ops_cpu.cpp); every
// index is 64-bit.
#pragma once

#include <cstdint>

#include "fastddpm/op_args.h"  // QSampleArgs, ... (shared with the CUDA kernels)

namespace fastddpm {
namespace cpu {

struct KernelTable {
  void (*q_sample)(const QSampleArgs&);
  void (*p_sample_step)(const PSampleArgs&);
  void (*mse_per_sample)(const MseArgs&);
  void (*mse_per_sample_backward)(const MseBackwardArgs&);
  // The float32 uniforms of quads [0, n_quads) of sample g, in element order (for tests).
  void (*philox_uniforms)(float* out, int64_t n_quads, uint64_t g, uint32_t k0, uint32_t k1);
  void (*normal)(const NormalArgs&);
  // Box-Muller's log, sin and cos (of this build) of x[0 .. n), for tests of their accuracy.
  void (*box_muller_math)(const float* x, int64_t n, float* log_x, float* sin_x, float* cos_x);
  // The general sampler step; y is [rows - 1, batch, d].
  void (*solver_step)(const SolverStepArgs&);
  void (*target_mse)(const TargetMseArgs&);
  void (*target_mse_backward)(const TargetMseBackwardArgs&);
  // The variational bound: y = [batch, 2] (mse, vb); its backward: y = d/dout.
  void (*vlb_loss)(const VlbArgs&);
  void (*vlb_loss_backward)(const VlbArgs&);
};

// One table per build; each is defined in kernels_<isa>.cpp.
namespace DEFAULT { const KernelTable& kernel_table(); }
namespace AVX2 { const KernelTable& kernel_table(); }
namespace AVX512 { const KernelTable& kernel_table(); }

const KernelTable& kernels();  // the active build's (isa.cpp)

}  // namespace cpu
}  // namespace fastddpm

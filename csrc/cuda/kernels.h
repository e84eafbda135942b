// The CUDA kernels' launchers (elementwise.cu, per_sample.cu), called by ops_cuda.cu once the
// arguments are checked, contiguous and on the current device (under its device guard). Every
// launch goes to the current stream; every index is 64-bit.
#pragma once

#include <cstdint>

#include "fastddpm/op_args.h"  // QSampleArgs, ... (shared with the CPU kernels)

namespace fastddpm {
namespace cuda {

void launch_q_sample(const QSampleArgs& a);
void launch_p_sample_step(const PSampleArgs& a);
void launch_solver_step(const SolverStepArgs& a);
void launch_mse_per_sample_backward(const MseBackwardArgs& a);
void launch_target_mse_backward(const TargetMseBackwardArgs& a);
void launch_vlb_loss_backward(const VlbArgs& a);  // a.grad set; d/dout into a.y
// These three need partial-sum scratch for large samples: they allocate it on the current device.
void launch_mse_per_sample(const MseArgs& a);
void launch_target_mse(const TargetMseArgs& a);
void launch_vlb_loss(const VlbArgs& a);  // per-sample (mse, vb) into a.y
void launch_normal(const NormalArgs& a);
void launch_sample_t(const int64_t* seed, int64_t batch, uint32_t n_steps, uint64_t offset, int64_t* out);

}  // namespace cuda
}  // namespace fastddpm

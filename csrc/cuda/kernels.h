// The CUDA kernels' launchers (elementwise.cu, per_sample.cu), called by ops_cuda.cu once the
// arguments are checked, contiguous and on the current device (under its device guard). Every
// launch goes to the current stream; every index is 64-bit.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastddpm {
namespace cuda {

// A per-t coefficient table (float32 or float64, contiguous), gathered by t inside the kernels.
struct Table {
  const void* data;
  bool is_double;
};

// The [B] timesteps, int32 or int64, possibly an expanded view (stride 0). Device code asserts
// 0 <= t < n_steps (ops.py checks on the host except under torch.compile or graph capture).
struct Steps {
  const void* data;
  bool is_int64;
  int64_t stride;
  int64_t n_steps;
};

// Where the noise comes from: noise != nullptr, else the contract's stream keyed by the int64
// at `seed` (device memory, read by the kernel: see ops_cuda.cu), sample b having global index
// offset + b.
struct NoiseSource {
  const void* noise;
  const int64_t* seed;
  uint64_t offset;
};

// The tensors of an op seen as [batch, d] row-major (d = elements per sample).
struct Shape {
  int64_t batch, d;
};

struct QSampleArgs {
  c10::ScalarType dtype;
  Shape shape;
  const void* x0;
  NoiseSource noise;
  Steps t;
  Table sqrt_ab, sqrt_1m_ab;
  void* out;
};

struct PSampleArgs {
  c10::ScalarType dtype;
  Shape shape;
  const void* x_t;
  const void* eps_theta;
  NoiseSource noise;
  Steps t;
  Table c1, c2, sigma;
  void* out;
};

struct MseArgs {
  c10::ScalarType dtype;  // of pred and target
  Shape shape;
  const void* pred;
  NoiseSource target;
  void* out;  // [batch], double for double inputs, else float
};

struct MseBackwardArgs {
  c10::ScalarType dtype;  // of pred, target and out
  Shape shape;
  const void* grad;  // [batch], contiguous, double for double inputs, else float
  const void* pred;
  NoiseSource target;
  void* out;
};

void launch_q_sample(const QSampleArgs& a);
void launch_p_sample_step(const PSampleArgs& a);
void launch_mse_per_sample_backward(const MseBackwardArgs& a);
// Needs partial-sum scratch for large samples: allocates it on the current device.
void launch_mse_per_sample(const MseArgs& a);
void launch_sample_t(const int64_t* seed, int64_t batch, uint32_t n_steps, uint64_t offset, int64_t* out);

}  // namespace cuda
}  // namespace fastddpm

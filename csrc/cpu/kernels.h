// The CPU kernels' entry points, compiled once per instruction set (kernels_<isa>.cpp) and
// chosen at run time (isa.cpp). Inputs arrive checked and contiguous (ops_cpu.cpp); every
// index is 64-bit.
#pragma once

#include <c10/core/ScalarType.h>
#include <cstdint>

namespace fastddpm {
namespace cpu {

// A per-t coefficient table (float32 or float64), gathered by t inside the kernels.
struct Table {
  const void* data;
  bool is_double;
};

// The [B] timesteps, int32 or int64, possibly an expanded view (stride 0).
struct Steps {
  const void* data;
  bool is_int64;
  int64_t stride;
};

// Where the noise comes from: noise != nullptr, else the contract's stream for key (k0, k1),
// sample b having global index offset + b.
struct NoiseSource {
  const void* noise;
  uint32_t k0, k1;
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
  const void* grad;  // [batch], double for double inputs, else float
  const void* pred;
  NoiseSource target;
  void* out;
};

struct KernelTable {
  void (*q_sample)(const QSampleArgs&);
  void (*p_sample_step)(const PSampleArgs&);
  void (*mse_per_sample)(const MseArgs&);
  void (*mse_per_sample_backward)(const MseBackwardArgs&);
  // The float32 uniforms of quads [0, n_quads) of sample g, in element order (for tests).
  void (*philox_uniforms)(float* out, int64_t n_quads, uint64_t g, uint32_t k0, uint32_t k1);
};

// One table per build; each is defined in kernels_<isa>.cpp.
namespace DEFAULT { const KernelTable& kernel_table(); }
namespace AVX2 { const KernelTable& kernel_table(); }
namespace AVX512 { const KernelTable& kernel_table(); }

const KernelTable& kernels();  // the active build's (isa.cpp)

}  // namespace cpu
}  // namespace fastddpm

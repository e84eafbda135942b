// The argument structs of the ops' kernels, one definition for the CPU (csrc/cpu) and the CUDA
// (csrc/cuda) kernels: the host code fills them the same way on both (op_checks.h). Inputs
// arrive checked and contiguous; every index is 64-bit.
//
// Plain structs only: this header is compiled into every CPU kernel build (one per instruction
// set), and unlike kernel_math.h's inline functions, struct definitions cannot be merged wrongly
// across builds by the linker, so no CPU_CAPABILITY namespace is needed.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastddpm {

// A per-t coefficient table (float32 or float64, contiguous), gathered by t inside the kernels.
struct Table {
  const void* data;
  bool is_double;
};

// The [B] timesteps, int32 or int64, possibly an expanded view (stride 0), each in
// [0, n_steps): the CPU host code checks that; CUDA device code asserts it, since reading t on
// the host would cost a sync (ops.py checks on the host except under torch.compile or graph
// capture).
struct Steps {
  const void* data;
  bool is_int64;
  int64_t stride;
  int64_t n_steps;
};

// Where the noise comes from: the given tensor when has_noise, else the contract's stream keyed
// by the int64 seed, sample b having global index offset + b. has_noise is explicit because a
// given but empty tensor has a null data pointer (then no kernel runs, but the host code must not
// mistake it for "generate" and read a seed that was never passed). The seed is a 1-element tensor on the data's
// device. The CPU host code reads it into (k0, k1) = (seed lo, seed hi); the CUDA kernels read
// *seed themselves when they run (k0, k1 unused), so the host never syncs on it and a captured
// CUDA graph sees a fresh seed on every replay (see ops_cuda.cu).
struct NoiseSource {
  const void* noise;
  const int64_t* seed;
  uint32_t k0, k1;
  uint64_t offset;
  bool has_noise;
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
  // The CPU kernel only (mse_loss's forward, csrc/train_ops.cpp): where grad_out is set, the same
  // pass also writes d/dpred of sum_b grad_scale[b] mse_b into it (pred's shape and dtype),
  // exactly as mse_per_sample_backward would from the per-sample grad grad_scale ([batch], acc).
  const void* grad_scale = nullptr;
  void* grad_out = nullptr;
};

struct MseBackwardArgs {
  c10::ScalarType dtype;  // of pred, target and out
  Shape shape;
  const void* grad;  // [batch], contiguous, double for double inputs, else float
  const void* pred;
  NoiseSource target;
  void* out;
};

// The general sampler step (kernel_math.h), one pass per element: with k = t[b] and
// c = coef + k * (rows * kSolverColumns) (rows = R + 1, row-major, float32 or float64),
//   o  = out_cond ? out + guidance (out_cond - out) : out
//   x0 = clamp(c[0] x + c[1] o, -lim, lim) * inv_scale, lim = bound[b] and inv_scale = 1 / lim
//        when bound.data (thresholding), else lim = clip (+inf: no clamp) and inv_scale = 1
//   y[r - 1] = c[r*8+0] x + c[r*8+1] o + c[r*8+2] x0 + sum_h c[r*8+3+h] history[h] + c[r*8+7] z
// for r = 1 .. R; y is [R, batch, d] contiguous. Columns 3 + n_history .. 6 are not read. z is
// the given noise or the stream's; a sample whose column-7 entries are all 0 may skip drawing it.
constexpr int kSolverColumns = 8;    // x, out, x0, history[0..3], z
constexpr int kSolverHistory = 4;    // history operands at most
constexpr int kSolverMaxOutputs = 4;  // R at most

struct SolverStepArgs {
  c10::ScalarType dtype;  // of x, out, out_cond, history, noise and y
  Shape shape;
  const void* x;
  const void* out;
  const void* out_cond;  // nullptr: no guidance
  double guidance;
  const void* history[kSolverHistory];  // the first n_history are set
  int n_history;
  NoiseSource noise;
  Steps t;
  const void* coef;  // [n_steps, rows, kSolverColumns], contiguous
  bool coef_double;
  int rows;  // R + 1
  Table bound;  // [batch], float32 or float64; data nullptr: clip instead
  double clip;
  // Like x, or nullptr: where given (and the sample draws z), z is scaled per element by
  // kernel_math.h's learned_noise_scale(var, c[3], c[4]) (row 0's columns 3 and 4).
  const void* var;
  void* y;  // [rows - 1, batch, d]
};

// The per-sample MSE against target = cx0[k] x0 + ceps[k] eps (k = t[b]); eps is the given
// noise or the stream's, which a sample whose ceps[k] is 0 may skip generating.
struct TargetMseArgs {
  c10::ScalarType dtype;  // of pred, x0 and noise
  Shape shape;
  const void* pred;
  const void* x0;
  NoiseSource noise;
  Steps t;
  Table cx0, ceps;
  void* out;  // [batch], double for double inputs, else float
};

// d target_mse_b / d pred = grad_b * 2 / D * (pred - target).
struct TargetMseBackwardArgs {
  c10::ScalarType dtype;  // of pred, x0, noise and out
  Shape shape;
  const void* grad;  // [batch], contiguous, double for double inputs, else float
  const void* pred;
  const void* x0;
  NoiseSource noise;
  Steps t;
  Table cx0, ceps;
  void* out;
};

// The fused variational bound (vlb_loss) and its backward; the per-element formulas are
// kernel_math.h's vlb_value and vlb_grad_value. shape is x0's [batch, D]; out holds per sample
// the D mean elements then (variance_type != 2) the D variance elements: out_d = 2 D or D. The
// noise (given like x0, or the stream's) has x0's flat index within the sample. tables is
// [n_steps, kVlbColumns] contiguous (schedule.VLB_COLUMNS order), gathered by t.
constexpr int kVlbColumns = 9;  // sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta,
                                // sqrt_recip_ab, sqrt_recipm1_ab, fixed_logvar

struct VlbArgs {
  c10::ScalarType dtype;  // of x0, out, noise (and the backward's y)
  Shape shape;            // x0's [batch, D]
  int64_t out_d;          // elements of out per sample: 2 D, or D when variance_type is 2
  const void* x0;
  const void* out;
  NoiseSource noise;
  Steps t;
  const void* tables;  // [n_steps, kVlbColumns]
  bool tables_double;
  int mean_type;      // 0 eps, 1 x0
  int variance_type;  // 0 learned, 1 learned_range, 2 fixed
  bool detach_mean;
  const void* grad;  // backward: [batch, 2] contiguous in the accumulation type (float / double); forward nullptr
  // forward: [batch, 2] (mse, vb) in the accumulation type (double for float64 data, else float);
  // backward: d/dout, [batch, out_d] in dtype (the fixed variance: out_d = D)
  void* y;
};

// The contract's normals themselves (the normal op): out[b, j] is the normal of element j of
// sample noise.offset + b, rounded to dtype. noise.noise is nullptr.
struct NormalArgs {
  c10::ScalarType dtype;  // of out
  Shape shape;
  NoiseSource noise;
  void* out;
};

}  // namespace fastddpm

// The CUDA implementations of torch.ops.fastddpm: argument checks (every message names the
// argument), contiguous inputs, then the kernels of elementwise.cu / per_sample.cu on the
// current stream of the data's device, under a device guard.
//
// Seeds (noise generated in-kernel): `seed` is a 1-element int64 tensor on the data's device and
// the kernels read it from device memory when they run; the host never looks at it. When the
// caller gives no seed, fastddpm/ops.py draws it with torch.randint on the device's generator.
// That draw is itself CUDA-graph safe (under capture the generator hands out Philox offsets that
// each replay advances), so a captured torch.cuda.CUDAGraph writes a fresh seed into the seed
// tensor on every replay and our kernels, which read that memory at run time, draw fresh noise:
// no host sync, no philox_cuda_state plumbing, and the same (seed, sample_offset) -> noise
// mapping as every other backend. This is the recipe Inductor uses for its own random ops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "fastddpm/op_checks.h"
#include "kernels.h"

namespace fastddpm {
namespace cuda {
namespace {

using at::Tensor;

// The checks shared with the CPU ops (see op_checks.h for where they differ). They never read t
// or the seed on the host: the kernels do (see the top).
const OpChecks check{c10::DeviceType::CUDA, "fastddpm (cuda): "};

Tensor q_sample(const Tensor& x0_in, const Tensor& t, const Tensor& sqrt_ab, const Tensor& sqrt_1m_ab,
                const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed, int64_t sample_offset) {
  check.data(x0_in, "x0");
  const c10::cuda::CUDAGuard guard(x0_in.device());
  int64_t n_steps = -1;
  Tensor ka, kb;
  const Table a = check.table(sqrt_ab, "sqrt_ab", x0_in, "x0", n_steps, ka);
  const Table b = check.table(sqrt_1m_ab, "sqrt_1m_ab", x0_in, "x0", n_steps, kb);
  const Tensor x0 = x0_in.contiguous();
  const auto noise = check.like(noise_in, "noise", x0, "x0");
  const Shape shape = shape_of(x0);
  Tensor out = empty_like_contiguous(x0);
  const QSampleArgs args{x0.scalar_type(), shape, x0.data_ptr(), check.noise(noise, seed, sample_offset, "noise", x0),
                         check.steps(t, x0, shape.batch, n_steps), a, b, out.data_ptr()};
  if (out.numel() > 0) launch_q_sample(args);
  return out;
}

Tensor p_sample_step(const Tensor& x_t_in, const Tensor& eps_in, const Tensor& t, const Tensor& c1, const Tensor& c2,
                     const Tensor& sigma, const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed,
                     int64_t sample_offset) {
  check.data(x_t_in, "x_t");
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  int64_t n_steps = -1;
  Tensor k1, k2, ks;
  const Table tc1 = check.table(c1, "c1", x_t_in, "x_t", n_steps, k1);
  const Table tc2 = check.table(c2, "c2", x_t_in, "x_t", n_steps, k2);
  const Table tsg = check.table(sigma, "sigma", x_t_in, "x_t", n_steps, ks);
  const Tensor x_t = x_t_in.contiguous();
  const Tensor eps = *check.like(eps_in, "eps_theta", x_t, "x_t");
  const auto noise = check.like(noise_in, "noise", x_t, "x_t");
  const Shape shape = shape_of(x_t);
  Tensor out = empty_like_contiguous(x_t);
  const PSampleArgs args{x_t.scalar_type(), shape, x_t.data_ptr(), eps.data_ptr(),
                         check.noise(noise, seed, sample_offset, "noise", x_t),
                         check.steps(t, x_t, shape.batch, n_steps), tc1, tc2, tsg, out.data_ptr()};
  if (out.numel() > 0) launch_p_sample_step(args);
  return out;
}

Tensor mse_per_sample(const Tensor& pred_in, const std::optional<Tensor>& target_in, const std::optional<Tensor>& seed,
                      int64_t sample_offset) {
  check.data(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const Tensor pred = pred_in.contiguous();
  const auto target = check.like(target_in, "target", pred, "pred");
  const Shape shape = check.mse_shape(pred);
  Tensor out = at::empty({shape.batch}, pred.options().dtype(acc_type(pred.scalar_type())));
  const MseArgs args{pred.scalar_type(), shape, pred.data_ptr(),
                     check.noise(target, seed, sample_offset, "target", pred), out.data_ptr()};
  if (shape.batch > 0) launch_mse_per_sample(args);
  return out;
}

Tensor mse_per_sample_backward(const Tensor& grad_in, const Tensor& pred_in, const std::optional<Tensor>& target_in,
                               const std::optional<Tensor>& seed, int64_t sample_offset) {
  check.data(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const Tensor pred = pred_in.contiguous();
  const auto target = check.like(target_in, "target", pred, "pred");
  const Shape shape = shape_of(pred);
  check.mse_grad(grad_in, pred, shape.batch);
  // The incoming grad may be an expanded stride-0 view; read a contiguous copy in acc type.
  const Tensor grad = grad_in.to(acc_type(pred.scalar_type())).contiguous();
  Tensor out = empty_like_contiguous(pred);
  const MseBackwardArgs args{pred.scalar_type(), shape, grad.data_ptr(), pred.data_ptr(),
                             check.noise(target, seed, sample_offset, "target", pred), out.data_ptr()};
  if (out.numel() > 0) launch_mse_per_sample_backward(args);
  return out;
}

// y [R, *x.shape]: one launch for all R output rows. The checks, the contiguous inputs and y
// are op_checks.h's (shared with the CPU op); t and the seed are read in-kernel. var (like x)
// scales z per element (a learned variance).
Tensor solver_step(const Tensor& x, const Tensor& out, const std::optional<Tensor>& out_cond, at::TensorList history,
                   const Tensor& t, const Tensor& coef, const std::optional<Tensor>& bound, double clip,
                   double guidance, const std::optional<Tensor>& noise, const std::optional<Tensor>& seed,
                   int64_t sample_offset, const std::optional<Tensor>& var) {
  check.data(x, "x");  // before the guard, which takes a CUDA device
  const c10::cuda::CUDAGuard guard(x.device());
  const SolverInputs in = check.solver_args(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed,
                                            sample_offset, var);
  if (in.y.numel() > 0) launch_solver_step(in.args);
  return in.y;
}

// vlb_loss: per-sample (mse, vb) [B, 2] in the accumulation type, one launch (two for samples
// of more than one part, see per_sample.cu). The checks, the contiguous inputs and the output
// are op_checks.h's vlb_args (shared with the CPU op); t and the seed are read in-kernel.
Tensor vlb_loss(const Tensor& x0, const Tensor& out, const Tensor& t, const Tensor& tables,
                const std::optional<Tensor>& noise, const std::optional<Tensor>& seed, int64_t sample_offset,
                int64_t mean_type, int64_t variance_type, bool detach_mean) {
  check.data(x0, "x0");  // before the guard, which takes a CUDA device
  const c10::cuda::CUDAGuard guard(x0.device());
  const VlbInputs in = check.vlb_args(nullptr, x0, out, t, tables, noise, seed, sample_offset, mean_type,
                                      variance_type, detach_mean);
  if (in.args.shape.batch > 0) launch_vlb_loss(in.args);
  return in.y;
}

// d/dout of vlb_loss weighted by grad [B, 2] (read as a contiguous copy in the accumulation
// type: it may be an expanded view), like out; the generated noise is drawn again in-kernel.
Tensor vlb_loss_backward(const Tensor& grad, const Tensor& x0, const Tensor& out, const Tensor& t,
                         const Tensor& tables, const std::optional<Tensor>& noise, const std::optional<Tensor>& seed,
                         int64_t sample_offset, int64_t mean_type, int64_t variance_type, bool detach_mean) {
  check.data(x0, "x0");  // before the guard, which takes a CUDA device
  const c10::cuda::CUDAGuard guard(x0.device());
  const VlbInputs in = check.vlb_args(&grad, x0, out, t, tables, noise, seed, sample_offset, mean_type,
                                      variance_type, detach_mean);
  if (in.y.numel() > 0) launch_vlb_loss_backward(in.args);
  return in.y;
}

// The inputs of target_mse and its backward, checked; the contiguous tensors the kernel reads
// are held here until it is queued.
struct TargetInputs {
  Tensor pred, x0, keep_cx0, keep_ceps;
  std::optional<Tensor> noise;
  Table cx0, ceps;
  Steps t;
  NoiseSource src;
};

TargetInputs target_inputs(const Tensor& pred_in, const Tensor& x0_in, const Tensor& t, const Tensor& cx0,
                           const Tensor& ceps, const std::optional<Tensor>& noise_in,
                           const std::optional<Tensor>& seed, int64_t sample_offset) {
  TargetInputs in{};
  int64_t n_steps = -1;
  in.cx0 = check.table(cx0, "cx0", pred_in, "pred", n_steps, in.keep_cx0);
  in.ceps = check.table(ceps, "ceps", pred_in, "pred", n_steps, in.keep_ceps);
  in.pred = pred_in.contiguous();
  in.x0 = *check.like(x0_in, "x0", in.pred, "pred");
  in.noise = check.like(noise_in, "noise", in.pred, "pred");
  in.t = check.steps(t, in.pred, in.pred.size(0), n_steps);
  in.src = check.noise(in.noise, seed, sample_offset, "noise", in.pred);
  return in;
}

Tensor target_mse(const Tensor& pred_in, const Tensor& x0, const Tensor& t, const Tensor& cx0, const Tensor& ceps,
                  const std::optional<Tensor>& noise, const std::optional<Tensor>& seed, int64_t sample_offset) {
  check.data(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const TargetInputs in = target_inputs(pred_in, x0, t, cx0, ceps, noise, seed, sample_offset);
  const Shape shape = check.mse_shape(in.pred);
  Tensor out = at::empty({shape.batch}, in.pred.options().dtype(acc_type(in.pred.scalar_type())));
  const TargetMseArgs args{in.pred.scalar_type(), shape, in.pred.data_ptr(), in.x0.data_ptr(), in.src, in.t,
                           in.cx0, in.ceps, out.data_ptr()};
  if (shape.batch > 0) launch_target_mse(args);
  return out;
}

Tensor target_mse_backward(const Tensor& grad_in, const Tensor& pred_in, const Tensor& x0, const Tensor& t,
                           const Tensor& cx0, const Tensor& ceps, const std::optional<Tensor>& noise,
                           const std::optional<Tensor>& seed, int64_t sample_offset) {
  check.data(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const TargetInputs in = target_inputs(pred_in, x0, t, cx0, ceps, noise, seed, sample_offset);
  const Shape shape = shape_of(in.pred);
  check.mse_grad(grad_in, in.pred, shape.batch);
  // As in mse_per_sample_backward: a contiguous copy in acc type.
  const Tensor grad = grad_in.to(acc_type(in.pred.scalar_type())).contiguous();
  Tensor out = empty_like_contiguous(in.pred);
  const TargetMseBackwardArgs args{in.pred.scalar_type(), shape, grad.data_ptr(), in.pred.data_ptr(),
                                   in.x0.data_ptr(), in.src, in.t, in.cx0, in.ceps, out.data_ptr()};
  if (out.numel() > 0) launch_target_mse_backward(args);
  return out;
}

Tensor sample_t(const Tensor& seed, int64_t batch, int64_t n_steps, int64_t sample_offset) {
  check.device_type(seed, "seed");  // before the guard, which takes a CUDA device
  check.sample_t_sizes(batch, n_steps);
  const c10::cuda::CUDAGuard guard(seed.device());
  const NoiseSource key = check.noise(std::nullopt, seed, sample_offset, "noise", seed);
  Tensor out = at::empty({batch}, seed.options().dtype(at::kLong));
  if (batch > 0) launch_sample_t(key.seed, batch, static_cast<uint32_t>(n_steps), key.offset, out.data_ptr<int64_t>());
  return out;
}

// The contract's normals of samples sample_offset .. + size[0] - 1 as a `size` tensor in dtype.
Tensor normal(const Tensor& seed, c10::IntArrayRef size, int64_t sample_offset, at::ScalarType dtype) {
  check.device_type(seed, "seed");  // before the guard, which takes a CUDA device
  check.normal_args(size, dtype);
  const c10::cuda::CUDAGuard guard(seed.device());
  const NoiseSource key = check.noise(std::nullopt, seed, sample_offset, "noise", seed);
  Tensor out = at::empty(size, seed.options().dtype(dtype));
  if (out.numel() > 0) launch_normal(NormalArgs{dtype, shape_of(out), key, out.data_ptr()});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("q_sample", &q_sample);
  m.impl("p_sample_step", &p_sample_step);
  m.impl("mse_per_sample", &mse_per_sample);
  m.impl("mse_per_sample_backward", &mse_per_sample_backward);
  m.impl("sample_t", &sample_t);
  m.impl("normal", &normal);
  m.impl("solver_step", &solver_step);
  m.impl("target_mse", &target_mse);
  m.impl("target_mse_backward", &target_mse_backward);
  m.impl("vlb_loss", &vlb_loss);
  m.impl("vlb_loss_backward", &vlb_loss_backward);
}

}  // namespace cuda
}  // namespace fastddpm

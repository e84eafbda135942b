// The CPU implementations of torch.ops.fastddpm: argument checks (every message names the
// argument), contiguous inputs, then one pass of the kernel build chosen for this CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "fastddpm/kernel_math.h"
#include "fastddpm/op_checks.h"
#include "kernels.h"
#include "ops_cpu.h"

namespace fastddpm {
namespace cpu {
namespace {

using at::Tensor;

// The checks shared with the CUDA ops (see op_checks.h for where they differ).
const OpChecks check{c10::DeviceType::CPU, "fastddpm (cpu): "};

// t's values, checked to lie in [0, n_steps) (ops.py skips that check under torch.compile, so
// the kernel makes it: B integers, negligible beside the data).
void check_step_range(const Steps& steps, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t v = steps.is_int64 ? static_cast<const int64_t*>(steps.data)[b * steps.stride]
                                     : static_cast<const int32_t*>(steps.data)[b * steps.stride];
    TORCH_CHECK(v >= 0 && v < steps.n_steps, check.prefix, "t must lie in [0, ", steps.n_steps, "), got t[", b,
                "] = ", v);
  }
}

// The [batch] timesteps, checked (their range too).
Steps steps_arg(const Tensor& t, const Tensor& ref, int64_t batch, int64_t n_steps) {
  const Steps steps = check.steps(t, ref, batch, n_steps);
  check_step_range(steps, batch);
  return steps;
}

// The key of the noise stream, read from the seed (host memory), unless the noise is given.
void read_key(NoiseSource& src) {
  if (!src.has_noise) {
    const uint64_t key = static_cast<uint64_t>(*src.seed);
    src.k0 = math::lo32(key);
    src.k1 = math::hi32(key);
  }
}

// The given noise tensor, or the key of the noise stream.
NoiseSource noise_arg(const std::optional<Tensor>& noise, const std::optional<Tensor>& seed, int64_t sample_offset,
                      const char* noise_name, const Tensor& ref) {
  NoiseSource src = check.noise(noise, seed, sample_offset, noise_name, ref);
  read_key(src);
  return src;
}

Tensor q_sample(const Tensor& x0_in, const Tensor& t, const Tensor& sqrt_ab, const Tensor& sqrt_1m_ab,
                const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed, int64_t sample_offset) {
  check.data(x0_in, "x0");
  int64_t n_steps = -1;
  Tensor ka, kb;
  const Table a = check.table(sqrt_ab, "sqrt_ab", x0_in, "x0", n_steps, ka);
  const Table b = check.table(sqrt_1m_ab, "sqrt_1m_ab", x0_in, "x0", n_steps, kb);
  const Tensor x0 = x0_in.contiguous();
  const auto noise = check.like(noise_in, "noise", x0, "x0");
  const Shape shape = shape_of(x0);
  Tensor out = empty_like_contiguous(x0);
  const QSampleArgs args{x0.scalar_type(), shape, x0.data_ptr(), noise_arg(noise, seed, sample_offset, "noise", x0),
                         steps_arg(t, x0, shape.batch, n_steps), a, b, out.data_ptr()};
  if (out.numel() > 0) kernels().q_sample(args);
  return out;
}

Tensor p_sample_step(const Tensor& x_t_in, const Tensor& eps_in, const Tensor& t, const Tensor& c1, const Tensor& c2,
                     const Tensor& sigma, const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed,
                     int64_t sample_offset) {
  check.data(x_t_in, "x_t");
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
                         noise_arg(noise, seed, sample_offset, "noise", x_t), steps_arg(t, x_t, shape.batch, n_steps),
                         tc1, tc2, tsg, out.data_ptr()};
  if (out.numel() > 0) kernels().p_sample_step(args);
  return out;
}

// mse_per_sample, and with grad_scale ([batch], acc type) also d/dpred of sum_b grad_scale[b]
// mse_b from the same pass (undefined without).
std::tuple<Tensor, Tensor> mse_and_grad(const Tensor& pred_in, const std::optional<Tensor>& target_in,
                                        const std::optional<Tensor>& seed, int64_t sample_offset,
                                        const Tensor* grad_scale) {
  check.data(pred_in, "pred");
  const Tensor pred = pred_in.contiguous();
  const auto target = check.like(target_in, "target", pred, "pred");
  const Shape shape = check.mse_shape(pred);
  Tensor out = at::empty({shape.batch}, pred.options().dtype(acc_type(pred.scalar_type())));
  MseArgs args{pred.scalar_type(), shape, pred.data_ptr(), noise_arg(target, seed, sample_offset, "target", pred),
               out.data_ptr()};
  Tensor grad;
  if (grad_scale != nullptr) {
    grad = empty_like_contiguous(pred);
    args.grad_scale = grad_scale->data_ptr();
    args.grad_out = grad.data_ptr();
  }
  if (shape.batch > 0) kernels().mse_per_sample(args);
  return {out, grad};
}

Tensor mse_per_sample(const Tensor& pred_in, const std::optional<Tensor>& target_in, const std::optional<Tensor>& seed,
                      int64_t sample_offset) {
  return std::get<0>(mse_and_grad(pred_in, target_in, seed, sample_offset, nullptr));
}

Tensor mse_per_sample_backward(const Tensor& grad_in, const Tensor& pred_in, const std::optional<Tensor>& target_in,
                               const std::optional<Tensor>& seed, int64_t sample_offset) {
  check.data(pred_in, "pred");
  const Tensor pred = pred_in.contiguous();
  const auto target = check.like(target_in, "target", pred, "pred");
  const Shape shape = shape_of(pred);
  check.mse_grad(grad_in, pred, shape.batch);
  // The incoming grad may be an expanded stride-0 view; read a contiguous copy in acc type.
  const Tensor grad = grad_in.to(acc_type(pred.scalar_type())).contiguous();
  Tensor out = empty_like_contiguous(pred);
  const MseBackwardArgs args{pred.scalar_type(), shape, grad.data_ptr(), pred.data_ptr(),
                             noise_arg(target, seed, sample_offset, "target", pred), out.data_ptr()};
  if (out.numel() > 0) kernels().mse_per_sample_backward(args);
  return out;
}

// [R, *x.shape]: output r - 1 is row r of coef[t] applied to (x, out, x0, history, z).
Tensor solver_step(const Tensor& x, const Tensor& out, const std::optional<Tensor>& out_cond, at::TensorList history,
                   const Tensor& t, const Tensor& coef, const std::optional<Tensor>& bound, double clip,
                   double guidance, const std::optional<Tensor>& noise, const std::optional<Tensor>& seed,
                   int64_t sample_offset, const std::optional<Tensor>& var) {
  SolverInputs in = check.solver_args(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed,
                                      sample_offset, var);
  check_step_range(in.args.t, in.args.shape.batch);
  read_key(in.args.noise);
  if (in.y.numel() > 0) kernels().solver_step(in.args);
  return in.y;
}

// The inputs target_mse and its backward share, checked alike (x0 and noise like pred).
struct TargetInputs {
  Tensor pred, x0, keep_cx0, keep_ceps;
  std::optional<Tensor> noise;
  Table cx0, ceps;
  int64_t n_steps = -1;
};

TargetInputs target_inputs(const Tensor& pred_in, const Tensor& x0_in, const Tensor& cx0, const Tensor& ceps,
                           const std::optional<Tensor>& noise_in) {
  check.data(pred_in, "pred");
  TargetInputs in;
  in.cx0 = check.table(cx0, "cx0", pred_in, "pred", in.n_steps, in.keep_cx0);
  in.ceps = check.table(ceps, "ceps", pred_in, "pred", in.n_steps, in.keep_ceps);
  in.pred = pred_in.contiguous();
  in.x0 = *check.like(x0_in, "x0", in.pred, "pred");
  in.noise = check.like(noise_in, "noise", in.pred, "pred");
  return in;
}

Tensor target_mse(const Tensor& pred_in, const Tensor& x0_in, const Tensor& t, const Tensor& cx0, const Tensor& ceps,
                  const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed, int64_t sample_offset) {
  const TargetInputs in = target_inputs(pred_in, x0_in, cx0, ceps, noise_in);
  const Shape shape = check.mse_shape(in.pred);
  Tensor out = at::empty({shape.batch}, in.pred.options().dtype(acc_type(in.pred.scalar_type())));
  const TargetMseArgs args{in.pred.scalar_type(), shape, in.pred.data_ptr(), in.x0.data_ptr(),
                           noise_arg(in.noise, seed, sample_offset, "noise", in.pred),
                           steps_arg(t, in.pred, shape.batch, in.n_steps), in.cx0, in.ceps, out.data_ptr()};
  if (shape.batch > 0) kernels().target_mse(args);
  return out;
}

Tensor target_mse_backward(const Tensor& grad_in, const Tensor& pred_in, const Tensor& x0_in, const Tensor& t,
                           const Tensor& cx0, const Tensor& ceps, const std::optional<Tensor>& noise_in,
                           const std::optional<Tensor>& seed, int64_t sample_offset) {
  const TargetInputs in = target_inputs(pred_in, x0_in, cx0, ceps, noise_in);
  const Shape shape = shape_of(in.pred);
  check.mse_grad(grad_in, in.pred, shape.batch);
  // The incoming grad may be an expanded stride-0 view; read a contiguous copy in acc type.
  const Tensor grad = grad_in.to(acc_type(in.pred.scalar_type())).contiguous();
  Tensor out = empty_like_contiguous(in.pred);
  const TargetMseBackwardArgs args{in.pred.scalar_type(), shape, grad.data_ptr(), in.pred.data_ptr(), in.x0.data_ptr(),
                                   noise_arg(in.noise, seed, sample_offset, "noise", in.pred),
                                   steps_arg(t, in.pred, shape.batch, in.n_steps), in.cx0, in.ceps, out.data_ptr()};
  if (out.numel() > 0) kernels().target_mse_backward(args);
  return out;
}

// Per-sample (mse, vb) [B, 2] of the variational bound (op_args.h: VlbArgs).
Tensor vlb_loss(const Tensor& x0, const Tensor& out, const Tensor& t, const Tensor& tables,
                const std::optional<Tensor>& noise, const std::optional<Tensor>& seed, int64_t sample_offset,
                int64_t mean_type, int64_t variance_type, bool detach_mean) {
  VlbInputs in = check.vlb_args(nullptr, x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type,
                                detach_mean);
  check_step_range(in.args.t, in.args.shape.batch);
  read_key(in.args.noise);
  if (in.args.shape.batch > 0) kernels().vlb_loss(in.args);
  return in.y;
}

// d/dout of (grad * vlb_loss(...)).sum(), out's shape and dtype.
Tensor vlb_loss_backward(const Tensor& grad, const Tensor& x0, const Tensor& out, const Tensor& t,
                         const Tensor& tables, const std::optional<Tensor>& noise, const std::optional<Tensor>& seed,
                         int64_t sample_offset, int64_t mean_type, int64_t variance_type, bool detach_mean) {
  VlbInputs in = check.vlb_args(&grad, x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type,
                                detach_mean);
  check_step_range(in.args.t, in.args.shape.batch);
  read_key(in.args.noise);
  if (in.y.numel() > 0) kernels().vlb_loss_backward(in.args);
  return in.y;
}

Tensor sample_t(const Tensor& seed, int64_t batch, int64_t n_steps, int64_t sample_offset) {
  check.sample_t_sizes(batch, n_steps);
  const NoiseSource key = noise_arg(std::nullopt, seed, sample_offset, "noise", seed);
  Tensor out = at::empty({batch}, seed.options().dtype(at::kLong));
  int64_t* t = out.data_ptr<int64_t>();
  // B Philox calls: too little work to be worth threads.
  for (int64_t b = 0; b < batch; ++b) {
    t[b] = math::sample_timestep(key.offset + static_cast<uint64_t>(b), static_cast<uint32_t>(n_steps), key.k0, key.k1);
  }
  return out;
}

// The contract's normals of samples sample_offset .. + size[0] - 1 as a `size` tensor in dtype.
Tensor normal(const Tensor& seed, c10::IntArrayRef size, int64_t sample_offset, at::ScalarType dtype) {
  check.normal_args(size, dtype);
  const NoiseSource key = noise_arg(std::nullopt, seed, sample_offset, "noise", seed);
  Tensor out = at::empty(size, seed.options().dtype(dtype));
  const NormalArgs args{dtype, shape_of(out), key, out.data_ptr()};
  if (out.numel() > 0) kernels().normal(args);
  return out;
}

}  // namespace

// The CPU ops as plain functions (train_ops.cpp's CPU kernels call them without a dispatcher trip).
Tensor q_sample_cpu(const Tensor& x0, const Tensor& t, const Tensor& sqrt_ab, const Tensor& sqrt_1m_ab,
                    const std::optional<Tensor>& noise, const std::optional<Tensor>& seed, int64_t sample_offset) {
  return q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset);
}

Tensor sample_t_cpu(const Tensor& seed, int64_t batch, int64_t n_steps, int64_t sample_offset) {
  return sample_t(seed, batch, n_steps, sample_offset);
}

Tensor normal_cpu(const Tensor& seed, c10::IntArrayRef size, int64_t sample_offset, at::ScalarType dtype) {
  return normal(seed, size, sample_offset, dtype);
}

std::tuple<Tensor, Tensor> mse_per_sample_and_grad(const Tensor& pred, const std::optional<Tensor>& target,
                                                   const std::optional<Tensor>& seed, int64_t sample_offset,
                                                   const Tensor& grad_scale) {
  TORCH_CHECK(grad_scale.is_cpu() && grad_scale.dim() == 1 && grad_scale.size(0) == pred.size(0) &&
                  grad_scale.scalar_type() == acc_type(pred.scalar_type()) && grad_scale.is_contiguous(),
              check.prefix, "grad_scale must be a contiguous [batch] CPU tensor of pred's accumulation type");
  return mse_and_grad(pred, target, seed, sample_offset, &grad_scale);
}

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
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

}  // namespace cpu
}  // namespace fastddpm

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

#include <limits>
#include <optional>

#include "kernels.h"

namespace fastddpm {
namespace cuda {
namespace {

using at::Tensor;

bool is_float_type(at::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void check_data(const Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "fastddpm (cuda): ", name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(is_float_type(x.scalar_type()), "fastddpm (cuda): ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "fastddpm (cuda): ", name, " must have a batch dimension (rank >= 1), got a 0-d tensor");
}

// Every tensor of an op lives on the data's device.
void check_device(const Tensor& x, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(x.device() == ref.device(), "fastddpm (cuda): ", name, " is on ", x.device(), " but ", ref_name,
              " is on ", ref.device());
}

// [batch, elements per sample] of a batch-first tensor (also when the batch is empty).
Shape shape_of(const Tensor& x) {
  int64_t d = 1;
  for (int64_t i = 1; i < x.dim(); ++i) d *= x.size(i);
  return Shape{x.size(0), d};
}

// An optional tensor that must match ref in shape, dtype and device; returned contiguous.
std::optional<Tensor> like(const std::optional<Tensor>& x, const char* name, const Tensor& ref, const char* ref_name) {
  if (!x.has_value() || !x->defined()) return std::nullopt;
  check_device(*x, name, ref, ref_name);
  TORCH_CHECK(x->sizes() == ref.sizes(), "fastddpm (cuda): ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", x->sizes());
  TORCH_CHECK(x->scalar_type() == ref.scalar_type(), "fastddpm (cuda): ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", x->scalar_type());
  return x->contiguous();
}

// A per-t table, kept alive in `keep` (contiguous); all tables of an op have one length n_steps.
Table table_arg(const Tensor& tab, const char* name, const Tensor& ref, const char* ref_name, int64_t& n_steps,
                Tensor& keep) {
  check_device(tab, name, ref, ref_name);
  TORCH_CHECK(tab.dim() == 1, "fastddpm (cuda): ", name, " must be a 1-D per-t table, got shape ", tab.sizes());
  TORCH_CHECK(tab.scalar_type() == at::kFloat || tab.scalar_type() == at::kDouble, "fastddpm (cuda): ", name,
              " must be float32 or float64, got ", tab.scalar_type());
  TORCH_CHECK(tab.numel() > 0, "fastddpm (cuda): ", name, " is empty (n_steps must be >= 1)");
  TORCH_CHECK(n_steps < 0 || tab.numel() == n_steps, "fastddpm (cuda): the per-t tables must have one length; ",
              name, " has ", tab.numel(), ", expected ", n_steps);
  n_steps = tab.numel();
  keep = tab.contiguous();
  return Table{keep.data_ptr(), keep.scalar_type() == at::kDouble};
}

// The [batch] timesteps. Their range is asserted in the kernels: reading them here would cost a
// host sync (ops.py checks them on the host outside torch.compile and graph capture).
Steps steps_arg(const Tensor& t, const Tensor& ref, int64_t batch, int64_t n_steps) {
  check_device(t, "t", ref, "the data");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "fastddpm (cuda): t must be an int32 or int64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "fastddpm (cuda): t must have shape [", batch,
              "] (one step per sample), got ", t.sizes());
  return Steps{t.data_ptr(), t.scalar_type() == at::kLong, batch ? t.stride(0) : 1, n_steps};
}

// The given noise tensor, or the device-side seed of the generated stream (see the top).
NoiseSource noise_arg(const std::optional<Tensor>& noise, const std::optional<Tensor>& seed, int64_t sample_offset,
                      const char* noise_name, const Tensor& ref) {
  TORCH_CHECK(sample_offset >= 0, "fastddpm (cuda): sample_offset must be >= 0, got ", sample_offset);
  NoiseSource src{nullptr, nullptr, static_cast<uint64_t>(sample_offset)};
  if (noise.has_value()) {
    src.noise = noise->data_ptr();
    return src;
  }
  TORCH_CHECK(seed.has_value() && seed->defined(), "fastddpm (cuda): seed is required when ", noise_name, " is None");
  check_device(*seed, "seed", ref, "the data");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "fastddpm (cuda): seed must be a 1-element int64 tensor, got ", seed->scalar_type(), " of shape ",
              seed->sizes());
  src.seed = seed->data_ptr<int64_t>();  // one element: any stride reads it
  return src;
}

Tensor empty_like_contiguous(const Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

Tensor q_sample(const Tensor& x0_in, const Tensor& t, const Tensor& sqrt_ab, const Tensor& sqrt_1m_ab,
                const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed, int64_t sample_offset) {
  check_data(x0_in, "x0");
  const c10::cuda::CUDAGuard guard(x0_in.device());
  int64_t n_steps = -1;
  Tensor ka, kb;
  const Table a = table_arg(sqrt_ab, "sqrt_ab", x0_in, "x0", n_steps, ka);
  const Table b = table_arg(sqrt_1m_ab, "sqrt_1m_ab", x0_in, "x0", n_steps, kb);
  const Tensor x0 = x0_in.contiguous();
  const auto noise = like(noise_in, "noise", x0, "x0");
  const Shape shape = shape_of(x0);
  Tensor out = empty_like_contiguous(x0);
  const QSampleArgs args{x0.scalar_type(), shape, x0.data_ptr(), noise_arg(noise, seed, sample_offset, "noise", x0),
                         steps_arg(t, x0, shape.batch, n_steps), a, b, out.data_ptr()};
  if (out.numel() > 0) launch_q_sample(args);
  return out;
}

Tensor p_sample_step(const Tensor& x_t_in, const Tensor& eps_in, const Tensor& t, const Tensor& c1, const Tensor& c2,
                     const Tensor& sigma, const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed,
                     int64_t sample_offset) {
  check_data(x_t_in, "x_t");
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  int64_t n_steps = -1;
  Tensor k1, k2, ks;
  const Table tc1 = table_arg(c1, "c1", x_t_in, "x_t", n_steps, k1);
  const Table tc2 = table_arg(c2, "c2", x_t_in, "x_t", n_steps, k2);
  const Table tsg = table_arg(sigma, "sigma", x_t_in, "x_t", n_steps, ks);
  const Tensor x_t = x_t_in.contiguous();
  const Tensor eps = *like(eps_in, "eps_theta", x_t, "x_t");
  const auto noise = like(noise_in, "noise", x_t, "x_t");
  const Shape shape = shape_of(x_t);
  Tensor out = empty_like_contiguous(x_t);
  const PSampleArgs args{x_t.scalar_type(), shape, x_t.data_ptr(), eps.data_ptr(),
                         noise_arg(noise, seed, sample_offset, "noise", x_t), steps_arg(t, x_t, shape.batch, n_steps),
                         tc1, tc2, tsg, out.data_ptr()};
  if (out.numel() > 0) launch_p_sample_step(args);
  return out;
}

Tensor mse_per_sample(const Tensor& pred_in, const std::optional<Tensor>& target_in, const std::optional<Tensor>& seed,
                      int64_t sample_offset) {
  check_data(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const Tensor pred = pred_in.contiguous();
  const auto target = like(target_in, "target", pred, "pred");
  const Shape shape = shape_of(pred);
  TORCH_CHECK(shape.batch == 0 || shape.d > 0,
              "fastddpm (cuda): pred must have at least one element per sample, got shape ", pred.sizes());
  Tensor out = at::empty({shape.batch}, pred.options().dtype(acc_type(pred.scalar_type())));
  const MseArgs args{pred.scalar_type(), shape, pred.data_ptr(),
                     noise_arg(target, seed, sample_offset, "target", pred), out.data_ptr()};
  if (shape.batch > 0) launch_mse_per_sample(args);
  return out;
}

Tensor mse_per_sample_backward(const Tensor& grad_in, const Tensor& pred_in, const std::optional<Tensor>& target_in,
                               const std::optional<Tensor>& seed, int64_t sample_offset) {
  check_data(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const Tensor pred = pred_in.contiguous();
  const auto target = like(target_in, "target", pred, "pred");
  const Shape shape = shape_of(pred);
  check_device(grad_in, "grad", pred, "pred");
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == shape.batch, "fastddpm (cuda): grad must have shape [",
              shape.batch, "], got ", grad_in.sizes());
  TORCH_CHECK(is_float_type(grad_in.scalar_type()), "fastddpm (cuda): grad must be a floating tensor, got ",
              grad_in.scalar_type());
  // The incoming grad may be an expanded stride-0 view; read a contiguous copy in acc type.
  const Tensor grad = grad_in.to(acc_type(pred.scalar_type())).contiguous();
  Tensor out = empty_like_contiguous(pred);
  const MseBackwardArgs args{pred.scalar_type(), shape, grad.data_ptr(), pred.data_ptr(),
                             noise_arg(target, seed, sample_offset, "target", pred), out.data_ptr()};
  if (out.numel() > 0) launch_mse_per_sample_backward(args);
  return out;
}

Tensor sample_t(const Tensor& seed, int64_t batch, int64_t n_steps, int64_t sample_offset) {
  TORCH_CHECK(seed.is_cuda(), "fastddpm (cuda): seed must be a CUDA tensor, got one on ", seed.device());
  TORCH_CHECK(batch >= 0, "fastddpm (cuda): batch must be >= 0, got ", batch);
  TORCH_CHECK(n_steps >= 1 && n_steps <= std::numeric_limits<int32_t>::max(),
              "fastddpm (cuda): n_steps must lie in [1, 2**31), got ", n_steps);
  const c10::cuda::CUDAGuard guard(seed.device());
  const NoiseSource key = noise_arg(std::nullopt, seed, sample_offset, "noise", seed);
  Tensor out = at::empty({batch}, seed.options().dtype(at::kLong));
  if (batch > 0) launch_sample_t(key.seed, batch, static_cast<uint32_t>(n_steps), key.offset, out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("q_sample", &q_sample);
  m.impl("p_sample_step", &p_sample_step);
  m.impl("mse_per_sample", &mse_per_sample);
  m.impl("mse_per_sample_backward", &mse_per_sample_backward);
  m.impl("sample_t", &sample_t);
}

}  // namespace cuda
}  // namespace fastddpm

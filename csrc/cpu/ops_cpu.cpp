// The CPU implementations of torch.ops.fastddpm: argument checks (every message names the
// argument), contiguous inputs, then one pass of the kernel build chosen for this CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "fastddpm/kernel_math.h"
#include "kernels.h"

namespace fastddpm {
namespace cpu {
namespace {

using at::Tensor;

bool is_float_type(at::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void check_data(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "fastddpm (cpu): ", name, " must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(is_float_type(x.scalar_type()), "fastddpm (cpu): ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "fastddpm (cpu): ", name, " must have a batch dimension (rank >= 1), got a 0-d tensor");
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
  TORCH_CHECK(x->device().is_cpu(), "fastddpm (cpu): ", name, " must be a CPU tensor, got one on ", x->device());
  TORCH_CHECK(x->sizes() == ref.sizes(), "fastddpm (cpu): ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", x->sizes());
  TORCH_CHECK(x->scalar_type() == ref.scalar_type(), "fastddpm (cpu): ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", x->scalar_type());
  return x->contiguous();
}

// A per-t table; all tables of an op have one length n_steps (set by the first).
Table table_arg(const Tensor& tab, const char* name, int64_t& n_steps) {
  TORCH_CHECK(tab.device().is_cpu(), "fastddpm (cpu): ", name, " must be a CPU tensor, got one on ", tab.device());
  TORCH_CHECK(tab.dim() == 1, "fastddpm (cpu): ", name, " must be a 1-D per-t table, got shape ", tab.sizes());
  TORCH_CHECK(tab.scalar_type() == at::kFloat || tab.scalar_type() == at::kDouble, "fastddpm (cpu): ", name,
              " must be float32 or float64, got ", tab.scalar_type());
  TORCH_CHECK(tab.is_contiguous(), "fastddpm (cpu): ", name, " must be contiguous");
  TORCH_CHECK(tab.numel() > 0, "fastddpm (cpu): ", name, " is empty (n_steps must be >= 1)");
  TORCH_CHECK(n_steps < 0 || tab.numel() == n_steps, "fastddpm (cpu): the per-t tables must have one length; ",
              name, " has ", tab.numel(), ", expected ", n_steps);
  n_steps = tab.numel();
  return Table{tab.data_ptr(), tab.scalar_type() == at::kDouble};
}

// The [batch] timesteps, checked to lie in [0, n_steps) (ops.py skips that check under
// torch.compile, so the kernel makes it: B integers, negligible beside the data).
Steps steps_arg(const Tensor& t, int64_t batch, int64_t n_steps) {
  TORCH_CHECK(t.device().is_cpu(), "fastddpm (cpu): t must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "fastddpm (cpu): t must be an int32 or int64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "fastddpm (cpu): t must have shape [", batch,
              "] (one step per sample), got ", t.sizes());
  const Steps steps{t.data_ptr(), t.scalar_type() == at::kLong, batch ? t.stride(0) : 1};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t v = steps.is_int64 ? static_cast<const int64_t*>(steps.data)[b * steps.stride]
                                     : static_cast<const int32_t*>(steps.data)[b * steps.stride];
    TORCH_CHECK(v >= 0 && v < n_steps, "fastddpm (cpu): t must lie in [0, ", n_steps, "), got t[", b, "] = ", v);
  }
  return steps;
}

// The key of the noise stream from seed, or the given noise tensor.
NoiseSource noise_arg(const std::optional<Tensor>& noise, const std::optional<Tensor>& seed, int64_t sample_offset,
                      const char* noise_name) {
  TORCH_CHECK(sample_offset >= 0, "fastddpm (cpu): sample_offset must be >= 0, got ", sample_offset);
  NoiseSource src{nullptr, 0, 0, static_cast<uint64_t>(sample_offset)};
  if (noise.has_value()) {
    src.noise = noise->data_ptr();
    return src;
  }
  TORCH_CHECK(seed.has_value() && seed->defined(), "fastddpm (cpu): seed is required when ", noise_name, " is None");
  TORCH_CHECK(seed->device().is_cpu(), "fastddpm (cpu): seed must be a CPU tensor, got one on ", seed->device());
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "fastddpm (cpu): seed must be a 1-element int64 tensor, got ", seed->scalar_type(), " of shape ",
              seed->sizes());
  const uint64_t key = static_cast<uint64_t>(*seed->data_ptr<int64_t>());
  src.k0 = math::lo32(key);
  src.k1 = math::hi32(key);
  return src;
}

Tensor empty_like_contiguous(const Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

Tensor q_sample(const Tensor& x0_in, const Tensor& t, const Tensor& sqrt_ab, const Tensor& sqrt_1m_ab,
                const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed, int64_t sample_offset) {
  check_data(x0_in, "x0");
  int64_t n_steps = -1;
  const Table a = table_arg(sqrt_ab, "sqrt_ab", n_steps), b = table_arg(sqrt_1m_ab, "sqrt_1m_ab", n_steps);
  const Tensor x0 = x0_in.contiguous();
  const auto noise = like(noise_in, "noise", x0, "x0");
  const Shape shape = shape_of(x0);
  Tensor out = empty_like_contiguous(x0);
  const QSampleArgs args{x0.scalar_type(), shape, x0.data_ptr(), noise_arg(noise, seed, sample_offset, "noise"),
                         steps_arg(t, shape.batch, n_steps), a, b, out.data_ptr()};
  if (out.numel() > 0) kernels().q_sample(args);
  return out;
}

Tensor p_sample_step(const Tensor& x_t_in, const Tensor& eps_in, const Tensor& t, const Tensor& c1, const Tensor& c2,
                     const Tensor& sigma, const std::optional<Tensor>& noise_in, const std::optional<Tensor>& seed,
                     int64_t sample_offset) {
  check_data(x_t_in, "x_t");
  int64_t n_steps = -1;
  const Table tc1 = table_arg(c1, "c1", n_steps), tc2 = table_arg(c2, "c2", n_steps),
              tsg = table_arg(sigma, "sigma", n_steps);
  const Tensor x_t = x_t_in.contiguous();
  const Tensor eps = *like(eps_in, "eps_theta", x_t, "x_t");
  const auto noise = like(noise_in, "noise", x_t, "x_t");
  const Shape shape = shape_of(x_t);
  Tensor out = empty_like_contiguous(x_t);
  const PSampleArgs args{x_t.scalar_type(), shape, x_t.data_ptr(), eps.data_ptr(),
                         noise_arg(noise, seed, sample_offset, "noise"), steps_arg(t, shape.batch, n_steps),
                         tc1, tc2, tsg, out.data_ptr()};
  if (out.numel() > 0) kernels().p_sample_step(args);
  return out;
}

Tensor mse_per_sample(const Tensor& pred_in, const std::optional<Tensor>& target_in, const std::optional<Tensor>& seed,
                      int64_t sample_offset) {
  check_data(pred_in, "pred");
  const Tensor pred = pred_in.contiguous();
  const auto target = like(target_in, "target", pred, "pred");
  const Shape shape = shape_of(pred);
  TORCH_CHECK(shape.batch == 0 || shape.d > 0, "fastddpm (cpu): pred must have at least one element per sample, got shape ",
              pred.sizes());
  Tensor out = at::empty({shape.batch}, pred.options().dtype(acc_type(pred.scalar_type())));
  const MseArgs args{pred.scalar_type(), shape, pred.data_ptr(), noise_arg(target, seed, sample_offset, "target"),
                     out.data_ptr()};
  if (shape.batch > 0) kernels().mse_per_sample(args);
  return out;
}

Tensor mse_per_sample_backward(const Tensor& grad_in, const Tensor& pred_in, const std::optional<Tensor>& target_in,
                               const std::optional<Tensor>& seed, int64_t sample_offset) {
  check_data(pred_in, "pred");
  const Tensor pred = pred_in.contiguous();
  const auto target = like(target_in, "target", pred, "pred");
  const Shape shape = shape_of(pred);
  TORCH_CHECK(grad_in.device().is_cpu(), "fastddpm (cpu): grad must be a CPU tensor, got one on ", grad_in.device());
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == shape.batch, "fastddpm (cpu): grad must have shape [",
              shape.batch, "], got ", grad_in.sizes());
  TORCH_CHECK(is_float_type(grad_in.scalar_type()), "fastddpm (cpu): grad must be a floating tensor, got ",
              grad_in.scalar_type());
  // The incoming grad may be an expanded stride-0 view; read a contiguous copy in acc type.
  const Tensor grad = grad_in.to(acc_type(pred.scalar_type())).contiguous();
  Tensor out = empty_like_contiguous(pred);
  const MseBackwardArgs args{pred.scalar_type(), shape, grad.data_ptr(), pred.data_ptr(),
                             noise_arg(target, seed, sample_offset, "target"), out.data_ptr()};
  if (out.numel() > 0) kernels().mse_per_sample_backward(args);
  return out;
}

Tensor sample_t(const Tensor& seed, int64_t batch, int64_t n_steps, int64_t sample_offset) {
  TORCH_CHECK(batch >= 0, "fastddpm (cpu): batch must be >= 0, got ", batch);
  TORCH_CHECK(n_steps >= 1 && n_steps <= std::numeric_limits<int32_t>::max(),
              "fastddpm (cpu): n_steps must lie in [1, 2**31), got ", n_steps);
  const NoiseSource key = noise_arg(std::nullopt, seed, sample_offset, "noise");
  Tensor out = at::empty({batch}, seed.options().dtype(at::kLong));
  int64_t* t = out.data_ptr<int64_t>();
  // B Philox calls: too little work to be worth threads.
  for (int64_t b = 0; b < batch; ++b) {
    t[b] = math::sample_timestep(key.offset + static_cast<uint64_t>(b), static_cast<uint32_t>(n_steps), key.k0, key.k1);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("q_sample", &q_sample);
  m.impl("p_sample_step", &p_sample_step);
  m.impl("mse_per_sample", &mse_per_sample);
  m.impl("mse_per_sample_backward", &mse_per_sample_backward);
  m.impl("sample_t", &sample_t);
}

}  // namespace cpu
}  // namespace fastddpm

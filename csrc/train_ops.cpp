// The two calls of a training step's diffusion part, each one dispatcher call from Python and
// the loss one autograd node, written once for the CPU and CUDA on the kernels of the other ops:
//
//   train_inputs  the seed (drawn here from the generator unless given), t = sample_t(seed), the
//                 noise (kept only where the caller materialises it: the CPU) and x_t = q_sample
//   mse_loss      sum_b weight[b] mse_b / B, mse_b the per-sample MSE of mse_per_sample (target
//                 the noise) or, given the tables, of target_mse (target cx0[t] x0 + ceps[t] noise)
//
// They replace seven Python-level calls of DenoiseDiffusion.loss (randint, sample_t, normal,
// q_sample, mse_per_sample, mean and their checks) by two, and its three autograd nodes (the
// MSE's, mean's and the model output's cast) by one: at the sizes where host work is the cost
// (a GPU at CIFAR size, the CPU at tiny ones) that is the step's cost.
//
// The seed: on the CPU it is drawn as torch.randint(2**63 - 1, (1,), generator=g) draws it (one
// random64() of the generator, modulo the range; tests compare the two), without a dispatcher
// call; on other devices by that randint itself, which CUDA graphs capture as they capture any
// random op. Under torch.compile the caller draws the seed as an op and passes it (a generator
// is not a traceable argument).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "cpu/ops_cpu.h"         // the CPU ops as functions, mse_per_sample_and_grad
#include "fastddpm/op_checks.h"  // acc_type, is_float_type
#include "fastddpm/op_handles.h"

namespace fastddpm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kSeedRange = INT64_MAX;  // seeds lie in [0, 2**63 - 1), as _checks.draw_seed's

using namespace handles;  // the op accessors (fastddpm/op_handles.h), wants_grad

// ---- train_inputs --------------------------------------------------------------------------

// A fresh seed as a 1-element int64 tensor on `device`, the value torch.randint(2**63 - 1, (1,),
// dtype=torch.int64, generator=generator) gives from the same generator state.
Tensor draw_seed(const at::Device& device, const std::optional<at::Generator>& generator) {
  if (device.is_cpu()) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    uint64_t v = 0;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      v = gen->random64();  // ATen's random_from_to for a range >= 2**28: random64() % range + from
    }
    Tensor seed = at::empty({1}, at::TensorOptions().dtype(at::kLong));
    seed.data_ptr<int64_t>()[0] = static_cast<int64_t>(v % static_cast<uint64_t>(kSeedRange));
    return seed;
  }
  return at::randint(kSeedRange, {1}, generator, at::TensorOptions().dtype(at::kLong).device(device));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> train_inputs(const Tensor& x0, const Tensor& sqrt_ab,
                                                        const Tensor& sqrt_1m_ab, const OptTensor& seed_in,
                                                        std::optional<at::Generator> generator, int64_t sample_offset,
                                                        bool keep_noise) {
  TORCH_CHECK(is_float_type(x0.scalar_type()), "fastddpm::train_inputs: x0 must be float16, bfloat16, float32 or "
              "float64, got ", x0.scalar_type());
  TORCH_CHECK(x0.dim() >= 1, "fastddpm::train_inputs: x0 must have a batch dimension (rank >= 1), got a 0-d tensor");
  TORCH_CHECK(sqrt_ab.dim() == 1, "fastddpm::train_inputs: sqrt_ab must be a 1-D per-t table, got shape ",
              sqrt_ab.sizes());
  // Kept noise in a half type would be rounded, and x_t would differ from the stream's.
  TORCH_CHECK(!keep_noise || x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble,
              "fastddpm::train_inputs: keep_noise needs float32 or float64 x0 (half types regenerate the noise), "
              "got ", x0.scalar_type());
  TORCH_CHECK(!(seed_in.has_value() && generator.has_value()),
              "fastddpm::train_inputs: pass seed or generator, not both");
  const bool drawn = !seed_in.has_value();
  const Tensor seed = drawn ? draw_seed(x0.device(), generator) : *seed_in;
  Tensor t, noise, x_t;
  if (x0.is_cpu()) {  // the CPU key's kernel: real CPU tensors, the CPU ops called directly
    t = cpu::sample_t_cpu(seed, x0.size(0), sqrt_ab.size(0), sample_offset);
    if (keep_noise) noise = cpu::normal_cpu(seed, x0.sizes(), sample_offset, x0.scalar_type());
    x_t = cpu::q_sample_cpu(x0, t, sqrt_ab, sqrt_1m_ab, keep_noise ? OptTensor(noise) : std::nullopt,
                            keep_noise ? std::nullopt : OptTensor(seed), sample_offset);
  } else {
    t = sample_t_op().call(seed, x0.sym_size(0), sqrt_ab.size(0), sample_offset);
    if (keep_noise) noise = normal_op().call(seed, x0.sym_sizes(), sample_offset, x0.scalar_type());
    x_t = q_sample_op().call(x0, t, sqrt_ab, sqrt_1m_ab, keep_noise ? OptTensor(noise) : std::nullopt,
                             keep_noise ? std::nullopt : OptTensor(seed), sample_offset);
  }
  if (!keep_noise) noise = at::empty({0}, x0.options());
  // An output may not alias an input: a given seed is not returned (the caller holds it).
  return {x_t, t, noise, drawn ? seed : at::empty({0}, seed.options())};
}

// No gradient: x0 is the data and the tables the schedule. Asked to record one it says so.
std::tuple<Tensor, Tensor, Tensor, Tensor> train_inputs_autograd(const Tensor& x0, const Tensor& sqrt_ab,
                                                                 const Tensor& sqrt_1m_ab, const OptTensor& seed,
                                                                 std::optional<at::Generator> generator,
                                                                 int64_t sample_offset, bool keep_noise) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !(wants_grad(x0) || wants_grad(sqrt_ab) || wants_grad(sqrt_1m_ab)),
              "fastddpm::train_inputs records no gradient (x0 and the tables must not require grad); use "
              "q_sample for gradients through x_t");
  at::AutoDispatchBelowADInplaceOrView guard;
  return train_inputs_op().call(x0, sqrt_ab, sqrt_1m_ab, seed, std::move(generator), sample_offset, keep_noise);
}

// ---- mse_loss ------------------------------------------------------------------------------

// Which per-sample MSE: target_mse where the tables are given, mse_per_sample where none is.
bool with_tables(const OptTensor& x0, const OptTensor& t, const OptTensor& cx0, const OptTensor& ceps) {
  const int given = x0.has_value() + t.has_value() + cx0.has_value() + ceps.has_value();
  TORCH_CHECK(given == 0 || given == 4, "fastddpm::mse_loss: pass x0, t, cx0 and ceps together (the target cx0[t] "
              "x0 + ceps[t] noise) or none of them (the target is the noise), got ", given, " of them");
  return given == 4;
}

// weight, if given: [B] floating on pred's device, in the acc type.
OptTensor check_weight(const OptTensor& weight, const Tensor& pred) {
  if (!weight.has_value()) return std::nullopt;
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == pred.size(0), "fastddpm::mse_loss: weight must have shape [",
              pred.size(0), "] (one per sample), got ", weight->sizes());
  TORCH_CHECK(is_float_type(weight->scalar_type()), "fastddpm::mse_loss: weight must be a floating tensor, got ",
              weight->scalar_type());
  TORCH_CHECK(weight->device() == pred.device(), "fastddpm::mse_loss: weight is on ", weight->device(),
              " but pred is on ", pred.device());
  return weight->to(acc_type(pred.scalar_type())).contiguous();
}

// mse_loss_backward's per-sample gradient on the CPU: grad_b = g w_b / B ([batch], acc type).
Tensor per_sample_grad_cpu(double g, const OptTensor& weight, int64_t batch, at::ScalarType acc) {
  Tensor out = at::empty({batch}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "fastddpm::mse_loss_backward", [&] {
    const double gb = g / static_cast<double>(batch);
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* w = weight.has_value() ? weight->data_ptr<scalar_t>() : nullptr;
    for (int64_t b = 0; b < batch; ++b) o[b] = static_cast<scalar_t>(w != nullptr ? gb * w[b] : gb);
  });
  return out;
}

// A CPU tensor whose data this file may read itself: not a fake, functional or functorch tensor
// and no dispatch mode active (those go through the dispatcher, as under torch.compile).
bool plain_cpu(const OptTensor& x) {
  if (!x.has_value()) return true;
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
                                            c10::DispatchKey::FuncTorchDynamicLayerBackMode});
  return x->device().is_cpu() && !x->key_set().has_any(wrapped) && x->has_storage();
}

// The sum_b w_b v_b / B of B numbers in order in double: a loop costs less than a reduction op.
Tensor weighted_mean_cpu(const Tensor& per_sample, const OptTensor& weight) {
  const int64_t batch = per_sample.size(0);
  Tensor loss = at::empty({}, per_sample.options());
  AT_DISPATCH_FLOATING_TYPES(per_sample.scalar_type(), "fastddpm::mse_loss", [&] {
    const scalar_t* v = per_sample.data_ptr<scalar_t>();
    const scalar_t* w = weight.has_value() ? weight->data_ptr<scalar_t>() : nullptr;
    double sum = 0.0;
    for (int64_t b = 0; b < batch; ++b) sum += static_cast<double>(w != nullptr ? w[b] * v[b] : v[b]);
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(sum / static_cast<double>(batch));  // NaN for B = 0, as mean
  });
  return loss;
}

Tensor mse_loss(const Tensor& pred, const OptTensor& target, const OptTensor& seed, int64_t sample_offset,
                const OptTensor& weight_in, const OptTensor& x0, const OptTensor& t, const OptTensor& cx0,
                const OptTensor& ceps) {
  TORCH_CHECK(pred.dim() >= 1, "fastddpm::mse_loss: pred must have a batch dimension (rank >= 1), got a 0-d tensor");
  const OptTensor weight = check_weight(weight_in, pred);
  const Tensor per_sample = with_tables(x0, t, cx0, ceps)
                                ? target_mse_op().call(pred, *x0, *t, *cx0, *ceps, target, seed, sample_offset)
                                : mse_op().call(pred, target, seed, sample_offset);
  if (per_sample.is_cpu()) return weighted_mean_cpu(per_sample, weight);
  return weight.has_value() ? (per_sample * *weight).mean() : per_sample.mean();
}

// d/dpred of mse_loss given its gradient (0-d): the per-sample backward with grad_b = grad w_b / B.
Tensor mse_loss_backward(const Tensor& grad, const Tensor& pred, const OptTensor& target, const OptTensor& seed,
                         int64_t sample_offset, const OptTensor& weight_in, const OptTensor& x0, const OptTensor& t,
                         const OptTensor& cx0, const OptTensor& ceps) {
  TORCH_CHECK(pred.dim() >= 1, "fastddpm::mse_loss_backward: pred must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(grad.dim() == 0, "fastddpm::mse_loss_backward: grad must be 0-d (mse_loss's), got shape ", grad.sizes());
  const OptTensor weight = check_weight(weight_in, pred);
  const at::ScalarType acc = acc_type(pred.scalar_type());
  const int64_t batch = pred.size(0);
  Tensor per_sample_grad;
  if (grad.is_cpu() && pred.is_cpu()) {
    per_sample_grad = per_sample_grad_cpu(grad.item<double>(), weight, batch, acc);
  } else {
    const Tensor g = grad.to(acc) / static_cast<double>(batch);
    per_sample_grad = weight.has_value() ? *weight * g : g.expand({batch}).contiguous();
  }
  if (with_tables(x0, t, cx0, ceps)) {
    return target_mse_backward_op().call(per_sample_grad, pred, *x0, *t, *cx0, *ceps, target, seed, sample_offset);
  }
  return mse_backward_op().call(per_sample_grad, pred, target, seed, sample_offset);
}

// grad * g for the gradient mse_loss's forward made, recorded (pred is an input so that the
// result requires grad under create_graph) so that a second derivative is refused, not dropped.
struct ScaledGrad : torch::autograd::Function<ScaledGrad> {
  static Tensor forward(AutogradContext*, const Tensor& grad, const Tensor& g, const Tensor& /*pred*/) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return grad * g;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fastddpm: double backward through mse_loss is not supported; "
                "use backend='reference' for higher-order gradients of the loss");
    return {};
  }
};

// One node: d/dpred only (the target, x0, tables and weights are data, schedule and constants;
// asked for their gradient it says so, and mse_per_sample / target_mse give them).
//
// On the CPU (float32/float64, the noise target) the forward's pass also writes d/dpred for an
// upstream gradient of 1, bit for bit what the backward kernel would write, and saves that
// instead of the target (and pred, an alias, for create_graph's refusal): the backward then
// hands it on (1, the usual loss.backward()) or scales it, and the data is read once, not twice. Where reading data is cheap and
// launches are not (a GPU), the backward kernel recomputes it from the regenerated noise and
// nothing data-sized is made in the forward.
struct MseLoss : torch::autograd::Function<MseLoss> {
  static bool fuses_grad(const Tensor& pred, const OptTensor& target, const OptTensor& seed, const OptTensor& weight,
                         const OptTensor& x0) {
    return !x0.has_value() && (pred.scalar_type() == at::kFloat || pred.scalar_type() == at::kDouble) &&
           plain_cpu(pred) && plain_cpu(target) && plain_cpu(seed) && plain_cpu(weight) &&
           !c10::impl::TorchDispatchModeTLS::any_modes_set();
  }

  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const OptTensor& target, const OptTensor& seed,
                        int64_t sample_offset, const OptTensor& weight_in, const OptTensor& x0, const OptTensor& t,
                        const OptTensor& cx0, const OptTensor& ceps) {
    with_tables(x0, t, cx0, ceps);  // (its check)
    if (fuses_grad(pred, target, seed, weight_in, x0)) {
      at::AutoDispatchBelowADInplaceOrView guard;
      TORCH_CHECK(pred.dim() >= 1, "fastddpm::mse_loss: pred must have a batch dimension (rank >= 1), got a 0-d "
                  "tensor");
      const OptTensor weight = check_weight(weight_in, pred);
      const Tensor scale = per_sample_grad_cpu(1.0, weight, pred.size(0), acc_type(pred.scalar_type()));
      auto [per_sample, grad] = cpu::mse_per_sample_and_grad(pred, target, seed, sample_offset, scale);
      ctx->saved_data["fused_grad"] = true;
      ctx->save_for_backward({grad, pred});  // pred: no memory (the caller's), for create_graph
      return weighted_mean_cpu(per_sample, weight);
    }
    const OptTensor& weight = weight_in;
    ctx->saved_data["offset"] = sample_offset;
    // Generated noise is not saved: the backward draws it again from the 8-byte seed.
    ctx->save_for_backward({pred, target.value_or(Tensor()), seed.value_or(Tensor()), weight.value_or(Tensor()),
                            x0.value_or(Tensor()), t.value_or(Tensor()), cx0.value_or(Tensor()),
                            ceps.value_or(Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return mse_loss_op().call(pred, target, seed, sample_offset, weight, x0, t, cx0, ceps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    variable_list out(9);
    if (ctx->saved_data.count("fused_grad")) {
      const Tensor& g = grads[0];
      if (at::GradMode::is_enabled()) {  // create_graph: a gradient whose own derivative is refused
        out[0] = ScaledGrad::apply(s[0], g, s[1]);
      } else if (plain_cpu(g) && g.numel() == 1 && g.scalar_type() == s[0].scalar_type() &&
                 (g.scalar_type() == at::kFloat ? *g.const_data_ptr<float>() == 1.0f
                                                : *g.const_data_ptr<double>() == 1.0)) {
        out[0] = s[0];  // the forward's gradient as it is
      } else {
        out[0] = s[0] * g;
      }
      return out;
    }
    auto opt = [](const Tensor& x) { return x.defined() ? OptTensor(x) : std::nullopt; };
    out[0] = mse_loss_backward_op().call(grads[0], s[0], opt(s[1]), opt(s[2]), ctx->saved_data["offset"].toInt(),
                                         opt(s[3]), opt(s[4]), opt(s[5]), opt(s[6]), opt(s[7]));
    return out;
  }
};

Tensor mse_loss_autograd(const Tensor& pred, const OptTensor& target, const OptTensor& seed, int64_t sample_offset,
                         const OptTensor& weight, const OptTensor& x0, const OptTensor& t, const OptTensor& cx0,
                         const OptTensor& ceps) {
  if (at::GradMode::is_enabled()) {
    const char* other = wants_grad(target) ? "target" : wants_grad(weight) ? "weight" : wants_grad(x0) ? "x0"
                        : wants_grad(cx0) ? "cx0" : wants_grad(ceps) ? "ceps" : nullptr;
    TORCH_CHECK(other == nullptr, "fastddpm::mse_loss differentiates pred only, but ", other, " requires grad; "
                "use mse_per_sample or target_mse (then a mean) for its gradient");
    if (wants_grad(pred)) return MseLoss::apply(pred, target, seed, sample_offset, weight, x0, t, cx0, ceps);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return mse_loss_op().call(pred, target, seed, sample_offset, weight, x0, t, cx0, ceps);
}

// As the other backward ops: no double backward, said plainly.
struct MseLossBackward : torch::autograd::Function<MseLossBackward> {
  static Tensor forward(AutogradContext*, const Tensor& grad, const Tensor& pred, const OptTensor& target,
                        const OptTensor& seed, int64_t sample_offset, const OptTensor& weight, const OptTensor& x0,
                        const OptTensor& t, const OptTensor& cx0, const OptTensor& ceps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mse_loss_backward_op().call(grad, pred, target, seed, sample_offset, weight, x0, t, cx0, ceps);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fastddpm: double backward through mse_loss is not supported; "
                "use backend='reference' for higher-order gradients of the loss");
    return {};
  }
};

Tensor mse_loss_backward_autograd(const Tensor& grad, const Tensor& pred, const OptTensor& target,
                                  const OptTensor& seed, int64_t sample_offset, const OptTensor& weight,
                                  const OptTensor& x0, const OptTensor& t, const OptTensor& cx0, const OptTensor& ceps) {
  if (at::GradMode::is_enabled() && (wants_grad(grad) || wants_grad(pred))) {
    return MseLossBackward::apply(grad, pred, target, seed, sample_offset, weight, x0, t, cx0, ceps);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return mse_loss_backward_op().call(grad, pred, target, seed, sample_offset, weight, x0, t, cx0, ceps);
}

}  // namespace

// One implementation, registered for each device key (not CompositeExplicitAutograd, which
// would also serve Meta and so fake tensors: those get the fake kernels of fastddpm._autograd).
// A CPU-only build registers the CUDA kernels too; nothing calls them without CUDA tensors.
#define FASTDDPM_TRAIN_OPS(key)                         \
  TORCH_LIBRARY_IMPL(fastddpm, key, m) {                \
    m.impl("train_inputs", &train_inputs);              \
    m.impl("mse_loss", &mse_loss);                      \
    m.impl("mse_loss_backward", &mse_loss_backward);    \
  }
FASTDDPM_TRAIN_OPS(CPU)
FASTDDPM_TRAIN_OPS(CUDA)
#undef FASTDDPM_TRAIN_OPS

TORCH_LIBRARY_IMPL(fastddpm, Autograd, m) {
  m.impl("train_inputs", &train_inputs_autograd);
  m.impl("mse_loss", &mse_loss_autograd);
  m.impl("mse_loss_backward", &mse_loss_backward_autograd);
}

}  // namespace fastddpm

// The autograd formulas of torch.ops.fastddpm, one registration for the Autograd key that
// serves the CPU and the CUDA kernels alike. Each op is a torch::autograd::Function whose
// forward redispatches below autograd to the device kernel (or, under torch.compile, to the
// fake kernel) and whose backward is compiled ops and plain ATen ops, so AOTAutograd traces it.
// Being C++, it costs a call a fraction of what a Python register_autograd kernel does, and a
// call that records nothing (no input requires grad) skips the Function altogether.
//
// Every input of a floating dtype gets its gradient, the per-t tables included: d/d table[s]
// is the sum over the samples b with t[b] = s of sum_j(g * the factor it multiplies).
// Generated noise (noise/target None) is never saved: a backward that needs it draws it again
// from the 8-byte seed. Forward-mode AD is not implemented; it raises (see check_no_forward_ad).
//
// The ops (each table gathered by t per sample, as the kernels do):
//   q_sample       x_t = sqrt_ab[t] x0 + sqrt_1m_ab[t] noise
//   p_sample_step  x_prev = c1[t] x_t - c2[t] eps_theta + sigma[t] noise
//   mse            d/dpred = mse_per_sample_backward(g, ...), d/dtarget = -d/dpred
//   target_mse     target = cx0[t] x0 + ceps[t] noise; d/dpred = target_mse_backward(g, ...) = gp,
//                  d/dx0 = -cx0[t] gp, d/dnoise = -ceps[t] gp (and the tables')
//   solver_step    no backward (clamps and thresholds are sampling steps): it refuses to record
//   vlb_loss       d/dout = vlb_loss_backward(g, ...); differentiable in out only: it refuses to
//                  record when x0, tables or noise require grad
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "fastddpm/op_checks.h"  // acc_type
#include "fastddpm/op_handles.h"

namespace fastddpm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using namespace handles;  // the op accessors, wants_grad

// The ops are called through the dispatcher (fastddpm/op_handles.h).

// ---- helpers -------------------------------------------------------------------------------

// A C++ autograd::Function has no forward-mode formula and PyTorch's own error for that points
// at PyTorch; say which op it is and what to use instead.
void check_no_forward_ad(const char* op_name, c10::ArrayRef<const Tensor*> inputs) {
  for (const Tensor* x : inputs) {
    if (x == nullptr || !x->defined()) continue;
    const auto* meta = torch::autograd::impl::get_autograd_meta(*x);
    TORCH_CHECK(meta == nullptr || !meta->fw_grad_ || meta->fw_grad_->empty(), "fastddpm: ", op_name,
                " on the cpu and cuda backends has no forward-mode AD (torch.func.jvp, torch.autograd.forward_ad); "
                "use backend='reference' for it");
  }
}

const Tensor* ptr(const OptTensor& x) { return x.has_value() ? &*x : nullptr; }


// Whether the op must be recorded for backward: grad mode on and some differentiable input
// requiring grad. Otherwise the kernels skip Function::apply (its node and saved variables) and
// redispatch below autograd directly: most of the cost of a call at small sizes.
bool records(c10::ArrayRef<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* x : inputs) {
    if (x != nullptr && wants_grad(*x)) return true;
  }
  return false;
}

// table[t] in `dtype`, shaped [B, 1, ..., 1] to broadcast against `like`.
Tensor gather(const Tensor& table, const Tensor& t, const Tensor& like, at::ScalarType dtype) {
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = -1;
  return table.index_select(0, t).to(dtype).view(shape);
}

// d/dx of T[t] * x given the output grad g: g * T[t], in the data's dtype (computed in acc).
Tensor data_grad(const Tensor& g, const Tensor& table, const Tensor& t, at::ScalarType dtype, double sign = 1.0) {
  const at::ScalarType acc = acc_type(dtype);
  Tensor r = g.to(acc) * gather(table, t, g, acc);
  if (sign != 1.0) r = r.neg();
  return r.to(dtype);
}

// d/dtable of table[t] * x given g: index_add over t of each sample's sum(g * x), in acc, then
// in the table's dtype.
Tensor table_grad(const Tensor& g, const Tensor& x, const Tensor& table, const Tensor& t, double sign = 1.0) {
  const at::ScalarType acc = acc_type(g.scalar_type());
  const Tensor prod = g.to(acc) * x.to(acc);
  Tensor per_sample = prod.dim() > 1 ? prod.flatten(1).sum(1) : prod;
  if (sign != 1.0) per_sample = per_sample.neg();
  return at::zeros_like(table).index_add(0, t, per_sample.to(table.scalar_type()));
}

// The noise an op used: the given tensor, or the stream of (seed, offset) drawn again by the
// normal op, in the acc type (the kernels draw float32 normals whatever the data dtype).
Tensor noise_of(const Tensor& noise, const Tensor& seed, int64_t offset, const Tensor& like) {
  if (noise.defined()) return noise;
  return normal_op().call(seed, like.sym_sizes(), offset, acc_type(like.scalar_type()));
}

OptTensor opt(const Tensor& x) { return x.defined() ? OptTensor(x) : std::nullopt; }

// Which inputs need a gradient, as a bit mask kept in saved_data (the edges of optional inputs
// that are None do not exist, so needs_input_grad's indices would shift).
int64_t grad_mask(std::initializer_list<bool> wants) {
  int64_t mask = 0, bit = 1;
  for (bool w : wants) {
    if (w) mask |= bit;
    bit <<= 1;
  }
  return mask;
}
bool needs(const AutogradContext* ctx, int i) { return (ctx->saved_data.at("mask").toInt() >> i) & 1; }

// ---- q_sample ------------------------------------------------------------------------------

struct QSample : torch::autograd::Function<QSample> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x0, const Tensor& t, const Tensor& sqrt_ab,
                        const Tensor& sqrt_1m_ab, const OptTensor& noise, const OptTensor& seed, int64_t offset) {
    // x0, sqrt_ab, sqrt_1m_ab, noise
    const int64_t mask = grad_mask({wants_grad(x0), wants_grad(sqrt_ab), wants_grad(sqrt_1m_ab), wants_grad(noise)});
    ctx->saved_data["mask"] = mask;
    ctx->saved_data["offset"] = offset;
    // Only what the requested gradients need: no tensor of the data's size unless a table's.
    const bool tab_a = mask & 2, tab_b = mask & 4;
    ctx->save_for_backward({t, sqrt_ab, sqrt_1m_ab, tab_a ? x0 : Tensor(),
                            tab_b ? noise.value_or(Tensor()) : Tensor(), tab_b ? seed.value_or(Tensor()) : Tensor()});
    at::AutoDispatchBelowADInplaceOrView guard;
    return q_sample_op().call(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &t = s[0], &sa = s[1], &sb = s[2];
    const Tensor& g = grads[0];
    const at::ScalarType dtype = g.scalar_type();
    variable_list out(7);
    if (needs(ctx, 0)) out[0] = data_grad(g, sa, t, dtype);
    if (needs(ctx, 1)) out[2] = table_grad(g, s[3], sa, t);
    if (needs(ctx, 2)) {
      out[3] = table_grad(g, noise_of(s[4], s[5], ctx->saved_data["offset"].toInt(), g), sb, t);
    }
    if (needs(ctx, 3)) out[4] = data_grad(g, sb, t, dtype);
    return out;
  }
};

Tensor q_sample(const Tensor& x0, const Tensor& t, const Tensor& sqrt_ab, const Tensor& sqrt_1m_ab,
                const OptTensor& noise, const OptTensor& seed, int64_t offset) {
  const std::initializer_list<const Tensor*> diff{&x0, &sqrt_ab, &sqrt_1m_ab, ptr(noise)};
  check_no_forward_ad("q_sample", diff);
  if (records(diff)) return QSample::apply(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, offset);
  at::AutoDispatchBelowADInplaceOrView guard;
  return q_sample_op().call(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, offset);
}

// ---- p_sample_step -------------------------------------------------------------------------

struct PSampleStep : torch::autograd::Function<PSampleStep> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_t, const Tensor& eps, const Tensor& t, const Tensor& c1,
                        const Tensor& c2, const Tensor& sigma, const OptTensor& noise, const OptTensor& seed,
                        int64_t offset) {
    // x_t, eps_theta, c1, c2, sigma, noise
    const int64_t mask = grad_mask({wants_grad(x_t), wants_grad(eps), wants_grad(c1), wants_grad(c2),
                                    wants_grad(sigma), wants_grad(noise)});
    ctx->saved_data["mask"] = mask;
    ctx->saved_data["offset"] = offset;
    const bool tab_sigma = mask & 16;
    ctx->save_for_backward({t, c1, c2, sigma, (mask & 4) ? x_t : Tensor(), (mask & 8) ? eps : Tensor(),
                            tab_sigma ? noise.value_or(Tensor()) : Tensor(),
                            tab_sigma ? seed.value_or(Tensor()) : Tensor()});
    at::AutoDispatchBelowADInplaceOrView guard;
    return p_sample_step_op().call(x_t, eps, t, c1, c2, sigma, noise, seed, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &t = s[0], &c1 = s[1], &c2 = s[2], &sigma = s[3];
    const Tensor& g = grads[0];
    const at::ScalarType dtype = g.scalar_type();
    variable_list out(9);
    if (needs(ctx, 0)) out[0] = data_grad(g, c1, t, dtype);
    if (needs(ctx, 1)) out[1] = data_grad(g, c2, t, dtype, -1.0);
    if (needs(ctx, 2)) out[3] = table_grad(g, s[4], c1, t);
    if (needs(ctx, 3)) out[4] = table_grad(g, s[5], c2, t, -1.0);
    if (needs(ctx, 4)) {
      out[5] = table_grad(g, noise_of(s[6], s[7], ctx->saved_data["offset"].toInt(), g), sigma, t);
    }
    if (needs(ctx, 5)) out[6] = data_grad(g, sigma, t, dtype);
    return out;
  }
};

Tensor p_sample_step(const Tensor& x_t, const Tensor& eps, const Tensor& t, const Tensor& c1, const Tensor& c2,
                     const Tensor& sigma, const OptTensor& noise, const OptTensor& seed, int64_t offset) {
  const std::initializer_list<const Tensor*> diff{&x_t, &eps, &c1, &c2, &sigma, ptr(noise)};
  check_no_forward_ad("p_sample_step", diff);
  if (records(diff)) return PSampleStep::apply(x_t, eps, t, c1, c2, sigma, noise, seed, offset);
  at::AutoDispatchBelowADInplaceOrView guard;
  return p_sample_step_op().call(x_t, eps, t, c1, c2, sigma, noise, seed, offset);
}

// ---- mse_per_sample ------------------------------------------------------------------------

struct MsePerSample : torch::autograd::Function<MsePerSample> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const OptTensor& target, const OptTensor& seed,
                        int64_t offset) {
    ctx->saved_data["mask"] = grad_mask({wants_grad(pred), wants_grad(target)});
    ctx->saved_data["offset"] = offset;
    // With target None only the 8-byte seed is saved besides pred: the backward regenerates the
    // noise instead of storing it.
    ctx->save_for_backward({pred, target.value_or(Tensor()), seed.value_or(Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return mse_op().call(pred, target, seed, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // The incoming grad may be an expanded stride-0 view (after .mean()/.sum()).
    const Tensor g_pred = mse_backward_op().call(grads[0].contiguous(), s[0], opt(s[1]), opt(s[2]),
                                                 ctx->saved_data["offset"].toInt());
    variable_list out(4);
    if (needs(ctx, 0)) out[0] = g_pred;
    if (needs(ctx, 1)) out[1] = g_pred.neg();
    return out;
  }
};

Tensor mse_per_sample(const Tensor& pred, const OptTensor& target, const OptTensor& seed, int64_t offset) {
  const std::initializer_list<const Tensor*> diff{&pred, ptr(target)};
  check_no_forward_ad("mse_per_sample", diff);
  if (records(diff)) return MsePerSample::apply(pred, target, seed, offset);
  at::AutoDispatchBelowADInplaceOrView guard;
  return mse_op().call(pred, target, seed, offset);
}

// The backward op is differentiable only in name: it says so when asked for a double backward
// (PyTorch's fallback would warn that a missing formula "may lead to silently incorrect
// behavior").
struct MseBackward : torch::autograd::Function<MseBackward> {
  static Tensor forward(AutogradContext*, const Tensor& grad, const Tensor& pred, const OptTensor& target,
                        const OptTensor& seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mse_backward_op().call(grad, pred, target, seed, offset);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fastddpm: double backward through mse_per_sample is not supported; "
                "use backend='reference' for higher-order gradients of the loss");
    return {};
  }
};

Tensor mse_per_sample_backward(const Tensor& grad, const Tensor& pred, const OptTensor& target, const OptTensor& seed,
                               int64_t offset) {
  const std::initializer_list<const Tensor*> diff{&grad, &pred, ptr(target)};
  check_no_forward_ad("mse_per_sample_backward", diff);
  if (records(diff)) return MseBackward::apply(grad, pred, target, seed, offset);
  at::AutoDispatchBelowADInplaceOrView guard;
  return mse_backward_op().call(grad, pred, target, seed, offset);
}

// ---- target_mse ----------------------------------------------------------------------------

struct TargetMse : torch::autograd::Function<TargetMse> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& x0, const Tensor& t, const Tensor& cx0,
                        const Tensor& ceps, const OptTensor& noise, const OptTensor& seed, int64_t offset) {
    // pred, x0, cx0, ceps, noise
    ctx->saved_data["mask"] = grad_mask({wants_grad(pred), wants_grad(x0), wants_grad(cx0), wants_grad(ceps),
                                         wants_grad(noise)});
    ctx->saved_data["offset"] = offset;
    // Every gradient is a multiple of d/dpred, which needs all the inputs; generated noise is
    // not among them: the backward draws it again from the seed.
    ctx->save_for_backward({pred, x0, t, cx0, ceps, noise.value_or(Tensor()), seed.value_or(Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return target_mse_op().call(pred, x0, t, cx0, ceps, noise, seed, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &pred = s[0], &x0 = s[1], &t = s[2], &cx0 = s[3], &ceps = s[4], &noise = s[5], &seed = s[6];
    const int64_t offset = ctx->saved_data["offset"].toInt();
    // The incoming grad may be an expanded stride-0 view (after .mean()/.sum()).
    const Tensor gp = target_mse_backward_op().call(grads[0].contiguous(), pred, x0, t, cx0, ceps, opt(noise),
                                                    opt(seed), offset);
    const at::ScalarType dtype = gp.scalar_type();
    variable_list out(8);
    if (needs(ctx, 0)) out[0] = gp;
    if (needs(ctx, 1)) out[1] = data_grad(gp, cx0, t, dtype, -1.0);
    if (needs(ctx, 2)) out[3] = table_grad(gp, x0, cx0, t, -1.0);
    if (needs(ctx, 3)) out[4] = table_grad(gp, noise_of(noise, seed, offset, gp), ceps, t, -1.0);
    if (needs(ctx, 4)) out[5] = data_grad(gp, ceps, t, dtype, -1.0);
    return out;
  }
};

Tensor target_mse(const Tensor& pred, const Tensor& x0, const Tensor& t, const Tensor& cx0, const Tensor& ceps,
                  const OptTensor& noise, const OptTensor& seed, int64_t offset) {
  const std::initializer_list<const Tensor*> diff{&pred, &x0, &cx0, &ceps, ptr(noise)};
  check_no_forward_ad("target_mse", diff);
  if (records(diff)) return TargetMse::apply(pred, x0, t, cx0, ceps, noise, seed, offset);
  at::AutoDispatchBelowADInplaceOrView guard;
  return target_mse_op().call(pred, x0, t, cx0, ceps, noise, seed, offset);
}

// As MseBackward: no double backward, said plainly.
struct TargetMseBackward : torch::autograd::Function<TargetMseBackward> {
  static Tensor forward(AutogradContext*, const Tensor& grad, const Tensor& pred, const Tensor& x0, const Tensor& t,
                        const Tensor& cx0, const Tensor& ceps, const OptTensor& noise, const OptTensor& seed,
                        int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return target_mse_backward_op().call(grad, pred, x0, t, cx0, ceps, noise, seed, offset);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fastddpm: double backward through target_mse is not supported; "
                "use backend='reference' for higher-order gradients of the loss");
    return {};
  }
};

Tensor target_mse_backward(const Tensor& grad, const Tensor& pred, const Tensor& x0, const Tensor& t,
                           const Tensor& cx0, const Tensor& ceps, const OptTensor& noise, const OptTensor& seed,
                           int64_t offset) {
  const std::initializer_list<const Tensor*> diff{&grad, &pred, &x0, &cx0, &ceps, ptr(noise)};
  check_no_forward_ad("target_mse_backward", diff);
  if (records(diff)) return TargetMseBackward::apply(grad, pred, x0, t, cx0, ceps, noise, seed, offset);
  at::AutoDispatchBelowADInplaceOrView guard;
  return target_mse_backward_op().call(grad, pred, x0, t, cx0, ceps, noise, seed, offset);
}

// ---- solver_step ---------------------------------------------------------------------------

// No backward: the clamp and the thresholding make it a sampling step. Asked to record one, it
// says so rather than returning a result whose gradient would silently be missing.
Tensor solver_step(const Tensor& x, const Tensor& out, const OptTensor& out_cond, at::TensorList history,
                   const Tensor& t, const Tensor& coef, const OptTensor& bound, double clip, double guidance,
                   const OptTensor& noise, const OptTensor& seed, int64_t offset, const OptTensor& var) {
  std::vector<const Tensor*> diff{&x, &out, ptr(out_cond), &coef, ptr(bound), ptr(noise), ptr(var)};
  for (const Tensor& h : history) diff.push_back(&h);
  check_no_forward_ad("solver_step", diff);
  TORCH_CHECK(!records(diff), "fastddpm: solver_step on the cpu and cuda backends has no backward (clipping and "
              "thresholding are sampling steps); run it under torch.no_grad(), or use backend='reference' for "
              "gradients");
  at::AutoDispatchBelowADInplaceOrView guard;
  return solver_step_op().call(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, offset, var);
}

// ---- vlb_loss ------------------------------------------------------------------------------

// Differentiable in out only (x0, the tables and the noise are data and schedule): the forward
// saves its inputs, nothing new of the data's size (generated noise is drawn again from the
// seed by the backward kernel itself).
struct VlbLoss : torch::autograd::Function<VlbLoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x0, const Tensor& out, const Tensor& t,
                        const Tensor& tables, const OptTensor& noise, const OptTensor& seed, int64_t offset,
                        int64_t mean_type, int64_t variance_type, bool detach_mean) {
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["mean_type"] = mean_type;
    ctx->saved_data["variance_type"] = variance_type;
    ctx->saved_data["detach_mean"] = detach_mean;
    ctx->save_for_backward({x0, out, t, tables, noise.value_or(Tensor()), seed.value_or(Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return vlb_loss_op().call(x0, out, t, tables, noise, seed, offset, mean_type, variance_type, detach_mean);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &x0 = s[0], &out = s[1], &t = s[2], &tables = s[3], &noise = s[4], &seed = s[5];
    // The incoming grad may be an expanded stride-0 view (after .mean()/.sum()).
    const Tensor g = vlb_loss_backward_op().call(
        grads[0].contiguous(), x0, out, t, tables, opt(noise), opt(seed), ctx->saved_data["offset"].toInt(),
        ctx->saved_data["mean_type"].toInt(), ctx->saved_data["variance_type"].toInt(),
        ctx->saved_data["detach_mean"].toBool());
    variable_list result(10);
    result[1] = g;
    return result;
  }
};

Tensor vlb_loss(const Tensor& x0, const Tensor& out, const Tensor& t, const Tensor& tables, const OptTensor& noise,
                const OptTensor& seed, int64_t offset, int64_t mean_type, int64_t variance_type, bool detach_mean) {
  const std::initializer_list<const Tensor*> diff{&x0, &out, &tables, ptr(noise)};
  check_no_forward_ad("vlb_loss", diff);
  if (records(diff)) {
    TORCH_CHECK(!wants_grad(x0) && !wants_grad(tables) && !wants_grad(noise),
                "fastddpm: vlb_loss differentiates out only (the model output); x0, tables and noise must not "
                "require grad (got ",
                wants_grad(x0) ? "x0" : (wants_grad(tables) ? "tables" : "noise"),
                " requiring grad): detach them, or use backend='reference' for their gradients");
    return VlbLoss::apply(x0, out, t, tables, noise, seed, offset, mean_type, variance_type, detach_mean);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return vlb_loss_op().call(x0, out, t, tables, noise, seed, offset, mean_type, variance_type, detach_mean);
}

// No double backward, said plainly.
struct VlbLossBackward : torch::autograd::Function<VlbLossBackward> {
  static Tensor forward(AutogradContext*, const Tensor& grad, const Tensor& x0, const Tensor& out, const Tensor& t,
                        const Tensor& tables, const OptTensor& noise, const OptTensor& seed, int64_t offset,
                        int64_t mean_type, int64_t variance_type, bool detach_mean) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return vlb_loss_backward_op().call(grad, x0, out, t, tables, noise, seed, offset, mean_type, variance_type,
                                       detach_mean);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fastddpm: double backward through vlb_loss is not supported; "
                "use backend='reference' for higher-order gradients of the loss");
    return {};
  }
};

Tensor vlb_loss_backward(const Tensor& grad, const Tensor& x0, const Tensor& out, const Tensor& t,
                         const Tensor& tables, const OptTensor& noise, const OptTensor& seed, int64_t offset,
                         int64_t mean_type, int64_t variance_type, bool detach_mean) {
  const std::initializer_list<const Tensor*> diff{&grad, &x0, &out, &tables, ptr(noise)};
  check_no_forward_ad("vlb_loss_backward", diff);
  if (records(diff)) {
    return VlbLossBackward::apply(grad, x0, out, t, tables, noise, seed, offset, mean_type, variance_type,
                                  detach_mean);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return vlb_loss_backward_op().call(grad, x0, out, t, tables, noise, seed, offset, mean_type, variance_type,
                                     detach_mean);
}

}  // namespace

// sample_t and normal have no differentiable input and keep PyTorch's fallback.
TORCH_LIBRARY_IMPL(fastddpm, Autograd, m) {
  m.impl("q_sample", &q_sample).impl("p_sample_step", &p_sample_step);
  m.impl("mse_per_sample", &mse_per_sample).impl("mse_per_sample_backward", &mse_per_sample_backward);
  m.impl("target_mse", &target_mse).impl("target_mse_backward", &target_mse_backward);
  m.impl("solver_step", &solver_step);
  m.impl("vlb_loss", &vlb_loss).impl("vlb_loss_backward", &vlb_loss_backward);
}

}  // namespace fastddpm

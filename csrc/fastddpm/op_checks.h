// The argument checks of the ops, one definition for the CPU (csrc/cpu/ops_cpu.cpp) and the
// CUDA (csrc/cuda/ops_cuda.cu) host code, which check the same things with the same messages
// ("fastddpm (<backend>): <argument> ..."; the tests match them). Host code only, compiled by
// the host compiler under g++ and nvcc alike: not for the kernel sources.
//
// Where the backends differ, OpChecks branches on its device type:
//  - the device: the CPU ops want each tensor on the CPU ("x must be a CPU tensor"); the CUDA
//    ops want the data on a CUDA device and every other tensor on the data's device;
//  - nothing here reads t or the seed: the CPU ops do that themselves (ops_cpu.cpp), while on
//    CUDA it would cost a host sync (and break CUDA graphs), so the kernels do it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "fastddpm/op_args.h"

namespace fastddpm {

inline bool is_float_type(at::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// The type the kernels accumulate (and the MSE returns) in.
inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// [batch, elements per sample] of a batch-first tensor (also when the batch is empty).
inline Shape shape_of(const at::Tensor& x) {
  int64_t d = 1;
  for (int64_t i = 1; i < x.dim(); ++i) d *= x.size(i);
  return Shape{x.size(0), d};
}

inline at::Tensor empty_like_contiguous(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

// solver_step's inputs as OpChecks::solver_args leaves them: the tensors the kernel reads, kept
// alive (contiguous), the output y ([R, *x.shape], contiguous, uninitialised) and the kernel's
// arguments pointing into them. args.t and args.noise are as steps() and noise() make them.
struct SolverInputs {
  at::Tensor x, out, coef, keep_bound, y;
  std::optional<at::Tensor> out_cond, noise;
  at::Tensor history[kSolverHistory];
  std::optional<at::Tensor> var;
  SolverStepArgs args{};
};

// vlb_loss's (and its backward's) inputs as OpChecks::vlb_args leaves them: the tensors the
// kernel reads, kept alive (contiguous), the output y (uninitialised) and the kernel's arguments
// pointing into them; args.t and args.noise as steps() and noise() make them.
struct VlbInputs {
  at::Tensor x0, out, tables, grad, y;
  std::optional<at::Tensor> noise;
  VlbArgs args{};
};

// The checks of one backend's ops: `device` is the backend's device type, `prefix` starts every
// message ("fastddpm (cpu): ").
struct OpChecks {
  c10::DeviceType device;
  const char* prefix;

  bool on_cpu() const { return device == c10::DeviceType::CPU; }

  // x lives on the backend's device type.
  void device_type(const at::Tensor& x, const char* name) const {
    TORCH_CHECK(x.device().type() == device, prefix, name, " must be a ", c10::DeviceTypeName(device),
                " tensor, got one on ", x.device());
  }

  // x lives on the device of the data, ref (itself checked by data()). On the CPU that is the
  // device type check, with its message.
  void same_device(const at::Tensor& x, const char* name, const at::Tensor& ref, const char* ref_name) const {
    if (on_cpu()) {
      device_type(x, name);
      return;
    }
    TORCH_CHECK(x.device() == ref.device(), prefix, name, " is on ", x.device(), " but ", ref_name, " is on ",
                ref.device());
  }

  // The op's data tensor: the backend's device, a float dtype, a batch dimension.
  void data(const at::Tensor& x, const char* name) const {
    device_type(x, name);
    TORCH_CHECK(is_float_type(x.scalar_type()), prefix, name, " must be float16, bfloat16, float32 or float64, got ",
                x.scalar_type());
    TORCH_CHECK(x.dim() >= 1, prefix, name, " must have a batch dimension (rank >= 1), got a 0-d tensor");
  }

  // An optional tensor that must match ref in shape, dtype and device; returned contiguous.
  std::optional<at::Tensor> like(const std::optional<at::Tensor>& x, const char* name, const at::Tensor& ref,
                                 const char* ref_name) const {
    if (!x.has_value() || !x->defined()) return std::nullopt;
    same_device(*x, name, ref, ref_name);
    TORCH_CHECK(x->sizes() == ref.sizes(), prefix, name, " must have the shape of ", ref_name, " ", ref.sizes(),
                ", got ", x->sizes());
    TORCH_CHECK(x->scalar_type() == ref.scalar_type(), prefix, name, " must have the dtype of ", ref_name, " (",
                ref.scalar_type(), "), got ", x->scalar_type());
    return x->contiguous();
  }

  // A per-t table, kept alive (contiguous) in `keep`: a strided one is copied, which is cheap
  // (n_steps numbers); all tables of an op have one length n_steps (set by the first, -1
  // before it).
  Table table(const at::Tensor& tab, const char* name, const at::Tensor& ref, const char* ref_name,
              int64_t& n_steps, at::Tensor& keep) const {
    same_device(tab, name, ref, ref_name);
    TORCH_CHECK(tab.dim() == 1, prefix, name, " must be a 1-D per-t table, got shape ", tab.sizes());
    TORCH_CHECK(tab.scalar_type() == at::kFloat || tab.scalar_type() == at::kDouble, prefix, name,
                " must be float32 or float64, got ", tab.scalar_type());
    TORCH_CHECK(tab.numel() > 0, prefix, name, " is empty (n_steps must be >= 1)");
    TORCH_CHECK(n_steps < 0 || tab.numel() == n_steps, prefix, "the per-t tables must have one length; ", name,
                " has ", tab.numel(), ", expected ", n_steps);
    n_steps = tab.numel();
    keep = tab.contiguous();
    return Table{keep.data_ptr(), keep.scalar_type() == at::kDouble};
  }

  // The [batch] timesteps; their range is not checked here (see the top).
  Steps steps(const at::Tensor& t, const at::Tensor& ref, int64_t batch, int64_t n_steps) const {
    same_device(t, "t", ref, "the data");
    TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, prefix,
                "t must be an int32 or int64 tensor, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, prefix, "t must have shape [", batch,
                "] (one step per sample), got ", t.sizes());
    return Steps{t.data_ptr(), t.scalar_type() == at::kLong, batch ? t.stride(0) : 1, n_steps};
  }

  // The given noise tensor, or the seed of the generated stream, which is not read here (see
  // the top and NoiseSource): k0 and k1 are left 0.
  NoiseSource noise(const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                    int64_t sample_offset, const char* noise_name, const at::Tensor& ref) const {
    TORCH_CHECK(sample_offset >= 0, prefix, "sample_offset must be >= 0, got ", sample_offset);
    NoiseSource src{nullptr, nullptr, 0, 0, static_cast<uint64_t>(sample_offset), false};
    if (noise.has_value()) {
      src.has_noise = true;
      src.noise = noise->data_ptr();
      return src;
    }
    TORCH_CHECK(seed.has_value() && seed->defined(), prefix, "seed is required when ", noise_name, " is None");
    same_device(*seed, "seed", ref, "the data");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, prefix,
                "seed must be a 1-element int64 tensor, got ", seed->scalar_type(), " of shape ", seed->sizes());
    src.seed = seed->data_ptr<int64_t>();  // one element: any stride reads it
    return src;
  }

  // solver_step's per-sample thresholding bound ([batch], float32 or float64; kept contiguous
  // in `keep`), or Table{nullptr} when None; and its scalars: clip > 0 (inf: none) and not
  // together with a bound, guidance finite. The bound's values are not read here (see the top).
  // ref_name names the data in the device message.
  Table clip_args(const std::optional<at::Tensor>& bound, double clip, double guidance, const at::Tensor& ref,
                  int64_t batch, at::Tensor& keep, const char* ref_name = "x_t") const {
    TORCH_CHECK(clip > 0, prefix, "clip must be > 0 (inf for no clipping), got ", clip);
    TORCH_CHECK(std::isfinite(guidance), prefix, "guidance must be finite, got ", guidance);
    if (!bound.has_value() || !bound->defined()) return Table{nullptr, false};
    TORCH_CHECK(std::isinf(clip), prefix, "pass clip or bound, not both (got clip=", clip, " and a bound)");
    same_device(*bound, "bound", ref, ref_name);
    TORCH_CHECK(bound->dim() == 1 && bound->size(0) == batch, prefix, "bound must have shape [", batch,
                "] (one per sample), got ", bound->sizes());
    TORCH_CHECK(bound->scalar_type() == at::kFloat || bound->scalar_type() == at::kDouble, prefix,
                "bound must be float32 or float64, got ", bound->scalar_type());
    keep = bound->contiguous();
    return Table{keep.data_ptr(), keep.scalar_type() == at::kDouble};
  }

  // solver_step's arguments, checked, made contiguous and gathered into in.args (see
  // SolverInputs), with the output y = [R, *x.shape] allocated like x. Neither t nor the seed is
  // read (see the top): the caller checks t's range and reads the key where it may (the CPU).
  SolverInputs solver_args(const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& out_cond,
                           at::TensorList history, const at::Tensor& t, const at::Tensor& coef,
                           const std::optional<at::Tensor>& bound, double clip, double guidance,
                           const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                           int64_t sample_offset, const std::optional<at::Tensor>& var = std::nullopt) const {
    data(x, "x");
    same_device(coef, "coef", x, "x");
    TORCH_CHECK(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble, prefix,
                "coef must be float32 or float64, got ", coef.scalar_type());
    TORCH_CHECK(coef.dim() == 3 && coef.size(1) >= 2 && coef.size(1) <= kSolverMaxOutputs + 1 &&
                    coef.size(2) == kSolverColumns,
                prefix, "coef must have shape [n_steps, R + 1, ", kSolverColumns, "] with 1 <= R <= ",
                kSolverMaxOutputs, " (row 0 forms x0, rows 1..R the outputs), got ", coef.sizes());
    TORCH_CHECK(coef.size(0) > 0, prefix, "coef is empty (n_steps must be >= 1)");
    TORCH_CHECK(static_cast<int64_t>(history.size()) <= kSolverHistory, prefix, "history holds at most ",
                kSolverHistory, " tensors, got ", history.size());
    SolverInputs in;
    in.x = x.contiguous();
    in.coef = coef.contiguous();
    in.out = *like(out, "out", in.x, "x");
    in.out_cond = like(out_cond, "out_cond", in.x, "x");
    in.var = like(var, "var", in.x, "x");
    const int n_history = static_cast<int>(history.size());
    for (int h = 0; h < n_history; ++h) {
      const std::string name = "history[" + std::to_string(h) + "]";
      in.history[h] = *like(history[h], name.c_str(), in.x, "x");
    }
    const Shape shape = shape_of(in.x);
    const Table tbound = clip_args(bound, clip, guidance, in.x, shape.batch, in.keep_bound, "x");
    in.noise = like(noise, "noise", in.x, "x");
    const NoiseSource src = this->noise(in.noise, seed, sample_offset, "noise", in.x);
    const int64_t n_steps = in.coef.size(0);
    const Steps steps = this->steps(t, in.x, shape.batch, n_steps);
    const int rows = static_cast<int>(in.coef.size(1));
    std::vector<int64_t> y_shape{rows - 1};
    y_shape.insert(y_shape.end(), in.x.sizes().begin(), in.x.sizes().end());
    in.y = at::empty(y_shape, in.x.options().memory_format(at::MemoryFormat::Contiguous));
    SolverStepArgs& a = in.args;
    a.dtype = in.x.scalar_type();
    a.shape = shape;
    a.x = in.x.data_ptr();
    a.out = in.out.data_ptr();
    a.out_cond = in.out_cond ? in.out_cond->data_ptr() : nullptr;
    a.guidance = guidance;
    for (int h = 0; h < kSolverHistory; ++h) a.history[h] = h < n_history ? in.history[h].data_ptr() : nullptr;
    a.n_history = n_history;
    a.noise = src;
    a.t = steps;
    a.coef = in.coef.data_ptr();
    a.coef_double = in.coef.scalar_type() == at::kDouble;
    a.rows = rows;
    a.bound = tbound;
    a.clip = clip;
    a.var = in.var ? in.var->data_ptr() : nullptr;
    a.y = in.y.data_ptr();
    return in;
  }

  // vlb_loss's (grad == nullptr) and vlb_loss_backward's arguments, checked, made contiguous and
  // gathered into in.args (see VlbInputs), with the output allocated: the forward's [batch, 2]
  // in the accumulation type, the backward's d/dout like out (contiguous). The backward's grad
  // ([batch, 2], possibly expanded) is read as a contiguous copy in the accumulation type.
  // Neither t nor the seed is read (see the top).
  VlbInputs vlb_args(const at::Tensor* grad, const at::Tensor& x0, const at::Tensor& out, const at::Tensor& t,
                     const at::Tensor& tables, const std::optional<at::Tensor>& noise,
                     const std::optional<at::Tensor>& seed, int64_t sample_offset, int64_t mean_type,
                     int64_t variance_type, bool detach_mean) const {
    data(x0, "x0");
    TORCH_CHECK(x0.dim() >= 2, prefix, "x0 must have a channel dimension (rank >= 2), got shape ", x0.sizes());
    TORCH_CHECK(mean_type == 0 || mean_type == 1, prefix, "mean_type must be 0 (eps) or 1 (x0), got ", mean_type);
    TORCH_CHECK(variance_type >= 0 && variance_type <= 2, prefix,
                "variance_type must be 0 (learned), 1 (learned_range) or 2 (fixed), got ", variance_type);
    same_device(out, "out", x0, "x0");
    const int64_t channels = x0.size(1) * (variance_type == 2 ? 1 : 2);
    std::vector<int64_t> want(x0.sizes().begin(), x0.sizes().end());
    want[1] = channels;
    TORCH_CHECK(out.sizes() == at::IntArrayRef(want), prefix, "out (the model output) must have shape ",
                at::IntArrayRef(want), " (", channels, " channels: ",
                variance_type == 2 ? "the mean channels" : "the mean and variance channels", " for x0's ",
                x0.size(1), "), got ", out.sizes());
    TORCH_CHECK(out.scalar_type() == x0.scalar_type(), prefix, "out must have the dtype of x0 (", x0.scalar_type(),
                "), got ", out.scalar_type());
    same_device(tables, "tables", x0, "x0");
    TORCH_CHECK(tables.dim() == 2 && tables.size(1) == kVlbColumns &&
                    (tables.scalar_type() == at::kFloat || tables.scalar_type() == at::kDouble),
                prefix, "tables must be a float32/float64 [n_steps, ", kVlbColumns,
                "] tensor (schedule.vlb_tables in VLB_COLUMNS order), got ", tables.scalar_type(), " of shape ",
                tables.sizes());
    TORCH_CHECK(tables.size(0) > 0, prefix, "tables is empty (n_steps must be >= 1)");
    VlbInputs in;
    in.x0 = x0.contiguous();
    in.out = out.contiguous();
    in.tables = tables.contiguous();
    in.noise = like(noise, "noise", in.x0, "x0");
    const Shape shape = shape_of(in.x0);
    const NoiseSource src = this->noise(in.noise, seed, sample_offset, "noise", in.x0);
    const Steps steps = this->steps(t, in.x0, shape.batch, in.tables.size(0));
    const at::ScalarType acc = acc_type(in.x0.scalar_type());
    if (grad != nullptr) {
      same_device(*grad, "grad", in.x0, "x0");
      TORCH_CHECK(grad->dim() == 2 && grad->size(0) == shape.batch && grad->size(1) == 2, prefix,
                  "grad must have shape [", shape.batch, ", 2], got ", grad->sizes());
      TORCH_CHECK(is_float_type(grad->scalar_type()), prefix, "grad must be a floating tensor, got ",
                  grad->scalar_type());
      in.grad = grad->to(acc).contiguous();
      in.y = empty_like_contiguous(in.out);
    } else {
      in.y = at::empty({shape.batch, 2}, in.x0.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
    }
    VlbArgs& a = in.args;
    a.dtype = in.x0.scalar_type();
    a.shape = shape;
    a.out_d = shape.d * (variance_type == 2 ? 1 : 2);
    a.x0 = in.x0.data_ptr();
    a.out = in.out.data_ptr();
    a.noise = src;
    a.t = steps;
    a.tables = in.tables.data_ptr();
    a.tables_double = in.tables.scalar_type() == at::kDouble;
    a.mean_type = static_cast<int>(mean_type);
    a.variance_type = static_cast<int>(variance_type);
    a.detach_mean = detach_mean;
    a.grad = grad != nullptr ? in.grad.data_ptr() : nullptr;
    a.y = in.y.data_ptr();
    return in;
  }

  // The [batch, d] of mse's pred: each sample needs an element to average.
  Shape mse_shape(const at::Tensor& pred) const {
    const Shape shape = shape_of(pred);
    TORCH_CHECK(shape.batch == 0 || shape.d > 0, prefix, "pred must have at least one element per sample, got shape ",
                pred.sizes());
    return shape;
  }

  // The incoming gradient of mse_per_sample: [batch], floating, on pred's device.
  void mse_grad(const at::Tensor& grad, const at::Tensor& pred, int64_t batch) const {
    same_device(grad, "grad", pred, "pred");
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == batch, prefix, "grad must have shape [", batch, "], got ",
                grad.sizes());
    TORCH_CHECK(is_float_type(grad.scalar_type()), prefix, "grad must be a floating tensor, got ",
                grad.scalar_type());
  }

  // normal's size (batch first) and dtype.
  void normal_args(at::IntArrayRef size, at::ScalarType dtype) const {
    TORCH_CHECK(!size.empty(), prefix, "size must have a batch dimension (rank >= 1), got []");
    for (const int64_t s : size) {
      TORCH_CHECK(s >= 0, prefix, "size must not be negative, got ", size);
    }
    TORCH_CHECK(is_float_type(dtype), prefix, "dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  }

  // sample_t's sizes.
  void sample_t_sizes(int64_t batch, int64_t n_steps) const {
    TORCH_CHECK(batch >= 0, prefix, "batch must be >= 0, got ", batch);
    TORCH_CHECK(n_steps >= 1 && n_steps <= std::numeric_limits<int32_t>::max(), prefix,
                "n_steps must lie in [1, 2**31), got ", n_steps);
  }
};

}  // namespace fastddpm

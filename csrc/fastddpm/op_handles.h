// The compiled ops as C++ calls through the dispatcher, for the extension's own C++ (the autograd
// formulas in csrc/autograd.cpp, the training-step ops in csrc/train_ops.cpp, the direct Python
// calls in csrc/fast_calls.cpp): each op's signature and an accessor holding its handle, looked
// up once. Host code only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastddpm {
namespace handles {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using QSampleSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const OptTensor&, int64_t);
using PSampleSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, const OptTensor&, int64_t);
using MseSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, int64_t);
using MseBackwardSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t);
using SolverStepSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, at::TensorList, const Tensor&,
                             const Tensor&, const OptTensor&, double, double, const OptTensor&, const OptTensor&,
                             int64_t, const OptTensor&);
using VlbSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      int64_t, int64_t, int64_t, bool);
using VlbBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, bool);
using TargetMseSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const OptTensor&, const OptTensor&, int64_t);
using TargetMseBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, const OptTensor&, const OptTensor&, int64_t);
using NormalSig = Tensor(const Tensor&, c10::SymIntArrayRef, int64_t, at::ScalarType);
using SampleTSig = Tensor(const Tensor&, c10::SymInt, int64_t, int64_t);
using TrainInputsSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const OptTensor&, std::optional<at::Generator>,
                                                                   int64_t, bool);
using MseLossSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, int64_t, const OptTensor&,
                          const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&);
using MseLossBackwardSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                  const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                  const OptTensor&);

// The op `name` with signature Sig; each accessor keeps its own handle (a static per accessor,
// not per Sig: two ops may share a signature, as p_sample_step and target_mse_backward do).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

#define FASTDDPM_OP(accessor, Sig, name)                        \
  inline const c10::TypedOperatorHandle<Sig>& accessor() {      \
    static const auto h = find_op<Sig>("fastddpm::" name);      \
    return h;                                                    \
  }

FASTDDPM_OP(q_sample_op, QSampleSig, "q_sample")
FASTDDPM_OP(p_sample_step_op, PSampleSig, "p_sample_step")
FASTDDPM_OP(mse_op, MseSig, "mse_per_sample")
FASTDDPM_OP(mse_backward_op, MseBackwardSig, "mse_per_sample_backward")
FASTDDPM_OP(solver_step_op, SolverStepSig, "solver_step")
FASTDDPM_OP(target_mse_op, TargetMseSig, "target_mse")
FASTDDPM_OP(target_mse_backward_op, TargetMseBackwardSig, "target_mse_backward")
FASTDDPM_OP(normal_op, NormalSig, "normal")
FASTDDPM_OP(sample_t_op, SampleTSig, "sample_t")
FASTDDPM_OP(vlb_loss_op, VlbSig, "vlb_loss")
FASTDDPM_OP(vlb_loss_backward_op, VlbBackwardSig, "vlb_loss_backward")
FASTDDPM_OP(train_inputs_op, TrainInputsSig, "train_inputs")
FASTDDPM_OP(mse_loss_op, MseLossSig, "mse_loss")
FASTDDPM_OP(mse_loss_backward_op, MseLossBackwardSig, "mse_loss_backward")
#undef FASTDDPM_OP

inline bool wants_grad(const Tensor& x) { return x.defined() && x.requires_grad(); }
inline bool wants_grad(const OptTensor& x) { return x.has_value() && wants_grad(*x); }

}  // namespace handles
}  // namespace fastddpm

// What the CPU ops offer other C++ of the extension beyond torch.ops.fastddpm (csrc/train_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastddpm {
namespace cpu {

// The CPU kernels of q_sample, sample_t and normal, called directly (all tensors on the CPU).
at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                        const at::Tensor& sqrt_1m_ab, const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& seed, int64_t sample_offset);
at::Tensor sample_t_cpu(const at::Tensor& seed, int64_t batch, int64_t n_steps, int64_t sample_offset);
at::Tensor normal_cpu(const at::Tensor& seed, c10::IntArrayRef size, int64_t sample_offset, at::ScalarType dtype);

// mse_per_sample(pred, target, seed, sample_offset) and, from the same pass, d/dpred of
// sum_b grad_scale[b] mse_b: bit for bit what mse_per_sample_backward gives for the per-sample
// gradient grad_scale ([batch], contiguous, pred's accumulation type, on the CPU).
std::tuple<at::Tensor, at::Tensor> mse_per_sample_and_grad(const at::Tensor& pred,
                                                           const std::optional<at::Tensor>& target,
                                                           const std::optional<at::Tensor>& seed,
                                                           int64_t sample_offset, const at::Tensor& grad_scale);

}  // namespace cpu
}  // namespace fastddpm

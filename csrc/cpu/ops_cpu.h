// What the CPU ops offer other C++ of the extension beyond torch.ops.fastddpm (csrc/train_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastddpm {
namespace cpu {

// mse_per_sample(pred, target, seed, sample_offset) and, from the same pass, d/dpred of
// sum_b grad_scale[b] mse_b: bit for bit what mse_per_sample_backward gives for the per-sample
// gradient grad_scale ([batch], contiguous, pred's accumulation type, on the CPU).
std::tuple<at::Tensor, at::Tensor> mse_per_sample_and_grad(const at::Tensor& pred,
                                                           const std::optional<at::Tensor>& target,
                                                           const std::optional<at::Tensor>& seed,
                                                           int64_t sample_offset, const at::Tensor& grad_scale);

}  // namespace cpu
}  // namespace fastddpm

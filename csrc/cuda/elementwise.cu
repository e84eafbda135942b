// The CUDA kernels with one output per element: q_sample, p_sample_step and the MSE's backward.
// One thread per chunk (chunk.cuh) in a 64-bit grid-stride loop (CUDA_KERNEL_LOOP_TYPE); the
// per-element formulas are those of fastddpm/kernel_math.h.
#include <ATen/Dispatch.h>
#include <ATen/cuda/detail/KernelUtils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "chunk.cuh"

namespace fastddpm {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(QSampleArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.noise);
  const int64_t d = a.shape.d, per_sample = ceil_div(d, C::kVec);
  CUDA_KERNEL_LOOP_TYPE(c, a.shape.batch * per_sample, int64_t) {
    const ChunkPos pos = chunk_pos<scalar_t>(c, per_sample, d);
    const int64_t t = step_of(a.t, pos.b);
    const acc_t ca = gather<acc_t>(a.sqrt_ab, t), cb = gather<acc_t>(a.sqrt_1m_ab, t);
    C x, e;
    x.load(static_cast<const scalar_t*>(a.x0), pos.b * d + pos.j0, pos.n, vec);
    load_noise(e, a.noise, key, pos, d, vec);
#pragma unroll
    for (int i = 0; i < C::kVec; ++i) x.v[i] = math::q_sample_value(x.v[i], e.v[i], ca, cb);
    x.store(static_cast<scalar_t*>(a.out), pos.b * d + pos.j0, pos.n, vec);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) p_sample_step_kernel(PSampleArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.noise);
  const int64_t d = a.shape.d, per_sample = ceil_div(d, C::kVec);
  CUDA_KERNEL_LOOP_TYPE(c, a.shape.batch * per_sample, int64_t) {
    const ChunkPos pos = chunk_pos<scalar_t>(c, per_sample, d);
    const int64_t t = step_of(a.t, pos.b);
    const acc_t c1 = gather<acc_t>(a.c1, t), c2 = gather<acc_t>(a.c2, t), sg = gather<acc_t>(a.sigma, t);
    const int64_t offset = pos.b * d + pos.j0;
    C x, e, z;
    x.load(static_cast<const scalar_t*>(a.x_t), offset, pos.n, vec);
    e.load(static_cast<const scalar_t*>(a.eps_theta), offset, pos.n, vec);
    load_noise(z, a.noise, key, pos, d, vec);
#pragma unroll
    for (int i = 0; i < C::kVec; ++i) x.v[i] = math::p_sample_value(x.v[i], e.v[i], z.v[i], c1, c2, sg);
    x.store(static_cast<scalar_t*>(a.out), offset, pos.n, vec);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mse_backward_kernel(MseBackwardArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.target);
  const int64_t d = a.shape.d, per_sample = ceil_div(d, C::kVec);
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  CUDA_KERNEL_LOOP_TYPE(c, a.shape.batch * per_sample, int64_t) {
    const ChunkPos pos = chunk_pos<scalar_t>(c, per_sample, d);
    // d MSE_b / d pred = grad_b * 2 / D * (pred - target), as the CPU kernels compute the scale.
    const acc_t scale = grad[pos.b] * acc_t(2) / static_cast<acc_t>(d);
    const int64_t offset = pos.b * d + pos.j0;
    C p, tg;
    p.load(static_cast<const scalar_t*>(a.pred), offset, pos.n, vec);
    load_noise(tg, a.target, key, pos, d, vec);
#pragma unroll
    for (int i = 0; i < C::kVec; ++i) p.v[i] = math::mse_grad_value(p.v[i], tg.v[i], scale);
    p.store(static_cast<scalar_t*>(a.out), offset, pos.n, vec);
  }
}

// The contract's normals themselves, rounded to the output's dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) normal_kernel(NormalArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  const Key key = key_of(a.noise);
  const int64_t d = a.shape.d, per_sample = ceil_div(d, C::kVec);
  CUDA_KERNEL_LOOP_TYPE(c, a.shape.batch * per_sample, int64_t) {
    const ChunkPos pos = chunk_pos<scalar_t>(c, per_sample, d);
    C z;
    load_noise(z, a.noise, key, pos, d, vec);
    z.store(static_cast<scalar_t*>(a.out), pos.b * d + pos.j0, pos.n, vec);
  }
}

}  // namespace

void launch_q_sample(const QSampleArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_q_sample_cuda", [&] {
    const bool vec = vectorizable<scalar_t>(a.shape.d, {a.x0, a.noise.noise, a.out});
    const int64_t chunks = a.shape.batch * ceil_div(a.shape.d, Chunk<scalar_t>::kVec);
    q_sample_kernel<scalar_t><<<blocks_for(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_p_sample_step(const PSampleArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_p_sample_step_cuda", [&] {
    const bool vec = vectorizable<scalar_t>(a.shape.d, {a.x_t, a.eps_theta, a.noise.noise, a.out});
    const int64_t chunks = a.shape.batch * ceil_div(a.shape.d, Chunk<scalar_t>::kVec);
    p_sample_step_kernel<scalar_t><<<blocks_for(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_mse_per_sample_backward(const MseBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_mse_per_sample_backward_cuda", [&] {
    const bool vec = vectorizable<scalar_t>(a.shape.d, {a.pred, a.target.noise, a.out});
    const int64_t chunks = a.shape.batch * ceil_div(a.shape.d, Chunk<scalar_t>::kVec);
    mse_backward_kernel<scalar_t><<<blocks_for(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_normal(const NormalArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_normal_cuda", [&] {
    const bool vec = vectorizable<scalar_t>(a.shape.d, {a.out});
    const int64_t chunks = a.shape.batch * ceil_div(a.shape.d, Chunk<scalar_t>::kVec);
    normal_kernel<scalar_t><<<blocks_for(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace fastddpm

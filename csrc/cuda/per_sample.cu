// The CUDA kernels with one output per sample: the forward of the MSE ops (mse_per_sample,
// target_mse), of the variational bound (vlb_loss: two sums a sample) and the loss timesteps.
//
// The MSE is deterministic: each sample is cut into `parts` fixed ranges of chunks (the number
// depends only on the sample size and dtype, not on the GPU); one block sums a range with a
// fixed tree (no atomics), and a second pass adds a sample's parts in float64, again in a fixed
// order. A sample of one part skips the second pass. vlb_loss sums the same way, two sums at once.
#include <ATen/Dispatch.h>
#include <ATen/cuda/detail/KernelUtils.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "chunk.cuh"

namespace fastddpm {
namespace cuda {
namespace {

// Chunks one block sums per part: 4 per thread.
constexpr int64_t kChunksPerPart = 4 * kThreads;

// The sum of v over the block, in thread 0, by a fixed tree (warp shuffles, then one warp over
// the warps' sums): the same order on every run. Every thread of the block must call it.
template <typename T>
__device__ T block_sum(T v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 32 * 32, "one warp must reduce the warp sums");
  __shared__ T warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums is reused by the next call
  return v;
}

// Sample b's (mse, vb) = (mse_sum / D, vb_sum / D / ln 2) into out[2 b], out[2 b + 1] (a D of 0
// gives NaN, as the mean of nothing).
template <typename acc_t>
__device__ inline void store_vlb(acc_t* out, int64_t b, double mse_sum, double vb_sum, int64_t d) {
  const double n = static_cast<double>(d);
  out[2 * b] = static_cast<acc_t>(mse_sum / n);
  out[2 * b + 1] = static_cast<acc_t>(vb_sum / n / math::kVlbLn2);
}

// The forward of both MSE ops: the mean over each sample of (pred - target)^2 into out.
struct MseForwardArgs {
  Shape shape;
  const void* pred;
  MseTarget target;
  void* out;  // [batch], acc_t
};

// Block w sums part w % parts of sample w / parts. With parts == 1 it writes the mean to out,
// else the part's sum to partial[w].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mse_parts_kernel(MseForwardArgs a, bool vec, int64_t parts, double* partial) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.target.noise);
  const int64_t d = a.shape.d, per_sample = ceil_div(d, C::kVec);
  for (int64_t w = blockIdx.x; w < a.shape.batch * parts; w += gridDim.x) {
    const int64_t b = w / parts;
    const int64_t first = b * per_sample + (w - b * parts) * kChunksPerPart;
    const int64_t last = b * per_sample + std::min(per_sample, (w - b * parts + 1) * kChunksPerPart);
    acc_t sum = 0;
    for (int64_t c = first + threadIdx.x; c < last; c += kThreads) {
      const ChunkPos pos = chunk_pos<scalar_t>(c, per_sample, d);
      C p, tg;
      p.load(static_cast<const scalar_t*>(a.pred), pos.b * d + pos.j0, pos.n, vec);
      load_target(tg, a.target, key, pos, d, vec);
#pragma unroll
      for (int i = 0; i < C::kVec; ++i) {
        if (i < pos.n) sum += math::squared_error(p.v[i], tg.v[i]);
      }
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
      if (parts == 1) {
        static_cast<acc_t*>(a.out)[b] = static_cast<acc_t>(static_cast<double>(sum) / static_cast<double>(d));
      } else {
        partial[w] = static_cast<double>(sum);
      }
    }
  }
}

// Block b adds up the parts of sample b (thread k takes parts k, k + kThreads, ..., then the
// fixed tree) and writes the mean.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mse_mean_kernel(const double* partial, int64_t batch, int64_t parts, int64_t d, acc_t* out) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    double sum = 0;
    for (int64_t k = threadIdx.x; k < parts; k += kThreads) sum += partial[b * parts + k];
    sum = block_sum(sum);
    if (threadIdx.x == 0) out[b] = static_cast<acc_t>(sum / static_cast<double>(d));
  }
}

// vlb_loss's forward: per sample (mse, vb) = (sum_j (target - m)^2 / D, sum_j term / D / ln 2)
// (kernel_math.h: vlb_value), in parts as the MSE's. With parts == 1 block w writes sample w's
// two means to a.y, else its two sums to partial[2 w], partial[2 w + 1].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) vlb_parts_kernel(VlbArgs a, bool vec, int64_t parts, double* partial) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.noise);
  const int64_t d = a.shape.d, per_sample = ceil_div(d, C::kVec);
  for (int64_t w = blockIdx.x; w < a.shape.batch * parts; w += gridDim.x) {
    const int64_t b = w / parts;
    const int64_t first = b * per_sample + (w - b * parts) * kChunksPerPart;
    const int64_t last = b * per_sample + std::min(per_sample, (w - b * parts + 1) * kChunksPerPart);
    const int64_t t = step_of(a.t, b);
    const math::VlbRow<acc_t> row = vlb_row_of<acc_t>(a, t);
    acc_t mse = 0, vb = 0;
    for (int64_t c = first + threadIdx.x; c < last; c += kThreads) {
      const ChunkPos pos = chunk_pos<scalar_t>(c, per_sample, d);
      VlbChunk<scalar_t> o;
      load_vlb(o, a, key, pos, vec);
#pragma unroll
      for (int i = 0; i < C::kVec; ++i) {
        if (i < pos.n) {
          acc_t sq, term;
          math::vlb_value(o.x0.v[i], o.eps.v[i], o.m.v[i], o.v.v[i], row, a.mean_type, a.variance_type, t == 0, sq,
                          term);
          mse += sq;
          vb += term;
        }
      }
    }
    mse = block_sum(mse);
    vb = block_sum(vb);
    if (threadIdx.x == 0) {
      if (parts == 1) {
        store_vlb(static_cast<acc_t*>(a.y), b, static_cast<double>(mse), static_cast<double>(vb), d);
      } else {
        partial[2 * w] = static_cast<double>(mse);
        partial[2 * w + 1] = static_cast<double>(vb);
      }
    }
  }
}

// Block b adds up the parts of sample b's two sums (as mse_mean_kernel) and writes the means.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    vlb_mean_kernel(const double* partial, int64_t batch, int64_t parts, int64_t d, acc_t* out) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    double mse = 0, vb = 0;
    for (int64_t k = threadIdx.x; k < parts; k += kThreads) {
      mse += partial[2 * (b * parts + k)];
      vb += partial[2 * (b * parts + k) + 1];
    }
    mse = block_sum(mse);
    vb = block_sum(vb);
    if (threadIdx.x == 0) store_vlb(out, b, mse, vb, d);
  }
}

__global__ void __launch_bounds__(kThreads)
    sample_t_kernel(const int64_t* seed, int64_t batch, uint32_t n_steps, uint64_t offset, int64_t* out) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  CUDA_KERNEL_LOOP_TYPE(b, batch, int64_t) {
    out[b] = math::sample_timestep(offset + static_cast<uint64_t>(b), n_steps, math::lo32(s), math::hi32(s));
  }
}

void launch_mse(c10::ScalarType dtype, const MseForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastddpm_mse_cuda", [&] {
    using acc_t = typename Chunk<scalar_t>::acc_t;
    const bool vec = vectorizable<scalar_t>(a.shape.d, {a.pred, a.target.noise.noise, a.target.x0});
    const int64_t parts = ceil_div(ceil_div(a.shape.d, Chunk<scalar_t>::kVec), kChunksPerPart);
    const auto blocks = static_cast<unsigned int>(std::min(a.shape.batch * parts, kMaxBlocks));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (parts == 1) {
      mse_parts_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(a, vec, parts, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Stream-ordered scratch from the caching allocator, freed (for reuse on this stream) on return.
    const c10::DataPtr partial =
        c10::cuda::CUDACachingAllocator::get()->allocate(sizeof(double) * a.shape.batch * parts);
    double* sums = static_cast<double*>(partial.get());
    mse_parts_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(a, vec, parts, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto sample_blocks = static_cast<unsigned int>(std::min(a.shape.batch, kMaxBlocks));
    mse_mean_kernel<acc_t><<<sample_blocks, kThreads, 0, stream>>>(
        sums, a.shape.batch, parts, a.shape.d, static_cast<acc_t*>(a.out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_vlb(const VlbArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_vlb_loss_cuda", [&] {
    using acc_t = typename Chunk<scalar_t>::acc_t;
    const bool vec = vectorizable<scalar_t>(a.shape.d, {a.x0, a.noise.noise, a.out});
    // At least one part a sample, so that a D of 0 still writes its (NaN) means.
    const int64_t parts = std::max<int64_t>(1, ceil_div(ceil_div(a.shape.d, Chunk<scalar_t>::kVec), kChunksPerPart));
    const auto blocks = static_cast<unsigned int>(std::min(a.shape.batch * parts, kMaxBlocks));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (parts == 1) {
      vlb_parts_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(a, vec, parts, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Two sums a part, in stream-ordered scratch as launch_mse's.
    const c10::DataPtr partial =
        c10::cuda::CUDACachingAllocator::get()->allocate(2 * sizeof(double) * a.shape.batch * parts);
    double* sums = static_cast<double*>(partial.get());
    vlb_parts_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(a, vec, parts, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto sample_blocks = static_cast<unsigned int>(std::min(a.shape.batch, kMaxBlocks));
    vlb_mean_kernel<acc_t><<<sample_blocks, kThreads, 0, stream>>>(sums, a.shape.batch, parts, a.shape.d,
                                                                     static_cast<acc_t*>(a.y));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void launch_mse_per_sample(const MseArgs& a) {
  launch_mse(a.dtype, MseForwardArgs{a.shape, a.pred, noise_target(a.target), a.out});
}

void launch_target_mse(const TargetMseArgs& a) {
  launch_mse(a.dtype, MseForwardArgs{a.shape, a.pred, formula_target(a), a.out});
}

void launch_vlb_loss(const VlbArgs& a) { launch_vlb(a); }

void launch_sample_t(const int64_t* seed, int64_t batch, uint32_t n_steps, uint64_t offset, int64_t* out) {
  sample_t_kernel<<<blocks_for(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(seed, batch, n_steps, offset,
                                                                                         out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastddpm

// The CUDA kernels with one output per element: q_sample, p_sample_step, solver_step (R outputs
// per element), the MSE's, target_mse's and vlb_loss's backward, normal.
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

// The loop of every kernel here: f(pos, offset) for each chunk of a [shape.batch, shape.d]
// launch (offset: of the chunk's first element), one thread a chunk.
template <typename scalar_t, typename F>
__device__ inline void for_each_chunk(Shape shape, const F& f) {
  const int64_t per_sample = ceil_div(shape.d, Chunk<scalar_t>::kVec);
  CUDA_KERNEL_LOOP_TYPE(c, shape.batch * per_sample, int64_t) {
    const ChunkPos pos = chunk_pos<scalar_t>(c, per_sample, shape.d);
    f(pos, pos.b * shape.d + pos.j0);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(QSampleArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.noise);
  const int64_t d = a.shape.d;
  for_each_chunk<scalar_t>(a.shape, [&](const ChunkPos& pos, int64_t offset) {
    const int64_t t = step_of(a.t, pos.b);
    const acc_t ca = gather<acc_t>(a.sqrt_ab, t), cb = gather<acc_t>(a.sqrt_1m_ab, t);
    C x, e;
    x.load(static_cast<const scalar_t*>(a.x0), offset, pos.n, vec);
    load_noise(e, a.noise, key, pos, d, vec);
#pragma unroll
    for (int i = 0; i < C::kVec; ++i) x.v[i] = math::q_sample_value(x.v[i], e.v[i], ca, cb);
    x.store(static_cast<scalar_t*>(a.out), offset, pos.n, vec);
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) p_sample_step_kernel(PSampleArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.noise);
  const int64_t d = a.shape.d;
  for_each_chunk<scalar_t>(a.shape, [&](const ChunkPos& pos, int64_t offset) {
    const int64_t t = step_of(a.t, pos.b);
    const acc_t c1 = gather<acc_t>(a.c1, t), c2 = gather<acc_t>(a.c2, t), sg = gather<acc_t>(a.sigma, t);
    C x, e, z;
    x.load(static_cast<const scalar_t*>(a.x_t), offset, pos.n, vec);
    e.load(static_cast<const scalar_t*>(a.eps_theta), offset, pos.n, vec);
    load_noise(z, a.noise, key, pos, d, vec);
#pragma unroll
    for (int i = 0; i < C::kVec; ++i) x.v[i] = math::p_sample_value(x.v[i], e.v[i], z.v[i], c1, c2, sg);
    x.store(static_cast<scalar_t*>(a.out), offset, pos.n, vec);
  });
}

// The coefficients of one sample's step: row r, column c of coef[t] (SolverStepArgs).
template <typename acc_t>
struct SolverCoef {
  Table table;
  int64_t base;  // t * rows * kSolverColumns
  __device__ acc_t operator()(int row, int col) const {
    return gather<acc_t>(table, base + row * kSolverColumns + col);
  }
};

// Output row r (1..R) accumulates the operands in the formula's order (x, o, x0, history, z),
// one solver_term each; all rows are accumulated together, so each operand chunk is loaded once.
// With var, z is first scaled per element by learned_noise_scale(var, c(0, 3), c(0, 4)).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) solver_step_kernel(SolverStepArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.noise);
  const acc_t guidance = static_cast<acc_t>(a.guidance), clip = static_cast<acc_t>(a.clip);
  const int64_t d = a.shape.d;
  const int64_t plane = a.shape.batch * d;  // elements of one output row
  const int outputs = a.rows - 1;
  for_each_chunk<scalar_t>(a.shape, [&](const ChunkPos& pos, int64_t offset) {
    const int64_t t = step_of(a.t, pos.b);
    const SolverCoef<acc_t> c{Table{a.coef, a.coef_double}, t * a.rows * kSolverColumns};
    // Thresholding at the sample's bound, or clipping at clip (inf: none).
    const acc_t lim = a.bound.data ? gather<acc_t>(a.bound, pos.b) : clip;
    const acc_t inv_scale = a.bound.data ? acc_t(1) / lim : acc_t(1);
    C acc[kSolverMaxOutputs];
#pragma unroll
    for (int r = 0; r < kSolverMaxOutputs; ++r) {
#pragma unroll
      for (int i = 0; i < C::kVec; ++i) acc[r].v[i] = acc_t(0);
    }
    // acc[r] += coef[t, r + 1, col] * v for every output row r.
    const auto add = [&](int col, const C& v) {
#pragma unroll
      for (int r = 0; r < kSolverMaxOutputs; ++r) {
        if (r < outputs) {
          const acc_t k = c(r + 1, col);
#pragma unroll
          for (int i = 0; i < C::kVec; ++i) acc[r].v[i] = math::solver_term(acc[r].v[i], k, v.v[i]);
        }
      }
    };
    {
      C x, o;
      x.load(static_cast<const scalar_t*>(a.x), offset, pos.n, vec);
      o.load(static_cast<const scalar_t*>(a.out), offset, pos.n, vec);
      if (a.out_cond != nullptr) {
        C oc;
        oc.load(static_cast<const scalar_t*>(a.out_cond), offset, pos.n, vec);
#pragma unroll
        for (int i = 0; i < C::kVec; ++i) o.v[i] = math::guided_value(o.v[i], oc.v[i], guidance);
      }
      const acc_t c0 = c(0, 0), c1 = c(0, 1);
      add(0, x);
      add(1, o);
#pragma unroll
      for (int i = 0; i < C::kVec; ++i) x.v[i] = math::solver_x0_value(x.v[i], o.v[i], c0, c1, lim, inv_scale);
      add(2, x);  // x0
    }
#pragma unroll
    for (int h = 0; h < kSolverHistory; ++h) {
      if (h < a.n_history) {  // every passed history operand is read, whatever its coefficients
        C v;
        v.load(static_cast<const scalar_t*>(a.history[h]), offset, pos.n, vec);
        add(3 + h, v);
      }
    }
    // The stream's noise only where some output row takes it (given noise is always read).
    bool draw = false;
#pragma unroll
    for (int r = 0; r < kSolverMaxOutputs; ++r) {
      if (r < outputs) draw = draw || c(r + 1, kSolverColumns - 1) != acc_t(0);
    }
    {
      C z;
      load_noise(z, a.noise, key, pos, d, vec, draw);
      if (a.var != nullptr && draw) {  // a learned variance scales z (not read where z is unused)
        C v;
        v.load(static_cast<const scalar_t*>(a.var), offset, pos.n, vec);
        const acc_t c3 = c(0, 3), c4 = c(0, 4);
#pragma unroll
        for (int i = 0; i < C::kVec; ++i) z.v[i] = z.v[i] * math::learned_noise_scale(v.v[i], c3, c4);
      }
      add(kSolverColumns - 1, z);
    }
#pragma unroll
    for (int r = 0; r < kSolverMaxOutputs; ++r) {
      if (r < outputs) acc[r].store(static_cast<scalar_t*>(a.y), r * plane + offset, pos.n, vec);
    }
  });
}

// The backward of both MSE ops (mse_per_sample, target_mse): grad_b * 2 / D * (pred - target).
struct MseGradArgs {
  Shape shape;
  const void* grad;  // [batch], in acc_t
  const void* pred;
  MseTarget target;
  void* out;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mse_backward_kernel(MseGradArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.target.noise);
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  const int64_t d = a.shape.d;
  for_each_chunk<scalar_t>(a.shape, [&](const ChunkPos& pos, int64_t offset) {
    // d MSE_b / d pred = grad_b * 2 / D * (pred - target), as the CPU kernels compute the scale.
    const acc_t scale = grad[pos.b] * acc_t(2) / static_cast<acc_t>(d);
    C p, tg;
    p.load(static_cast<const scalar_t*>(a.pred), offset, pos.n, vec);
    load_target(tg, a.target, key, pos, d, vec);
#pragma unroll
    for (int i = 0; i < C::kVec; ++i) p.v[i] = math::mse_grad_value(p.v[i], tg.v[i], scale);
    p.store(static_cast<scalar_t*>(a.out), offset, pos.n, vec);
  });
}

// vlb_loss's backward (kernel_math.h: vlb_grad_value): d/dout of sample b's (mse, vb) weighted by
// grad[b] = (g_mse, g_vb), into y like out: the mean channels, then (not fixed) the variance
// channels. The noise is regenerated from the seed (or read), never stored.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) vlb_backward_kernel(VlbArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  using acc_t = typename C::acc_t;
  const Key key = key_of(a.noise);
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  const int64_t d = a.shape.d;
  const bool learned = a.variance_type != math::kVlbFixed;
  for_each_chunk<scalar_t>(a.shape, [&](const ChunkPos& pos, int64_t) {
    const int64_t t = step_of(a.t, pos.b);
    const math::VlbRow<acc_t> row = vlb_row_of<acc_t>(a, t);
    const acc_t n = static_cast<acc_t>(d);
    const acc_t mse_scale = grad[2 * pos.b] * acc_t(2) / n;
    const acc_t w = grad[2 * pos.b + 1] / (n * static_cast<acc_t>(math::kVlbLn2));
    VlbChunk<scalar_t> o;
    load_vlb(o, a, key, pos, vec);
    C gm, gv;
#pragma unroll
    for (int i = 0; i < C::kVec; ++i) {
      math::vlb_grad_value(o.x0.v[i], o.eps.v[i], o.m.v[i], o.v.v[i], row, a.mean_type, a.variance_type, t == 0,
                           a.detach_mean, mse_scale, w, gm.v[i], gv.v[i]);
    }
    const int64_t first = pos.b * a.out_d + pos.j0;
    gm.store(static_cast<scalar_t*>(a.y), first, pos.n, vec);
    if (learned) gv.store(static_cast<scalar_t*>(a.y), first + d, pos.n, vec);
  });
}

// The contract's normals themselves, rounded to the output's dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) normal_kernel(NormalArgs a, bool vec) {
  using C = Chunk<scalar_t>;
  const Key key = key_of(a.noise);
  const int64_t d = a.shape.d;
  for_each_chunk<scalar_t>(a.shape, [&](const ChunkPos& pos, int64_t offset) {
    C z;
    load_noise(z, a.noise, key, pos, d, vec);
    z.store(static_cast<scalar_t*>(a.out), offset, pos.n, vec);
  });
}

// One thread per chunk of a [shape.batch, shape.d] launch of kernel<scalar_t> on the current
// stream, on the 16-byte path when every tensor at `bases` allows it.
template <typename scalar_t, typename Args>
void launch_chunks(void (*kernel)(Args, bool), const Args& a, Shape shape, std::initializer_list<const void*> bases) {
  const bool vec = vectorizable<scalar_t>(shape.d, bases);
  const int64_t chunks = shape.batch * ceil_div(shape.d, Chunk<scalar_t>::kVec);
  kernel<<<blocks_for(chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_mse_backward(c10::ScalarType dtype, const MseGradArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastddpm_mse_backward_cuda", [&] {
    launch_chunks<scalar_t>(mse_backward_kernel<scalar_t>, a, a.shape,
                            {a.pred, a.target.noise.noise, a.target.x0, a.out});
  });
}

}  // namespace

void launch_q_sample(const QSampleArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_q_sample_cuda", [&] {
    launch_chunks<scalar_t>(q_sample_kernel<scalar_t>, a, a.shape, {a.x0, a.noise.noise, a.out});
  });
}

void launch_p_sample_step(const PSampleArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_p_sample_step_cuda", [&] {
    launch_chunks<scalar_t>(p_sample_step_kernel<scalar_t>, a, a.shape, {a.x_t, a.eps_theta, a.noise.noise, a.out});
  });
}

void launch_solver_step(const SolverStepArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_solver_step_cuda", [&] {
    // Unset history entries are nullptr, which counts as aligned. Every output row starts at a
    // multiple of batch * d elements, so with d % kVec == 0 all rows share y's alignment.
    launch_chunks<scalar_t>(solver_step_kernel<scalar_t>, a, a.shape,
                            {a.x, a.out, a.out_cond, a.history[0], a.history[1], a.history[2], a.history[3],
                             a.noise.noise, a.var, a.y});
  });
}

void launch_mse_per_sample_backward(const MseBackwardArgs& a) {
  launch_mse_backward(a.dtype, MseGradArgs{a.shape, a.grad, a.pred, noise_target(a.target), a.out});
}

void launch_target_mse_backward(const TargetMseBackwardArgs& a) {
  launch_mse_backward(a.dtype, MseGradArgs{a.shape, a.grad, a.pred, formula_target(a), a.out});
}

void launch_vlb_loss_backward(const VlbArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_vlb_loss_backward_cuda", [&] {
    // y is like out: with D % kVec == 0 its mean and variance halves share its alignment.
    launch_chunks<scalar_t>(vlb_backward_kernel<scalar_t>, a, a.shape, {a.x0, a.noise.noise, a.out, a.y});
  });
}

void launch_normal(const NormalArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_normal_cuda", [&] {
    launch_chunks<scalar_t>(normal_kernel<scalar_t>, a, a.shape, {a.out});
  });
}

}  // namespace cuda
}  // namespace fastddpm

// The unit of work of the CUDA kernels: a chunk of kVec consecutive elements of one sample,
// 16 bytes of float32, float16 or bfloat16 data (32 bytes of float64), starting at a multiple of
// kVec. kVec is a multiple of 4, so a chunk holds whole Philox quads: one Philox call gives the
// noise of 4 elements and no quad is computed twice.
//
// The arithmetic comes from fastddpm/kernel_math.h, the header the CPU kernels compile too.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "fastddpm/kernel_math.h"
#include "kernels.h"

namespace fastddpm {
namespace cuda {

// Threads per block of every kernel (the MSE's block reduction relies on it).
constexpr int kThreads = 256;
// Enough blocks to fill any GPU many times over; larger inputs loop (grid-stride).
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

inline unsigned int blocks_for(int64_t work_items) {
  return static_cast<unsigned int>(std::min<int64_t>((work_items + kThreads - 1) / kThreads, kMaxBlocks));
}

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
struct Chunk {
  using acc_t = at::opmath_type<scalar_t>;  // float32 for the half types
  static constexpr int kPerAccess = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int kVec = kPerAccess < 4 ? 4 : kPerAccess;
  struct alignas(16) Access {
    scalar_t v[kPerAccess];
  };

  acc_t v[kVec];

  // Elements [offset, offset + n) of base, n <= kVec. `vec` (the same for the whole launch):
  // every chunk is whole (n == kVec) and 16-byte aligned, so 16-byte accesses are used.
  __device__ void load(const scalar_t* base, int64_t offset, int n, bool vec) {
    const scalar_t* p = base + offset;
    if (vec) {
#pragma unroll
      for (int a = 0; a < kVec / kPerAccess; ++a) {
        const Access x = reinterpret_cast<const Access*>(p)[a];
#pragma unroll
        for (int i = 0; i < kPerAccess; ++i) v[a * kPerAccess + i] = static_cast<acc_t>(x.v[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = i < n ? static_cast<acc_t>(p[i]) : acc_t(0);
    }
  }

  __device__ void store(scalar_t* base, int64_t offset, int n, bool vec) const {
    scalar_t* p = base + offset;
    if (vec) {
#pragma unroll
      for (int a = 0; a < kVec / kPerAccess; ++a) {
        Access x;
#pragma unroll
        for (int i = 0; i < kPerAccess; ++i) x.v[i] = static_cast<scalar_t>(v[a * kPerAccess + i]);
        reinterpret_cast<Access*>(p)[a] = x;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (i < n) p[i] = static_cast<scalar_t>(v[i]);
      }
    }
  }
};

// Whether a launch over [batch, d] tensors at these addresses can take the 16-byte path: whole
// chunks only (d a multiple of kVec) and every base 16-byte aligned (nullptr counts as aligned).
template <typename scalar_t>
bool vectorizable(int64_t d, std::initializer_list<const void*> bases) {
  if (d % Chunk<scalar_t>::kVec != 0) return false;
  for (const void* p : bases) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Position of chunk c of a [batch, d] launch: sample b, first element j0, n elements.
struct ChunkPos {
  int64_t b, j0;
  int n;
};

template <typename scalar_t>
__device__ inline ChunkPos chunk_pos(int64_t c, int64_t chunks_per_sample, int64_t d) {
  constexpr int kVec = Chunk<scalar_t>::kVec;
  const int64_t b = c / chunks_per_sample;
  const int64_t j0 = (c - b * chunks_per_sample) * kVec;
  return ChunkPos{b, j0, static_cast<int>(d - j0 < kVec ? d - j0 : kVec)};
}

// The Philox key (seed lo, seed hi) of a generated stream. The seed lives in device memory and
// is read at run time, not at launch, which is what keeps CUDA-graph replays fresh (ops_cuda.cu).
struct Key {
  uint32_t k0, k1;
};

__device__ inline Key key_of(const NoiseSource& src) {
  if (src.has_noise) return Key{0, 0};
  const uint64_t s = static_cast<uint64_t>(*src.seed);
  return Key{math::lo32(s), math::hi32(s)};
}

// The noise of a chunk: the given tensor's elements, or the contract's float32 normals (cast to
// the compute type, as on every backend). `draw` false: the caller multiplies the stream's noise
// by 0, so it is not generated (z = 0); given noise is still read (0 * NaN stays NaN).
template <typename scalar_t>
__device__ inline void load_noise(Chunk<scalar_t>& z, const NoiseSource& src, Key key, const ChunkPos& pos, int64_t d,
                                  bool vec, bool draw = true) {
  using acc_t = typename Chunk<scalar_t>::acc_t;
  if (src.has_noise) {
    z.load(static_cast<const scalar_t*>(src.noise), pos.b * d + pos.j0, pos.n, vec);
    return;
  }
  if (!draw) {
#pragma unroll
    for (int i = 0; i < Chunk<scalar_t>::kVec; ++i) z.v[i] = acc_t(0);
    return;
  }
  const uint64_t g = src.offset + static_cast<uint64_t>(pos.b);
  const uint64_t q0 = static_cast<uint64_t>(pos.j0) / 4;
#pragma unroll
  for (int k = 0; k < Chunk<scalar_t>::kVec / 4; ++k) {
    float n4[4];
    math::normals4(q0 + k, g, key.k0, key.k1, n4);
#pragma unroll
    for (int i = 0; i < 4; ++i) z.v[4 * k + i] = static_cast<acc_t>(n4[i]);
  }
}

template <typename acc_t>
__device__ inline acc_t gather(const Table& table, int64_t t) {
  return table.is_double ? static_cast<acc_t>(static_cast<const double*>(table.data)[t])
                         : static_cast<acc_t>(static_cast<const float*>(table.data)[t]);
}

__device__ inline int64_t step_of(const Steps& s, int64_t b) {
  const int64_t t = s.is_int64 ? static_cast<const int64_t*>(s.data)[b * s.stride]
                               : static_cast<const int32_t*>(s.data)[b * s.stride];
  CUDA_KERNEL_ASSERT(t >= 0 && t < s.n_steps && "fastddpm: t must lie in [0, n_steps)");
  return t;
}

// What an MSE kernel (forward or backward) compares pred with: mse_per_sample's target, the
// noise source itself (x0 nullptr), or target_mse's cx0[k] x0 + ceps[k] eps (k = t[b]).
struct MseTarget {
  NoiseSource noise;
  const void* x0;
  Steps t;
  Table cx0, ceps;
};

inline MseTarget noise_target(const NoiseSource& target) {
  return MseTarget{target, nullptr, Steps{nullptr, false, 0, 0}, Table{nullptr, false}, Table{nullptr, false}};
}

// Of TargetMseArgs and TargetMseBackwardArgs.
template <typename Args>
MseTarget formula_target(const Args& a) {
  return MseTarget{a.noise, a.x0, a.t, a.cx0, a.ceps};
}

template <typename scalar_t>
__device__ inline void load_target(Chunk<scalar_t>& tg, const MseTarget& m, Key key, const ChunkPos& pos, int64_t d,
                                   bool vec) {
  using acc_t = typename Chunk<scalar_t>::acc_t;
  if (m.x0 == nullptr) {
    load_noise(tg, m.noise, key, pos, d, vec);
    return;
  }
  const int64_t t = step_of(m.t, pos.b);
  const acc_t cx0 = gather<acc_t>(m.cx0, t), ceps = gather<acc_t>(m.ceps, t);
  Chunk<scalar_t> e;
  tg.load(static_cast<const scalar_t*>(m.x0), pos.b * d + pos.j0, pos.n, vec);
  load_noise(e, m.noise, key, pos, d, vec, ceps != acc_t(0));
#pragma unroll
  for (int i = 0; i < Chunk<scalar_t>::kVec; ++i) tg.v[i] = math::target_value(tg.v[i], e.v[i], cx0, ceps);
}

// ---- vlb_loss (VlbArgs): the operands of one chunk of x0's elements ---------------------

// Row t of vlb_loss's [n_steps, kVlbColumns] table in the compute type.
template <typename acc_t>
__device__ inline math::VlbRow<acc_t> vlb_row_of(const VlbArgs& a, int64_t t) {
  return a.tables_double ? math::vlb_row<acc_t>(static_cast<const double*>(a.tables), t)
                         : math::vlb_row<acc_t>(static_cast<const float*>(a.tables), t);
}

// x0, its noise eps (given, or the stream's with x0's element index, as q_sample's), the mean
// channel m = out[b, ch, ...] and the variance channel v = out[b, C + ch, ...] (0 when the
// variance is fixed) of a chunk of x0's elements: out's sample b holds out_d elements, the D mean
// elements first, so element j's mean is at b * out_d + j and its variance D further.
template <typename scalar_t>
struct VlbChunk {
  Chunk<scalar_t> x0, eps, m, v;
};

template <typename scalar_t>
__device__ inline void load_vlb(VlbChunk<scalar_t>& c, const VlbArgs& a, Key key, const ChunkPos& pos, bool vec) {
  using acc_t = typename Chunk<scalar_t>::acc_t;
  const int64_t d = a.shape.d, first = pos.b * a.out_d + pos.j0;
  const scalar_t* out = static_cast<const scalar_t*>(a.out);
  c.x0.load(static_cast<const scalar_t*>(a.x0), pos.b * d + pos.j0, pos.n, vec);
  load_noise(c.eps, a.noise, key, pos, d, vec);
  c.m.load(out, first, pos.n, vec);
  if (a.variance_type != math::kVlbFixed) {
    c.v.load(out, first + d, pos.n, vec);
  } else {
#pragma unroll
    for (int i = 0; i < Chunk<scalar_t>::kVec; ++i) c.v.v[i] = acc_t(0);
  }
}

}  // namespace cuda
}  // namespace fastddpm

// The CPU kernels, written once and compiled once per instruction set: kernels_<isa>.cpp
// includes this file with CPU_CAPABILITY (and the matching -m flags) set, as ATen builds its
// own kernels, so at::vec::Vectorized has the width of that build.
//
// Layout of the work: each sample is cut into blocks of kBlock elements; a block is the unit of
// at::parallel_for, of noise generation and of the MSE's partial sums. Blocks start at multiples
// of 4, so every Philox call (four normals) falls inside one block, and the MSE adds up fixed
// blocks in a fixed order: the result does not depend on the number of threads.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fastddpm/kernel_math.h"
#include "kernels.h"

namespace fastddpm {
namespace math {
inline namespace CPU_CAPABILITY {

// The SIMD versions of the functions box_muller uses: Sleef in the AVX2/AVX512 builds (3.5 ulp,
// well inside the contract's 1e-5 for normals), PyTorch's scalar fallback in the default one.
template <>
struct Fn<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V sqrt(V x) { return x.sqrt(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
#if defined(CPU_CAPABILITY_AVX512)
  static V log(V x) { return V(Sleef_logf16_u35(x)); }
  static void sincos(V x, V& s, V& c) {
    const auto sc = Sleef_sincosf16_u35(x);
    s = V(sc.x);
    c = V(sc.y);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  static V log(V x) { return V(Sleef_logf8_u35(x)); }
  static void sincos(V x, V& s, V& c) {
    const auto sc = Sleef_sincosf8_u35(x);
    s = V(sc.x);
    c = V(sc.y);
  }
#else
  static V log(V x) { return x.log(); }
  static void sincos(V x, V& s, V& c) {
    s = x.sin();
    c = x.cos();
  }
#endif
};

}  // namespace CPU_CAPABILITY
}  // namespace math

namespace cpu {
namespace CPU_CAPABILITY {

// Elements per block: a multiple of 4 (whole Philox quads) and of every vector width, and small
// enough that a block's scratch buffers stay in L1.
constexpr int64_t kBlock = 2048;
// Philox quads generated together: the loop over them is what the compiler vectorises.
constexpr int kQuads = 16;
// About this many elements per at::parallel_for task (ATen's own grain for elementwise ops),
// so small inputs stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

using FVec = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Philox4x32-10 across the lanes of a SIMD register: the rounds of math::philox4x32_10, with
// the 32x32->64-bit products formed by vpmuludq on even and odd lanes (the compiler's own
// vectorisation of the scalar code widens to 64-bit lanes and runs at a third of the speed).
// The uniforms test checks every build bit for bit against the reference.
#if defined(CPU_CAPABILITY_AVX512)
struct U32x {  // 16 lanes
  using R = __m512i;
  static constexpr int kLanes = 16;
  static R set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static R add(R a, R b) { return _mm512_add_epi32(a, b); }
  static R xor3(R a, R b, R c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static R even_products(R a, R b) { return _mm512_mul_epu32(a, b); }
  static R odd_products(R a, R b) { return _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32)); }
  static R blend_odd(R even, R odd) { return _mm512_mask_blend_epi32(0xAAAA, even, odd); }
  static R shr64(R a) { return _mm512_srli_epi64(a, 32); }
  static R shl64(R a) { return _mm512_slli_epi64(a, 32); }
  static R iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static __m512 to_uniform(R w) {  // int32 view, negatives x -> ~x, to float, times the scale
    const R x = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(math::kUniformScale));
  }
  static void store(float* p, __m512 v) { _mm512_store_ps(p, v); }
};
#else
struct U32x {  // 8 lanes
  using R = __m256i;
  static constexpr int kLanes = 8;
  static R set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static R add(R a, R b) { return _mm256_add_epi32(a, b); }
  static R xor3(R a, R b, R c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static R even_products(R a, R b) { return _mm256_mul_epu32(a, b); }
  static R odd_products(R a, R b) { return _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32)); }
  static R blend_odd(R even, R odd) { return _mm256_blend_epi32(even, odd, 0xAA); }
  static R shr64(R a) { return _mm256_srli_epi64(a, 32); }
  static R shl64(R a) { return _mm256_slli_epi64(a, 32); }
  static R iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static __m256 to_uniform(R w) {
    const R x = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(math::kUniformScale));
  }
  static void store(float* p, __m256 v) { _mm256_store_ps(p, v); }
};
#endif

// (hi, lo) 32-bit halves of the lane-wise 64-bit products m * b.
inline void mulhilo(U32x::R m, U32x::R b, U32x::R& hi, U32x::R& lo) {
  const U32x::R even = U32x::even_products(m, b);
  const U32x::R odd = U32x::odd_products(m, b);
  lo = U32x::blend_odd(even, U32x::shl64(odd));
  hi = U32x::blend_odd(U32x::shr64(even), odd);
}

// The uniforms of quads q .. q + kQuads - 1 of sample g, lane-major: u[k][l] comes from word k
// of quad q + l. q is a multiple of kQuads (blocks and groups are aligned), so adding the lane
// index to lo32(q) never wraps and the whole group shares hi32(q).
inline void uniforms_group(uint64_t q, uint64_t g, uint32_t k0, uint32_t k1, float u[4][kQuads]) {
  using R = U32x::R;
  const R m0 = U32x::set1(math::kPhiloxM0), m1 = U32x::set1(math::kPhiloxM1);
  for (int l = 0; l < kQuads; l += U32x::kLanes) {
    R c0 = U32x::add(U32x::set1(math::lo32(q + l)), U32x::iota());
    R c1 = U32x::set1(math::hi32(q + l));
    R c2 = U32x::set1(math::lo32(g)), c3 = U32x::set1(math::hi32(g));
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      R hi0, lo0, hi1, lo1;
      mulhilo(m0, c0, hi0, lo0);
      mulhilo(m1, c2, hi1, lo1);
      c0 = U32x::xor3(hi1, c1, U32x::set1(key0));
      c1 = lo1;
      c2 = U32x::xor3(hi0, c3, U32x::set1(key1));
      c3 = lo0;
      key0 += math::kPhiloxW0;
      key1 += math::kPhiloxW1;
    }
    U32x::store(u[0] + l, U32x::to_uniform(c0));
    U32x::store(u[1] + l, U32x::to_uniform(c1));
    U32x::store(u[2] + l, U32x::to_uniform(c2));
    U32x::store(u[3] + l, U32x::to_uniform(c3));
  }
}
#else
// The uniforms of quads q .. q + kQuads - 1 of sample g, lane-major: u[k][l] comes from word k
// of quad q + l.
inline void uniforms_group(uint64_t q, uint64_t g, uint32_t k0, uint32_t k1, float u[4][kQuads]) {
  for (int l = 0; l < kQuads; ++l) {
    const math::Philox4 w = math::noise_words(q + l, g, k0, k1);
    u[0][l] = math::uint_to_uniform(w.w0);
    u[1][l] = math::uint_to_uniform(w.w1);
    u[2][l] = math::uint_to_uniform(w.w2);
    u[3][l] = math::uint_to_uniform(w.w3);
  }
}
#endif

// The contract's float32 normals of elements [j0, j0 + n) of the sample with global index g;
// j0 is a multiple of 4.
inline void fill_normals(float* out, int64_t n, int64_t j0, uint64_t g, uint32_t k0, uint32_t k1) {
  uint64_t q = static_cast<uint64_t>(j0) / 4;
  for (int64_t i = 0; i < n; i += 4 * kQuads, q += kQuads) {
    alignas(64) float u[4][kQuads];
    uniforms_group(q, g, k0, k1, u);
    alignas(64) float z[4][kQuads];
    for (int l = 0; l < kQuads; l += FVec::size()) {
      FVec n0, n1, n2, n3;
      math::box_muller(FVec::loadu(u[0] + l), FVec::loadu(u[1] + l), n0, n1);
      math::box_muller(FVec::loadu(u[2] + l), FVec::loadu(u[3] + l), n2, n3);
      n0.store(z[0] + l);
      n1.store(z[1] + l);
      n2.store(z[2] + l);
      n3.store(z[3] + l);
    }
    // Element 4 l + k of the group is lane k of quad l.
    if (n - i >= 4 * kQuads) {  // fixed trip counts, so the compiler turns this into shuffles
      for (int l = 0; l < kQuads; ++l) {
        for (int k = 0; k < 4; ++k) out[i + 4 * l + k] = z[k][l];
      }
    } else {
      for (int64_t e = 0; e < n - i; ++e) out[i + e] = z[e % 4][e / 4];
    }
  }
}

// The uniforms themselves, element order (tests compare them bit for bit with the reference).
void philox_uniforms(float* out, int64_t n_quads, uint64_t g, uint32_t k0, uint32_t k1) {
  for (int64_t q = 0; q < n_quads; q += kQuads) {
    alignas(64) float u[4][kQuads];
    uniforms_group(static_cast<uint64_t>(q), g, k0, k1, u);
    for (int64_t l = 0; l < kQuads && q + l < n_quads; ++l) {
      for (int k = 0; k < 4; ++k) out[4 * (q + l) + k] = u[k][l];
    }
  }
}

template <typename acc_t>
inline acc_t gather(const Table& table, int64_t t) {
  return table.is_double ? static_cast<acc_t>(static_cast<const double*>(table.data)[t])
                         : static_cast<acc_t>(static_cast<const float*>(table.data)[t]);
}

inline int64_t step_of(const Steps& t, int64_t b) {
  return t.is_int64 ? static_cast<const int64_t*>(t.data)[b * t.stride]
                    : static_cast<const int32_t*>(t.data)[b * t.stride];
}

// Runs fn(b, j0, n) for every block [j0, j0 + n) of every sample b, in parallel; fn gets the
// block's flat index too (for per-block results).
template <typename F>
void for_each_block(const Shape& s, const F& fn) {
  const int64_t per_sample = (s.d + kBlock - 1) / kBlock;
  const int64_t blocks = s.batch * per_sample;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, std::min(s.d, kBlock)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / per_sample;
      const int64_t j0 = (blk % per_sample) * kBlock;
      fn(blk, b, j0, std::min(kBlock, s.d - j0));
    }
  });
}

// Scratch for one block in the compute type; the half types are converted through it, float
// and double are read and written in place.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct BlockIo {
  static constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;

  static const acc_t* load(const void* base, int64_t offset, int64_t n, acc_t* buf) {
    const scalar_t* src = static_cast<const scalar_t*>(base) + offset;
    if constexpr (kInPlace) {
      return src;
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
      return buf;
    }
  }

  // The noise of a block: the given tensor, or the contract's float32 normals in acc_t.
  static const acc_t* noise(const NoiseSource& src, const Shape& s, int64_t b, int64_t j0, int64_t n,
                            acc_t* buf) {
    if (src.noise != nullptr) return load(src.noise, b * s.d + j0, n, buf);
    const uint64_t g = src.offset + static_cast<uint64_t>(b);
    if constexpr (std::is_same_v<acc_t, float>) {
      fill_normals(buf, n, j0, g, src.k0, src.k1);
    } else {  // float64 work uses the float32 normals, as the contract defines them
      alignas(64) float f[kBlock];
      fill_normals(f, n, j0, g, src.k0, src.k1);
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(f[i]);
    }
    return buf;
  }

  static acc_t* out(void* base, int64_t offset, acc_t* buf) {
    if constexpr (kInPlace) {
      return static_cast<scalar_t*>(base) + offset;
    } else {
      return buf;
    }
  }

  static void store(void* base, int64_t offset, int64_t n, const acc_t* buf) {
    if constexpr (!kInPlace) {
      scalar_t* dst = static_cast<scalar_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
    }
  }
};

template <typename scalar_t>
void q_sample_impl(const QSampleArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  using Io = BlockIo<scalar_t>;
  for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
    alignas(64) acc_t xbuf[kBlock], ebuf[kBlock], ybuf[kBlock];
    const int64_t t = step_of(a.t, b);
    const acc_t ca = gather<acc_t>(a.sqrt_ab, t), cb = gather<acc_t>(a.sqrt_1m_ab, t);
    const int64_t offset = b * a.shape.d + j0;
    const acc_t* x = Io::load(a.x0, offset, n, xbuf);
    const acc_t* e = Io::noise(a.noise, a.shape, b, j0, n, ebuf);
    acc_t* y = Io::out(a.out, offset, ybuf);
    const V va(ca), vb(cb);
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      math::q_sample_value(V::loadu(x + i), V::loadu(e + i), va, vb).store(y + i);
    }
    for (; i < n; ++i) y[i] = math::q_sample_value(x[i], e[i], ca, cb);
    Io::store(a.out, offset, n, y);
  });
}

template <typename scalar_t>
void p_sample_step_impl(const PSampleArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  using Io = BlockIo<scalar_t>;
  for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
    alignas(64) acc_t xbuf[kBlock], ebuf[kBlock], zbuf[kBlock], ybuf[kBlock];
    const int64_t t = step_of(a.t, b);
    const acc_t c1 = gather<acc_t>(a.c1, t), c2 = gather<acc_t>(a.c2, t), sg = gather<acc_t>(a.sigma, t);
    const int64_t offset = b * a.shape.d + j0;
    const acc_t* x = Io::load(a.x_t, offset, n, xbuf);
    const acc_t* e = Io::load(a.eps_theta, offset, n, ebuf);
    const acc_t* z = Io::noise(a.noise, a.shape, b, j0, n, zbuf);
    acc_t* y = Io::out(a.out, offset, ybuf);
    const V v1(c1), v2(c2), vs(sg);
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      math::p_sample_value(V::loadu(x + i), V::loadu(e + i), V::loadu(z + i), v1, v2, vs).store(y + i);
    }
    for (; i < n; ++i) y[i] = math::p_sample_value(x[i], e[i], z[i], c1, c2, sg);
    Io::store(a.out, offset, n, y);
  });
}

template <typename scalar_t>
void mse_per_sample_impl(const MseArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;  // float32 for the half types, float64 for float64
  using V = at::vec::Vectorized<acc_t>;
  using Io = BlockIo<scalar_t>;
  const int64_t per_sample = (a.shape.d + kBlock - 1) / kBlock;
  // One partial sum per block, then per sample in block order: independent of thread count.
  std::vector<double> partial(static_cast<size_t>(a.shape.batch * per_sample));
  for_each_block(a.shape, [&](int64_t blk, int64_t b, int64_t j0, int64_t n) {
    alignas(64) acc_t pbuf[kBlock], tbuf[kBlock];
    const int64_t offset = b * a.shape.d + j0;
    const acc_t* p = Io::load(a.pred, offset, n, pbuf);
    const acc_t* tg = Io::noise(a.target, a.shape, b, j0, n, tbuf);
    V acc0(acc_t(0)), acc1(acc_t(0));  // two chains hide the add latency
    int64_t i = 0;
    for (; i + 2 * V::size() <= n; i += 2 * V::size()) {
      acc0 += math::squared_error(V::loadu(p + i), V::loadu(tg + i));
      acc1 += math::squared_error(V::loadu(p + i + V::size()), V::loadu(tg + i + V::size()));
    }
    alignas(64) acc_t lanes[V::size()];
    (acc0 + acc1).store(lanes);
    double sum = 0;
    for (int l = 0; l < V::size(); ++l) sum += lanes[l];
    for (; i < n; ++i) sum += math::squared_error(p[i], tg[i]);
    partial[blk] = sum;
  });
  acc_t* out = static_cast<acc_t*>(a.out);
  for (int64_t b = 0; b < a.shape.batch; ++b) {
    double sum = 0;
    for (int64_t k = 0; k < per_sample; ++k) sum += partial[b * per_sample + k];
    out[b] = static_cast<acc_t>(sum / static_cast<double>(a.shape.d));
  }
}

template <typename scalar_t>
void mse_per_sample_backward_impl(const MseBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  using Io = BlockIo<scalar_t>;
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
    alignas(64) acc_t pbuf[kBlock], tbuf[kBlock], ybuf[kBlock];
    const acc_t scale = grad[b] * acc_t(2) / static_cast<acc_t>(a.shape.d);
    const int64_t offset = b * a.shape.d + j0;
    const acc_t* p = Io::load(a.pred, offset, n, pbuf);
    const acc_t* tg = Io::noise(a.target, a.shape, b, j0, n, tbuf);
    acc_t* y = Io::out(a.out, offset, ybuf);
    const V vs(scale);
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      math::mse_grad_value(V::loadu(p + i), V::loadu(tg + i), vs).store(y + i);
    }
    for (; i < n; ++i) y[i] = math::mse_grad_value(p[i], tg[i], scale);
    Io::store(a.out, offset, n, y);
  });
}

void q_sample(const QSampleArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_q_sample_cpu",
                                  [&] { q_sample_impl<scalar_t>(a); });
}

void p_sample_step(const PSampleArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_p_sample_step_cpu",
                                  [&] { p_sample_step_impl<scalar_t>(a); });
}

void mse_per_sample(const MseArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_mse_per_sample_cpu",
                                  [&] { mse_per_sample_impl<scalar_t>(a); });
}

void mse_per_sample_backward(const MseBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_mse_per_sample_backward_cpu",
                                  [&] { mse_per_sample_backward_impl<scalar_t>(a); });
}

const KernelTable& kernel_table() {
  static const KernelTable table{&q_sample, &p_sample_step, &mse_per_sample, &mse_per_sample_backward,
                                 &philox_uniforms};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastddpm

// The arithmetic of fastddpm's kernels, written once and compiled into both the CPU (.cpp) and
// the CUDA (.cu) kernels, so CPU tests exercise the exact formulas the GPU runs.
//
// Everything here is an inline C10_HOST_DEVICE function (C10_HOST_DEVICE is empty outside
// nvcc). Only <stdint.h>/<math.h> functions that have device overloads are used (::logf,
// ::sqrtf, ::sinf, ::cosf); no std:: math.
//
// Noise contract (docs/noise.md, mirrored by fastddpm/philox.py): the normal of element j of the
// sample with global index g = sample_offset + b is lane j % 4 of four Box-Muller normals made
// from Philox4x32-10 with key (seed lo, seed hi) and counter (q lo, q hi, g lo, g hi),
// q = j / 4. The timestep of sample g is (w0 * n_steps) >> 32 with w0 the first word at counter
// (0xFFFFFFFF, 0xFFFFFFFF, g lo, g hi).
#pragma once

#include <c10/macros/Macros.h>
#include <math.h>
#include <stdint.h>

namespace fastddpm {
namespace math {
// Each CPU build of the kernels (one per instruction set, see csrc/cpu) defines CPU_CAPABILITY
// as ATen does. The inline namespace keeps each build's copies of these inline functions apart:
// the linker would otherwise merge copies compiled with different -m flags into one.
inline namespace CPU_CAPABILITY {

// Random123's Philox4x32 constants (the same rounds as Triton's tl.philox).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// float32 bits 0x2FFFFFFF, just below 2**-31: Triton's uint_to_uniform_float scale.
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kBoxMullerMinU = 1e-7f;
constexpr float kTwoPi = 6.283185307179586f;  // float32(2 pi), as philox.py multiplies in fp32
constexpr uint32_t kTimestepCounter = 0xFFFFFFFFu;  // counter words 0 and 1 of the t stream

struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

C10_HOST_DEVICE inline uint32_t lo32(uint64_t v) { return static_cast<uint32_t>(v); }
C10_HOST_DEVICE inline uint32_t hi32(uint64_t v) { return static_cast<uint32_t>(v >> 32); }

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
C10_HOST_DEVICE inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                             uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = hi32(p1) ^ c1 ^ k0;
    const uint32_t n2 = hi32(p0) ^ c3 ^ k1;
    c0 = n0;
    c1 = lo32(p1);
    c2 = n2;
    c3 = lo32(p0);
    k0 += kPhiloxW0;  // the key bump after the last round is unused
    k1 += kPhiloxW1;
  }
  return Philox4{c0, c1, c2, c3};
}

// A Philox word -> float32 uniform in [0, 1), bit for bit as Triton's uint_to_uniform_float:
// the word as int32, negatives x mapped to -x-1 (written ~x: no signed overflow), times 2**-31.
C10_HOST_DEVICE inline float uint_to_uniform(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  return static_cast<float>(x < 0 ? ~x : x) * kUniformScale;
}

// Elementwise functions of a compute type T. float here; a CPU vector type specialises it in
// csrc/cpu so box_muller below is the one definition for scalars and SIMD vectors alike.
template <typename T>
struct Fn;

template <>
struct Fn<float> {
  static C10_HOST_DEVICE float log(float x) { return ::logf(x); }
  static C10_HOST_DEVICE float sqrt(float x) { return ::sqrtf(x); }
  static C10_HOST_DEVICE void sincos(float x, float& s, float& c) {
    s = ::sinf(x);
    c = ::cosf(x);
  }
  static C10_HOST_DEVICE float max(float a, float b) { return a < b ? b : a; }
  static C10_HOST_DEVICE float clamp_sym(float x, float lim) { return x < -lim ? -lim : (x > lim ? lim : x); }
};

// The one function the double kernels need (the clipped step's clamp): NaN passes through, as in
// torch.clamp.
template <>
struct Fn<double> {
  static C10_HOST_DEVICE double clamp_sym(double x, double lim) { return x < -lim ? -lim : (x > lim ? lim : x); }
};

// Box-Muller: uniforms (u0, u1) -> normals (r cos th, r sin th), r = sqrt(-2 log max(u0, 1e-7)),
// th = float32(2 pi) * u1, all in float32.
template <typename T>
C10_HOST_DEVICE inline void box_muller(T u0, T u1, T& n0, T& n1) {
  const T r = Fn<T>::sqrt(T(-2.0f) * Fn<T>::log(Fn<T>::max(u0, T(kBoxMullerMinU))));
  T s, c;
  Fn<T>::sincos(T(kTwoPi) * u1, s, c);
  n0 = r * c;
  n1 = r * s;
}

// The Philox counter of quad q (elements 4q .. 4q+3) of the sample with global index g.
C10_HOST_DEVICE inline Philox4 noise_words(uint64_t q, uint64_t g, uint32_t k0, uint32_t k1) {
  return philox4x32_10(lo32(q), hi32(q), lo32(g), hi32(g), k0, k1);
}

// The four float32 normals of quad q of sample g; element j = 4q + i takes n[i].
C10_HOST_DEVICE inline void normals4(uint64_t q, uint64_t g, uint32_t k0, uint32_t k1, float n[4]) {
  const Philox4 w = noise_words(q, g, k0, k1);
  box_muller(uint_to_uniform(w.w0), uint_to_uniform(w.w1), n[0], n[1]);
  box_muller(uint_to_uniform(w.w2), uint_to_uniform(w.w3), n[2], n[3]);
}

// The timestep in [0, n_steps) that loss draws for the sample with global index g.
C10_HOST_DEVICE inline int64_t sample_timestep(uint64_t g, uint32_t n_steps, uint32_t k0, uint32_t k1) {
  const uint32_t w0 = philox4x32_10(kTimestepCounter, kTimestepCounter, lo32(g), hi32(g), k0, k1).w0;
  return static_cast<int64_t>((static_cast<uint64_t>(w0) * n_steps) >> 32);
}

// ---- the per-element formulas of the ops (T: a scalar or a CPU SIMD vector) ----------

// q_sample: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.
template <typename T>
C10_HOST_DEVICE inline T q_sample_value(T x0, T noise, T sqrt_ab, T sqrt_1m_ab) {
  return sqrt_ab * x0 + sqrt_1m_ab * noise;
}

// p_sample step: x_{t-1} = c1_t x_t - c2_t eps_theta + sigma_t z.
template <typename T>
C10_HOST_DEVICE inline T p_sample_value(T x_t, T eps_theta, T z, T c1, T c2, T sigma) {
  return c1 * x_t - c2 * eps_theta + sigma * z;
}

// One term of the per-sample MSE.
template <typename T>
C10_HOST_DEVICE inline T squared_error(T pred, T target) {
  const T d = pred - target;
  return d * d;
}

// d MSE_b / d pred = grad_b * 2 / D * (pred - target); scale = grad_b * 2 / D per sample.
template <typename T>
C10_HOST_DEVICE inline T mse_grad_value(T pred, T target, T scale) {
  return scale * (pred - target);
}

// ---- the samplers' clipped step and the general training target ----------------------------

// Classifier-free guidance: out = u + w (c - u).
template <typename T>
C10_HOST_DEVICE inline T guided_value(T u, T c, T w) {
  return u + w * (c - u);
}

// The predicted x0 of the clipped step: clamp(a x_t + b out, -lim, lim) * inv_scale (inv_scale is
// 1 for clip=lim, 1 / lim for thresholding at the bound lim; clip=inf does not clamp).
template <typename T>
C10_HOST_DEVICE inline T clipped_x0_value(T x_t, T out, T a, T b, T lim, T inv_scale) {
  return Fn<T>::clamp_sym(a * x_t + b * out, lim) * inv_scale;
}

// The general sampler step (SolverStepArgs in op_args.h): its x0 is the clipped step's,
// clamp(c0 x + c1 out, lim) * inv_scale, and each output row adds one table-weighted operand
// at a time to an accumulator, starting from 0 (x, out, x0, then the history, then z).
template <typename T>
C10_HOST_DEVICE inline T solver_x0_value(T x, T out, T c0, T c1, T lim, T inv_scale) {
  return clipped_x0_value(x, out, c0, c1, lim, inv_scale);
}

template <typename T>
C10_HOST_DEVICE inline T solver_term(T acc, T coef, T operand) {
  return acc + coef * operand;
}

// The training target of every prediction type: cx0 x0 + ceps eps (q_sample's form).
template <typename T>
C10_HOST_DEVICE inline T target_value(T x0, T eps, T cx0, T ceps) {
  return q_sample_value(x0, eps, cx0, ceps);
}

}  // namespace CPU_CAPABILITY
}  // namespace math
}  // namespace fastddpm

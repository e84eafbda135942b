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
  static C10_HOST_DEVICE float exp(float x) { return ::expf(x); }
  static C10_HOST_DEVICE float tanh(float x) { return ::tanhf(x); }
  static C10_HOST_DEVICE float sqrt(float x) { return ::sqrtf(x); }
  static C10_HOST_DEVICE void sincos(float x, float& s, float& c) {
    s = ::sinf(x);
    c = ::cosf(x);
  }
  static C10_HOST_DEVICE float max(float a, float b) { return a < b ? b : a; }
  static C10_HOST_DEVICE float clamp_sym(float x, float lim) { return x < -lim ? -lim : (x > lim ? lim : x); }
};

// The double kernels' functions: the clipped step's clamp (NaN passes through, as in
// torch.clamp) and the variational bound's exp, log and tanh.
template <>
struct Fn<double> {
  static C10_HOST_DEVICE double clamp_sym(double x, double lim) { return x < -lim ? -lim : (x > lim ? lim : x); }
  static C10_HOST_DEVICE double log(double x) { return ::log(x); }
  static C10_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static C10_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
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

// ---- the learned variance (solver_step's var, vlb_loss's variance channels) ----------------

// The learned range's log variance (objectives.learned_logvar): f = (v + 1) / 2 interpolates
// between log_min (f = 0) and log_max (f = 1): f log_max + (1 - f) log_min.
template <typename T>
C10_HOST_DEVICE inline T learned_range_logvar(T v, T log_max, T log_min) {
  const T f = (v + T(1)) * T(0.5);
  return f * log_max + (T(1) - f) * log_min;
}

// solver_step's per-element scale of z given var: exp(0.5 (f c3 + (1 - f) c4)), f = (var + 1) / 2,
// c3 = coef[k, 0, 3], c4 = coef[k, 0, 4] (T: a scalar or a CPU vector with Fn<T>::exp).
template <typename T>
C10_HOST_DEVICE inline T learned_noise_scale(T var, T c3, T c4) {
  return Fn<T>::exp(T(0.5) * learned_range_logvar(var, c3, c4));
}

// ---- the variational bound (vlb_loss, op_args.h: VlbArgs) -----------------------------------
// T = float for every 16/32-bit dtype, double for float64; per element j of a sample with the
// table row c = tables[t[b]] (VlbRow, VLB_COLUMNS order). Everything but the decoder NLL
// (vlb_nll_term, vlb_value, vlb_grad_value: scalars only) also takes a CPU vector T (with
// Fn<T>::exp and a VlbRow<T> of broadcast values): no unary minus, no comparisons there.

constexpr int kVlbMeanEps = 0, kVlbMeanX0 = 1;
constexpr int kVlbLearned = 0, kVlbLearnedRange = 1, kVlbFixed = 2;
// objectives.py's constants: the CDF approximation's sqrt(2/pi) and cubic coefficient, half a
// bin of 8-bit data on [-1, 1], the floor of the decoder's probabilities, ln 2.
constexpr double kVlbCdfA = 0.7978845608028654;
constexpr double kVlbCdfB = 0.044715;
constexpr double kVlbBin = 1.0 / 255.0;
constexpr double kVlbLogFloor = 1e-12;
constexpr double kVlbLn2 = 0.6931471805599453;

template <typename T>
struct VlbRow {
  T sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, sqrt_recip_ab, sqrt_recipm1_ab, fixed_logvar;
};

// Row k of a [n_steps, 9] table (row-major, float or double), in T.
template <typename T, typename S>
C10_HOST_DEVICE inline VlbRow<T> vlb_row(const S* tables, int64_t k) {
  const S* r = tables + k * 9;
  return VlbRow<T>{T(r[0]), T(r[1]), T(r[2]), T(r[3]), T(r[4]), T(r[5]), T(r[6]), T(r[7]), T(r[8])};
}

// The model's log variance lv_p from the variance channel's raw value (ignored when fixed), and
// d lv_p / d vraw (1 learned, 0.5 (log_beta - post_logvar) learned_range, 0 fixed).
template <typename T>
C10_HOST_DEVICE inline T vlb_model_logvar(T vraw, const VlbRow<T>& c, int variance_type) {
  if (variance_type == kVlbLearned) return vraw;
  if (variance_type == kVlbLearnedRange) return learned_range_logvar(vraw, c.log_beta, c.post_logvar);
  return c.fixed_logvar;
}

template <typename T>
C10_HOST_DEVICE inline T vlb_dlogvar_dvraw(const VlbRow<T>& c, int variance_type) {
  if (variance_type == kVlbLearned) return T(1);
  if (variance_type == kVlbLearnedRange) return T(0.5) * (c.log_beta - c.post_logvar);
  return T(0);
}

// The per-element quantities both passes need: the target of the MSE, the posterior's mean
// mean_q and the model's mean_p (from m, the mean channel), and d mean_p / d m.
template <typename T>
struct VlbMeans {
  T target, mean_q, mean_p, dmean_dm;
};

template <typename T>
C10_HOST_DEVICE inline VlbMeans<T> vlb_means(T x0, T eps, T m, const VlbRow<T>& c, int mean_type) {
  const T x_t = c.sqrt_ab * x0 + c.sqrt_1m_ab * eps;
  VlbMeans<T> r;
  T x0_pred;
  if (mean_type == kVlbMeanEps) {
    r.target = eps;
    x0_pred = c.sqrt_recip_ab * x_t - c.sqrt_recipm1_ab * m;
    r.dmean_dm = T(0) - c.post_c1 * c.sqrt_recipm1_ab;
  } else {
    r.target = x0;
    x0_pred = m;
    r.dmean_dm = c.post_c1;
  }
  r.mean_q = c.post_c1 * x0 + c.post_c2 * x_t;
  r.mean_p = c.post_c1 * x0_pred + c.post_c2 * x_t;
  return r;
}

// KL(N(mean_q, e^lv_q) || N(mean_p, e^lv_p)) in nats: 0.5 (-1 + lv_p - lv_q + e^(lv_q - lv_p)
// + (mean_q - mean_p)^2 e^-lv_p); e^(lv_q - lv_p) is taken directly (no ratio of exps).
template <typename T>
C10_HOST_DEVICE inline T vlb_kl_term(T mean_q, T mean_p, T lv_q, T lv_p) {
  const T d = mean_q - mean_p;
  return T(0.5) * (T(-1) + lv_p - lv_q + Fn<T>::exp(lv_q - lv_p) + d * d * Fn<T>::exp(T(0) - lv_p));
}

// Its derivatives: d/dmean_p = -(mean_q - mean_p) e^-lv_p, d/dlv_p = 0.5 (1 - e^(lv_q - lv_p)
// - (mean_q - mean_p)^2 e^-lv_p).
template <typename T>
C10_HOST_DEVICE inline void vlb_kl_grad(T mean_q, T mean_p, T lv_q, T lv_p, T& d_mean, T& d_lv) {
  const T d = mean_q - mean_p;
  const T inv_var = Fn<T>::exp(T(0) - lv_p);
  d_mean = (mean_p - mean_q) * inv_var;
  d_lv = T(0.5) * (T(1) - Fn<T>::exp(lv_q - lv_p) - d * d * inv_var);
}

// The approximate standard normal CDF Phi(a) = 0.5 (1 + tanh(A (a + B a^3))); with dphi its
// derivative 0.5 A (1 + 3 B a^2) (1 - tanh^2).
template <typename T>
C10_HOST_DEVICE inline T vlb_cdf(T a, T& dphi) {
  const T th = Fn<T>::tanh(T(kVlbCdfA) * (a + T(kVlbCdfB) * a * a * a));
  dphi = T(0.5) * T(kVlbCdfA) * (T(1) + T(3) * T(kVlbCdfB) * a * a) * (T(1) - th * th);
  return T(0.5) * (T(1) + th);
}

// The decoder's negative log likelihood -log P(x0; mean_p, log_scale = 0.5 lv_p) (t == 0) and,
// when d_mean is not null, its derivatives d/dmean_p and d/dlv_p (the clamp at 1e-12 passes no
// gradient where the probability is below it, as torch.clamp). c = x0 - mean_p, s = e^-log_scale,
// a+- = s (c +- 1/255); P = Phi(a+) (x0 < -0.999), 1 - Phi(a-) (x0 > 0.999), else
// Phi(a+) - Phi(a-), each max(P, 1e-12).
template <typename T>
C10_HOST_DEVICE inline T vlb_nll_term(T x0, T mean_p, T lv_p, T* d_mean = nullptr, T* d_lv = nullptr) {
  const T log_scale = T(0.5) * lv_p;
  const T centered = x0 - mean_p;
  const T s = Fn<T>::exp(-log_scale);
  const T ap = s * (centered + T(kVlbBin));
  const T am = s * (centered - T(kVlbBin));
  T dp, dm;
  const T cdf_p = vlb_cdf(ap, dp);
  const T cdf_m = vlb_cdf(am, dm);
  T prob, gp, gm;  // P and dP/da+, dP/da-
  if (x0 < T(-0.999)) {
    prob = cdf_p;
    gp = dp;
    gm = T(0);
  } else if (x0 > T(0.999)) {
    prob = T(1) - cdf_m;
    gp = T(0);
    gm = -dm;
  } else {
    prob = cdf_p - cdf_m;
    gp = dp;
    gm = -dm;
  }
  // max(P, 1e-12) with a NaN P passed through, as torch.clamp; its gradient where P >= 1e-12.
  const T p = prob < T(kVlbLogFloor) ? T(kVlbLogFloor) : prob;
  if (d_mean != nullptr) {
    // dlogL/da = (dP/da) / P where P is not floored; da/dmean_p = -s, da/dlog_scale = -a.
    const T inv = prob >= T(kVlbLogFloor) ? T(1) / p : T(0);
    const T lp = gp * inv, lm = gm * inv;
    const T dlogl_dmean = -(lp + lm) * s;
    const T dlogl_dlogscale = -(lp * ap + lm * am);
    *d_mean = -dlogl_dmean;
    *d_lv = T(-0.5) * dlogl_dlogscale;
  }
  return -Fn<T>::log(p);
}

// One element of the forward where t > 0 (scalar or vector): (target - m)^2 into sq, the KL
// term (nats, before / D / ln 2) into term.
template <typename T>
C10_HOST_DEVICE inline void vlb_kl_value(T x0, T eps, T m, T vraw, const VlbRow<T>& c, int mean_type,
                                         int variance_type, T& sq, T& term) {
  const VlbMeans<T> r = vlb_means(x0, eps, m, c, mean_type);
  const T lv_p = vlb_model_logvar(vraw, c, variance_type);
  sq = squared_error(r.target, m);
  term = vlb_kl_term(r.mean_q, r.mean_p, c.post_logvar, lv_p);
}

// Its backward (scalar or vector): d/dm into g_m, d/dvraw into g_v (0 when fixed). mse_scale =
// g_mse 2 / D, w = g_vb / (D ln 2) (the sample's incoming gradients); detach_mean keeps the vb
// term off the mean channel.
template <typename T>
C10_HOST_DEVICE inline void vlb_kl_grad_value(T x0, T eps, T m, T vraw, const VlbRow<T>& c, int mean_type,
                                              int variance_type, bool detach_mean, T mse_scale, T w, T& g_m,
                                              T& g_v) {
  const VlbMeans<T> r = vlb_means(x0, eps, m, c, mean_type);
  const T lv_p = vlb_model_logvar(vraw, c, variance_type);
  T d_mean, d_lv;
  vlb_kl_grad(r.mean_q, r.mean_p, c.post_logvar, lv_p, d_mean, d_lv);
  g_m = mse_grad_value(m, r.target, mse_scale);
  if (!detach_mean) g_m = g_m + w * d_mean * r.dmean_dm;
  g_v = w * d_lv * vlb_dlogvar_dvraw(c, variance_type);
}

// One element of the forward (scalars): (target - m)^2 into sq, the vb term (nats, before / D /
// ln 2) into term; t0 selects the decoder NLL (t == 0) over the KL.
template <typename T>
C10_HOST_DEVICE inline void vlb_value(T x0, T eps, T m, T vraw, const VlbRow<T>& c, int mean_type,
                                      int variance_type, bool t0, T& sq, T& term) {
  const VlbMeans<T> r = vlb_means(x0, eps, m, c, mean_type);
  const T lv_p = vlb_model_logvar(vraw, c, variance_type);
  sq = squared_error(r.target, m);
  term = t0 ? vlb_nll_term(x0, r.mean_p, lv_p) : vlb_kl_term(r.mean_q, r.mean_p, c.post_logvar, lv_p);
}

// One element of the backward (scalars): vlb_kl_grad_value's, with the decoder NLL where t0.
template <typename T>
C10_HOST_DEVICE inline void vlb_grad_value(T x0, T eps, T m, T vraw, const VlbRow<T>& c, int mean_type,
                                           int variance_type, bool t0, bool detach_mean, T mse_scale, T w, T& g_m,
                                           T& g_v) {
  const VlbMeans<T> r = vlb_means(x0, eps, m, c, mean_type);
  const T lv_p = vlb_model_logvar(vraw, c, variance_type);
  T d_mean, d_lv;
  if (t0) {
    vlb_nll_term(x0, r.mean_p, lv_p, &d_mean, &d_lv);
  } else {
    vlb_kl_grad(r.mean_q, r.mean_p, c.post_logvar, lv_p, d_mean, d_lv);
  }
  g_m = mse_grad_value(m, r.target, mse_scale);
  if (!detach_mean) g_m = g_m + w * d_mean * r.dmean_dm;
  g_v = w * d_lv * vlb_dlogvar_dvraw(c, variance_type);
}

}  // namespace CPU_CAPABILITY
}  // namespace math
}  // namespace fastddpm

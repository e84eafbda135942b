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
#include <iterator>
#include <type_traits>
#include <vector>

#include "fastddpm/kernel_math.h"
#include "kernels.h"

namespace fastddpm {
namespace math {
inline namespace CPU_CAPABILITY {

using FVec = at::vec::Vectorized<float>;

// Box-Muller's log and sincos for SIMD vectors, as polynomials on the ranges box_muller gives
// them (Cephes' logf and sinf/cosf coefficients, a few float32 ulp; tests/test_cpu_kernels.py
// checks them over those ranges against float64): several times cheaper than Sleef's full-range
// functions, which are out-of-line calls through a dispatch pointer. Written once on
// at::vec::Vectorized: the AVX2 and AVX-512 builds share them, each at its own width.

// log x for x in [1e-7, 1] (box_muller's max(u, 1e-7): positive normal floats only).
// x = m 2^e with m in [sqrt(1/2), sqrt(2)); log x = e log 2 + log(1 + f), f = m - 1 (exact).
// Subtracting the bits of sqrt(1/2) first makes the exponent field count from there, so one
// shift gives e and one mask takes it out of x, leaving m.
inline FVec log_unit(FVec x) {
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec bits = at::vec::cast<int32_t>(x);
  const IVec shifted = bits - IVec(0x3F3504F3);  // 0x3F3504F3: float32 sqrt(1/2)
  const FVec e = at::vec::convert_to_fp_of_same_size<float>(shifted >> IVec(23));
  const FVec m = at::vec::cast<float>(bits - (shifted & IVec(static_cast<int32_t>(0xFF800000u))));
  const FVec f = m - FVec(1.0f);
  const FVec z = f * f;
  FVec p(7.0376836292e-2f);
  p = at::vec::fmadd(p, f, FVec(-1.1514610310e-1f));
  p = at::vec::fmadd(p, f, FVec(1.1676998740e-1f));
  p = at::vec::fmadd(p, f, FVec(-1.2420140846e-1f));
  p = at::vec::fmadd(p, f, FVec(1.4249322787e-1f));
  p = at::vec::fmadd(p, f, FVec(-1.6668057665e-1f));
  p = at::vec::fmadd(p, f, FVec(2.0000714765e-1f));
  p = at::vec::fmadd(p, f, FVec(-2.4999993993e-1f));
  p = at::vec::fmadd(p, f, FVec(3.3333331174e-1f));
  // log 2 = 0.693359375 - 2.12194440e-4, the first part exact in float32 times any e.
  FVec y = at::vec::fmadd(e, FVec(-2.12194440e-4f), p * f * z);
  y = at::vec::fmadd(z, FVec(-0.5f), y);
  return at::vec::fmadd(e, FVec(0.693359375f), f + y);
}

// sin x and cos x for x in [0, 2 pi] (box_muller's float32(2 pi) u). x = y + j pi/2 with j in
// 0..4 and |y| <= pi/4 (pi/2 in two parts, Cody-Waite, with fmas: y is exact to ~1e-14 beyond
// its own rounding); the quadrant j picks and signs the polynomials of y.
inline void sincos_turn(FVec x, FVec& s, FVec& c) {
  const FVec j = (x * FVec(0.636619772f)).round();
  FVec y = at::vec::fmadd(j, FVec(-1.57079637f), x);  // float32(pi/2): j times it is exact in the fma
  y = at::vec::fmadd(j, FVec(4.371139e-8f), y);  // float32(pi/2) - pi/2
  const FVec z = y * y;
  FVec ps = at::vec::fmadd(z, FVec(-1.9515295891e-4f), FVec(8.3321608736e-3f));
  ps = at::vec::fmadd(ps, z, FVec(-1.6666654611e-1f));
  ps = at::vec::fmadd(ps * z, y, y);
  FVec pc = at::vec::fmadd(z, FVec(2.443315711809948e-5f), FVec(-1.388731625493765e-3f));
  pc = at::vec::fmadd(pc, z, FVec(4.166664568298827e-2f));
  pc = at::vec::fmadd(pc * z, z, at::vec::fmadd(z, FVec(-0.5f), FVec(1.0f)));
  // sin(y + j pi/2), cos(y + j pi/2) for j = 0, 1, 2, 3 (4 is 0): (s, c), (c, -s), (-s, -c), (-c, s).
  const FVec j1 = j == FVec(1.0f), j2 = j == FVec(2.0f), j3 = j == FVec(3.0f);
  const FVec swap = j1 | j3;
  const FVec sign = FVec(-0.0f);
  s = FVec::blendv(ps, pc, swap) ^ ((j2 | j3) & sign);
  c = FVec::blendv(pc, ps, swap) ^ ((j1 | j2) & sign);
}

// The default build keeps libm's functions lane by lane: its Vectorized is a loop over an array,
// and the polynomials written with it run slower than logf/sinf/cosf there.
template <>
struct Fn<FVec> {
  static FVec sqrt(FVec x) { return x.sqrt(); }
  static FVec exp(FVec x) { return x.exp(); }
  static FVec max(FVec a, FVec b) { return at::vec::maximum(a, b); }
  // clamp(x, -lim, lim); a NaN x stays NaN, as in torch.clamp (at::vec::clamp does so in every
  // build: the SIMD max/min pass their second operand on NaN, and x is that operand).
  static FVec clamp_sym(FVec x, FVec lim) { return at::vec::clamp(x, -lim, lim); }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static FVec log(FVec x) { return log_unit(x); }
  static void sincos(FVec x, FVec& s, FVec& c) { sincos_turn(x, s, c); }
#else
  static FVec log(FVec x) { return x.log(); }
  static void sincos(FVec x, FVec& s, FVec& c) {
    s = x.sin();
    c = x.cos();
  }
#endif
};

// The float64 kernels' one vector function: the solver step's clamp of x0, as Fn<FVec>'s.
template <>
struct Fn<at::vec::Vectorized<double>> {
  using DVec = at::vec::Vectorized<double>;
  static DVec clamp_sym(DVec x, DVec lim) { return at::vec::clamp(x, -lim, lim); }
  static DVec exp(DVec x) { return x.exp(); }
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

using math::FVec;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Philox4x32-10 across the lanes of SIMD registers: the rounds of math::philox4x32_10 with each
// quad's counter words in the low half of a 64-bit lane. vpmuludq multiplies those low halves
// into the full 64-bit product, whose low half is then already the next round's lo word and
// whose high half one shift brings down: no blends, and the high halves (left over from the
// products) are never read, since vpmuludq ignores them and the xors keep halves apart. Two
// registers of 64-bit lanes hold kLanes consecutive quads; pack() gathers their low halves
// into one register of 32-bit lanes at the end. (The compiler's own vectorisation of the scalar
// code widens to 64-bit lanes and runs at a third of the speed.) The uniforms test checks every
// build bit for bit against the reference.
#if defined(CPU_CAPABILITY_AVX512)
struct U32x {  // 16 lanes
  using R = __m512i;
  static constexpr int kLanes = 16;
  static R set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  // Register h (0 or 1) of a group of kLanes quads from quad v: 64-bit lanes v + 8 h + 0 .. 7
  // (v + 15 < 2**32).
  static R counter(uint32_t v, int h) {
    return _mm512_add_epi64(_mm512_set1_epi64(v + 8 * h), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R xor2(R a, R b) { return _mm512_xor_si512(a, b); }
  static R xor3(R a, R b, R c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static R mul64(R a, R b) { return _mm512_mul_epu32(a, b); }
  static R shr64(R a) { return _mm512_srli_epi64(a, 32); }
  static R pack(R lo, R hi) {  // low halves of lo's lanes, then of hi's
    return _mm512_permutex2var_epi32(lo, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), hi);
  }
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
  // Register h (0 or 1) of a group of kLanes quads from quad v: 64-bit lanes v + 4 h + (0, 2,
  // 1, 3), so that pack leaves the quads in lane order kQuadOfLane (see there).
  static R counter(uint32_t v, int h) {
    return _mm256_add_epi64(_mm256_set1_epi64x(v + 4 * h), _mm256_setr_epi64x(0, 2, 1, 3));
  }
  static R xor2(R a, R b) { return _mm256_xor_si256(a, b); }
  static R xor3(R a, R b, R c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static R mul64(R a, R b) { return _mm256_mul_epu32(a, b); }
  static R shr64(R a) { return _mm256_srli_epi64(a, 32); }
  static R pack(R lo, R hi) {  // per 128 bits: lo0 lo1 hi0 hi1 | lo2 lo3 hi2 hi3 (no lane crossing)
    return _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), 0x88));
  }
  static __m256 to_uniform(R w) {
    const R x = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(math::kUniformScale));
  }
  static void store(float* p, __m256 v) { _mm256_store_ps(p, v); }
};
#endif

// The quad that lane l of a group's vectors holds: q + l - l % kLanes + kQuadOfLane[l % kLanes].
// The AVX2 build orders each 8 quads 0 2 4 6 | 1 3 5 7, so that neither pack nor store_quads
// crosses the 128-bit halves (cross-lane permutes cost AVX2 about 4% of a normal's time).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kQuadOfLane[U32x::kLanes] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
constexpr int kQuadOfLane[U32x::kLanes] = {0, 2, 4, 6, 1, 3, 5, 7};
#endif

// The uniforms of quads q .. q + kQuads - 1 of sample g, lane-major: u[k][l] comes from word k
// of the quad that lane l holds (kQuadOfLane). q is a multiple of kQuads (blocks and groups
// are aligned), so adding the lane index to lo32(q) never wraps and the whole group shares
// hi32(q).
//
// Only counter word 0 differs between the lanes: words 1-3 (hi32(q), lo32(g), hi32(g)) are the
// group's own, and so are round 0's second product, round 1's first, and the words made from
// them alone. Those are computed once per group in scalar code, with the arithmetic of
// math::philox4x32_10, and enter the vector rounds as broadcast constants (b0-b3, each xored
// with its round's key): rounds 0-2 take 14 vector operations per register instead of 24 (AVX2).
inline void uniforms_group(uint64_t q, uint64_t g, uint32_t k0, uint32_t k1, float u[4][kQuads]) {
  using R = U32x::R;
  using math::hi32;
  using math::lo32;
  constexpr uint32_t w0 = math::kPhiloxW0, w1 = math::kPhiloxW1;
  const uint64_t p1_0 = static_cast<uint64_t>(math::kPhiloxM1) * lo32(g);  // round 0's M1 c2
  const uint32_t c0_1 = hi32(p1_0) ^ hi32(q) ^ k0;                          // word 0 after round 0
  const uint64_t p0_1 = static_cast<uint64_t>(math::kPhiloxM0) * c0_1;     // round 1's M0 c0
  const R b0 = U32x::set1(hi32(g) ^ k1);                // round 0: c2 = hi(M0 c0) ^ c3 ^ k1
  const R b1 = U32x::set1(lo32(p1_0) ^ (k0 + w0));      // round 1: c0 = hi(M1 c2) ^ c1 ^ k0
  const R b2 = U32x::set1(hi32(p0_1) ^ (k1 + w1));      // round 1: c2 = hi(M0 c0) ^ c3 ^ k1
  const R b3 = U32x::set1(lo32(p0_1) ^ (k1 + 2 * w1));  // round 2: c2 = hi(M0 c0) ^ c3 ^ k1
  const R kv0_2 = U32x::set1(k0 + 2 * w0);              // round 2: c0 = hi(M1 c2) ^ c1 ^ k0
  const R m0 = U32x::set1(math::kPhiloxM0), m1 = U32x::set1(math::kPhiloxM1);
  for (int l = 0; l < kQuads; l += U32x::kLanes) {
    // c[h][k]: word k of half h of quads q + l .. q + l + kLanes - 1 (U32x::counter) after
    // each round.
    R c[2][4];
    for (int h = 0; h < 2; ++h) {
      const R p0 = U32x::mul64(m0, U32x::counter(lo32(q + l), h));  // round 0 (its M1 c2 is p1_0)
      c[h][2] = U32x::xor2(U32x::shr64(p0), b0);
      c[h][3] = p0;
      const R p1 = U32x::mul64(m1, c[h][2]);  // round 1 (its M0 c0 is p0_1)
      c[h][0] = U32x::xor2(U32x::shr64(p1), b1);
      c[h][1] = p1;
      c[h][2] = U32x::xor2(c[h][3], b2);
      const R q0 = U32x::mul64(m0, c[h][0]), q1 = U32x::mul64(m1, c[h][2]);  // round 2 (its c3 is lo32(p0_1))
      c[h][0] = U32x::xor3(U32x::shr64(q1), c[h][1], kv0_2);
      c[h][1] = q1;
      c[h][2] = U32x::xor2(U32x::shr64(q0), b3);
      c[h][3] = q0;
    }
    uint32_t key0 = k0 + 3 * w0, key1 = k1 + 3 * w1;
    for (int round = 3; round < 10; ++round) {
      const R kv0 = U32x::set1(key0), kv1 = U32x::set1(key1);
      for (int h = 0; h < 2; ++h) {
        const R p0 = U32x::mul64(m0, c[h][0]);  // (lo0, hi0)
        const R p1 = U32x::mul64(m1, c[h][2]);  // (lo1, hi1)
        c[h][0] = U32x::xor3(U32x::shr64(p1), c[h][1], kv0);
        c[h][1] = p1;
        c[h][2] = U32x::xor3(U32x::shr64(p0), c[h][3], kv1);
        c[h][3] = p0;
      }
      key0 += w0;
      key1 += w1;
    }
    for (int k = 0; k < 4; ++k) U32x::store(u[k] + l, U32x::to_uniform(U32x::pack(c[0][k], c[1][k])));
  }
}
#else
constexpr int kQuadOfLane[kQuads] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

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

// Writes the normals of FVec::size() quads in element order, out[4 j + k] = nk[i] where lane i
// of each vector holds quad j = kQuadOfLane[i].
#if defined(CPU_CAPABILITY_AVX2)
// Quads 0 2 4 6 | 1 3 5 7: in-lane unpacks give (n0 n1 n2 n3) of lanes (0 | 4), (1 | 5), (2 | 6),
// (3 | 7), i.e. quads (0 | 1), (2 | 3), (4 | 5), (6 | 7): elements 0-7, 8-15, 16-23, 24-31.
inline void store_quads(float* out, FVec n0, FVec n1, FVec n2, FVec n3) {
  const __m256 a = _mm256_unpacklo_ps(n0, n1), b = _mm256_unpackhi_ps(n0, n1);
  const __m256 c = _mm256_unpacklo_ps(n2, n3), d = _mm256_unpackhi_ps(n2, n3);
  auto pairs = [](__m256 x, __m256 y, bool hi) {
    const __m256d xd = _mm256_castps_pd(x), yd = _mm256_castps_pd(y);
    return _mm256_castpd_ps(hi ? _mm256_unpackhi_pd(xd, yd) : _mm256_unpacklo_pd(xd, yd));
  };
  _mm256_storeu_ps(out, pairs(a, c, false));
  _mm256_storeu_ps(out + 8, pairs(a, c, true));
  _mm256_storeu_ps(out + 16, pairs(b, d, false));
  _mm256_storeu_ps(out + 24, pairs(b, d, true));
}
#else
// Two rounds of interleaving, of floats, then of float pairs (lane i holds quad i).
inline void store_quads(float* out, FVec n0, FVec n1, FVec n2, FVec n3) {
  using at::vec::cast;
  using at::vec::interleave2;
  const auto p01 = interleave2(n0, n1);  // (n0[i], n1[i]) pairs, lanes in order over first, second
  const auto p23 = interleave2(n2, n3);
  const auto lo = interleave2(cast<double>(p01.first), cast<double>(p23.first));
  const auto hi = interleave2(cast<double>(p01.second), cast<double>(p23.second));
  cast<float>(lo.first).store(out);
  cast<float>(lo.second).store(out + FVec::size());
  cast<float>(hi.first).store(out + 2 * FVec::size());
  cast<float>(hi.second).store(out + 3 * FVec::size());
}
#endif

// The contract's float32 normals of elements [j0, j0 + n) of the sample with global index g;
// j0 is a multiple of 4.
inline void fill_normals(float* out, int64_t n, int64_t j0, uint64_t g, uint32_t k0, uint32_t k1) {
  uint64_t q = static_cast<uint64_t>(j0) / 4;
  for (int64_t i = 0; i < n; i += 4 * kQuads, q += kQuads) {
    alignas(64) float u[4][kQuads];
    uniforms_group(q, g, k0, k1, u);
    const bool whole = n - i >= 4 * kQuads;
    alignas(64) float z[4 * kQuads];  // a short last group goes through here
    float* dst = whole ? out + i : z;
    for (int l = 0; l < kQuads; l += FVec::size()) {
      FVec n0, n1, n2, n3;
      math::box_muller(FVec::loadu(u[0] + l), FVec::loadu(u[1] + l), n0, n1);
      math::box_muller(FVec::loadu(u[2] + l), FVec::loadu(u[3] + l), n2, n3);
      store_quads(dst + 4 * l, n0, n1, n2, n3);
    }
    if (!whole) std::copy(z, z + (n - i), out + i);
  }
}

// The uniforms themselves, element order (tests compare them bit for bit with the reference).
void philox_uniforms(float* out, int64_t n_quads, uint64_t g, uint32_t k0, uint32_t k1) {
  for (int64_t q = 0; q < n_quads; q += kQuads) {
    alignas(64) float u[4][kQuads];
    uniforms_group(static_cast<uint64_t>(q), g, k0, k1, u);
    for (int64_t l = 0; l < kQuads; ++l) {
      const int64_t quad = q + l - l % std::size(kQuadOfLane) + kQuadOfLane[l % std::size(kQuadOfLane)];
      if (quad < n_quads) {
        for (int k = 0; k < 4; ++k) out[4 * quad + k] = u[k][l];
      }
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

// Large outputs are written with non-temporal stores (the AVX2 and AVX-512 builds; the
// memory-bound kernels: q_sample, p_sample_step, solver_step and the MSE gradients; not yet
// vlb_loss_backward, and not normal, whose cost is the arithmetic). An output of kStreamBytes
// or more does not stay in cache for the next op anyway, and a plain store first reads the line
// it writes: a quarter of the traffic of an op that reads two tensors and writes one. A
// standalone loop of q_sample's arithmetic at 256x3x64x64 float32 (12.6 MB out) took 0.69 ms
// with them and 1.37 ms without; at 1.6 MB they were slower (0.061 against 0.054 ms), so smaller
// outputs keep plain stores and stay in cache (benchmarks/RESULTS.md, first section).
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// Whether the float or double output `out` of shape s streams: large, and every block's start
// (sample b's element j0, j0 a multiple of kBlock) aligned to the vector width, as the
// non-temporal stores need. The half types never do: their output goes through a scratch block.
template <typename scalar_t>
inline bool streams_output(const Shape& s, const void* out) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t kAlign = at::vec::Vectorized<scalar_t>::size() * sizeof(scalar_t);
  return (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) &&
         s.batch * s.d * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes &&
         reinterpret_cast<uintptr_t>(out) % kAlign == 0 && (s.d * static_cast<int64_t>(sizeof(scalar_t))) % kAlign == 0;
#else
  (void)s;
  (void)out;
  return false;
#endif
}

// The non-temporal store of one vector of this build (dst aligned to the width).
#if defined(CPU_CAPABILITY_AVX512)
inline void stream_vec(float* dst, __m512 v) { _mm512_stream_ps(dst, v); }
inline void stream_vec(double* dst, __m512d v) { _mm512_stream_pd(dst, v); }
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_vec(float* dst, __m256 v) { _mm256_stream_ps(dst, v); }
inline void stream_vec(double* dst, __m256d v) { _mm256_stream_pd(dst, v); }
#endif

// Stores vector v at dst: plainly, or (kStream) non-temporally, dst then aligned to the width.
template <bool kStream, typename T>
C10_ALWAYS_INLINE void put(at::vec::Vectorized<T> v, T* dst) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStream) {
    stream_vec(dst, v);
    return;
  }
#endif
  v.store(dst);
}

// After a block's non-temporal stores: they are weakly ordered, and the block must be in
// memory before the op returns and another thread or op reads it.
template <bool kStream>
C10_ALWAYS_INLINE void end_stream() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStream) _mm_sfence();
#endif
}

// Runs body(std::true_type{}) for a streamed output, else body(std::false_type{}): the kernels'
// loops are compiled both ways, with the choice out of the inner loop.
template <typename Body>
C10_ALWAYS_INLINE void with_stream(bool stream, const Body& body) {
  if (stream) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
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
    if (src.has_noise) return load(src.noise, b * s.d + j0, n, buf);
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
  with_stream(streams_output<scalar_t>(a.shape, a.out), [&](auto stream) {
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
        put<stream()>(math::q_sample_value(V::loadu(x + i), V::loadu(e + i), va, vb), y + i);
      }
      for (; i < n; ++i) y[i] = math::q_sample_value(x[i], e[i], ca, cb);
      end_stream<stream()>();
      Io::store(a.out, offset, n, y);
    });
  });
}

template <typename scalar_t>
void p_sample_step_impl(const PSampleArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  using Io = BlockIo<scalar_t>;
  with_stream(streams_output<scalar_t>(a.shape, a.out), [&](auto stream) {
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
        put<stream()>(math::p_sample_value(V::loadu(x + i), V::loadu(e + i), V::loadu(z + i), v1, v2, vs), y + i);
      }
      for (; i < n; ++i) y[i] = math::p_sample_value(x[i], e[i], z[i], c1, c2, sg);
      end_stream<stream()>();
      Io::store(a.out, offset, n, y);
    });
  });
}

// The sum of squared errors of one block, as every MSE kernel adds it up: two vector chains in
// acc_t (they hide the add latency), their lanes in order, then the tail, in double. With kGrad
// the same pass also writes y[i] = scale (p[i] - tg[i]) (d MSE / d pred, block_mse_grad's values;
// kStream: non-temporally): the sum is the same either way, and one pass instead of a second
// one over the block is a third cheaper at CIFAR sizes.
template <bool kGrad = false, bool kStream = false, typename acc_t>
C10_ALWAYS_INLINE double block_squared_error(const acc_t* p, const acc_t* tg, int64_t n, acc_t scale = acc_t(0),
                                             acc_t* y = nullptr) {
  using V = at::vec::Vectorized<acc_t>;
  const V vs(scale);
  V acc0(acc_t(0)), acc1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * V::size() <= n; i += 2 * V::size()) {
    const V p0 = V::loadu(p + i), t0 = V::loadu(tg + i);
    const V p1 = V::loadu(p + i + V::size()), t1 = V::loadu(tg + i + V::size());
    if constexpr (kGrad) {
      put<kStream>(math::mse_grad_value(p0, t0, vs), y + i);
      put<kStream>(math::mse_grad_value(p1, t1, vs), y + i + V::size());
    }
    acc0 += math::squared_error(p0, t0);
    acc1 += math::squared_error(p1, t1);
  }
  alignas(64) acc_t lanes[V::size()];
  (acc0 + acc1).store(lanes);
  double sum = 0;
  for (int l = 0; l < V::size(); ++l) sum += lanes[l];
  for (; i < n; ++i) {
    if constexpr (kGrad) y[i] = math::mse_grad_value(p[i], tg[i], scale);
    sum += math::squared_error(p[i], tg[i]);
  }
  if constexpr (kGrad) end_stream<kStream>();
  return sum;
}

// out[b] = (sum over the blocks of sample b of block_sum(b, j0, n)) / D: one partial sum per
// block, then per sample in block order, so the result does not depend on the thread count.
template <typename acc_t, typename F>
void per_sample_mean(const Shape& s, void* out_base, const F& block_sum) {
  const int64_t per_sample = (s.d + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(s.batch * per_sample));
  for_each_block(s, [&](int64_t blk, int64_t b, int64_t j0, int64_t n) { partial[blk] = block_sum(b, j0, n); });
  acc_t* out = static_cast<acc_t*>(out_base);
  for (int64_t b = 0; b < s.batch; ++b) {
    double sum = 0;
    for (int64_t k = 0; k < per_sample; ++k) sum += partial[b * per_sample + k];
    out[b] = static_cast<acc_t>(sum / static_cast<double>(s.d));
  }
}

// y[i] = scale (p[i] - tg[i]) over one block: d MSE / d pred. (Always inlined: called with the
// caller's unused scratch buffers, gcc's -Wmaybe-uninitialized otherwise warns about them.)
template <bool kStream, typename acc_t>
C10_ALWAYS_INLINE void block_mse_grad(const acc_t* p, const acc_t* tg, acc_t scale, int64_t n, acc_t* y) {
  using V = at::vec::Vectorized<acc_t>;
  const V vs(scale);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    put<kStream>(math::mse_grad_value(V::loadu(p + i), V::loadu(tg + i), vs), y + i);
  }
  for (; i < n; ++i) y[i] = math::mse_grad_value(p[i], tg[i], scale);
  end_stream<kStream>();
}

template <typename scalar_t>
void mse_per_sample_impl(const MseArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;  // float32 for the half types, float64 for float64
  using Io = BlockIo<scalar_t>;
  const acc_t* grad_scale = static_cast<const acc_t*>(a.grad_scale);
  with_stream(a.grad_out != nullptr && streams_output<scalar_t>(a.shape, a.grad_out), [&](auto stream) {
    per_sample_mean<acc_t>(a.shape, a.out, [&](int64_t b, int64_t j0, int64_t n) {
      alignas(64) acc_t pbuf[kBlock], tbuf[kBlock], ybuf[kBlock];
      const int64_t offset = b * a.shape.d + j0;
      const acc_t* p = Io::load(a.pred, offset, n, pbuf);
      const acc_t* tg = Io::noise(a.target, a.shape, b, j0, n, tbuf);
      if (a.grad_out != nullptr) {  // the backward's pass, fused in (mse_per_sample_backward_impl's scale)
        const acc_t scale = grad_scale[b] * acc_t(2) / static_cast<acc_t>(a.shape.d);
        acc_t* y = Io::out(a.grad_out, offset, ybuf);
        const double sum = block_squared_error<true, stream()>(p, tg, n, scale, y);
        Io::store(a.grad_out, offset, n, y);
        return sum;
      }
      return block_squared_error(p, tg, n);
    });
  });
}

template <typename scalar_t>
void mse_per_sample_backward_impl(const MseBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Io = BlockIo<scalar_t>;
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  with_stream(streams_output<scalar_t>(a.shape, a.out), [&](auto stream) {
    for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
      alignas(64) acc_t pbuf[kBlock], tbuf[kBlock], ybuf[kBlock];
      const acc_t scale = grad[b] * acc_t(2) / static_cast<acc_t>(a.shape.d);
      const int64_t offset = b * a.shape.d + j0;
      const acc_t* p = Io::load(a.pred, offset, n, pbuf);
      const acc_t* tg = Io::noise(a.target, a.shape, b, j0, n, tbuf);
      acc_t* y = Io::out(a.out, offset, ybuf);
      block_mse_grad<stream()>(p, tg, scale, n, y);
      Io::store(a.out, offset, n, y);
    });
  });
}

// One step's coefficient rows in acc_t, c[r][col] = coef[k, r, col] for r < rows (the others
// 0). A struct, so that a copy of it is a few vector moves.
template <typename acc_t>
struct SolverRows {
  acc_t c[kSolverMaxOutputs + 1][kSolverColumns];
};

// The coefficient rows of step k, coef[k, 0 .. rows).
template <typename acc_t>
inline SolverRows<acc_t> solver_rows(const SolverStepArgs& a, int64_t k) {
  SolverRows<acc_t> rows{};
  const int64_t base = k * a.rows * kSolverColumns;
  for (int r = 0; r < a.rows; ++r) {
    for (int j = 0; j < kSolverColumns; ++j) {
      const int64_t idx = base + r * kSolverColumns + j;
      rows.c[r][j] = a.coef_double ? static_cast<acc_t>(static_cast<const double*>(a.coef)[idx])
                                   : static_cast<acc_t>(static_cast<const float*>(a.coef)[idx]);
    }
  }
  return rows;
}

// One element (or one vector of them) of the solver step (op_args.h: SolverStepArgs): o, x0,
// then each output r - 1 (r = 1 .. n_out) = the sum over the columns of c[r][col] * operand,
// accumulated from 0 in column order (kernel_math.h's solver_term), stored as y[r - 1]. T is
// acc_t or its Vectorized (the coefficients are broadcast where used: in a loop over a local
// table, the compiler hoists them); load(s) reads operand s (0 x, 1 out, 2 out_cond, 3 z, 4 + h
// history[h]). The history count is a compile-time constant (its loop unrolls, its operands
// stay in registers); the loop over the outputs runs to the fixed bound kSolverMaxOutputs with
// n_out as its exit, so it unrolls too, at one predictable branch per output.
template <bool kGuided, bool kZ, int kHist, typename T, typename acc_t, typename Load, typename Store>
C10_ALWAYS_INLINE void solver_element(const acc_t (&c)[kSolverMaxOutputs + 1][kSolverColumns], int n_out, T w, T lim,
                                      T inv_scale, const Load& load, const Store& store) {
  const T x = load(0);
  T o = load(1);
  if constexpr (kGuided) o = math::guided_value(o, load(2), w);
  const T x0 = math::solver_x0_value(x, o, T(c[0][0]), T(c[0][1]), lim, inv_scale);
  T h[kHist > 0 ? kHist : 1];
  for (int i = 0; i < kHist; ++i) h[i] = load(4 + i);
  T z;
  if constexpr (kZ) z = load(3);
  for (int r = 1; r <= kSolverMaxOutputs; ++r) {
    T acc(acc_t(0));
    acc = math::solver_term(acc, T(c[r][0]), x);
    acc = math::solver_term(acc, T(c[r][1]), o);
    acc = math::solver_term(acc, T(c[r][2]), x0);
    for (int i = 0; i < kHist; ++i) acc = math::solver_term(acc, T(c[r][3 + i]), h[i]);
    if constexpr (kZ) acc = math::solver_term(acc, T(c[r][kSolverColumns - 1]), z);
    store(r - 1, acc);
    if (r == n_out) break;
  }
}

// The outputs of one block of a sample from its operands, all in acc_t: operand s of element i
// is src[s][i] (s as solver_element's load: nullptr for out_cond without guidance and for z
// when the sample draws none), output r - 1 goes to y[r - 1][i]. Compiled once per compute
// type (the half types share float's) and per history count, each with a loop per guided / not
// and noisy / not; not inlined: one call per block.
template <typename acc_t, int kHist>
C10_NOINLINE void solver_block(const acc_t* const* src_in, acc_t* const* y_in, int64_t n, const SolverRows<acc_t>& rows,
                               int n_out, acc_t w, acc_t lim, acc_t inv_scale, bool stream) {
  using V = at::vec::Vectorized<acc_t>;
  using std::integral_constant;
  auto run = [&](auto guided, auto with_z) C10_ALWAYS_INLINE_ATTRIBUTE {
    constexpr bool kGuided = decltype(guided)::value, kZ = decltype(with_z)::value;
    // Local copies: the vector stores may alias anything, so what is read through src_in,
    // y_in or this lambda's captures would be read again on every iteration.
    const acc_t* src[4 + kSolverHistory];
    acc_t* y[kSolverMaxOutputs];
    for (int s = 0; s < 4 + kSolverHistory; ++s) src[s] = src_in[s];
    for (int r = 0; r < kSolverMaxOutputs; ++r) y[r] = y_in[r];
    const int64_t len = n;
    const int outs = n_out;
    const SolverRows<acc_t> k = rows;
    const V vw(w), vlim(lim), vinv(inv_scale);
    int64_t i = 0;
    for (; i + V::size() <= len; i += V::size()) {
      solver_element<kGuided, kZ, kHist>(
          k.c, outs, vw, vlim, vinv, [&](int s) { return V::loadu(src[s] + i); },
          [&](int r, V v) {  // (a branch, not a template case: it is the same every time)
            if (stream) {
              put<true>(v, y[r] + i);
            } else {
              v.store(y[r] + i);
            }
          });
    }
    for (; i < len; ++i) {
      solver_element<kGuided, kZ, kHist>(
          k.c, outs, w, lim, inv_scale, [&](int s) { return src[s][i]; }, [&](int r, acc_t v) { y[r][i] = v; });
    }
    if (stream) end_stream<true>();
  };
  const bool guided = src_in[2] != nullptr, noisy = src_in[3] != nullptr;
  if (guided && noisy) run(integral_constant<bool, true>{}, integral_constant<bool, true>{});
  else if (guided) run(integral_constant<bool, true>{}, integral_constant<bool, false>{});
  else if (noisy) run(integral_constant<bool, false>{}, integral_constant<bool, true>{});
  else run(integral_constant<bool, false>{}, integral_constant<bool, false>{});
}

// solver_block for n_history history operands (at most 4, checked by the host code): the count
// that decides which operands an element loads is a compile-time constant; the number of
// outputs stays a run-time bound (see solver_element). Specialising both (20 cases per type)
// measured a few percent faster at most, for twice the code.
template <typename acc_t>
auto solver_block_for(int n_history) {
  static_assert(kSolverHistory == 4, "one case per history count");
  switch (n_history) {
    case 0: return &solver_block<acc_t, 0>;
    case 1: return &solver_block<acc_t, 1>;
    case 2: return &solver_block<acc_t, 2>;
    case 3: return &solver_block<acc_t, 3>;
    default: return &solver_block<acc_t, 4>;
  }
}

// y[i] = z[i] * learned_noise_scale(var[i], c3, c4) over one block (y may be z).
template <typename acc_t>
C10_ALWAYS_INLINE void scale_noise(const acc_t* z, const acc_t* var, acc_t c3, acc_t c4, int64_t n, acc_t* y) {
  using V = at::vec::Vectorized<acc_t>;
  const V v3(c3), v4(c4);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    (V::loadu(z + i) * math::learned_noise_scale(V::loadu(var + i), v3, v4)).store(y + i);
  }
  for (; i < n; ++i) y[i] = z[i] * math::learned_noise_scale(var[i], c3, c4);
}

template <typename scalar_t>
void solver_step_impl(const SolverStepArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Io = BlockIo<scalar_t>;
  // Scratch of the half types' conversions (float and double are read and written in place).
  constexpr int64_t kBuf = Io::kInPlace ? 1 : kBlock;
  const auto block = solver_block_for<acc_t>(a.n_history);
  const int n_out = a.rows - 1, n_history = a.n_history;
  const bool threshold = a.bound.data != nullptr;
  const acc_t w = static_cast<acc_t>(a.guidance);
  const int64_t plane = a.shape.batch * a.shape.d;  // elements of one output
  const bool stream = streams_output<scalar_t>(a.shape, a.y);
  for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
    alignas(64) acc_t xbuf[kBuf], obuf[kBuf], cbuf[kBuf], hbuf[kSolverHistory][kBuf], ybuf[kSolverMaxOutputs][kBuf];
    alignas(64) acc_t zbuf[kBlock], vbuf[kBuf];
    const int64_t k = step_of(a.t, b);
    const SolverRows<acc_t> rows = solver_rows<acc_t>(a, k);
    const acc_t lim = threshold ? gather<acc_t>(a.bound, b) : static_cast<acc_t>(a.clip);
    const acc_t inv_scale = threshold ? acc_t(1) / lim : acc_t(1);
    const int64_t offset = b * a.shape.d + j0;
    // src[0 .. 3]: x, out, out_cond, z; src[4 + h]: history[h].
    const acc_t* src[4 + kSolverHistory] = {};
    src[0] = Io::load(a.x, offset, n, xbuf);
    src[1] = Io::load(a.out, offset, n, obuf);
    if (a.out_cond) src[2] = Io::load(a.out_cond, offset, n, cbuf);
    for (int h = 0; h < n_history; ++h) src[4 + h] = Io::load(a.history[h], offset, n, hbuf[h]);
    // A sample whose column-7 entries are all 0 (DDIM with eta 0, the last step) draws no
    // normals: z is no operand there. Given noise is always read (0 * NaN is NaN).
    bool noisy = a.noise.has_noise;
    for (int r = 1; r <= n_out; ++r) noisy = noisy || rows.c[r][kSolverColumns - 1] != acc_t(0);
    if (noisy) src[3] = Io::noise(a.noise, a.shape, b, j0, n, zbuf);
    if (noisy && a.var) {  // z scaled by the learned variance, into zbuf (given noise stays as it is)
      scale_noise(src[3], Io::load(a.var, offset, n, vbuf), rows.c[0][3], rows.c[0][4], n, zbuf);
      src[3] = zbuf;
    }
    acc_t* y[kSolverMaxOutputs] = {};
    for (int r = 0; r < n_out; ++r) y[r] = Io::out(a.y, r * plane + offset, ybuf[r]);
    block(src, y, n, rows, n_out, w, lim, inv_scale, stream);
    for (int r = 0; r < n_out; ++r) Io::store(a.y, r * plane + offset, n, y[r]);
  });
}

// target_mse's target cx0 x0 + ceps eps over one block of sample b, in buf (k = t[b]): eps is the
// given noise or the stream's, not drawn when ceps is 0 (an x0 prediction).
template <typename scalar_t, typename A>
const at::opmath_type<scalar_t>* target_block(const A& a, int64_t b, int64_t j0, int64_t n,
                                               at::opmath_type<scalar_t>* xbuf, at::opmath_type<scalar_t>* ebuf,
                                               at::opmath_type<scalar_t>* buf) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  using Io = BlockIo<scalar_t>;
  const int64_t k = step_of(a.t, b);
  const acc_t cx = gather<acc_t>(a.cx0, k), ce = gather<acc_t>(a.ceps, k);
  const acc_t* x = Io::load(a.x0, b * a.shape.d + j0, n, xbuf);
  const bool noisy = a.noise.has_noise || ce != acc_t(0);
  const acc_t* e = noisy ? Io::noise(a.noise, a.shape, b, j0, n, ebuf) : nullptr;
  const V vx(cx), ve(ce);
  int64_t i = 0;
  if (e) {
    for (; i + V::size() <= n; i += V::size()) {
      math::target_value(V::loadu(x + i), V::loadu(e + i), vx, ve).store(buf + i);
    }
    for (; i < n; ++i) buf[i] = math::target_value(x[i], e[i], cx, ce);
  } else {
    for (; i + V::size() <= n; i += V::size()) {
      math::target_value(V::loadu(x + i), V(acc_t(0)), vx, ve).store(buf + i);
    }
    for (; i < n; ++i) buf[i] = math::target_value(x[i], acc_t(0), cx, ce);
  }
  return buf;
}

template <typename scalar_t>
void target_mse_impl(const TargetMseArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Io = BlockIo<scalar_t>;
  per_sample_mean<acc_t>(a.shape, a.out, [&](int64_t b, int64_t j0, int64_t n) {
    alignas(64) acc_t pbuf[kBlock], xbuf[kBlock], ebuf[kBlock], tbuf[kBlock];
    const acc_t* p = Io::load(a.pred, b * a.shape.d + j0, n, pbuf);
    return block_squared_error(p, target_block<scalar_t>(a, b, j0, n, xbuf, ebuf, tbuf), n);
  });
}

template <typename scalar_t>
void target_mse_backward_impl(const TargetMseBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Io = BlockIo<scalar_t>;
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  with_stream(streams_output<scalar_t>(a.shape, a.out), [&](auto stream) {
    for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
      alignas(64) acc_t pbuf[kBlock], xbuf[kBlock], ebuf[kBlock], tbuf[kBlock], ybuf[kBlock];
      const acc_t scale = grad[b] * acc_t(2) / static_cast<acc_t>(a.shape.d);
      const int64_t offset = b * a.shape.d + j0;
      const acc_t* p = Io::load(a.pred, offset, n, pbuf);
      const acc_t* tg = target_block<scalar_t>(a, b, j0, n, xbuf, ebuf, tbuf);
      acc_t* y = Io::out(a.out, offset, ybuf);
      block_mse_grad<stream()>(p, tg, scale, n, y);
      Io::store(a.out, offset, n, y);
    });
  });
}

// ---- the variational bound -----------------------------------------------------------------

template <typename acc_t>
inline math::VlbRow<acc_t> vlb_row_of(const VlbArgs& a, int64_t k) {
  return a.tables_double ? math::vlb_row<acc_t>(static_cast<const double*>(a.tables), k)
                         : math::vlb_row<acc_t>(static_cast<const float*>(a.tables), k);
}

template <typename V, typename acc_t>
inline math::VlbRow<V> broadcast_row(const math::VlbRow<acc_t>& c) {
  return math::VlbRow<V>{V(c.sqrt_ab), V(c.sqrt_1m_ab), V(c.post_c1), V(c.post_c2),
                         V(c.post_logvar), V(c.log_beta), V(c.sqrt_recip_ab), V(c.sqrt_recipm1_ab),
                         V(c.fixed_logvar)};
}

// The operands of one block of sample b in acc_t: x0, eps, the mean channel m and the variance
// channel v (nullptr when fixed; the formulas then ignore it).
template <typename scalar_t>
struct VlbBlock {
  using acc_t = at::opmath_type<scalar_t>;
  using Io = BlockIo<scalar_t>;
  alignas(64) acc_t xbuf[kBlock], ebuf[kBlock], mbuf[kBlock], vbuf[kBlock];
  const acc_t *x, *e, *m, *v;

  VlbBlock(const VlbArgs& a, int64_t b, int64_t j0, int64_t n) {
    x = Io::load(a.x0, b * a.shape.d + j0, n, xbuf);
    e = Io::noise(a.noise, a.shape, b, j0, n, ebuf);
    m = Io::load(a.out, b * a.out_d + j0, n, mbuf);
    v = a.variance_type == math::kVlbFixed ? nullptr : Io::load(a.out, b * a.out_d + a.shape.d + j0, n, vbuf);
  }
  acc_t var(int64_t i) const { return v ? v[i] : acc_t(0); }
};

// The sums over one block of (target - m)^2 and of the vb term (nats), in double: t > 0 the KL
// (vectorised, its lanes in order, then the tail), t == 0 the decoder NLL (scalars).
template <typename acc_t>
C10_NOINLINE void vlb_block_sums(const acc_t* x, const acc_t* e, const acc_t* m, const acc_t* v, int64_t n,
                                 const math::VlbRow<acc_t>& c, int mean_type, int variance_type, bool t0,
                                 double& sq_sum, double& term_sum) {
  using V = at::vec::Vectorized<acc_t>;
  double s_sq = 0, s_term = 0;
  int64_t i = 0;
  if (!t0) {
    const math::VlbRow<V> vc = broadcast_row<V>(c);
    V acc_sq(acc_t(0)), acc_term(acc_t(0));
    for (; i + V::size() <= n; i += V::size()) {
      V sq, term;
      math::vlb_kl_value(V::loadu(x + i), V::loadu(e + i), V::loadu(m + i), v ? V::loadu(v + i) : V(acc_t(0)), vc,
                         mean_type, variance_type, sq, term);
      acc_sq += sq;
      acc_term += term;
    }
    alignas(64) acc_t lanes_sq[V::size()], lanes_term[V::size()];
    acc_sq.store(lanes_sq);
    acc_term.store(lanes_term);
    for (int l = 0; l < V::size(); ++l) {
      s_sq += lanes_sq[l];
      s_term += lanes_term[l];
    }
  }
  for (; i < n; ++i) {
    acc_t sq, term;
    math::vlb_value(x[i], e[i], m[i], v ? v[i] : acc_t(0), c, mean_type, variance_type, t0, sq, term);
    s_sq += sq;
    s_term += term;
  }
  sq_sum = s_sq;
  term_sum = s_term;
}

template <typename scalar_t>
void vlb_loss_impl(const VlbArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_sample = (a.shape.d + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(2 * a.shape.batch * per_sample));
  for_each_block(a.shape, [&](int64_t blk, int64_t b, int64_t j0, int64_t n) {
    VlbBlock<scalar_t> io(a, b, j0, n);
    const int64_t k = step_of(a.t, b);
    vlb_block_sums<acc_t>(io.x, io.e, io.m, io.v, n, vlb_row_of<acc_t>(a, k), a.mean_type, a.variance_type, k == 0,
                          partial[2 * blk], partial[2 * blk + 1]);
  });
  acc_t* out = static_cast<acc_t*>(a.y);
  const double d = static_cast<double>(a.shape.d);
  for (int64_t b = 0; b < a.shape.batch; ++b) {
    double sq = 0, term = 0;
    for (int64_t k = 0; k < per_sample; ++k) {
      sq += partial[2 * (b * per_sample + k)];
      term += partial[2 * (b * per_sample + k) + 1];
    }
    out[2 * b] = static_cast<acc_t>(sq / d);
    out[2 * b + 1] = static_cast<acc_t>(term / d / math::kVlbLn2);
  }
}

// d/dm into gm[i] and d/dvraw into gv[i] (gv nullptr when fixed) over one block.
template <typename acc_t>
C10_NOINLINE void vlb_block_grad(const acc_t* x, const acc_t* e, const acc_t* m, const acc_t* v, int64_t n,
                                 const math::VlbRow<acc_t>& c, int mean_type, int variance_type, bool t0,
                                 bool detach_mean, acc_t mse_scale, acc_t w, acc_t* gm, acc_t* gv) {
  using V = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  if (!t0) {
    const math::VlbRow<V> vc = broadcast_row<V>(c);
    const V vs(mse_scale), vw(w);
    for (; i + V::size() <= n; i += V::size()) {
      V g_m, g_v;
      math::vlb_kl_grad_value(V::loadu(x + i), V::loadu(e + i), V::loadu(m + i), v ? V::loadu(v + i) : V(acc_t(0)),
                              vc, mean_type, variance_type, detach_mean, vs, vw, g_m, g_v);
      g_m.store(gm + i);
      if (gv) g_v.store(gv + i);
    }
  }
  for (; i < n; ++i) {
    acc_t g_m, g_v;
    math::vlb_grad_value(x[i], e[i], m[i], v ? v[i] : acc_t(0), c, mean_type, variance_type, t0, detach_mean,
                         mse_scale, w, g_m, g_v);
    gm[i] = g_m;
    if (gv) gv[i] = g_v;
  }
}

template <typename scalar_t>
void vlb_loss_backward_impl(const VlbArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Io = BlockIo<scalar_t>;
  const acc_t* grad = static_cast<const acc_t*>(a.grad);
  const bool fixed = a.variance_type == math::kVlbFixed;
  for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
    alignas(64) acc_t mbuf[kBlock], vbuf[kBlock];
    VlbBlock<scalar_t> io(a, b, j0, n);
    const int64_t k = step_of(a.t, b);
    const acc_t d = static_cast<acc_t>(a.shape.d);
    const acc_t mse_scale = grad[2 * b] * acc_t(2) / d;
    const acc_t w = grad[2 * b + 1] / (d * static_cast<acc_t>(math::kVlbLn2));
    const int64_t om = b * a.out_d + j0, ov = om + a.shape.d;
    acc_t* gm = Io::out(a.y, om, mbuf);
    acc_t* gv = fixed ? nullptr : Io::out(a.y, ov, vbuf);
    vlb_block_grad<acc_t>(io.x, io.e, io.m, io.v, n, vlb_row_of<acc_t>(a, k), a.mean_type, a.variance_type, k == 0,
                          a.detach_mean, mse_scale, w, gm, gv);
    Io::store(a.y, om, n, gm);
    if (!fixed) Io::store(a.y, ov, n, gv);
  });
}

template <typename scalar_t>
void normal_impl(const NormalArgs& a) {
  for_each_block(a.shape, [&](int64_t, int64_t b, int64_t j0, int64_t n) {
    scalar_t* out = static_cast<scalar_t*>(a.out) + b * a.shape.d + j0;
    const uint64_t g = a.noise.offset + static_cast<uint64_t>(b);
    if constexpr (std::is_same_v<scalar_t, float>) {
      fill_normals(out, n, j0, g, a.noise.k0, a.noise.k1);
    } else {  // the float32 normals, rounded to the dtype
      alignas(64) float f[kBlock];
      fill_normals(f, n, j0, g, a.noise.k0, a.noise.k1);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(f[i]);
    }
  });
}

void box_muller_math(const float* x, int64_t n, float* log_x, float* sin_x, float* cos_x) {
  for (int64_t i = 0; i < n; i += FVec::size()) {
    const int count = static_cast<int>(std::min<int64_t>(FVec::size(), n - i));
    FVec s, c;
    const FVec v = FVec::loadu(x + i, count);
    math::Fn<FVec>::log(v).store(log_x + i, count);
    math::Fn<FVec>::sincos(v, s, c);
    s.store(sin_x + i, count);
    c.store(cos_x + i, count);
  }
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

void solver_step(const SolverStepArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_solver_step_cpu",
                                  [&] { solver_step_impl<scalar_t>(a); });
}

void target_mse(const TargetMseArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_target_mse_cpu",
                                  [&] { target_mse_impl<scalar_t>(a); });
}

void target_mse_backward(const TargetMseBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_target_mse_backward_cpu",
                                  [&] { target_mse_backward_impl<scalar_t>(a); });
}

void vlb_loss(const VlbArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_vlb_loss_cpu",
                                  [&] { vlb_loss_impl<scalar_t>(a); });
}

void vlb_loss_backward(const VlbArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_vlb_loss_backward_cpu",
                                  [&] { vlb_loss_backward_impl<scalar_t>(a); });
}

void normal(const NormalArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "fastddpm_normal_cpu",
                                  [&] { normal_impl<scalar_t>(a); });
}

const KernelTable& kernel_table() {
  static const KernelTable table{&q_sample, &p_sample_step, &mse_per_sample, &mse_per_sample_backward,
                                 &philox_uniforms, &normal, &box_muller_math, &solver_step,
                                 &target_mse, &target_mse_backward, &vlb_loss, &vlb_loss_backward};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastddpm

// Philox4x32 and the rbd_cuda random stream (v1), shared by every kernel.
//
// Torch-free and usable from host and device code, so the CPU and CUDA kernels
// produce the same integer stream by construction. Entry P[i, j] of the
// conceptual matrix for (seed, step, stream, distribution) depends on nothing
// else: not on the matrix shape, device, thread count or tiling.
//
//   key     = 64-bit seed, low word first
//   counter = (i >> 2, j, step, stream)          normal, uniform;   word i & 3
//   counter = (i >> 2, j >> 5, step, stream)     rademacher;        word i & 3, bit j & 31
//
// See docs/random_stream.md for the contract (what is bit-exact, what is
// tolerance-tested) and the reasons behind the layout.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RBD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RBD_HOST_DEVICE inline
#endif

namespace rbd {

constexpr int kStreamVersion = 1;
// The products' arithmetic (fused multiply-adds, the normal entries' functions, summation order)
// on CPU and CUDA: the same stream and arithmetic versions give the same bits on one device kind;
// a change that moves any result's bits bumps it (2: the CPU kernels of issue 31).
constexpr int kArithmeticVersion = 2;

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

// Rows are grouped by 4 (one Philox call = 4 rows); counter[0] is 32 bits.
constexpr int64_t kMaxRows = int64_t(1) << 34;
constexpr int64_t kMaxCols = int64_t(1) << 32;

enum class Distribution : int { Normal = 0, Uniform = 1, Rademacher = 2 };

struct Philox4 {
  uint32_t w[4];
};

// One 32x32->64 multiply; on CUDA this lowers to a single IMAD.WIDE.U32.
RBD_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}

template <int Rounds>
RBD_HOST_DEVICE Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                   uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < Rounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The same generator on precomputed round keys: round r XORs (k0 + r W0, k1 + r W1) mod 2^32.
// Kernels whose key is the same for every thread can take them from the host, once per launch, as
// a kernel parameter (read from the constant bank) instead of deriving them in the hot loop. Which
// kernels do is a matter of their SASS (docs/performance.md 2.3); the words are the same. The raw
// philox4x32 op runs this form on every device, so the known-answer tests check it, and the
// stream's products, checked against rbd_cuda.reference, check the form above.
template <int Rounds>
struct RoundKeys {
  uint32_t k0[Rounds], k1[Rounds];
};

template <int Rounds>
RBD_HOST_DEVICE RoundKeys<Rounds> round_keys(uint32_t k0, uint32_t k1) {
  RoundKeys<Rounds> k;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < Rounds; ++r) {
    k.k0[r] = k0 + uint32_t(r) * kPhiloxW0;
    k.k1[r] = k1 + uint32_t(r) * kPhiloxW1;
  }
  return k;
}

template <int Rounds>
RBD_HOST_DEVICE Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                   const RoundKeys<Rounds>& k) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < Rounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k.k0[r];
    const uint32_t n2 = hi0 ^ c3 ^ k.k1[r];
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The stream's generator: Philox4x32-10.
using StreamKeys = RoundKeys<10>;

RBD_HOST_DEVICE StreamKeys stream_keys(uint32_t k0, uint32_t k1) { return round_keys<10>(k0, k1); }

RBD_HOST_DEVICE Philox4 stream_block(uint32_t row_block, uint32_t col, uint32_t step,
                                     uint32_t stream, const StreamKeys& k) {
  return philox4x32<10>(row_block, col, step, stream, k);
}

RBD_HOST_DEVICE Philox4 stream_block(uint32_t row_block, uint32_t col, uint32_t step,
                                     uint32_t stream, uint32_t k0, uint32_t k1) {
  return philox4x32<10>(row_block, col, step, stream, k0, k1);
}

// ---- bit -> float conversions (exact in fp32) ----------------------------

// U(-1, 1) on the grid k * 2^-23 - 1, k in [0, 2^24): exact in fp32.
RBD_HOST_DEVICE float uniform_pm1(uint32_t x) {
  return float(x >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

// (0, 1] on the grid (k + 1) * 2^-24: never 0, so log() is finite.
RBD_HOST_DEVICE float uniform_open0(uint32_t x) {
  return float((x >> 8) + 1u) * (1.0f / 16777216.0f);
}

// Rademacher: bit set -> -1, clear -> +1.
RBD_HOST_DEVICE float rademacher(uint32_t word, int bit) {
  return ((word >> bit) & 1u) ? -1.0f : 1.0f;
}

// ---- Box-Muller ------------------------------------------------------------
//
// From words (a, b): u1 = uniform_open0(a) in (0, 1], v = uniform_pm1(b) in [-1, 1),
//   z0 = sqrt(-2 ln u1) * cos(pi v),   z1 = sqrt(-2 ln u1) * sin(pi v).
// Words (0, 1) give rows 4b, 4b+1; words (2, 3) give rows 4b+2, 4b+3.
// The CPU kernels use box_muller, the portable polynomials below, written branch-free so that
// the SIMD kernels (rbd/philox_simd.h) evaluate the same expressions lane by lane and get the same
// bits as this scalar code. The CUDA kernels use box_muller_polar, the special-function unit's
// log2, square root, sine and cosine (the angle is in [-pi, pi), where sine and cosine are
// accurate to ~2^-21 absolute). The two agree to 1e-5 + 2e-7 / |z| (docs/random_stream.md).

// a * b + c, rounded once. Every CPU path evaluates the polynomials with it: the SIMD paths with
// their FMA instructions, the scalar baseline with fmaf (a libm call where the build's
// instruction set has no FMA; correctly rounded either way, so the bits agree).
RBD_HOST_DEVICE float mul_add(float a, float b, float c) { return fmaf(a, b, c); }

namespace detail {

RBD_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union { float f; uint32_t u; } v{f};
  return v.u;
#endif
}

RBD_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union { uint32_t u; float f; } v{u};
  return v.f;
#endif
}

// The polynomial parts below are templates on the float type F so that the host SIMD code
// (rbd/philox_simd.h, F = a pack of vectors whose mul_add is the FMA instruction) evaluates the
// very same expressions, in the same order, and gets the same bits as the scalar code (F = float).

// ln(x) = ln(1 + m) + e ln 2 by Cephes logf's polynomial in m = mantissa - 1 and the exponent ef.
template <typename F>
RBD_HOST_DEVICE F log_poly_reduced(F m, F ef) {
  const F z = m * m;
  F y = mul_add(m, 7.0376836292e-2f, -1.1514610310e-1f);
  y = mul_add(y, m, 1.1676998740e-1f);
  y = mul_add(y, m, -1.2420140846e-1f);
  y = mul_add(y, m, 1.4249322787e-1f);
  y = mul_add(y, m, -1.6668057665e-1f);
  y = mul_add(y, m, 2.0000714765e-1f);
  y = mul_add(y, m, -2.4999993993e-1f);
  y = mul_add(y, m, 3.3333331174e-1f);
  y = y * m * z;
  y = mul_add(ef, -2.12194440e-4f, y);
  y = mul_add(z, -0.5f, y);
  return mul_add(ef, 0.693359375f, m + y);
}

// Cephes logf's reduction of u1 = k 2^-24, k = (a >> 8) + 1 (uniform_open0): u1 = (1 + m) 2^e
// with 1 + m in [sqrt(1/2), sqrt(2)). Adding 0x3f800000 - 0x3f3504f3 (1.0f - sqrt(1/2)f in bits)
// to the bits of float(k) carries into the exponent exactly when the mantissa is at least
// sqrt(1/2)'s; the mantissa bits plus sqrt(1/2)'s then give 1 + m. Integer operations and one
// exact subtraction, no compare or select (musl's logf does the same).
constexpr uint32_t kLogOffset = 0x3f800000u - 0x3f3504f3u;
constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;
constexpr int kLogBias = 127 + 24;  // exponent bias, and u1 = k 2^-24

RBD_HOST_DEVICE void log_reduce(uint32_t a, float& m, float& ef) {
  const uint32_t ix = float_bits(float((a >> 8) + 1u)) + kLogOffset;
  ef = float(int(ix >> 23) - kLogBias);
  m = bits_float((ix & 0x007fffffu) + kSqrtHalfBits) - 1.0f;  // exact
}

// sin(t), cos(t) for |t| <= pi/4 by their Taylor series to t^9 and t^10 (truncation below 2e-9).
template <typename F>
RBD_HOST_DEVICE void sincos_poly(F t, F& s, F& c) {
  const F t2 = t * t;
  F ps = mul_add(t2, 2.75573192e-6f, -1.98412698e-4f);
  ps = mul_add(ps, t2, 8.33333333e-3f);
  ps = mul_add(ps, t2, -1.66666667e-1f);
  s = mul_add(t * t2, ps, t);
  F pc = mul_add(t2, -2.75573192e-7f, 2.48015873e-5f);
  pc = mul_add(pc, t2, -1.38888889e-3f);
  pc = mul_add(pc, t2, 4.16666667e-2f);
  pc = mul_add(pc, t2, -0.5f);
  c = mul_add(t2, pc, 1.0f);
}

// The angle pi v, v = uniform_pm1(b) = k 2^-23 - 1 with k = b >> 8, as pi r + q pi/2 with
// q = round(2v) (halves up) and r = v - q/2 in [-1/4, 1/4], by integer operations on b: with
// h = b + 2^29, q + 2 = h >> 30 (mod 4, which is all the quadrant needs), and
// r 2^31 = (b with its low 8 bits cleared) - (h's top two bits), exact in an int32 (|r| 2^31 <= 2^29,
// a multiple of 2^8) and in its float. angle_h returns h, angle_t the reduced angle pi r.
constexpr uint32_t kQuarterTurnHalf = 1u << 29;
constexpr float kPiOver2p31 = 3.14159265358979f / 2147483648.0f;  // float(pi) 2^-31, exact

RBD_HOST_DEVICE float angle_t(uint32_t b, uint32_t h) {
  return float(int32_t((b & 0xffffff00u) - (h & 0xc0000000u))) * kPiOver2p31;
}

// Rotates (sin, cos) of pi r by q quarter turns, q + 2 = h >> 30 (mod 4): bit 30 of h (q odd)
// swaps sine and cosine, sine is negated where bit 31 is clear (q = 2, 3 mod 4) and cosine where
// bits 31 and 30 agree (q = 1, 2).
RBD_HOST_DEVICE uint32_t sin_sign(uint32_t h) { return ~h & 0x80000000u; }
RBD_HOST_DEVICE uint32_t cos_sign(uint32_t h) { return ~(h ^ (h << 1)) & 0x80000000u; }

}  // namespace detail

RBD_HOST_DEVICE void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  float m, ef;
  detail::log_reduce(a, m, ef);
  const float radius = __builtin_sqrtf(detail::log_poly_reduced(m, ef) * -2.0f);
  const uint32_t h = b + detail::kQuarterTurnHalf;
  float sf, cf;
  detail::sincos_poly(detail::angle_t(b, h), sf, cf);
  const uint32_t sr = detail::float_bits(sf), cr = detail::float_bits(cf);
  const uint32_t swap = 0u - ((h >> 30) & 1u);
  const float s = detail::bits_float(((sr & ~swap) | (cr & swap)) ^ detail::sin_sign(h));
  const float c = detail::bits_float(((cr & ~swap) | (sr & swap)) ^ detail::cos_sign(h));
  z0 = radius * c;
  z1 = radius * s;
}

// ---- the GPU's special-function unit, each with a host twin ------------------------------
//
// Device code gets the SFU approximations (inline PTX: about 2^-22 absolute error for lg2, sin and
// cos in the ranges used here); host code, which is the CUDA emulator's build of the same kernels
// (csrc/emu), gets libm's accurately rounded functions. So the emulator checks what the kernels
// compute from these values, not the GPU's last bits.
namespace sfu {

RBD_HOST_DEVICE float lg2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return __builtin_log2f(x);
#endif
}

RBD_HOST_DEVICE float sqrt(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return __builtin_sqrtf(x);
#endif
}

RBD_HOST_DEVICE float sin(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("sin.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return __builtin_sinf(x);
#endif
}

RBD_HOST_DEVICE float cos(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("cos.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return __builtin_cosf(x);
#endif
}

}  // namespace sfu

// The CUDA kernels' Box–Muller: z0 = r c, z1 = r s from words (a, b), with the same integer inputs
// as box_muller above (the CPU kernels'), in fewer instructions, and not bit-identical to it:
//  * lg2/sqrt in their FTZ forms: u1 >= 2^-24 and the square root's argument are never
//    denormal (or are 0), where these agree with the non-FTZ forms, which carry denormal guards;
//  * -2 ln u1 = lg2(u1) * (-2 ln 2) in one multiply instead of two;
//  * the angle fma(k, pi 2^-23, -pi), k = b >> 8, equals uniform_pm1(b) * pi bit for bit for every
//    k < 2^24 (checked exhaustively, docs/random_stream.md), in one instruction instead of two.
RBD_HOST_DEVICE void box_muller_polar(uint32_t a, uint32_t b, float& r, float& s, float& c) {
  const float l2 = sfu::lg2(uniform_open0(a));
  r = sfu::sqrt(fmaxf(0.0f, l2 * -1.38629436111989061f));
  const float angle = fmaf(float(b >> 8), 3.14159265358979f / 8388608.0f, -3.14159265358979f);
  s = sfu::sin(angle);
  c = sfu::cos(angle);
}

// Four normal entries (rows 4b..4b+3 of one column) from one Philox block.
RBD_HOST_DEVICE void normal4(const Philox4& x, float out[4]) {
  box_muller(x.w[0], x.w[1], out[0], out[1]);
  box_muller(x.w[2], x.w[3], out[2], out[3]);
}

RBD_HOST_DEVICE void uniform4(const Philox4& x, float out[4]) {
  out[0] = uniform_pm1(x.w[0]);
  out[1] = uniform_pm1(x.w[1]);
  out[2] = uniform_pm1(x.w[2]);
  out[3] = uniform_pm1(x.w[3]);
}

// Single entry P[row, col], for debugging and the materialize op.
RBD_HOST_DEVICE float entry(Distribution dist, uint64_t row, uint64_t col, uint32_t step,
                            uint32_t stream, uint32_t k0, uint32_t k1) {
  const uint32_t rb = uint32_t(row >> 2);
  const int w = int(row & 3);
  if (dist == Distribution::Rademacher) {
    const Philox4 x = stream_block(rb, uint32_t(col >> 5), step, stream, k0, k1);
    return rademacher(x.w[w], int(col & 31));
  }
  const Philox4 x = stream_block(rb, uint32_t(col), step, stream, k0, k1);
  float v[4];
  if (dist == Distribution::Normal) {
    normal4(x, v);
  } else {
    uniform4(x, v);
  }
  return v[w];
}

}  // namespace rbd

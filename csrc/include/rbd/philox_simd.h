// Host-only SIMD Philox4x32 and the stream's conversions, for the CPU kernels.
//
// Same constants, counter/key layout and float expressions as rbd/philox.h, so the words are
// bit-identical to philox4x32() and the normal, uniform and Rademacher entries to the scalar
// conversions (tests/test_cpu_isa.py checks both on every ISA the CPU has).
//
// Include only from a translation unit compiled for the instruction set (by `#pragma GCC target`
// before any include, see csrc/cpu/kernels_avx512.cpp) that defines RBD_SIMD_AVX512 or
// RBD_SIMD_AVX2 to get that ISA's struct (GCC's target pragma does not define __AVX2__ etc. in
// C++, and one ISA per TU keeps the instantiations of different ISAs apart). Such a TU must not include torch or standard-library headers whose
// inline functions the rest of the library also instantiates: the linker keeps one copy of each
// inline function, and the AVX-512 copy would crash on a CPU without AVX-512.
//
// Layout: a Philox state word of N counters is held in N 64-bit slots (the word in the low half,
// the high half ignored), because x86's 32x32->64 multiply (vpmuludq) reads the low half of each
// slot and writes the full product. A round is then 2 multiplies, 2 shifts and 2 three-way XORs
// per slot vector; no shuffles until the 4 output words are packed into 32-bit lanes at the end.
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "rbd/philox.h"

#if defined(__CUDACC__)
#error "rbd/philox_simd.h is host-only"
#endif

// Pack<__m512, K> drops __m512's may_alias attribute from the template argument; Pack only
// holds values (no pointer casts), so the attribute is not needed there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"

namespace rbd {
namespace simd {

#if defined(RBD_SIMD_AVX512)

struct Avx512 {
  static constexpr const char* kName = "avx512";
  static constexpr int kLanes = 16;  // 32-bit lanes per vector
  // 16-column tiles generated together: with 32 registers two tiles' chains fit side by side.
  static constexpr int kTilesPerStep = 2;
  using I = __m512i;                 // 16 x u32, or 8 x u64 slots
  using F = __m512;                  // 16 x f32 (a GCC vector: + - * work on it)

  static I splat64(uint64_t v) { return _mm512_set1_epi64(int64_t(v)); }
  static I splat32(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  static I mul_wide(I x, I m) { return _mm512_mul_epu32(x, m); }
  static I high_half(I p) { return _mm512_srli_epi64(p, 32); }
  static I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static I add64(I a, I b) { return _mm512_add_epi64(a, b); }
  // 8 u32 values zero-extended into 64-bit slots.
  static I load_slots(const uint32_t* p) {
    return _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static I slot_iota() { return _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0); }
  // Low halves of the slots of a (counters 0..7) and b (8..15) as 16 u32 lanes, in order.
  static I pack(I a, I b) {
    const I idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_permutex2var_epi32(a, idx, b);
  }

  static I srli32(I x, int n) { return _mm512_srli_epi32(x, unsigned(n)); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static I slli32(I x, int n) { return _mm512_slli_epi32(x, unsigned(n)); }
  static I select(I m, I a, I b) { return _mm512_ternarylogic_epi32(m, a, b, 0xCA); }  // m ? a : b
  static I xor_and(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x78); }  // a ^ (b & c)
  static F to_float(I x) { return _mm512_cvtepi32_ps(x); }  // exact for |x| < 2^24
  static I trunc_int(F x) { return _mm512_cvttps_epi32(x); }
  static F as_float(I x) { return _mm512_castsi512_ps(x); }
  static I as_int(F x) { return _mm512_castps_si512(x); }
  static F sqrt(F x) { return _mm512_sqrt_ps(x); }
  static I lt_as_one(F a, float b) {  // 1 where a < b, else 0
    return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a, _mm512_set1_ps(b), _CMP_LT_OQ), splat32(1));
  }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_words(uint32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static F zero() { return _mm512_setzero_ps(); }
  static F splat(float v) { return _mm512_set1_ps(v); }

  // Rademacher: v with its sign flipped in lanes whose bit of `word` is set; lane l of
  // part p (16 lanes) reads bit 16 p + l. The word becomes a mask register: one masked XOR.
  using Signs = uint32_t;
  static Signs signs(uint32_t word) { return word; }
  static F flip(F v, Signs word, int part) {
    const __mmask16 k = __mmask16(word >> (16 * part));
    return _mm512_castsi512_ps(_mm512_mask_xor_epi32(_mm512_castps_si512(v), k,
                                                     _mm512_castps_si512(v), splat32(0x80000000u)));
  }
};
#endif

#if defined(RBD_SIMD_AVX2)

struct Avx2 {
  static constexpr const char* kName = "avx2";
  static constexpr int kLanes = 8;
  static constexpr int kTilesPerStep = 1;  // one tile is already 4 slot vectors per word (16 registers)
  using I = __m256i;
  using F = __m256;

  static I splat64(uint64_t v) { return _mm256_set1_epi64x(int64_t(v)); }
  static I splat32(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static I mul_wide(I x, I m) { return _mm256_mul_epu32(x, m); }
  static I high_half(I p) { return _mm256_srli_epi64(p, 32); }
  static I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static I add64(I a, I b) { return _mm256_add_epi64(a, b); }
  static I load_slots(const uint32_t* p) {
    return _mm256_cvtepu32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I slot_iota() { return _mm256_set_epi64x(3, 2, 1, 0); }
  static I pack(I a, I b) {
    // shuffle_ps takes the low halves as (a0 a1 b0 b1 | a2 a3 b2 b3); vpermq puts them in order.
    const __m256 s = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b),
                                       _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_permute4x64_epi64(_mm256_castps_si256(s), _MM_SHUFFLE(3, 1, 2, 0));
  }

  static I srli32(I x, int n) { return _mm256_srli_epi32(x, n); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static I slli32(I x, int n) { return _mm256_slli_epi32(x, n); }
  static I select(I m, I a, I b) { return _mm256_or_si256(_mm256_and_si256(m, a), _mm256_andnot_si256(m, b)); }
  static I xor_and(I a, I b, I c) { return _mm256_xor_si256(a, _mm256_and_si256(b, c)); }
  static F to_float(I x) { return _mm256_cvtepi32_ps(x); }
  static I trunc_int(F x) { return _mm256_cvttps_epi32(x); }
  static F as_float(I x) { return _mm256_castsi256_ps(x); }
  static I as_int(F x) { return _mm256_castps_si256(x); }
  static F sqrt(F x) { return _mm256_sqrt_ps(x); }
  static I lt_as_one(F a, float b) {
    return _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(b), _CMP_LT_OQ)),
                            splat32(1));
  }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_words(uint32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F splat(float v) { return _mm256_set1_ps(v); }

  // Rademacher without mask registers: shift bit 8 p + l of the broadcast word into lane l's
  // sign position (variable shift), keep it, XOR it into v.
  using Signs = I;
  static Signs signs(uint32_t word) { return splat32(word); }
  static F flip(F v, Signs word, int part) {
    const I shift = _mm256_sub_epi32(splat32(31u - 8u * unsigned(part)),
                                     _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
    const I sign = _mm256_and_si256(_mm256_sllv_epi32(word, shift), splat32(0x80000000u));
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(v), sign));
  }
};
#endif

// Philox4x32-Rounds on N slot vectors of counters, the key in 64-bit slots (k0, k1); the
// state c[w][n] is updated in place. The N independent chains interleave round by round, so
// the multiplies' latency is hidden.
template <class V, int Rounds, int N>
inline void philox_slots(typename V::I (&c)[4][N], typename V::I k0, typename V::I k1) {
  using I = typename V::I;
  const I m0 = V::splat64(kPhiloxM0), m1 = V::splat64(kPhiloxM1);
  const I w0 = V::splat64(kPhiloxW0), w1 = V::splat64(kPhiloxW1);
  for (int r = 0; r < Rounds; ++r) {
    if (r > 0) {
      // Only the low halves matter; a carry into the high half is ignored like all high halves.
      k0 = V::add64(k0, w0);
      k1 = V::add64(k1, w1);
    }
    for (int n = 0; n < N; ++n) {
      const I p0 = V::mul_wide(c[0][n], m0);  // (hi0, lo0)
      const I p1 = V::mul_wide(c[2][n], m1);  // (hi1, lo1)
      c[0][n] = V::xor3(V::high_half(p1), c[1][n], k0);
      c[2][n] = V::xor3(V::high_half(p0), c[3][n], k1);
      c[1][n] = p1;
      c[3][n] = p0;
    }
  }
}

template <int T>
inline bool c0_uniform(const uint32_t (&c0)[T]) {
  for (int t = 1; t < T; ++t) {
    if (c0[t] != c0[0]) return false;
  }
  return true;
}

// Philox4x32-10 blocks for T vectors of counters: lane l of vector t gets counter
// (c0[t] + l * d0, c1[t] + l * d1, step, stream) under key (k0, k1); out[w][t] holds word w.
// (d0, d1) = (0, 1): consecutive columns of one row block; (1, 0): consecutive row blocks.
template <class V, int T>
inline void stream_blocks(const uint32_t (&c0)[T], const uint32_t (&c1)[T], uint32_t d0, uint32_t d1,
                          uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1,
                          typename V::I (&out)[4][T]) {
  using I = typename V::I;
  constexpr int kSlots = V::kLanes / 2;  // counters per slot vector
  I c[4][2 * T];
  const I iota = V::slot_iota();
  // Slot values wrap mod 2^32 in the low half (a carry into the high half is ignored).
  const I l0 = V::mul_wide(iota, V::splat64(d0)), l1 = V::mul_wide(iota, V::splat64(d1));
  const I half0 = V::splat64(uint64_t(d0) * kSlots), half1 = V::splat64(uint64_t(d1) * kSlots);
  for (int t = 0; t < T; ++t) {
    const I a0 = V::add64(V::splat64(c0[t]), l0), a1 = V::add64(V::splat64(c1[t]), l1);
    c[0][2 * t] = a0;
    c[1][2 * t] = a1;
    c[0][2 * t + 1] = V::add64(a0, half0);
    c[1][2 * t + 1] = V::add64(a1, half1);
    c[2][2 * t] = c[2][2 * t + 1] = V::splat64(step);
    c[3][2 * t] = c[3][2 * t + 1] = V::splat64(stream);
  }
  if (d0 == 0 && c0_uniform(c0)) {
    // Row-block tiles: c0, c2 and c3 are the same in every lane, so round 1's products are
    // scalars and only its XOR into c1 is per lane.
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0[0], p1 = uint64_t(kPhiloxM1) * step;
    const I x0 = V::splat64(uint32_t(p1 >> 32) ^ k0);
    const I s1 = V::splat64(uint32_t(p1)), s2 = V::splat64(uint32_t(p0 >> 32) ^ stream ^ k1);
    const I s3 = V::splat64(uint32_t(p0));
    for (int n = 0; n < 2 * T; ++n) {
      c[0][n] = V::xor_(c[1][n], x0);
      c[1][n] = s1;
      c[2][n] = s2;
      c[3][n] = s3;
    }
    philox_slots<V, 9, 2 * T>(c, V::splat64(k0 + kPhiloxW0), V::splat64(k1 + kPhiloxW1));
  } else {
    philox_slots<V, 10, 2 * T>(c, V::splat64(k0), V::splat64(k1));
  }
  for (int w = 0; w < 4; ++w) {
    for (int t = 0; t < T; ++t) out[w][t] = V::pack(c[w][2 * t], c[w][2 * t + 1]);
  }
}

// Philox4x32-10 blocks for kLanes arbitrary counters (c0[l], c1[l], step, stream), one key.
template <class V>
inline void stream_blocks_at(const uint32_t* c0, const uint32_t* c1, uint32_t step, uint32_t stream,
                             uint32_t k0, uint32_t k1, typename V::I (&out)[4]) {
  using I = typename V::I;
  constexpr int kSlots = V::kLanes / 2;
  I c[4][2];
  for (int h = 0; h < 2; ++h) {
    c[0][h] = V::load_slots(c0 + h * kSlots);
    c[1][h] = V::load_slots(c1 + h * kSlots);
    c[2][h] = V::splat64(step);
    c[3][h] = V::splat64(stream);
  }
  philox_slots<V, 10, 2>(c, V::splat64(k0), V::splat64(k1));
  for (int w = 0; w < 4; ++w) out[w] = V::pack(c[w][0], c[w][1]);
}

// Philox4x32-Rounds of kLanes counters c[.][l] under their own keys k[.][l] (the debug op).
template <class V, int Rounds>
inline void philox_lanes(const uint32_t (&c)[4][V::kLanes], const uint32_t (&k)[2][V::kLanes],
                         typename V::I (&out)[4]) {
  using I = typename V::I;
  constexpr int kSlots = V::kLanes / 2;
  I half[2][4][1];
  for (int h = 0; h < 2; ++h) {
    for (int w = 0; w < 4; ++w) half[h][w][0] = V::load_slots(c[w] + h * kSlots);
    philox_slots<V, Rounds, 1>(half[h], V::load_slots(k[0] + h * kSlots),
                               V::load_slots(k[1] + h * kSlots));
  }
  for (int w = 0; w < 4; ++w) out[w] = V::pack(half[0][w][0], half[1][w][0]);
}

// ---- conversions on 32-bit lanes: the expressions of rbd/philox.h -----------------------

template <class V>
inline typename V::F uniform_pm1(typename V::I x) {
  return V::to_float(V::srli32(x, 8)) * (1.0f / 8388608.0f) - 1.0f;
}

template <class V>
inline typename V::F uniform_open0(typename V::I x) {
  return V::to_float(V::add32(V::srli32(x, 8), V::splat32(1))) * (1.0f / 16777216.0f);
}

// K vectors evaluated statement by statement: the polynomials (templates of rbd/philox.h) then
// advance K independent dependency chains together, which the core overlaps; one chain alone
// is latency-bound (a Horner step waits for the previous one).
template <class F, int K>
struct Pack {
  F v[K];
  friend Pack operator+(Pack a, const Pack& b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] + b.v[k];
    return a;
  }
  friend Pack operator-(Pack a, const Pack& b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] - b.v[k];
    return a;
  }
  friend Pack operator*(Pack a, const Pack& b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] * b.v[k];
    return a;
  }
  friend Pack operator+(Pack a, float b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] + b;
    return a;
  }
  friend Pack operator-(Pack a, float b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] - b;
    return a;
  }
  friend Pack operator*(Pack a, float b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] * b;
    return a;
  }
};

// z0[k], z1[k] = Box-Muller of words (a[k], b[k]): rbd/philox.h's box_muller on the host.
template <class V, int K>
inline void box_muller(const typename V::I (&a)[K], const typename V::I (&b)[K],
                       typename V::F (&z0)[K], typename V::F (&z1)[K]) {
  using I = typename V::I;
  using P = Pack<typename V::F, K>;
  // radius = sqrt(-2 ln u1), ln by log_poly: u1 = m 2^e with m in [sqrt(1/2), sqrt(2)).
  P m, ef;
  for (int k = 0; k < K; ++k) {
    const I bits = V::as_int(uniform_open0<V>(a[k]));
    const typename V::F mant =
        V::as_float(V::or_(V::and_(bits, V::splat32(0x007fffffu)), V::splat32(0x3f000000u)));
    const I small = V::lt_as_one(mant, 0.70710678118654752f);
    const I e = V::sub32(V::sub32(V::and_(V::srli32(bits, 23), V::splat32(0xffu)), V::splat32(126)), small);
    m.v[k] = mant * V::to_float(V::add32(small, V::splat32(1))) - 1.0f;
    ef.v[k] = V::to_float(e);
  }
  const P ln = detail::log_poly_reduced<P>(m, ef);
  // sin(pi v), cos(pi v) by sincospi_poly's reduction and quadrant rotation.
  P v, q, sf, cf;
  for (int k = 0; k < K; ++k) v.v[k] = uniform_pm1<V>(b[k]);
  detail::sincospi_reduced<P>(v, q, sf, cf);
  for (int k = 0; k < K; ++k) {
    const I sr = V::as_int(sf.v[k]), cr = V::as_int(cf.v[k]);
    // Rotate by q quarter turns: bit 0 of q swaps sin and cos, bit 1 negates sin, bit 1 of
    // q + 1 negates cos (the same bits as sincospi_poly's integer code).
    const I qi = V::trunc_int(q.v[k]);
    const I swap = V::sub32(V::splat32(0), V::and_(qi, V::splat32(1)));
    const I sign = V::splat32(0x80000000u);
    const typename V::F s = V::as_float(V::xor_and(V::select(swap, cr, sr), V::slli32(qi, 30), sign));
    const typename V::F c =
        V::as_float(V::xor_and(V::select(swap, sr, cr), V::slli32(V::add32(qi, V::splat32(1)), 30), sign));
    const typename V::F radius = V::sqrt(ln.v[k] * -2.0f);
    z0[k] = radius * c;
    z1[k] = radius * s;
  }
}

}  // namespace simd
}  // namespace rbd

#pragma GCC diagnostic pop

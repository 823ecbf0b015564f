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
// Notes that vector arguments and returns are passed differently without AVX: every function
// here is inlined into a kernel of this TU's instruction set.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rbd {
namespace simd {

#if defined(RBD_SIMD_AVX512)

inline __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }

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
  static I lane_iota() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
  // Lane l: table[idx[l] & 15].
  static F lookup(F table, I idx) { return _mm512_permutexvar_ps(idx, table); }
  // Lane l: p[idx[l]].
  static F gather(const float* p, I idx) { return _mm512_i32gather_ps(idx, p, 4); }
  // Lane l: x[l ^ S], S = 1, 2 or 4.
  template <int S>
  static F swap_lanes(F x) {
    if constexpr (S == 1) return _mm512_permute_ps(x, 0xB1);
    if constexpr (S == 2) return _mm512_permute_ps(x, 0x4E);
    if constexpr (S == 4) return _mm512_shuffle_f32x4(x, x, 0xB1);
  }
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
  static F to_float(I x) { return _mm512_cvtepi32_ps(x); }  // exact for |x| < 2^24
  static F as_float(I x) { return _mm512_castsi512_ps(x); }
  static I as_int(F x) { return _mm512_castps_si512(x); }
  static F sqrt(F x) { return _mm512_sqrt_ps(x); }
  static F fma(F a, F b, F c) { return fmadd(a, b, c); }
  // m's sign bit set ? a : b
  static I select_by_sign(I m, I a, I b) { return _mm512_mask_blend_epi32(_mm512_movepi32_mask(m), b, a); }
  static I xor_andnot(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0xD2); }  // a ^ (~b & c)
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_words(uint32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static I load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }
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

inline __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }

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
  static I lane_iota() { return _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0); }
  // Lane l: table[idx[l] & 7].
  static F lookup(F table, I idx) { return _mm256_permutevar8x32_ps(table, idx); }
  static F gather(const float* p, I idx) { return _mm256_i32gather_ps(p, idx, 4); }
  template <int S>
  static F swap_lanes(F x) {
    if constexpr (S == 1) return _mm256_permute_ps(x, 0xB1);
    if constexpr (S == 2) return _mm256_permute_ps(x, 0x4E);
    if constexpr (S == 4) return _mm256_permute2f128_ps(x, x, 1);
  }
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
  static F to_float(I x) { return _mm256_cvtepi32_ps(x); }
  static F as_float(I x) { return _mm256_castsi256_ps(x); }
  static I as_int(F x) { return _mm256_castps_si256(x); }
  static F sqrt(F x) { return _mm256_sqrt_ps(x); }
  static F fma(F a, F b, F c) { return fmadd(a, b, c); }
  static I select_by_sign(I m, I a, I b) {  // m's sign bit set ? a : b
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a),
                                                _mm256_castsi256_ps(m)));
  }
  static I xor_andnot(I a, I b, I c) { return _mm256_xor_si256(a, _mm256_andnot_si256(b, c)); }  // a ^ (~b & c)
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_words(uint32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static I load_words(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
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

// Round keys as vectors, once per kernel call: round r XORs (k0 + r W0, k1 + r W1) (rbd/philox.h's
// StreamKeys), here splatted into every 32-bit lane (a slot reads its low half). The rounds read
// them from memory, so they take no registers.
template <class V>
struct VKeys {
  typename V::I k0[10], k1[10];
};

template <class V>
inline VKeys<V> vector_keys(uint32_t k0, uint32_t k1) {
  const StreamKeys k = stream_keys(k0, k1);
  VKeys<V> out;
  for (int r = 0; r < 10; ++r) {
    out.k0[r] = V::splat32(k.k0[r]);
    out.k1[r] = V::splat32(k.k1[r]);
  }
  return out;
}

// Rounds [R0, R1) of Philox4x32 on N slot vectors of counters; the state c[w][n] is updated in
// place. The N independent chains advance round by round, so the multiplies' latency overlaps;
// the rounds are unrolled so that the state stays in registers.
template <class V, int R0, int R1, int N>
inline void philox_rounds(typename V::I (&c)[4][N], const VKeys<V>& k) {
  using I = typename V::I;
  const I m0 = V::splat64(kPhiloxM0), m1 = V::splat64(kPhiloxM1);
#pragma GCC unroll 10
  for (int r = R0; r < R1; ++r) {
    for (int n = 0; n < N; ++n) {
      const I p0 = V::mul_wide(c[0][n], m0);  // (hi0, lo0)
      const I p1 = V::mul_wide(c[2][n], m1);  // (hi1, lo1)
      c[0][n] = V::xor3(V::high_half(p1), c[1][n], k.k0[r]);
      c[2][n] = V::xor3(V::high_half(p0), c[3][n], k.k1[r]);
      c[1][n] = p1;
      c[3][n] = p0;
    }
  }
}

// The counters (rb, col, step, stream) of one row block: the first three rounds on what is the
// same in every lane. c0 = rb, c2 = step and c3 = stream are, so round 1's products are scalars
// and only its XOR into c0 (the column) is per lane; round 2 multiplies c0 per lane and c2 as a
// scalar, round 3 the reverse. RowRounds holds the scalar parts; philox_row the per-lane rest:
// 3 + 4 vector operations instead of two full rounds (AVX2: 16).
struct RowRounds {
  uint32_t x0;   // round 1: c0 = col ^ x0
  uint32_t c3k;  // round 2: c2 = hi(c0 M0) ^ c3k
  uint32_t c1k;  // round 3: c0 = hi(c2 M1) ^ c1k
  uint32_t c2k;  // round 3: c2 = c3 ^ c2k
  uint32_t c3k4; // round 4: c2 = hi(c0 M0) ^ c3k4
};

inline RowRounds row_rounds(uint32_t rb, uint32_t step, uint32_t stream, const StreamKeys& k) {
  const uint64_t p1 = uint64_t(kPhiloxM1) * step, p0 = uint64_t(kPhiloxM0) * rb;
  const uint32_t s1 = uint32_t(p1), s2 = uint32_t(p0 >> 32) ^ stream ^ k.k1[0], s3 = uint32_t(p0);
  const uint64_t p1b = uint64_t(kPhiloxM1) * s2;  // round 2
  const uint32_t t0 = uint32_t(p1b >> 32) ^ s1 ^ k.k0[1], t1 = uint32_t(p1b);
  const uint64_t p0c = uint64_t(kPhiloxM0) * t0;  // round 3
  return RowRounds{uint32_t(p1 >> 32) ^ k.k0[0], s3 ^ k.k1[1], t1 ^ k.k0[2],
                   uint32_t(p0c >> 32) ^ k.k1[2], uint32_t(p0c) ^ k.k1[3]};
}

// Philox4x32-10 of the counters (rb, cx[n] ^ x0, step, stream): cx[n] holds the columns of slot
// vector n XORed with RowRounds::x0 (loop-invariant across rows). c[w][n] receives word w.
template <class V, int N>
inline void philox_row(const RowRounds& rr, const typename V::I (&cx)[N], const VKeys<V>& k,
                       typename V::I (&c)[4][N]) {
  using I = typename V::I;
  const I m0 = V::splat64(kPhiloxM0), m1 = V::splat64(kPhiloxM1);
  const I c3k = V::splat32(rr.c3k), c1k = V::splat32(rr.c1k), c2k = V::splat32(rr.c2k);
  const I c3k4 = V::splat32(rr.c3k4);
  for (int n = 0; n < N; ++n) {
    const I p0 = V::mul_wide(cx[n], m0);                      // round 2
    const I c2 = V::xor_(V::high_half(p0), c3k);
    const I p1 = V::mul_wide(c2, m1);                         // round 3
    const I c0 = V::xor_(V::high_half(p1), c1k);
    const I c2b = V::xor_(p0, c2k);
    const I q0 = V::mul_wide(c0, m0), q1 = V::mul_wide(c2b, m1);  // round 4
    c[0][n] = V::xor3(V::high_half(q1), p1, k.k0[3]);
    c[2][n] = V::xor_(V::high_half(q0), c3k4);
    c[1][n] = q1;
    c[3][n] = q0;
  }
  philox_rounds<V, 4, 10, N>(c, k);
}

// The slot vectors' columns for philox_row: slot vector n of col0 holds col0 + n kSlots + l.
template <class V, int N>
inline void row_columns(uint32_t col0, uint32_t x0, typename V::I (&cx)[N]) {
  constexpr int kSlots = V::kLanes / 2;
  for (int n = 0; n < N; ++n) {
    cx[n] = V::xor_(V::add64(V::splat64(col0 + uint32_t(n * kSlots)), V::slot_iota()), V::splat64(x0));
  }
}

// Philox4x32-10 blocks for T vectors of counters: lane l of vector t gets counter
// (c0[t] + l, c1, step, stream) under the keys k; out[w][t] holds word w (Rademacher project:
// consecutive row blocks of one column group).
template <class V, int T>
inline void stream_blocks_rows(const uint32_t (&c0)[T], uint32_t c1, uint32_t step, uint32_t stream,
                               const VKeys<V>& k, typename V::I (&out)[4][T]) {
  using I = typename V::I;
  constexpr int kSlots = V::kLanes / 2;
  I c[4][2 * T];
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < 2; ++h) {
      c[0][2 * t + h] = V::add64(V::splat64(c0[t] + uint32_t(h * kSlots)), V::slot_iota());
      c[1][2 * t + h] = V::splat64(c1);
      c[2][2 * t + h] = V::splat64(step);
      c[3][2 * t + h] = V::splat64(stream);
    }
  }
  philox_rounds<V, 0, 10, 2 * T>(c, k);
  for (int w = 0; w < 4; ++w) {
    for (int t = 0; t < T; ++t) out[w][t] = V::pack(c[w][2 * t], c[w][2 * t + 1]);
  }
}

// Philox4x32-10 blocks for kLanes counters (rb + drb[l], col + dcol[l], step, stream): the
// offsets come as slot vectors (load_slots of two halves of kLanes u32 each).
template <class V>
inline void stream_blocks_offsets(uint32_t rb, uint32_t col, const typename V::I (&drb)[2],
                                  const typename V::I (&dcol)[2], uint32_t step, uint32_t stream,
                                  const VKeys<V>& k, typename V::I (&out)[4]) {
  using I = typename V::I;
  I c[4][2];
  for (int h = 0; h < 2; ++h) {
    c[0][h] = V::add64(V::splat64(rb), drb[h]);
    c[1][h] = V::add64(V::splat64(col), dcol[h]);
    c[2][h] = V::splat64(step);
    c[3][h] = V::splat64(stream);
  }
  philox_rounds<V, 0, 10, 2>(c, k);
  for (int w = 0; w < 4; ++w) out[w] = V::pack(c[w][0], c[w][1]);
}

// Philox4x32-Rounds of kLanes counters c[.][l] under their own keys k[.][l] (the debug op).
template <class V, int Rounds>
inline void philox_lanes(const uint32_t (&c)[4][V::kLanes], const uint32_t (&k)[2][V::kLanes],
                         typename V::I (&out)[4]) {
  using I = typename V::I;
  constexpr int kSlots = V::kLanes / 2;
  const I w0 = V::splat64(kPhiloxW0), w1 = V::splat64(kPhiloxW1);
  I half[2][4][1];
  for (int h = 0; h < 2; ++h) {
    VKeys<V> keys;
    keys.k0[0] = V::load_slots(k[0] + h * kSlots);
    keys.k1[0] = V::load_slots(k[1] + h * kSlots);
    for (int r = 1; r < Rounds; ++r) {
      // Only the low halves matter; a carry into the high half is ignored like all high halves.
      keys.k0[r] = V::add64(keys.k0[r - 1], w0);
      keys.k1[r] = V::add64(keys.k1[r - 1], w1);
    }
    for (int w = 0; w < 4; ++w) half[h][w][0] = V::load_slots(c[w] + h * kSlots);
    philox_rounds<V, 0, Rounds, 1>(half[h], keys);
  }
  for (int w = 0; w < 4; ++w) out[w] = V::pack(half[0][w][0], half[1][w][0]);
}

// ---- conversions on 32-bit lanes: the expressions of rbd/philox.h -----------------------

template <class V>
inline typename V::F uniform_pm1(typename V::I x) {
  // k 2^-23 - 1 is exact for k < 2^24, so the FMA gives uniform_pm1's bits.
  return V::fma(V::to_float(V::srli32(x, 8)), V::splat(1.0f / 8388608.0f), V::splat(-1.0f));
}

// K vectors evaluated statement by statement: the polynomials (templates of rbd/philox.h) then
// advance K independent dependency chains together, which the core overlaps; one chain alone
// is latency-bound (a Horner step waits for the previous one).
template <class F, int K>
struct Pack {
  F v[K];
  static F lane(const Pack& p, int k) { return p.v[k]; }
  static F lane(float x, int) { return F{} + x; }
  friend Pack operator+(Pack a, const Pack& b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] + b.v[k];
    return a;
  }
  friend Pack operator*(Pack a, const Pack& b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] * b.v[k];
    return a;
  }
  friend Pack operator*(Pack a, float b) {
    for (int k = 0; k < K; ++k) a.v[k] = a.v[k] * b;
    return a;
  }
  // rbd/philox.h's mul_add on packs: the FMA instruction, lane by lane.
  template <class B, class C>
  friend Pack mul_add(Pack a, const B& b, const C& c) {
    for (int k = 0; k < K; ++k) a.v[k] = fmadd(a.v[k], lane(b, k), lane(c, k));
    return a;
  }
};

// z0[k], z1[k] = Box-Muller of words (a[k], b[k]): rbd/philox.h's box_muller on the host.
template <class V, int K>
inline void box_muller(const typename V::I (&a)[K], const typename V::I (&b)[K],
                       typename V::F (&z0)[K], typename V::F (&z1)[K]) {
  using I = typename V::I;
  using P = Pack<typename V::F, K>;
  P m, ef, t;
  I h[K];
  for (int k = 0; k < K; ++k) {  // detail::log_reduce
    const I ix = V::add32(V::as_int(V::to_float(V::add32(V::srli32(a[k], 8), V::splat32(1)))),
                          V::splat32(detail::kLogOffset));
    ef.v[k] = V::to_float(V::sub32(V::srli32(ix, 23), V::splat32(detail::kLogBias)));
    m.v[k] = V::as_float(V::add32(V::and_(ix, V::splat32(0x007fffffu)), V::splat32(detail::kSqrtHalfBits))) -
             1.0f;
    // detail::angle_t
    h[k] = V::add32(b[k], V::splat32(detail::kQuarterTurnHalf));
    t.v[k] = V::to_float(V::sub32(V::and_(b[k], V::splat32(0xffffff00u)), V::and_(h[k], V::splat32(0xc0000000u)))) *
             detail::kPiOver2p31;
  }
  const P ln = detail::log_poly_reduced<P>(m, ef);
  P sf, cf;
  detail::sincos_poly<P>(t, sf, cf);
  const I sign = V::splat32(0x80000000u);
  for (int k = 0; k < K; ++k) {
    // The quadrant's rotation (box_muller): bit 30 of h swaps, then the signs.
    const I h1 = V::slli32(h[k], 1);
    const I sr = V::as_int(sf.v[k]), cr = V::as_int(cf.v[k]);
    const typename V::F s = V::as_float(V::xor_andnot(V::select_by_sign(h1, cr, sr), h[k], sign));
    const typename V::F c = V::as_float(V::xor_andnot(V::select_by_sign(h1, sr, cr), V::xor_(h[k], h1), sign));
    const typename V::F radius = V::sqrt(ln.v[k] * -2.0f);
    z0[k] = radius * c;
    z1[k] = radius * s;
  }
}

}  // namespace simd
}  // namespace rbd

#pragma GCC diagnostic pop

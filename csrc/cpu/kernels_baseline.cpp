// The baseline kernels: plain scalar code over rbd/philox.h, compiled for the build's default
// instruction set (the compiler may auto-vectorise the lane loops). They define the sums every
// other table reproduces (kernels.h) and run on any CPU.
#include "kernels.h"

// The entry points in two clones chosen at load time (GNU ifunc): one for CPUs with FMA, where
// rbd::mul_add is the instruction and the loops vectorise, and the default one, where it is a call
// to libm's fmaf. Both round every multiply-add once, so they give the same bits. Each clone
// inlines everything it calls (flatten): a helper left out of line (GCC did so with gen_tile in
// expand and entries) is compiled once, for the default target, and the FMA clone's entries then
// came from fmaf calls, 6x slower.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RBD_FMA_CLONES __attribute__((target_clones("default", "fma"), flatten))
#else
#define RBD_FMA_CLONES
#endif

namespace rbd {
namespace cpu {
namespace {

// Pairwise sum of n lanes (a power of 2): the same order on every machine.
inline float lane_sum(const float* v, int n) {
  return n == 1 ? v[0] : lane_sum(v, n / 2) + lane_sum(v + n / 2, n / 2);
}

// Columns [t, t + cols(t)) of a request of t_hi columns: a tile, or the narrow width (kernels.h).
inline int cols(int64_t t, int64_t t_hi, int unit) { return t_hi - t < unit ? int(t_hi - t) : unit; }

// v, negated when bit `bit` of `word` is set. A compare against a constant bit keeps
// loops over `bit` vectorisable without per-lane variable shifts (absent before AVX2).
inline float flip_sign(float v, uint32_t word, int bit) {
  const uint32_t sign = (word & (1u << bit)) != 0u ? 0x80000000u : 0u;
  return detail::bits_float(detail::float_bits(v) ^ sign);
}

// e[r][l] = P[4 rb + r, col0 + l] for normal or uniform entries.
inline void gen_tile(const Job& j, uint32_t rb, uint32_t col0, float (&e)[4][kTile]) {
  uint32_t w[4][kTile];
#pragma omp simd
  for (int l = 0; l < kTile; ++l) {
    const Philox4 x = stream_block(rb, col0 + uint32_t(l), j.step, j.stream, j.key0, j.key1);
    w[0][l] = x.w[0];
    w[1][l] = x.w[1];
    w[2][l] = x.w[2];
    w[3][l] = x.w[3];
  }
  if (j.dist == Distribution::Normal) {
#pragma omp simd
    for (int l = 0; l < kTile; ++l) {
      box_muller(w[0][l], w[1][l], e[0][l], e[1][l]);
      box_muller(w[2][l], w[3][l], e[2][l], e[3][l]);
    }
  } else {
#pragma omp simd
    for (int l = 0; l < kTile; ++l) {
      e[0][l] = uniform_pm1(w[0][l]);
      e[1][l] = uniform_pm1(w[1][l]);
      e[2][l] = uniform_pm1(w[2][l]);
      e[3][l] = uniform_pm1(w[3][l]);
    }
  }
}

inline Philox4 group_block(const Job& j, int64_t rb, int64_t q) {
  return stream_block(uint32_t(rb), j.col_base + uint32_t(q), j.step, j.stream, j.key0, j.key1);
}

RBD_FMA_CLONES void project(const Job& j, const float* gv, int64_t rb_lo, int64_t n, int64_t t_lo, int64_t t_hi,
             float* acc) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t rb = rb_lo + i;
    const float* g = gv + 4 * i;
    if (j.dist == Distribution::Rademacher) {
      for (int64_t q = t_lo / kGroup; kGroup * q < t_hi; ++q) {
        const Philox4 x = group_block(j, rb, q);
        float* acc_q = acc + kGroup * q;
        const int m = cols(kGroup * q, t_hi, kGroup);
#pragma omp simd
        for (int k = 0; k < m; ++k) {
          acc_q[k] += ((flip_sign(g[0], x.w[0], k) + flip_sign(g[1], x.w[1], k)) +
                       flip_sign(g[2], x.w[2], k)) +
                      flip_sign(g[3], x.w[3], k);
        }
      }
    } else {
      float e[4][kTile];
      for (int64_t t = t_lo; t < t_hi; t += kTile) {
        gen_tile(j, uint32_t(rb), j.col_base + uint32_t(t), e);
        float* acc_t = acc + t;
        const int m = cols(t, t_hi, kTile);
#pragma omp simd
        for (int l = 0; l < m; ++l) {
          acc_t[l] += mul_add(e[3][l], g[3], mul_add(e[2][l], g[2], mul_add(e[1][l], g[1], e[0][l] * g[0])));
        }
      }
    }
  }
}

// kernels.h's signed sums of column group cq, of its first `width` columns (the rest read as 0):
// table[m][p] = sum(q, m, p).
inline void signed_sums(const float* cq, int64_t width, float (&table)[kSignedSums][8]) {
  const auto col = [&](int t) { return t < width ? cq[t] : 0.0f; };
  for (int m = 0; m < kSignedSums; ++m) {
    for (uint32_t p = 0; p < 8; ++p) {
      float t = flip_sign(col(3 * m), p, 0) + flip_sign(col(3 * m + 1), p, 1);
      if (m + 1 < kSignedSums) t = t + flip_sign(col(3 * m + 2), p, 2);
      table[m][p] = t;
    }
  }
}

RBD_FMA_CLONES void expand(const Job& j, const float* c, int64_t width, int64_t rb_lo, int64_t n, float* u) {
  if (j.dist == Distribution::Rademacher) {
    for (int64_t i = 0; i < 4 * n; ++i) u[i] = 0.0f;
    // A narrow request skips the sums of columns it does not have (kernels.h: they add zeros).
    const int m_end = width < kGroup ? int(width + 2) / 3 : kSignedSums;
    float table[kSignedSums][8];
    for (int64_t q = 0; kGroup * q < width; ++q) {
      signed_sums(c + kGroup * q, width - kGroup * q, table);
      for (int64_t i = 0; i < n; ++i) {
        const Philox4 x = group_block(j, rb_lo + i, q);
        for (int r = 0; r < 4; ++r) {
          float s = u[4 * i + r];
          for (int m = 0; m < m_end; ++m) s += table[m][(x.w[r] >> (3 * m)) & 7u];
          u[4 * i + r] = s;
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t rb = rb_lo + i;
    float acc[4][kTile] = {};
    float e[4][kTile];
    const int lanes = cols(0, width, kTile);
    for (int64_t t = 0; t < width; t += kTile) {
      gen_tile(j, uint32_t(rb), j.col_base + uint32_t(t), e);
      const float* ct = c + t;
      for (int r = 0; r < 4; ++r) {
#pragma omp simd
        for (int l = 0; l < lanes; ++l) acc[r][l] = mul_add(e[r][l], ct[l], acc[r][l]);
      }
    }
    for (int r = 0; r < 4; ++r) u[4 * i + r] = lane_sum(acc[r], lanes);
  }
}

RBD_FMA_CLONES void entries(const Job& j, int64_t rb, int64_t t_lo, int64_t t_hi, float* e) {
  const int64_t w = t_hi - t_lo;
  if (j.dist == Distribution::Rademacher) {
    for (int64_t q = t_lo / kGroup; kGroup * q < t_hi; ++q) {
      const Philox4 x = group_block(j, rb, q);
      const int m = cols(kGroup * q, t_hi, kGroup);
      for (int r = 0; r < 4; ++r) {
        for (int k = 0; k < m; ++k) e[r * w + kGroup * q + k - t_lo] = rademacher(x.w[r], k);
      }
    }
  } else {
    float tile[4][kTile];
    for (int64_t t = t_lo; t < t_hi; t += kTile) {
      gen_tile(j, uint32_t(rb), j.col_base + uint32_t(t), tile);
      const int m = cols(t, t_hi, kTile);
      for (int r = 0; r < 4; ++r) {
        for (int l = 0; l < m; ++l) e[r * w + t + l - t_lo] = tile[r][l];
      }
    }
  }
}

void philox(const uint32_t* counter, const uint32_t* key, int rounds, int64_t n, uint32_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t* c = counter + 4 * i;
    const uint32_t* k = key + 2 * i;
    const Philox4 x = rounds == 7 ? philox4x32<7>(c[0], c[1], c[2], c[3], round_keys<7>(k[0], k[1]))
                                  : philox4x32<10>(c[0], c[1], c[2], c[3], round_keys<10>(k[0], k[1]));
    for (int w = 0; w < 4; ++w) out[4 * i + w] = x.w[w];
  }
}

}  // namespace

const Kernels& baseline_kernels() {
  static const Kernels k{"baseline", project, expand, entries, philox};
  return k;
}

}  // namespace cpu
}  // namespace rbd

// The kernels of kernels.h on SIMD vectors, for one instruction set V (rbd/philox_simd.h).
// Included once, by the TU compiled for V, after its `#pragma GCC target`. Everything here has
// internal linkage and uses no standard-library headers (see rbd/philox_simd.h on why).
//
// Lanes are columns for normal/uniform entries (one 16-column tile is 16 / V::kLanes vectors),
// and row blocks or (row block, column group) pairs for Rademacher, whose words are 32 sign
// bits each. The sums keep the orders kernels.h states, so results equal the baseline's.
#pragma once

#include "kernels.h"
#include "rbd/philox_simd.h"

namespace rbd {
namespace cpu {
namespace {

using simd::box_muller;
using simd::uniform_pm1;

template <int N>
inline float lane_sum(const float* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return lane_sum<N / 2>(v) + lane_sum<N / 2>(v + N / 2);
  }
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <int W>
struct Width {
  static constexpr int value = W;
};

// On each kernel entry point: inline everything it calls. GCC otherwise keeps the polynomial
// templates of rbd/philox.h out of line for their size, and a call per tile spills the vectors.
#define RBD_KERNEL __attribute__((flatten))

// What a kernel call derives from the job once: the round keys (scalar and as vectors) and round
// 1's per-lane XOR, which depends on the step and key alone (rbd/philox_simd.h, RowRounds).
template <class V>
struct Keys {
  StreamKeys sk;
  simd::VKeys<V> vk;
  uint32_t x0;
  explicit Keys(const Job& j)
      : sk(stream_keys(j.key0, j.key1)), vk(simd::vector_keys<V>(j.key0, j.key1)),
        x0(simd::row_rounds(0, j.step, j.stream, sk).x0) {}
};

// Entries of T vectors of columns of row block rb: e[r][v] lane l = P[4 rb + r, column l of
// vector v], the columns given by cx (row_columns).
// Words w[r][v] of row block rb for T vectors of counters, the columns (or Rademacher column
// groups) given by cx (rbd/philox_simd.h, row_columns).
template <class V, int T>
inline void row_words(const Job& j, const Keys<V>& k, uint32_t rb, const typename V::I (&cx)[2 * T],
                      typename V::I (&w)[4][T]) {
  typename V::I c[4][2 * T];
  simd::philox_row<V, 2 * T>(simd::row_rounds(rb, j.step, j.stream, k.sk), cx, k.vk, c);
  for (int r = 0; r < 4; ++r) {
    for (int v = 0; v < T; ++v) w[r][v] = V::pack(c[r][2 * v], c[r][2 * v + 1]);
  }
}

template <class V, Distribution D, int T>
inline void row_entries(const Job& j, const Keys<V>& k, uint32_t rb, const typename V::I (&cx)[2 * T],
                        typename V::F (&e)[4][T]) {
  typename V::I w[4][T];
  row_words<V, T>(j, k, rb, cx, w);
  if constexpr (D == Distribution::Normal) {
    // Rows (0, 1) from words (0, 1), rows (2, 3) from words (2, 3): 2T chains side by side.
    typename V::I a[2 * T], b[2 * T];
    typename V::F z0[2 * T], z1[2 * T];
    for (int v = 0; v < T; ++v) {
      a[v] = w[0][v], b[v] = w[1][v];
      a[T + v] = w[2][v], b[T + v] = w[3][v];
    }
    box_muller<V, 2 * T>(a, b, z0, z1);
    for (int v = 0; v < T; ++v) {
      e[0][v] = z0[v], e[1][v] = z1[v];
      e[2][v] = z0[T + v], e[3][v] = z1[T + v];
    }
  } else {
    for (int v = 0; v < T; ++v) {
      for (int r = 0; r < 4; ++r) e[r][v] = uniform_pm1<V>(w[r][v]);
    }
  }
}

// project over columns [t, t + T kLanes): the accumulators stay in registers across the rows.
template <class V, Distribution D, int T>
inline void project_columns(const Job& j, const Keys<V>& k, const float* gv, int64_t rb_lo, int64_t n,
                            int64_t t, float* acc) {
  using F = typename V::F;
  F a[T];
  for (int v = 0; v < T; ++v) a[v] = V::load(acc + t + v * V::kLanes);
  typename V::I cx[2 * T];
  simd::row_columns<V, 2 * T>(j.col_base + uint32_t(t), k.x0, cx);
  for (int64_t i = 0; i < n; ++i) {
    F e[4][T];
    row_entries<V, D, T>(j, k, uint32_t(rb_lo + i), cx, e);
    const F g0 = V::splat(gv[4 * i]), g1 = V::splat(gv[4 * i + 1]);
    const F g2 = V::splat(gv[4 * i + 2]), g3 = V::splat(gv[4 * i + 3]);
    for (int v = 0; v < T; ++v) {
      a[v] = a[v] + V::fma(e[3][v], g3, V::fma(e[2][v], g2, V::fma(e[1][v], g1, e[0][v] * g0)));
    }
  }
  for (int v = 0; v < T; ++v) V::store(acc + t + v * V::kLanes, a[v]);
}

// Rademacher project for column group q: lanes are kLanes consecutive row blocks.
template <class V>
inline void project_group(const Job& j, const simd::VKeys<V>& k, const float* gv, int64_t rb_lo, int64_t n,
                          int64_t q, float* acc) {
  using F = typename V::F;
  constexpr int kParts = kGroup / V::kLanes;
  F a[kParts];
  for (int p = 0; p < kParts; ++p) a[p] = V::load(acc + kGroup * q + p * V::kLanes);
  for (int64_t i0 = 0; i0 < n; i0 += V::kLanes) {
    const uint32_t c0[1] = {uint32_t(rb_lo + i0)};
    typename V::I w[4][1];
    simd::stream_blocks_rows<V, 1>(c0, j.col_base + uint32_t(q), j.step, j.stream, k, w);
    uint32_t words[4][V::kLanes];
    for (int r = 0; r < 4; ++r) V::store_words(words[r], w[r][0]);
    const int64_t m = min64(V::kLanes, n - i0);
    for (int64_t l = 0; l < m; ++l) {
      const float* g = gv + 4 * (i0 + l);
      const F g0 = V::splat(g[0]), g1 = V::splat(g[1]), g2 = V::splat(g[2]), g3 = V::splat(g[3]);
      const typename V::Signs s0 = V::signs(words[0][l]), s1 = V::signs(words[1][l]);
      const typename V::Signs s2 = V::signs(words[2][l]), s3 = V::signs(words[3][l]);
      for (int p = 0; p < kParts; ++p) {
        a[p] = a[p] + (((V::flip(g0, s0, p) + V::flip(g1, s1, p)) + V::flip(g2, s2, p)) +
                       V::flip(g3, s3, p));
      }
    }
  }
  for (int p = 0; p < kParts; ++p) V::store(acc + kGroup * q + p * V::kLanes, a[p]);
}

// ---- narrow requests: W = 1, 2, 4 or 8 columns (kernels.h) -----------------------------------
//
// Lanes are (row block, column) pairs: lane l is column l % W of row block l / W, so a vector
// holds kLanes / W row blocks and the work per row block is proportional to W.

// The lanes' row block and column offsets as slot vectors (stream_blocks_offsets).
template <class V, int W>
struct NarrowLanes {
  typename V::I drb[2], dcol[2];
  NarrowLanes() {
    uint32_t rb[V::kLanes], col[V::kLanes];
    for (int l = 0; l < V::kLanes; ++l) rb[l] = uint32_t(l / W), col[l] = uint32_t(l % W);
    for (int h = 0; h < 2; ++h) {
      drb[h] = V::load_slots(rb + h * V::kLanes / 2);
      dcol[h] = V::load_slots(col + h * V::kLanes / 2);
    }
  }
};

// e[r] lane l = P[4 (rb + l / W) + r, l % W] for normal or uniform entries.
template <class V, Distribution D, int W>
inline void narrow_entries(const Job& j, const simd::VKeys<V>& k, const NarrowLanes<V, W>& lanes, uint32_t rb,
                           typename V::F (&e)[4]) {
  typename V::I w[4];
  simd::stream_blocks_offsets<V>(rb, j.col_base, lanes.drb, lanes.dcol, j.step, j.stream, k, w);
  if constexpr (D == Distribution::Normal) {
    const typename V::I a[2] = {w[0], w[2]}, b[2] = {w[1], w[3]};
    typename V::F z0[2], z1[2];
    simd::box_muller<V, 2>(a, b, z0, z1);
    e[0] = z0[0], e[1] = z1[0], e[2] = z0[1], e[3] = z1[1];
  } else {
    for (int r = 0; r < 4; ++r) e[r] = uniform_pm1<V>(w[r]);
  }
}

// Lane l of g_r: gv[4 (l / W) + r], the g of lane l's row block, by a gather. The last vector of
// rows reads a zero-padded copy, so that no lane reads past gv.
template <class V, int W>
inline void narrow_g(const float* gv, int64_t rows, typename V::F (&g)[4]) {
  float pad[4 * V::kLanes];
  if (rows < V::kLanes / W) {
    for (int q = 0; q < 4 * V::kLanes / W; ++q) pad[q] = q < 4 * rows ? gv[q] : 0.0f;
    gv = pad;
  }
  uint32_t idx[V::kLanes];
  for (int r = 0; r < 4; ++r) {
    for (int l = 0; l < V::kLanes; ++l) idx[l] = uint32_t(4 * (l / W) + r);
    g[r] = V::gather(gv, V::load_words(idx));
  }
}

// Each column's sum over the row blocks in order, as the wide kernels (kernels.h): the lanes'
// 4-row sums are stored, then added column by column.
template <class V, int W>
inline void narrow_fold(typename V::F dot, int64_t rows, float (&a)[W]) {
  float d[V::kLanes];
  V::store(d, dot);
  for (int64_t rho = 0; rho < rows; ++rho) {
    for (int kappa = 0; kappa < W; ++kappa) a[kappa] += d[rho * W + kappa];
  }
}

template <class V, Distribution D, int W>
inline void project_narrow(const Job& j, const float* gv, int64_t rb_lo, int64_t n, float* acc) {
  using F = typename V::F;
  constexpr int R = V::kLanes / W;  // row blocks per vector
  const simd::VKeys<V> k = simd::vector_keys<V>(j.key0, j.key1);
  float a[W];
  for (int kappa = 0; kappa < W; ++kappa) a[kappa] = acc[kappa];
  if constexpr (D == Distribution::Rademacher) {
    // Lanes are row blocks (the column group's word holds all W columns).
    for (int64_t i0 = 0; i0 < n; i0 += V::kLanes) {
      const int64_t rows = min64(V::kLanes, n - i0);
      const uint32_t c0[1] = {uint32_t(rb_lo + i0)};
      typename V::I w[4][1];
      simd::stream_blocks_rows<V, 1>(c0, j.col_base, j.step, j.stream, k, w);
      F g[4];
      narrow_g<V, 1>(gv + 4 * i0, rows, g);
      const typename V::I sign = V::splat32(0x80000000u);
      for (int kappa = 0; kappa < W; ++kappa) {
        F f[4];
        for (int r = 0; r < 4; ++r) {
          f[r] = V::as_float(V::xor_(V::as_int(g[r]), V::and_(V::slli32(w[r][0], 31 - kappa), sign)));
        }
        float d[V::kLanes];
        V::store(d, ((f[0] + f[1]) + f[2]) + f[3]);
        for (int64_t rho = 0; rho < rows; ++rho) a[kappa] += d[rho];
      }
    }
  } else {
    const NarrowLanes<V, W> lanes;
    for (int64_t i0 = 0; i0 < n; i0 += R) {
      const int64_t rows = min64(R, n - i0);
      F e[4], g[4];
      narrow_entries<V, D, W>(j, k, lanes, uint32_t(rb_lo + i0), e);
      narrow_g<V, W>(gv + 4 * i0, rows, g);
      narrow_fold<V, W>(V::fma(e[3], g[3], V::fma(e[2], g[2], V::fma(e[1], g[1], e[0] * g[0]))), rows, a);
    }
  }
  for (int kappa = 0; kappa < W; ++kappa) acc[kappa] = a[kappa];
}

// u[4 i + r] = the pairwise sum over the W lanes of row block i of fma(P, c, 0) (kernels.h), by
// butterflies: lane l adds lane l ^ s for s = 1, 2, 4 < W, so every lane of a row block ends with
// its sum in lane_sum's order (the additions commute).
template <class V, Distribution D, int W>
inline void expand_narrow(const Job& j, const float* c, int64_t rb_lo, int64_t n, float* u) {
  using F = typename V::F;
  constexpr int R = V::kLanes / W;
  const simd::VKeys<V> k = simd::vector_keys<V>(j.key0, j.key1);
  const NarrowLanes<V, W> lanes;
  float cl[V::kLanes];
  for (int l = 0; l < V::kLanes; ++l) cl[l] = c[l % W];
  const F cv = V::load(cl);
  for (int64_t i0 = 0; i0 < n; i0 += R) {
    F e[4];
    narrow_entries<V, D, W>(j, k, lanes, uint32_t(rb_lo + i0), e);
    float sums[4][V::kLanes];
    for (int r = 0; r < 4; ++r) {
      F x = V::fma(e[r], cv, V::zero());
      if constexpr (W > 1) x = x + V::template swap_lanes<1>(x);
      if constexpr (W > 2) x = x + V::template swap_lanes<2>(x);
      if constexpr (W > 4) x = x + V::template swap_lanes<4>(x);
      V::store(sums[r], x);
    }
    const int64_t rows = min64(R, n - i0);
    for (int64_t rho = 0; rho < rows; ++rho) {
      for (int r = 0; r < 4; ++r) u[4 * (i0 + rho) + r] = sums[r][rho * W];
    }
  }
}

// Calls fn(std::integral_constant-like W) for the narrow width w (1, 2, 4 or 8).
template <class Fn>
inline void with_narrow_width(int64_t w, const Fn& fn) {
  switch (w) {
    case 1: fn(Width<1>{}); break;
    case 2: fn(Width<2>{}); break;
    case 4: fn(Width<4>{}); break;
    default: fn(Width<8>{}); break;
  }
}

template <class V, Distribution D>
RBD_KERNEL void project_dist(const Job& j, const float* gv, int64_t rb_lo, int64_t n, int64_t t_lo,
                  int64_t t_hi, float* acc) {
  if (t_hi <= kNarrow) {
    with_narrow_width(t_hi, [&](auto w) { project_narrow<V, D, decltype(w)::value>(j, gv, rb_lo, n, acc); });
    return;
  }
  if constexpr (D == Distribution::Rademacher) {
    const simd::VKeys<V> k = simd::vector_keys<V>(j.key0, j.key1);
    for (int64_t q = t_lo / kGroup; q < t_hi / kGroup; ++q) project_group<V>(j, k, gv, rb_lo, n, q, acc);
  } else {
    constexpr int kRegs = kTile / V::kLanes, kStep = V::kTilesPerStep * kTile;
    const Keys<V> k(j);
    int64_t t = t_lo;
    for (; t + kStep <= t_hi; t += kStep) project_columns<V, D, V::kTilesPerStep * kRegs>(j, k, gv, rb_lo, n, t, acc);
    for (; t < t_hi; t += kTile) project_columns<V, D, kRegs>(j, k, gv, rb_lo, n, t, acc);
  }
}

// Adds tiles [t, t + T kLanes) of row block rb into acc[r][v % kRegs], tile by tile.
template <class V, Distribution D, int T>
inline void expand_columns(const Job& j, const Keys<V>& k, const float* c, uint32_t rb, int64_t t,
                           typename V::F (&acc)[4][kTile / V::kLanes]) {
  constexpr int kRegs = kTile / V::kLanes;
  typename V::I cx[2 * T];
  simd::row_columns<V, 2 * T>(j.col_base + uint32_t(t), k.x0, cx);
  typename V::F e[4][T];
  row_entries<V, D, T>(j, k, rb, cx, e);
  for (int v = 0; v < T; ++v) {
    const typename V::F cv = V::load(c + t + v * V::kLanes);
    for (int r = 0; r < 4; ++r) acc[r][v % kRegs] = V::fma(e[r][v], cv, acc[r][v % kRegs]);
  }
}

template <class V, int kLaneCount, int kRegs>
inline float row_sum(const typename V::F (&acc)[kRegs]) {
  float lanes[kLaneCount];
  for (int v = 0; v < kRegs; ++v) V::store(lanes + v * V::kLanes, acc[v]);
  return lane_sum<kLaneCount>(lanes);
}

// Rademacher expand: lanes are kLanes consecutive row blocks. Per column group, the 11 tables of
// kernels.h's signed sums (one vector each: lane p holds sum(q, m, p & 7)) are built once and
// read by a permute whose index is the row's word shifted right by 3m (the permute reads the low
// 3 or 4 bits): three instructions per 3 columns, row and kLanes row blocks.
template <class V>
void expand_rademacher(const Job& j, const float* c, int64_t width, int64_t rb_lo, int64_t n,
                       float* u) {
  using F = typename V::F;
  using I = typename V::I;
  // A narrow request (width < kGroup: bits 0 .. width - 1 of group 0) reads only its columns
  // and skips the signed sums of none of them (their zeros would leave the sums unchanged).
  const int64_t groups = (width + kGroup - 1) / kGroup;
  const int m_end = width < kGroup ? int(width + 2) / 3 : kSignedSums;
  const auto col = [&](const float* cq, int t) { return t < width ? cq[t] : 0.0f; };
  const simd::VKeys<V> k = simd::vector_keys<V>(j.key0, j.key1);
  I sign[3];  // lane p: the sign bit where bit i of p (mod 8) is set
  for (int b = 0; b < 3; ++b) {
    sign[b] = V::slli32(V::and_(V::srli32(V::lane_iota(), b), V::splat32(1)), 31);
  }
  for (int64_t i0 = 0; i0 < n; i0 += V::kLanes) {
    F acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    for (int64_t q = 0; q < groups; ++q) {
      const uint32_t c0[1] = {uint32_t(rb_lo + i0)};
      I w[4][1];
      simd::stream_blocks_rows<V, 1>(c0, j.col_base + uint32_t(q), j.step, j.stream, k, w);
      const float* cq = c + kGroup * q;
      for (int m = 0; m < m_end; ++m) {
        F table = V::as_float(V::xor_(V::as_int(V::splat(col(cq, 3 * m))), sign[0])) +
                  V::as_float(V::xor_(V::as_int(V::splat(col(cq, 3 * m + 1))), sign[1]));
        if (m + 1 < kSignedSums) table = table + V::as_float(V::xor_(V::as_int(V::splat(col(cq, 3 * m + 2))), sign[2]));
        for (int r = 0; r < 4; ++r) acc[r] = acc[r] + V::lookup(table, V::srli32(w[r][0], 3 * m));
      }
    }
    float lanes[4][V::kLanes];
    for (int r = 0; r < 4; ++r) V::store(lanes[r], acc[r]);
    const int64_t rows = min64(V::kLanes, n - i0);
    for (int64_t l = 0; l < rows; ++l) {
      for (int r = 0; r < 4; ++r) u[4 * (i0 + l) + r] = lanes[r][l];
    }
  }
}

template <class V, Distribution D>
RBD_KERNEL void expand_dist(const Job& j, const float* c, int64_t width, int64_t rb_lo, int64_t n, float* u) {
  if (width <= kNarrow && D != Distribution::Rademacher) {
    with_narrow_width(width, [&](auto w) { expand_narrow<V, D, decltype(w)::value>(j, c, rb_lo, n, u); });
    return;
  }
  if constexpr (D == Distribution::Rademacher) {
    expand_rademacher<V>(j, c, width, rb_lo, n, u);
  } else {
    constexpr int kRegs = kTile / V::kLanes;
    const Keys<V> k(j);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t rb = uint32_t(rb_lo + i);
      typename V::F acc[4][kRegs];
      for (int r = 0; r < 4; ++r) {
        for (int v = 0; v < kRegs; ++v) acc[r][v] = V::zero();
      }
      constexpr int kStep = V::kTilesPerStep * kTile;
      int64_t t = 0;
      for (; t + kStep <= width; t += kStep) expand_columns<V, D, V::kTilesPerStep * kRegs>(j, k, c, rb, t, acc);
      for (; t < width; t += kTile) expand_columns<V, D, kRegs>(j, k, c, rb, t, acc);
      for (int r = 0; r < 4; ++r) u[4 * i + r] = row_sum<V, kTile, kRegs>(acc[r]);
    }
  }
}

template <class V, Distribution D>
RBD_KERNEL void entries_dist(const Job& j, int64_t rb, int64_t t_lo, int64_t t_hi, float* e) {
  const int64_t width = t_hi - t_lo;
  if (t_hi <= kNarrow) {  // a narrow request: its columns of the first tile (group)
    constexpr int kFull = D == Distribution::Rademacher ? kGroup : kTile;
    float full[4 * kFull];
    entries_dist<V, D>(j, rb, 0, kFull, full);
    for (int r = 0; r < 4; ++r) {
      for (int64_t t = 0; t < t_hi; ++t) e[r * t_hi + t] = full[r * kFull + t];
    }
    return;
  }
  if constexpr (D == Distribution::Rademacher) {
    using F = typename V::F;
    constexpr int kParts = kGroup / V::kLanes;
    const F one = V::splat(1.0f);
    const int64_t q_end = t_hi / kGroup;
    const Keys<V> k(j);
    for (int64_t q0 = t_lo / kGroup; q0 < q_end; q0 += V::kLanes) {  // lanes: column groups
      typename V::I cx[2], w[4][1];
      simd::row_columns<V, 2>(j.col_base + uint32_t(q0), k.x0, cx);
      row_words<V, 1>(j, k, uint32_t(rb), cx, w);
      uint32_t words[4][V::kLanes];
      for (int r = 0; r < 4; ++r) V::store_words(words[r], w[r][0]);
      const int64_t m = min64(V::kLanes, q_end - q0);
      for (int64_t l = 0; l < m; ++l) {
        for (int r = 0; r < 4; ++r) {
          const typename V::Signs s = V::signs(words[r][l]);
          float* dst = e + r * width + kGroup * (q0 + l) - t_lo;
          for (int p = 0; p < kParts; ++p) V::store(dst + p * V::kLanes, V::flip(one, s, p));
        }
      }
    }
  } else {
    constexpr int kRegs = kTile / V::kLanes;
    const Keys<V> k(j);
    for (int64_t t = t_lo; t < t_hi; t += kTile) {
      typename V::F tile[4][kRegs];
      typename V::I cx[2 * kRegs];
      simd::row_columns<V, 2 * kRegs>(j.col_base + uint32_t(t), k.x0, cx);
      row_entries<V, D, kRegs>(j, k, uint32_t(rb), cx, tile);
      for (int r = 0; r < 4; ++r) {
        for (int v = 0; v < kRegs; ++v) V::store(e + r * width + t - t_lo + v * V::kLanes, tile[r][v]);
      }
    }
  }
}

template <class V>
void project_any(const Job& j, const float* gv, int64_t rb_lo, int64_t n, int64_t t_lo, int64_t t_hi,
                 float* acc) {
  switch (j.dist) {
    case Distribution::Normal: project_dist<V, Distribution::Normal>(j, gv, rb_lo, n, t_lo, t_hi, acc); break;
    case Distribution::Uniform: project_dist<V, Distribution::Uniform>(j, gv, rb_lo, n, t_lo, t_hi, acc); break;
    case Distribution::Rademacher: project_dist<V, Distribution::Rademacher>(j, gv, rb_lo, n, t_lo, t_hi, acc); break;
  }
}

template <class V>
void expand_any(const Job& j, const float* c, int64_t width, int64_t rb_lo, int64_t n, float* u) {
  switch (j.dist) {
    case Distribution::Normal: expand_dist<V, Distribution::Normal>(j, c, width, rb_lo, n, u); break;
    case Distribution::Uniform: expand_dist<V, Distribution::Uniform>(j, c, width, rb_lo, n, u); break;
    case Distribution::Rademacher: expand_dist<V, Distribution::Rademacher>(j, c, width, rb_lo, n, u); break;
  }
}

template <class V>
void entries_any(const Job& j, int64_t rb, int64_t t_lo, int64_t t_hi, float* e) {
  switch (j.dist) {
    case Distribution::Normal: entries_dist<V, Distribution::Normal>(j, rb, t_lo, t_hi, e); break;
    case Distribution::Uniform: entries_dist<V, Distribution::Uniform>(j, rb, t_lo, t_hi, e); break;
    case Distribution::Rademacher: entries_dist<V, Distribution::Rademacher>(j, rb, t_lo, t_hi, e); break;
  }
}

template <class V>
RBD_KERNEL void philox_any(const uint32_t* counter, const uint32_t* key, int rounds, int64_t n, uint32_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += V::kLanes) {
    const int64_t m = min64(V::kLanes, n - i0);
    uint32_t c[4][V::kLanes] = {}, k[2][V::kLanes] = {}, words[4][V::kLanes];
    for (int64_t l = 0; l < m; ++l) {
      for (int w = 0; w < 4; ++w) c[w][l] = counter[4 * (i0 + l) + w];
      for (int w = 0; w < 2; ++w) k[w][l] = key[2 * (i0 + l) + w];
    }
    typename V::I x[4];
    if (rounds == 7) {
      simd::philox_lanes<V, 7>(c, k, x);
    } else {
      simd::philox_lanes<V, 10>(c, k, x);
    }
    for (int w = 0; w < 4; ++w) V::store_words(words[w], x[w]);
    for (int64_t l = 0; l < m; ++l) {
      for (int w = 0; w < 4; ++w) out[4 * (i0 + l) + w] = words[w][l];
    }
  }
}

template <class V>
constexpr Kernels make_kernels() {
  return Kernels{V::kName, project_any<V>, expand_any<V>, entries_any<V>, philox_any<V>};
}

}  // namespace
}  // namespace cpu
}  // namespace rbd

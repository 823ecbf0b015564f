// The CPU kernels' inner loops, one table per instruction set (baseline, AVX2, AVX-512).
//
// Torch-free on purpose: the AVX2 and AVX-512 tables live in translation units compiled for
// those instruction sets, which must not instantiate torch's (or the standard library's) inline
// functions (see rbd/philox_simd.h). ops_cpu.cpp owns threading, dtypes and argument checks and
// picks a table per call (select_kernels in ops_cpu.cpp).
//
// Every table computes the same sums in the same order, so the products do not depend on the
// instruction set: entries are bit-identical (rbd/philox_simd.h) and each sum below is spelled
// out with its order. Columns are local: column t of a normal/uniform job is stream column
// col_base + t; for Rademacher, t = 32 q + k is bit k of stream column group col_base + q.
#pragma once

#include <stdint.h>

#include "rbd/philox.h"

namespace rbd {
namespace cpu {

constexpr int kTile = 16;   // normal/uniform: columns per tile, expand's lanes per row
constexpr int kGroup = 32;  // Rademacher: columns per Philox word
// Requests of at most kNarrow columns (Rademacher: bits of column group 0) run at the width 1, 2, 4
// or 8 that holds them, at a cost about proportional to it, instead of a whole tile or group.
constexpr int kNarrow = 8;

// The local columns a request is computed on: cols (Rademacher: the bits from bit 0 of its first
// group, col_offset's shift included) rounded up to a narrow width, else to whole tiles (groups).
constexpr int64_t kernel_width(bool rademacher, int64_t cols) {
  if (cols <= kNarrow) {
    int64_t w = 1;
    while (w < cols) w *= 2;
    return w;
  }
  const int64_t unit = rademacher ? kGroup : kTile;
  return (cols + unit - 1) / unit * unit;
}

// Rademacher expand adds a row's signed coefficients a few columns at a time: for column group q
// and m < kSignedSums, the bits 3m .. 3m + 2 of the row's word (only 30, 31 for m = 10) pick
//   sum(q, m, p) = ((s0 c[32q + 3m] + s1 c[32q + 3m + 1]) + s2 c[32q + 3m + 2]),  s_i = -1 where
// bit i of p is set, else +1 (m = 10: s0 c[32q + 30] + s1 c[32q + 31]): one of 8 (4) values, a
// table lookup per three columns.
constexpr int kSignedSums = 11;

struct Job {
  Distribution dist;
  uint32_t key0, key1, step, stream;
  uint32_t col_base;  // stream column (normal, uniform) or column group (Rademacher) of local 0
};

struct Kernels {
  const char* name;
  // For each local column t in [t_lo, t_hi) (multiples of kTile, of kGroup for Rademacher; or a
  // narrow request, t_lo = 0 and t_hi = 1, 2, 4 or 8) and row block rb = rb_lo .. rb_lo + n - 1 in
  // this order:
  //   acc[t] += fma(P[4rb+3, t], g3, fma(P[4rb+2, t], g2, fma(P[4rb+1, t], g1, P[4rb, t] g0)))
  // for normal and uniform entries, fma rounding once (rbd::mul_add), and
  //   acc[t] += ((P[4rb, t] g0 + P[4rb+1, t] g1) + P[4rb+2, t] g2) + P[4rb+3, t] g3
  // for Rademacher entries (sign flips: no products), where g_r = gv[4 (rb - rb_lo) + r]. Each
  // column is its own sum in row order, whatever the width: a prefix of the columns is exact.
  void (*project)(const Job& job, const float* gv, int64_t rb_lo, int64_t n, int64_t t_lo,
                  int64_t t_hi, float* acc);
  // For row block rb = rb_lo + i, i < n, and r < 4, width a multiple of kTile (of kGroup for
  // Rademacher) or narrow (1, 2, 4, 8): normal and uniform: u[4 i + r] = the pairwise sum over
  // lanes l < L = min(width, kTile) of a_l, where a_l = sum over t = l, l + L, ... < width (in this
  // order) of P[4rb + r, t] c[t], each term added by one fma from 0; Rademacher: u[4 i + r] =
  // the sum, from 0 in the order of q then m, of sum(q, m, p) above with p the bits of
  // P[4rb + r, 32q + 3m ...] (set where the entry is -1).
  void (*expand)(const Job& job, const float* c, int64_t width, int64_t rb_lo, int64_t n, float* u);
  // e[r (t_hi - t_lo) + t - t_lo] = P[4 rb + r, t] for r < 4, t in [t_lo, t_hi) (as project).
  // The SIMD tables run narrow requests with lanes of (row block, column) pairs (kernels_simd.h).
  void (*entries)(const Job& job, int64_t rb, int64_t t_lo, int64_t t_hi, float* e);
  // Philox4x32-rounds (7 or 10) of n counters (4 words each) under their keys (2 words each).
  void (*philox)(const uint32_t* counter, const uint32_t* key, int rounds, int64_t n, uint32_t* out);
};

const Kernels& baseline_kernels();
// nullptr when the compiler could not build them or the CPU lacks FMA (then only the baseline runs).
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();

}  // namespace cpu
}  // namespace rbd

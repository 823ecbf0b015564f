// CPU kernels for the rbd_cuda ops: P is generated tile by tile inside the products.
//
// Determinism: every sum runs in an order fixed by the problem's shape alone
// (fixed row chunks reduced in chunk order, fixed-width lane accumulators
// reduced pairwise), never by the thread count, and the file is compiled with
// -ffp-contract=off so vectorised and scalar code round identically.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"

namespace rbd {
namespace {

constexpr int kLanes = 16;                 // columns per generated tile (normal, uniform)
constexpr int64_t kMaxRowChunks = 64;      // project: partial sums kept per row chunk
constexpr int64_t kMinChunkBlocks = 256;   // project: row blocks (of 4 rows) per chunk, at least
constexpr int64_t kColsPerTask = 1024;     // project: columns per parallel task

// Rows [row_offset, row_offset + numel) as 4-row blocks of the stream.
struct RowBlocks {
  int64_t first, end;
  RowBlocks(int64_t row_offset, int64_t numel)
      : first(row_offset >> 2), end((row_offset + numel + 3) >> 2) {}
  int64_t count() const { return end - first; }
};

// Columns [col_offset, col_offset + dim) as 32-column Rademacher groups.
struct ColGroups {
  int64_t first_group;  // stream column group of local column -shift
  int64_t shift;        // col_offset - 32 * first_group
  int64_t count;
  ColGroups(int64_t col_offset, int64_t dim)
      : first_group(col_offset >> 5), shift(col_offset & 31), count(ceil_div((col_offset & 31) + dim, 32)) {}
};

// v, negated when bit `bit` of `word` is set. A compare against a constant bit keeps
// loops over `bit` vectorisable without per-lane variable shifts (absent before AVX2).
inline float flip_sign(float v, uint32_t word, int bit) {
  const uint32_t sign = (word & (1u << bit)) != 0u ? 0x80000000u : 0u;
  return detail::bits_float(detail::float_bits(v) ^ sign);
}

// Pairwise sum of a fixed-width lane array: the same order on every machine.
template <int N>
inline float lane_sum(const float* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return lane_sum<N / 2>(v) + lane_sum<N / 2>(v + N / 2);
  }
}

// e[r][l] = P[4 rb + r, col0 + l] for normal or uniform entries.
template <Distribution D>
inline void gen_tile(uint32_t rb, uint32_t col0, const StreamArgs& a, float (&e)[4][kLanes]) {
  const uint32_t step = a.step, stream = a.stream, k0 = a.key0, k1 = a.key1;
  uint32_t w[4][kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    const Philox4 x = stream_block(rb, col0 + uint32_t(l), step, stream, k0, k1);
    w[0][l] = x.w[0];
    w[1][l] = x.w[1];
    w[2][l] = x.w[2];
    w[3][l] = x.w[3];
  }
  if constexpr (D == Distribution::Normal) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      box_muller(w[0][l], w[1][l], e[0][l], e[1][l]);
      box_muller(w[2][l], w[3][l], e[2][l], e[3][l]);
    }
  } else {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      e[0][l] = uniform_pm1(w[0][l]);
      e[1][l] = uniform_pm1(w[1][l]);
      e[2][l] = uniform_pm1(w[2][l]);
      e[3][l] = uniform_pm1(w[3][l]);
    }
  }
}

template <typename T>
inline void load_rows(const T* g, int64_t numel, int64_t row_offset, int64_t rb, float (&gv)[4]) {
  for (int r = 0; r < 4; ++r) {
    const int64_t i = 4 * rb + r - row_offset;
    gv[r] = (i >= 0 && i < numel) ? static_cast<float>(g[i]) : 0.0f;
  }
}

// c[j] = sum_i P[row_offset + i, col_offset + j] g[i]
template <Distribution D, typename T>
void project_kernel(const T* g, int64_t numel, int64_t dim, const StreamArgs& a, float* c) {
  const RowBlocks rows(a.row_offset, numel);
  const bool rad = D == Distribution::Rademacher;
  const ColGroups groups(a.col_offset, dim);
  const int64_t width = rad ? groups.count * 32 : ceil_div(dim, kLanes) * kLanes;
  const int64_t shift = rad ? groups.shift : 0;
  const int64_t n_chunks = std::min(kMaxRowChunks, ceil_div(rows.count(), kMinChunkBlocks));
  const int64_t chunk = ceil_div(rows.count(), n_chunks);
  const int64_t n_col_tasks = ceil_div(width, kColsPerTask);
  std::vector<float> partial(static_cast<size_t>(n_chunks * width), 0.0f);

  at::parallel_for(0, n_chunks * n_col_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ch = task / n_col_tasks;
      const int64_t col_lo = (task % n_col_tasks) * kColsPerTask;
      const int64_t col_hi = std::min(width, col_lo + kColsPerTask);
      float* acc = partial.data() + ch * width;
      const int64_t rb_lo = rows.first + ch * chunk;
      const int64_t rb_hi = std::min(rows.end, rb_lo + chunk);
      for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
        float gv[4];
        load_rows(g, numel, a.row_offset, rb, gv);
        if constexpr (rad) {
          for (int64_t q = col_lo / 32; q < col_hi / 32; ++q) {
            const Philox4 x = stream_block(uint32_t(rb), uint32_t(groups.first_group + q), a.step,
                                           a.stream, a.key0, a.key1);
            float* acc_q = acc + 32 * q;
#pragma omp simd
            for (int k = 0; k < 32; ++k) {
              acc_q[k] += ((flip_sign(gv[0], x.w[0], k) + flip_sign(gv[1], x.w[1], k)) +
                           flip_sign(gv[2], x.w[2], k)) +
                          flip_sign(gv[3], x.w[3], k);
            }
          }
        } else {
          float e[4][kLanes];
          for (int64_t t = col_lo; t < col_hi; t += kLanes) {
            gen_tile<D>(uint32_t(rb), uint32_t(a.col_offset + t), a, e);
            float* acc_t = acc + t;
#pragma omp simd
            for (int l = 0; l < kLanes; ++l) {
              acc_t[l] += ((e[0][l] * gv[0] + e[1][l] * gv[1]) + e[2][l] * gv[2]) + e[3][l] * gv[3];
            }
          }
        }
      }
    }
  });

  for (int64_t j = 0; j < dim; ++j) {
    float s = 0.0f;
    for (int64_t ch = 0; ch < n_chunks; ++ch) s += partial[ch * width + shift + j];
    c[j] = s;
  }
}

// out[i] += alpha * sum_j P[row_offset + i, col_offset + j] c[j]
template <Distribution D, typename T>
void expand_kernel(T* out, const float* c, int64_t numel, int64_t dim, float alpha,
                   const StreamArgs& a) {
  const RowBlocks rows(a.row_offset, numel);
  const bool rad = D == Distribution::Rademacher;
  const ColGroups groups(a.col_offset, dim);
  const int64_t width = rad ? groups.count * 32 : ceil_div(dim, kLanes) * kLanes;
  const int64_t shift = rad ? groups.shift : 0;
  std::vector<float> c_pad(static_cast<size_t>(width), 0.0f);  // zeros beyond dim
  std::copy(c, c + dim, c_pad.begin() + shift);

  at::parallel_for(rows.first, rows.end, 16, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; ++rb) {
      float u[4];
      if constexpr (rad) {
        float acc[4][32] = {};
        for (int64_t q = 0; q < groups.count; ++q) {
          const Philox4 x = stream_block(uint32_t(rb), uint32_t(groups.first_group + q), a.step,
                                         a.stream, a.key0, a.key1);
          const float* cq = c_pad.data() + 32 * q;
          for (int r = 0; r < 4; ++r) {
#pragma omp simd
            for (int k = 0; k < 32; ++k) acc[r][k] += flip_sign(cq[k], x.w[r], k);
          }
        }
        for (int r = 0; r < 4; ++r) u[r] = lane_sum<32>(acc[r]);
      } else {
        float acc[4][kLanes] = {};
        float e[4][kLanes];
        for (int64_t t = 0; t < width; t += kLanes) {
          gen_tile<D>(uint32_t(rb), uint32_t(a.col_offset + t), a, e);
          const float* ct = c_pad.data() + t;
          for (int r = 0; r < 4; ++r) {
#pragma omp simd
            for (int l = 0; l < kLanes; ++l) acc[r][l] += e[r][l] * ct[l];
          }
        }
        for (int r = 0; r < 4; ++r) u[r] = lane_sum<kLanes>(acc[r]);
      }
      for (int r = 0; r < 4; ++r) {
        const int64_t i = 4 * rb + r - a.row_offset;
        if (i >= 0 && i < numel) out[i] = static_cast<T>(static_cast<float>(out[i]) + alpha * u[r]);
      }
    }
  });
}

// out[i, j] = P[row_offset + i, col_offset + j]
template <Distribution D, typename T>
void materialize_kernel(T* out, int64_t numel, int64_t dim, const StreamArgs& a) {
  const RowBlocks rows(a.row_offset, numel);
  const ColGroups groups(a.col_offset, dim);
  at::parallel_for(rows.first, rows.end, 16, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; ++rb) {
      for (int r = 0; r < 4; ++r) {
        const int64_t i = 4 * rb + r - a.row_offset;
        if (i < 0 || i >= numel) continue;
        T* row = out + i * dim;
        if constexpr (D == Distribution::Rademacher) {
          for (int64_t q = 0; q < groups.count; ++q) {
            const Philox4 x = stream_block(uint32_t(rb), uint32_t(groups.first_group + q), a.step,
                                           a.stream, a.key0, a.key1);
            for (int k = 0; k < 32; ++k) {
              const int64_t j = 32 * q + k - groups.shift;
              if (j >= 0 && j < dim) row[j] = static_cast<T>(rademacher(x.w[r], k));
            }
          }
        } else {
          float e[4][kLanes];
          for (int64_t t = 0; t < dim; t += kLanes) {
            gen_tile<D>(uint32_t(rb), uint32_t(a.col_offset + t), a, e);
            const int64_t n = std::min<int64_t>(kLanes, dim - t);
            for (int64_t l = 0; l < n; ++l) row[t + l] = static_cast<T>(e[r][l]);
          }
        }
      }
    }
  });
}

#define RBD_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor project_cpu(const at::Tensor& g, int64_t dim, int64_t seed, int64_t step,
                       int64_t stream, c10::string_view distribution, int64_t row_offset,
                       int64_t col_offset) {
  check_float_input(g, "g");
  const StreamArgs a = make_stream_args(g.numel(), dim, seed, step, stream,
                                        std::string(distribution), row_offset, col_offset);
  at::Tensor c = at::zeros({dim}, g.options().dtype(at::kFloat));
  if (g.numel() > 0) {
    const at::Tensor gc = g.contiguous();
    RBD_DISPATCH_FLOAT(g.scalar_type(), "rbd_cuda::project", [&] {
      with_distribution(a.dist, [&](auto tag) {
        project_kernel<decltype(tag)::value, scalar_t>(gc.data_ptr<scalar_t>(), gc.numel(), dim,
                                                       a, c.data_ptr<float>());
      });
    });
  }
  return c.to(g.scalar_type());
}

void expand_inplace_cpu(at::Tensor& out, const at::Tensor& c, double alpha, int64_t seed,
                        int64_t step, int64_t stream, c10::string_view distribution,
                        int64_t row_offset, int64_t col_offset) {
  check_out(out, "out");
  check_same_device(out, "out", c, "c");
  const at::Tensor c32 = coefficients_fp32(c);
  const StreamArgs a = make_stream_args(out.numel(), c32.numel(), seed, step, stream,
                                        std::string(distribution), row_offset, col_offset);
  mark_modified(out);
  if (out.numel() == 0) return;
  RBD_DISPATCH_FLOAT(out.scalar_type(), "rbd_cuda::expand_", [&] {
    with_distribution(a.dist, [&](auto tag) {
      expand_kernel<decltype(tag)::value, scalar_t>(out.data_ptr<scalar_t>(),
                                                    c32.data_ptr<float>(), out.numel(),
                                                    c32.numel(), static_cast<float>(alpha), a);
    });
  });
}

at::Tensor expand_cpu(const at::Tensor& c, int64_t numel, int64_t seed, int64_t step,
                      int64_t stream, c10::string_view distribution, int64_t row_offset,
                      int64_t col_offset) {
  check_float_input(c, "c");
  TORCH_CHECK_VALUE(numel >= 0, "rbd_cuda: numel must be non-negative, got ", decimal(numel));
  at::Tensor out = at::zeros({numel}, c.options());
  expand_inplace_cpu(out, c, 1.0, seed, step, stream, distribution, row_offset, col_offset);
  return out;
}

void materialize_inplace_cpu(at::Tensor& out, int64_t seed, int64_t step, int64_t stream,
                             c10::string_view distribution, int64_t row_offset,
                             int64_t col_offset) {
  check_matrix_out(out);
  const auto st = out.scalar_type();
  const StreamArgs a = make_stream_args(out.size(0), out.size(1), seed, step, stream,
                                        std::string(distribution), row_offset, col_offset);
  mark_modified(out);
  if (out.numel() == 0) return;
  RBD_DISPATCH_FLOAT(st, "rbd_cuda::materialize_", [&] {
    with_distribution(a.dist, [&](auto tag) {
      materialize_kernel<decltype(tag)::value, scalar_t>(out.data_ptr<scalar_t>(), out.size(0),
                                                         out.size(1), a);
    });
  });
}

at::Tensor philox_cpu(const at::Tensor& counter, const at::Tensor& key, int64_t rounds) {
  check_philox_args(counter, key, rounds);
  const at::Tensor ctr = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(ctr);
  const int64_t* cp = ctr.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t n = 0; n < ctr.size(0); ++n) {
    const int64_t* c4 = cp + 4 * n;
    const int64_t* k2 = kp + 2 * n;
    const Philox4 x = rounds == 7
        ? philox4x32<7>(uint32_t(c4[0]), uint32_t(c4[1]), uint32_t(c4[2]), uint32_t(c4[3]),
                        uint32_t(k2[0]), uint32_t(k2[1]))
        : philox4x32<10>(uint32_t(c4[0]), uint32_t(c4[1]), uint32_t(c4[2]), uint32_t(c4[3]),
                         uint32_t(k2[0]), uint32_t(k2[1]));
    for (int w = 0; w < 4; ++w) op[4 * n + w] = int64_t(x.w[w]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rbd_cuda, CPU, m) {
  m.impl("project", &project_cpu);
  m.impl("expand", &expand_cpu);
  m.impl("expand_", &expand_inplace_cpu);
  m.impl("materialize_", &materialize_inplace_cpu);
  m.impl("philox4x32", &philox_cpu);
}

}  // namespace rbd

// Argument parsing and validation shared by the CPU and CUDA op implementations.
#pragma once

#include <cstdlib>
#include <string>
#include <type_traits>

#include <torch/library.h>
#include <ATen/ATen.h>

#include "rbd/philox.h"

namespace rbd {

// Integers reach error messages as std::string: with torch 2.11 on the H200 machine, streaming an
// integer through c10::str (TORCH_CHECK's formatter) from this extension crashed the process,
// while strings were fine (benchmarks/README.md, "Known problems").
inline std::string decimal(int64_t v) { return std::to_string(v); }

inline std::string shape_string(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t k = 0; k < sizes.size(); ++k) s += (k ? ", " : "") + std::to_string(sizes[k]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <Distribution D>
using DistTag = std::integral_constant<Distribution, D>;

// Calls f(DistTag<d>{}) so kernels can be specialised on the distribution at compile time.
template <typename F>
void with_distribution(Distribution d, F&& f) {
  switch (d) {
    case Distribution::Normal: f(DistTag<Distribution::Normal>{}); break;
    case Distribution::Uniform: f(DistTag<Distribution::Uniform>{}); break;
    case Distribution::Rademacher: f(DistTag<Distribution::Rademacher>{}); break;
  }
}

// Everything that selects a sub-matrix of the conceptual random matrix.
struct StreamArgs {
  uint32_t key0 = 0, key1 = 0;  // seed, low word first
  uint32_t step = 0;
  uint32_t stream = 0;
  Distribution dist = Distribution::Normal;
  int64_t row_offset = 0;
  int64_t col_offset = 0;
};

// Where a request's rows [row_offset, row_offset + numel) and columns [col_offset, col_offset + dim)
// sit in the stream: the only place the row-block / column-group arithmetic is written, so the
// CPU and CUDA launchers walk the same Philox counters by construction.
struct Geometry {
  int64_t rb_first, rb_end;  // 4-row blocks covering the rows (counter[0])
  int64_t first_col;         // counter[1] of local column -shift: a column, or a 32-column group
  int64_t shift;             // Rademacher: col_offset & 31 (local column j is group bit j + shift); else 0
  int64_t n_cols;            // counter[1] values covering the columns: dim, or the groups
  bool rademacher;

  int64_t n_rb() const { return rb_end - rb_first; }
  // Local columns once padded: whole groups for Rademacher, whole `tile`s otherwise.
  int64_t padded_width(int64_t tile) const {
    return rademacher ? 32 * n_cols : ceil_div(n_cols, tile) * tile;
  }
  // Row blocks whose 4 rows all lie inside [0, numel): [interior_first, interior_end).
  int64_t interior_first(int64_t row_offset) const { return (row_offset + 3) >> 2; }
  int64_t interior_end(int64_t row_offset, int64_t numel) const { return (row_offset + numel) >> 2; }
};

inline Geometry make_geometry(Distribution dist, int64_t numel, int64_t dim, int64_t row_offset,
                              int64_t col_offset) {
  Geometry geo;
  geo.rademacher = dist == Distribution::Rademacher;
  geo.rb_first = row_offset >> 2;
  geo.rb_end = (row_offset + numel + 3) >> 2;
  geo.shift = geo.rademacher ? (col_offset & 31) : 0;
  geo.first_col = geo.rademacher ? (col_offset >> 5) : col_offset;
  geo.n_cols = geo.rademacher ? ceil_div(geo.shift + dim, 32) : dim;
  return geo;
}

inline Distribution parse_distribution(const std::string& name) {
  if (name == "normal") return Distribution::Normal;
  if (name == "uniform") return Distribution::Uniform;
  if (name == "rademacher") return Distribution::Rademacher;
  TORCH_CHECK_VALUE(false, "rbd_cuda: distribution must be one of 'normal', 'uniform', "
                    "'rademacher', got '", name, "'");
}

// numel: rows of the sub-matrix, dim: its columns. The seed arrives as a signed
// int64 holding the seed's 64 bits (the Python wrapper maps [2^63, 2^64) there).
inline StreamArgs make_stream_args(int64_t numel, int64_t dim, int64_t seed, int64_t step,
                                   int64_t stream, const std::string& distribution,
                                   int64_t row_offset, int64_t col_offset) {
  TORCH_CHECK_VALUE(dim > 0, "rbd_cuda: dim must be positive, got ", decimal(dim));
  TORCH_CHECK_VALUE(numel >= 0, "rbd_cuda: numel must be non-negative, got ", decimal(numel));
  TORCH_CHECK_VALUE(step >= 0 && step < (int64_t(1) << 32),
                    "rbd_cuda: step must be in [0, 2**32), got ", decimal(step));
  TORCH_CHECK_VALUE(stream >= 0 && stream < (int64_t(1) << 32),
                    "rbd_cuda: stream must be in [0, 2**32), got ", decimal(stream));
  TORCH_CHECK_VALUE(row_offset >= 0, "rbd_cuda: row_offset must be non-negative, got ",
                    decimal(row_offset));
  TORCH_CHECK_VALUE(col_offset >= 0, "rbd_cuda: col_offset must be non-negative, got ",
                    decimal(col_offset));
  TORCH_CHECK_VALUE(row_offset <= kMaxRows - numel, "rbd_cuda: row_offset + numel must be at most 2**34 "
                    "(the stream's row range), got row_offset=", decimal(row_offset), ", numel=", decimal(numel));
  TORCH_CHECK_VALUE(col_offset <= kMaxCols - dim, "rbd_cuda: col_offset + dim must be at most 2**32 "
                    "(the stream's column range), got col_offset=", decimal(col_offset), ", dim=", decimal(dim));
  StreamArgs a;
  const uint64_t s = static_cast<uint64_t>(seed);
  a.key0 = static_cast<uint32_t>(s);
  a.key1 = static_cast<uint32_t>(s >> 32);
  a.step = static_cast<uint32_t>(step);
  a.stream = static_cast<uint32_t>(stream);
  a.dist = parse_distribution(distribution);
  a.row_offset = row_offset;
  a.col_offset = col_offset;
  return a;
}

inline Geometry make_geometry(const StreamArgs& a, int64_t numel, int64_t dim) {
  return make_geometry(a.dist, numel, dim, a.row_offset, a.col_offset);
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "rbd_cuda: ",
                    name, " must be float32, float16 or bfloat16, got ", st);
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "rbd_cuda: ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// The coefficient vector: 1-D, non-empty, float; returned as a fresh contiguous fp32 copy (it is
// tiny), so an expand_ whose c is a view of its own out reads c as it was before the update.
inline at::Tensor coefficients_fp32(const at::Tensor& c) {
  check_float_input(c, "c");
  TORCH_CHECK_VALUE(c.dim() == 1, "rbd_cuda: c must be 1-D (one coefficient per direction), got shape ",
                    shape_string(c.sizes()));
  TORCH_CHECK_VALUE(c.numel() > 0, "rbd_cuda: c must hold at least one coefficient (dim > 0)");
  return c.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

// The raw-generator debug op: int64 (N, 4) counters and (N, 2) keys, each word a u32.
inline void check_philox_args(const at::Tensor& counter, const at::Tensor& key, int64_t rounds) {
  TORCH_CHECK_VALUE(rounds == 7 || rounds == 10, "rbd_cuda: rounds must be 7 or 10, got ", decimal(rounds));
  TORCH_CHECK_VALUE(counter.scalar_type() == at::kLong && counter.dim() == 2 && counter.size(1) == 4,
                    "rbd_cuda: counter must be an int64 tensor of shape (N, 4), got ",
                    counter.scalar_type(), " ", shape_string(counter.sizes()));
  TORCH_CHECK_VALUE(key.scalar_type() == at::kLong && key.dim() == 2 && key.size(1) == 2 &&
                        key.size(0) == counter.size(0),
                    "rbd_cuda: key must be an int64 tensor of shape (N, 2) matching counter, got ",
                    key.scalar_type(), " ", shape_string(key.sizes()));
  check_same_device(counter, "counter", key, "key");
  const auto check_words = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.numel() == 0 || (t.min().item<int64_t>() >= 0 &&
                                         t.max().item<int64_t>() < (int64_t(1) << 32)),
                      "rbd_cuda: every ", name, " word must be in [0, 2**32)");
  };
  check_words(counter, "counter");
  check_words(key, "key");
}

// An in-place op's output changed: bump its version counter as torch's own in-place ops do, so
// autograd refuses a backward that would read the overwritten values.
inline void mark_modified(at::Tensor& out) { out.unsafeGetTensorImpl()->bump_version(); }

// expand(c, numel) is expand_ into zeros with alpha 1, on every backend: `Inplace` is the
// backend's expand_.
using ExpandInplace = void (*)(at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t,
                               c10::string_view, int64_t, int64_t);

template <ExpandInplace Inplace>
at::Tensor expand_into_zeros(const at::Tensor& c, int64_t numel, int64_t seed, int64_t step,
                             int64_t stream, c10::string_view distribution, int64_t row_offset,
                             int64_t col_offset) {
  check_float_input(c, "c");
  TORCH_CHECK_VALUE(numel >= 0, "rbd_cuda: numel must be non-negative, got ", decimal(numel));
  at::Tensor out = at::zeros({numel}, c.options());
  Inplace(out, c, 1.0, seed, step, stream, distribution, row_offset, col_offset);
  return out;
}

// materialize_'s output: a contiguous 2-D (numel, dim) floating-point tensor.
inline void check_matrix_out(const at::Tensor& out) {
  TORCH_CHECK_VALUE(out.dim() == 2, "rbd_cuda: out must be 2-D (numel, dim), got shape ",
                    shape_string(out.sizes()));
  TORCH_CHECK_VALUE(out.is_contiguous(), "rbd_cuda: out must be contiguous");
  const auto st = out.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    "rbd_cuda: out must be a floating-point tensor, got ", st);
}

inline void check_out(const at::Tensor& out, const char* name) {
  check_float_input(out, name);
  TORCH_CHECK_VALUE(out.is_contiguous(), "rbd_cuda: ", name,
                    " must be contiguous (it is updated in place)");
}

}  // namespace rbd

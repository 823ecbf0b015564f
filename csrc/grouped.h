// The grouped ops over a segment table (table.h): one project / expand_ call over all of its
// segments (pieces of flattened tensors), on every backend; the single ops are tables of one.
//
//   project_grouped: c_k = sum over k's segments s, in table order, of project(g_s.float(), dims[k],
//                    row_offset=row_offsets[s], stream=streams[k])   (bit for bit, per device)
//   expand_grouped_: out_s += alphas[s] * P_k c_k, as expand_(out_s, c_k, alphas[s], ...) does
//
// The checks of what a call brings besides the table, and the CUDA project's cut of a segment
// into work items (host arithmetic every build runs).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "table.h"

namespace rbd {

// out must not overlap: segments of one launch update them concurrently.
inline void check_disjoint(at::TensorList out) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const at::Tensor& t : out) {
    if (t.numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.emplace_back(begin, begin + t.numel() * t.element_size());
  }
  std::sort(spans.begin(), spans.end());
  for (size_t s = 1; s < spans.size(); ++s) {
    TORCH_CHECK_VALUE(spans[s].first >= spans[s - 1].second,
                      "rbd_cuda: the tensors of out must not overlap (one launch updates them all)");
  }
}

// expand_grouped_'s arguments besides the table's tensors: contiguous outs that do not overlap,
// one alpha per segment, c of the table's total coefficients on the outs' device.
inline void check_expand_grouped(at::TensorList out, const at::Tensor& c, at::ArrayRef<double> alphas,
                                 const SegmentTable& tab) {
  for (const at::Tensor& t : out) check_out(t, "out");
  check_same_device(out[0], "out", c, "c");
  TORCH_CHECK_VALUE(int64_t(alphas.size()) == tab.n_segs, "rbd_cuda: alphas needs one entry per segment (len(out)=",
                    decimal(tab.n_segs), "), got ", decimal(int64_t(alphas.size())));
  TORCH_CHECK_VALUE(c.dim() == 1 && c.numel() == tab.total(), "rbd_cuda: c must be 1-D with sum(dims)=",
                    decimal(tab.total()), " coefficients, got shape ", shape_string(c.sizes()));
  check_disjoint(out);
}

// ---- the CUDA project's cut of a segment into work items -----------------------------------
//
// Host arithmetic only, here rather than in cuda/products.cu so that every build can run (and
// the tests can check) it: torch.ops.rbd_cuda._cuda_project_plan returns it for one segment.

constexpr int64_t kProjectTile = 32;                  // columns per work item (normal, uniform)
constexpr int64_t kProjectItemsPerSegment = 16384;    // work items a large segment is cut into
constexpr int64_t kProjectMinRowBlocksPerItem = 64;   // (Rademacher: one per row lane, 256)
// The kernel walks a chunk's interior row blocks with a 32-bit counter (t < n, t += lanes, at most
// 256 lanes): at most 2^30 row blocks per chunk keep t + lanes far below 2^32. Without the cap a
// segment of 2^34 rows and dim 524288 gets one chunk of 2^32 row blocks (0 in 32 bits).
constexpr int64_t kProjectMaxChunk = int64_t(1) << 30;

struct ProjectPlan {
  int64_t tiles;     // column tiles (Rademacher: 32-column groups)
  int64_t chunk;     // row blocks per work item, in [1, kProjectMaxChunk]
  int64_t n_chunks;  // work items per tile: ceil(n_rb / chunk)
};

// The cut depends on the segment alone, so it sums the same way in any table.
inline ProjectPlan cuda_project_plan(const Geometry& geo, int64_t n_rb, int64_t dim) {
  ProjectPlan p;
  p.tiles = geo.rademacher ? geo.n_cols : ceil_div(dim, kProjectTile);
  const int64_t min_rows = geo.rademacher ? 256 : kProjectMinRowBlocksPerItem;
  const int64_t want = std::clamp<int64_t>(ceil_div(kProjectItemsPerSegment, p.tiles), 1,
                                           std::max<int64_t>(1, ceil_div(n_rb, min_rows)));
  p.chunk = std::clamp<int64_t>(ceil_div(n_rb, want), 1, kProjectMaxChunk);
  p.n_chunks = ceil_div(n_rb, p.chunk);
  return p;
}

// ---- the products' entry points, the same on every backend -----------------------------------
//
// Each op checks its arguments (the single ops' through make_stream_args, the grouped ops' against
// their table), marks its outputs modified, and hands a table to the backend's walk over it: a
// table of one for the single ops, so a backend has one code path. Backend provides
//   Guard(device)                               the device guard of a call (none on the CPU)
//   project(g, table, shared, out_dtype)        c: table.total() coefficients in out_dtype
//   expand_(out, c32, alphas, table, shared)    out[s] += alphas[s] P_k c32[offset k ...]
template <typename Backend>
struct Products {
  static at::Tensor project(const at::Tensor& g, int64_t dim, int64_t seed, int64_t step, int64_t stream,
                            c10::string_view distribution, int64_t row_offset, int64_t col_offset) {
    check_float_input(g, "g");
    const StreamArgs a = make_stream_args(g.numel(), dim, seed, step, stream, std::string(distribution), row_offset,
                                          col_offset);
    const typename Backend::Guard guard(g.device());
    const TableOfOne one(a, g.numel(), dim);
    return Backend::project(at::TensorList(g), one.table, a, g.scalar_type());
  }

  static void expand_(at::Tensor& out, const at::Tensor& c, double alpha, int64_t seed, int64_t step,
                      int64_t stream, c10::string_view distribution, int64_t row_offset, int64_t col_offset) {
    check_out(out, "out");
    check_same_device(out, "out", c, "c");
    const at::Tensor c32 = coefficients_fp32(c);  // a copy: c may be a view of out
    const StreamArgs a = make_stream_args(out.numel(), c32.numel(), seed, step, stream, std::string(distribution),
                                          row_offset, col_offset);
    mark_modified(out);
    const typename Backend::Guard guard(out.device());
    const TableOfOne one(a, out.numel(), c32.numel());
    Backend::expand_(at::TensorList(out), c32, at::ArrayRef<double>(alpha), one.table, a);
  }

  static at::Tensor project_grouped(at::TensorList g, const at::Tensor& table, int64_t total, int64_t seed,
                                    int64_t step, c10::string_view distribution) {
    const SegmentTable tab = read_segment_table(table, "table");
    check_total(tab, total, "table");
    check_segments(g, "g", tab);
    const StreamArgs shared = shared_keys(seed, step, distribution);
    const typename Backend::Guard guard(g[0].device());
    return Backend::project(g, tab, shared, at::kFloat);
  }

  static void expand_grouped_(at::TensorList out, const at::Tensor& c, at::ArrayRef<double> alphas,
                              const at::Tensor& table, int64_t seed, int64_t step, c10::string_view distribution) {
    const SegmentTable tab = read_segment_table(table, "table");
    check_segments(out, "out", tab);
    check_expand_grouped(out, c, alphas, tab);
    const StreamArgs shared = shared_keys(seed, step, distribution);
    const at::Tensor c32 = coefficients_fp32(c);  // a copy: c may be a view of an out
    for (const at::Tensor& o : out) {
      at::Tensor t = o;
      mark_modified(t);
    }
    const typename Backend::Guard guard(out[0].device());
    Backend::expand_(out, c32, alphas, tab, shared);
  }

  static void register_impls(torch::Library& m) {
    m.impl("project", &project);
    m.impl("expand", &expand_into_zeros<&expand_>);
    m.impl("expand_", &expand_);
    m.impl("project_grouped", &project_grouped);
    m.impl("expand_grouped_", &expand_grouped_);
  }
};

}  // namespace rbd

// The grouped ops: one project / expand_ call over a table of segments (pieces of flattened
// tensors), each at a row offset of its compartment's matrix; compartment k has dims[k]
// directions on stream streams[k]. The coefficients of all compartments live in one fp32 vector,
// compartment k's at [sum(dims[:k]), sum(dims[:k + 1])).
//
//   project_grouped: c_k = sum over k's segments s, in list order, of project(g_s.float(), dims[k],
//                    row_offset=row_offsets[s], stream=streams[k])   (bit for bit, per device)
//   expand_grouped_: out_s += alphas[s] * P_k c_k, as expand_(out_s, c_k, alphas[s], ...) does
//
// Argument checks, and the per-segment loop over the single ops that the CPU runs; the CUDA kernels
// do the same in one launch (cuda/products.cu).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "common.h"

namespace rbd {

struct GroupedArgs {
  int64_t n_segs, n_comps;
  std::vector<int64_t> offset;  // offset[k]: compartment k's first coefficient; offset[n_comps]: total
  std::vector<StreamArgs> seg;  // per segment: its compartment's stream, its row offset
};

// Checks the table (naming the argument and index at fault) and lays out the coefficients. The
// keys every segment shares (seed, step, distribution) are checked once, not per segment.
inline GroupedArgs check_grouped(at::TensorList tensors, const char* tensors_name,
                                 at::IntArrayRef row_offsets, at::IntArrayRef compartments,
                                 at::IntArrayRef dims, at::IntArrayRef streams, int64_t seed,
                                 int64_t step, c10::string_view distribution) {
  GroupedArgs g;
  g.n_segs = int64_t(tensors.size());
  g.n_comps = int64_t(dims.size());
  TORCH_CHECK_VALUE(g.n_segs > 0, "rbd_cuda: ", tensors_name, " must hold at least one segment");
  TORCH_CHECK_VALUE(int64_t(row_offsets.size()) == g.n_segs && int64_t(compartments.size()) == g.n_segs,
                    "rbd_cuda: row_offsets and compartments need one entry per segment (len(",
                    tensors_name, ")=", decimal(g.n_segs), "), got ", decimal(int64_t(row_offsets.size())),
                    " and ", decimal(int64_t(compartments.size())));
  TORCH_CHECK_VALUE(g.n_comps > 0 && int64_t(streams.size()) == g.n_comps,
                    "rbd_cuda: dims and streams need one entry per compartment (at least one), got ",
                    decimal(g.n_comps), " and ", decimal(int64_t(streams.size())));
  const StreamArgs shared = make_stream_args(0, 1, seed, step, 0, std::string(distribution), 0, 0);
  g.offset.assign(1, 0);
  for (int64_t k = 0; k < g.n_comps; ++k) {
    TORCH_CHECK_VALUE(dims[k] > 0 && dims[k] <= kMaxCols, "rbd_cuda: dims[", decimal(k),
                      "] must be in [1, 2**32] (the stream's column range), got ", decimal(dims[k]));
    TORCH_CHECK_VALUE(streams[k] >= 0 && streams[k] < (int64_t(1) << 32), "rbd_cuda: streams[", decimal(k),
                      "] must be in [0, 2**32), got ", decimal(streams[k]));
    g.offset.push_back(g.offset.back() + dims[k]);
  }
  for (int64_t s = 0; s < g.n_segs; ++s) {
    const at::Tensor& t = tensors[s];
    check_float_input(t, tensors_name);
    TORCH_CHECK_VALUE(t.device() == tensors[0].device() && t.scalar_type() == tensors[0].scalar_type(),
                      "rbd_cuda: every tensor of ", tensors_name, " must have the device and dtype of ",
                      tensors_name, "[0]; ", tensors_name, "[", decimal(s), "] differs");
    const int64_t k = compartments[s];
    TORCH_CHECK_VALUE(k >= 0 && k < g.n_comps, "rbd_cuda: compartments[", decimal(s), "] must be in [0, len(dims)=",
                      decimal(g.n_comps), "), got ", decimal(k));
    TORCH_CHECK_VALUE(row_offsets[s] >= 0 && row_offsets[s] <= kMaxRows - t.numel(), "rbd_cuda: row_offsets[",
                      decimal(s), "] must be in [0, 2**34 - numel], got ", decimal(row_offsets[s]));
    StreamArgs a = shared;
    a.stream = static_cast<uint32_t>(streams[k]);
    a.row_offset = row_offsets[s];
    g.seg.push_back(a);
  }
  return g;
}

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

inline void check_expand_grouped(at::TensorList out, const at::Tensor& c, at::ArrayRef<double> alphas,
                                 const GroupedArgs& g) {
  for (const at::Tensor& t : out) check_out(t, "out");
  check_same_device(out[0], "out", c, "c");
  TORCH_CHECK_VALUE(int64_t(alphas.size()) == g.n_segs, "rbd_cuda: alphas needs one entry per segment (len(out)=",
                    decimal(g.n_segs), "), got ", decimal(int64_t(alphas.size())));
  TORCH_CHECK_VALUE(c.dim() == 1 && c.numel() == g.offset.back(), "rbd_cuda: c must be 1-D with sum(dims)=",
                    decimal(g.offset.back()), " coefficients, got shape ", shape_string(c.sizes()));
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

// ---- the per-segment loop over the single ops --------------------------------------------

inline at::Tensor project_grouped_loop(at::TensorList g, at::IntArrayRef row_offsets,
                                       at::IntArrayRef compartments, at::IntArrayRef dims,
                                       at::IntArrayRef streams, int64_t seed, int64_t step,
                                       c10::string_view distribution) {
  const GroupedArgs ga = check_grouped(g, "g", row_offsets, compartments, dims, streams, seed, step, distribution);
  static auto project = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("rbd_cuda::project", "")
                            .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                                              c10::string_view, int64_t, int64_t)>();
  at::Tensor c = at::zeros({ga.offset.back()}, g[0].options().dtype(at::kFloat));
  std::vector<bool> started(size_t(ga.n_comps), false);
  for (int64_t s = 0; s < ga.n_segs; ++s) {
    const int64_t k = compartments[s];
    const at::Tensor part = project.call(g[s].to(at::kFloat), dims[k], seed, step, streams[k], distribution,
                                         row_offsets[s], 0);
    at::Tensor slot = c.narrow(0, ga.offset[k], dims[k]);
    if (started[k]) {
      slot.add_(part);
    } else {
      slot.copy_(part);  // not 0 + part: keeps the sign of a -0.0, as the single op's sum does
      started[k] = true;
    }
  }
  return c;
}

inline void expand_grouped_loop_(at::TensorList out, const at::Tensor& c, at::ArrayRef<double> alphas,
                                 at::IntArrayRef row_offsets, at::IntArrayRef compartments,
                                 at::IntArrayRef dims, at::IntArrayRef streams, int64_t seed, int64_t step,
                                 c10::string_view distribution) {
  const GroupedArgs ga = check_grouped(out, "out", row_offsets, compartments, dims, streams, seed, step,
                                       distribution);
  check_expand_grouped(out, c, alphas, ga);
  static auto expand_ = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("rbd_cuda::expand_", "")
                            .typed<void(at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t,
                                        c10::string_view, int64_t, int64_t)>();
  const at::Tensor c32 = coefficients_fp32(c);  // a copy: c may be a view of an out
  for (int64_t s = 0; s < ga.n_segs; ++s) {
    const int64_t k = compartments[s];
    at::Tensor o = out[s];
    expand_.call(o, c32.narrow(0, ga.offset[k], dims[k]), alphas[s], seed, step, streams[k], distribution,
                 row_offsets[s], 0);
  }
}

}  // namespace rbd

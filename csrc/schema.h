// The schemas of the ops that have kernels, written once for every namespace that registers them:
// torch.ops.rbd_cuda (registration.cpp) and the CUDA kernels' emulated build, torch.ops.rbd_emu
// (emu/emu_ops.cpp).
#pragma once

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#define RBD_STREAM_KWARGS \
  "int seed, int step=0, int stream=0, str distribution=\"normal\", int row_offset=0, int col_offset=0"
// The keys every segment of a grouped call shares; the rest is its segment table (table.h).
#define RBD_TABLE_KWARGS "int seed, int step=0, str distribution=\"normal\""

namespace rbd {

inline void define_kernel_ops(torch::Library& m) {
  m.def("project(Tensor g, int dim, *, " RBD_STREAM_KWARGS ") -> Tensor");
  m.def("expand(Tensor c, int numel, *, " RBD_STREAM_KWARGS ") -> Tensor");
  m.def("expand_(Tensor(a!) out, Tensor c, float alpha=1.0, *, " RBD_STREAM_KWARGS ") -> ()");
  m.def("materialize_(Tensor(a!) out, *, " RBD_STREAM_KWARGS ") -> ()");
  // total: the table's sum(dims), the result's size, known to torch.compile without reading the table.
  m.def("project_grouped(Tensor[] g, Tensor table, int total, *, " RBD_TABLE_KWARGS ") -> Tensor");
  m.def("expand_grouped_(Tensor(a!)[] out, Tensor c, float[] alphas, Tensor table, *, " RBD_TABLE_KWARGS
        ") -> ()");
  m.def("philox4x32(Tensor counter, Tensor key, int rounds=10) -> Tensor");
}

// Autograd for the in-place, grouped and integer ops: they have no derivatives, so they must say so
// (expand_/materialize_ refuse a leaf that requires grad outside no_grad). project and expand
// get their derivatives in rbd_cuda/ops.py (torch.library.register_autograd): each is the
// other's adjoint. The in-place ops bump their output's version counter themselves
// (mark_modified).
inline void impl_autograd_fallbacks(torch::Library& m) {
  for (const char* op : {"expand_", "materialize_", "philox4x32", "project_grouped", "expand_grouped_"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace rbd

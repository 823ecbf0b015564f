// The only TORCH_LIBRARY(rbd_cuda, m) block: the schemas of the ops with kernels (schema.h) and the
// rest.
#include <Python.h>

#include <string>
#include <vector>

#include <torch/library.h>
#include <ATen/ATen.h>

#include "common.h"
#include "grouped.h"
#include "schema.h"

// Importing the extension from Python must register the ops: a module init that
// does nothing else is enough (the ops are then reached as torch.ops.rbd_cuda.*).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace rbd {

bool built_with_cuda() {
#ifdef RBD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t stream_version() { return kStreamVersion; }

int64_t arithmetic_version() { return kArithmeticVersion; }

// Defined in cpu/ops_cpu.cpp: the CPU kernels' instruction set the ops use (set_cpu_isa: a name
// or "auto", the best), and the ones this CPU can run (best first).
std::string cpu_isa();
void set_cpu_isa(const std::string& name);
std::vector<std::string> cpu_isas();

// Allocates on the requested device and lets materialize_ dispatch there.
at::Tensor materialize(int64_t numel, int64_t dim, int64_t seed, int64_t step, int64_t stream,
                       c10::string_view distribution, int64_t row_offset, int64_t col_offset,
                       std::optional<at::ScalarType> dtype, std::optional<at::Device> device) {
  make_stream_args(numel, dim, seed, step, stream, std::string(distribution), row_offset,
                   col_offset);
  auto out = at::empty({numel, dim}, at::TensorOptions()
                                         .dtype(dtype.value_or(at::kFloat))
                                         .device(device.value_or(at::Device(at::kCPU))));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rbd_cuda::materialize_", "")
                       .typed<void(at::Tensor&, int64_t, int64_t, int64_t, c10::string_view,
                                   int64_t, int64_t)>();
  op.call(out, seed, step, stream, distribution, row_offset, col_offset);
  return out;
}

// The CUDA project's cut of one segment (grouped.h) as [tiles, chunk, n_chunks], for the tests:
// the host arithmetic is the same in every build, the GPU is needed only to run the kernels.
std::vector<int64_t> cuda_project_plan_op(int64_t numel, int64_t dim, int64_t row_offset,
                                          c10::string_view distribution) {
  const StreamArgs a = make_stream_args(numel, dim, 0, 0, 0, std::string(distribution), row_offset, 0);
  const Geometry geo = make_geometry(a, numel, dim);
  const ProjectPlan p = cuda_project_plan(geo, numel == 0 ? 0 : geo.n_rb(), dim);
  return {p.tiles, p.chunk, p.n_chunks};
}

}  // namespace rbd

TORCH_LIBRARY(rbd_cuda, m) {
  rbd::define_kernel_ops(m);
  m.def("materialize(int numel, int dim, *, " RBD_STREAM_KWARGS
        ", ScalarType? dtype=None, Device? device=None) -> Tensor",
        &rbd::materialize);
  m.def("segment_table(int[] numels, int[] row_offsets, int[] compartments, int[] dims, int[] streams) -> Tensor",
        &rbd::build_segment_table);  // the grouped ops' table (table.h), checked here once
  m.def("built_with_cuda() -> bool", &rbd::built_with_cuda);
  m.def("stream_version() -> int", &rbd::stream_version);
  m.def("arithmetic_version() -> int", &rbd::arithmetic_version);
  m.def("cpu_isa() -> str", &rbd::cpu_isa);
  m.def("set_cpu_isa(str name) -> ()", &rbd::set_cpu_isa);
  m.def("cpu_isas() -> str[]", &rbd::cpu_isas);
  m.def("_cuda_project_plan(int numel, int dim, int row_offset=0, str distribution=\"normal\") -> int[]",
        &rbd::cuda_project_plan_op);
}

TORCH_LIBRARY_IMPL(rbd_cuda, Autograd, m) { rbd::impl_autograd_fallbacks(m); }

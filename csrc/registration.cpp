// The only TORCH_LIBRARY(rbd_cuda, m) block: every schema lives here.
#include <Python.h>

#include <atomic>
#include <string>
#include <vector>

#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/ATen.h>

#include "common.h"
#include "grouped.h"

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

namespace {
std::atomic<CudaKernels> cuda_kernel_family{CudaKernels::V1};
}  // namespace

CudaKernels cuda_kernels() { return cuda_kernel_family.load(std::memory_order_relaxed); }

void set_cuda_kernels(const std::string& name) {
  TORCH_CHECK_VALUE(name == "v1" || name == "v2", "rbd_cuda: the CUDA kernels must be 'v1' or 'v2', got '",
                    name, "'");
  cuda_kernel_family.store(name == "v2" ? CudaKernels::V2 : CudaKernels::V1, std::memory_order_relaxed);
}

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

// The v2 CUDA project's cut of one segment (grouped.h) as [tiles, chunk, n_chunks], for the tests:
// the host arithmetic is the same in every build, the GPU is needed only to run the kernels.
std::vector<int64_t> v2_project_plan_op(int64_t numel, int64_t dim, int64_t row_offset,
                                        c10::string_view distribution) {
  const StreamArgs a = make_stream_args(numel, dim, 0, 0, 0, std::string(distribution), row_offset, 0);
  const Geometry geo = make_geometry(a, numel, dim);
  const V2ProjectPlan p = v2_project_plan(geo, numel == 0 ? 0 : geo.n_rb(), dim);
  return {p.tiles, p.chunk, p.n_chunks};
}

}  // namespace rbd

#define RBD_STREAM_KWARGS \
  "int seed, int step=0, int stream=0, str distribution=\"normal\", int row_offset=0, int col_offset=0"
// The grouped ops' segment table (csrc/grouped.h): per segment a row offset and a compartment,
// per compartment its directions and stream.
#define RBD_SEGMENT_TABLE "int[] row_offsets, int[] compartments, int[] dims, int[] streams, *, " \
  "int seed, int step=0, str distribution=\"normal\""

TORCH_LIBRARY(rbd_cuda, m) {
  m.def("project(Tensor g, int dim, *, " RBD_STREAM_KWARGS ") -> Tensor");
  m.def("expand(Tensor c, int numel, *, " RBD_STREAM_KWARGS ") -> Tensor");
  m.def("expand_(Tensor(a!) out, Tensor c, float alpha=1.0, *, " RBD_STREAM_KWARGS ") -> ()");
  m.def("materialize_(Tensor(a!) out, *, " RBD_STREAM_KWARGS ") -> ()");
  m.def("materialize(int numel, int dim, *, " RBD_STREAM_KWARGS
        ", ScalarType? dtype=None, Device? device=None) -> Tensor",
        &rbd::materialize);
  m.def("project_grouped(Tensor[] g, " RBD_SEGMENT_TABLE ") -> Tensor");
  m.def("expand_grouped_(Tensor(a!)[] out, Tensor c, float[] alphas, " RBD_SEGMENT_TABLE ") -> ()");
  m.def("philox4x32(Tensor counter, Tensor key, int rounds=10) -> Tensor");
  m.def("built_with_cuda() -> bool", &rbd::built_with_cuda);
  m.def("stream_version() -> int", &rbd::stream_version);
  m.def("cpu_isa() -> str", &rbd::cpu_isa);
  m.def("set_cpu_isa(str name) -> ()", &rbd::set_cpu_isa);
  m.def("cpu_isas() -> str[]", &rbd::cpu_isas);
  m.def("cuda_kernels() -> str", &rbd::cuda_kernels_name);
  m.def("set_cuda_kernels(str name) -> ()", &rbd::set_cuda_kernels);
  m.def("_v2_project_plan(int numel, int dim, int row_offset=0, str distribution=\"normal\") -> int[]",
        &rbd::v2_project_plan_op);
}

// Autograd for the in-place, grouped and integer ops: they have no derivatives, so they must say so
// (expand_/materialize_ refuse a leaf that requires grad outside no_grad). project and expand
// get their derivatives in rbd_cuda/ops.py (torch.library.register_autograd): each is the
// other's adjoint. The in-place ops bump their output's version counter themselves
// (mark_modified).
TORCH_LIBRARY_IMPL(rbd_cuda, Autograd, m) {
  for (const char* op : {"expand_", "materialize_", "philox4x32", "project_grouped", "expand_grouped_"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

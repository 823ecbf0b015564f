// The emulated build of the CUDA kernels: csrc/cuda's sources, host code and kernels alike,
// compiled by g++ over the SIMT emulator (cuda_emu.h) and registered as torch.ops.rbd_emu on CPU
// tensors. Built for the tests only (RBD_EMU=1, setup.py) as rbd_cuda._emu, never loaded by the
// library: the tests compare its results with the CPU ops and the reference.
#include "cuda_emu.h"

#include <Python.h>

#include <torch/library.h>

#include "../cuda/materialize.cu"
#include "../cuda/products.cu"
#include "../schema.h"

extern "C" PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace {

// The emulator's settings for the launches that follow: the schedule ("fwd", "rev", "rand"), its
// seed, the emulated SMs (the grids sized to resident blocks follow them) and the worker threads.
void configure(c10::string_view schedule, int64_t seed, int64_t sms, int64_t workers) {
  TORCH_CHECK_VALUE(sms >= 1 && workers >= 0, "rbd_emu: sms must be at least 1 and workers at least 0");
  emu::Settings& s = emu::settings();
  s.schedule = emu::parse_schedule(std::string(schedule));
  s.seed = uint64_t(seed);
  s.sms = int(sms);
  s.workers = int(workers);
}

std::tuple<std::string, int64_t, int64_t, int64_t> configuration() {
  const emu::Settings& s = emu::settings();
  return {emu::schedule_name(s.schedule), int64_t(s.seed), s.sms, s.workers};
}

int64_t launches() { return int64_t(emu::launches().load()); }

}  // namespace

TORCH_LIBRARY(rbd_emu, m) {
  rbd::define_kernel_ops(m);
  m.def("configure(str schedule, int seed, int sms, int workers) -> ()", &configure);
  m.def("configuration() -> (str, int, int, int)", &configuration);
  m.def("launches() -> int", &launches);
}

TORCH_LIBRARY_IMPL(rbd_emu, Autograd, m) { rbd::impl_autograd_fallbacks(m); }

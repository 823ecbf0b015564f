// Stand-in for torch's c10/cuda/CUDAException.h in the emulated build (csrc/emu): a launch there
// throws its own errors, and the emulated runtime calls return cudaSuccess or throw.
#pragma once

#include <stdexcept>
#include <string>

#define C10_CUDA_CHECK(expr)                                                           \
  do {                                                                                 \
    const cudaError_t emu_error = (expr);                                              \
    if (emu_error != cudaSuccess) throw std::runtime_error(std::string("emu: ") + #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

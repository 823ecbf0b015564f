// Stand-in for torch's c10/cuda/CUDAGuard.h in the emulated build (csrc/emu): one "device", the CPU.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

}  // namespace c10::cuda

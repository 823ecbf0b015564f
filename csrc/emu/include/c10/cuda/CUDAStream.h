// Stand-in for torch's c10/cuda/CUDAStream.h in the emulated build (csrc/emu): launches run to
// completion where they are made, so there is one stream and nothing to order.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline c10::DeviceIndex current_device() { return 0; }

}  // namespace c10::cuda

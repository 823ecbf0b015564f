// Device helpers shared by the CUDA kernels (products.cu, materialize.cu), and the two macros that
// let the same source build for the GPU (nvcc) and for the CPU emulator (csrc/emu, g++ with
// RBD_EMU defined; the tests run every kernel there).
#pragma once

#include <algorithm>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

// RBD_LAUNCH(kernel, grid, block, shmem, stream)(args...) is kernel<<<grid, block, shmem, stream>>>(args...);
// RBD_CUDA_IMPL(m) registers the CUDA implementations of torch.ops.rbd_cuda (the emulated build:
// of torch.ops.rbd_emu, on CPU tensors).
#if defined(RBD_EMU)
#define RBD_LAUNCH(kernel, ...) EMU_LAUNCH(kernel, __VA_ARGS__)
#define RBD_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(rbd_emu, CPU, m)
#else
#define RBD_LAUNCH(kernel, ...) kernel<<<__VA_ARGS__>>>
#define RBD_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(rbd_cuda, CUDA, m)
#endif

namespace rbd {

constexpr int kThreads = 256;
// expand: column lanes when a segment has fewer row blocks than about a GPU's resident threads.
// The emulated GPU has a few SMs (csrc/emu), so its segments split at fewer rows, which lets the
// tests reach both sides of the cut at the sizes an emulator runs.
#if defined(RBD_EMU)
constexpr int64_t kTargetThreads = 1 << 12;
#else
constexpr int64_t kTargetThreads = 1 << 20;
#endif
constexpr int kCTile = 2048;                  // expand: coefficients staged per pass (8 KB)

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// g[i0 .. i0+3] as floats, zero outside [0, n). When the host found g aligned
// (vec_ok), interior blocks take one 16-byte (fp32) or 8-byte (fp16, bf16) load.
template <typename T>
__device__ __forceinline__ void load_rows(const T* __restrict__ g, int64_t i0, int64_t n, bool vec_ok,
                                          float (&gv)[4]) {
  if (vec_ok && i0 >= 0 && i0 + 4 <= n) {
    if constexpr (sizeof(T) == 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(g + i0));
      gv[0] = v.x; gv[1] = v.y; gv[2] = v.z; gv[3] = v.w;
    } else {
      static_assert(sizeof(T) == 2, "fp32, fp16 or bf16");
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(g + i0));
      T v[4];
      memcpy(v, &raw, sizeof(raw));
#pragma unroll
      for (int r = 0; r < 4; ++r) gv[r] = to_float(v[r]);
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + r;
    gv[r] = (i >= 0 && i < n) ? to_float(g[i]) : 0.0f;
  }
}

__device__ __forceinline__ float flip_sign(float v, uint32_t word, int bit) {
  return __uint_as_float(__float_as_uint(v) ^ ((word << (31 - bit)) & 0x80000000u));
}

// Rademacher project: acc[k] += the 4 rows' g, each signed by bit k of its row's word (one
// Philox call: 4 rows x 32 columns).
__device__ __forceinline__ void add_signed_rows(float (&acc)[32], const Philox4& x, const float (&gv)[4]) {
#pragma unroll
  for (int k = 0; k < 32; ++k) {
    acc[k] += (flip_sign(gv[0], x.w[0], k) + flip_sign(gv[1], x.w[1], k)) +
              (flip_sign(gv[2], x.w[2], k) + flip_sign(gv[3], x.w[3], k));
  }
}

// Rademacher project: the block's sum of acc over its kThreads lanes, per column, in a fixed order:
// thread (w, k) sums lanes 32w..32w+31 of column k, then 32 threads sum the kThreads / 32 results
// and call write(k, total). red: kThreads * 33 floats (+1: lanes reading one column hit distinct
// banks), red2: kThreads / 32 rows of 32.
template <typename Write>
__device__ __forceinline__ void group_column_sums(const float (&acc)[32], float* red, float (*red2)[32],
                                                  Write&& write) {
#pragma unroll
  for (int k = 0; k < 32; ++k) red[threadIdx.x * 33 + k] = acc[k];
  __syncthreads();
  const int k = threadIdx.x % 32, w = threadIdx.x / 32;
  float t = 0.0f;
  for (int m = 0; m < 32; ++m) t += red[(32 * w + m) * 33 + k];
  red2[w][k] = t;
  __syncthreads();
  if (threadIdx.x < 32) {
    float total = 0.0f;
#pragma unroll
    for (int v = 0; v < kThreads / 32; ++v) total += red2[v][k];
    write(k, total);
  }
}

// Four entries of one column (rows 4b..4b+3) from one Philox block; normal by box_muller_polar.
template <Distribution D>
__device__ __forceinline__ void entries4(const Philox4& x, float (&e)[4]) {
  if constexpr (D == Distribution::Normal) {
    float r0, s0, c0, r1, s1, c1;
    box_muller_polar(x.w[0], x.w[1], r0, s0, c0);
    box_muller_polar(x.w[2], x.w[3], r1, s1, c1);
    e[0] = r0 * c0; e[1] = r0 * s0; e[2] = r1 * c1; e[3] = r1 * s1;
  } else {
    uniform4(x, e);
  }
}

#define RBD_DISPATCH_FLOAT(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline int64_t pow2_floor(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

}  // namespace rbd

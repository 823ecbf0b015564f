// CUDA expand: out += alpha * P c, a thread per 4-row block walking the columns
// (or 32-column Rademacher groups), c staged in shared memory and read as a
// broadcast. When rows are too few to fill the GPU, the columns are split over
// JS lanes whose sums are combined in a fixed order (deterministic).
#include "kernels.cuh"

namespace rbd {
namespace {

// ---- expand: out += alpha * P c -------------------------------------------------

// Block: (kThreads / JS) row-block lanes x JS column lanes; c staged in shared memory.
// Rademacher: "columns" are 32-column groups and the staged c is group-aligned.
template <Distribution D, typename T, int JS>
__global__ void __launch_bounds__(kThreads) expand_kernel(
    T* __restrict__ out, const float* __restrict__ c_padded, int64_t width, int64_t numel,
    float alpha, StreamArgs a, int64_t rb_first, int64_t rb_end, int64_t first_col) {
  constexpr int RBL = kThreads / JS;
  __shared__ __align__(16) float c_s[kCTile];
  __shared__ float red[JS > 1 ? kThreads * 4 : 1];
  const int rl = threadIdx.x % RBL, js = threadIdx.x / RBL;
  const int64_t rb = rb_first + int64_t(blockIdx.x) * RBL + rl;
  const bool active = rb < rb_end;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t t0 = 0; t0 < width; t0 += kCTile) {
    const int n = width - t0 < kCTile ? int(width - t0) : kCTile;
    __syncthreads();
    for (int t = threadIdx.x; t < n; t += kThreads) c_s[t] = c_padded[t0 + t];
    __syncthreads();
    if (!active) continue;
    // The key schedule from (key0, key1) in both loops: with precomputed round keys as parameters
    // ptxas gives the JS = 1 kernels 53-55 registers instead of 40 on sm_90 (4 blocks per SM
    // instead of 6) for at most 1 % fewer instructions (docs/performance.md 2.3).
    if constexpr (D == Distribution::Rademacher) {
      for (int q = js; q < n / 32; q += JS) {
        const Philox4 x = stream_block(uint32_t(rb), uint32_t(first_col + (t0 >> 5) + q), a.step,
                                       a.stream, a.key0, a.key1);
        const float4* cq = reinterpret_cast<const float4*>(c_s + 32 * q);
#pragma unroll
        for (int k4 = 0; k4 < 8; ++k4) {
          const float4 cv = cq[k4];
          const float ck[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
          for (int m = 0; m < 4; ++m) {
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r] += flip_sign(ck[m], x.w[r], 4 * k4 + m);
          }
        }
      }
    } else {
#pragma unroll 4
      for (int jl = js; jl < n; jl += JS) {
        const Philox4 x = stream_block(uint32_t(rb), uint32_t(first_col + t0 + jl), a.step,
                                       a.stream, a.key0, a.key1);
        float e[4];
        entries4<D>(x, e);
        const float cj = c_s[jl];
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[r] += e[r] * cj;
      }
    }
  }
  if constexpr (JS > 1) {
#pragma unroll
    for (int r = 0; r < 4; ++r) red[(js * RBL + rl) * 4 + r] = acc[r];
    __syncthreads();
    if (js != 0) return;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float t = 0.0f;
      for (int v = 0; v < JS; ++v) t += red[(v * RBL + rl) * 4 + r];
      acc[r] = t;
    }
  }
  if (!active) return;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = 4 * rb + r - a.row_offset;
    if (i >= 0 && i < numel) out[i] = static_cast<T>(static_cast<float>(out[i]) + alpha * acc[r]);
  }
}

template <Distribution D, typename T, int JS>
void launch_expand(T* out, const float* c_padded, int64_t width, int64_t numel, float alpha,
                   const StreamArgs& a, int64_t rb_first, int64_t rb_end, int64_t first_col,
                   cudaStream_t stream) {
  constexpr int RBL = kThreads / JS;
  const int64_t blocks = ceil_div(rb_end - rb_first, RBL);
  expand_kernel<D, T, JS><<<unsigned(blocks), kThreads, 0, stream>>>(
      out, c_padded, width, numel, alpha, a, rb_first, rb_end, first_col);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void expand_inplace_cuda(at::Tensor& out, const at::Tensor& c, double alpha, int64_t seed,
                         int64_t step, int64_t stream_id, c10::string_view distribution,
                         int64_t row_offset, int64_t col_offset) {
  check_out(out, "out");
  check_same_device(out, "out", c, "c");
  const at::Tensor c32 = coefficients_fp32(c);
  const int64_t dim = c32.numel(), numel = out.numel();
  const StreamArgs a = make_stream_args(numel, dim, seed, step, stream_id,
                                        std::string(distribution), row_offset, col_offset);
  mark_modified(out);
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  if (cuda_kernels() == CudaKernels::V2) {
    expand_inplace_v2(out, c32, static_cast<float>(alpha), a);
    return;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry geo = make_geometry(a, numel, dim);
  const int64_t rb_first = geo.rb_first, rb_end = geo.rb_end;
  // Coefficients padded with zeros to whole groups (Rademacher: aligned to 32-column groups).
  const int64_t width = geo.padded_width(1);
  at::Tensor c_padded = c32;
  if (geo.rademacher) {
    c_padded = at::zeros({width}, c32.options());
    c_padded.narrow(0, geo.shift, dim).copy_(c32);
  }
  const int64_t first_col = geo.first_col;
  const int64_t n_rb = geo.n_rb(), work_cols = geo.n_cols;
  const int64_t js = std::min<int64_t>({32, pow2_floor(std::max<int64_t>(1, kTargetThreads / n_rb)),
                                        pow2_floor(work_cols)});
  const float alpha_f = static_cast<float>(alpha);
  RBD_DISPATCH_FLOAT(out.scalar_type(), "rbd_cuda::expand_", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* cp = c_padded.data_ptr<float>();
    with_distribution(a.dist, [&](auto tag) {
      constexpr Distribution D = decltype(tag)::value;
      if (js >= 32) {
        launch_expand<D, scalar_t, 32>(op, cp, width, numel, alpha_f, a, rb_first, rb_end, first_col, stream);
      } else if (js >= 8) {
        launch_expand<D, scalar_t, 8>(op, cp, width, numel, alpha_f, a, rb_first, rb_end, first_col, stream);
      } else if (js >= 2) {
        launch_expand<D, scalar_t, 2>(op, cp, width, numel, alpha_f, a, rb_first, rb_end, first_col, stream);
      } else {
        launch_expand<D, scalar_t, 1>(op, cp, width, numel, alpha_f, a, rb_first, rb_end, first_col, stream);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rbd_cuda, CUDA, m) {
  m.impl("expand", &expand_into_zeros<&expand_inplace_cuda>);
  m.impl("expand_", &expand_inplace_cuda);
}

}  // namespace rbd

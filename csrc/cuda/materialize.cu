// CUDA materialize_ (tests and debugging) and the raw Philox op (known-answer tests). materialize
// generates through the products' entry functions (entries4, kernels.cuh), so it writes the very
// entries project and expand_ use.
#include "kernels.cuh"

namespace rbd {
namespace {

// ---- materialize and the raw generator ------------------------------------------

template <Distribution D, typename T>
__global__ void materialize_kernel(T* __restrict__ out, int64_t numel, int64_t dim, StreamArgs a,
                                   int64_t rb_first, int64_t n_rb, int64_t n_cols, int64_t first_col,
                                   int64_t shift) {
  const int64_t total = n_rb * n_cols;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rb = rb_first + idx / n_cols;
    const int64_t cidx = idx % n_cols;
    if constexpr (D == Distribution::Rademacher) {
      const Philox4 x = stream_block(uint32_t(rb), uint32_t(first_col + cidx), a.step, a.stream,
                                     a.key0, a.key1);
      for (int r = 0; r < 4; ++r) {
        const int64_t i = 4 * rb + r - a.row_offset;
        if (i < 0 || i >= numel) continue;
        for (int k = 0; k < 32; ++k) {
          const int64_t j = 32 * cidx + k - shift;
          if (j >= 0 && j < dim) out[i * dim + j] = static_cast<T>(rademacher(x.w[r], k));
        }
      }
    } else {
      const Philox4 x = stream_block(uint32_t(rb), uint32_t(first_col + cidx), a.step, a.stream,
                                     a.key0, a.key1);
      float e[4];
      entries4<D>(x, e);
      for (int r = 0; r < 4; ++r) {
        const int64_t i = 4 * rb + r - a.row_offset;
        if (i >= 0 && i < numel) out[i * dim + cidx] = static_cast<T>(e[r]);
      }
    }
  }
}

__global__ void philox_kernel(const int64_t* __restrict__ counter, const int64_t* __restrict__ key,
                              int64_t n, bool seven, int64_t* __restrict__ out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int64_t* c4 = counter + 4 * idx;
  const int64_t* k2 = key + 2 * idx;
  // The round-key form (rbd/philox.h): the known-answer tests check it on the device too.
  const uint32_t k0 = uint32_t(k2[0]), k1 = uint32_t(k2[1]);
  const Philox4 x = seven ? philox4x32<7>(uint32_t(c4[0]), uint32_t(c4[1]), uint32_t(c4[2]),
                                          uint32_t(c4[3]), round_keys<7>(k0, k1))
                          : philox4x32<10>(uint32_t(c4[0]), uint32_t(c4[1]), uint32_t(c4[2]),
                                           uint32_t(c4[3]), round_keys<10>(k0, k1));
  for (int w = 0; w < 4; ++w) out[4 * idx + w] = int64_t(x.w[w]);
}

void materialize_inplace_cuda(at::Tensor& out, int64_t seed, int64_t step, int64_t stream_id,
                              c10::string_view distribution, int64_t row_offset,
                              int64_t col_offset) {
  check_matrix_out(out);
  const auto st = out.scalar_type();
  const int64_t numel = out.size(0), dim = out.size(1);
  const StreamArgs a = make_stream_args(numel, dim, seed, step, stream_id,
                                        std::string(distribution), row_offset, col_offset);
  mark_modified(out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry geo = make_geometry(a, numel, dim);
  const int64_t rb_first = geo.rb_first, n_rb = geo.n_rb(), n_cols = geo.n_cols;
  const int64_t first_col = geo.first_col, shift = geo.shift;
  const int64_t blocks = std::min<int64_t>(ceil_div(n_rb * n_cols, kThreads), 65536);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "rbd_cuda::materialize_", [&] {
    with_distribution(a.dist, [&](auto tag) {
      const auto kernel = materialize_kernel<decltype(tag)::value, scalar_t>;
      RBD_LAUNCH(kernel, unsigned(blocks), kThreads, 0, stream)(out.data_ptr<scalar_t>(), numel, dim, a, rb_first,
                                                               n_rb, n_cols, first_col, shift);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor philox_cuda(const at::Tensor& counter, const at::Tensor& key, int64_t rounds) {
  check_philox_args(counter, key, rounds);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor ctr = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(ctr);
  const int64_t n = ctr.size(0);
  if (n == 0) return out;
  RBD_LAUNCH(philox_kernel, unsigned(ceil_div(n, kThreads)), kThreads, 0, c10::cuda::getCurrentCUDAStream())(
      ctr.data_ptr<int64_t>(), k.data_ptr<int64_t>(), n, rounds == 7, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

RBD_CUDA_IMPL(m) {
  m.impl("materialize_", &materialize_inplace_cuda);
  m.impl("philox4x32", &philox_cuda);
}

}  // namespace rbd

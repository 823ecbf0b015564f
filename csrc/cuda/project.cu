// CUDA project: c = P^T g with every entry of P generated in registers.
//
//  * normal/uniform: a thread owns one column j and walks 4-row blocks; one
//    Philox call gives its 4 entries. Warps share the row block (g loads are
//    broadcasts) and differ in the column (the key stays warp-uniform).
//  * rademacher: a thread owns a 32-column group and walks row blocks; one
//    Philox call gives 4 rows x 32 columns of signs.
// Each block writes per-chunk partial sums; a second kernel reduces them in an
// order fixed by the problem's shape (no float atomics): the result is
// bit-identical run after run.
#include "kernels.cuh"

namespace rbd {
namespace {

// ---- project: c = P^T g ------------------------------------------------------

// Block: TJ columns x (kThreads / TJ) row lanes. Writes partial[chunk, j].
template <Distribution D, typename T, int TJ>
__global__ void __launch_bounds__(kThreads) project_dense_kernel(
    const T* __restrict__ g, int64_t numel, int64_t dim, StreamArgs a, Launch L, bool vec_ok,
    float* __restrict__ partial) {
  constexpr int RB = kThreads / TJ;
  __shared__ float s[RB * TJ];
  const int jj = threadIdx.x % TJ, rr = threadIdx.x / TJ;
  const int64_t j = int64_t(blockIdx.x) * TJ + jj;
  const uint32_t col = uint32_t(a.col_offset + j);
  const int64_t rb_lo = L.rb_first + int64_t(blockIdx.y) * L.chunk;
  const int64_t rb_hi = min(L.rb_end, rb_lo + L.chunk);
  float acc = 0.0f;
  if (j < dim) {
#pragma unroll 2
    for (int64_t rb = rb_lo + rr; rb < rb_hi; rb += RB) {
      float gv[4];
      load_rows(g, 4 * rb - a.row_offset, numel, vec_ok, gv);
      // The key schedule from (key0, key1), not precomputed round keys: ptxas hoists it out of
      // this loop into registers, while it reloads round keys passed as parameters every iteration
      // (sm_90 SASS, fp32 normal, loop of 2 calls: 277 instructions against 288).
      const Philox4 x = stream_block(uint32_t(rb), col, a.step, a.stream, a.key0, a.key1);
      float e[4];
      entries4<D>(x, e);
      acc += e[0] * gv[0] + e[1] * gv[1] + e[2] * gv[2] + e[3] * gv[3];
    }
  }
  s[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int stride = RB / 2; stride > 0; stride /= 2) {
    if (rr < stride) s[threadIdx.x] += s[threadIdx.x + stride * TJ];
    __syncthreads();
  }
  if (rr == 0 && j < dim) partial[int64_t(blockIdx.y) * dim + j] = s[jj];
}

// Block: kThreads row lanes on one 32-column group. Writes partial[chunk, j]. The round keys come
// precomputed (rk): deriving them, ptxas re-adds the key schedule in the loop and takes 78
// registers instead of 61 on sm_90 (3 blocks per SM instead of 4).
template <typename T>
__global__ void __launch_bounds__(kThreads) project_rademacher_kernel(
    const T* __restrict__ g, int64_t numel, int64_t dim, StreamArgs a, StreamKeys rk, Launch L, bool vec_ok,
    int64_t first_group, int64_t shift, float* __restrict__ partial) {
  __shared__ float s[kThreads * 33];
  __shared__ float s2[kThreads / 32][32];
  const int64_t q = blockIdx.x;
  const uint32_t group = uint32_t(first_group + q);
  const int64_t rb_lo = L.rb_first + int64_t(blockIdx.y) * L.chunk;
  const int64_t rb_hi = min(L.rb_end, rb_lo + L.chunk);
  float acc[32];
#pragma unroll
  for (int k = 0; k < 32; ++k) acc[k] = 0.0f;
  for (int64_t rb = rb_lo + threadIdx.x; rb < rb_hi; rb += kThreads) {
    float gv[4];
    load_rows(g, 4 * rb - a.row_offset, numel, vec_ok, gv);
    const Philox4 x = stream_block(uint32_t(rb), group, a.step, a.stream, rk);
    add_signed_rows(acc, x, gv);
  }
  group_column_sums(acc, s, s2, [&](int k, float total) {
    const int64_t j = 32 * q + k - shift;
    if (j >= 0 && j < dim) partial[int64_t(blockIdx.y) * dim + j] = total;
  });
}

// c[j] = sum over chunks of partial[chunk, j], one warp per column, fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const float* __restrict__ partial,
                                                                   int64_t n_chunks, int64_t dim,
                                                                   T* __restrict__ c) {
  const int lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (j >= dim) return;
  float t = 0.0f;
  for (int64_t ch = lane; ch < n_chunks; ch += 32) t += partial[ch * dim + j];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) t += __shfl_down_sync(0xffffffffu, t, off);
  if (lane == 0) c[j] = static_cast<T>(t);
}

template <Distribution D, typename T, int TJ>
void launch_project_dense(const T* g, int64_t numel, int64_t dim, const StreamArgs& a,
                          int64_t rb_first, int64_t rb_end, bool vec_ok, at::Tensor& partial,
                          const at::TensorOptions& opts, cudaStream_t stream, int64_t& n_chunks) {
  constexpr int RB = kThreads / TJ;
  const int64_t tiles = ceil_div(dim, TJ);
  const int64_t n_rb = rb_end - rb_first;
  n_chunks = std::clamp<int64_t>(ceil_div(kTargetBlocks, tiles), 1, ceil_div(n_rb, RB));
  const Launch L{rb_first, rb_end, n_chunks, ceil_div(n_rb, n_chunks)};
  partial = at::empty({n_chunks, dim}, opts);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(n_chunks));
  project_dense_kernel<D, T, TJ><<<grid, kThreads, 0, stream>>>(g, numel, dim, a, L, vec_ok,
                                                               partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor project_cuda(const at::Tensor& g, int64_t dim, int64_t seed, int64_t step,
                        int64_t stream_id, c10::string_view distribution, int64_t row_offset,
                        int64_t col_offset) {
  check_float_input(g, "g");
  const StreamArgs a = make_stream_args(g.numel(), dim, seed, step, stream_id,
                                        std::string(distribution), row_offset, col_offset);
  const c10::cuda::CUDAGuard guard(g.device());
  if (g.numel() == 0) return at::zeros({dim}, g.options());
  if (cuda_kernels() == CudaKernels::V2) return project_v2(g, a, dim);
  const at::Tensor gc = g.contiguous();
  at::Tensor c = at::empty({dim}, g.options());
  const int64_t numel = gc.numel();
  const Geometry geo = make_geometry(a, numel, dim);
  const int64_t rb_first = geo.rb_first, rb_end = geo.rb_end;
  const auto opts = g.options().dtype(at::kFloat);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Row blocks line up with g's 4-element vectors only when the offset is a multiple of 4.
  const bool vec_ok = (row_offset % 4 == 0) &&
                      (reinterpret_cast<uintptr_t>(gc.data_ptr()) % (4 * gc.element_size()) == 0);
  RBD_DISPATCH_FLOAT(g.scalar_type(), "rbd_cuda::project", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    at::Tensor partial;
    int64_t n_chunks = 0;
    with_distribution(a.dist, [&](auto tag) {
      constexpr Distribution D = decltype(tag)::value;
      if constexpr (D == Distribution::Rademacher) {
        const int64_t groups = geo.n_cols;
        n_chunks = std::clamp<int64_t>(ceil_div(kTargetBlocks, groups), 1, ceil_div(geo.n_rb(), kThreads));
        const Launch L{rb_first, rb_end, n_chunks, ceil_div(geo.n_rb(), n_chunks)};
        partial = at::empty({n_chunks, dim}, opts);
        const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(n_chunks));
        project_rademacher_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            gp, numel, dim, a, stream_keys(a.key0, a.key1), L, vec_ok, geo.first_col, geo.shift,
            partial.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (dim <= 2) {
        launch_project_dense<D, scalar_t, 2>(gp, numel, dim, a, rb_first, rb_end, vec_ok, partial,
                                             opts, stream, n_chunks);
      } else if (dim <= 8) {
        launch_project_dense<D, scalar_t, 8>(gp, numel, dim, a, rb_first, rb_end, vec_ok, partial,
                                             opts, stream, n_chunks);
      } else {
        launch_project_dense<D, scalar_t, 32>(gp, numel, dim, a, rb_first, rb_end, vec_ok, partial,
                                              opts, stream, n_chunks);
      }
    });
    const unsigned blocks = unsigned(ceil_div(dim, kThreads / 32));
    reduce_partials_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        partial.data_ptr<float>(), n_chunks, dim, c.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c;
}

}  // namespace

TORCH_LIBRARY_IMPL(rbd_cuda, CUDA, m) {
  m.impl("project", &project_cuda);
}

}  // namespace rbd

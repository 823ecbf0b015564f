// The CUDA products: project and expand_ over a table of segments in one launch (the single ops
// are tables of one segment), for every distribution and input dtype.
//
//  * project, normal/uniform: a work item is a column tile x a row chunk of one segment. Its row
//    blocks split into at most two edge blocks (guarded loads) and an interior walked with a
//    pointer and a 32-bit counter (no per-row bounds or alignment test); Box–Muller in polar form
//    (box_muller_polar in rbd/philox.h) and z0 g0 + z1 g1 = r (c g0 + s g1); the last column tile
//    of a d % 32 != 0 request is as narrow as its columns (4, 8 or 16 lanes) and gives its threads
//    to more row lanes instead of idling them. Rademacher: 256 row lanes on one 32-column group,
//    one Philox call signing 4 rows x 32 columns.
//  * project writes per-chunk partial sums; reduce_kernel adds them per coefficient in a fixed
//    order (no float atomics), so results are deterministic, and each segment is cut on its own
//    (cuda_project_plan, grouped.h), so a table of many segments gives each segment the bits a
//    table of one gives it.
//  * expand, normal/uniform: four columns per step from one 16-byte shared load; Rademacher by a
//    table of signed 4-column sums in shared memory (one lookup per 4 entries instead of 4 sign
//    flips); when rows are too few to fill the GPU, column lanes whose sums are added in lane order.
//  * every kernel loops over its work items on a grid sized to the blocks the GPU holds at once.
//
// The same source runs on the CPU through the emulator (csrc/emu): the tests run every kernel there.
#include <cstring>

#include "../grouped.h"
#include "kernels.cuh"

namespace rbd {
namespace {

constexpr int kTile = int(kProjectTile);   // project: columns per tile (its cut: cuda_project_plan, grouped.h)
constexpr int kGroupsPerStage = 16;        // Rademacher expand: column groups per shared table
constexpr int kLut = kGroupsPerStage * 8 * 16;  // its floats: groups x nibbles x 16 sign patterns
static_assert(kLut == kCTile, "the Rademacher table reuses the coefficient stage");

struct Keys {
  StreamKeys rk;          // the round keys, computed once per launch
  uint32_t key0, key1;    // the key they come from (project_rademacher_kernel derives its own)
  uint32_t step;
};

struct ProjectSeg {
  const void* g;
  int64_t numel, row_offset;
  int64_t rb_first, n_rb;           // Geometry
  int64_t interior_first, interior_end;
  int64_t partial;                  // partial sums at partial[this + chunk * dim + j]
  uint32_t chunk, n_chunks;         // row blocks per item (<= 2^30), items per column tile (or group)
  uint32_t dim, n_cols, first_col, shift, stream;
  uint32_t item_begin;              // first work item of the segment in the launch
  uint32_t vec;                     // g aligned for one 4-row vector load per row block
};

struct ExpandSeg {
  void* out;
  const float* c;                   // the compartment's dim coefficients (fp32)
  int64_t numel, row_offset;
  int64_t rb_first, n_rb;
  float alpha;
  uint32_t dim, n_cols, first_col, shift, stream;
  uint32_t js, log_js;              // column lanes per row block (a power of 2 <= 32)
  uint32_t item_begin;
};

// The segment that owns work item `item` (item_begin ascending, first 0).
template <typename Seg>
__device__ __forceinline__ int find_segment(const Seg* table, int n, uint32_t item) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid].item_begin <= item) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// g[i .. i+3] for a row block with all four rows inside g: one vector load when aligned.
template <typename T, bool Vec>
__device__ __forceinline__ void load4(const T* __restrict__ p, float (&gv)[4]) {
  if constexpr (Vec && sizeof(T) == 4) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    gv[0] = v.x; gv[1] = v.y; gv[2] = v.z; gv[3] = v.w;
  } else if constexpr (Vec) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    T v[4];
    memcpy(v, &raw, sizeof(raw));
#pragma unroll
    for (int r = 0; r < 4; ++r) gv[r] = to_float(v[r]);
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r) gv[r] = to_float(__ldg(p + r));
  }
}

template <Distribution D>
__device__ __forceinline__ float dot4(const Philox4& x, const float (&gv)[4], float acc) {
  if constexpr (D == Distribution::Normal) {
    float r0, s0, c0, r1, s1, c1;
    box_muller_polar(x.w[0], x.w[1], r0, s0, c0);
    box_muller_polar(x.w[2], x.w[3], r1, s1, c1);
    acc = fmaf(r0, fmaf(c0, gv[0], s0 * gv[1]), acc);
    return fmaf(r1, fmaf(c1, gv[2], s1 * gv[3]), acc);
  } else {
    float e[4];
    uniform4(x, e);
#pragma unroll
    for (int r = 0; r < 4; ++r) acc = fmaf(e[r], gv[r], acc);
    return acc;
  }
}

// Calls body(rb, gv) for row blocks rb = lo + lane, lo + lane + lanes, ... < hi: first the edge
// blocks (outside [interior_first, interior_end), at most one at each end of the segment) with
// guarded loads, then the interior with load4, where only the pointer and a 32-bit count live.
template <typename T, typename Body>
__device__ __forceinline__ void walk_rows(const ProjectSeg& s, int64_t lo, int64_t hi, uint32_t lane,
                                          uint32_t lanes, Body&& body) {
  const T* g = static_cast<const T*>(s.g);
  const int64_t a = min(max(s.interior_first, lo), hi), b = max(min(s.interior_end, hi), a);
  const auto edge = [&](int64_t from, int64_t to) {
    for (int64_t rb = from + lane; rb < to; rb += lanes) {
      float gv[4];
      load_rows(g, 4 * rb - s.row_offset, s.numel, false, gv);
      body(uint32_t(rb), gv);
    }
  };
  edge(lo, a);
  edge(b, hi);
  const uint32_t n = uint32_t(b - a), first = uint32_t(a);
  const T* p = g + (4 * (a + lane) - s.row_offset);
  const auto interior = [&](auto vec) {
#pragma unroll 2
    for (uint32_t t = lane; t < n; t += lanes, p += 4 * lanes) {
      float gv[4];
      load4<T, decltype(vec)::value>(p, gv);
      body(first + t, gv);
    }
  };
  if (s.vec) interior(std::true_type{}); else interior(std::false_type{});
}

// ---- project -----------------------------------------------------------------------------

// Item (tile, chunk) of a segment: kTile columns (fewer in the last tile) x one row chunk.
template <Distribution D, typename T>
__global__ void __launch_bounds__(kThreads, 4) project_dense_kernel(const ProjectSeg* __restrict__ table, int n_segs,
                                                                 uint32_t items, Keys k, float* __restrict__ partial) {
  __shared__ float red[kThreads];
  for (uint32_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ProjectSeg& s = table[find_segment(table, n_segs, item)];  // fields read where used: fewer registers
    const uint32_t local = item - s.item_begin;
    const uint32_t tile = local / s.n_chunks, ch = local % s.n_chunks;
    const uint32_t cols = min(uint32_t(kTile), s.dim - kTile * tile);
    const int log_tj = cols > 16 ? 5 : cols > 8 ? 4 : cols > 4 ? 3 : 2;
    const uint32_t jj = threadIdx.x & ((1u << log_tj) - 1), rr = threadIdx.x >> log_tj;
    const uint32_t lanes = kThreads >> log_tj;
    const uint32_t j = kTile * tile + jj;
    const int64_t lo = s.rb_first + int64_t(ch) * s.chunk;
    const int64_t hi = min(s.rb_first + s.n_rb, lo + s.chunk);
    float acc = 0.0f;
    if (jj < cols) {
      const uint32_t col = s.first_col + j;
      walk_rows<T>(s, lo, hi, rr, lanes, [&](uint32_t rb, const float (&gv)[4]) {
        acc = dot4<D>(stream_block(rb, col, k.step, s.stream, k.rk), gv, acc);
      });
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t half = lanes >> 1; half > 0; half >>= 1) {
      if (rr < half) red[threadIdx.x] += red[threadIdx.x + (half << log_tj)];
      __syncthreads();
    }
    if (rr == 0 && jj < cols) partial[s.partial + int64_t(ch) * s.dim + j] = red[jj];
    __syncthreads();  // red is reused by the next item
  }
}

// Item (group, chunk): kThreads row lanes on one 32-column group.
template <typename T>
__global__ void __launch_bounds__(kThreads) project_rademacher_kernel(const ProjectSeg* __restrict__ table,
                                                                      int n_segs, uint32_t items, Keys k,
                                                                      float* __restrict__ partial) {
  __shared__ float red[kThreads * 33];
  __shared__ float red2[kThreads / 32][32];
  for (uint32_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ProjectSeg& s = table[find_segment(table, n_segs, item)];  // fields read where used: fewer registers
    const uint32_t local = item - s.item_begin;
    const uint32_t q = local / s.n_chunks, ch = local % s.n_chunks;
    const int64_t lo = s.rb_first + int64_t(ch) * s.chunk;
    const int64_t hi = min(s.rb_first + s.n_rb, lo + s.chunk);
    const uint32_t group = s.first_col + q;
    float acc[32];
#pragma unroll
    for (int b = 0; b < 32; ++b) acc[b] = 0.0f;
    walk_rows<T>(s, lo, hi, threadIdx.x, kThreads, [&](uint32_t rb, const float (&gv)[4]) {
      // The key schedule derived here: with the round keys from parameters ptxas gives this kernel
      // 94 registers instead of 80 on sm_90 (2 blocks per SM instead of 3) for under 1 % fewer
      // instructions.
      add_signed_rows(acc, stream_block(rb, group, k.step, s.stream, k.key0, k.key1), gv);
    });
    group_column_sums(acc, red, red2, [&](int b, float total) {
      const int64_t j = 32 * int64_t(q) + b - s.shift;
      if (j >= 0 && j < s.dim) partial[s.partial + int64_t(ch) * s.dim + j] = total;
    });
    __syncthreads();  // red, red2 are reused by the next item
  }
}

// One warp per coefficient: the sum over chunks of each segment of its compartment (in table
// order, which keeps the segments' list order), segment sums added one after the other.
struct ReduceComp {
  int64_t out;  // first coefficient
  uint32_t dim, first_seg, n_segs;
};

template <typename TOut>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const ProjectSeg* __restrict__ segs,
                                                          const ReduceComp* __restrict__ comps, int n_comps,
                                                          const float* __restrict__ partial, int64_t total,
                                                          TOut* __restrict__ c) {
  const int lane = threadIdx.x % 32;
  const int64_t col = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (col >= total) return;
  int lo = 0, hi = n_comps - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (comps[mid].out <= col) lo = mid; else hi = mid - 1;
  }
  const ReduceComp comp = comps[lo];
  const int64_t j = col - comp.out;
  float sum = 0.0f;
  for (uint32_t q = 0; q < comp.n_segs; ++q) {
    const ProjectSeg& s = segs[comp.first_seg + q];
    float t = 0.0f;
    for (int64_t ch = lane; ch < s.n_chunks; ch += 32) t += partial[s.partial + ch * s.dim + j];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) t += __shfl_down_sync(0xffffffffu, t, off);
    sum = q == 0 ? t : sum + t;
  }
  if (lane == 0) c[col] = static_cast<TOut>(sum);
}


// ---- expand_ -------------------------------------------------------------------------------

// Blocks per SM the register budget is set for: the most without spills (ptxas -v, sm_80/sm_90).
constexpr int kExpandMinBlocks[3] = {5, 4, 5};  // normal, uniform, rademacher

// Item: kThreads / js row blocks x js column lanes of one segment.
template <Distribution D, typename T>
__global__ void __launch_bounds__(kThreads, kExpandMinBlocks[int(D)]) expand_kernel(const ExpandSeg* __restrict__ table, int n_segs,
                                                          uint32_t items, Keys k) {
  static_assert(kThreads == 256, "row lanes are kThreads >> log_js");
  __shared__ __align__(16) float stage[kCTile];  // coefficients, or the Rademacher sum table
  __shared__ float red[kThreads * 4];
  for (uint32_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ExpandSeg& s = table[find_segment(table, n_segs, item)];  // fields read where used: fewer registers
    const uint32_t log_rbl = 8 - s.log_js, rbl = 1u << log_rbl;
    const uint32_t rl = threadIdx.x & (rbl - 1), js = threadIdx.x >> log_rbl;
    const int64_t rb = s.rb_first + int64_t(item - s.item_begin) * rbl + rl;
    const bool active = rb < s.rb_first + s.n_rb;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (D == Distribution::Rademacher) {
      for (uint32_t q0 = 0; q0 < s.n_cols; q0 += kGroupsPerStage) {
        const uint32_t nq = min(uint32_t(kGroupsPerStage), s.n_cols - q0);
        __syncthreads();
        // stage[16 (8 q + m) + p]: columns 4m .. 4m+3 of group q0 + q, signed by the bits of p
        // (bit set: -1, as rademacher()), summed in column order.
        for (uint32_t e = threadIdx.x; e < nq * 128; e += kThreads) {
          const int64_t base = 32 * int64_t(q0) + 4 * (e >> 4) - s.shift;  // coefficient of bit 0
          float v = 0.0f;
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const int64_t src = base + b;
            const float cv = (src >= 0 && src < s.dim) ? s.c[src] : 0.0f;
            const float term = ((e >> b) & 1u) ? -cv : cv;
            v = b == 0 ? term : v + term;
          }
          stage[e] = v;
        }
        __syncthreads();
        if (!active) continue;
        for (uint32_t q = js; q < nq; q += s.js) {
          const Philox4 x = stream_block(uint32_t(rb), s.first_col + q0 + q, k.step, s.stream, k.rk);
          const float* tab = stage + 128 * q;
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const uint32_t w = x.w[r];
            float part = tab[w & 15u];
#pragma unroll
            for (int m = 1; m < 8; ++m) part += tab[16 * m + ((w >> (4 * m)) & 15u)];
            acc[r] += part;
          }
        }
      }
    } else {
      for (uint32_t t0 = 0; t0 < s.n_cols; t0 += kCTile) {
        const uint32_t n = min(uint32_t(kCTile), s.n_cols - t0);
        __syncthreads();
        for (uint32_t t = threadIdx.x; t < n; t += kThreads) stage[t] = s.c[t0 + t];
        __syncthreads();
        if (!active) continue;
        const uint32_t col0 = s.first_col + t0;
        const float4* stage4 = reinterpret_cast<const float4*>(stage);
        const uint32_t quads = n >> 2;
#pragma unroll 1
        for (uint32_t q = js; q < quads; q += s.js) {
          const float4 cv = stage4[q];
          const float cq[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            float e[4];
            entries4<D>(stream_block(uint32_t(rb), col0 + 4 * q + m, k.step, s.stream, k.rk), e);
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r] = fmaf(e[r], cq[m], acc[r]);
          }
        }
        for (uint32_t jl = 4 * quads + js; jl < n; jl += s.js) {
          float e[4];
          entries4<D>(stream_block(uint32_t(rb), col0 + jl, k.step, s.stream, k.rk), e);
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[r] = fmaf(e[r], stage[jl], acc[r]);
        }
      }
    }
    if (s.js > 1) {  // column lanes 1.. hand their sums to lane 0, added in lane order
      __syncthreads();
#pragma unroll
      for (int r = 0; r < 4; ++r) red[threadIdx.x * 4 + r] = acc[r];
      __syncthreads();
#pragma unroll 1
      for (uint32_t v = 1; v < s.js; ++v) {
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[r] += red[(v * rbl + rl) * 4 + r];
      }
    }
    if (!active || js != 0) continue;
    T* out = static_cast<T*>(s.out);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = 4 * rb + r - s.row_offset;
      if (i >= 0 && i < s.numel) out[i] = static_cast<T>(static_cast<float>(out[i]) + s.alpha * acc[r]);
    }
  }
}

// ---- host side -----------------------------------------------------------------------------

// Blocks of `kernel` (kThreads each) the current GPU holds at once: the grid of a launch whose
// blocks loop over its items, so no partial last wave.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return int64_t(std::max(per_sm, 1)) * sms;
}

unsigned grid_for(int64_t items, int64_t resident) { return unsigned(std::min(items, resident)); }

// The launch tables travel to the device in one pinned, stream-ordered copy (no kernel launch); in
// the emulated build the "device" is the CPU and the staging tensor is the table. They are made per
// call from the segment table (read on the host, checked when it was built) because they hold the
// call's data pointers: a backward pass hands the optimizer new gradient tensors every step.
at::Tensor upload(const std::vector<std::pair<const void*, size_t>>& parts, at::Device device,
                  std::vector<size_t>& at) {
  size_t bytes = 0;
  for (const auto& p : parts) {
    at.push_back(bytes);
    bytes += (p.second + 15) & ~size_t(15);
  }
  at::Tensor host = at::empty({int64_t(std::max<size_t>(bytes, 1))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(device.is_cuda()));
  for (size_t q = 0; q < parts.size(); ++q) {
    std::memcpy(host.data_ptr<uint8_t>() + at[q], parts[q].first, parts[q].second);
  }
  return host.to(device, /*non_blocking=*/true);
}

Keys keys_of(const StreamArgs& a) { return Keys{stream_keys(a.key0, a.key1), a.key0, a.key1, a.step}; }

// c (length tab.total(), dtype out_dtype) for the segments g of tab (one dtype, one device).
at::Tensor project(at::TensorList g, const SegmentTable& tab, const StreamArgs& shared, at::ScalarType out_dtype) {
  std::vector<int64_t> order(size_t(tab.n_segs));
  for (int64_t s = 0; s < tab.n_segs; ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return tab.comp[x] < tab.comp[y]; });
  const Distribution dist = shared.dist;
  std::vector<at::Tensor> gc;
  std::vector<ProjectSeg> segs;
  std::vector<ReduceComp> comps(size_t(tab.n_comps));
  for (int64_t k = 0; k < tab.n_comps; ++k) comps[k] = ReduceComp{tab.offset[k], uint32_t(tab.dim[k]), 0, 0};
  int64_t items = 0, partial = 0;
  for (const int64_t s : order) {
    const StreamArgs a = tab.args(shared, s);
    const int64_t k = tab.comp[s], dim = tab.dim[k];
    TORCH_CHECK_VALUE(dim < (int64_t(1) << 31), "rbd_cuda: dim must be below 2**31 with the CUDA kernels, got ",
                      decimal(dim));
    gc.push_back(g[s].contiguous());
    const at::Tensor& t = gc.back();
    const Geometry geo = make_geometry(a, t.numel(), dim);
    ProjectSeg p{};
    p.g = t.data_ptr();
    p.numel = t.numel();
    p.row_offset = a.row_offset;
    p.rb_first = geo.rb_first;
    p.n_rb = t.numel() == 0 ? 0 : geo.n_rb();
    p.interior_first = geo.interior_first(a.row_offset);
    p.interior_end = geo.interior_end(a.row_offset, t.numel());
    p.dim = uint32_t(dim);
    p.n_cols = uint32_t(geo.n_cols);
    p.first_col = uint32_t(geo.first_col);
    p.shift = uint32_t(geo.shift);
    p.stream = a.stream;
    p.vec = a.row_offset % 4 == 0 && reinterpret_cast<uintptr_t>(p.g) % (4 * t.element_size()) == 0;
    const ProjectPlan plan = cuda_project_plan(geo, p.n_rb, dim);
    p.chunk = uint32_t(plan.chunk);
    p.n_chunks = uint32_t(plan.n_chunks);
    p.item_begin = uint32_t(items);
    p.partial = partial;
    items += plan.tiles * plan.n_chunks;
    partial += plan.n_chunks * dim;
    TORCH_CHECK(items < (int64_t(1) << 32), "rbd_cuda: too many work items in one project launch");
    if (comps[k].n_segs++ == 0) comps[k].first_seg = uint32_t(segs.size());
    segs.push_back(p);
  }
  std::vector<size_t> at_;
  const at::Tensor blob = upload({{segs.data(), segs.size() * sizeof(ProjectSeg)},
                                  {comps.data(), comps.size() * sizeof(ReduceComp)}},
                                 g[0].device(), at_);
  const auto* table = reinterpret_cast<const ProjectSeg*>(blob.data_ptr<uint8_t>() + at_[0]);
  const auto* ctable = reinterpret_cast<const ReduceComp*>(blob.data_ptr<uint8_t>() + at_[1]);
  const at::Tensor part = at::empty({std::max<int64_t>(partial, 1)}, g[0].options().dtype(at::kFloat));
  const Keys keys = keys_of(shared);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int n_segs = int(segs.size());
  if (items > 0) {
    RBD_DISPATCH_FLOAT(g[0].scalar_type(), "rbd_cuda::project", [&] {
      with_distribution(dist, [&](auto tag) {
        constexpr Distribution D = decltype(tag)::value;
        if constexpr (D == Distribution::Rademacher) {
          const auto kernel = project_rademacher_kernel<scalar_t>;
          RBD_LAUNCH(kernel, grid_for(items, resident_blocks(kernel)), kThreads, 0, stream)(
              table, n_segs, uint32_t(items), keys, part.data_ptr<float>());
        } else {
          const auto kernel = project_dense_kernel<D, scalar_t>;
          RBD_LAUNCH(kernel, grid_for(items, resident_blocks(kernel)), kThreads, 0, stream)(
              table, n_segs, uint32_t(items), keys, part.data_ptr<float>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  const int64_t total = tab.total();
  at::Tensor c = at::empty({total}, g[0].options().dtype(out_dtype));
  const unsigned blocks = unsigned(ceil_div(total, kThreads / 32));
  AT_DISPATCH_SWITCH(out_dtype, "rbd_cuda::project (reduce)",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       RBD_LAUNCH(reduce_kernel<scalar_t>, blocks, kThreads, 0, stream)(
                           table, ctable, int(tab.n_comps), part.data_ptr<float>(), total, c.data_ptr<scalar_t>());
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       RBD_LAUNCH(reduce_kernel<scalar_t>, blocks, kThreads, 0, stream)(
                           table, ctable, int(tab.n_comps), part.data_ptr<float>(), total, c.data_ptr<scalar_t>());
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       RBD_LAUNCH(reduce_kernel<scalar_t>, blocks, kThreads, 0, stream)(
                           table, ctable, int(tab.n_comps), part.data_ptr<float>(), total, c.data_ptr<scalar_t>());
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

// out[s] += alphas[s] P_k c32[offset k ...] for the segments of tab (one dtype, one device).
void expand_(at::TensorList out, const at::Tensor& c32, at::ArrayRef<double> alphas, const SegmentTable& tab,
             const StreamArgs& shared) {
  std::vector<ExpandSeg> segs;
  int64_t items = 0;
  for (int64_t s = 0; s < tab.n_segs; ++s) {
    const at::Tensor& o = out[s];
    if (o.numel() == 0) continue;
    const StreamArgs a = tab.args(shared, s);
    const int64_t k = tab.comp[s], dim = tab.dim[k];
    TORCH_CHECK_VALUE(dim < (int64_t(1) << 31), "rbd_cuda: dim must be below 2**31 with the CUDA kernels, got ",
                      decimal(dim));
    const Geometry geo = make_geometry(a, o.numel(), dim);
    ExpandSeg e{};
    e.out = o.data_ptr();
    e.c = c32.data_ptr<float>() + tab.offset[k];
    e.numel = o.numel();
    e.row_offset = a.row_offset;
    e.rb_first = geo.rb_first;
    e.n_rb = geo.n_rb();
    e.alpha = static_cast<float>(alphas[s]);
    e.dim = uint32_t(dim);
    e.n_cols = uint32_t(geo.n_cols);
    e.first_col = uint32_t(geo.first_col);
    e.shift = uint32_t(geo.shift);
    e.stream = a.stream;
    // Column lanes only when the rows alone leave the GPU idle (fewer than kTargetThreads row blocks).
    const int64_t js = std::min<int64_t>({32, pow2_floor(std::max<int64_t>(1, kTargetThreads / geo.n_rb())),
                                          pow2_floor(geo.n_cols)});
    e.js = uint32_t(js);
    while ((int64_t(1) << e.log_js) < js) ++e.log_js;
    e.item_begin = uint32_t(items);
    items += ceil_div(geo.n_rb(), kThreads / js);
    TORCH_CHECK(items < (int64_t(1) << 32), "rbd_cuda: too many work items in one expand_ launch");
    segs.push_back(e);
  }
  if (segs.empty()) return;
  std::vector<size_t> at_;
  const at::Tensor blob = upload({{segs.data(), segs.size() * sizeof(ExpandSeg)}}, out[0].device(), at_);
  const auto* table = reinterpret_cast<const ExpandSeg*>(blob.data_ptr<uint8_t>());
  const Keys keys = keys_of(shared);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  RBD_DISPATCH_FLOAT(out[0].scalar_type(), "rbd_cuda::expand_", [&] {
    with_distribution(shared.dist, [&](auto tag) {
      const auto kernel = expand_kernel<decltype(tag)::value, scalar_t>;
      RBD_LAUNCH(kernel, grid_for(items, resident_blocks(kernel)), kThreads, 0, stream)(table, int(segs.size()),
                                                                                     uint32_t(items), keys);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr auto project = &rbd::project;
  static constexpr auto expand_ = &rbd::expand_;
};

}  // namespace

RBD_CUDA_IMPL(m) {
  Products<CudaBackend>::register_impls(m);
}

}  // namespace rbd

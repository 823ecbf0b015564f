// CPU implementations of the rbd_cuda ops: P is generated tile by tile inside the products.
//
// This file owns argument checks, dtypes, threading and the choice of instruction set; the
// inner loops are in the kernel tables of kernels.h (baseline, AVX2, AVX-512), chosen per call
// by select_kernels().
//
// Determinism: every sum runs in an order fixed by the problem's shape alone (fixed row chunks
// reduced in chunk order, fixed-width lane accumulators reduced pairwise), never by the thread
// count or the instruction set, and the sources are compiled with -ffp-contract=off so
// vectorised and scalar code round identically.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "../grouped.h"
#include "kernels.h"

namespace rbd {

namespace {

constexpr int64_t kMaxRowChunks = 64;      // project: partial sums kept per row chunk
constexpr int64_t kMinChunkBlocks = 256;   // project: row blocks (of 4 rows) per chunk, at least
constexpr int64_t kColsPerTask = 1024;     // project: columns per parallel task
constexpr int64_t kRowBatch = 64;          // row blocks per kernel call (fp32 staging of g / u)
constexpr int64_t kEntryCols = 512;        // materialize_: columns per kernel call
constexpr int64_t kTaskBlocks = 256;       // expand_, materialize_: row blocks per parallel task

// The tables this CPU can run, best first; the baseline always.
std::vector<const cpu::Kernels*> usable_kernels() {
  std::vector<const cpu::Kernels*> out;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (cpu::avx512_kernels() && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    out.push_back(cpu::avx512_kernels());
  }
  if (cpu::avx2_kernels() && __builtin_cpu_supports("avx2")) out.push_back(cpu::avx2_kernels());
#endif
  out.push_back(&cpu::baseline_kernels());
  return out;
}

const std::vector<const cpu::Kernels*>& usable() {
  static const std::vector<const cpu::Kernels*> tables = usable_kernels();
  return tables;
}

// The table the ops use: nullptr for the best this CPU runs. Process-wide, set by
// rbd_cuda.backends.cpu.isa (through set_cpu_isa below), never read from the environment here.
std::atomic<const cpu::Kernels*> selected{nullptr};

const cpu::Kernels& select_kernels() {
  const cpu::Kernels* k = selected.load(std::memory_order_relaxed);
  return k ? *k : *usable().front();
}

// Runs fn(task) for every task in [0, n_tasks) on torch's intra-op threads, each thread taking
// the next task as it finishes one: on a shared machine a thread that loses its core leaves
// its remaining tasks to the others instead of holding up the whole op (a static split would).
// Each task writes its own outputs, so results do not depend on which thread runs it.
template <typename F>
void parallel_tasks(int64_t n_tasks, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) fn(t);
  });
}

// The local column layout of a request: `width` kernel columns (a multiple of the tile or
// group, or a narrow width for few columns: cpu::kernel_width), of which [shift, shift + dim)
// are the requested ones.
struct Layout {
  cpu::Job job;
  Geometry geo;
  int64_t width;
  Layout(const StreamArgs& a, int64_t numel, int64_t dim) : geo(make_geometry(a, numel, dim)) {
    job = cpu::Job{a.dist, a.key0, a.key1, a.step, a.stream, uint32_t(geo.first_col)};
    width = cpu::kernel_width(geo.rademacher, geo.rademacher ? geo.shift + dim : dim);
  }
};

// c[j] = sum_i P[row_offset + i, col_offset + j] g[i]
template <typename T>
void project_kernel(const cpu::Kernels& k, const T* g, int64_t numel, int64_t dim,
                    const StreamArgs& a, float* c) {
  const Layout lay(a, numel, dim);
  const Geometry& rows = lay.geo;
  const int64_t n_chunks = std::min(kMaxRowChunks, ceil_div(rows.n_rb(), kMinChunkBlocks));
  const int64_t chunk = ceil_div(rows.n_rb(), n_chunks);
  const int64_t n_col_tasks = ceil_div(lay.width, kColsPerTask);
  std::vector<float> partial(static_cast<size_t>(n_chunks * lay.width), 0.0f);

  parallel_tasks(n_chunks * n_col_tasks, [&](int64_t task) {
    float gv[4 * kRowBatch];
    const int64_t ch = task / n_col_tasks;
    const int64_t col_lo = (task % n_col_tasks) * kColsPerTask;
    const int64_t col_hi = std::min(lay.width, col_lo + kColsPerTask);
    float* acc = partial.data() + ch * lay.width;
    const int64_t rb_lo = rows.rb_first + ch * chunk;
    const int64_t rb_hi = std::min(rows.rb_end, rb_lo + chunk);
    for (int64_t rb = rb_lo; rb < rb_hi; rb += kRowBatch) {
      const int64_t n = std::min(kRowBatch, rb_hi - rb);
      for (int64_t q = 0; q < 4 * n; ++q) {  // rows outside [0, numel) count as zeros
        const int64_t i = 4 * rb + q - a.row_offset;
        gv[q] = (i >= 0 && i < numel) ? static_cast<float>(g[i]) : 0.0f;
      }
      k.project(lay.job, gv, rb, n, col_lo, col_hi, acc);
    }
  });

  for (int64_t j = 0; j < dim; ++j) {
    float s = 0.0f;
    for (int64_t ch = 0; ch < n_chunks; ++ch) s += partial[ch * lay.width + lay.geo.shift + j];
    c[j] = s;
  }
}

// out[i] += alpha * sum_j P[row_offset + i, col_offset + j] c[j]
template <typename T>
void expand_kernel(const cpu::Kernels& k, T* out, const float* c, int64_t numel, int64_t dim,
                   float alpha, const StreamArgs& a) {
  const Layout lay(a, numel, dim);
  const Geometry& rows = lay.geo;
  std::vector<float> c_pad(static_cast<size_t>(lay.width), 0.0f);  // zeros beyond dim
  std::copy(c, c + dim, c_pad.begin() + lay.geo.shift);

  parallel_tasks(ceil_div(rows.n_rb(), kTaskBlocks), [&](int64_t task) {
    const int64_t begin = rows.rb_first + task * kTaskBlocks;
    const int64_t end = std::min(rows.rb_end, begin + kTaskBlocks);
    float u[4 * kRowBatch];
    for (int64_t rb = begin; rb < end; rb += kRowBatch) {
      const int64_t n = std::min(kRowBatch, end - rb);
      k.expand(lay.job, c_pad.data(), lay.width, rb, n, u);
      for (int64_t q = 0; q < 4 * n; ++q) {
        const int64_t i = 4 * rb + q - a.row_offset;
        if (i >= 0 && i < numel) out[i] = static_cast<T>(static_cast<float>(out[i]) + alpha * u[q]);
      }
    }
  });
}

// out[i, j] = P[row_offset + i, col_offset + j]
template <typename T>
void materialize_kernel(const cpu::Kernels& k, T* out, int64_t numel, int64_t dim,
                        const StreamArgs& a) {
  const Layout lay(a, numel, dim);
  const Geometry& rows = lay.geo;
  parallel_tasks(ceil_div(rows.n_rb(), kTaskBlocks), [&](int64_t task) {
    const int64_t begin = rows.rb_first + task * kTaskBlocks;
    const int64_t end = std::min(rows.rb_end, begin + kTaskBlocks);
    float e[4 * kEntryCols];
    for (int64_t rb = begin; rb < end; ++rb) {
      for (int64_t t_lo = 0; t_lo < lay.width; t_lo += kEntryCols) {
        const int64_t t_hi = std::min(lay.width, t_lo + kEntryCols);
        k.entries(lay.job, rb, t_lo, t_hi, e);
        for (int r = 0; r < 4; ++r) {
          const int64_t i = 4 * rb + r - a.row_offset;
          if (i < 0 || i >= numel) continue;
          const int64_t j_lo = std::max<int64_t>(0, t_lo - lay.geo.shift);
          const int64_t j_hi = std::min(dim, t_hi - lay.geo.shift);
          const float* src = e + r * (t_hi - t_lo) + lay.geo.shift - t_lo;
          for (int64_t j = j_lo; j < j_hi; ++j) out[i * dim + j] = static_cast<T>(src[j]);
        }
      }
    }
  });
}

#define RBD_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// c (fp32, the table's total) for the segments g of `tab` (one dtype, one device): each
// compartment's segments in table order, the first written, the next added, as a sum of the
// single ops' results is formed.
at::Tensor project_table(at::TensorList g, const SegmentTable& tab, const StreamArgs& shared, at::ScalarType out_dtype) {
  at::Tensor c = at::zeros({tab.total()}, g[0].options().dtype(at::kFloat));
  float* const cp = c.data_ptr<float>();
  std::vector<bool> started(size_t(tab.n_comps), false);
  std::vector<float> part;
  const cpu::Kernels& k = select_kernels();
  for (int64_t s = 0; s < tab.n_segs; ++s) {
    const int64_t comp = tab.comp[s], dim = tab.dim[comp];
    float* slot = cp + tab.offset[comp];
    float* dest = slot;
    if (started[comp]) {
      part.assign(size_t(dim), 0.0f);
      dest = part.data();
    }
    if (tab.numel[s] > 0) {
      const at::Tensor gc = g[s].contiguous();
      const StreamArgs a = tab.args(shared, s);
      RBD_DISPATCH_FLOAT(gc.scalar_type(), "rbd_cuda::project", [&] {
        project_kernel<scalar_t>(k, gc.data_ptr<scalar_t>(), gc.numel(), dim, a, dest);
      });
    }
    if (started[comp]) {
      for (int64_t j = 0; j < dim; ++j) slot[j] += part[j];
    }
    started[comp] = true;
  }
  return c.to(out_dtype);
}

// out[s] += alphas[s] P_k c32[offset k ...] for the segments of `tab` (checked, and marked modified:
// Products).
void expand_table_(at::TensorList out, const at::Tensor& c32, at::ArrayRef<double> alphas, const SegmentTable& tab,
                   const StreamArgs& shared) {
  const cpu::Kernels& k = select_kernels();
  for (int64_t s = 0; s < tab.n_segs; ++s) {
    const at::Tensor& o = out[s];
    if (o.numel() == 0) continue;
    const int64_t comp = tab.comp[s];
    const StreamArgs a = tab.args(shared, s);
    RBD_DISPATCH_FLOAT(o.scalar_type(), "rbd_cuda::expand_", [&] {
      expand_kernel<scalar_t>(k, o.data_ptr<scalar_t>(), c32.data_ptr<float>() + tab.offset[comp], o.numel(),
                              tab.dim[comp], static_cast<float>(alphas[s]), a);
    });
  }
}

struct CpuBackend {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static constexpr auto project = &project_table;
  static constexpr auto expand_ = &expand_table_;
};

void materialize_inplace_cpu(at::Tensor& out, int64_t seed, int64_t step, int64_t stream,
                             c10::string_view distribution, int64_t row_offset,
                             int64_t col_offset) {
  check_matrix_out(out);
  const auto st = out.scalar_type();
  const StreamArgs a = make_stream_args(out.size(0), out.size(1), seed, step, stream,
                                        std::string(distribution), row_offset, col_offset);
  mark_modified(out);
  if (out.numel() == 0) return;
  const cpu::Kernels& k = select_kernels();
  RBD_DISPATCH_FLOAT(st, "rbd_cuda::materialize_", [&] {
    materialize_kernel<scalar_t>(k, out.data_ptr<scalar_t>(), out.size(0), out.size(1), a);
  });
}

at::Tensor philox_cpu(const at::Tensor& counter, const at::Tensor& key, int64_t rounds) {
  check_philox_args(counter, key, rounds);
  // The words as u32 arrays for the kernels (the op's tensors hold them in int64).
  const at::Tensor ctr = counter.to(at::kInt).contiguous(), ky = key.to(at::kInt).contiguous();
  at::Tensor words = at::empty_like(ctr);
  select_kernels().philox(reinterpret_cast<const uint32_t*>(ctr.data_ptr<int32_t>()),
                          reinterpret_cast<const uint32_t*>(ky.data_ptr<int32_t>()), int(rounds),
                          ctr.size(0), reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()));
  return words.to(at::kLong).bitwise_and(0xFFFFFFFFLL);
}

}  // namespace

std::string cpu_isa() { return select_kernels().name; }

void set_cpu_isa(const std::string& want) {
  if (want == "auto") {
    selected.store(nullptr, std::memory_order_relaxed);
    return;
  }
  TORCH_CHECK_VALUE(want == "avx512" || want == "avx2" || want == "baseline",
                    "rbd_cuda: the CPU ISA must be 'avx512', 'avx2', 'baseline' or 'auto', got '", want, "'");
  std::string names;
  for (const cpu::Kernels* k : usable()) {
    if (want == k->name) {
      selected.store(k, std::memory_order_relaxed);
      return;
    }
    names += std::string(names.empty() ? "" : ", ") + k->name;
  }
  TORCH_CHECK_VALUE(false, "rbd_cuda: the CPU ISA '", want, "' is not available on this CPU "
                    "(or was not compiled); available: ", names);
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const cpu::Kernels* k : usable()) names.push_back(k->name);
  return names;
}

TORCH_LIBRARY_IMPL(rbd_cuda, CPU, m) {
  Products<CpuBackend>::register_impls(m);
  m.impl("materialize_", &materialize_inplace_cpu);
  m.impl("philox4x32", &philox_cpu);
}

}  // namespace rbd

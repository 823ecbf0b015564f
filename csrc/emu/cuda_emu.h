// cuda_emu.h: runs CUDA C++ kernels on the CPU, for testing their logic where no GPU is.
//
// Include it first in a g++ (C++20) translation unit, then the CUDA sources. Launch kernels with
// EMU_LAUNCH(kernel, grid, block[, shmem[, stream]])(args...), which is kernel<<<...>>>(args...)
// under nvcc (see EMU_LAUNCH below); everything else of the CUDA source compiles unchanged.
//
// How a grid runs:
//  * Each GPU thread of a block is a user-space fiber with its own stack; a block's fibers run on
//    one OS thread, so `__shared__` is `static thread_local`: one copy per block running at a time.
//  * The blocks of a grid are shared out among worker threads (EMU_WORKERS; default: the hardware
//    threads), so blocks run concurrently, as on a GPU.
//  * Between two synchronisation points a fiber runs alone until it reaches the next one; the order
//    in which a block's runnable fibers get their turn is the schedule: "fwd" (thread order),
//    "rev" or "rand" (shuffled on every pass, from a seed). A missing barrier shows up as results
//    that depend on the schedule.
//  * __syncthreads is a counting barrier: a fiber waits until every live thread of its block
//    arrived; threads that exited leave the count (as on sm_70+). Arrivals from two different
//    source lines are reported as a divergent barrier; a block in which no thread can go on is
//    reported as a deadlock.
//  * Warp collectives (__shfl*_sync, __ballot/any/all_sync, __syncwarp) exchange through a 32-slot
//    array and wait for every lane their mask names; a mask naming an exited or absent lane, a
//    lane calling with a mask without itself, lanes of one collective with different masks, and a
//    shuffle reading a lane outside the mask are reported.
//  * A report is an std::runtime_error thrown by the launch, naming the kernel's threads and lines.
//
// Settings (emu::settings(), initialised from the environment once): EMU_SCHED=fwd|rev|rand,
// EMU_SEED (the rand schedule's), EMU_WORKERS, EMU_SMS and EMU_BLOCKS_PER_SM (what the occupancy
// queries answer, so grids sized to "resident blocks" are small and loop over many items).
//
// With -DEMU_OS_THREADS every GPU thread is an std::thread and the barriers are std::barrier: slow,
// blocks one after another, no divergence or mask checks, but ThreadSanitizer then sees every GPU
// thread as a thread and reports unsynchronised __shared__ accesses. Under AddressSanitizer the
// fiber switches are annotated (__sanitizer_start/finish_switch_fiber).
//
// Not modelled: lockstep warps, weak memory ordering between threads and blocks, the GPU's float
// rounding and special-function approximations, registers, occupancy, timing, dynamic shared
// memory, streams (every launch runs to completion before it returns).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers; nvcc compiles the CUDA sources as they are"
#endif

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(EMU_OS_THREADS)
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#endif

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#if defined(EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---- keywords ---------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#if defined(EMU_OS_THREADS)
#define __shared__ static  // blocks run one after another
#else
#define __shared__ static thread_local  // a worker runs one block at a time
#endif
#define __constant__ static

// ---- vector types -----------------------------------------------------------------------------

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- device functions with a host meaning -------------------------------------------------

template <typename T>
inline T __ldg(const T* p) { return *p; }

template <typename To, typename From>
inline To emu_bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
inline unsigned __float_as_uint(float f) { return emu_bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return emu_bit_cast<float>(u); }
inline int __float_as_int(float f) { return emu_bit_cast<int>(f); }
inline float __int_as_float(int i) { return emu_bit_cast<float>(i); }
inline long long __double_as_longlong(double d) { return emu_bit_cast<long long>(d); }
inline double __longlong_as_double(long long v) { return emu_bit_cast<double>(v); }

// The fast-math intrinsics as the accurate functions (the GPU's approximations are not modelled).
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int b = 0; b < 32; ++b) r |= ((x >> b) & 1u) << (31 - b);
  return r;
}

// CUDA's global min/max overloads: the usual arithmetic conversions, as its overload set gives.
template <typename A, typename B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}

// Atomics: blocks run concurrently on worker threads.
template <typename T>
inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T>
inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T>
inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T>
inline T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- the runtime API a launcher needs -------------------------------------------------------

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = struct emu_stream*;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrWarpSize = 10 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulator error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches are synchronous

namespace emu {

constexpr int kWarp = 32;

enum class Schedule { Forward, Reverse, Random };

struct Settings {
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;           // the Random schedule's
  int workers = 0;             // OS threads running blocks; 0: the hardware threads
  int sms = 4;                 // what the occupancy queries answer: sms x blocks_per_sm
  int blocks_per_sm = 2;
  size_t stack_bytes = 256 * 1024;  // per fiber
};

inline Schedule parse_schedule(const std::string& name) {
  if (name == "fwd") return Schedule::Forward;
  if (name == "rev") return Schedule::Reverse;
  if (name == "rand") return Schedule::Random;
  throw std::invalid_argument("emu: the schedule must be 'fwd', 'rev' or 'rand', got '" + name + "'");
}

inline const char* schedule_name(Schedule s) {
  return s == Schedule::Forward ? "fwd" : s == Schedule::Reverse ? "rev" : "rand";
}

inline Settings& settings() {
  static Settings s = [] {
    Settings v;
    const auto env = [](const char* name) -> const char* { return std::getenv(name); };
    if (env("EMU_SCHED")) v.schedule = parse_schedule(env("EMU_SCHED"));
    if (env("EMU_SEED")) v.seed = std::strtoull(env("EMU_SEED"), nullptr, 10);
    if (env("EMU_WORKERS")) v.workers = std::atoi(env("EMU_WORKERS"));
    if (env("EMU_SMS")) v.sms = std::max(1, std::atoi(env("EMU_SMS")));
    if (env("EMU_BLOCKS_PER_SM")) v.blocks_per_sm = std::max(1, std::atoi(env("EMU_BLOCKS_PER_SM")));
#if defined(EMU_ASAN)
    v.stack_bytes = 1024 * 1024;  // redzones make frames larger
#endif
    return v;
  }();
  return s;
}

inline std::string coords(uint3 t) {
  return "(" + std::to_string(t.x) + ", " + std::to_string(t.y) + ", " + std::to_string(t.z) + ")";
}

// What the current GPU thread sees: its block's coordinates (per worker thread) and its own index.
inline thread_local dim3 tls_grid_dim, tls_block_dim, tls_block_idx;

// A failure inside a launch: the launch stops and throws it.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && (file == o.file || std::strcmp(file, o.file) == 0); }
  std::string str() const { return std::string(file ? file : "?") + ":" + std::to_string(line); }
};

#if !defined(EMU_OS_THREADS)

// ---- fibers -----------------------------------------------------------------------------------

#if defined(__x86_64__)
// emu_switch_context(&save_sp, next_sp): pushes the callee-saved registers, saves the stack
// pointer, switches to next_sp and pops what was pushed there. In a COMDAT section, so that every
// translation unit including this header may emit it.
extern "C" void emu_switch_context(void** save_sp, void* next_sp);
asm(R"(
  .section .text.emu_switch_context,"axG",@progbits,emu_switch_context,comdat
  .globl emu_switch_context
  .hidden emu_switch_context
  .type emu_switch_context,@function
emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_context, .-emu_switch_context
  .text
)");
#endif

enum class State { Runnable, AtBarrier, AtWarp, Done, Failed };

struct Fiber {
  uint3 idx{};
  unsigned lane = 0, warp = 0;
  State state = State::Done;
  Site site;                 // where it waits
  unsigned mask = 0;         // the collective's mask, while AtWarp
  int predicate = 0;         // __syncthreads_count/and/or and the vote functions
  char* stack = nullptr;
  size_t stack_bytes = 0;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
#if defined(EMU_ASAN)
  void* fake_stack = nullptr;
#endif
};

struct Warp {
  uint64_t slot[kWarp] = {};
  int vote[kWarp] = {};
};

// The block a worker thread is running.
struct Block {
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_ctx;
#endif
#if defined(EMU_ASAN)
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
#endif
  int barrier_result = 0;
  std::string failure;
  std::exception_ptr exception;
};

inline thread_local Block* tls_block = nullptr;

inline Fiber& this_fiber() { return *tls_block->current; }

// Fiber stacks: mapped once, with a guard page below each (an overflow faults), and reused by
// every later launch.
class StackPool {
 public:
  static StackPool& instance() {
    static StackPool pool;
    return pool;
  }
  void acquire(std::vector<Fiber>& fibers, size_t bytes) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    bytes = (bytes + page - 1) / page * page;
    std::lock_guard<std::mutex> lock(mutex_);
    for (Fiber& f : fibers) {
      auto it = std::find_if(free_.begin(), free_.end(), [&](const auto& s) { return s.second == bytes; });
      if (it != free_.end()) {
        f.stack = it->first;
        free_.erase(it);
      } else {
        void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) throw Failure("emu: cannot map a fiber stack");
        mprotect(p, page, PROT_NONE);
        f.stack = static_cast<char*>(p) + page;
      }
      f.stack_bytes = bytes;
    }
  }
  void release(std::vector<Fiber>& fibers) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Fiber& f : fibers)
      if (f.stack) free_.emplace_back(f.stack, f.stack_bytes);
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<char*, size_t>> free_;
};

inline void switch_to_scheduler(Fiber& f, bool finished) {
  Block& b = *tls_block;
#if defined(EMU_ASAN)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, b.scheduler_stack, b.scheduler_stack_bytes);
#else
  (void)finished;
#endif
#if defined(__x86_64__)
  emu_switch_context(&f.sp, b.scheduler_sp);
#else
  swapcontext(&f.ctx, &b.scheduler_ctx);
#endif
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

[[noreturn]] inline void fiber_main() {
  Block& b = *tls_block;
  Fiber& f = *b.current;
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_bytes);
#endif
  try {
    (*b.body)();
    f.state = State::Done;
  } catch (...) {
    f.state = State::Failed;
    if (!b.exception) b.exception = std::current_exception();
  }
  switch_to_scheduler(f, true);
  __builtin_unreachable();
}

inline void start_fiber(Fiber& f) {
#if defined(EMU_ASAN)
  // A reused stack still carries the poisoned frames of the fiber that ran there last: they never
  // returned.
  __asan_unpoison_memory_region(f.stack, f.stack_bytes);
#endif
#if defined(__x86_64__)
  // The first switch pops six registers and returns into fiber_main, which then sees the stack
  // pointer a call would leave (16-byte aligned before the call).
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(f.stack + f.stack_bytes)) & ~uintptr_t(15));
  uintptr_t* sp = top - 8;
  for (int r = 0; r < 6; ++r) sp[r] = 0;
  sp[6] = reinterpret_cast<uintptr_t>(&fiber_main);
  sp[7] = 0;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = f.stack_bytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

inline void resume(Block& b, Fiber& f) {
  b.current = &f;
#if defined(EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_bytes);
#endif
#if defined(__x86_64__)
  emu_switch_context(&b.scheduler_sp, f.sp);
#else
  swapcontext(&b.scheduler_ctx, &f.ctx);
#endif
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  b.current = nullptr;
}

// Called by a fiber that found a misuse: the block stops, the launch throws `what`.
[[noreturn]] inline void fail(const std::string& what) {
  Block& b = *tls_block;
  Fiber& f = *b.current;
  if (b.failure.empty()) b.failure = what;
  f.state = State::Failed;
  switch_to_scheduler(f, true);
  __builtin_unreachable();
}

inline void wait(State state, Site site) {
  Fiber& f = this_fiber();
  f.state = state;
  f.site = site;
  switch_to_scheduler(f, false);
}

inline int syncthreads(const char* file, int line, int predicate = 0) {
  this_fiber().predicate = predicate;
  wait(State::AtBarrier, {file, line});
  return tls_block->barrier_result;
}

// "8 threads from (32, 0, 0) at a warp collective, f.cu:17; 24 threads from (40, 0, 0) at
// __syncthreads, f.cu:19": the waiting threads grouped by where they wait.
inline std::string describe_waiting(const std::vector<Fiber>& fibers) {
  struct Group {
    State state;
    Site site;
    uint3 first;
    int count;
  };
  std::vector<Group> groups;
  for (const Fiber& f : fibers) {
    if (f.state != State::AtBarrier && f.state != State::AtWarp) continue;
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const Group& g) { return g.state == f.state && g.site == f.site; });
    if (it == groups.end()) groups.push_back({f.state, f.site, f.idx, 1});
    else ++it->count;
  }
  std::string s;
  for (const Group& g : groups) {
    s += (s.empty() ? "" : "; ") + std::to_string(g.count) + (g.count == 1 ? " thread " : " threads from ") +
         coords(g.first) + (g.state == State::AtBarrier ? " at __syncthreads, " : " at a warp collective, ") +
         g.site.str();
  }
  return s;
}

// One scheduler step after every runnable fiber had its turn: releases the warps whose
// collective every lane of the mask reached and the block once every live thread waits at one
// barrier. Returns false (with b.failure set) on a misuse or when nothing can go on.
inline bool release(Block& b) {
  std::vector<Fiber>& fibers = *b.fibers;
  const unsigned n_warps = unsigned(b.warps.size());
  bool released = false;
  for (unsigned w = 0; w < n_warps; ++w) {
    Fiber* lanes[kWarp] = {};
    for (unsigned l = 0; l < kWarp && w * kWarp + l < fibers.size(); ++l) lanes[l] = &fibers[w * kWarp + l];
    const Fiber* first = nullptr;
    for (Fiber* f : lanes)
      if (f && f->state == State::AtWarp) {
        first = f;
        break;
      }
    if (!first) continue;
    const unsigned mask = first->mask;
    bool complete = true;
    for (unsigned l = 0; l < kWarp; ++l) {
      const Fiber* f = lanes[l];
      if (f && f->state == State::AtWarp && f->mask != mask) {
        b.failure = "emu: lanes " + std::to_string(first->lane) + " and " + std::to_string(l) + " of warp " +
                    std::to_string(w) + " reached a warp collective with different masks (" + first->site.str() +
                    ", " + f->site.str() + ")";
        return false;
      }
      if (!((mask >> l) & 1u)) continue;
      if (!f || f->state == State::Done) {
        b.failure = "emu: the mask of the warp collective at " + first->site.str() + " names lane " +
                    std::to_string(l) + " of warp " + std::to_string(w) + ", which " +
                    (f ? "has exited" : "does not exist (the block is smaller)");
        return false;
      }
      if (f->state != State::AtWarp) complete = false;
    }
    if (complete) {
      for (unsigned l = 0; l < kWarp; ++l)
        if ((mask >> l) & 1u) lanes[l]->state = State::Runnable;
      released = true;
    }
  }
  if (released) return true;
  const Fiber* first = nullptr;
  int live = 0, total = 0;
  for (const Fiber& f : fibers) {
    if (f.state == State::Done) continue;
    ++live;
    if (f.state != State::AtBarrier) continue;
    total += f.predicate;
    if (!first) {
      first = &f;
    } else if (!(f.site == first->site)) {
      b.failure = "emu: divergent __syncthreads: thread " + coords(first->idx) + " waits at " + first->site.str() +
                  ", thread " + coords(f.idx) + " at " + f.site.str();
      return false;
    }
  }
  if (live == 0) return true;
  bool all_at_barrier = first != nullptr;
  for (const Fiber& f : fibers)
    if (f.state != State::Done && f.state != State::AtBarrier) all_at_barrier = false;
  if (all_at_barrier) {
    b.barrier_result = total;
    for (Fiber& f : fibers)
      if (f.state == State::AtBarrier) f.state = State::Runnable;
    return true;
  }
  b.failure = "emu: deadlock in block " + coords({tls_block_idx.x, tls_block_idx.y, tls_block_idx.z}) +
              ": no thread can go on (" + describe_waiting(fibers) + ")";
  return false;
}

// Runs one block to completion, or until a thread fails (b.failure or b.exception set).
inline void run_block(Block& b, std::mt19937_64& rng) {
  std::vector<Fiber>& fibers = *b.fibers;
  for (Fiber& f : fibers) {
    f.state = State::Runnable;
    start_fiber(f);
  }
  std::vector<unsigned> order(fibers.size());
  for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
  const Schedule schedule = settings().schedule;
  if (schedule == Schedule::Reverse) std::reverse(order.begin(), order.end());
  while (true) {
    if (schedule == Schedule::Random) std::shuffle(order.begin(), order.end(), rng);
    bool live = false;
    for (unsigned i : order) {
      Fiber& f = fibers[i];
      if (f.state == State::Runnable) resume(b, f);
      if (f.state == State::Failed) return;
      live = live || f.state != State::Done;
    }
    if (!live || !release(b)) return;
  }
}

#endif  // !EMU_OS_THREADS

// The body every GPU thread of a launch runs, and its coordinates.
struct Grid {
  dim3 grid, block;
  std::function<void()> body;
  const char* kernel = "";
};

#if defined(EMU_OS_THREADS)

inline thread_local uint3 tls_thread_idx{};

struct OsBlock;
// Runs once per barrier phase, when every live thread arrived: the divergence check, and
// __syncthreads_count's total published.
struct PhaseCheck {
  OsBlock* block;
  void operator()() noexcept;
};

struct OsBlock {
  std::unique_ptr<std::barrier<PhaseCheck>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<Site> sites;  // where each thread arrived in this phase
  std::vector<uint64_t> slots;
  std::vector<int> votes;
  std::atomic<int> count{0};
  int barrier_result = 0;
  std::string failure;
};
inline thread_local OsBlock* tls_os_block = nullptr;
inline thread_local unsigned tls_linear = 0;

inline void PhaseCheck::operator()() noexcept {
  OsBlock& b = *block;
  const Site* first = nullptr;
  for (const Site& s : b.sites) {
    if (!s.file) continue;
    if (!first) first = &s;
    else if (!(s == *first) && b.failure.empty()) b.failure = "emu: divergent __syncthreads: " + first->str() + " and " + s.str();
  }
  b.barrier_result = b.count.exchange(0);
  for (Site& s : b.sites) s = {};
}

inline int syncthreads(const char* file, int line, int predicate = 0) {
  OsBlock& b = *tls_os_block;
  b.sites[tls_linear] = {file, line};
  if (predicate) b.count.fetch_add(predicate);
  b.all->arrive_and_wait();
  const int result = b.barrier_result;
  b.all->arrive_and_wait();  // nobody starts the next barrier before everybody read this one's result
  return result;
}

#endif

inline unsigned lane_id() {
#if defined(EMU_OS_THREADS)
  return tls_linear % kWarp;
#else
  return this_fiber().lane;
#endif
}

// Runs `g` to completion on the worker threads; throws Failure on a reported misuse.
inline void run_grid(const Grid& g) {
  const uint64_t n_blocks = uint64_t(g.grid.x) * g.grid.y * g.grid.z;
  const unsigned n_threads = g.block.x * g.block.y * g.block.z;
  if (n_blocks == 0 || n_threads == 0) return;
  if (n_threads > 1024) throw Failure(std::string("emu: ") + g.kernel + ": more than 1024 threads per block");
  const auto coords_of = [&](uint64_t linear, dim3 shape) {
    return dim3(unsigned(linear % shape.x), unsigned(linear / shape.x % shape.y),
                unsigned(linear / (uint64_t(shape.x) * shape.y)));
  };
#if defined(EMU_OS_THREADS)
  for (uint64_t blk = 0; blk < n_blocks; ++blk) {
    OsBlock b;
    b.sites.resize(n_threads);
    b.all = std::make_unique<std::barrier<PhaseCheck>>(std::ptrdiff_t(n_threads), PhaseCheck{&b});
    for (unsigned w = 0; w * kWarp < n_threads; ++w)
      b.warps.push_back(std::make_unique<std::barrier<>>(std::ptrdiff_t(std::min<unsigned>(kWarp, n_threads - w * kWarp))));
    b.slots.assign(n_threads, 0);
    b.votes.assign(n_threads, 0);
    const dim3 bidx = coords_of(blk, g.grid);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n_threads; ++t) {
      threads.emplace_back([&, t] {
        tls_grid_dim = g.grid;
        tls_block_dim = g.block;
        tls_block_idx = bidx;
        const dim3 c = coords_of(t, g.block);
        tls_thread_idx = {c.x, c.y, c.z};
        tls_linear = t;
        tls_os_block = &b;
        g.body();
        b.warps[t / kWarp]->arrive_and_drop();  // an exited thread leaves the counts
        b.all->arrive_and_drop();
      });
    }
    for (auto& th : threads) th.join();
    if (!b.failure.empty()) throw Failure(b.failure + " (kernel " + g.kernel + ")");
  }
#else
  const Settings& s = settings();
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const unsigned workers = unsigned(std::min<uint64_t>(n_blocks, s.workers > 0 ? unsigned(s.workers) : hw));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex failure_mutex;
  std::string failure;
  std::exception_ptr exception;
  static std::atomic<uint64_t> launches{0};
  const uint64_t launch = launches.fetch_add(1);
  const auto work = [&](unsigned worker) {
    std::vector<Fiber> fibers(n_threads);
    for (unsigned t = 0; t < n_threads; ++t) {
      const dim3 c = coords_of(t, g.block);
      fibers[t].idx = {c.x, c.y, c.z};
      fibers[t].lane = t % kWarp;
      fibers[t].warp = t / kWarp;
    }
    try {
      StackPool::instance().acquire(fibers, s.stack_bytes);
    } catch (...) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!exception) exception = std::current_exception();
      stop = true;
      return;
    }
    Block b;
    b.fibers = &fibers;
    b.warps.resize((n_threads + kWarp - 1) / kWarp);
    b.body = &g.body;
    std::mt19937_64 rng(s.seed * 0x9E3779B97F4A7C15ull + launch * 1000003ull + worker);
    tls_grid_dim = g.grid;
    tls_block_dim = g.block;
    tls_block = &b;
    for (uint64_t blk; !stop && (blk = next.fetch_add(1)) < n_blocks;) {
      tls_block_idx = coords_of(blk, g.grid);
      run_block(b, rng);
      if (!b.failure.empty() || b.exception) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (failure.empty() && !exception) {
          failure = b.failure;
          exception = b.exception;
        }
        stop = true;
      }
    }
    tls_block = nullptr;
    StackPool::instance().release(fibers);
  };
  if (workers == 1) {
    work(0);
  } else {
    std::vector<std::thread> threads;
    for (unsigned w = 0; w < workers; ++w) threads.emplace_back(work, w);
    for (auto& t : threads) t.join();
  }
  if (exception) std::rethrow_exception(exception);
  if (!failure.empty()) throw Failure(failure + " (kernel " + g.kernel + ")");
#endif
}

// ---- warp collectives -----------------------------------------------------------------------

template <typename T>
inline uint64_t to_slot(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move up to 8 bytes");
  uint64_t s = 0;
  std::memcpy(&s, &v, sizeof(T));
  return s;
}
template <typename T>
inline T from_slot(uint64_t s) {
  T v;
  std::memcpy(&v, &s, sizeof(T));
  return v;
}

#if defined(EMU_OS_THREADS)

inline void warp_wait(unsigned, Site) { tls_os_block->warps[tls_linear / kWarp]->arrive_and_wait(); }
inline uint64_t& warp_slot(unsigned lane) { return tls_os_block->slots[tls_linear / kWarp * kWarp + lane]; }
inline int& warp_vote(unsigned lane) { return tls_os_block->votes[tls_linear / kWarp * kWarp + lane]; }
inline void check_mask(unsigned, Site) {}

#else

inline void warp_wait(unsigned mask, Site site) {
  this_fiber().mask = mask;
  wait(State::AtWarp, site);
}
inline uint64_t& warp_slot(unsigned lane) { return tls_block->warps[this_fiber().warp].slot[lane]; }
inline int& warp_vote(unsigned lane) { return tls_block->warps[this_fiber().warp].vote[lane]; }
inline void check_mask(unsigned mask, Site site) {
  const unsigned lane = this_fiber().lane;
  if (!((mask >> lane) & 1u)) {
    fail("emu: lane " + std::to_string(lane) + " of thread " + coords(this_fiber().idx) +
         " calls a warp collective whose mask does not name it, at " + site.str());
  }
}

#endif

// Lane `src` of the calling lane's `width`-lane segment, as __shfl*_sync compute it; -1: keep the
// caller's own value.
template <typename T>
inline T shuffle(unsigned mask, T v, int src, Site site) {
  check_mask(mask, site);
  const unsigned lane = lane_id();
  warp_slot(lane) = to_slot(v);
  warp_wait(mask, site);
  T out = v;
  if (src >= 0) {
#if !defined(EMU_OS_THREADS)
    if (!((mask >> src) & 1u)) {
      fail("emu: lane " + std::to_string(lane) + " shuffles from lane " + std::to_string(src) +
           ", which the mask does not name, at " + site.str());
    }
#endif
    out = from_slot<T>(warp_slot(unsigned(src)));
  }
  warp_wait(mask, site);  // nobody writes the next value before every lane read this one
  return out;
}

template <typename T>
inline T shfl(unsigned mask, T v, int src_lane, int width, Site site) {
  const int lane = int(lane_id());
  const int base = lane / width * width;
  return shuffle(mask, v, base + ((src_lane % width) + width) % width, site);
}
template <typename T>
inline T shfl_down(unsigned mask, T v, unsigned delta, int width, Site site) {
  const int lane = int(lane_id());
  const int src = lane + int(delta);
  return shuffle(mask, v, src / width == lane / width ? src : -1, site);
}
template <typename T>
inline T shfl_up(unsigned mask, T v, unsigned delta, int width, Site site) {
  const int lane = int(lane_id());
  const int src = lane - int(delta);
  return shuffle(mask, v, src >= lane / width * width ? src : -1, site);
}
template <typename T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, int width, Site site) {
  const int lane = int(lane_id());
  const int src = lane ^ lane_mask;
  return shuffle(mask, v, src / width == lane / width ? src : -1, site);
}

inline unsigned ballot(unsigned mask, int predicate, Site site) {
  check_mask(mask, site);
  warp_vote(lane_id()) = predicate != 0;
  warp_wait(mask, site);
  unsigned bits = 0;
  for (unsigned l = 0; l < unsigned(kWarp); ++l)
    if (((mask >> l) & 1u) && warp_vote(l)) bits |= 1u << l;
  warp_wait(mask, site);
  return bits;
}

inline void syncwarp(unsigned mask, Site site) {
  check_mask(mask, site);
  warp_wait(mask, site);
}

// ---- launches -----------------------------------------------------------------------------

// Launches so far (every kernel, every thread): what a test counts where a GPU test would ask the
// profiler.
inline std::atomic<uint64_t>& launches() {
  static std::atomic<uint64_t> n{0};
  return n;
}

template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;
  const char* name;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "emu: wrong number of kernel arguments");
    // The arguments converted to the parameters' types and copied once, as cudaLaunchKernel does.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    Grid g{grid, block, [&] { std::apply(kernel, params); }, name};
    launches().fetch_add(1);
    run_grid(g);
  }
};

template <typename... Params>
Launcher<Params...> launcher(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                             size_t dynamic_shared = 0, cudaStream_t = nullptr) {
  if (dynamic_shared != 0) throw Failure("emu: dynamic shared memory is not emulated");
  return Launcher<Params...>{kernel, grid, block, name};
}

}  // namespace emu

// ---- what kernels name ------------------------------------------------------------------------

#if defined(EMU_OS_THREADS)
#define threadIdx (::emu::tls_thread_idx)
#else
#define threadIdx (::emu::this_fiber().idx)
#endif
#define blockIdx (::emu::tls_block_idx)
#define blockDim (::emu::tls_block_dim)
#define gridDim (::emu::tls_grid_dim)
#define warpSize 32

#define EMU_SITE (::emu::Site{__FILE__, __LINE__})
#define __syncthreads() ((void)::emu::syncthreads(__FILE__, __LINE__))
#define __syncthreads_count(p) (::emu::syncthreads(__FILE__, __LINE__, (p) ? 1 : 0))
#define __syncthreads_or(p) (::emu::syncthreads(__FILE__, __LINE__, (p) ? 1 : 0) != 0)
#define __syncthreads_and(p) (::emu::syncthreads(__FILE__, __LINE__, (p) ? 0 : 1) == 0)
// Optional trailing arguments: the first of them, or the default d.
#define EMU_FIRST_OR(d, ...) EMU_FIRST_(__VA_OPT__(__VA_ARGS__, ) d)
#define EMU_FIRST_(x, ...) (x)
#define __syncwarp(...) ::emu::syncwarp(EMU_FIRST_OR(0xffffffffu, __VA_ARGS__), EMU_SITE)
#define __shfl_sync(mask, v, src, ...) ::emu::shfl((mask), (v), (src), EMU_FIRST_OR(32, __VA_ARGS__), EMU_SITE)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::emu::shfl_down((mask), (v), (delta), EMU_FIRST_OR(32, __VA_ARGS__), EMU_SITE)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::emu::shfl_up((mask), (v), (delta), EMU_FIRST_OR(32, __VA_ARGS__), EMU_SITE)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::emu::shfl_xor((mask), (v), (lane_mask), EMU_FIRST_OR(32, __VA_ARGS__), EMU_SITE)
#define __ballot_sync(mask, p) ::emu::ballot((mask), (p), EMU_SITE)
#define __any_sync(mask, p) (::emu::ballot((mask), (p), EMU_SITE) != 0)
#define __all_sync(mask, p) (::emu::ballot((mask), (p), EMU_SITE) == (mask))
#define __activemask() 0xffffffffu

// The launch: EMU_LAUNCH(kernel, grid, block[, shmem[, stream]])(args...). Sources that also
// compile under nvcc define their launch macro as `kernel<<<__VA_ARGS__>>>` there and as this here.
#define EMU_LAUNCH(kernel, ...) ::emu::launcher(#kernel, kernel, __VA_ARGS__)

// The occupancy queries a launcher sizes its grid with: sms x blocks_per_sm blocks.
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = ::emu::settings().blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? ::emu::settings().sms
           : attr == cudaDevAttrWarpSize          ? 32
                                                  : 1024;
  return cudaSuccess;
}

// The kernels for AVX2 and FMA. This TU alone is compiled for them, by the pragma
// below rather than by compiler flags (torch's cpp_extension gives one flag set to all sources);
// ops_cpu.cpp calls it only when the CPU reports those features. The pragma comes before every
// include so that the templates of rbd/philox.h are compiled for AVX2 too; see
// rbd/philox_simd.h for what such a TU must not include.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#define RBD_BUILD_THIS_ISA 1
#define RBD_SIMD_AVX2 1  // the ISA struct rbd/philox_simd.h provides
#endif

#include "kernels.h"

#ifdef RBD_BUILD_THIS_ISA
#include "kernels_simd.h"

namespace rbd {
namespace cpu {
namespace {
constexpr Kernels kTable = make_kernels<simd::Avx2>();
}  // namespace
// The callers check for AVX2; this table also needs FMA (every CPU with AVX2 so far has it).
const Kernels* avx2_kernels() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("fma") ? &kTable : nullptr;
}
}  // namespace cpu
}  // namespace rbd

#else
namespace rbd {
namespace cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace rbd
#endif

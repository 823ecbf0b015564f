// The kernels for AVX2. This TU alone is compiled for AVX2, by the pragma
// below rather than by compiler flags (torch's cpp_extension gives one flag set to all sources);
// ops_cpu.cpp calls it only when the CPU reports those features. The pragma comes before every
// include so that the templates of rbd/philox.h are compiled for AVX2 too; see
// rbd/philox_simd.h for what such a TU must not include.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2")
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
const Kernels* avx2_kernels() { return &kTable; }
}  // namespace cpu
}  // namespace rbd

#else
namespace rbd {
namespace cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace rbd
#endif

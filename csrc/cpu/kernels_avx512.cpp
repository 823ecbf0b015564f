// The kernels for AVX-512 (F, DQ, BW, VL). This TU alone is compiled for AVX-512, by the pragma
// below rather than by compiler flags (torch's cpp_extension gives one flag set to all sources);
// ops_cpu.cpp calls it only when the CPU reports those features. The pragma comes before every
// include so that the templates of rbd/philox.h are compiled for AVX-512 too; see
// rbd/philox_simd.h for what such a TU must not include.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#define RBD_BUILD_THIS_ISA 1
// GCC 12 reports the deliberately undefined source vector inside its own avx512fintrin.h
// intrinsics (e.g. _mm512_cvtepu32_epi64) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define RBD_SIMD_AVX512 1  // the ISA struct rbd/philox_simd.h provides
#endif

#include "kernels.h"

#ifdef RBD_BUILD_THIS_ISA
#include "kernels_simd.h"

namespace rbd {
namespace cpu {
namespace {
constexpr Kernels kTable = make_kernels<simd::Avx512>();
}  // namespace
const Kernels* avx512_kernels() { return &kTable; }
}  // namespace cpu
}  // namespace rbd

#else
namespace rbd {
namespace cpu {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace rbd
#endif

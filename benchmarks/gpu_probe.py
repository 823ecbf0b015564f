"""GPU probe: the instruction rates the CUDA kernels' rooflines assume, measured (docs/performance.md §2).

    python -m benchmarks.gpu_probe --out DIR        # a few seconds on an H100/H200

Each probe kernel runs 8 independent dependency chains of one PTX instruction per thread
(8 blocks of 256 threads per SM, every block the same), so the rate it reaches is the unit's
throughput, not its latency. Reported per SM and clock: operations over kernel time x SMs x the
SM clock, which is measured inside the kernels (clock64 cycles over %globaltimer nanoseconds,
median over blocks):

  imad_wide  mad.wide.u32 (IMAD.WIDE: Philox's 32x32->64 multiply)   imad  mad.lo.u32   imad_hi  mad.hi.u32
  ffma       fma.rn.f32      lop3  3-input XOR      i2f  cvt.rn.f32.u32 (which pipe: compare with mufu)
  mufu_rsq / mufu_lg2 / mufu_sin   the special-function unit (sin.approx includes its FMUL.RZ)
  i2f_mufu   I2F and MUFU rsqrt chains side by side: whether the conversion runs on the MUFU pipe
  philox10   rbd::stream_block calls (csrc/include/rbd/philox.h), 4 independent per step
  normal     the same calls turned into 4 normal entries by rbd::box_muller_polar, the CUDA
             kernels' Box–Muller

Needs CuPy (its nvcc backend compiles the probes against the project's header). Writes
gpu_probe.json and prints a table. Without a GPU, ``--compile-only`` compiles the same source with
nvcc for --arch and measures nothing (the CPU rehearsal, make gpu-check-cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAINS = 8
BLOCKS_PER_SM = 8
THREADS = 256

# name: (accumulator type, initial value, one step on acc[k] as PTX/C, ops counted per step)
PROBES = {
    "imad_wide": ("unsigned long long", "k", 'asm volatile("mad.wide.u32 %0, %1, %2, %0;" : "+l"(acc[k]) : "r"(a + k), "r"(b));', 1),
    "imad": ("unsigned", "k", 'asm volatile("mad.lo.u32 %0, %0, %1, %2;" : "+r"(acc[k]) : "r"(b), "r"(a));', 1),
    "imad_hi": ("unsigned", "k", 'asm volatile("mad.hi.u32 %0, %0, %1, %0;" : "+r"(acc[k]) : "r"(b));', 1),
    "ffma": ("float", "k * 0.5f", 'asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(acc[k]) : "f"(fb), "f"(fa));', 1),
    "lop3": ("unsigned", "k", 'asm volatile("lop3.b32 %0, %0, %1, %2, 0x96;" : "+r"(acc[k]) : "r"(a), "r"(b));', 1),
    "i2f": ("unsigned", "k + a", 'asm volatile("{.reg .f32 f; cvt.rn.f32.u32 f, %0; mov.b32 %0, f;}" : "+r"(acc[k]));', 1),
    "mufu_rsq": ("float", "k + 2.0f", 'asm volatile("rsqrt.approx.ftz.f32 %0, %0;" : "+f"(acc[k]));', 1),
    "mufu_lg2": ("float", "k + 1e30f", 'asm volatile("lg2.approx.ftz.f32 %0, %0;" : "+f"(acc[k]));', 1),
    "mufu_sin": ("float", "k + 0.5f", 'asm volatile("sin.approx.ftz.f32 %0, %0;" : "+f"(acc[k]));', 1),
    # half the chains I2F, half MUFU rsqrt: about the rate of either alone if they share a pipe,
    # about the sum of half of each if they do not
    "i2f_mufu": ("float", "k + 2.0f", ('if (k & 1) asm volatile("rsqrt.approx.ftz.f32 %0, %0;" : "+f"(acc[k])); '
                                       'else asm volatile("{.reg .u32 u; mov.b32 u, %0; cvt.rn.f32.u32 %0, u;}" '
                                       ': "+f"(acc[k]));'), 1),
}

SOURCE_HEAD = r"""
#include "rbd/philox.h"
#define PROBE_PROLOGUE(T)                                                                      \
  const unsigned a = threadIdx.x | 1u, b = blockIdx.x * 2654435761u | 1u;                    \
  const float fa = 1e-7f * float(a), fb = 0.999f;                                              \
  (void)a, (void)b, (void)fa, (void)fb;                                                        \
  T acc[8];                                                                                    \
  _Pragma("unroll") for (int k = 0; k < 8; ++k) acc[k] = (T)(INIT);                           \
  unsigned long long t0, g0, t1, g1;                                                           \
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));                                      \
  t0 = clock64();
#define PROBE_EPILOGUE(T)                                                                      \
  t1 = clock64();                                                                              \
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));                                      \
  T s = acc[0];                                                                                \
  _Pragma("unroll") for (int k = 1; k < 8; ++k) s = s + acc[k];                               \
  sink[blockIdx.x * blockDim.x + threadIdx.x] = (unsigned long long)(s);                       \
  if (threadIdx.x == 0) { clk[2 * blockIdx.x] = t1 - t0; clk[2 * blockIdx.x + 1] = g1 - g0; }
"""

KERNEL = r"""
#define INIT {init}
extern "C" __global__ void __launch_bounds__(256) probe_{name}(unsigned long long* sink, int iters,
                                                              unsigned long long* clk) {{
  PROBE_PROLOGUE({T})
  for (int i = 0; i < iters; ++i) {{
#pragma unroll
    for (int k = 0; k < 8; ++k) {{ {step} }}
  }}
  PROBE_EPILOGUE({T})
}}
#undef INIT
"""

# Philox alone and with the kernels' Box–Muller: 4 independent calls per step (x: the call's
# words), folded into the accumulators.
RNG_KERNEL = r"""
#define INIT 0
extern "C" __global__ void __launch_bounds__(256) probe_{name}(unsigned long long* sink, int iters,
                                                              unsigned long long* clk) {{
  PROBE_PROLOGUE({T})
  for (int i = 0; i < iters; ++i) {{
#pragma unroll
    for (int k = 0; k < 4; ++k) {{
      const rbd::Philox4 x = rbd::stream_block(a + 256u * k, unsigned(i), 7u, 3u + k, 0x1234u, b);
      {body}
    }}
  }}
  PROBE_EPILOGUE({T})
}}
#undef INIT
"""
RNG_BODIES = {
    "philox10": ("unsigned", "acc[k] ^= x.w[0] ^ x.w[1] ^ x.w[2] ^ x.w[3];"),
    "normal": ("float", ("float r0, s0, c0, r1, s1, c1; rbd::box_muller_polar(x.w[0], x.w[1], r0, s0, c0); "
                         "rbd::box_muller_polar(x.w[2], x.w[3], r1, s1, c1); acc[k] += r0 * (c0 + s0) + r1 * (c1 + s1);")),
}
RNG_CALLS_PER_STEP = 4


def source() -> str:
    parts = [SOURCE_HEAD]
    for name, (T, init, step, _) in PROBES.items():
        parts.append(KERNEL.format(name=name, T=T, init=init, step=step))
    for name, (T, body) in RNG_BODIES.items():
        parts.append(RNG_KERNEL.format(name=name, T=T, body=body))
    return "\n".join(parts)


def run(iters: int, reps: int) -> dict:
    import cupy as cp

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    sms = props["multiProcessorCount"]
    arch = f"sm_{props['major']}{props['minor']}"
    # CuPy's nvcc backend adds the device's own -gencode; the header needs the project's include path.
    mod = cp.RawModule(code=source(), backend="nvcc", options=(f"-I{ROOT / 'csrc' / 'include'}",))
    blocks = sms * BLOCKS_PER_SM
    sink = cp.zeros(blocks * THREADS, dtype=cp.uint64)
    clk = cp.zeros(2 * blocks, dtype=cp.uint64)
    results = {}
    for name in [*PROBES, *RNG_BODIES]:
        kernel = mod.get_function(f"probe_{name}")
        per_step = CHAINS * PROBES[name][3] if name in PROBES else RNG_CALLS_PER_STEP
        n = iters if name in PROBES else max(1, iters // 16)
        kernel((blocks,), (THREADS,), (sink, cp.int32(n // 8), clk))  # warm-up
        best = None
        for _ in range(reps):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            kernel((blocks,), (THREADS,), (sink, cp.int32(n), clk))
            end.record()
            end.synchronize()
            ms = cp.cuda.get_elapsed_time(start, end)
            c = clk.get().reshape(-1, 2).astype(float)
            ghz = statistics.median(c[:, 0] / c[:, 1])
            # Over the whole launch (right also when fewer than BLOCKS_PER_SM blocks fit at once).
            ops = per_step * n * THREADS * blocks
            row = {"ops_per_sm_per_clk": ops / (ms * 1e-3 * ghz * 1e9 * sms), "sm_clock_ghz": ghz,
                   "kernel_ms": ms, "ops_per_s": ops / (ms * 1e-3)}
            if best is None or row["ops_per_sm_per_clk"] > best["ops_per_sm_per_clk"]:
                best = row
        results[name] = best
    return {"device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "sms": sms, "arch": arch, "blocks_per_sm": BLOCKS_PER_SM, "threads": THREADS, "chains": CHAINS,
            "iters": iters, "probes": results}


def compile_only(arch: str, out: Path) -> int:
    """Compiles the probes' source as CuPy's nvcc backend would, for ``arch``; 0 when it compiles."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("gpu_probe: --compile-only needs nvcc on the PATH", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "gpu_probe.cu"
        src.write_text(source())
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", f"-I{ROOT / 'csrc' / 'include'}", str(src),
               "-o", str(Path(tmp) / "gpu_probe.cubin")]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"gpu_probe: nvcc failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    res = {"compile_only": True, "arch": arch, "kernels": [f"probe_{n}" for n in [*PROBES, *RNG_BODIES]]}
    (out / "gpu_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"gpu_probe: {len(res['kernels'])} probe kernels compiled for {arch}; nothing measured (--compile-only)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("RBD_RESULTS_DIR", "results/gpu_probe"))
    ap.add_argument("--iters", type=int, default=16384, help="steps per thread of the one-instruction probes")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per probe (the fastest is kept)")
    ap.add_argument("--compile-only", action="store_true", help="compile the probes with nvcc, run nothing")
    ap.add_argument("--arch", default="sm_90", help="the target of --compile-only")
    args = ap.parse_args(argv)
    if args.compile_only:
        return compile_only(args.arch, Path(args.out))
    try:
        import cupy  # noqa: F401
    except ImportError:
        print("gpu_probe: CuPy is not installed; nothing measured", file=sys.stderr)
        return 1
    res = run(args.iters, args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['device']}: {res['sms']} SMs, {res['arch']}")
    print(f"{'probe':<10} {'per SM per clk':>15} {'SM GHz':>7} {'T ops/s':>8}  (Philox probes: calls)")
    for name, r in res["probes"].items():
        print(f"{name:<10} {r['ops_per_sm_per_clk']:>15.2f} {r['sm_clock_ghz']:>7.3f} {r['ops_per_s'] / 1e12:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The emulated CUDA kernels under the sanitizers, and against planted bugs.

    python tests/emu_check.py sanitize address   # fibers, AddressSanitizer (fiber switches annotated)
    python tests/emu_check.py sanitize thread    # one OS thread per GPU thread, ThreadSanitizer
    python tests/emu_check.py mutants --out tests/emu_mutants.md

Each builds its own copy of the emulated extension (csrc/emu/emu_ops.cpp, as setup.py's
rbd_cuda._emu, one g++ translation unit) and runs the emulated CUDA tests (tests/test_cuda.py,
``-k emu``) against it: the test fixture loads the library named by ``RBD_EMU_LIBRARY`` instead of
rbd_cuda._emu.

- ``sanitize``: small shapes only (``SANITIZE_TESTS``), grids of 2 blocks: under ThreadSanitizer every
  GPU thread is an OS thread, about a thousand times slower than the fibers. The sanitizer's runtime is preloaded
  (Python and torch are not instrumented). Exit status 1 on a report.
- ``mutants``: each mutant is csrc/ with one planted bug (MUTANTS); the tests must fail for each
  (stopping at the first failure). Writes a markdown table: mutant, caught or not, by which test,
  and the time. Exit status 1 when a mutant survives that is not marked equivalent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(csrc: Path, out: Path, extra: list[str]) -> Path:
    """The emulated extension from ``csrc`` (a copy of the project's), with ``extra`` g++ flags."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    includes = [csrc / "emu" / "include", csrc / "emu", csrc / "include", csrc, *map(Path, include_paths()),
                Path(sysconfig.get_paths()["include"])]
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-pragmas",
           "-DRBD_EMU", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *extra, *(f"-I{p}" for p in includes),
           str(csrc / "emu" / "emu_ops.cpp"), "-o", str(out),
           *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-pthread"]
    subprocess.run(cmd, check=True)
    return out


def run_tests(library: Path, selection: str, env: dict | None = None, timeout: float = 1800) -> tuple[bool, str]:
    """pytest on the emulated tests of test_cuda.py against ``library``: (passed, the first failure)."""
    environ = {**os.environ, "RBD_EMU_LIBRARY": str(library), **(env or {})}
    cmd = [sys.executable, "-m", "pytest", "-x", "-v", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py"),
           "-k", selection]
    try:
        run = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    output = run.stdout + run.stderr
    if run.returncode == 0:
        return True, output.strip().splitlines()[-1]
    lines = output.splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    if failed:
        return False, failed[0]
    started = [line.split()[0] for line in lines if line.startswith("tests/test_cuda.py::")]
    where = f" in {started[-1]}" if started else ""
    if run.returncode < 0:  # a crash (a wild store corrupting the heap, say): the test that was running
        return False, f"the process died of {signal.Signals(-run.returncode).name}{where}"
    return False, f"exit status {run.returncode}{where}"


# ---- sanitizers ---------------------------------------------------------------------------------

# Every kernel, every distribution, on small shapes; ThreadSanitizer's OS threads cost about a
# thousand times the fibers, so it takes one grouped case.
SANITIZE_TESTS = {
    "address": "emu and (philox_known or materialize_seeds or (materialize_matches and 3x7) or "
               "(project_matches and 4097x33 and float32) or (expand_inplace_matches and 4097x33 and float32) or "
               "(rademacher_products and 3x256) or grouped_ops_are_one_launch or bad_input)",
    "thread": "emu and (philox_known or (materialize_matches and 3x7) or (project_matches and 4097x33 and float32) "
              "or (expand_inplace_matches and 4097x33 and float32) or (rademacher_products and 3x256 and float32) "
              "or (grouped_ops_are_one_launch and rademacher) or bad_input)",
}


def sanitize(kind: str) -> int:
    runtime = {"address": "libasan.so", "thread": "libtsan.so"}[kind]
    # libstdc++ preloaded too: the sanitizer's __cxa_throw interceptor must find the real one
    # before a library that carries its own (torch's triton) throws, or the runtime aborts.
    preload = " ".join(subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                                      check=True).stdout.strip() for name in (runtime, "libstdc++.so"))
    flags = [f"-fsanitize={kind}"] + (["-DEMU_OS_THREADS"] if kind == "thread" else [])
    with tempfile.TemporaryDirectory() as tmp:
        library = build(ROOT / "csrc", Path(tmp) / "_emu.so", flags)
        env = {"LD_PRELOAD": preload,
               "EMU_SMS": "1",  # grids of 2 blocks: under ThreadSanitizer each block is 256 OS threads
               # Python and torch are not instrumented: leaks and their allocations are not ours.
               "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
               "TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"}
        start = time.perf_counter()
        passed, summary = run_tests(library, SANITIZE_TESTS[kind], env)
    print(f"{kind} sanitizer: {'clean' if passed else 'FAILED'} ({time.perf_counter() - start:.0f} s): {summary}")
    return 0 if passed else 1


# ---- mutants --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # under csrc/
    old: str   # must occur exactly once
    new: str
    equivalent: str = ""  # why surviving is right, for a mutant that changes nothing observable


MUTANTS = [
    Mutant("no barrier inside project_dense's tree reduction", "cuda/products.cu",
           "      if (rr < half) red[threadIdx.x] += red[threadIdx.x + (half << log_tj)];\n      __syncthreads();",
           "      if (rr < half) red[threadIdx.x] += red[threadIdx.x + (half << log_tj)];"),
    Mutant("no barrier before a block's first tree step (red written, not yet read)", "cuda/products.cu",
           "    red[threadIdx.x] = acc;\n    __syncthreads();", "    red[threadIdx.x] = acc;"),
    Mutant("no trailing barrier after a project_dense work item", "cuda/products.cu",
           "    if (rr == 0 && jj < cols) partial[s.partial + int64_t(ch) * s.dim + j] = red[jj];\n"
           "    __syncthreads();  // red is reused by the next item",
           "    if (rr == 0 && jj < cols) partial[s.partial + int64_t(ch) * s.dim + j] = red[jj];",
           equivalent="after the tree only rr = 0 threads read red[jj], their own slot (jj == threadIdx.x), and "
                      "the next item's first access is each thread writing its own slot: no thread touches "
                      "another's slot before the next barrier"),
    Mutant("tail edge block skipped", "cuda/products.cu", "  edge(b, hi);\n", ""),
    Mutant("interior starts one row block late", "cuda/products.cu",
           "const uint32_t n = uint32_t(b - a), first = uint32_t(a);",
           "const uint32_t n = uint32_t(b - a), first = uint32_t(a + 1);"),
    Mutant("reduce_kernel's shuffle tree starts at 8 instead of 16", "cuda/products.cu",
           "for (int off = 16; off > 0; off /= 2) t += __shfl_down_sync",
           "for (int off = 8; off > 0; off /= 2) t += __shfl_down_sync"),
    Mutant("reduce_kernel's lanes stride by 16 chunks instead of 32", "cuda/products.cu",
           "for (int64_t ch = lane; ch < s.n_chunks; ch += 32)", "for (int64_t ch = lane; ch < s.n_chunks; ch += 16)"),
    Mutant("Rademacher expand rebuilds its sign table without the barrier before it", "cuda/products.cu",
           "        const uint32_t nq = min(uint32_t(kGroupsPerStage), s.n_cols - q0);\n        __syncthreads();",
           "        const uint32_t nq = min(uint32_t(kGroupsPerStage), s.n_cols - q0);"),
    Mutant("normal/uniform expand stages coefficients without the barrier after", "cuda/products.cu",
           "        for (uint32_t t = threadIdx.x; t < n; t += kThreads) stage[t] = s.c[t0 + t];\n        __syncthreads();",
           "        for (uint32_t t = threadIdx.x; t < n; t += kThreads) stage[t] = s.c[t0 + t];"),
    Mutant("Rademacher project sums the lanes' columns without the barrier after writing them", "cuda/kernels.cuh",
           "  for (int k = 0; k < 32; ++k) red[threadIdx.x * 33 + k] = acc[k];\n  __syncthreads();",
           "  for (int k = 0; k < 32; ++k) red[threadIdx.x * 33 + k] = acc[k];"),
    Mutant("narrow last tile stores without its column guard", "cuda/products.cu",
           "if (rr == 0 && jj < cols) partial[", "if (rr == 0) partial["),
    Mutant("Rademacher project ignores the column shift", "cuda/products.cu",
           "const int64_t j = 32 * int64_t(q) + b - s.shift;", "const int64_t j = 32 * int64_t(q) + b;"),
    Mutant("expand's column lanes summed without the barrier after the exchange", "cuda/products.cu",
           "      for (int r = 0; r < 4; ++r) red[threadIdx.x * 4 + r] = acc[r];\n      __syncthreads();",
           "      for (int r = 0; r < 4; ++r) red[threadIdx.x * 4 + r] = acc[r];"),
    Mutant("expand writes a row past the segment's end", "cuda/products.cu",
           "if (i >= 0 && i < s.numel) out[i] =", "if (i >= 0 && i <= s.numel) out[i] ="),
    Mutant("find_segment's binary search rounds down", "cuda/products.cu",
           "const int mid = (lo + hi + 1) >> 1;\n    if (table[mid].item_begin <= item) lo = mid; else hi = mid - 1;",
           "const int mid = (lo + hi) >> 1;\n    if (table[mid].item_begin <= item) lo = mid + 1; else hi = mid;"),
    Mutant("a project chunk one row block short", "grouped.h",
           "p.chunk = std::clamp<int64_t>(ceil_div(n_rb, want), 1, kProjectMaxChunk);",
           "p.chunk = std::clamp<int64_t>(ceil_div(n_rb, want), 1, kProjectMaxChunk);\n"
           "  if (p.chunk > 1) --p.chunk;\n  p.n_chunks = ceil_div(n_rb, p.chunk) - (p.chunk > 1 ? 1 : 0);\n"
           "  return p;"),
    Mutant("materialize's counter one column late", "cuda/materialize.cu",
           "const Philox4 x = stream_block(uint32_t(rb), uint32_t(first_col + cidx), a.step, a.stream,\n"
           "                                     a.key0, a.key1);\n      float e[4];",
           "const Philox4 x = stream_block(uint32_t(rb), uint32_t(first_col + cidx + 1), a.step, a.stream,\n"
           "                                     a.key0, a.key1);\n      float e[4];"),
]


def mutants(out: Path | None) -> int:
    rows, survivors = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for k, m in enumerate(MUTANTS):
            csrc = Path(tmp) / f"m{k}" / "csrc"
            shutil.copytree(ROOT / "csrc", csrc)
            path = csrc / m.path
            text = path.read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"mutant {m.name!r}: its code occurs {text.count(m.old)} times in {m.path}")
            path.write_text(text.replace(m.old, m.new))
            start = time.perf_counter()
            library = build(csrc, csrc.parent / "_emu.so", [])
            passed, summary = run_tests(library, "emu")
            seconds = time.perf_counter() - start
            caught = not passed
            survivors += not caught and not m.equivalent
            verdict = "caught" if caught else ("survived: equivalent" if m.equivalent else "SURVIVED")
            by = summary if caught else (m.equivalent or summary)
            rows.append(f"| {m.name} | `{m.path}` | {verdict} | {by.replace('|', '/')} | {seconds:.0f} s |")
            print(rows[-1], flush=True)
    table = "\n".join(["| planted bug | file | result | first failing test (or why it may survive) | time |",
                       "|---|---|---|---|---|", *rows])
    if out:
        out.write_text(f"# Planted bugs in the CUDA kernels, run through the emulated tests\n\n"
                       f"`python tests/emu_check.py mutants --out {out.relative_to(ROOT)}` (each: build, then "
                       f"`pytest tests/test_cuda.py -k emu -x`).\n\n{table}\n")
    return 1 if survivors else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sanitize")
    s.add_argument("kind", choices=("address", "thread"))
    m = sub.add_parser("mutants")
    m.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.command == "sanitize":
        return sanitize(args.kind)
    return mutants(args.out.resolve() if args.out else None)


if __name__ == "__main__":
    sys.exit(main())

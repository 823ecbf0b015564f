"""The CPU kernels against the machine: per kernel and instruction set, one thread, fp32.

    python -m benchmarks.cpu_kernels                    # everything (about 10 minutes of CPU time)
    python -m benchmarks.cpu_kernels --quick            # small sizes, a smoke test (seconds)
    python -m benchmarks.cpu_kernels --only static      # the static counts alone, no timing
    python -m benchmarks.cpu_kernels --out DIR          # also write DIR/cpu_kernels.{json,md}

Prints four tables (issue 31):

1. **Kernels**, D = 1e6, d = 256: for `project` and `expand_` of each distribution on each path
   this CPU runs (`rbd_cuda.backends.cpu.isa`): entries/s per thread, static instructions and
   vector operations per entry of the kernel's hot loop (from the built library, below), cycles per
   entry from a measured clock, and the share of the issue bound: the kernel's vector operations at
   4 per cycle (two FMA/multiply and two add pipes on Zen 3 and 4, which also take the vector
   integer and logic operations) over the measured cycles.
2. **d sweep** at D = 101,770 (FC-MNIST), d = 1 … 1000: time per product on the best path, and the
   cost of d against d = 16 (normal, uniform) and d = 32 (Rademacher).
3. **torch side by side**, D = 1e6, d = 256: torch's product with P in memory (drawn once, not
   timed), the same with the draw, and a plain-torch regeneration loop (one seeded generator,
   `randn` per direction, a dot for `project`, an axpy for `expand_`).

Timing: thread CPU time (`time.thread_time`), one thread (torch runs its parallel loops inline),
methods interleaved round by round in one process and the median taken, so that other processes
on a shared machine cost neither wall time nor bias between methods. The clock is measured the
same way, between rounds, with a chain of dependent integer adds (one per cycle), compiled here
with the system C compiler.

Static counts (`static_counts`, no timing): `objdump -d` of each kernel function in the built
`rbd_cuda/_C*.so` (the kernel entry points are flattened: everything they call is inlined). The
loops are the backward branches; an inner loop with a constant trip count (a compare with an
immediate, its counter's initial value found before the loop) counts that many times, another
inner loop (over a vector's row blocks) `lanes` times. The hot loop is the innermost loop holding
both Philox multiplies (`vpmuludq`) and the kernel's entry marker; of several, the one generating
the most entries per pass (the wide tiles that d = 256 runs: the narrow widths' loops for d ≤ 8
generate fewer), the largest of those. Its entries per pass come from the markers: one square root
per 2·lanes normal entries, one int→float conversion per lanes uniform entries, one broadcast of
g per 32 Rademacher `project` entries. Rademacher `expand_` has no static count: its loop over a
column group's signed sums ends at a bound known only at run time (narrow requests stop early)
and the compiler splits it, so its trip count cannot be read from the code. Vector operations:
instructions on vector or mask registers other than moves, loads and stores; 512-bit ones count
twice (Zen 4 executes them as two 256-bit halves).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rbd_cuda
from benchmarks import common
from rbd_cuda import backends

DISTS = ("normal", "uniform", "rademacher")
OPS = ("project", "expand_")
LANES = {"baseline": 4, "avx2": 8, "avx512": 16}
ISSUE_WIDTH = 4  # vector operations per cycle (see the docstring)
SWEEP_D = 101_770
SWEEP_DIMS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
SEED = {"seed": 12345, "step": 3, "stream": 1}

# ---- static counts -------------------------------------------------------------------------

_SYMBOL = {"baseline": "Baseline", "avx2": "rbd::simd::Avx2", "avx512": "rbd::simd::Avx512"}
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*?)\s*$")
_JUMP = re.compile(r"^j[a-z]+$")
_MOVE = re.compile(r"^v?(mov|movdq|movap|movup|movs|movd|movq|maskmov|pmovmskb|extract|insert.128)")


def _kernel_symbols(so: Path) -> dict[tuple[str, str, str], str]:
    """(isa, op, dist) -> mangled symbol of the kernel's entry point (project_dist / expand_dist)."""
    out = {}
    names = subprocess.run(["nm", "-C", str(so)], capture_output=True, text=True, check=True).stdout
    mangled = subprocess.run(["nm", str(so)], capture_output=True, text=True, check=True).stdout
    for plain, raw in zip(names.splitlines(), mangled.splitlines()):
        m = re.search(r"::(project|expand)_dist<([^,]+), \(rbd::Distribution\)(\d)>", plain)
        if not m:
            continue
        isa = next((k for k, v in _SYMBOL.items() if v == m.group(2)), None)
        if isa:
            op = "project" if m.group(1) == "project" else "expand_"
            out[(isa, op, DISTS[int(m.group(3))])] = raw.split()[-1]
    return out


def _disassemble(so: Path, symbol: str) -> list[tuple[int, str, str]]:
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={symbol}", str(so)],
                          capture_output=True, text=True, check=True).stdout
    out = []
    for line in text.splitlines():
        m = _INSN.match(line)
        if m and not m.group(2).startswith("nop") and m.group(2) not in ("xchg", "data16", "cs"):
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def _is_vector_op(mnem: str, ops: str) -> int:
    """Issue slots of one instruction on the vector pipes: 0 (none), 1, or 2 (a 512-bit op)."""
    if not re.search(r"%[xyz]mm|%k[0-7]", ops) or mnem == "vzeroupper":
        return 0
    if _MOVE.match(mnem) or (mnem.startswith(("vbroadcast", "vpbroadcast")) and "(" in ops):
        return 0  # register moves are renamed away; loads and stores use the load/store pipes
    return 2 if "%zmm" in ops else 1


def _loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first index, last index) of each backward branch's range, outermost first."""
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    loops = set()
    for i, (addr, mnem, ops) in enumerate(code):
        if _JUMP.match(mnem):
            m = re.match(r"([0-9a-f]+)", ops)
            target = int(m.group(1), 16) if m else None
            if target is not None and target <= addr and target in index:
                loops.add((index[target], i))
    return sorted(loops, key=lambda r: (r[0], -r[1]))


def _trips(code, lo: int, hi: int) -> int | None:
    """The constant trip count of loop [lo, hi], or None: `cmp $N, %r` before the branch, `add $1`
    or `sub $1` on %r in the loop, and %r's last constant write before the loop."""
    for back in (1, 2):
        if hi - back < lo:
            return None
        mnem, ops = code[hi - back][1], code[hi - back][2]
        m = re.match(r"\$0x([0-9a-f]+),%(\w+)$", ops)
        if mnem.startswith("cmp") and m:
            limit, reg = int(m.group(1), 16), m.group(2)
            break
    else:
        return None
    base = re.sub(r"^[re]|[dwl]$", "", reg)
    same = re.compile(rf"%[re]?{base}[dwl]?$")
    if not any(c[1].startswith("add") and re.match(r"\$0x1,", c[2]) and same.search(c[2])
               for c in code[lo:hi]):
        return None
    for _, mnem, ops in reversed(code[:lo]):
        if same.search(ops):
            m = re.match(r"\$0x([0-9a-f]+),", ops)
            if mnem.startswith("mov") and m:
                return limit - int(m.group(1), 16)
            if mnem.startswith("xor") and ops.count(base) == 2:
                return limit
            return None
    return None


def _marker(isa: str, op: str, dist: str) -> tuple[re.Pattern, float] | None:
    """Instructions that mark the entries a pass generates, and entries per marker; None for
    Rademacher expand_ (no static count, see the docstring)."""
    lanes = LANES[isa]
    if dist == "normal":
        return re.compile(r"^v?sqrtps"), 2 * lanes
    if dist == "uniform":
        return re.compile(r"^v?cvtdq2ps"), lanes
    if op == "project":
        return re.compile(r"^v?broadcastss"), 32
    return None


def _count(code, lo, hi, loops, lanes, marker) -> tuple[float, float, float, float]:
    """Weighted (instructions, vector ops, markers, multiplies) of loop [lo, hi], inner loops
    multiplied by their trip counts."""
    inner = [(a, b) for a, b in loops if lo <= a and b <= hi and (a, b) != (lo, hi)]
    top = [(a, b) for a, b in inner if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in inner)]
    n = v = k = mul = 0.0
    i = lo
    while i <= hi:
        child = next(((a, b) for a, b in top if a == i), None)
        if child:
            t = _trips(code, *child) or lanes
            cn, cv, ck, cm = _count(code, child[0], child[1], loops, lanes, marker)
            n, v, k, mul = n + t * cn, v + t * cv, k + t * ck, mul + t * cm
            i = child[1] + 1
            continue
        _, mnem, ops = code[i]
        n += 1
        v += _is_vector_op(mnem, ops)
        k += bool(marker.match(mnem))
        mul += mnem == "vpmuludq"
        i += 1
    return n, v, k, mul


def static_counts(so: Path) -> dict[str, dict]:
    """'isa op dist' -> instructions and vector ops per entry of the kernel's hot loop."""
    out = {}
    for (isa, op, dist), symbol in sorted(_kernel_symbols(so).items()):
        if _marker(isa, op, dist) is None:
            continue
        code = _disassemble(so, symbol)
        marker, per_marker = _marker(isa, op, dist)
        loops = _loops(code)
        best = None
        for lo, hi in loops:
            n, v, k, mul = _count(code, lo, hi, loops, LANES[isa], marker)
            if not (k and mul):
                continue
            inner = any(a >= lo and b <= hi and (a, b) != (lo, hi) and all(_count(code, a, b, loops, LANES[isa], marker)[2:])
                        for a, b in loops)
            if not inner and (best is None or (k, n) > (best[2], best[0])):
                best = (n, v, k)
        if best:
            n, v, k = best
            entries = k * per_marker
            out[f"{isa} {op} {dist}"] = {"instructions_per_entry": n / entries, "vector_ops_per_entry": v / entries,
                                         "loop_instructions": n, "entries_per_pass": entries}
    return out


# ---- clock -----------------------------------------------------------------------------------

_CLOCK_C = r"""
#include <stdint.h>
#include <time.h>
/* Cycles per second of this thread: a chain of dependent adds (one per cycle) over thread CPU time. */
double rbd_clock_hz(uint64_t n) {
  struct timespec a, b;
  uint64_t x = 0;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
  for (uint64_t i = 0; i < n; ++i) __asm__ volatile(".rept 100\n\tadd $1, %0\n\t.endr" : "+r"(x));
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
  return 100.0 * n / ((b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec));
}
"""


def clock_function():
    tmp = Path(tempfile.mkdtemp(prefix="rbd_clock_"))
    (tmp / "clock.c").write_text(_CLOCK_C)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", str(tmp / "clock.c"), "-o",
                    str(tmp / "clock.so")], check=True)
    fn = ctypes.CDLL(str(tmp / "clock.so")).rbd_clock_hz
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_uint64]
    return lambda: fn(2_000_000)


# ---- timing ----------------------------------------------------------------------------------

def thread_seconds(fn, min_s: float) -> float:
    """Thread CPU seconds per call of ``fn``, calls repeated until ``min_s`` has passed."""
    calls, t0 = 0, time.thread_time()
    while True:
        fn()
        calls += 1
        t = time.thread_time() - t0
        if t >= min_s:
            return t / calls


def fused_call(isa: str, op: str, dist: str, D: int, d: int):
    g = torch.randn(D, generator=torch.Generator().manual_seed(1))
    c = torch.randn(d, generator=torch.Generator().manual_seed(2))
    out = torch.zeros(D)
    kw = {**SEED, "distribution": dist}

    def run():
        with backends.cpu.use_isa(isa):
            if op == "project":
                rbd_cuda.project(g, d, **kw)
            else:
                rbd_cuda.expand_(out, c, 1.0, **kw)
    return run


def interleave(methods: dict, rounds: int, min_s: float, clock=None) -> tuple[dict, list[float]]:
    """Median thread seconds per call of each method over ``rounds`` interleaved rounds; and the
    clock, measured after every round."""
    for fn in methods.values():
        fn()
    samples = {name: [] for name in methods}
    hz = []
    for _ in range(rounds):
        for name, fn in methods.items():
            samples[name].append(thread_seconds(fn, min_s))
        if clock:
            hz.append(clock())
    return {name: statistics.median(ts) for name, ts in samples.items()}, hz


def kernel_table(isas, D, d, rounds, min_s, counts, clock) -> tuple[list[dict], float]:
    methods = {(isa, op, dist): fused_call(isa, op, dist, D, d) for isa in isas for dist in DISTS for op in OPS}
    times, hz = interleave(methods, rounds, min_s, clock)
    ghz = statistics.median(hz) / 1e9
    rows = []
    for (isa, op, dist), t in times.items():
        rate = D * d / t
        cycles = ghz * 1e9 / rate
        st = counts.get(f"{isa} {op} {dist}", {})
        vops = st.get("vector_ops_per_entry")
        rows.append({"isa": isa, "op": op, "dist": dist, "G_entries_per_s": rate / 1e9, "seconds": t,
                     "cycles_per_entry": cycles, "instructions_per_entry": st.get("instructions_per_entry"),
                     "vector_ops_per_entry": vops,
                     "issue_bound_share": vops / ISSUE_WIDTH / cycles if vops else None})
    return rows, ghz


def sweep_table(isa, D, dims, rounds, min_s) -> list[dict]:
    methods = {(op, dist, d): fused_call(isa, op, dist, D, d) for dist in DISTS for op in OPS for d in dims}
    times, _ = interleave(methods, rounds, min_s)
    rows = []
    for (op, dist, d), t in times.items():
        ref = 32 if dist == "rademacher" else 16
        rows.append({"isa": isa, "op": op, "dist": dist, "D": D, "d": d, "seconds": t, "ns_per_row": t / D * 1e9,
                     "vs_ref_d": t / times[(op, dist, ref)] if ref in dims else None, "ref_d": ref})
    return rows


def torch_table(D, d, rounds, min_s) -> list[dict]:
    """torch side by side (normal entries): P in memory, P drawn and used, and regenerated by direction."""
    g, c = torch.randn(D), torch.randn(d)
    P = torch.randn(D, d)
    gen = torch.Generator()

    def regen_project():
        gen.manual_seed(7)
        out = torch.empty(d)
        for j in range(d):
            out[j] = torch.dot(torch.randn(D, generator=gen), g)
        return out

    def regen_expand():
        gen.manual_seed(7)
        u = torch.zeros(D)
        for j in range(d):
            u.add_(torch.randn(D, generator=gen), alpha=float(c[j]))
        return u

    def drawn(op):
        def run():
            Q = torch.randn(D, d, generator=gen.manual_seed(7))
            return Q.T @ g if op == "project" else Q @ c
        return run

    methods = {
        ("fused", "project"): fused_call(backends.cpu.isas[0], "project", "normal", D, d),
        ("fused", "expand_"): fused_call(backends.cpu.isas[0], "expand_", "normal", D, d),
        ("torch, P in memory", "project"): lambda: P.T @ g,
        ("torch, P in memory", "expand_"): lambda: P @ c,
        ("torch, P drawn per call", "project"): drawn("project"),
        ("torch, P drawn per call", "expand_"): drawn("expand_"),
        ("torch, regenerated per direction", "project"): regen_project,
        ("torch, regenerated per direction", "expand_"): regen_expand,
    }
    times, _ = interleave(methods, rounds, min_s)
    return [{"method": m, "op": op, "seconds": t, "G_entries_per_s": D * d / t / 1e9,
             "vs_fused": t / times[("fused", op)]} for (m, op), t in times.items()]


# ---- output ------------------------------------------------------------------------------------

def _f(x, spec=".3g"):
    return "–" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    lines = [f"{result['machine']['cpu']}, clock measured {result['clock_ghz']:.2f} GHz, one thread, fp32, "
             f"commit {result['machine']['commit']}, `{result['machine']['command']}`", ""]
    if result.get("kernels"):
        D, d = result["kernel_shape"]
        lines += [f"Kernels, D = {D:,}, d = {d}:", "",
                  "| kernel | ISA | G entries/s | instructions / entry | vector ops / entry | cycles / entry | "
                  "share of the issue bound |", "|---|---|---|---|---|---|---|"]
        for r in result["kernels"]:
            lines.append(f"| {r['dist']} {r['op']} | {r['isa']} | {r['G_entries_per_s']:.3g} | "
                         f"{_f(r['instructions_per_entry'])} | {_f(r['vector_ops_per_entry'])} | "
                         f"{r['cycles_per_entry']:.3g} | "
                         f"{_f(r['issue_bound_share'] and 100 * r['issue_bound_share'], '.0f')}{'' if r['issue_bound_share'] is None else ' %'} |")
        lines.append("")
    elif result.get("static"):
        lines += ["| kernel | instructions / entry | vector ops / entry | loop instructions | entries per pass |",
                  "|---|---|---|---|---|"]
        for name, s in result["static"].items():
            lines.append(f"| {name} | {s['instructions_per_entry']:.3g} | {s['vector_ops_per_entry']:.3g} | "
                         f"{s['loop_instructions']:.0f} | {s['entries_per_pass']:.0f} |")
        lines.append("")
    if result.get("sweep"):
        rows = result["sweep"]
        dims = sorted({r["d"] for r in rows})
        lines += [f"d sweep, D = {rows[0]['D']:,}, {rows[0]['isa']}: µs per product (× the time at d = 16; "
                  "Rademacher: d = 32)", "",
                  "| kernel | " + " | ".join(f"d = {d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
        for dist in DISTS:
            for op in OPS:
                cells = [next(r for r in rows if r["dist"] == dist and r["op"] == op and r["d"] == d) for d in dims]
                lines.append(f"| {dist} {op} | " + " | ".join(
                    f"{1e6 * r['seconds']:.0f} ({_f(r['vs_ref_d'], '.2f')})" for r in cells) + " |")
        lines.append("")
    if result.get("torch"):
        D, d = result["kernel_shape"]
        lines += [f"torch side by side, normal entries, D = {D:,}, d = {d}:", "",
                  "| method | op | G entries/s | time × fused |", "|---|---|---|---|"]
        for r in result["torch"]:
            lines.append(f"| {r['method']} | {r['op']} | {r['G_entries_per_s']:.3g} | {r['vs_fused']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds: a smoke test")
    p.add_argument("--only", choices=("static", "kernels", "sweep", "torch"), nargs="+",
                   help="parts to run (default: all)")
    p.add_argument("--isas", nargs="+", default=None, help="paths to time (default: all this CPU runs)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 2)")
    p.add_argument("--out", type=Path, default=None, help="folder for cpu_kernels.json and .md")
    args = p.parse_args(argv)
    parts = set(args.only or ("static", "kernels", "sweep", "torch"))
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 7)
    min_s = 0.02 if args.quick else 0.2
    D, d = (20_000, 64) if args.quick else (1_000_000, 256)
    isas = args.isas or backends.cpu.isas
    so = next(Path(rbd_cuda.__file__).parent.glob("_C*.so"))
    info = common.machine_info("cpu", sys.argv[1:] if argv is None else argv)
    info["command"] = info["command"].replace("ops_bench", "cpu_kernels")
    result = {"machine": info, "library": str(so), "kernel_shape": [D, d], "static": static_counts(so)}
    clock = clock_function()
    result["clock_ghz"] = statistics.median(clock() for _ in range(5)) / 1e9
    if "kernels" in parts:
        result["kernels"], result["clock_ghz"] = kernel_table(isas, D, d, rounds, min_s, result["static"], clock)
    if "sweep" in parts:
        dims = (1, 16, 32, 64) if args.quick else SWEEP_DIMS
        result["sweep"] = sweep_table(isas[0], 4_000 if args.quick else SWEEP_D, dims, rounds, min_s)
    if "torch" in parts:
        result["torch"] = torch_table(D, d, max(2, rounds // 2), min_s)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        common.write_json(args.out / "cpu_kernels.json", result)
        (args.out / "cpu_kernels.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

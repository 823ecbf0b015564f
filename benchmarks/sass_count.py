"""Static instruction count of the CUDA kernels' hot loops, from their SASS (no GPU needed).

    python -m benchmarks.sass_count FILE [FILE ...] [--match REGEX]   # FILE: the built .so, or a .cubin

Per kernel: of the innermost loops (backward-branch ranges) that hold a Philox call (16 or more
IMAD.WIDE.U32: 20 per call, fewer where the compiler hoists loop-invariant ones), the one with the
most calls, and its instructions (NOPs aside) over the entries its calls generate (4 per call; Rademacher 128).
Both sides of the loop's branches count, so the figure is an upper bound on what one pass issues
(docs/performance.md, "Static counts"). Needs cuobjdump: on the PATH, or the one Triton's wheel
carries.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

MULS_PER_CALL = 20
MIN_MULS = 16
_ARCH = re.compile(r"^\s*arch = (sm_\w+)")
_FUNC = re.compile(r"Function : (\S+)")
_INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA (?:!?U?P[T\d], )?0x([0-9a-f]+)")


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel -> [(address, instruction)] from ``cuobjdump -sass`` output; a kernel is named
    "NAME (sm_XY)" where the listing gives its architecture (a build for several has one each)."""
    out: dict[str, list[tuple[int, str]]] = {}
    current, arch = None, None
    for line in sass.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC.search(line)
        if m:
            current = m.group(1) + (f" ({arch})" if arch else "")
            out[current] = []
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            out[current].append((int(m.group(1), 16), m.group(2)))
    return out


def hot_loop(instrs: list[tuple[int, str]]) -> list[str] | None:
    """Of the innermost loops (backward-branch ranges containing no other) that hold at least
    MIN_MULS IMAD.WIDE.U32, the one with the most: an unrolled main loop rather than its one-column
    tail loop. Its instructions, NOPs dropped."""
    loops = []
    for addr, ins in instrs:
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr:
            body = [i for a, i in instrs if int(m.group(1), 16) <= a <= addr and not i.startswith("NOP")]
            muls = sum("IMAD.WIDE.U32" in i for i in body)
            if muls >= MIN_MULS:
                loops.append((int(m.group(1), 16), addr, muls, body))
    inner = [lp for lp in loops
             if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    if not inner:
        return None
    return max(inner, key=lambda lp: (lp[2], -len(lp[3])))[3]


def per_entry(name: str, body: list[str]) -> tuple[int, float]:
    """(Philox calls in the loop, instructions per generated entry)."""
    calls = -(-sum("IMAD.WIDE.U32" in i for i in body) // MULS_PER_CALL)
    rademacher = "DistributionE2E" in name or "rademacher" in name
    return calls, len(body) / (calls * (128 if rademacher else 4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--match", default="", help="only kernels whose mangled name (and architecture) matches this regex")
    args = ap.parse_args(argv)
    tool = cuobjdump()
    if tool is None:
        ap.error("no cuobjdump on the PATH or in Triton's wheel")
    for path in args.files:
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        kernels = {n: i for n, i in functions(sass).items() if re.search(args.match, n)}
        if not kernels:
            print(f"{path}: no device code{' matching ' + args.match if args.match else ''}", file=sys.stderr)
            return 1
        print(f"{path}:")
        for name, instrs in kernels.items():
            body = hot_loop(instrs)
            if body is not None:
                calls, ipe = per_entry(name, body)
                print(f"  {ipe:6.2f} instr/entry  {len(body):4d} instr, {calls} calls  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

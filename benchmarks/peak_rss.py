"""Child process of ``common.rss_high_water_jobs``: the CPU peak memory of each job read from stdin.

    python -m benchmarks.peak_rss THREADS < jobs.json   ->  one JSON list of bytes on stdout

A job is {"method", "op", "case" (methods.Case fields), "chunk_rows"}. Run in a fresh process
because the resident high-water mark of the benchmarking process only ever grows.
"""

from __future__ import annotations

import ctypes
import json
import sys

import torch

from benchmarks import methods


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_high_water() -> None:
    # "5" resets VmHWM to the current resident size (Linux >= 4.0, proc(5)).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_LIBC = ctypes.CDLL("libc.so.6")


def _release_free_memory() -> None:
    # Freed heap chunks stay resident, and a later allocation served from them would not raise the
    # high-water mark: malloc_trim(0) hands every free page back (madvise), so reuse is counted.
    _LIBC.malloc_trim(0)


def main() -> int:
    torch.set_num_threads(int(sys.argv[1]))
    jobs = json.load(sys.stdin)
    # One tiny call of every kind first: loading code, starting thread pools and first-call
    # caches are not the call's memory.
    warm = {(j["method"], j["op"], j["case"]["dtype"], j["case"]["dist"]): j for j in jobs}
    for j in warm.values():
        case = methods.Case(**{**j["case"], "D": 64, "d": 8})
        methods.build(j["method"], j["op"], case, methods.make_inputs(case), 16)()
    peaks = []
    for job in jobs:
        case = methods.Case(**job["case"])
        x = methods.make_inputs(case)
        fn = methods.build(job["method"], job["op"], case, x, job["chunk_rows"])
        _release_free_memory()
        _reset_high_water()
        before = _status_kib("VmRSS")
        result = fn()
        peaks.append((_status_kib("VmHWM") - before) * 1024)
        del result, fn, x
    print(json.dumps(peaks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

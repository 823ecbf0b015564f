"""Helpers shared by the benchmark scripts: timing, peak memory, machine facts, rooflines, output.

Timing follows docs/performance.md §3: warm-up first, then the methods of one case are
interleaved round by round in the same process (method A, B, C, A, B, C, ...) so that clock and
load drift hit them alike, and the median is reported with p10/p90.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn: Callable[[], object], device: str, batch: int) -> float:
    """Seconds for ``batch`` back-to-back calls of ``fn`` (CUDA events on GPU), divided by ``batch``."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / batch
    t0 = time.perf_counter()
    for _ in range(batch):
        fn()
    return (time.perf_counter() - t0) / batch


def interleaved(methods: dict[str, Callable[[], object]], device: str, *, reps: int, min_reps: int,
                budget_s: float, min_sample_s: float) -> dict[str, dict]:
    """Time every method in ``methods`` round by round; returns per name median, p10, p90, samples.

    One warm-up call each (allocator growth, thread pools, cuBLAS heuristics). Calls shorter than
    ``min_sample_s`` are batched so one sample spans at least that long (timer resolution and launch
    jitter). A method stops after ``reps`` samples, or earlier once it has ``min_reps`` samples and
    has used ``budget_s`` seconds: the slow baselines would otherwise dominate the run time.
    """
    batch, samples, spent = {}, {name: [] for name in methods}, dict.fromkeys(methods, 0.0)
    for name, fn in methods.items():
        sync(device)
        t = _once(fn, device, 1)
        batch[name] = max(1, min(1000, int(min_sample_s / max(t, 1e-9))))
    while True:
        active = [n for n in methods if len(samples[n]) < reps
                  and not (len(samples[n]) >= min_reps and spent[n] >= budget_s)]
        if not active:
            break
        for name in active:
            sync(device)
            t = _once(methods[name], device, batch[name])
            samples[name].append(t)
            spent[name] += t * batch[name]
    out = {}
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        out[name] = {"median_s": statistics.median(ts), "p10_s": q[0], "p90_s": q[8], "samples": len(ts),
                     "batch": batch[name]}
    return out


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes ``fn`` allocates at its peak beyond what is allocated before it (torch's allocator)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


def rss_high_water_jobs(jobs: list[dict], threads: int) -> list[int]:
    """CPU peak memory of each job, measured in one fresh child process (``benchmarks.peak_rss``).

    Per job the child builds the inputs, resets its own resident high-water mark (VmHWM, via
    /proc/self/clear_refs), runs the call once and reports VmHWM minus the resident size before the
    call. VmHWM is per process, so other processes on the machine cannot inflate it; glibc is told to
    return every allocation over 128 KiB to the kernel on free (fixed mmap threshold), so memory
    freed by an earlier job cannot be reused unseen and hide a later job's peak.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peak_rss", str(threads)], input=json.dumps(jobs),
        capture_output=True, text=True, cwd=REPO, env=env, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(device: str, argv: list[str], module: str = "benchmarks.ops_bench") -> dict:
    """The machine, the versions, the commit and the command (``python -m module argv``) of a run."""
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"python -m {module} " + " ".join(argv),
        # A copy without .git (the device machine's): the commit its caller names in RBD_COMMIT.
        "commit": _run(["git", "rev-parse", "--short", "HEAD"]) or os.environ.get("RBD_COMMIT") or "unknown",
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
        info["isa"] = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    except (OSError, AttributeError):
        info["isa"] = "unknown"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda)
        clocks = _run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,driver_version",
                       "--format=csv,noheader,nounits"])
        if clocks:
            sm, sm_max, driver = (s.strip() for s in clocks.splitlines()[0].split(","))
            info.update(sm_clock_mhz=float(sm), sm_clock_max_mhz=float(sm_max), driver=driver)
    return info


# Ceilings for "fraction of roofline". GPU: docs/performance.md §2, best-case entries per SM per clock
# (IMAD.WIDE at full rate, fast-math Box-Muller, per-bit Rademacher), times SMs and SM clock.
GPU_ENTRIES_PER_SM_CLK = {"normal": 7.3, "uniform": 9.8, "rademacher": 29.0}
# CPU: no measured CPU ceiling, only an instruction-count estimate (docs/performance.md §1):
# Philox4x32-10 vectorised over 16 lanes costs about 1 cycle per 32-bit word per core with AVX-512
# (2 with AVX2, 4 with 128-bit SSE). Per entry, best case:
#   uniform     1 word + a mask/or/FMA shared by 16 lanes           -> 1 cycle x ISA factor
#   normal      1 word + vectorised Box-Muller, 2 cycles at best    -> 1 x ISA factor + 2
#   rademacher  1/32 word + sign XOR and add, ~3 vector uops per 16 lanes at 2 uops/cycle
#                                                                   -> (1/32) x ISA factor + 3/32
# These are upper bounds on what a kernel could reach, not measurements; fractions of them say how
# far a kernel is from the generator's floor on this machine.
CPU_WORD_CYCLES = {"avx512": 1.0, "avx2": 2.0, "sse": 4.0, "unknown": 4.0}


def cpu_cycles_per_entry(dist: str, isa: str) -> float:
    w = CPU_WORD_CYCLES[isa]
    return {"uniform": w, "normal": w + 2.0, "rademacher": w / 32 + 3 / 32}[dist]


def cpu_ghz(info: dict) -> float:
    m = re.search(r"@\s*([\d.]+)\s*GHz", info.get("cpu", ""))
    if m:
        return float(m.group(1))
    try:
        with open("/proc/cpuinfo") as f:
            return float(re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read()).group(1)) / 1e3
    except (OSError, AttributeError):
        return float("nan")


def roofline(device: str, info: dict, threads: list[int]) -> dict:
    """Entries/s ceilings per distribution (per thread count on CPU), with how they were derived."""
    dists = ("normal", "uniform", "rademacher")
    if device == "cuda":
        mhz = info.get("sm_clock_max_mhz", 1980.0)
        sms = info["sms"]
        return {"basis": f"docs/performance.md §2.1 best-case entries/SM/clk x {sms} SMs x {mhz:.0f} MHz "
                         f"({'nvidia-smi clocks.max.sm' if 'sm_clock_max_mhz' in info else 'assumed'})",
                "entries_per_s": {str(t): {dist: GPU_ENTRIES_PER_SM_CLK[dist] * sms * mhz * 1e6 for dist in dists}
                                  for t in threads}}
    ghz, isa = cpu_ghz(info), info.get("isa", "unknown")
    return {"basis": f"instruction-count estimate (benchmarks/common.py, from docs/performance.md §1): "
                     f"{isa}, {ghz} GHz, cycles/entry " +
                     ", ".join(f"{dist} {cpu_cycles_per_entry(dist, isa):.3g}" for dist in dists) +
                     "; x threads (one core each)",
            "entries_per_s": {str(t): {dist: t * ghz * 1e9 / cpu_cycles_per_entry(dist, isa) for dist in dists}
                              for t in threads}}


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{int(b)} B" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    raise AssertionError("unreachable")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")

"""Fused project/expand against "materialise P with torch, then multiply", side by side.

    python -m benchmarks.ops_bench --device cpu --out results/cpu
    python -m benchmarks.ops_bench --device cuda --preset gpu --out results/gpu

For each (distribution, D, d, input dtype) it first checks the fused ops (the
pass-consistency identity gᵀ(P c) = ‖c‖² with c = Pᵀg, and agreement with a
materialised P on a slice), then times, in one process and interleaved:
  fused project      c = Pᵀg, P generated inside the product
  fused expand       u = P c
  torch product      P drawn into memory with torch (randn / uniform_ / randint), then one matvec
  torch step         P drawn once, then both matvecs (the cheapest materialised RBD step)
Reports median times, G entries/s (entries = D·d per product), the fused/torch
ratios, and peak memory beyond the inputs (CUDA: max_memory_allocated; CPU: growth of the
resident high-water mark in a fresh process).
Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import rbd_cuda

PRESETS = {
    # D, d pairs
    "cpu": [(1_000_000, 256)],
    "quick": [(100_000, 64)],
    "gpu": [(1_000_000, 256), (10_000_000, 100), (1 << 24, 1024), (100_000_000, 1000)],
}
# Materialising P is skipped above this many bytes (fp32 P must fit beside everything else).
MATERIALIZE_LIMIT = {"cpu": 4 << 30, "cuda": 80 << 30}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


_CPU_PEAK_CHILD = """
import sys, torch, rbd_cuda
from benchmarks.ops_bench import draw

def high_water_kib():
    # VmHWM belongs to this process's memory map; ru_maxrss would carry the parent's peak
    # across fork + exec and hide anything smaller.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

D, d, dist, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
g, c, out = torch.randn(D), torch.randn(d), torch.zeros(D)
kw = {"seed": 1, "distribution": dist}
rbd_cuda.project(g[:64], 8, **kw)  # load everything the first call loads
before = high_water_kib()
if what == "project":
    rbd_cuda.project(g, d, **kw)
elif what == "expand":
    rbd_cuda.expand_(out, c, 1.0, **kw)
else:
    draw(D, d, dist, "cpu", torch.Generator().manual_seed(0)).T @ g
print((high_water_kib() - before) * 1024)
"""


def peak_memory(what: str, D: int, d: int, dist: str, device: str, fn) -> int:
    """Bytes the call needs at its peak beyond its inputs (g, c, out) already in memory.

    CUDA: growth of max_memory_allocated. CPU: growth of the resident high-water mark (VmHWM),
    measured in a fresh process (this one's only ever grows).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    result = subprocess.run(
        [sys.executable, "-c", _CPU_PEAK_CHILD, str(D), str(d), dist, what],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )
    return int(result.stdout.strip().splitlines()[-1])


def draw(D: int, d: int, dist: str, device: str, gen: torch.Generator) -> torch.Tensor:
    if dist == "normal":
        return torch.randn(D, d, device=device, generator=gen)
    if dist == "uniform":
        return torch.empty(D, d, device=device).uniform_(-1.0, 1.0, generator=gen)
    signs = torch.randint(0, 2, (D, d), device=device, generator=gen, dtype=torch.int8)
    return signs.to(torch.float32).mul_(2.0).sub_(1.0)


def check(D: int, d: int, dist: str, device: str, dtype: torch.dtype) -> dict:
    """Pass consistency on the full size and agreement with materialize on a slice."""
    kw = {"seed": 1234, "step": 7, "stream": 3, "distribution": dist}
    g = torch.randn(D, device=device).to(dtype)
    c = rbd_cuda.project(g, d, **kw).float()
    u = rbd_cuda.expand(c, D, **kw)
    lhs = torch.dot(g.double(), u.double()).item()
    rhs = torch.dot(c.double(), c.double()).item()
    consistency = abs(lhs - rhs) / max(rhs, 1e-30)
    n = min(D, 4096)
    P = rbd_cuda.materialize(n, d, device=device, **kw).double()
    c_slice = rbd_cuda.project(g[:n].float(), d, **kw).double()
    ref = P.T @ g[:n].double()
    slice_err = ((c_slice - ref).norm() / ref.norm()).item()
    ok = consistency < 1e-3 and slice_err < 1e-4
    return {"pass_consistency_rel": consistency, "slice_rel_err": slice_err, "ok": ok}


def bench_case(D, d, dist, dtype, device, warmup, reps, gen) -> dict:
    kw = {"seed": 99, "step": 1, "stream": 0, "distribution": dist}
    g = torch.randn(D, device=device).to(dtype)
    c = torch.randn(d, device=device)
    out = torch.zeros(D, device=device, dtype=dtype)
    entries = D * d
    row = {"D": D, "d": d, "distribution": dist, "dtype": str(dtype).replace("torch.", "")}
    row.update(check(D, d, dist, device, dtype))

    fused_project = lambda: rbd_cuda.project(g, d, **kw)
    fused_expand = lambda: rbd_cuda.expand_(out, c, 1e-3, **kw)
    t_proj = timed(fused_project, device, warmup, reps)
    t_exp = timed(fused_expand, device, warmup, reps)
    row["project_s"] = statistics.median(t_proj)
    row["expand_s"] = statistics.median(t_exp)
    row["project_Gps"] = entries / row["project_s"] / 1e9
    row["expand_Gps"] = entries / row["expand_s"] / 1e9
    row["fused_project_peak_bytes"] = peak_memory("project", D, d, dist, device, fused_project)
    row["fused_expand_peak_bytes"] = peak_memory("expand", D, d, dist, device, fused_expand)
    row["g_plus_c_bytes"] = g.numel() * g.element_size() + d * 4

    if 4 * entries <= MATERIALIZE_LIMIT[device] and dtype == torch.float32:
        def torch_product():
            P = draw(D, d, dist, device, gen)
            return P.T @ g

        def torch_step():
            P = draw(D, d, dist, device, gen)
            cc = P.T @ g
            return P @ cc

        t_tp = timed(torch_product, device, 1, max(3, reps // 2))
        t_ts = timed(torch_step, device, 1, max(3, reps // 2))
        row["torch_product_s"] = statistics.median(t_tp)
        row["torch_step_s"] = statistics.median(t_ts)
        row["torch_product_Gps"] = entries / row["torch_product_s"] / 1e9
        row["torch_peak_bytes"] = peak_memory("torch", D, d, dist, device, torch_product)
        row["speedup_project_vs_torch_product"] = row["torch_product_s"] / row["project_s"]
        row["speedup_step_vs_torch_step"] = row["torch_step_s"] / (row["project_s"] + row["expand_s"])
    return row


def machine_info(device: str) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda)
        try:
            info["sm_clock_mhz_after"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return info


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def markdown(rows: list[dict], info: dict) -> str:
    head = (
        "| dist | D | d | dtype | check | project G/s | expand G/s | torch product G/s | "
        "project / torch product | step / torch step | fused peak | torch peak |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        tp = f"{r['torch_product_Gps']:.3f}" if "torch_product_Gps" in r else "–"
        sp = f"{r['speedup_project_vs_torch_product']:.1f}×" if "torch_product_s" in r else "–"
        ss = f"{r['speedup_step_vs_torch_step']:.1f}×" if "torch_step_s" in r else "–"
        tpk = fmt_bytes(r["torch_peak_bytes"]) if "torch_peak_bytes" in r else "–"
        fpk = fmt_bytes(max(r["fused_project_peak_bytes"], r["fused_expand_peak_bytes"]))
        lines.append(
            f"| {r['distribution']} | {r['D']:,} | {r['d']} | {r['dtype']} | "
            f"{'ok' if r['ok'] else 'FAIL'} | {r['project_Gps']:.3f} | {r['expand_Gps']:.3f} | {tp} | "
            f"{sp} | {ss} | {fpk} | {tpk} |"
        )
    where = info.get("gpu") or info.get("cpu")
    return (
        f"Machine: {where}; torch {info['torch']}; threads {info['threads']}; commit {info['commit']}\n\n"
        + head + "\n".join(lines) + "\n"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="size grid (default: cpu for --device cpu, gpu for cuda)")
    ap.add_argument("--distributions", nargs="+", default=list(rbd_cuda.DISTRIBUTIONS))
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("RBD_RESULTS_DIR", "results/ops_bench"))
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    reps = args.reps or (10 if device == "cuda" else 5)
    warmup = 3 if device == "cuda" else 1
    gen = torch.Generator(device=device).manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for D, d in PRESETS[preset]:
        for dist in args.distributions:
            for dt in args.dtypes:
                row = bench_case(D, d, dist, getattr(torch, dt), device, warmup, reps, gen)
                rows.append(row)
                print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    info = machine_info(device)
    (out_dir / "ops_bench.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    table = markdown(rows, info)
    (out_dir / "ops_bench.md").write_text(table)
    print(table)
    print(f"wrote {out_dir / 'ops_bench.json'} and {out_dir / 'ops_bench.md'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

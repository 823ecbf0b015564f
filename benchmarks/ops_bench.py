"""Microbenchmark suite: fused project / expand / RBD step against materialising P, side by side.

    python -m benchmarks.ops_bench --quick                       # about 40 s of CPU time
    python -m benchmarks.ops_bench --preset cpu --out results/ops_bench_cpu
    python -m benchmarks.ops_bench --device cuda --preset gpu --dtypes float32 bfloat16 --out DIR

For every case (distribution × (D, d) × input dtype) the fused ops and every baseline are first
checked (``benchmarks/methods.py``: the fused ops against the float64 oracle
``rbd_cuda.reference`` and the pass-consistency identity at full size, each baseline against a
float64 product of its own P), then timed in one process, interleaved round by round, at every
thread count of ``--threads`` (CPU: fused and torch materialised at each; the other baselines at
the largest only). Methods and ops are listed in ``benchmarks/methods.py``.

Metrics: median time (p10, p90), G entries/s (D·d per product, 2·D·d per step), the fraction of
the roofline (``benchmarks/common.py``: docs/performance.md §2 on GPU, an instruction-count ceiling on CPU (§1)),
the fused/torch time ratio, and peak memory beyond the inputs (CPU: resident high-water mark in a
fresh process; CUDA: max_memory_allocated). Then the targets at the target size
(D = 1e6, d = 256, fp32). Output in --out: ops_bench.json, ops_bench.csv, ops_bench.md and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import rbd_cuda
from benchmarks import common, methods
from benchmarks.methods import Case

# Issue #6 done-when (CPU, D = 1e6, d = 256, fp32): fused time vs torch materialised, memory,
# and thread scaling.
SPEEDUP_TARGETS = {"normal": 4.0, "rademacher": 30.0}
MEMORY_TARGET = 1.10
THREAD_SCALING_TARGET = 1.7
DTYPE_LABEL = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Preset:
    target: tuple[int, int]
    sweep_D: tuple[int, tuple[int, ...]] | None = None  # (d, Ds): throughput vs D
    sweep_d: tuple[int, tuple[int, ...]] | None = None  # (D, ds): throughput and memory vs d
    skewed: tuple[tuple[int, int], ...] = ()  # compartment-like shapes: tall-thin, short-wide, tiny

    def shapes(self) -> list[tuple[int, int]]:
        shapes = [self.target]
        if self.sweep_D:
            shapes += [(D, self.sweep_D[0]) for D in self.sweep_D[1]]
        if self.sweep_d:
            shapes += [(self.sweep_d[0], d) for d in self.sweep_d[1]]
        shapes += list(self.skewed)
        return list(dict.fromkeys(shapes))


PRESETS = {
    # Small sweeps so that the quick run also exercises every plot.
    "quick": Preset(target=(50_000, 64), sweep_D=(64, (5_000, 50_000)), sweep_d=(50_000, (16, 64))),
    "cpu": Preset(target=(1_000_000, 256), sweep_D=(64, (10_000, 100_000, 1_000_000)),
                  sweep_d=(100_000, (4, 16, 64, 256)), skewed=((4_000_000, 4), (2_000, 2_048), (100, 64))),
    "gpu": Preset(target=(1_000_000, 256), sweep_D=(100, (1_000_000, 10_000_000, 100_000_000)),
                  sweep_d=(10_000_000, (10, 100, 1000)),
                  skewed=((100_000_000, 8), (4_096, 4_096), (1 << 24, 1024), (100_000_000, 1000))),
}
# Timing: docs/performance.md §3 (GPU ≥ 3 warm-ups folded into batching, ≥ 10 reps; CPU median of ≥ 5).
TIMING = {
    "cpu": {"reps": 5, "min_reps": 3, "budget_s": 2.0, "min_sample_s": 0.02},
    "cuda": {"reps": 10, "min_reps": 3, "budget_s": 1.0, "min_sample_s": 1e-3},
    "quick": {"reps": 3, "min_reps": 3, "budget_s": 0.5, "min_sample_s": 0.005},
}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="size grid (default: cpu for --device cpu, gpu for cuda)")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="DxD",
                    help="explicit D x d shapes instead of the preset's, e.g. 1000000x256 (the first is the target)")
    ap.add_argument("--distributions", nargs="+", default=list(rbd_cuda.ops.DISTRIBUTIONS),
                    choices=list(rbd_cuda.ops.DISTRIBUTIONS))
    ap.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPE_LABEL),
                    help="input dtypes (default: float32 and bfloat16; float32 only with --quick)")
    ap.add_argument("--ops", nargs="+", default=list(methods.OPS), choices=list(methods.OPS))
    ap.add_argument("--baselines", nargs="*", default=None, choices=list(methods.BASELINES),
                    help="default: torch, torch_chunked and numpy, numpy_chunked (CPU) or cupy, cupy_chunked (CUDA)")
    ap.add_argument("--threads", nargs="+", type=int, default=None,
                    help="CPU thread counts to time at (default: 1 and all cores)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per method (median)")
    ap.add_argument("--chunk-mib", type=float, default=None,
                    help="chunk size of the chunked baselines (default 32 MiB CPU, 1024 MiB CUDA)")
    ap.add_argument("--numpy-limit", type=float, default=3e7,
                    help="numpy baselines only up to this many entries D·d (numpy draws 30-100 M/s)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--out", default=os.environ.get("RBD_RESULTS_DIR", "results/ops_bench"))
    args = ap.parse_args(argv)
    if args.quick:
        if args.preset not in (None, "quick"):
            ap.error(f"--quick conflicts with --preset {args.preset}")
        args.preset = "quick"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    if args.device == "cuda" and not rbd_cuda.backends.built_with_cuda():
        ap.error("--device cuda but the extension was built without its CUDA kernels")
    args.preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    if args.baselines is None:
        lib = "cupy" if args.device == "cuda" else "numpy"
        args.baselines = ["torch", "torch_chunked", lib, f"{lib}_chunked"]
    args.dtypes = args.dtypes or (["float32"] if args.preset == "quick" else list(DTYPE_LABEL))
    if args.shapes:
        try:
            args.shape_list = [tuple(int(float(v)) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            ap.error(f"--shapes: expected D x d pairs like 1000000x256, got {args.shapes}")
        if any(len(s) != 2 or min(s) <= 0 for s in args.shape_list):
            ap.error(f"--shapes: expected positive D x d pairs like 1000000x256, got {args.shapes}")
    cores = os.cpu_count() or 1
    if args.device == "cuda":
        args.threads = [torch.get_num_threads()]
    elif args.threads is None:
        args.threads = sorted({1, cores})
    elif min(args.threads) < 1:
        ap.error(f"--threads must be positive, got {args.threads}")
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    if args.chunk_mib is not None and args.chunk_mib <= 0:
        ap.error(f"--chunk-mib must be positive, got {args.chunk_mib}")
    return args


def materialise_limit(device: str) -> int:
    """Largest P (bytes) the materialised baselines draw: P, its matvec and the inputs must fit."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[1] * 0.6)
    return 4 << 30


def plan(args, preset: Preset) -> tuple[list[Case], tuple[int, int]]:
    shapes = args.shape_list if args.shapes else preset.shapes()
    cases = [Case(dist, D, d, dt, args.device) for D, d in shapes for dist in args.distributions for dt in args.dtypes]
    return cases, shapes[0]


def case_methods(case: Case, args) -> tuple[list[str], dict[str, str]]:
    """Methods to run on ``case`` and, for the others asked for, why not."""
    chosen, skipped = ["fused"], {}
    itemsize = torch.empty((), dtype=case.torch_dtype).element_size()
    for m in args.baselines:
        why = methods.applies(m, case)
        if why is None and not m.endswith("_chunked") and case.entries * itemsize > materialise_limit(case.device):
            why = f"P needs {common.fmt_bytes(case.entries * itemsize)}, over the materialising limit"
        if why is None and m.startswith("numpy") and case.entries > args.numpy_limit:
            why = f"D·d over --numpy-limit {args.numpy_limit:.0e} (numpy's generator alone would take minutes)"
        if why:
            skipped[m] = why
        else:
            chosen.append(m)
    return chosen, skipped


def chunk_rows(case: Case, args) -> int:
    mib = args.chunk_mib or (1024 if case.device == "cuda" else 32)
    itemsize = torch.empty((), dtype=case.torch_dtype).element_size()
    return max(1, int(mib * 2**20) // (case.d * itemsize))


def run_case(case: Case, args, timing: dict, roof: dict) -> tuple[dict, list[dict]]:
    x = methods.make_inputs(case)
    chosen, skipped = case_methods(case, args)
    rows_per_chunk = chunk_rows(case, args)
    failed: dict[str, str] = {}
    record = {**case.as_dict(), "checks": {"fused": methods.check_fused(case, x)}, "skipped": skipped,
              "failed": failed, "chunk_rows": rows_per_chunk}
    for m in chosen[1:]:
        try:
            record["checks"][m] = methods.check_baseline(m, case)
        except methods.CheckFailed as e:  # not timed, and the run's exit status says so; the others still are
            failed[m] = str(e)
    chosen = [m for m in chosen if m not in failed]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        # Only fused and torch materialised are timed at every thread count (targets need both);
        # the other baselines once, at the most threads.
        timed = [m for m in chosen if threads == max(args.threads) or m in ("fused", "torch")]
        fns = {(m, op): methods.build(m, op, case, x, rows_per_chunk) for m in timed for op in args.ops}
        res = common.interleaved({f"{m}:{op}": fn for (m, op), fn in fns.items()}, case.device, **timing)
        for (m, op) in fns:
            t = res[f"{m}:{op}"]
            entries = case.entries * (2 if op == "step" else 1)
            row = {**case.as_dict(), "threads": threads, "method": m, "op": op, **t,
                   "entries": entries, "Gps": entries / t["median_s"] / 1e9}
            if m == "fused":
                row["roofline_frac"] = entries / t["median_s"] / roof["entries_per_s"][str(threads)][case.dist]
                if "torch" in timed:
                    row["speedup_vs_torch"] = res[f"torch:{op}"]["median_s"] / t["median_s"]
            rows.append(row)
    torch.set_num_threads(max(args.threads))
    if case.device == "cuda" and not args.no_memory:
        peaks = {(m, op): common.cuda_peak_bytes(methods.build(m, op, case, x, rows_per_chunk))
                 for m in chosen for op in args.ops}
        for row in rows:
            row["peak_bytes"] = peaks[(row["method"], row["op"])]
    return record, rows


def cpu_peaks(records: list[dict], rows: list[dict], args) -> None:
    """Fill ``peak_bytes`` of the CPU rows from one child process (``common.rss_high_water_jobs``)."""
    keys = list(dict.fromkeys((r["dist"], r["D"], r["d"], r["dtype"], r["method"], r["op"]) for r in rows))
    chunks = {(r["dist"], r["D"], r["d"], r["dtype"]): r["chunk_rows"] for r in records}
    jobs = [{"method": m, "op": op, "chunk_rows": chunks[(dist, D, d, dt)],
             "case": Case(dist, D, d, dt, "cpu").as_dict()} for dist, D, d, dt, m, op in keys]
    peaks = dict(zip(keys, common.rss_high_water_jobs(jobs, max(args.threads)), strict=True))
    for r in rows:
        r["peak_bytes"] = peaks[(r["dist"], r["D"], r["d"], r["dtype"], r["method"], r["op"])]


def _find(rows, **kw) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def targets(rows: list[dict], target: tuple[int, int], device: str, threads: list[int]) -> dict:
    """The target numbers (benchmarks/README.md) at the target shape, fp32, most threads."""
    D, d = target
    hi, lo = max(threads), min(threads)
    out = {"D": D, "d": d, "dtype": "float32", "threads": hi, "device": device, "by_distribution": {}}
    for dist in rbd_cuda.ops.DISTRIBUTIONS:
        t = {}
        for op in ("project", "expand", "step"):
            f = _find(rows, dist=dist, D=D, d=d, dtype="float32", method="fused", op=op, threads=hi)
            if f is None:
                continue
            entry = {"fused_Gps": f["Gps"], "speedup_vs_torch": f.get("speedup_vs_torch")}
            if dist in SPEEDUP_TARGETS and op != "step" and entry["speedup_vs_torch"] is not None:
                entry["target"] = SPEEDUP_TARGETS[dist]
                entry["met"] = entry["speedup_vs_torch"] >= SPEEDUP_TARGETS[dist]
            f1 = _find(rows, dist=dist, D=D, d=d, dtype="float32", method="fused", op=op, threads=lo)
            if hi != lo and f1 is not None:
                entry["thread_scaling"] = f1["median_s"] / f["median_s"]
                entry["thread_scaling_met"] = entry["thread_scaling"] >= THREAD_SCALING_TARGET
            if "peak_bytes" in f and op != "step":
                # Peak while the call runs: its input (g for project, c for expand), which is
                # already there, plus what it allocates (its output included), against input + output.
                small, big = (d, D) if op == "expand" else (D, d)
                needed = 4 * (small + big)
                entry["peak_total_bytes"] = 4 * small + f["peak_bytes"]
                entry["peak_vs_needed"] = entry["peak_total_bytes"] / needed
                entry["memory_met"] = entry["peak_vs_needed"] <= MEMORY_TARGET
                tm = _find(rows, dist=dist, D=D, d=d, dtype="float32", method="torch", op=op, threads=hi)
                entry["torch_peak_bytes"] = tm.get("peak_bytes") if tm else None
            t[op] = entry
        if t:
            out["by_distribution"][dist] = t
    out["materialised_P_bytes"] = D * d * 4
    return out


def targets_text(tg: dict) -> str:
    if not tg["by_distribution"]:
        return f"Targets: no fp32 result at D={tg['D']:,}, d={tg['d']} in this run.\n"
    head = (f"Targets at D={tg['D']:,}, d={tg['d']}, fp32, {tg['device']}, {tg['threads']} threads"
            + ("" if (tg["D"], tg["d"]) == (1_000_000, 256) else " (not the target size D=1e6, d=256)") + ":")
    lines = [head]

    def verdict(ok):
        return "" if ok is None else (" met" if ok else " NOT met")

    for dist, ops in tg["by_distribution"].items():
        parts = []
        for op, e in ops.items():
            s = f"{op} {e['fused_Gps']:.3g} G/s"
            if e.get("speedup_vs_torch") is not None:
                s += f", {e['speedup_vs_torch']:.2f}x torch materialised"
                if "target" in e:
                    s += f" (>= {e['target']:g}x:{verdict(e['met'])})"
            if "thread_scaling" in e:
                s += f", {e['thread_scaling']:.2f}x 1 thread (>= {THREAD_SCALING_TARGET}x:{verdict(e['thread_scaling_met'])})"
            parts.append(s)
        lines.append(f"  {dist:<10}  " + "\n              ".join(parts))
    mem = []
    for dist, ops in tg["by_distribution"].items():
        for op in ("project", "expand"):
            e = ops.get(op, {})
            if "peak_vs_needed" in e:
                io = "g + c" if op == "project" else "c + u"
                mem.append(f"  memory {dist:<10} {op:<7}: fused peak {common.fmt_bytes(e['peak_total_bytes'])} = "
                           f"{e['peak_vs_needed']:.3f} x ({io}) (<= {MEMORY_TARGET}:{verdict(e['memory_met'])}); "
                           f"torch materialised {common.fmt_bytes(e['torch_peak_bytes'])} beyond inputs "
                           f"(D·d·4 = {common.fmt_bytes(tg['materialised_P_bytes'])})")
    return "\n".join(lines + mem) + "\n"


METHOD_COLUMNS = ("torch", "torch_chunked", "numpy", "numpy_chunked", "cupy", "cupy_chunked")


def skipped_text(records: list[dict]) -> str:
    """One line per (baseline, reason) not run, with how many cases it concerns."""
    counts: dict[tuple[str, str], int] = {}
    for rec in records:
        for m, why in rec["skipped"].items():
            counts[(m, why)] = counts.get((m, why), 0) + 1
    text = "".join(f"Skipped {m} in {n} case(s): {why}\n" for (m, why), n in counts.items())
    return text + "".join(f"FAILED {m}, {rec['dist']} D={rec['D']:,} d={rec['d']} {rec['dtype']}: {why}\n"
                          for rec in records for m, why in rec["failed"].items())


def markdown(rows: list[dict], info: dict, roof: dict, tg: dict, records: list[dict]) -> str:
    present = [m for m in METHOD_COLUMNS if any(r["method"] == m for r in rows)]
    head = (["dist", "D", "d", "dtype", "thr", "op", "fused G/s", "% roofline"] + [f"{m} G/s" for m in present]
            + ["fused vs torch", "fused peak"] + [f"{m} peak" for m in present])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in (r for r in rows if r["method"] == "fused"):
        key = {k: f[k] for k in ("dist", "D", "d", "dtype", "threads", "op")}
        others = {m: _find(rows, method=m, **key) for m in present}
        sp = f.get("speedup_vs_torch")
        cells = [f["dist"], f"{f['D']:,}", str(f["d"]), DTYPE_LABEL[f["dtype"]],
                 str(f["threads"]), f["op"], f"{f['Gps']:.3g}", f"{100 * f['roofline_frac']:.1f}"]
        cells += [f"{o['Gps']:.3g}" if o else "–" for o in others.values()]
        cells += [f"{sp:.2f}×" if sp else "–", common.fmt_bytes(f.get("peak_bytes"))]
        cells += [common.fmt_bytes(o.get("peak_bytes")) if o else "–" for o in others.values()]
        lines.append("| " + " | ".join(cells) + " |")
    where = info.get("gpu") or info.get("cpu")
    return (f"Machine: {where} ({info.get('cores')} cores, {info.get('isa', '')}); torch {info['torch']}; "
            f"commit {info['commit']}{' (+ uncommitted changes)' if info['dirty'] else ''}; {info['date_utc']}\n"
            f"Command: `{info['command']}`\n"
            f"Roofline: {roof['basis']}\n\n" + "\n".join(lines) + "\n\n" + skipped_text(records) + "\n"
            + targets_text(tg))


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plots(rows: list[dict], preset: Preset, out_dir: Path, threads: int) -> list[Path]:
    """Throughput vs D and vs d (per distribution; project solid, expand dashed) and memory vs d,
    from the fp32 rows at ``threads`` whose shapes lie on the preset's sweeps; a figure with no
    such rows is not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sel = [r for r in rows if r["dtype"] == "float32" and r["threads"] == threads]

    def save(fig, name):
        fig.tight_layout()
        written.append(out_dir / f"{name}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    for name, sweep, var, fixed_name in (("throughput_vs_D", preset.sweep_D, "D", "d"),
                                         ("throughput_vs_d", preset.sweep_d, "d", "D")):
        if not sweep:
            continue
        fixed, values = sweep

        def series(dist, m, op, var=var, fixed_name=fixed_name, fixed=fixed, values=values):
            return sorted((r[var], r["Gps"]) for r in sel if r["dist"] == dist and r["method"] == m
                          and r["op"] == op and r[fixed_name] == fixed and r[var] in values)

        if not any(series(dist, "fused", "project") for dist in rbd_cuda.ops.DISTRIBUTIONS):
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
        for ax, dist in zip(axes, rbd_cuda.ops.DISTRIBUTIONS, strict=True):
            for i, m in enumerate(methods.METHODS):
                for op, style in (("project", "-"), ("expand", "--")):
                    pts = series(dist, m, op)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{i}", label=f"{m} {op}")
            ax.set(xscale="log", yscale="log", title=f"{dist}, {fixed_name} = {fixed:,}", xlabel=var)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("G entries/s per product")
        axes[-1].legend(fontsize=7)
        fig.suptitle(f"fp32, {threads} threads")
        save(fig, name)
    if preset.sweep_d:
        D, ds = preset.sweep_d
        curves = {m: sorted((r["d"], r["peak_bytes"] / 2**20) for r in sel
                            if r["method"] == m and r["op"] == "project" and r["dist"] == "normal"
                            and r["D"] == D and r["d"] in ds and r.get("peak_bytes") is not None)
                  for m in methods.METHODS}
        if curves["fused"]:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for i, m in enumerate(methods.METHODS):
                if curves[m]:
                    # The fused peak can be 0 at page resolution; log axes need a floor.
                    d_vals, mib = zip(*curves[m], strict=True)
                    ax.plot(d_vals, [max(v, 1e-3) for v in mib], marker="o", color=f"C{i}", label=m)
            ax.plot(ds, [D * d * 4 / 2**20 for d in ds], "k:", label="D·d·4 bytes (fp32 P)")
            ax.set(xscale="log", yscale="log", xlabel="d", ylabel="MiB beyond inputs (floor 1 KiB)",
                   title=f"peak memory of project, normal, D = {D:,}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            save(fig, "memory_vs_d")
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    timing = dict(TIMING["quick" if args.preset == "quick" else args.device])
    if args.reps:
        timing.update(reps=args.reps, min_reps=min(timing["min_reps"], args.reps))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = common.machine_info(args.device, argv)
    roof = common.roofline(args.device, info, args.threads)
    cases, target = plan(args, preset)

    records, rows = [], []
    for case in tqdm(cases, desc="cases", unit="case", file=sys.stderr):
        record, case_rows = run_case(case, args, timing, roof)
        records.append(record)
        rows += case_rows
    if args.device == "cpu" and not args.no_memory:
        print("measuring peak memory in a child process ...", file=sys.stderr, flush=True)
        cpu_peaks(records, rows, args)
    tg = targets(rows, target, args.device, args.threads)
    common.write_json(out_dir / "ops_bench.json", {"machine": info, "roofline": roof, "timing": timing,
                                                   "cases": records, "rows": rows, "targets": tg})
    write_csv(out_dir / "ops_bench.csv", rows)
    table = markdown(rows, info, roof, tg, records)
    (out_dir / "ops_bench.md").write_text(table)
    pngs = plots(rows, preset, out_dir, max(args.threads))
    print(table)
    print("wrote " + ", ".join(str(p) for p in [out_dir / "ops_bench.json", out_dir / "ops_bench.csv",
                                                 out_dir / "ops_bench.md", *pngs]))
    failed = sorted({m for rec in records for m in rec["failed"]})
    if failed:
        print(f"ops_bench: the checks of {', '.join(failed)} failed (see FAILED above); they were not timed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Optimizer step time and kernel launches per step: an RBD step against an SGD step.

    python -m benchmarks.launch_count --out DIR                      # on a GPU; about a minute
    python -m benchmarks.launch_count --device cpu --tiny --out DIR  # the CPU rehearsal (make gpu-check-cpu)
    python -m benchmarks.launch_count --device cpu --threads 1 --models fc-mnist fc-mnist-tensor resnet8 many-small

Models (fp32; the gradients of one random batch, kept; only ``optimizer.step()`` is measured):

  fc-mnist         the paper's FC network on 28x28x1 (101,770 parameters), RBD with one
                   compartment over its four tensors, d = 250
  fc-mnist-tensor  the same network, a compartment per tensor, d = 250 each
  resnet8          ResNet-8 on 32x32x3 (77,850 parameters), a compartment per tensor, d = 100 each
  many-small       1,000 tensors of 100 entries (--small-tensors), a compartment per tensor, d = 10
  synthetic        one flat parameter of D = 1e8 entries (--synthetic-numel), one compartment, d = 250

Variants of each model:

  rbd       RBD.step()
  products  the same update as one project_grouped and one expand_grouped_ over all its
            compartments, the plan built beforehand: the kernels' work of the step, so that
            rbd − products is what the step spends outside them (Python and dispatch)
  sgd       torch.optim.SGD.step(), for scale

Counted on CUDA (torch.profiler, one step after a warm-up): kernel launches issued, kernels and
memory copies run on the device. Timed: CUDA events around one step (the CPU: wall time, or with
--threads 1 the thread's CPU time, which other processes do not inflate), median of --reps after
--warmup steps. Writes launch_count.json (with the machine, the device and the commit) and
launch_count.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import rbd_cuda
from benchmarks import common
from rbd_cuda.optim import RBD
from rbd_experiments import models

LR = 0.01
SEED = 5
# name: (network of rbd_experiments.models or None for the flat parameter, input shape, RBD dim,
# RBD compartments)
MODELS = {
    "fc-mnist": ("fc", (1, 28, 28), 250, "global"),
    "fc-mnist-tensor": ("fc", (1, 28, 28), 250, "tensor"),
    "resnet8": ("resnet8", (3, 32, 32), 100, "tensor"),
    "many-small": ("small", None, 10, "tensor"),
    "synthetic": (None, None, 250, "global"),
}
SMALL_NUMEL = 100
# --twins: each model's twin has its number of tensors, of this many entries each, and d = 1, so
# that the kernels take microseconds and a step's time is the work outside them.
TWIN_NUMEL = 8


def model_with_grads(name: str, device: str, synthetic_numel: int, batch: int, small_tensors: int) -> torch.nn.Module:
    net, shape, _, _ = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    if net == "small":
        model = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(SMALL_NUMEL, generator=gen).to(device))
                                       for _ in range(small_tensors))
        for p in model:
            p.grad = torch.randn(SMALL_NUMEL, generator=gen).to(device)
        return model
    if net is None:
        model = torch.nn.Module()
        model.weight = torch.nn.Parameter(torch.zeros(synthetic_numel, device=device))
        model.weight.grad = torch.randn(synthetic_numel, generator=gen).to(device)
        return model
    model = models.build(net, shape, 10, seed=0).to(device)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return model


def products_step(model: torch.nn.Module, dim: int, compartments: str):
    """One project_grouped and one expand_grouped_ over the model's compartments ("tensor": one
    per tensor; "global": one over all, each tensor at its rows), through the public wrappers."""
    params = [p for p in model.parameters() if p.grad is not None]
    n = len(params)
    if compartments == "tensor":
        plan = rbd_cuda.SegmentPlan([p.numel() for p in params], [0] * n, list(range(n)), [dim] * n, list(range(n)))
    else:
        rows = [sum(p.numel() for p in params[:k]) for k in range(n)]
        plan = rbd_cuda.SegmentPlan([p.numel() for p in params], rows, [0] * n, [dim], [0])

    def step():
        c = rbd_cuda.project_grouped([p.grad for p in params], plan, seed=SEED)
        rbd_cuda.expand_grouped_([p.data for p in params], c, [-LR / dim] * n, plan, seed=SEED)
    return step


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """As many parameters as ``model`` has with gradients, of TWIN_NUMEL entries each, with gradients."""
    gen = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.grad is not None]
    out = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(TWIN_NUMEL, generator=gen).to(p.device))
                                 for p in params)
    for p in out:
        p.grad = torch.randn(TWIN_NUMEL, generator=gen).to(p.device)
    return out


def variants(model: torch.nn.Module, dim: int, compartments: str) -> dict:
    rbd = RBD(model.named_parameters(), lr=LR, dim=dim, compartments=compartments, seed=SEED)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    return {"rbd": rbd.step, "products": products_step(model, dim, compartments), "sgd": sgd.step}


def count(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"launches": sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for n in names),
            "device_kernels": sum("memcpy" not in e.name.lower() and "memset" not in e.name.lower() for e in device),
            "device_copies": sum("memcpy" in e.name.lower() for e in device)}


def time_ms(fn, device: str, reps: int, warmup: int, clock) -> float:
    for _ in range(warmup):
        fn()
    common.sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = clock()
            fn()
            times.append(1e3 * (clock() - t0))
    return statistics.median(times)


def markdown(res: dict) -> str:
    m = res["machine"]
    where = m.get("gpu") or m.get("cpu")
    head = ("| model | parameters | tensors | d | compartments | variant | launches | device kernels | device copies "
            "| step ms | vs SGD | outside the products, ms | vs SGD |")
    lines = [f"Optimizer step, {where}, {res['threads']} thread(s), {res['clock']}, commit {m['commit']}, {m['date_utc']}",
             "", head,
             "|---" * 13 + "|"]
    for name, r in res["models"].items():
        sgd = r["variants"]["sgd"]["step_ms"]
        outside = r["variants"]["rbd"]["step_ms"] - r["variants"]["products"]["step_ms"]
        for v, row in r["variants"].items():
            cells = [name, f"{r['parameters']:,}", str(r["tensors"]), str(r["dim"]), r["compartments"], v]
            cells += ["–" if row.get(k) is None else str(row[k]) for k in ("launches", "device_kernels", "device_copies")]
            cells += [f"{row['step_ms']:.3f}", f"{row['step_ms'] / sgd:.2f}×"]
            cells += [f"{outside:.3f}", f"{outside / sgd:.2f}×"] if v == "rbd" else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--synthetic-numel", type=float, default=1e8, help="entries of the synthetic model")
    ap.add_argument("--small-tensors", type=int, default=1000, help="tensors of the many-small model")
    ap.add_argument("--batch", type=int, default=32, help="batch of the one backward pass")
    ap.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    ap.add_argument("--twins", action="store_true",
                    help=f"also time each model's twin: its number of tensors, {TWIN_NUMEL} entries each, d = 1")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true",
                    help="a rehearsal: synthetic model of 1e5 entries, batch 4, 2 repetitions after 1 warm-up")
    ap.add_argument("--out", default=os.environ.get("RBD_RESULTS_DIR", "results/launch_count"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.synthetic_numel, args.small_tensors, args.batch, args.reps, args.warmup = 1e5, 20, 4, 2, 1
    if args.reps < 1 or args.warmup < 0 or args.batch < 1 or args.synthetic_numel < 1 or args.small_tensors < 1:
        ap.error("--reps, --batch, --small-tensors and --synthetic-numel must be positive, --warmup non-negative")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not (torch.cuda.is_available() and rbd_cuda.backends.built_with_cuda()):
        ap.error("--device cuda needs a GPU and the CUDA build")
    # On the CPU with one thread the work runs on this thread: its CPU time is the step's work, which
    # other processes on a shared machine do not inflate; with more threads, wall time.
    one_thread = args.device == "cpu" and torch.get_num_threads() == 1
    clock, clock_name = (time.thread_time, "thread CPU time") if one_thread else (time.perf_counter, "wall time")
    rows = {}
    for name in args.models:
        full = model_with_grads(name, args.device, int(args.synthetic_numel), args.batch, args.small_tensors)
        _, _, dim, compartments = MODELS[name]
        cases = [(name, full, dim)] + ([(f"{name} twin", twin(full), 1)] if args.twins else [])
        for row, model, d in cases:
            params = [p for p in model.parameters() if p.grad is not None]
            out = {}
            for v, fn in variants(model, d, compartments).items():
                counted = count(fn) if args.device == "cuda" else {}
                out[v] = {**counted, "step_ms": time_ms(fn, args.device, args.reps, args.warmup, clock)}
            rows[row] = {"parameters": sum(p.numel() for p in params), "tensors": len(params), "dim": d,
                         "compartments": compartments, "variants": out}
        del full, cases, model, params
    res = {"machine": common.machine_info(args.device, argv, "benchmarks.launch_count"), "device": args.device,
           "threads": torch.get_num_threads(),
           "clock": "cuda events" if args.device == "cuda" else clock_name,
           "reps": args.reps,
           "warmup": args.warmup, "batch": args.batch, "models": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "launch_count.json", res)
    text = markdown(res)
    (out_dir / "launch_count.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

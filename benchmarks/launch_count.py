"""Kernel launches and time of one optimizer step of ResNet-8 with a compartment per tensor.

    python -m benchmarks.launch_count --out DIR          # on a GPU; about 10 s

Variants, each counted with torch.profiler (kernel launches issued, kernels and memory copies run
on the device) and timed (CUDA events, median of --reps after warm-up):

  rbd_v1 / rbd_v2          RBD(compartments="tensor").step() with backends.cuda.kernels = "v1" / "v2"
  grouped_v1 / grouped_v2  the same update as one project_grouped and one expand_grouped_
  sgd                      torch.optim.SGD.step() on the same gradients, for scale

The grouped variants build their segment table here (a compartment per tensor, dim directions
each), so they measure the ops whether or not the optimizer calls them yet. Writes
launch_count.json and launch_count.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

import rbd_cuda
from benchmarks.methods import with_cuda_kernels
from rbd_cuda.optim import RBD
from rbd_experiments import models

LR = 0.01
SEED = 5


def model_with_grads(device: str) -> torch.nn.Module:
    model = models.build("resnet8", (3, 32, 32), 10, seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (32,), generator=gen).to(device)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return model


def grouped_step(model: torch.nn.Module, dim: int):
    params = [p for p in model.parameters() if p.grad is not None]
    n = len(params)
    table = {"row_offsets": [0] * n, "compartments": list(range(n)), "dims": [dim] * n, "streams": list(range(n)),
             "seed": SEED, "step": 0}

    def step():
        c = rbd_cuda.project_grouped([p.grad for p in params], **table)
        rbd_cuda.expand_grouped_([p.data for p in params], c, [-LR / dim] * n, **table)
    return step


def variants(model: torch.nn.Module, dim: int) -> dict:
    rbd = RBD(model.named_parameters(), lr=LR, dim=dim, compartments="tensor", seed=SEED)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    grouped = grouped_step(model, dim)
    return {"rbd_v1": with_cuda_kernels("v1", rbd.step), "rbd_v2": with_cuda_kernels("v2", rbd.step),
            "grouped_v1": with_cuda_kernels("v1", grouped), "grouped_v2": with_cuda_kernels("v2", grouped),
            "sgd": sgd.step}


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


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=100, help="directions per compartment")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("RBD_RESULTS_DIR", "results/launch_count"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not rbd_cuda.backends.built_with_cuda():
        print("launch_count: needs a GPU and the CUDA build", file=sys.stderr)
        return 1
    model = model_with_grads("cuda")
    tensors = sum(p.grad is not None for p in model.parameters())
    rows = {}
    for name, fn in variants(model, args.dim).items():
        rows[name] = {**count(fn), "step_ms": time_ms(fn, args.reps)}
    res = {"model": "resnet8", "compartments": "tensor", "tensors": tensors, "dim": args.dim,
           "device": torch.cuda.get_device_name(), "variants": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_count.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"ResNet-8, compartments='tensor' ({tensors} tensors, d={args.dim} each), {res['device']}", "",
             "| variant | launches | device kernels | device copies | step ms | vs SGD |", "|---|---|---|---|---|---|"]
    sgd = rows["sgd"]["step_ms"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['launches']} | {r['device_kernels']} | {r['device_copies']} | "
                     f"{r['step_ms']:.3f} | {r['step_ms'] / sgd:.1f}× |")
    text = "\n".join(lines) + "\n"
    (out / "launch_count.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time per training step: a model wrapped in rbd_cuda.nn.RandomSubspace against the same model
trained directly.

    python -m benchmarks.subspace_step --out results/subspace_step

One step = zero_grad, forward, cross-entropy, backward, Adam step, on a fixed random batch shaped
like MNIST (the data do not change the cost). The configurations are timed round-robin (one step
of each in turn, ``--repeats`` rounds, median per configuration), so load from other processes
falls on all of them alike. Two clocks: wall time, and the process's CPU time, which on a shared
machine still measures the work done (with one thread, the default: more threads add their
synchronisation waits to it). Before timing, each wrapper's output at c = 0 is checked against the
direct model's. Writes ``subspace_step.json`` and ``subspace_step.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from rbd_cuda.nn import RandomSubspace
from rbd_experiments import models
from rbd_experiments.reporting import cpu_name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=models.MODELS, default="fc")
    p.add_argument("--input-shape", type=int, nargs=3, default=[1, 28, 28])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dims", type=int, nargs="+", default=[100, 400, 1600])
    p.add_argument("--distributions", nargs="+", default=["normal", "rademacher"],
                   choices=["normal", "uniform", "rademacher"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/subspace_step")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(args.input_shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, *shape, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)

    configs = {"direct": models.build(args.model, shape, seed=0)}
    for dist in args.distributions:
        for d in args.dims:
            wrapper = RandomSubspace(models.build(args.model, shape, seed=0), d, seed=1, distribution=dist)
            with torch.no_grad():
                assert torch.equal(wrapper(x), configs["direct"](x)), "the wrapper at c = 0 differs from the model"
            configs[f"{dist} d={d}"] = wrapper
    numel = models.count_parameters(configs["direct"])
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in configs.items()}

    def step(name: str) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        optimizers[name].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(configs[name](x), y).backward()
        optimizers[name].step()
        return time.perf_counter() - wall, time.process_time() - cpu

    times = {name: [] for name in configs}
    for r in tqdm(range(args.warmup + args.repeats), desc="rounds"):
        for name in configs:
            t = step(name)
            if r >= args.warmup:
                times[name].append(t)

    def median(name: str, clock: int) -> float:
        return statistics.median(t[clock] for t in times[name])

    rows = [{"config": name, "wall_median_ms": 1e3 * median(name, 0), "cpu_median_ms": 1e3 * median(name, 1),
             "cpu_vs_direct": median(name, 1) / median("direct", 1)} for name in times]
    result = {"model": args.model, "numel": numel, "batch_size": args.batch_size, "rows": rows,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "cpu": cpu_name(),
              "load_average": list(os.getloadavg())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "subspace_step.json").write_text(json.dumps(result, indent=2) + "\n")
    title = (f"{args.model}, D = {numel:,}, batch {args.batch_size}, Adam, {result['threads']} threads, "
             f"median of {args.repeats} round-robin steps")
    lines = [title, "",
             "| configuration | CPU ms/step | wall ms/step | CPU time vs direct |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['cpu_median_ms']:.1f} | {r['wall_median_ms']:.1f} | {r['cpu_vs_direct']:.1f}× |"
              for r in rows]
    (out / "subspace_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()

"""SGD, RBD, FPD and NES on one small MLP task, same number of steps, same d; plus step time.

    python -m benchmarks.optim_compare --out benchmarks/results/optim

Task (synthetic, needs no download): inputs x ~ N(0, I₆₄), labels from a fixed random teacher
MLP (64-32-10, argmax), 20,000 training and 5,000 held-out points; the student is a 64-128-10
MLP (D = 9,610 parameters), cross-entropy, batch 32. RBD, FPD and NES use d = 24 directions
(compression 400, the paper's Table 1 ratio) in one global compartment with the paper's
normalisation (basis vectors divided by √D); NES uses a population of 24 per step, as the paper
does (d offspring, each on its own minibatch). Each method gets a small learning-rate grid
(powers of 2, as the paper's tuning) and reports its best final held-out loss. The step time
of RBD and SGD (optimizer.step() alone, median) is measured side by side on the same gradients.
Writes JSON, a markdown table and a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rbd_cuda.optim import FPD, NES, RBD
from rbd_experiments import loop

D_IN, HIDDEN, CLASSES = 64, 128, 10


def make_task(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.Tanh(), torch.nn.Linear(32, CLASSES))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(25_000, D_IN, generator=gen)
        y = teacher(x).argmax(1)
    return (x[:20_000], y[:20_000]), (x[20_000:], y[20_000:])


def student(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))


def evaluate(model, data) -> tuple[float, float]:
    result = loop.evaluate(model, [data])
    return result.loss, result.accuracy


def make_optimizer(method: str, model, lr: float, dim: int, seed: int):
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method == "rbd":
        return RBD(model.parameters(), lr=lr, dim=dim, normalize="paper", seed=seed)
    if method == "fpd":
        return FPD(model.parameters(), lr=lr, dim=dim, normalize="paper", seed=seed)
    return NES(model.parameters(), lr=lr, population=dim, sigma=0.01, normalize="paper", seed=seed)


def run(method: str, lr: float, steps: int, dim: int, train, test, seed: int, eval_every: int) -> dict:
    model = student()
    opt = make_optimizer(method, model, lr, dim, seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = train

    def batch(_index: int):  # every step (and every NES population member) draws its own minibatch
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        return x[idx], y[idx]

    curve = [(0, *evaluate(model, test))]

    def after_step(i: int, _totals) -> None:
        if (i + 1) % eval_every == 0:
            curve.append((i + 1, *evaluate(model, test)))

    try:
        loop.fit_epoch(model, opt, batch, range(steps), members=dim if method == "nes" else 1, on_step=after_step)
    except loop.NonFiniteLoss:
        return {"method": method, "lr": lr, "final_loss": None, "final_acc": None, "curve": curve}
    loss, acc = curve[-1][1:]
    finite = math.isfinite(loss)
    return {"method": method, "lr": lr, "final_loss": loss if finite else None, "final_acc": acc, "curve": curve}


def step_time(dim: int, train, repeats: int = 50) -> dict:
    """Median optimizer.step() time of SGD and RBD on the same gradient, interleaved."""
    model = student()
    x, y = train
    torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    rbd = RBD(model.parameters(), lr=0.0, dim=dim, normalize="paper")
    times = {"sgd": [], "rbd": []}
    for _ in range(repeats):
        for name, opt in (("sgd", sgd), ("rbd", rbd)):
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


LR_GRID = {"sgd": [2**-5, 2**-3, 2**-1], "rbd": [2**1, 2**3, 2**5, 2**7], "fpd": [2**1, 2**3, 2**5, 2**7],
           "nes": [2**-9, 2**-7, 2**-5, 2**-3]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/optim_compare")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_task()
    eval_every = max(1, args.steps // 30)

    runs = []
    grid = [(m, lr) for m, lrs in LR_GRID.items() for lr in lrs]
    for method, lr in tqdm(grid, desc="runs"):
        runs.append(run(method, lr, args.steps, args.dim, train, test, args.seed, eval_every))
    best = {}
    for r in runs:
        if r["final_loss"] is not None and (r["method"] not in best or r["final_loss"] < best[r["method"]]["final_loss"]):
            best[r["method"]] = r
    timing = step_time(args.dim, train)
    initial_loss = runs[0]["curve"][0][1]

    lines = [f"{args.steps} steps, batch 32, D = 9,610, d = {args.dim}; held-out loss at step 0: {initial_loss:.3f}",
             "", "| method | best lr | held-out loss | held-out accuracy |", "|---|---|---|---|"]
    for method in ("sgd", "rbd", "fpd", "nes"):
        r = best.get(method)
        lines.append(f"| {method.upper()} | {r['lr']:g} | {r['final_loss']:.3f} | {r['final_acc']:.3f} |" if r
                     else f"| {method.upper()} | – | diverged at every lr | – |")
    lines += ["", (f"optimizer.step() on CPU ({torch.get_num_threads()} threads), median of 50: "
                   f"SGD {timing['sgd'] * 1e6:.0f} µs, RBD {timing['rbd'] * 1e6:.0f} µs "
                   f"(RBD/SGD = {timing['rbd'] / timing['sgd']:.1f}×)")]
    table = "\n".join(lines) + "\n"
    (out / "optim_compare.md").write_text(table)
    (out / "optim_compare.json").write_text(json.dumps(
        {"args": vars(args), "runs": runs, "best": {k: v["lr"] for k, v in best.items()}, "step_time_s": timing},
        indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in best.items():
        steps, losses = zip(*[(s, loss) for s, loss, _ in r["curve"]], strict=True)
        ax.plot(steps, losses, label=f"{method.upper()} (lr {r['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title(f"D = 9,610, d = {args.dim}, batch 32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "optim_compare.png", dpi=120)
    print(table)
    print(f"wrote {out}/optim_compare.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

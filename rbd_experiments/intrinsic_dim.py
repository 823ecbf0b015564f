"""Intrinsic dimension of a model on a dataset (Li et al. 2018): train θ = θ₀ + P c at several d.

    rbd-intrinsic-dim --model fc --dataset mnist --dims 100 200 400 800 1600

For each d the network is trained in a random d-dimensional subspace (``rbd_cuda.nn.RandomSubspace``,
P regenerated in every forward and backward pass, never stored), and once directly (all D
parameters, same optimizer, learning rate and budget): the baseline. d_int90 is the smallest d
whose accuracy reaches 90 % of the baseline's (Li et al.'s definition; ``--threshold`` changes the
fraction). Writes ``<out>/intrinsic_dim.json`` (settings, per-run accuracies, step times, d_int90)
and ``<out>/intrinsic_dim.png`` (accuracy against d).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from rbd_cuda.basis import NORMALIZATIONS
from rbd_cuda.nn import RandomSubspace
from rbd_cuda.ops import DISTRIBUTIONS

from . import config, data, loop, models
from .reporting import cpu_name

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rbd-intrinsic-dim", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=models.MODELS, default="fc")
    p.add_argument("--dataset", choices=data.DATASETS, default="mnist")
    p.add_argument("--dims", type=int, nargs="+", default=[100, 200, 400, 800, 1600],
                   help="subspace dimensions d to train at")
    p.add_argument("--epochs", type=float, default=3, help="training budget per run, in epochs (fractions allowed)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the subspace runs")
    p.add_argument("--baseline-lr", type=float, default=None, help="learning rate of the direct run (default: --lr)")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="normal",
                   help="entries of P (Li et al.: normal)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="unbiased",
                   help="basis scaling, as in RandomSubspace")
    p.add_argument("--compartments", default="global",
                   help="'global' (Li et al.), 'tensor', 'layer' or a block size")
    p.add_argument("--said", action="store_true", help="one trainable scale per layer (Aghajanyan et al.)")
    p.add_argument("--threshold", type=float, default=0.9, help="fraction of the baseline accuracy defining d_int")
    p.add_argument("--metric-split", choices=("val", "test"), default="val",
                   help="split whose accuracy defines d_int (both are reported)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    p.add_argument("--subspace-seed", type=int, default=1, help="seed of the random bases P")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the direct run and take the baseline accuracy from --baseline-accuracy")
    p.add_argument("--baseline-accuracy", type=float, default=None)
    p.add_argument("--out", default="results/intrinsic_dim", help="output folder")
    config.add_augment_options(p, default="none")
    args = p.parse_args(argv)
    try:
        args.augment = config.augment_from_args(args.dataset, vars(args))
    except ValueError as err:
        p.error(str(err))
    if not args.dims or any(d <= 0 for d in args.dims):
        p.error(f"--dims must be positive integers, got {args.dims}")
    if args.epochs <= 0 or args.batch_size <= 0 or args.lr <= 0:
        p.error("--epochs, --batch-size and --lr must be positive")
    if not 0 < args.threshold <= 1:
        p.error(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.no_baseline != (args.baseline_accuracy is not None):
        p.error("--no-baseline and --baseline-accuracy go together")
    if args.baseline_accuracy is not None and not 0 < args.baseline_accuracy <= 1:
        p.error(f"--baseline-accuracy must be a fraction in (0, 1], got {args.baseline_accuracy}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    for name in ("seed", "subspace_seed"):
        if not 0 <= getattr(args, name) < 2**64:
            p.error(f"--{name.replace('_', '-')} must be in [0, 2**64), got {getattr(args, name)}")
    if args.compartments not in ("global", "tensor", "layer"):
        try:
            args.compartments = int(args.compartments)
        except ValueError:
            p.error(f"--compartments must be 'global', 'tensor', 'layer' or an int, got {args.compartments!r}")
    args.dims = sorted(set(args.dims))
    return args


def d_int(dims: list[int], accuracies: list[float], target: float) -> dict:
    """Li et al.'s d_int: the smallest d (of those tried) whose accuracy reaches ``target``.

    Also a log-linear interpolation between the last d below and the first at or above the
    target, an estimate of where between the grid points the crossing lies (None when the first
    d already reaches it or none does)."""
    pairs = sorted(zip(dims, accuracies, strict=True))
    for k, (d, acc) in enumerate(pairs):
        if acc >= target:
            if k == 0:
                return {"d_int": d, "interpolated": None}
            d0, a0 = pairs[k - 1]
            frac = (target - a0) / (acc - a0)
            return {"d_int": d, "interpolated": math.exp(math.log(d0) + frac * (math.log(d) - math.log(d0)))}
    return {"d_int": None, "interpolated": None}


class Task:
    """The data every run of one invocation trains on: the same batches for each d."""

    def __init__(self, args):
        splits = data.load(args.dataset, args.data_root)
        self.input_shape, self.num_classes = splits.input_shape, splits.num_classes
        self.device = torch.device(args.device)
        self.images = len(splits.train_x)
        self.batches = data.BatchSource(splits, args.augment, seed=args.seed, batch_size=args.batch_size,
                                        device=self.device)

    def accuracy(self, model: nn.Module, split: str) -> float:
        return loop.evaluate(model, self.batches.eval_batches(split, 2000)).accuracy


def train(model: nn.Module, task: Task, args, lr: float, label: str) -> dict:
    """Trains ``model`` (a RandomSubspace or the plain network) for the budget; returns accuracies,
    losses and step times. Evaluation uses the plain network with the current weights (for the
    wrapper its ``export()``: P c computed once, not once per evaluation batch)."""
    opt = OPTIMIZERS[args.optimizer](model.parameters(), lr=lr)
    steps_per_epoch = task.batches.batches_per_epoch
    total = math.ceil(args.epochs * steps_per_epoch)
    times, losses, curve = [], [], []
    bar = tqdm(total=total, desc=label, unit="step", leave=False, dynamic_ncols=True, file=sys.stderr)
    for epoch in range(math.ceil(args.epochs)):
        def after_step(i: int, totals: loop.Totals) -> None:
            times.append(totals.last_seconds)
            losses.append(totals.last_loss)
            bar.update()
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")

        steps = range(min(steps_per_epoch, total - epoch * steps_per_epoch))
        loop.fit_epoch(model, opt, task.batches.batch_at(epoch), steps, first_step=len(times), on_step=after_step)
        plain = model.export() if isinstance(model, RandomSubspace) else model
        curve.append({"epoch": epoch + 1, "step": len(times), **{f"{s}_accuracy": task.accuracy(plain, s)
                                                                  for s in ("val", "test")}})
    bar.close()
    return {"steps": len(times), "final_loss": statistics.fmean(losses[-50:]), "curve": curve,
            "val_accuracy": curve[-1]["val_accuracy"], "test_accuracy": curve[-1]["test_accuracy"],
            # the first steps include one-off allocation and thread start-up
            "step_time_median_s": statistics.median(times[5:] or times), "train_time_s": sum(times)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = result["settings"]["metric_split"]
    runs = result["subspace"]
    dims = [r["dim"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(dims, [r[f"{split}_accuracy"] for r in runs], "o-", label=f"subspace training ({split})")
    base = result["baseline"][f"{split}_accuracy"]
    ax.axhline(base, color="k", lw=1, label=f"direct training {base:.4f}")
    ax.axhline(result["target_accuracy"], color="k", ls="--", lw=1,
               label=f"{result['settings']['threshold']:.0%} of direct = {result['target_accuracy']:.4f}")
    if result["d_int"] is not None:
        ax.axvline(result["d_int"], color="tab:red", ls=":", label=f"d_int{round(100 * result['settings']['threshold'])}"
                   f" = {result['d_int']}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(f"{split} accuracy")
    s = result["settings"]
    ax.set_title(f"{s['model']} on {s['dataset']} (D = {result['numel']:,}), {s['epochs']:g} epochs, "
                 f"{s['optimizer']} lr {s['lr']:g}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Trains the baseline and every d as ``args`` (from ``parse_args``) say; writes and returns
    the result."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = Task(args)

    def network() -> nn.Module:
        return models.build(args.model, task.input_shape, task.num_classes, seed=args.seed).to(task.device)

    numel = models.count_parameters(network())
    print(f"{args.model} on {args.dataset}: D = {numel:,} parameters, {task.images:,} training images, "
          f"{args.epochs:g} epochs of batch {args.batch_size}, {args.optimizer} lr {args.lr:g}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    split = args.metric_split
    if args.no_baseline:
        baseline = {"val_accuracy": None, "test_accuracy": None, f"{split}_accuracy": args.baseline_accuracy,
                    "given": True}
    else:
        baseline = train(network(), task, args, args.baseline_lr or args.lr, "direct")
        print(f"direct training: val {baseline['val_accuracy']:.4f}, test {baseline['test_accuracy']:.4f}, "
              f"{1e3 * baseline['step_time_median_s']:.2f} ms/step", file=sys.stderr)
    target = args.threshold * baseline[f"{split}_accuracy"]

    runs = []
    for d in tqdm(args.dims, desc="dims", unit="d", dynamic_ncols=True, file=sys.stderr):
        wrapper = RandomSubspace(network(), d, seed=args.subspace_seed, distribution=args.distribution,
                                 compartments=args.compartments, normalize=args.normalize, said=args.said)
        run = {"dim": d, "trainable": wrapper.summary()["trainable"], **train(wrapper, task, args, args.lr, f"d={d}")}
        runs.append(run)
        tqdm.write(f"d = {d}: val {run['val_accuracy']:.4f}, test {run['test_accuracy']:.4f} "
                   f"({run[f'{split}_accuracy'] / baseline[f'{split}_accuracy']:.1%} of direct), "
                   f"{1e3 * run['step_time_median_s']:.1f} ms/step", file=sys.stderr)

    found = d_int([r["dim"] for r in runs], [r[f"{split}_accuracy"] for r in runs], target)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)} | {"augment": args.augment.as_dict()}
    result = {
        "settings": settings, "numel": numel, "baseline": baseline, "subspace": runs,
        "target_accuracy": target, "d_int": found["d_int"], "d_int_interpolated": found["interpolated"],
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": cpu_name(), "threads": torch.get_num_threads(),
                        "device": str(task.device), "command": "rbd-intrinsic-dim " + " ".join(
                            sys.argv[1:] if argv is None else argv)},
    }
    (out / "intrinsic_dim.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "intrinsic_dim.png")
    pct = round(100 * args.threshold)
    if found["d_int"] is None:
        print(f"d_int{pct}: not reached (best {max(r[f'{split}_accuracy'] for r in runs):.4f} < target "
              f"{target:.4f}); try larger --dims", file=sys.stderr)
    else:
        extra = (f" (log-linear interpolation between grid points: {found['interpolated']:.0f})"
                 if found["interpolated"] is not None else "")
        print(f"d_int{pct} = {found['d_int']}{extra}; target {split} accuracy {target:.4f}", file=sys.stderr)
    print(f"wrote {out / 'intrinsic_dim.json'} and {out / 'intrinsic_dim.png'}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

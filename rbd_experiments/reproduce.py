"""Reproduce rows of the paper's Table 1: rows × methods × seeds, each trained with the paper's settings.

    rbd-reproduce      # FC-MNIST, SGD and RBD, 2 epochs
    rbd-reproduce --rows fc-mnist,fc-fmnist --methods sgd,rbd,fpd,nes --crop-pads 0 --seeds 0,1,2 --epochs 100

Each run trains as ``rbd-train`` would into ``OUT/runs/<row>-<method>-<augmentation>-s<seed>/``
(e.g. ``fc-fmnist-rbd-crop1-b0.5-s0``; bases other than the paper's add their tags after the
method: ``fc-mnist-rbd-rademacher-crop3-b0.5-s0``, ``fc-mnist-rbd-rademacher-layer-t250-crop3-b0.5-s0``)
and is resumed from its checkpoint when the command is repeated (a finished run is reused; asking
for more epochs continues it). ``--jobs N`` trains N runs at once, each in its own process on one CPU thread (``rbd-train`` uses every core; a run resumes
bit for bit only with the thread count it was started with). Ctrl-C or SIGTERM saves every running
run after its step in progress and exits with status 130. Writes ``OUT/table.md`` (validation
accuracy, mean ± std over seeds, beside the paper's number and the difference), ``OUT/table.json``
and ``OUT/curves.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import signal
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rbd_cuda.ops import DISTRIBUTIONS

from . import data, loop
from .config import METHODS, PAPER_DIM, TrainConfig, resolve_device
from .reporting import save_figure
from .train import CLI_ERRORS, Interrupted, StopRequest, report_error, train

# The paper's Table 1 (validation accuracy in % after 100 epochs, mean ± std; docs/reproducing.md).
PAPER_TABLE = {
    "fc-mnist": {"nes": (22.5, 1.7), "fpd": (80.0, 0.4), "rbd": (93.893, 0.024), "sgd": (98.27, 0.09)},
    "fc-fmnist": {"nes": (45.0, 6.0), "fpd": (77.3, 0.29), "rbd": (85.65, 0.2), "sgd": (87.32, 0.21)},
    "fc-cifar10": {"nes": (17.8, 0.5), "fpd": (21.4, 1.2), "rbd": (43.77, 0.22), "sgd": (52.09, 0.22)},
    "cnn-mnist": {"nes": (51.0, 6.0), "fpd": (88.9, 0.6), "rbd": (97.17, 0.1), "sgd": (99.41, 0.09)},
    "cnn-fmnist": {"nes": (37.0, 4.0), "fpd": (77.8, 1.6), "rbd": (85.56, 0.1), "sgd": (91.95, 0.18)},
    "cnn-cifar10": {"nes": (20.3, 1.0), "fpd": (37.2, 0.8), "rbd": (54.64, 0.33), "sgd": (81.4, 0.4)},
    # Fig. 1 gives no absolute accuracies for ResNet-8 (d = 500): the row has no paper numbers.
    "resnet8-cifar10": {},
}
PAPER_EPOCHS = 100
COMPARTMENTS = ("global", "layer", "tensor")


@dataclasses.dataclass(frozen=True)
class Bases:
    """How a run draws its random bases, where it may differ from the paper's (normal entries, one
    global compartment of the row's d): the entries' distribution (RBD, FPD, NES), the
    compartments and a total d split over them (``--total-dim``, ``--min-dim``; RBD and FPD)."""

    distribution: str = "normal"
    compartments: str = "global"
    total_dim: int | None = None
    min_dim: int = 1

    @classmethod
    def of(cls, method: str, model: str, distribution: str, compartments: str, total_dim: int | None,
           min_dim: int) -> Bases:
        """The bases a ``method`` run asks for, with what the method does not use left at the
        default, so that the run is named (and trained) once: SGD draws no basis, NES draws
        ``--population`` directions in one compartment."""
        if method == "sgd":
            return cls()
        if method == "nes":
            return cls(distribution)
        if compartments == "global" and total_dim is not None and min_dim <= total_dim:
            # One compartment takes the whole total, whatever the minimum; the row's d in it is the
            # paper's run (the committed one).
            min_dim = 1
            total_dim = None if total_dim == PAPER_DIM[model] else total_dim
        return cls(distribution, compartments, total_dim, min_dim)

    def options(self) -> dict:
        """The ``TrainConfig`` fields they set."""
        return dataclasses.asdict(self)

    def tag(self) -> str:
        """The run name's part for what differs from the paper's bases: ``""`` (the paper's),
        ``"-rademacher"``, ``"-rademacher-layer-t250"``, ``"-tensor-t250-min5"``."""
        parts = [self.distribution] if self.distribution != "normal" else []
        parts += [self.compartments] if self.compartments != "global" else []
        parts += [f"t{self.total_dim}"] if self.total_dim is not None else []
        parts += [f"min{self.min_dim}"] if self.min_dim != 1 else []
        return "".join(f"-{part}" for part in parts)


def describe_bases(bases: dict, model: str) -> str:
    """What differs from the paper's bases in words for the tables (``""`` where nothing does)."""
    parts = [f"{bases['distribution']} entries"] if bases["distribution"] != "normal" else []
    if bases["compartments"] != "global":
        parts.append(f"per {bases['compartments']}")
        if bases["total_dim"] is None:
            parts.append(f"d = {PAPER_DIM[model]} each")
    if bases["total_dim"] is not None:
        parts.append(f"d = {bases['total_dim']} in all" + (f", ≥ {bases['min_dim']} each" if bases["min_dim"] != 1
                                                             else ""))
    return ", ".join(parts)


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"--{what}: {', '.join(bad) or 'nothing given'} not among {', '.join(allowed)}")
    return items


def parse_seeds(text: str) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items):
        raise ValueError(f"--seeds must be comma-separated non-negative integers, got {text!r}")
    return [int(t) for t in items]


def parse_crop_pads(text: str) -> list[int | None]:
    """``paper`` (the released code's pad for the row's dataset) or non-negative integers."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t == "paper" or t.isdigit() for t in items):
        raise ValueError(f"--crop-pads must be comma-separated non-negative integers or 'paper', got {text!r}")
    return [None if t == "paper" else int(t) for t in items]


def row_augment(row: str, crop_pad: int | None, brightness: float | None) -> data.Augment:
    """The augmentation of a run of ``row``: the paper's pipeline with the crop pad and brightness
    given (None keeps the paper's)."""
    return data.Augment.paper(row.split("-")[1]).changed(crop_pad=crop_pad, brightness=brightness)


def run_name(row: str, method: str, bases: Bases, augment: data.Augment, seed: int) -> str:
    return f"{row}-{method}{bases.tag()}-{augment.tag()}-s{seed}"


def final_row(history: list[dict]) -> dict | None:
    complete = [r for r in history if r["complete_epoch"]]
    return complete[-1] if complete else (history[-1] if history else None)


def _config(row: str, method: str, bases: Bases, augment: data.Augment, seed: int, epochs: int, out: Path,
            **kw) -> TrainConfig:
    model, dataset = row.split("-")
    run_dir = out / "runs" / run_name(row, method, bases, augment, seed)
    return TrainConfig(model=model, dataset=dataset, method=method, epochs=epochs, seed=seed, augment=augment,
                       out=str(run_dir), resume=(run_dir / "checkpoint.pt").is_file(), **bases.options(), **kw)


_worker_stop: Callable[[], bool] = lambda: False


def _start_worker(stop_event, parent_pid: int) -> None:
    """A worker stops (saving after its step in progress) when the main process asks, when the
    main process is gone, or on a SIGTERM of its own. Ctrl-C reaches every process of the terminal:
    the workers leave it to the main process."""
    global _worker_stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    own = StopRequest()
    own.polled = True
    signal.signal(signal.SIGTERM, own.handle)
    _worker_stop = lambda: own() or stop_event.is_set() or os.getppid() != parent_pid


def _train_in_worker(cfg: TrainConfig) -> list[dict]:
    torch.set_num_threads(1)  # one core per run: the runs themselves are the parallelism
    return train(cfg, stop=_worker_stop).history


RunKey = tuple[str, str, Bases, data.Augment, int]  # (row, method, bases, augmentation, seed)


def run_keys(rows: list[str], methods: list[str], crop_pads: list[int | None], brightness: float | None,
             seeds: list[int], distributions: list[str] = ("normal",), compartments: list[str] = ("global",),
             total_dim: int | None = None, min_dim: int = 1) -> list[RunKey]:
    """Every run asked for, once, each checked as ``rbd-train`` would check it (nothing trains
    before every one is valid)."""
    keys = [(row, method, Bases.of(method, row.split("-")[0], distribution, layout, total_dim, min_dim),
             row_augment(row, pad, brightness), seed)
            for row in rows for method in methods for distribution in distributions for layout in compartments
            for pad in crop_pads for seed in seeds]
    keys = list(dict.fromkeys(keys))  # `--crop-pads paper,3`, `--seeds 0,0` or SGD's bases name a run twice
    for row, method, bases, _, _ in keys:
        model, dataset = row.split("-")
        TrainConfig(model=model, dataset=dataset, method=method, **bases.options())
    return keys


def group(histories: dict[RunKey, list[dict]]) -> dict:
    """{row: {(method, bases, augmentation): {seed: history}}} in the order of the keys."""
    results: dict[str, dict[tuple[str, Bases, data.Augment], dict[int, list[dict]]]] = {}
    for (row, method, bases, augment, seed), history in histories.items():
        results.setdefault(row, {}).setdefault((method, bases, augment), {})[seed] = history
    return results


def furthest(by_seed: dict[int, list[dict]]) -> tuple[list[list[dict]], list[tuple[int, float]]]:
    """The histories of the seeds that reached the series' furthest epoch, and (seed, epoch) of
    those still behind it: a mean over runs at different epochs would describe no run."""
    epochs = {seed: final_row(h)["epoch"] for seed, h in by_seed.items()}
    last = max(epochs.values())
    return ([h for seed, h in by_seed.items() if epochs[seed] == last],
            [(seed, epoch) for seed, epoch in epochs.items() if epoch < last])


def run_all(keys: list[RunKey], epochs: int, out: Path, *, max_steps: int | None = None, device: str = "auto",
            data_root: str | None = None, progress: bool = True, jobs: int = 1,
            stop: Callable[[], bool] = lambda: False) -> dict:
    """Trains every run not already done (``jobs`` at a time, each in its own process when
    jobs > 1); returns the histories grouped as by ``group``. Once ``stop()`` is true, every
    running run saves after its step in progress, no other run starts, and ``Interrupted`` is
    raised."""
    common = {"max_steps": max_steps, "device": device, "data_root": data_root}
    histories: dict[RunKey, list[dict]] = {}
    outer = tqdm(total=len(keys), desc="Table 1 runs", disable=not progress, dynamic_ncols=True)
    if jobs == 1:
        cache: dict[str, data.Splits] = {}
        for key in keys:
            cfg = _config(*key, epochs, out, progress=progress, **common)
            outer.set_postfix_str(run_name(*key))
            if cfg.dataset not in cache:
                cache[cfg.dataset] = data.load(cfg.dataset, data_root, split_seed=cfg.split_seed)
            try:
                histories[key] = _named(key, lambda cfg=cfg: train(cfg, cache[cfg.dataset], stop=stop).history)
            except Interrupted as err:
                raise _interrupted([f"{run_name(*key)}: {err}"]) from None
            outer.update()
    else:
        _train_in_pool(keys, epochs, out, common, jobs, stop, histories, outer.update)
    outer.close()
    return group({key: histories[key] for key in keys})


def _train_in_pool(keys: list[RunKey], epochs: int, out: Path, common: dict, jobs: int, stop: Callable[[], bool],
                   histories: dict, advance: Callable[[], object]) -> None:
    context = multiprocessing.get_context("spawn")  # CUDA and OpenMP state do not survive fork
    stop_event = context.Event()
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                                                  initargs=(stop_event, os.getpid()))
    interrupted: list[str] = []
    try:
        futures = {pool.submit(_train_in_worker, _config(*key, epochs, out, progress=False, **common)): key
                   for key in keys}
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            if stop() and not stop_event.is_set():
                stop_event.set()
                pending = {f for f in pending if not f.cancel()}  # runs not started stay unstarted
            for future in done:
                try:
                    histories[futures[future]] = _named(futures[future], future.result)
                except Interrupted as err:
                    interrupted.append(f"{run_name(*futures[future])}: {err}")
                except concurrent.futures.BrokenExecutor:
                    if not stop():
                        raise
                    # A signal to the process group killed a worker still starting (before _start_worker
                    # installed its handlers), and the pool broke with it.
                    interrupted.append(f"{run_name(*futures[future])}: its worker stopped without reporting (one "
                                       "still starting dies of the signal); the run keeps its last checkpoint")
                advance()
    finally:
        stop_event.set()  # whatever ends this (an error, a second Ctrl-C), the workers save and stop
        pool.shutdown(wait=True, cancel_futures=True)
    if interrupted or stop():
        raise _interrupted(interrupted or ["no run was in progress"])


def _interrupted(runs: list[str]) -> Interrupted:
    """The interrupt of the whole command, naming where each run stopped."""
    return Interrupted("interrupted; each run was saved after its step in progress (repeat the command to "
                       "continue):\n  " + "\n  ".join(runs))


def _named(key: RunKey, result):
    """``result()``, with a diverged run's error naming the run."""
    try:
        return result()
    except loop.NonFiniteLoss as err:
        raise loop.NonFiniteLoss(f"{run_name(*key)}: {err} (the finished runs are kept; --report tabulates "
                                 "them)") from None


def read_metrics(path: Path) -> dict:
    """A run's metrics.json, or an error that names the file."""
    try:
        saved = json.loads(path.read_text())
        problem = None if isinstance(saved, dict) and {"history", "device"} <= saved.keys() else \
            "no history or device entry"
    except (OSError, ValueError) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem:
        raise ValueError(f"{path} is unreadable ({problem}); rerun the same reproduce command without --report "
                         "to rewrite it from the run's checkpoint")
    return saved


def collect(keys: list[RunKey], out: Path) -> tuple[dict, str]:
    """The histories of the runs already under ``out/runs`` (no training; missing runs are left
    out) and the devices they ran on."""
    histories: dict[RunKey, list[dict]] = {}
    devices = set()
    for key in keys:
        path = out / "runs" / run_name(*key) / "metrics.json"
        if path.is_file():
            saved = read_metrics(path)
            if saved["history"]:
                histories[key] = saved["history"]
                devices.add(saved["device"])
    if not histories:
        raise ValueError(f"--report: no finished runs under {out / 'runs'} for these rows, methods, distributions, "
                         "compartments, crop pads and seeds")
    return group(histories), ", ".join(sorted(devices))


def summarize(results: dict) -> list[dict]:
    """One entry per (row, method, bases, augmentation): mean ± std of the final validation
    accuracy over seeds."""
    table = []
    for row, by_series in results.items():
        for (method, bases, augment), by_seed in by_series.items():
            histories, behind = furthest(by_seed)
            finals = [final_row(h) for h in histories]
            accs = [f["val_acc"] for f in finals]
            paper = PAPER_TABLE[row].get(method)
            mean = statistics.fmean(accs)
            table.append({"row": row, "method": method, "bases": bases.options(), "augment": augment.as_dict(),
                          "seeds": len(accs),
                          "epochs": min(f["epoch"] for f in finals),
                          "val_acc_mean": mean, "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                          "paper_mean": paper[0] if paper else None, "paper_std": paper[1] if paper else None,
                          "difference": mean - paper[0] if paper else None,
                          "images_per_s": statistics.fmean(f["images_per_s"] for f in finals),
                          "behind": [{"seed": seed, "epoch": epoch} for seed, epoch in behind]})
    return table


def describe(augment: dict) -> str:
    """An augmentation in words for the tables, marking the released code's pipeline."""
    parts = [f"crop ±{augment['crop_pad']}" if augment["crop_pad"] else "no crop"]
    if augment["brightness"]:
        parts.append(f"brightness ±{augment['brightness']:g}")
    if augment["flip"]:
        parts.append("flips")
    return ", ".join(parts)


def describe_method(entry: dict) -> str:
    """A table row's method, with its bases where they are not the paper's: ``rbd, rademacher
    entries, per layer, d = 250 in all``."""
    return ", ".join(filter(None, (entry["method"], describe_bases(entry["bases"], entry["row"].split("-")[0]))))


def markdown(table: list[dict], device: str) -> str:
    lines = [(f"Validation accuracy (%), mean ± std over seeds; the paper's after {PAPER_EPOCHS} epochs with its "
              f"released pipeline (crop ±3 and brightness ±0.5 for MNIST/FMNIST). Device: {device}; images/s "
              "(which depend on the machine's load) are in table.json."),
             "",
             "| row | method | augmentation | epochs | seeds | ours | paper | ours − paper |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        paper = f"{t['paper_mean']:g} ± {t['paper_std']:g}" if t["paper_mean"] is not None else "—"
        diff = f"{t['difference']:+.2f}" if t["difference"] is not None else "—"
        ours = f"{t['val_acc_mean']:.2f}" + (f" ± {t['val_acc_std']:.2f}" if t["seeds"] > 1 else "")
        lines.append(f"| {t['row']} | {describe_method(t)} | {describe(t['augment'])} | {t['epochs']:.3g} | "
                     f"{t['seeds']} | {ours} | {paper} | {diff} |")
    behind = [f"{t['row']} {describe_method(t)} {describe(t['augment'])}: seed {b['seed']} at epoch {b['epoch']:.3g}"
              for t in table for b in t["behind"]]
    if behind:
        lines += ["", "Under way, left out of their rows until they reach the rows' epochs: " + "; ".join(behind) + "."]
    return "\n".join(lines) + "\n"


def mean_curve(histories: list[list[dict]]) -> list[dict]:
    """Per-epoch mean over seeds, up to the shortest run."""
    length = min(len(h) for h in histories)
    return [{"epoch": histories[0][i]["epoch"],
             "val_acc": statistics.fmean(h[i]["val_acc"] for h in histories),
             "val_loss": statistics.fmean(h[i]["val_loss"] for h in histories)} for i in range(length)]


def plot(results: dict, path: Path) -> None:
    """Per row, the seed-averaged validation curves of each method and augmentation; dashed: the
    paper's numbers."""
    panels = []
    for row, by_series in results.items():
        curves, references = {}, {}
        for (method, bases, augment), by_seed in by_series.items():
            histories, _ = furthest(by_seed)
            series = describe_method({"row": row, "method": method, "bases": bases.options()})
            label = f"{series}, {describe(augment.as_dict())} (n={len(histories)})"
            curves[label] = mean_curve(histories)
            if method in PAPER_TABLE[row]:
                references[label] = PAPER_TABLE[row][method][0]
        panels.append((curves, f"{row} (dashed: paper, {PAPER_EPOCHS} epochs)", references))
    save_figure(panels, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rbd-reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="fc-mnist", help=f"comma-separated, of {', '.join(PAPER_TABLE)}")
    p.add_argument("--methods", default="sgd,rbd", help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--crop-pads", default="paper",
                   help="comma-separated crop pads of the augmentation, each a pipeline of its own: 'paper' (the "
                        "released code's: 3 for MNIST/FMNIST, 4 for CIFAR-10) or K (shifts of up to ±K; 0 = no crop)")
    p.add_argument("--brightness", type=float,
                   help="brightness range of the augmentation (default: the paper's, 0.5 for MNIST/FMNIST)")
    p.add_argument("--distributions", default="normal",
                   help=f"comma-separated entries of the bases, each runs of its own, of {', '.join(DISTRIBUTIONS)} "
                        "(rbd-train --help: what each costs and changes; SGD has no basis)")
    p.add_argument("--compartments", default="global",
                   help=f"comma-separated compartments of RBD and FPD, each runs of its own, of "
                        f"{', '.join(COMPARTMENTS)} (with the row's d each, or --total-dim split over them)")
    p.add_argument("--total-dim", type=int,
                   help="RBD and FPD: this many directions in all, split over the compartments in proportion to their "
                        "sizes (compartments compared at equal total d; global with the row's d is the paper's run)")
    p.add_argument("--min-dim", type=int, default=1, help="with --total-dim: the fewest directions a compartment gets "
                                                          "(default 1)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, help="cap each run's optimizer steps (quick checks)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process and one CPU thread each")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root")
    p.add_argument("--out", default="results/reproduce")
    p.add_argument("--report", action="store_true",
                   help="train nothing: tabulate the runs already under OUT/runs (each at its last epoch)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rows = parse_list(args.rows, PAPER_TABLE, "rows")
        methods = parse_list(args.methods, METHODS, "methods")
        seeds = parse_seeds(args.seeds)
        keys = run_keys(rows, methods, parse_crop_pads(args.crop_pads), args.brightness, seeds,
                        parse_list(args.distributions, DISTRIBUTIONS, "distributions"),
                        parse_list(args.compartments, COMPARTMENTS, "compartments"), args.total_dim, args.min_dim)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        device = str(resolve_device(args.device))
        out = Path(args.out)
        if args.report:
            results, device = collect(keys, out)
        else:
            results = run_all(keys, args.epochs, out, max_steps=args.max_steps, device=args.device,
                              data_root=args.data_root, progress=args.progress, jobs=args.jobs, stop=stop)
    except CLI_ERRORS as err:
        return report_error(err)
    except KeyboardInterrupt:  # a second signal, or one before training started
        print("interrupted; the runs keep their last checkpoints (repeat the command to continue)", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    table = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(table, device))
    (out / "table.json").write_text(json.dumps({"device": device, "dims": PAPER_DIM, "rows": table}, indent=2) + "\n")
    plot(results, out / "curves.png")
    print(markdown(table, device))
    print(f"table: {out / 'table.md'} (and table.json); curves: {out / 'curves.png'}; runs: {out / 'runs'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

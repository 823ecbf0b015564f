"""Train one of the paper's networks with SGD, RBD, FPD or NES.

    rbd-train --model fc --dataset mnist --method rbd --epochs 5 --out runs/fc-mnist-rbd

Defaults are the paper's Table 1 settings (docs/reproducing.md): batch 32, the constant learning
rate of the paper's code for the (model, dataset) pair, d = 250 directions in one global compartment
(500 for ResNet-8), normal entries, the paper's ÷√D normalisation, the validation block of
10,000 images cut from the training set, and the released code's training augmentation (crop ±3 and
brightness ±0.5 for MNIST/FMNIST; --crop-pad, --brightness, --flip and --no-augment change it). The
reported accuracy is on that validation block, as in the paper.

Writes, under ``--out``: ``metrics.json`` (configuration and one row per epoch), ``metrics.csv``
(the rows), ``curves.png`` (loss and accuracy per epoch) and ``checkpoint.pt``, from which
``--resume`` continues a run bit for bit, also from the middle of an epoch: after ``--max-steps``,
or after Ctrl-C / SIGTERM, which save the run after the step in progress. A second run into the
same ``--out`` needs ``--resume`` or ``--overwrite``. A NaN or infinite training loss stops the
run with an error (exit status 1) before it is applied.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import pickle
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rbd_cuda.basis import NORMALIZATIONS
from rbd_cuda.ops import DISTRIBUTIONS
from rbd_cuda.optim import FPD, NES, RBD

from . import data, loop, models
from .reporting import save_figure

METHODS = ("sgd", "rbd", "fpd", "nes")
# Learning rates of the paper's code for batch 32 (docs/reproducing.md): (RBD/FPD/NES, SGD).
PAPER_LR = {
    ("fc", "mnist"): (1.0, 0.125),
    ("fc", "fmnist"): (0.5, 0.25),
    ("fc", "cifar10"): (0.25, 0.0078125),
    ("cnn", "mnist"): (0.0625, 0.03125),
    ("cnn", "fmnist"): (0.125, 0.0625),
    ("cnn", "cifar10"): (0.125, 0.015625),
}
# The paper gives no learning rate for ResNet-8 (its code has no ResNet): the CNN's are used.
PAPER_DIM = {"fc": 250, "cnn": 250, "resnet8": 500}
EVAL_BATCH = 5000
# Fields a resumed run must share with the checkpoint (epochs and max_steps may change).
RUN_IDENTITY = ("model", "dataset", "method", "dim", "lr", "batch_size", "seed", "split_seed",
                "distribution", "normalize", "compartments", "momentum", "population", "sigma",
                "augment", "val_size")


def _option(help: str, **argparse_kw) -> dict:
    """Dataclass field metadata: the field's command-line help (and argparse keywords). The
    field's default is the option's default: each is stated once, in ``TrainConfig``."""
    return {"help": help, **argparse_kw}


@dataclass
class TrainConfig:
    """One training run. Every field is a command-line option of ``rbd-train``
    (underscores become dashes), except ``augment``, which is set by --crop-pad, --brightness,
    --flip and --no-augment."""

    model: str = field(default="fc", metadata=_option(f"network: {', '.join(models.MODELS)}"))
    dataset: str = field(default="mnist", metadata=_option(f"dataset: {', '.join(data.DATASETS)}"))
    method: str = field(default="rbd", metadata=_option(f"optimizer: {', '.join(METHODS)}"))
    epochs: int = field(default=1, metadata=_option("epochs to train in all (a resumed run continues to this)"))
    max_steps: int | None = field(default=None, metadata=_option("stop after this many optimizer steps in all",
                                                                  type=int))
    dim: int | None = field(default=None, metadata=_option("directions per compartment (default: the paper's, "
                                                            "250; 500 for resnet8)", type=int))
    lr: float | None = field(default=None, metadata=_option("learning rate (default: the paper's for the task "
                                                             "and method)", type=float))
    batch_size: int = field(default=32, metadata=_option("minibatch size"))
    seed: int = field(default=0, metadata=_option("initial weights, data order, augmentation and bases"))
    split_seed: int = field(default=0, metadata=_option("where the validation block is cut"))
    distribution: str = field(default="normal", metadata=_option(f"entries of the bases: {', '.join(DISTRIBUTIONS)}"))
    normalize: str = field(default="paper", metadata=_option(f"basis scaling: {', '.join(NORMALIZATIONS)}"))
    compartments: str = field(default="global", metadata=_option("global, tensor, layer or max entries per "
                                                                 "compartment"))
    momentum: float = field(default=0.0, metadata=_option("momentum (SGD's, or RBD's EMA form)"))
    population: int | None = field(default=None, metadata=_option("NES population (default: --dim)", type=int))
    sigma: float = field(default=0.01, metadata=_option("NES perturbation size"))
    augment: data.Augment | None = None  # None: the paper's pipeline for the dataset
    val_size: int = field(default=data.VALIDATION_SIZE, metadata=_option("images in the validation block"))
    device: str = field(default="auto", metadata=_option("auto (CUDA when available), cpu, cuda, cuda:1, ..."))
    data_root: str | None = field(default=None, metadata=_option("where datasets live (default $RBD_DATA or "
                                                                  "~/.cache/rbd_cuda)", type=str))
    out: str = field(default="runs/latest", metadata=_option("directory for metrics, plot and checkpoint"))
    resume: bool = field(default=False, metadata=_option("continue from OUT/checkpoint.pt"))
    overwrite: bool = field(default=False, metadata=_option("start afresh even if OUT holds a checkpoint"))
    progress: bool = field(default=True, metadata=_option("progress bars and a line per epoch"))

    def __post_init__(self):
        check_choices(self)
        if self.dim is None:
            self.dim = PAPER_DIM.get(self.model, 250)
        if self.lr is None:
            self.lr = default_lr(self.model, self.dataset, self.method)
        if self.population is None:
            self.population = self.dim
        if self.augment is None:
            self.augment = data.Augment.paper(self.dataset)
        elif isinstance(self.augment, dict):
            self.augment = data.Augment(**self.augment)
        check_config(self)


def default_lr(model: str, dataset: str, method: str) -> float:
    rbd_lr, sgd_lr = PAPER_LR[("cnn" if model == "resnet8" else model, dataset)]
    return sgd_lr if method == "sgd" else rbd_lr


def check_choices(cfg: TrainConfig) -> None:
    choices = {"model": models.MODELS, "dataset": data.DATASETS, "method": METHODS,
               "distribution": DISTRIBUTIONS, "normalize": NORMALIZATIONS}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")


def check_config(cfg: TrainConfig) -> None:
    at_least_one = {"epochs": cfg.epochs, "dim": cfg.dim, "batch-size": cfg.batch_size,
                    "population": cfg.population, "val-size": cfg.val_size}
    for name, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    for name, value in (("lr", cfg.lr), ("sigma", cfg.sigma)):
        if not 0 < value < math.inf:
            raise ValueError(f"--{name} must be positive and finite, got {value}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    for name, value in (("seed", cfg.seed), ("split-seed", cfg.split_seed)):
        if not 0 <= value < 2**64:
            raise ValueError(f"--{name} must be in [0, 2**64), got {value}")
    if cfg.method == "nes" and cfg.population < 2:
        raise ValueError(f"--population must be at least 2 for NES, got {cfg.population}")
    if cfg.compartments not in ("global", "tensor", "layer") and not cfg.compartments.isdigit():
        raise ValueError(f"--compartments must be global, tensor, layer or a number of entries, "
                         f"got {cfg.compartments!r}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")


def augment_from_args(dataset: str, crop_pad: int | None, brightness: float | None, flip: bool | None,
                      none: bool) -> data.Augment:
    """The paper's pipeline for ``dataset`` with the options given on the command line changed."""
    if none:
        if (crop_pad, brightness, flip) != (None, None, None):
            raise ValueError("--no-augment cannot be combined with --crop-pad, --brightness or --flip")
        return data.NO_AUGMENT
    if dataset not in data.DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(data.DATASETS)}, got {dataset!r}")
    paper = data.Augment.paper(dataset)
    try:
        return data.Augment(paper.crop_pad if crop_pad is None else crop_pad,
                            paper.brightness if brightness is None else brightness,
                            paper.flip if flip is None else flip)
    except ValueError as err:
        raise ValueError(str(err).replace("rbd_cuda: crop_pad", "--crop-pad").replace(
            "rbd_cuda: brightness", "--brightness")) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available (use --device cpu or auto)")
    return device


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    if cfg.method == "nes":
        return NES(model.parameters(), cfg.lr, cfg.population, cfg.sigma, distribution=cfg.distribution,
                   normalize=cfg.normalize, seed=cfg.seed)
    compartments = int(cfg.compartments) if cfg.compartments.isdigit() else cfg.compartments
    kind = RBD if cfg.method == "rbd" else FPD
    return kind(model.named_parameters(), cfg.lr, cfg.dim, compartments=compartments,
                distribution=cfg.distribution, normalize=cfg.normalize, momentum=cfg.momentum,
                seed=cfg.seed)


def evaluate(model: torch.nn.Module, dataset: str, images: torch.Tensor, labels: torch.Tensor,
             device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy in %) over a whole split, in batches of 5000 as in the paper."""
    batches = ((data.prepare(dataset, images[k:k + EVAL_BATCH]).to(device), labels[k:k + EVAL_BATCH].to(device))
               for k in range(0, len(images), EVAL_BATCH))
    result = loop.evaluate(model, batches)
    return result.loss, result.percent


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was saved after the step in progress."""


class Run:
    """One training run: its state, its steps, its outputs and its checkpoint."""

    def __init__(self, cfg: TrainConfig, splits: data.Splits | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.splits = splits or data.load(cfg.dataset, cfg.data_root, val_size=cfg.val_size,
                                          split_seed=cfg.split_seed)
        self.model = models.build(cfg.model, self.splits.input_shape, seed=cfg.seed).to(self.device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.out = Path(cfg.out)
        n_train = len(self.splits.train_x)
        self.batches_per_epoch = math.ceil(n_train / cfg.batch_size)
        # An NES step consumes `population` batches (one per member), so an epoch has fewer steps.
        self.batches_per_step = cfg.population if cfg.method == "nes" else 1
        self.steps_per_epoch = self.batches_per_epoch // self.batches_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"--population {cfg.population} needs more batches than one epoch has "
                             f"({self.batches_per_epoch})")
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.totals = loop.Totals()
        self.history: list[dict] = []

    def _batch_at(self, order: torch.Tensor, index: int) -> loop.Batch:
        cfg = self.cfg
        idx = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        gen = data.batch_generator(cfg.seed, self.epoch, index)
        x = data.prepare(cfg.dataset, self.splits.train_x[idx], augment=cfg.augment, gen=gen)
        return x.to(self.device), self.splits.train_y[idx].to(self.device)

    def run(self, stop: Callable[[], bool] = lambda: False) -> list[dict]:
        """Trains up to ``epochs`` (or ``max_steps``); checkpoints after each epoch, at
        ``max_steps`` and, once ``stop()`` turns true (checked between steps), saves and raises
        ``Interrupted``."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        while self.epoch < cfg.epochs and not self._at_max_steps():
            order = data.epoch_order(len(self.splits.train_x), cfg.seed, self.epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not cfg.progress,
                       desc=f"{cfg.method} {cfg.model}-{cfg.dataset} epoch {self.epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True)

            def after_step(i: int, totals: loop.Totals, bar=bar) -> None:
                self.step_in_epoch, self.global_step = i + 1, self.global_step + 1
                bar.update()
                if self.step_in_epoch % 20 == 0 or self.step_in_epoch == self.steps_per_epoch:
                    bar.set_postfix(totals.summary(), refresh=False)

            try:
                loop.fit_epoch(self.model, self.optimizer, lambda k, order=order: self._batch_at(order, k),
                               range(self.step_in_epoch, self.steps_per_epoch), members=self.batches_per_step,
                               first_step=self.global_step, totals=self.totals, on_step=after_step,
                               should_stop=lambda: stop() or self._at_max_steps())
            finally:
                bar.close()
            complete = self.step_in_epoch == self.steps_per_epoch
            if complete or self._at_max_steps() or not stop():  # a stop mid-epoch records no row
                self._record(complete)
            if complete:
                self.epoch += 1
                self.step_in_epoch = 0
                self.totals = loop.Totals()
            self.save()
            if stop():
                raise Interrupted(f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch} of "
                                  f"{self.steps_per_epoch}; saved to {self.checkpoint_path()} (continue with "
                                  "--resume)")
        return self.history

    def _at_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def _record(self, complete: bool) -> None:
        val_loss, val_acc = evaluate(self.model, self.cfg.dataset, self.splits.val_x, self.splits.val_y,
                                     self.device)
        metrics = self.totals.summary()
        row = {"epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch, "step": self.global_step,
               "train_loss": metrics["loss"], "train_acc": metrics["acc"], "val_loss": val_loss,
               "val_acc": val_acc, "images_per_s": metrics["img/s"], "train_seconds": self.totals.seconds,
               "complete_epoch": complete}
        # A partial epoch's row (after --max-steps) is replaced once the epoch completes.
        self.history = [r for r in self.history if r["complete_epoch"]] + [row]
        if self.cfg.progress:
            tqdm.write(f"{self.cfg.method} {self.cfg.model}-{self.cfg.dataset} epoch {row['epoch']:.2f}: "
                       f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% | val loss "
                       f"{val_loss:.4f} acc {val_acc:.2f}% | {row['images_per_s']} img/s")
        self.write_results()

    # -- outputs and checkpoints -----------------------------------------------------------
    def summary(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "parameters": models.count_parameters(self.model),
                "device": str(self.device), "torch": torch.__version__, "history": self.history}

    def write_results(self) -> None:
        _write_atomically(self.out / "metrics.json", json.dumps(self.summary(), indent=2) + "\n")
        lines = io.StringIO()
        writer = csv.DictWriter(lines, fieldnames=list(self.history[0]))
        writer.writeheader()
        writer.writerows(self.history)
        _write_atomically(self.out / "metrics.csv", lines.getvalue())
        save_figure([({self.cfg.method: self.history}, f"{self.cfg.model}-{self.cfg.dataset}", None)],
                    self.out / "curves.png")

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        state = {"config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "sums": dataclasses.asdict(self.totals), "history": self.history}
        tmp = self.checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path())  # never leave a half-written checkpoint

    def load(self) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            saved = dict(state["config"])
            model, optimizer, sums = state["model"], state["optimizer"], loop.Totals(**state["sums"])
            position = (state["epoch"], state["step_in_epoch"], state["global_step"], state["history"])
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
            raise ValueError(f"--resume: the checkpoint at {path} is unreadable ({type(err).__name__}); "
                             "delete it (or use --overwrite) to start the run afresh") from None
        if isinstance(saved.get("augment"), bool):  # checkpoints written before Augment existed
            saved["augment"] = (data.Augment.paper(saved["dataset"]) if saved["augment"] else data.NO_AUGMENT).as_dict()
        now = dataclasses.asdict(self.cfg)
        differ = [f"{k} ({saved.get(k)!r} in the checkpoint, {now[k]!r} now)"
                  for k in RUN_IDENTITY if saved.get(k) != now[k]]
        if differ:
            raise ValueError(f"--resume: the checkpoint at {path} is from another run: " + "; ".join(differ))
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)
        self.epoch, self.step_in_epoch, self.global_step, self.history = position
        self.totals = sums


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def train(cfg: TrainConfig, splits: data.Splits | None = None, stop: Callable[[], bool] = lambda: False) -> Run:
    """Runs (or resumes) training as configured; returns the finished Run. ``stop`` is polled
    between steps: once true, the run is saved and ``Interrupted`` raised."""
    checkpoint = Path(cfg.out) / "checkpoint.pt"
    if checkpoint.is_file() and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {cfg.out} already holds a run ({checkpoint}): continue it with --resume, "
                         "start it afresh with --overwrite, or choose another --out")
    run = Run(cfg, splits)
    if cfg.resume:
        run.load()
        if run.history:
            run.write_results()  # repairs damaged outputs even when nothing is left to train
    run.run(stop)
    return run


def parser() -> argparse.ArgumentParser:
    """The command line, one option per ``TrainConfig`` field (defaults and help from the field)."""
    p = argparse.ArgumentParser(prog="rbd-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = {k: v for k, v in f.metadata.items() if k != "help"}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "type" not in kw:
            kw["type"] = type(f.default)
        default = "" if f.default is None or isinstance(f.default, bool) else f" (default {f.default})"
        p.add_argument(flag, default=f.default, help=f.metadata["help"] + default, **kw)
    p.add_argument("--crop-pad", type=int, help="training augmentation: pad by K pixels and crop back at random "
                   "(shifts of up to ±K; 0 = no crop; default: the paper's, 3 for MNIST/FMNIST, 4 for CIFAR-10)")
    p.add_argument("--brightness", type=float, help="training augmentation: add U(-B, B) to each image "
                   "(0 = none; default: the paper's, 0.5 for MNIST/FMNIST, 0 for CIFAR-10)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="training augmentation: random horizontal flips (default: the paper's, CIFAR-10 only)")
    p.add_argument("--no-augment", action="store_true", help="no training augmentation at all")
    return p


CLI_ERRORS = (ValueError, FileNotFoundError, data.DataError, loop.NonFiniteLoss, Interrupted)


def report_error(err: Exception) -> int:
    """Prints one of ``CLI_ERRORS`` for the command line; returns its exit status (2: bad
    argument or data, 1: the run diverged, 130: interrupted and saved)."""
    print(err if isinstance(err, Interrupted) else f"error: {err}", file=sys.stderr)
    return 130 if isinstance(err, Interrupted) else 1 if isinstance(err, loop.NonFiniteLoss) else 2


class StopRequest:
    """Polled between training steps. As a SIGINT/SIGTERM handler, the first signal asks the run
    to save and stop after the step in progress (a step is never cut in half); a second one stops
    at once."""

    def __init__(self):
        self.requested = False
        self.polled = False  # before training polls it (loading data, say) a signal stops at once

    def __call__(self) -> bool:
        self.polled = True
        return self.requested

    def handle(self, signum, frame) -> None:
        if self.requested or not self.polled:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: saving after this step (again to stop at once)")


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args["augment"] = augment_from_args(args["dataset"], args.pop("crop_pad"), args.pop("brightness"),
                                            args.pop("flip"), args.pop("no_augment"))
        cfg = TrainConfig(**args)
        run = train(cfg, stop=stop)
    except CLI_ERRORS as err:
        return report_error(err)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    last = run.history[-1] if run.history else None
    if last:
        print(f"{cfg.method} on {cfg.model}-{cfg.dataset}: validation accuracy {last['val_acc']:.2f}% after "
              f"{last['epoch']:.2f} epochs ({last['step']} steps); results in {run.out}/ "
              "(metrics.json, metrics.csv, curves.png, checkpoint.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

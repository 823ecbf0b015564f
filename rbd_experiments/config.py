"""What decides a training run, in one place: ``TrainConfig`` (every field an option of each
command line that trains), the paper's defaults, the checks, and the option builders the command
lines share (one option per field, one augmentation option group)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from rbd_cuda.basis import NORMALIZATIONS
from rbd_cuda.layout import Proportional
from rbd_cuda.ops import DISTRIBUTIONS

from . import data, models

METHODS = ("sgd", "rbd", "fpd", "nes")
LR_SCHEDULES = ("constant", "cosine")
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
# Fields a resumed run must share with the checkpoint (epochs and max_steps may change; epochs not
# under a cosine schedule, whose length they set: ``Run.load``).
RUN_IDENTITY = ("model", "dataset", "method", "dim", "total_dim", "min_dim", "lr", "lr_schedule", "batch_size",
                "seed", "split_seed", "distribution", "normalize", "compartments", "momentum", "population",
                "sigma", "augment", "val_size")
# Fields of RUN_IDENTITY added after runs were first saved: a checkpoint without one ran as its
# default does (``saved_identity``).
ADDED_LATER = ("total_dim", "min_dim", "lr_schedule")
# Fields that say where and how a run was started on one machine, not what it trains: kept out of
# metrics.json, which records the run itself (``trained_on`` says where each part of it ran).
WHERE_IT_RAN = ("device", "data_root", "out", "resume", "overwrite", "progress")


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
                                                            "250; 500 for resnet8; not with --total-dim)", type=int))
    total_dim: int | None = field(default=None, metadata=_option(
        "RBD/FPD: T directions in all, split over the compartments in proportion to their sizes with at least "
        "--min-dim each (instead of --dim per compartment: compartments compared at equal total d)", type=int))
    min_dim: int = field(default=1, metadata=_option("with --total-dim: the fewest directions a compartment gets"))
    lr: float | None = field(default=None, metadata=_option("learning rate (default: the paper's for the task "
                                                             "and method)", type=float))
    lr_schedule: str = field(default="constant", metadata=_option(
        f"learning rate per step: {', '.join(LR_SCHEDULES)}. constant: --lr at every step, as in the paper; cosine: "
        "--lr · (1 + cos(π t / T)) / 2 at step t of T = --epochs × steps per epoch, from --lr down towards 0 "
        "(--max-steps stops the run early without changing T; a resumed cosine run keeps its --epochs)"))
    batch_size: int = field(default=32, metadata=_option("minibatch size"))
    seed: int = field(default=0, metadata=_option("initial weights, data order, augmentation and bases"))
    split_seed: int = field(default=0, metadata=_option("where the validation block is cut"))
    distribution: str = field(default="normal", metadata=_option(
        f"entries of the bases: {', '.join(DISTRIBUTIONS)}. On a CPU an RBD step with Rademacher entries (±1) costs "
        "about a tenth of one with normal entries, with uniform entries about half (the random numbers are most "
        "of a step's cost). Rademacher entries have normal's variance, so the expected update is the same; "
        "uniform U(-1, 1) entries have variance 1/3, so with --normalize paper, dim or none the expected update is "
        "a third of normal's (unbiased and projection divide the variance out)"))
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
        if self.dim is None and self.total_dim is None:
            self.dim = PAPER_DIM.get(self.model, 250)
        if self.lr is None:
            self.lr = default_lr(self.model, self.dataset, self.method)
        if self.population is None:
            self.population = self.dim if self.total_dim is None else self.total_dim
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
               "distribution": DISTRIBUTIONS, "normalize": NORMALIZATIONS, "lr_schedule": LR_SCHEDULES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                             f"got {getattr(cfg, name)!r}")


def check_config(cfg: TrainConfig) -> None:
    if cfg.dim is not None and cfg.total_dim is not None:
        raise ValueError("--dim and --total-dim exclude each other: --dim gives every compartment that many "
                         "directions, --total-dim splits a total over them")
    at_least_one = {"epochs": cfg.epochs, "dim": cfg.dim, "total-dim": cfg.total_dim, "min-dim": cfg.min_dim,
                    "batch-size": cfg.batch_size, "population": cfg.population, "val-size": cfg.val_size}
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if cfg.total_dim is None and cfg.min_dim != 1:
        raise ValueError(f"--min-dim {cfg.min_dim} needs --total-dim (with --dim every compartment gets --dim)")
    if cfg.total_dim is not None and cfg.method not in ("rbd", "fpd"):
        raise ValueError(f"--total-dim splits RBD's and FPD's directions over their compartments; --method "
                         f"{cfg.method} has {'no basis' if cfg.method == 'sgd' else '--population directions'}")
    if cfg.total_dim is not None and cfg.total_dim < cfg.min_dim:
        raise ValueError(f"--total-dim {cfg.total_dim} is less than --min-dim {cfg.min_dim}")
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


def saved_identity(saved: dict) -> dict:
    """The ``RUN_IDENTITY`` fields of a saved configuration, those ``ADDED_LATER`` at their defaults
    where it was saved before they existed."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in ADDED_LATER}
    return {k: saved.get(k, defaults.get(k)) for k in RUN_IDENTITY}


def scheduled_lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of the run's step ``step`` (0-based) of ``total_steps`` under
    ``--lr-schedule``: a function of the step alone, so a resumed run needs no scheduler state."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def dim_rule(cfg: TrainConfig) -> int | Proportional:
    """The directions of RBD's and FPD's compartments: ``--dim`` each, or ``--total-dim`` split."""
    return cfg.dim if cfg.total_dim is None else Proportional(cfg.total_dim, cfg.min_dim)


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


def add_options(p: argparse.ArgumentParser) -> None:
    """One option per ``TrainConfig`` field (defaults and help from the field)."""
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


def add_augment_options(p: argparse.ArgumentParser, default: str) -> None:
    """The training augmentation, the same options in every command line: a base pipeline
    (``default``: "paper" or "none") and changes to it."""
    g = p.add_argument_group("training augmentation")
    g.add_argument("--augment", choices=("paper", "none"), default=default,
                   help="base pipeline: the released code's (crop ±3 and brightness ±0.5 for MNIST/FMNIST; crop ±4 "
                        f"and flips for CIFAR-10) or none; the options below change it (default {default})")
    g.add_argument("--crop-pad", type=int, help="pad by K pixels and crop back at random (shifts of up to ±K; "
                   "0 = no crop)")
    g.add_argument("--brightness", type=float, help="add U(-B, B) to each image (0 = none)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--no-augment", action="store_true", help="no augmentation at all (--augment none, unchanged)")


def augment_from_args(dataset: str, args: dict) -> data.Augment:
    """The pipeline the augmentation options of ``add_augment_options`` ask for (their entries are
    taken out of ``args``)."""
    base, none = args.pop("augment"), args.pop("no_augment")
    changes = {name: args.pop(name) for name in ("crop_pad", "brightness", "flip")}
    if none:
        if any(v is not None for v in changes.values()):
            raise ValueError("--no-augment cannot be combined with --crop-pad, --brightness or --flip")
        return data.NO_AUGMENT
    if dataset not in data.DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(data.DATASETS)}, got {dataset!r}")
    pipeline = data.Augment.paper(dataset) if base == "paper" else data.NO_AUGMENT
    return pipeline.changed(**changes)

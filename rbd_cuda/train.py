"""Train one of the paper's networks with SGD, RBD, FPD or NES.

    python -m rbd_cuda.train --model fc --dataset mnist --method rbd --epochs 5 --out runs/fc-mnist-rbd

Defaults are the paper's Table 1 settings (paper.md §2.9, §7): batch 32, constant learning rate from
the paper's table for the (model, dataset) pair, d = 250 directions in one global compartment
(500 for ResNet-8), normal entries, the paper's ÷√D normalisation, the validation block of
10,000 images cut from the training set, and the training augmentation. The reported accuracy is
on that validation block, as in the paper.

Writes, under ``--out``: ``metrics.json`` (configuration and one row per epoch), ``metrics.csv``
(the rows), ``curves.png`` (loss and accuracy per epoch) and ``checkpoint.pt``, from which
``--resume`` continues a run bit for bit (also from the middle of an epoch after ``--max-steps``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data, models
from .optim import FPD, NES, NORMALIZATIONS, RBD

METHODS = ("sgd", "rbd", "fpd", "nes")
# Learning rates of the paper's code for batch 32 (paper.md §2.9): (RBD/FPD/NES, SGD).
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


@dataclass
class TrainConfig:
    model: str = "fc"
    dataset: str = "mnist"
    method: str = "rbd"
    epochs: int = 1
    max_steps: int | None = None
    dim: int | None = None
    lr: float | None = None
    batch_size: int = 32
    seed: int = 0
    split_seed: int = 0
    distribution: str = "normal"
    normalize: str = "paper"
    compartments: str = "global"
    momentum: float = 0.0
    population: int | None = None
    sigma: float = 0.01
    augment: data.Augment | None = None  # None: the paper's pipeline for the dataset
    val_size: int = data.VALIDATION_SIZE
    device: str = "auto"
    data_root: str | None = None
    out: str = "runs/latest"
    resume: bool = False
    progress: bool = True

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
               "distribution": ("normal", "uniform", "rademacher"), "normalize": NORMALIZATIONS}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")


def check_config(cfg: TrainConfig) -> None:
    positive = {"epochs": cfg.epochs, "dim": cfg.dim, "batch-size": cfg.batch_size, "population": cfg.population}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.seed < 0 or cfg.split_seed < 0:
        raise ValueError("--seed and --split-seed must be non-negative")
    if cfg.method == "nes" and cfg.population < 2:
        raise ValueError(f"--population must be at least 2 for NES, got {cfg.population}")
    if cfg.compartments not in ("global", "tensor", "layer") and not cfg.compartments.isdigit():
        raise ValueError(f"--compartments must be global, tensor, layer or a number of entries, "
                         f"got {cfg.compartments!r}")


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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    if cfg.method == "nes":
        return NES(model.parameters(), cfg.lr, cfg.population, cfg.sigma, distribution=cfg.distribution,
                   normalize="paper" if cfg.normalize == "paper" else "none", seed=cfg.seed)
    compartments = int(cfg.compartments) if cfg.compartments.isdigit() else cfg.compartments
    kind = RBD if cfg.method == "rbd" else FPD
    return kind(model.named_parameters(), cfg.lr, cfg.dim, compartments=compartments,
                distribution=cfg.distribution, normalize=cfg.normalize, momentum=cfg.momentum,
                seed=cfg.seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: str, images: torch.Tensor, labels: torch.Tensor,
             device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy in %) over a whole split, in batches of 5000 as in the paper."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), EVAL_BATCH):
        x = data.prepare(dataset, images[start:start + EVAL_BATCH]).to(device)
        y = labels[start:start + EVAL_BATCH].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return loss_sum / len(images), 100.0 * correct / len(images)


class Run:
    """One training run: its state, its step, its outputs and its checkpoint."""

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
        self.sums = {"loss": 0.0, "correct": 0, "images": 0, "seconds": 0.0}
        self.history: list[dict] = []

    # -- one step ---------------------------------------------------------------------------
    def _batch(self, order: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        idx = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        gen = data.batch_generator(cfg.seed, self.epoch, index)
        x = data.prepare(cfg.dataset, self.splits.train_x[idx], augment=cfg.augment, gen=gen)
        return x.to(self.device), self.splits.train_y[idx].to(self.device)

    def _count(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        self.sums["loss"] += float(loss) * len(y)
        self.sums["correct"] += int((logits.argmax(1) == y).sum())
        self.sums["images"] += len(y)

    def train_step(self, order: torch.Tensor) -> None:
        first = self.step_in_epoch * self.batches_per_step
        if self.cfg.method == "nes":
            members = iter(range(first, first + self.batches_per_step))

            def closure() -> torch.Tensor:
                x, y = self._batch(order, next(members))
                logits = self.model(x)
                loss = F.cross_entropy(logits, y)
                self._count(logits, y, loss)
                return loss

            self.optimizer.step(closure)
        else:
            x, y = self._batch(order, first)
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self._count(logits.detach(), y, loss.detach())
        self.step_in_epoch += 1
        self.global_step += 1

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> list[dict]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        while self.epoch < cfg.epochs:
            if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                break
            order = data.epoch_order(len(self.splits.train_x), cfg.seed, self.epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not cfg.progress,
                       desc=f"{cfg.method} {cfg.model}-{cfg.dataset} epoch {self.epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True)
            self.model.train()
            while self.step_in_epoch < self.steps_per_epoch:
                if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                    break
                start = time.perf_counter()
                self.train_step(order)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.sums["seconds"] += time.perf_counter() - start
                bar.update()
                if self.step_in_epoch % 20 == 0 or self.step_in_epoch == self.steps_per_epoch:
                    bar.set_postfix(self._train_metrics(), refresh=False)
            bar.close()
            complete = self.step_in_epoch == self.steps_per_epoch
            self._record(complete)
            if complete:
                self.epoch += 1
                self.step_in_epoch = 0
                self.sums = {"loss": 0.0, "correct": 0, "images": 0, "seconds": 0.0}
            self.save()
        return self.history

    def _train_metrics(self) -> dict:
        s = self.sums
        images = max(s["images"], 1)
        return {"loss": round(s["loss"] / images, 4), "acc": round(100.0 * s["correct"] / images, 2),
                "img/s": round(s["images"] / max(s["seconds"], 1e-9))}

    def _record(self, complete: bool) -> None:
        val_loss, val_acc = evaluate(self.model, self.cfg.dataset, self.splits.val_x, self.splits.val_y,
                                     self.device)
        metrics = self._train_metrics()
        row = {"epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch, "step": self.global_step,
               "train_loss": metrics["loss"], "train_acc": metrics["acc"], "val_loss": val_loss,
               "val_acc": val_acc, "images_per_s": metrics["img/s"], "train_seconds": self.sums["seconds"],
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
        (self.out / "metrics.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
        with (self.out / "metrics.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.history[0]))
            writer.writeheader()
            writer.writerows(self.history)
        save_figure([({self.cfg.method: self.history}, f"{self.cfg.model}-{self.cfg.dataset}", None)],
                    self.out / "curves.png")

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        state = {"config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "sums": self.sums, "history": self.history}
        tmp = self.checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path())  # never leave a half-written checkpoint

    def load(self) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = dict(state["config"])
        if isinstance(saved.get("augment"), bool):  # checkpoints written before Augment existed
            saved["augment"] = (data.Augment.paper(saved["dataset"]) if saved["augment"] else data.NO_AUGMENT).as_dict()
        now = dataclasses.asdict(self.cfg)
        differ = [f"{k} ({saved.get(k)!r} in the checkpoint, {now[k]!r} now)"
                  for k in RUN_IDENTITY if saved.get(k) != now[k]]
        if differ:
            raise ValueError(f"--resume: the checkpoint at {path} is from another run: " + "; ".join(differ))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.sums, self.history = state["global_step"], state["sums"], state["history"]


def train(cfg: TrainConfig, splits: data.Splits | None = None) -> Run:
    """Runs (or resumes) training as configured; returns the finished Run."""
    run = Run(cfg, splits)
    if cfg.resume:
        run.load()
        if run.history:
            run.write_results()  # repairs damaged outputs even when nothing is left to train
    run.run()
    return run


def draw_curves(acc_ax, loss_ax, curves: dict[str, list[dict]], title: str,
                references: dict[str, float] | None = None) -> None:
    """Validation accuracy and loss against epochs on two axes, one line per label; a dashed line
    at each label's reference accuracy."""
    for label, rows in curves.items():
        epochs = [r["epoch"] for r in rows]
        line, = acc_ax.plot(epochs, [r["val_acc"] for r in rows], marker="o", ms=3, label=label)
        loss_ax.plot(epochs, [r["val_loss"] for r in rows], marker="o", ms=3, color=line.get_color())
        if references and label in references:
            acc_ax.axhline(references[label], ls="--", lw=1, color=line.get_color())
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=title)
    loss_ax.set(xlabel="epoch", ylabel="validation loss", yscale="log", title=title)
    acc_ax.grid(alpha=0.3)
    loss_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)


def save_figure(panels: list[tuple[dict[str, list[dict]], str, dict[str, float] | None]], path: Path) -> None:
    """One row of (accuracy, loss) axes per panel (curves, title, references), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.8 * len(panels)), squeeze=False)
    for (acc_ax, loss_ax), (curves, title, references) in zip(axes, panels, strict=True):
        draw_curves(acc_ax, loss_ax, curves, title, references)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rbd_cuda.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fc", help=f"one of {', '.join(models.MODELS)} (default fc)")
    p.add_argument("--dataset", default="mnist", help=f"one of {', '.join(data.DATASETS)} (default mnist)")
    p.add_argument("--method", default="rbd", help=f"one of {', '.join(METHODS)} (default rbd)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all")
    p.add_argument("--dim", type=int, help="directions per compartment (default 250; 500 for resnet8)")
    p.add_argument("--lr", type=float, help="learning rate (default: the paper's for the task and method)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation and bases")
    p.add_argument("--split-seed", type=int, default=0, help="where the validation block is cut")
    p.add_argument("--distribution", default="normal", help="entries of the bases: normal, uniform, rademacher")
    p.add_argument("--normalize", default="paper", help=f"one of {', '.join(NORMALIZATIONS)} (default paper)")
    p.add_argument("--compartments", default="global", help="global, tensor, layer or max entries per compartment")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--population", type=int, help="NES population (default: --dim)")
    p.add_argument("--sigma", type=float, default=0.01, help="NES perturbation size")
    p.add_argument("--crop-pad", type=int, help="training augmentation: pad by K pixels and crop back at random "
                   "(shifts of up to ±K; 0 = no crop; default: the paper's, 3 for MNIST/FMNIST, 4 for CIFAR-10)")
    p.add_argument("--brightness", type=float, help="training augmentation: add U(-B, B) to each image "
                   "(0 = none; default: the paper's, 0.5 for MNIST/FMNIST, 0 for CIFAR-10)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="training augmentation: random horizontal flips (default: the paper's, CIFAR-10 only)")
    p.add_argument("--no-augment", action="store_true", help="no training augmentation at all")
    p.add_argument("--val-size", type=int, default=data.VALIDATION_SIZE)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--data-root", help="where datasets live (default $RBD_DATA or ~/.cache/rbd_cuda)")
    p.add_argument("--out", default="runs/latest", help="directory for metrics, plot and checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    try:
        args["augment"] = augment_from_args(args["dataset"],
                                            args.pop("crop_pad"), args.pop("brightness"), args.pop("flip"),
                                            args.pop("no_augment"))
        cfg = TrainConfig(**args)
        run = train(cfg)
    except (ValueError, FileNotFoundError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    last = run.history[-1] if run.history else None
    if last:
        print(f"{cfg.method} on {cfg.model}-{cfg.dataset}: validation accuracy {last['val_acc']:.2f}% after "
              f"{last['epoch']:.2f} epochs ({last['step']} steps); results in {run.out}/ "
              "(metrics.json, metrics.csv, curves.png, checkpoint.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

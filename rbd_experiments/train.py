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
import pickle
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rbd_cuda import backends
from rbd_cuda.optim import FPD, NES, RBD

from . import config, data, loop, models
from .reporting import cpu_name, save_figure

EVAL_BATCH = 5000


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was saved after the step in progress."""


class SaveError(OSError):
    """A checkpoint or result file could not be written (disk full, read-only directory, ...);
    the message names the file and the cause. Nothing half-written is left behind."""


def machine(device: torch.device) -> dict:
    """Where a stretch of a run is trained: the device (and GPU), the CPU, the instruction set of
    the extension's CPU kernels, the kernels' arithmetic version, the threads and torch."""
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {"device": device.type, **gpu, "cpu": cpu_name(), "cpu_isa": backends.cpu.isa,
            "arithmetic": backends.arithmetic_version(), "threads": torch.get_num_threads(),
            "torch": str(torch.__version__)}


def make_optimizer(cfg: config.TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    if cfg.method == "nes":
        return NES(model.parameters(), cfg.lr, cfg.population, cfg.sigma, distribution=cfg.distribution,
                   normalize=cfg.normalize, seed=cfg.seed)
    compartments = int(cfg.compartments) if cfg.compartments.isdigit() else cfg.compartments
    kind = RBD if cfg.method == "rbd" else FPD
    try:
        return kind(model.named_parameters(), cfg.lr, config.dim_rule(cfg), compartments=compartments,
                    distribution=cfg.distribution, normalize=cfg.normalize, momentum=cfg.momentum,
                    seed=cfg.seed)
    except ValueError as err:
        if cfg.total_dim is None:
            raise
        # The split is refused once the compartments are counted: say which options asked for it.
        raise ValueError(f"--total-dim {cfg.total_dim} with --min-dim {cfg.min_dim} and --compartments "
                         f"{cfg.compartments}: {err}") from None


class Run:
    """One training run: its state, its steps, its outputs and its checkpoint."""

    def __init__(self, cfg: config.TrainConfig, splits: data.Splits | None = None):
        self.cfg = cfg
        self.device = config.resolve_device(cfg.device)
        self.splits = splits or data.load(cfg.dataset, cfg.data_root, val_size=cfg.val_size,
                                          split_seed=cfg.split_seed)
        self.batches = data.BatchSource(self.splits, cfg.augment, seed=cfg.seed, batch_size=cfg.batch_size,
                                        device=self.device)
        self.model = models.build(cfg.model, self.splits.input_shape, seed=cfg.seed).to(self.device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.out = Path(cfg.out)
        self.batches_per_epoch = self.batches.batches_per_epoch
        # An NES step consumes `population` batches (one per member), so an epoch has fewer steps.
        self.batches_per_step = cfg.population if cfg.method == "nes" else 1
        self.steps_per_epoch = self.batches_per_epoch // self.batches_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"--population {cfg.population} needs more batches than one epoch has "
                             f"({self.batches_per_epoch})")
        # The steps of all --epochs, over which a cosine schedule decays (--max-steps does not shorten it).
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.totals = loop.Totals()
        self.history: list[dict] = []
        # One entry per stretch of training on one machine (a resumed run adds one).
        self.trained_on: list[dict] = []

    def run(self, stop: Callable[[], bool] = lambda: False) -> list[dict]:
        """Trains up to ``epochs`` (or ``max_steps``); checkpoints after each epoch, at
        ``max_steps`` and, once ``stop()`` turns true (checked between steps), saves and raises
        ``Interrupted``."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.epoch < cfg.epochs and not self._at_max_steps():
            here = {"from_step": self.global_step, **machine(self.device)}
            last = self.trained_on[-1] if self.trained_on else None
            if last and last["device"] == here["device"] == "cpu" and last["threads"] != here["threads"]:
                # Another thread count changes the order of torch's sums: the run goes on, not bit for bit.
                tqdm.write(f"note: {self.out} resumes on {here['threads']} CPU thread(s); its last stretch ran on "
                           f"{last['threads']}, so it does not continue bit for bit (rbd-reproduce --jobs 2 or more "
                           f"trains each run on 1 thread; OMP_NUM_THREADS={last['threads']} sets rbd-train's)",
                           file=sys.stderr)
            if last and cfg.method != "sgd" and last.get("arithmetic") != here["arithmetic"]:
                # Stretches recorded before the field existed ran version 1 or earlier.
                tqdm.write(f"note: {self.out} resumes with the kernels' arithmetic version {here['arithmetic']}; "
                           f"its last stretch ran version {last.get('arithmetic', '1 or earlier')}, so it "
                           "continues within fp32 rounding of its trajectory, not on it (CHANGELOG.md)",
                           file=sys.stderr)
            if not last or {k: v for k, v in last.items() if k != "from_step"} != \
                    {k: v for k, v in here.items() if k != "from_step"}:
                self.trained_on.append(here)
        while self.epoch < cfg.epochs and not self._at_max_steps():
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not cfg.progress,
                       desc=f"{cfg.method} {cfg.model}-{cfg.dataset} epoch {self.epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True)

            def after_step(i: int, totals: loop.Totals, bar=bar) -> None:
                self.step_in_epoch, self.global_step = i + 1, self.global_step + 1
                bar.update()
                if self.step_in_epoch % 20 == 0 or self.step_in_epoch == self.steps_per_epoch:
                    bar.set_postfix(totals.summary(), refresh=False)

            try:
                loop.fit_epoch(self.model, self.optimizer, self.batches.batch_at(self.epoch),
                               range(self.step_in_epoch, self.steps_per_epoch), members=self.batches_per_step,
                               first_step=self.global_step, totals=self.totals, on_step=after_step,
                               lr_at=self.lr_at, should_stop=lambda: stop() or self._at_max_steps())
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
            self.write_results()  # after the checkpoint: the metrics are never ahead of it
            if stop():  # how to continue is the command's to say (rbd-train: --resume)
                raise Interrupted(f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch} of "
                                  f"{self.steps_per_epoch}; saved to {self.checkpoint_path()}")
        return self.history

    def lr_at(self, step: int) -> float:
        """The learning rate of the run's step ``step`` (0-based)."""
        return config.scheduled_lr(self.cfg, step, self.total_steps)

    def _at_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def _record(self, complete: bool) -> None:
        val = loop.evaluate(self.model, self.batches.eval_batches("val", EVAL_BATCH))
        val_loss, val_acc = val.loss, val.percent
        metrics = self.totals.summary()
        row = {"epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch, "step": self.global_step,
               "train_loss": metrics["loss"], "train_acc": metrics["acc"], "val_loss": val_loss,
               "val_acc": val_acc, "images_per_s": metrics["img/s"], "train_seconds": self.totals.seconds,
               "complete_epoch": complete}
        if self.cfg.lr_schedule != "constant":
            # The learning rate of the row's last step. Constant runs' rows keep their columns, so
            # that a run resumed from an older checkpoint writes one metrics.csv header.
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        # A partial epoch's row (after --max-steps) is replaced once the epoch completes.
        self.history = [r for r in self.history if r["complete_epoch"]] + [row]
        if self.cfg.progress:
            tqdm.write(f"{self.cfg.method} {self.cfg.model}-{self.cfg.dataset} epoch {row['epoch']:.2f}: "
                       f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% | val loss "
                       f"{val_loss:.4f} acc {val_acc:.2f}% | {row['images_per_s']} img/s")

    # -- outputs and checkpoints -----------------------------------------------------------
    def summary(self) -> dict:
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in config.WHERE_IT_RAN}
        return {"config": settings, "parameters": models.count_parameters(self.model),
                "device": str(self.device), "torch": torch.__version__, "trained_on": self.trained_on,
                "history": self.history}

    def write_results(self) -> None:
        if not self.history:
            return
        _write_atomically(self.out / "metrics.json", json.dumps(self.summary(), indent=2) + "\n")
        lines = io.StringIO()
        writer = csv.DictWriter(lines, fieldnames=list(self.history[0]))
        writer.writeheader()
        writer.writerows(self.history)
        _write_atomically(self.out / "metrics.csv", lines.getvalue())
        try:
            save_figure([({self.cfg.method: self.history}, f"{self.cfg.model}-{self.cfg.dataset}", None)],
                        self.out / "curves.png")
        except OSError as err:
            raise SaveError(f"could not write {self.out / 'curves.png'}: {err.strerror or err}") from None

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        state = {"config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "sums": dataclasses.asdict(self.totals), "history": self.history,
                 "trained_on": self.trained_on}
        # Serialised in memory first, so that a failed write is the file system's error (named
        # below), not the serialiser's.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_atomically(self.checkpoint_path(), buffer.getvalue())

    def load(self) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            saved = dict(state["config"])
            saved_epochs = saved["epochs"]
            model, optimizer, sums = state["model"], state["optimizer"], loop.Totals(**state["sums"])
            position = (state["epoch"], state["step_in_epoch"], state["global_step"], state["history"])
            trained_on = list(state.get("trained_on", []))  # absent before it was recorded
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
            raise ValueError(f"--resume: the checkpoint at {path} is unreadable ({type(err).__name__}); "
                             "delete it (or use --overwrite) to start the run afresh") from None
        if isinstance(saved.get("augment"), bool):  # checkpoints written before Augment existed
            saved["augment"] = (data.Augment.paper(saved["dataset"]) if saved["augment"] else data.NO_AUGMENT).as_dict()
        now, saved = dataclasses.asdict(self.cfg), config.saved_identity(saved)
        differ = [f"{k} ({saved[k]!r} in the checkpoint, {now[k]!r} now)"
                  for k in config.RUN_IDENTITY if saved[k] != now[k]]
        if differ:
            raise ValueError(f"--resume: the checkpoint at {path} is from another run: " + "; ".join(differ))
        if self.cfg.lr_schedule == "cosine" and saved_epochs != self.cfg.epochs:
            raise ValueError(f"--resume: the checkpoint at {path} is a run of --epochs {saved_epochs} with "
                             "--lr-schedule cosine, whose learning rate decays over the steps of all its epochs: "
                             f"--epochs {self.cfg.epochs} would put the rest of it on another schedule. Resume it "
                             f"with --epochs {saved_epochs} (--max-steps stops it earlier) or train into another --out")
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)
        self.epoch, self.step_in_epoch, self.global_step, self.history = position
        self.totals = sums
        self.trained_on = trained_on


def _write_atomically(path: Path, content: str | bytes) -> None:
    """Writes a temporary file beside ``path`` and renames it over ``path``: a reader sees the old
    file or the new one, never half of one. On failure the temporary file is removed and
    ``SaveError`` names the file and the cause."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(content.encode() if isinstance(content, str) else content)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"could not write {path}: {err.strerror or err} (nothing was changed: the previous "
                        f"{path.name}, if any, is intact)") from None


def train(cfg: config.TrainConfig, splits: data.Splits | None = None, stop: Callable[[], bool] = lambda: False) -> Run:
    """Runs (or resumes) training as configured; returns the finished Run. ``stop`` is polled
    between steps: once true, the run is saved and ``Interrupted`` raised."""
    out = Path(cfg.out)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file() and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {cfg.out} already holds a run ({checkpoint}): continue it with --resume, "
                         "start it afresh with --overwrite, or choose another --out")
    if not cfg.resume:  # a resumed run's directory holds its checkpoint (Run.load checks)
        try:  # before the data is loaded and the model built
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = ("is a file, not a directory" if out.is_file() else
                       f"cannot be created ({err.filename}: {err.strerror})")
            raise ValueError(f"--out {cfg.out} {problem}") from None
    run = Run(cfg, splits)
    if cfg.resume:
        run.load()
        if run.history:
            run.write_results()  # repairs damaged outputs even when nothing is left to train
    run.run(stop)
    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rbd-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_options(p)
    config.add_augment_options(p, default="paper")
    return p


CLI_ERRORS = (ValueError, FileNotFoundError, data.DataError, loop.NonFiniteLoss, Interrupted, SaveError)


def report_error(err: Exception) -> int:
    """Prints one of ``CLI_ERRORS`` for the command line; returns its exit status (2: bad
    argument or data, 1: the run diverged or could not be saved, 130: interrupted and saved)."""
    print(err if isinstance(err, Interrupted) else f"error: {err}", file=sys.stderr)
    if isinstance(err, Interrupted):
        return 130
    return 1 if isinstance(err, (loop.NonFiniteLoss, SaveError)) else 2


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
        args["augment"] = config.augment_from_args(args["dataset"], args)
        cfg = config.TrainConfig(**args)
        run = train(cfg, stop=stop)
    except Interrupted as err:
        return report_error(Interrupted(f"{err} (continue with --resume)"))
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

"""The one training loop and the one evaluator of the experiments (train, reproduce, intrinsic_dim,
the optimizer comparison and the distributed example all use them).

A trainer supplies ``batch_at(k)``, the k-th minibatch of the current epoch, so data order,
augmentation and resuming from the middle of an epoch stay the trainer's business; the loop only
steps. Optimizers that need a closure (NES: one minibatch per population member) are stepped with
one, consuming ``members`` batches per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rbd_cuda.optim import NES

Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite; the step that produced it was not applied."""


@dataclass
class Totals:
    """Running sums over the steps of an epoch (what the progress bar and the history show)."""

    loss: float = 0.0
    correct: int = 0
    images: int = 0
    seconds: float = 0.0
    last_loss: float = math.nan  # of the latest minibatch
    last_seconds: float = math.nan  # of the latest step

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: float) -> None:
        self.last_loss = loss
        self.loss += loss * len(y)
        self.correct += int((logits.argmax(1) == y).sum())
        self.images += len(y)

    def summary(self) -> dict:
        images = max(self.images, 1)
        return {"loss": round(self.loss / images, 4), "acc": round(100.0 * self.correct / images, 2),
                "img/s": round(self.images / max(self.seconds, 1e-9))}


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """NES takes no gradient step: it evaluates the loss itself, through a closure."""
    return isinstance(optimizer, NES)


def _checked(loss: torch.Tensor, step: int) -> float:
    """The loss as a number (one device sync per minibatch), or ``NonFiniteLoss``."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(f"the training loss is {value} at step {step + 1}; the run stops there "
                            "(the learning rate is probably too large)")
    return value


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[], Batch],
               step: int, totals: Totals, loss_fn=F.cross_entropy) -> None:
    """One optimizer step; ``batches()`` yields the next minibatch (called once per population
    member for closure optimizers). ``step`` (0-based, for the error message) is the run's step
    count. A non-finite loss raises ``NonFiniteLoss`` before the parameters move."""
    if needs_closure(optimizer):
        def closure() -> torch.Tensor:
            x, y = batches()
            logits = model(x)
            loss = loss_fn(logits, y)
            totals.add(logits, y, _checked(loss, step))
            return loss

        optimizer.step(closure)
        return
    x, y = batches()
    logits = model(x)
    loss = loss_fn(logits, y)
    value = _checked(loss, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    totals.add(logits.detach(), y, value)


def fit_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_at: Callable[[int], Batch],
              steps: range, *, members: int = 1, first_step: int = 0, totals: Totals | None = None,
              should_stop: Callable[[], bool] = lambda: False,
              on_step: Callable[[int, Totals], None] | None = None, lr_at: Callable[[int], float] | None = None,
              loss_fn=F.cross_entropy) -> Totals:
    """Trains over the steps ``steps`` of an epoch (step i uses batches i·members … i·members +
    members − 1 of ``batch_at``); ``first_step`` is the run's step count before the first of them.
    Before each step, ``lr_at(t)`` of the run's step t (0-based) becomes every param group's
    learning rate (None: the groups keep theirs). Times each step (synchronising CUDA), calls
    ``on_step(i, totals)`` after it and returns early, between two steps, once ``should_stop()``
    is true."""
    totals = totals if totals is not None else Totals()
    model.train()
    for n, i in enumerate(steps):
        if should_stop():
            break
        if lr_at is not None:
            lr = lr_at(first_step + n)
            for group in optimizer.param_groups:
                group["lr"] = lr
        start = time.perf_counter()
        train_step(model, optimizer, _batches(batch_at, i * members, members), first_step + n, totals, loss_fn)
        _synchronize(model)
        totals.last_seconds = time.perf_counter() - start
        totals.seconds += totals.last_seconds
        if on_step is not None:
            on_step(i, totals)
    return totals


def _batches(batch_at: Callable[[int], Batch], first: int, count: int) -> Callable[[], Batch]:
    """The batches first … first + count − 1 of ``batch_at``, one per call."""
    indices = iter(range(first, first + count))

    def next_batch() -> Batch:
        index = next(indices, None)
        if index is None:
            raise RuntimeError(f"fit_epoch: the optimizer asked for more than members={count} minibatches in "
                               "one step (pass members=population for NES)")
        return batch_at(index)
    return next_batch


def _synchronize(model: torch.nn.Module) -> None:
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cuda":
        torch.cuda.synchronize(parameter.device)


class Evaluation(NamedTuple):
    loss: float  # mean over the examples
    correct: int
    count: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    @property
    def percent(self) -> float:
        return 100.0 * self.correct / self.count


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], loss_fn=F.cross_entropy) -> Evaluation:
    """Mean loss and correct predictions over all the batches, in eval mode; the model's mode is
    restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        loss_sum += float(loss_fn(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: no examples to evaluate on")
    return Evaluation(loss_sum / count, correct, count)

"""The natural-evolution-strategies baseline of the paper (Salimans et al. 2017 style)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.distributed as dist

from ..basis import check_finite
from ..ops import as_int
from .base import EAGER_STEP, RandomBasesOptimizer
from .callers import stepped_by_checkpoint
from .guards import refuse_copy
from .ranks import agree, collective_device, fingerprint, run_collective


class NES(RandomBasesOptimizer):
    """Evolution strategies on the random-bases kernels; ``step(closure)`` only, no gradients.

    Each step evaluates the loss at θ + σ ε_i for ``population`` directions ε_i (the columns of
    one random basis over all parameters, re-drawn every step; never materialised: each
    perturbation is one expand of a single column), shapes the fitness by rank (the lowest loss
    gets +0.5, the highest −0.5), and moves

        θ ← θ + lr · √s · Σ_i a_i ε_i / (σ n)

    with ``s`` the scale of ``normalize`` for d = the number of directions (``rbd_cuda.basis``):
    ``"paper"`` (default) divides by √D as the paper's code does, ``"none"`` uses 1. With
    ``antithetic`` the population is n/2 directions evaluated at θ ± σ ε.

    ``step(closure)`` needs a closure that returns the loss at the current parameters (no
    backward: it runs under ``torch.no_grad``; a closure that runs one, as Lightning's automatic
    optimization passes, is refused at its first call) and returns the population's mean loss.
    Under Lightning use manual optimization (docs/optimizers.md); the HF Trainer, which calls
    ``step()`` without a closure, cannot drive it.
    The paper gives each population member its own minibatch: a closure that draws a new batch
    per call does that. Whatever the closure does (raises, is interrupted), the parameters are
    restored exactly before ``step`` returns or raises; a non-finite loss is refused (the step
    then changes nothing).

    ``weight_decay`` (per param group, as ``lr``): the update first multiplies the parameters
    by 1 − lr · weight_decay (decoupled, as in ``RBD``), after the population is evaluated.
    Parameters with ``requires_grad=False`` (read at every step) are skipped: neither perturbed,
    decayed nor updated, as torch's optimizers skip those without a gradient; a step with none to
    train is refused.
    ``step`` runs eagerly under ``torch.compile`` (excluded from tracing, as ``RBD.step``).

    On several ranks (torchrun, with or without DDP, whose forward under ``no_grad`` synchronises
    nothing) each step averages the population's losses across the ranks of ``group``
    (one all-reduce of ``population`` floats) before it ranks them: every member is judged on the
    union of the ranks' batches, every rank takes the same update, and the ranks stay identical;
    ``step`` returns the mean over the ranks. ``group=None`` (default) is the default
    group when torch.distributed is initialized (looked up at each step), else this process
    alone; a one-rank group (``dist.new_subgroups(group_size=1)[0]``) trains each rank on its
    own. Before every averaged step the ranks check (one all-gather of hashes) that they agree
    on ``config()``, the step count and the groups' values, and at the first one and the first
    after ``load_state_dict`` on the parameters too, and raise a ``ValueError`` on every rank naming the first that
    differs; a non-finite loss on any rank is refused on every rank. The group is not in the
    state dict: the world size decides which losses are averaged, not the bases, as the batch
    size does, so a checkpoint resumes on any number of ranks (as ``DistributedRBD``'s does).
    """

    HYPERPARAMETERS: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "lr": (0.0, float("inf"), False), "weight_decay": (0.0, float("inf"), False)}
    DATA_PARALLEL: ClassVar[str] = ("it averages its population's losses across the ranks of its group, "
                                    "by default every rank")

    def __init__(self, params, lr: float, population: int, sigma: float = 0.01, *, antithetic: bool = False,
                 weight_decay: float = 0.0, distribution: str = "normal", normalize: str = "paper", seed: int = 0,
                 group=None):
        population = as_int("population", population, minimum=2, error=ValueError)
        if antithetic and population % 2:
            raise ValueError(f"rbd_cuda: an antithetic population must be even, got {population}")
        sigma = check_finite("sigma", sigma)
        if sigma == 0:
            raise ValueError("rbd_cuda: sigma must be positive, got 0.0")
        if group is not None and dist.get_rank(group) < 0:
            # torch's collectives return at once on a rank outside their group: it would train alone.
            raise ValueError(f"rbd_cuda: this rank ({dist.get_rank()}) is not in the group NES was given; "
                             "pass a group that holds it, or None for the default group")
        directions = population // 2 if antithetic else population
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, directions, compartments="global", distribution=distribution,
                         normalize=normalize, seed=seed)
        self.population, self.sigma, self.antithetic = population, sigma, bool(antithetic)
        self.group = group
        self._agreed = None  # the group whose ranks last agreed on the configuration (_agree)

    def config(self) -> dict:
        return {**super().config(), "population": self.population, "sigma": self.sigma,
                "antithetic": self.antithetic}

    def __getstate__(self) -> dict:
        if self.group is not None:
            refuse_copy("NES built with a process group")
        return super().__getstate__()

    @staticmethod
    def _grad_marks(params) -> list:
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._agreed = None  # the ranks may have loaded different state dicts

    def _group(self):
        """The process group whose ranks' losses the next step averages; None for this process alone
        (no process group, or a group of one rank)."""
        group = self.group
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                return None
            group = dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _agree(self, group) -> None:
        """Raise on every rank of ``group`` unless they agree on all that decides the trajectory: at
        every step (a scheduler stepped on one rank, a rank that skipped a step), the parameters' bits
        only at the first step over ``group`` and the first after a load (identical updates keep
        them identical; hashing D entries every step would cost a copy to the host)."""
        parameters = fingerprint(self._params) if group is not self._agreed else None
        fields = {**self.agreement_fields(), "parameters": parameters}  # the causes first, then what they moved
        agree(fields, group, "NES's agreement check", collective_device(group),
              hint="every rank must build NES with the same arguments over the same parameters and step it "
                   "from the same state_dict (seed the model's initialisation, or wrap the model in "
                   "DistributedDataParallel, which broadcasts rank 0's); a one-rank group trains "
                   "each rank on its own")
        self._agreed = group

    def _mean_over_ranks(self, losses: list[float], group) -> list[float]:
        total = torch.tensor(losses, dtype=torch.float64, device=collective_device(group))
        run_collective(f"the all-reduce of NES step {self.steps_taken}'s losses", group,
                       lambda: dist.all_reduce(total, group=group))
        return (total / dist.get_world_size(group)).tolist()

    @torch.compiler.disable(reason=EAGER_STEP)
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if stepped_by_checkpoint():
            return None
        if closure is None:
            raise ValueError("rbd_cuda: NES.step needs a closure that returns the loss (step(closure)); "
                             "under Lightning use manual optimization (docs/optimizers.md)")
        hyper = self.hyperparameters()
        group = self._group()
        if group is not None:
            self._agree(group)
        comp = self.compartments[0]
        # Frozen parameters are skipped, as torch's optimizers skip those without a gradient (their
        # rows of the basis go unused).
        trained = [k for k, seg in enumerate(comp.segments) if seg.param.requires_grad]
        if not trained:
            raise ValueError("rbd_cuda: NES.step: every parameter has requires_grad=False, so there is nothing "
                             "to train")
        basis = self.basis(comp)
        views = {k: comp.segments[k].view(comp.segments[k].param) for k in trained}
        saved = {k: view.clone() for k, view in views.items()}
        members = [(j, sign) for j in range(comp.dim) for sign in ((1.0, -1.0) if self.antithetic else (1.0,))]
        losses = []
        marks = self._grad_marks(self._params)
        for j, sign in members:
            coeff = torch.full((1,), sign * self.sigma, device=views[trained[0]].device)
            # Member j's direction is column j of the basis: one single op per segment (its column offset).
            for k, view in views.items():
                torch.ops.rbd_cuda.expand_(view, coeff, 1.0, row_offset=comp.segments[k].row_offset, col_offset=j,
                                           **basis.kwargs)
            try:
                losses.append(float(closure()))
                if len(losses) == 1 and any(m is not None and m != before for m, before in
                                            zip(self._grad_marks(self._params), marks, strict=True)):
                    # Each member would cost a wasted backward pass (Lightning's automatic optimization).
                    raise ValueError("rbd_cuda: NES.step's closure ran a backward pass (the parameters' gradients "
                                     "changed); NES needs only the loss. Under Lightning set "
                                     "self.automatic_optimization = False and call opt.step(closure) in "
                                     "training_step with a closure that returns the loss (docs/optimizers.md)")
            finally:  # exact restore (no drift from adding and subtracting), whatever the closure did
                for k, view in views.items():
                    view.copy_(saved[k])
        mine = losses
        if group is not None:  # before the finiteness check, so that every rank refuses a non-finite loss
            losses = self._mean_over_ranks(losses, group)
        bad = [i for i, value in enumerate(losses) if not math.isfinite(value)]
        if bad:
            i = bad[0]
            if math.isfinite(mine[i]):
                raise ValueError(f"rbd_cuda: NES step {self.steps_taken}: the closure returned a non-finite loss "
                                 f"for population member {i} on another rank; the parameters are unchanged")
            raise ValueError(f"rbd_cuda: NES step {self.steps_taken}: the closure returned a non-finite loss "
                             f"({mine[i]}) for population member {i}{'' if group is None else ' on this rank'}; "
                             "the parameters are unchanged")
        n = len(members)
        order = sorted(range(n), key=lambda i: -losses[i])  # rank 0 = highest loss
        shaped = [0.0] * n
        for rank, i in enumerate(order):
            shaped[i] = rank / (n - 1) - 0.5
        c = torch.zeros(comp.dim)
        for (j, sign), a in zip(members, shaped, strict=True):
            c[j] += sign * a / (self.sigma * n)
        root_s = self.scale(comp, root=True)
        groups = self._segment_groups[0]
        self._decay([comp.segments[k].param for k in trained], hyper)
        self.expand_updates([(0, c, comp.stream, list(views.values()), list(views),
                              [hyper[groups[k]]["lr"] * root_s for k in views])])
        self.steps_taken += 1
        return sum(losses) / n

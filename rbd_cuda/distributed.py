"""Data-parallel training on torch.distributed in which only coefficients cross the network.

Two ways, both working with any process group (gloo on CPU, NCCL on GPU; launched by torchrun):

- ``DistributedRBD`` / ``DistributedFPD``: the optimizers of ``rbd_cuda.optim`` on several ranks.
  Each rank projects its local gradient; per step and compartment only the d coefficients are
  communicated (one collective per step for all compartments), and every rank applies the same
  update, so the parameters stay bit-identical across ranks (same build and device type).

  * ``scheme="shared"``: every rank uses the same bases; the coefficients are all-reduced and the
    one update P c̄ is applied. Since c = Pᵀg is linear in g, this equals a single-process step on
    the concatenated batch (up to float summation order).
  * ``scheme="independent"`` (the paper's scheme): each rank projects on its own bases; the
    coefficients are all-gathered and every rank regenerates every rank's bases and applies all
    W updates, W·d directions per step for d coefficients sent per rank.

- ``RandomBasesHook``: a DDP communication hook (``ddp.register_comm_hook(state, hook)``) that
  replaces each gradient bucket's all-reduce by the all-reduce of its coefficients on a shared
  random basis, then expands them back; any optimizer runs on the result. Optional error feedback.

Stream ids. A compartment k of K uses stream k (as in the single-process optimizer). With
independent bases, rank r uses stream ``r·K + k``: rank 0 keeps the single-process streams and
the ranks' blocks [r·K, (r+1)·K) never overlap, so no (step, stream) pair is drawn twice; this
needs W·K ≤ 2³². The hook uses stream = bucket index with its own seed and step counter.
"""

import datetime
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from .basis import (
    Basis,
    check_count,
    check_distribution,
    check_normalize,
    check_seed,
    scale,
    table_keywords,
)
from .layout import Compression, Fixed, as_dim_rule, check_saved, spans
from .ops import SegmentPlan, as_int
from .optim import FPD, RBD, Exchange
from .optim.guards import refuse_copy
from .optim.ranks import agree, agree_on_load, collective_device, fingerprint, run_collective

SCHEMES = ("shared", "independent")
REDUCTIONS = ("mean", "sum")


def init_process_group(backend: str | None = None, *, timeout_s: float = 120.0, **kwargs) -> torch.device:
    """``dist.init_process_group`` from torchrun's environment with a timeout, so that a
    collective whose peer died fails after ``timeout_s`` instead of waiting forever.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise; with NCCL the
    process uses GPU ``LOCAL_RANK``. Returns the device this rank should train on.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not timeout_s > 0:
        raise ValueError(f"rbd_cuda: timeout_s must be positive, got {timeout_s}")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def _ring_sent(kind: str, nbytes: int, world: int) -> float:
    """Bytes one rank sends for a collective of ``nbytes`` per rank under the ring algorithms:
    all-reduce 2(W−1)/W·n (reduce-scatter + all-gather), all-gather (W−1)·n."""
    return 2.0 * (world - 1) / world * nbytes if kind == "all_reduce" else float((world - 1) * nbytes)


@dataclass
class CommStats:
    """What one rank hands to collectives, summed over training steps.

    ``payload_bytes``: the size of this rank's messages (the all-reduced buffer, or this rank's
    share of an all-gather); ``ring_sent_bytes``: what the ring algorithms make a rank send for
    them (an estimate: backends pick other algorithms for some sizes); ``dense_bytes``: the
    payload of DDP's all-reduce of the same gradients; ``setup_bytes``: one-off traffic at
    construction (broadcast of the parameters, configuration check) and consistency checks.
    """

    steps: int = 0
    collectives: int = 0
    payload_bytes: int = 0
    ring_sent_bytes: float = 0.0
    dense_bytes: int = 0
    setup_bytes: int = 0

    def add(self, kind: str, nbytes: int, world: int) -> None:
        self.collectives += 1
        self.payload_bytes += nbytes
        self.ring_sent_bytes += _ring_sent(kind, nbytes, world)

    def per_step(self) -> dict:
        """Averages per step, and the ratio of DDP's payload to this one."""
        n = max(self.steps, 1)
        return {"steps": self.steps, "payload_bytes": self.payload_bytes / n,
                "ring_sent_bytes": self.ring_sent_bytes / n, "dense_bytes": self.dense_bytes / n,
                "compression": self.dense_bytes / self.payload_bytes if self.payload_bytes else None}

    def as_dict(self) -> dict:
        return asdict(self)


DIVERGED = "the ranks have diverged"


class Collective(Exchange):
    """The coefficient exchange of ``DistributedRBD``/``DistributedFPD`` (module docstring):
    ``scheme="shared"`` all-reduces every compartment's coefficients, ``"independent"``
    all-gathers them and applies every rank's update on that rank's basis."""

    def __init__(self, scheme: str = "shared", reduction: str = "mean", group=None, check_every: int = 100,
                 broadcast: bool = True):
        if scheme not in SCHEMES:
            raise ValueError(f"rbd_cuda: scheme must be one of {SCHEMES}, got {scheme!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"rbd_cuda: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_every = as_int("check_every", check_every, minimum=0, error=ValueError)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("rbd_cuda: the distributed optimizers need an initialised process group "
                               "(torch.distributed.init_process_group or rbd_cuda.distributed.init_process_group)")
        self.scheme, self.reduction, self.group, self.check_every = scheme, reduction, group, check_every
        self.broadcast = broadcast
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.comm = CommStats()

    def __getstate__(self) -> dict:
        if self.group is not None:
            refuse_copy("a distributed optimizer built with a process group")
        return self.__dict__

    def bind(self, optimizer) -> None:
        self.n_compartments = len(optimizer.compartments)
        if self.scheme == "independent" and self.world_size * self.n_compartments > 2**32:
            raise ValueError(f"rbd_cuda: {self.world_size} ranks × {self.n_compartments} compartments exceed "
                             "the 2**32 stream ids")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = params[0].device
        self._grad_bytes = sum(p.numel() * p.element_size() for p in params)
        # Buffer layout: every compartment's coefficients, then one flag per segment (1 where this
        # rank has the gradient). The flags let ranks whose set of gradients differ agree on
        # which segments each update touches.
        self._coeff_slices, offset = spans([comp.dim for comp in optimizer.compartments])
        self._flag_slices, self._buffer_numel = spans([len(comp.segments) for comp in optimizer.compartments],
                                                      offset)
        self.comm.setup_bytes += agree(optimizer.agreement_fields(), self.group, "the configuration check",
                                       self.device)
        if self.broadcast:
            src = dist.get_global_rank(self.group, 0) if self.group else 0
            for p in params:
                run_collective("the broadcast of the initial parameters", self.group,
                               lambda p=p: dist.broadcast(p.data, src=src, group=self.group))
                self.comm.setup_bytes += p.numel() * p.element_size()

    def stream(self, comp) -> int:
        """The stream of ``comp``'s basis on this rank (module docstring: r·K + k when independent)."""
        return self._stream(comp, self.rank)

    def _stream(self, comp, rank: int) -> int:
        return comp.stream if self.scheme == "shared" else rank * self.n_compartments + comp.stream

    def combine(self, compartments, coeffs, present, step):
        local = torch.zeros(self._buffer_numel, dtype=torch.float32, device=self.device)
        for c, segments, cs, fs in zip(coeffs, present, self._coeff_slices, self._flag_slices, strict=True):
            if c is not None:
                local[cs] = c.to(self.device)
            flags = torch.zeros(fs.stop - fs.start)
            flags[segments] = 1.0
            local[fs] = flags
        nbytes = local.numel() * local.element_size()
        what = f"the {{}} of step {step}'s coefficients"
        if self.scheme == "shared":
            run_collective(what.format("all-reduce"), self.group,
                           lambda: dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group))
            rows = [local]
            self.comm.add("all_reduce", nbytes, self.world_size)
        else:
            rows = [torch.empty_like(local) for _ in range(self.world_size)]
            run_collective(what.format("all-gather"), self.group,
                           lambda: dist.all_gather(rows, local, group=self.group))
            self.comm.add("all_gather", nbytes, self.world_size)
        weight = 1.0 / self.world_size if self.reduction == "mean" else 1.0
        terms = []
        for comp, cs, fs in zip(compartments, self._coeff_slices, self._flag_slices, strict=True):
            comp_terms = []
            for r, row in enumerate(rows):
                segments = [k for k, flag in enumerate(row[fs].tolist()) if flag > 0]
                if segments:  # rows are identical on every rank, so every rank builds the same terms
                    comp_terms.append((row[cs] * weight, self._stream(comp, r), segments))
            terms.append(comp_terms)
        return terms

    def agree_on_load(self, optimizer, checked: tuple[dict, int] | None, problem: Exception | None) -> None:
        """Every rank's ``load_state_dict``: one all-gather of hashes of what each rank loads (step
        count, groups' values, state tensors), as construction checks the configuration."""
        state = None if checked is None else checked[0]["state"]
        fields = {**optimizer.loaded_fields(checked),
                  "state tensors": None if state is None else fingerprint(state[key][field] for key in sorted(state)
                                                                          for field in sorted(state[key]))}
        self.comm.setup_bytes += agree_on_load(fields, problem, self.group, "the load of the state_dict",
                                               self.device)

    def after_step(self, optimizer) -> None:
        self.comm.steps += 1
        self.comm.dense_bytes += self._grad_bytes
        if self.check_every and optimizer.steps_taken % self.check_every == 0:
            self.check_consistency(optimizer)

    def check_consistency(self, optimizer) -> None:
        """Raise on every rank if the parameters, the groups' values (lr, momentum, weight decay)
        or the step count differ across ranks (one all-gather of three hashes)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # The causes first: a differing lr is named as such, not as the parameters it moved.
        fields = {"param groups' values": optimizer.hyperparameters(), "steps_taken": optimizer.steps_taken,
                  "parameters": fingerprint(params)}
        self.comm.setup_bytes += agree(fields, self.group, "the consistency check", self.device, RuntimeError,
                                       DIVERGED)


class DistributedRBD(RBD):
    """``RBD`` on every rank of a process group; only coefficients are communicated.

    Args (beyond ``RBD``'s; ``record``, ``diagnostics`` and ``exchange`` are not taken):
        scheme: ``"shared"`` (one basis for all ranks, coefficients all-reduced) or
            ``"independent"`` (a basis per rank, coefficients all-gathered, W updates applied;
            rank r's compartment k uses stream r·K + k).
        reduction: ``"mean"`` (the ranks' updates are averaged: with ``normalize="unbiased"``
            E[Δθ] = −lr·ḡ, the mean gradient) or ``"sum"`` (summed, as in the paper's code).
        group: the process group (default: the world).
        check_every: every that many steps, check (one all-gather of three hashes) that the
            parameters, every group's values (lr, momentum, weight decay) and the step count are identical across
            ranks, and raise on every rank if not; 0 never checks.
        broadcast: copy the parameters of the group's rank 0 to all ranks at construction (as
            DDP does), so the ranks start identical.

    At construction the ranks also check that they agree on everything in ``config()`` (seed,
    distribution, normalisation, layout, scheme, reduction), on every group's values (lr,
    momentum, weight decay) and on the step count, and raise ``ValueError`` naming what differs.
    ``load_state_dict`` is a collective (every rank calls it): the ranks agree, in one all-gather,
    that each one's state dict is valid and that they load the same step count, groups and state
    tensors, else every rank raises and none loads. ``opt.comm``
    (``CommStats``) counts the bytes communicated; ``opt.exchange`` is the ``Collective``.
    """

    def __init__(self, params, lr: float, dim, *, scheme: str = "shared", reduction: str = "mean", group=None,
                 check_every: int = 100, broadcast: bool = True, **kwargs):
        for option in ("record", "diagnostics", "exchange"):
            if kwargs.get(option):
                raise ValueError(f"rbd_cuda: {option} is not supported by the distributed optimizers")
        super().__init__(params, lr, dim, exchange=Collective(scheme, reduction, group, check_every, broadcast),
                         **kwargs)

    @property
    def comm(self) -> CommStats:
        return self.exchange.comm

    def config(self) -> dict:
        return {**super().config(), "scheme": self.exchange.scheme, "reduction": self.exchange.reduction}

    def check_consistency(self) -> None:
        """Raise on every rank if the parameters (or the groups' values, step count) differ across ranks."""
        self.exchange.check_consistency(self)


class DistributedFPD(DistributedRBD):
    """``FPD`` (one basis for the whole run) on every rank; arguments as ``DistributedRBD``. With
    ``scheme="independent"`` each rank keeps its own fixed basis: the model moves in a fixed
    W·d-dimensional subspace.

    The fixed basis (``redraw``) and the exchange are options of ``RBD``, each set on its own:
    this class is ``DistributedRBD`` with FPD's ``redraw``, not a subclass of both."""

    redraw = FPD.redraw


# ---- DDP communication hook -----------------------------------------------------------------


class RandomBasesHook:
    """State of ``random_bases_hook``: ``ddp.register_comm_hook(RandomBasesHook(...), random_bases_hook)``.

    Each gradient bucket g (D entries) becomes c = Pᵀ(g [+ e]) with d random directions of a basis
    shared by all ranks (seed, step = the hook's step count, stream = bucket index); c is
    all-reduced (averaged) and the bucket is replaced by s·P c̄. Only d floats per bucket cross
    the network. A bucket with D ≤ d is all-reduced as it is.

    Args:
        dim: directions per bucket (int), or ``Compression(factor, minimum)`` for
            ``ceil(D / factor)`` (at least ``minimum``); default ``Compression(100, minimum=10)``.
        seed: seed of the bases; must be the same on every rank (use another one than an RBD
            optimizer's, so the hook's bases are not the optimizer's).
        distribution: ``"normal"``, ``"uniform"`` or ``"rademacher"``.
        normalize: one of ``rbd_cuda.basis.NORMALIZATIONS``, with the bucket as the compartment
            and the model (D = n = the bucket's entries): ``"unbiased"`` (s = 1/(dσ²):
            E[s P Pᵀ g] = g, the variance grows with D/d) or ``"projection"`` (s = 1/(Dσ²): s P Pᵀ
            is close to the orthogonal projection on the d directions, a contraction, which
            error feedback needs) are the useful ones. Default: ``"projection"`` with error
            feedback, ``"unbiased"`` without.
        error_feedback: keep per bucket the residual e ← (g + e) − ĝ of what the compressed
            all-reduce did not carry (ĝ: the averaged result), and add it to the next step's
            gradient (as PowerSGD does).
        group: the process group (default: the world).

    At its first bucket the hook checks (one all-gather of hashes) that the ranks agree on
    ``config()`` and raises on every rank, naming what differs. ``state_dict()`` holds the
    configuration and the step count; ``load_state_dict`` checks the one, and, a collective
    (every rank calls it: one all-gather of hashes), that every rank loads the same step count,
    before it restores it; error-feedback residuals are not saved and restart at zero. ``stats`` (``CommStats``)
    counts the coefficients' bytes and those of the dense all-reduce.
    """

    def __init__(self, dim=None, *, seed: int = 0, distribution: str = "normal",
                 normalize: str | None = None, error_feedback: bool = False, group=None):
        rule = as_dim_rule(Compression(100, minimum=10) if dim is None else dim)
        if not isinstance(rule, (Fixed, Compression)):
            raise TypeError(f"rbd_cuda: the hook's dim must be an int, Fixed or Compression, got {dim!r}")
        if normalize is None:
            normalize = "projection" if error_feedback else "unbiased"
        self.rule, self.seed, self.distribution = rule, check_seed(seed), check_distribution(distribution)
        self.normalize, self.error_feedback, self.group = check_normalize(normalize), bool(error_feedback), group
        self.step = 0
        self.checked = False
        # bucket index -> (the bucket's parameters, by identity and in order; the residual)
        self.residuals: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        # (bucket entries, directions, bucket index) -> the bucket's segment table
        self.tables: dict[tuple[int, int, int], SegmentPlan] = {}
        self.stats = CommStats()

    def dim_for(self, numel: int) -> int:
        return self.rule.allocate([numel])[0]

    def scale(self, numel: int, dim: int) -> float:
        return scale(self.normalize, self.distribution, dim, numel, numel)

    def config(self) -> dict:
        """Everything besides the step count that decides the hook's bases and update."""
        return {"seed": self.seed, "distribution": self.distribution, "normalize": self.normalize,
                "error_feedback": self.error_feedback, "dim": repr(self.rule)}

    def state_dict(self) -> dict:
        return {"format": 1, **self.config(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        try:
            check_saved(state, {"format": 1, **self.config()}, "this RandomBasesHook state was saved by a hook "
                        "built with other arguments")
            step, problem = check_count("the hook state's step", state.get("step")), None
        except (ValueError, TypeError) as error:
            step, problem = None, error
        if not (dist.is_available() and dist.is_initialized()):  # no other rank to agree with
            if problem is not None:
                raise problem
            self.step = step
            return
        group = self.group if self.group is not None else dist.group.WORLD
        self.stats.setup_bytes += agree_on_load({"step": step}, problem, group, "the load of the hook's state",
                                                collective_device(group))
        self.step = step


def random_bases_hook(state: RandomBasesHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce each bucket's coefficients on a shared random basis
    instead of the bucket (``RandomBasesHook`` describes the scheme and its options)."""
    grad = bucket.buffer()
    numel, index, step = grad.numel(), bucket.index(), state.step
    if bucket.is_last():
        state.step += 1
        state.stats.steps += 1
    if step >= 2**32:
        raise RuntimeError("rbd_cuda: the hook's random stream has 2**32 steps; this run has used them all")
    group = state.group if state.group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if not state.checked:  # every rank's first call is for the same bucket, so all of them gather here
        state.stats.setup_bytes += agree({**state.config(), "step": step}, group, "the hook's configuration check",
                                        grad.device)
        state.checked = True
    state.stats.dense_bytes += numel * grad.element_size()
    dim = state.dim_for(numel)
    if dim >= numel:  # coefficients would be no smaller than the bucket: all-reduce it as it is
        state.stats.add("all_reduce", numel * grad.element_size(), world)
        grad.div_(world)
        fut = dist.all_reduce(grad, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    x = grad
    if state.error_feedback:
        layout = tuple(id(p) for p in bucket.parameters())
        kept = state.residuals.get(index)
        # DDP rebuilds its buckets after the first step (other parameters, or another order, under
        # the same index): a residual is only added back to the layout it was computed for.
        x = grad + kept[1] if kept is not None and kept[0] == layout else grad.clone()
    keys = table_keywords(Basis(state.seed, step, index, state.distribution))
    # A bucket's size is known only here (DDP builds, and rebuilds, the buckets): its table, of one
    # segment, is built at the bucket's first call and kept.
    plan = state.tables.get((numel, dim, index))
    if plan is None:
        plan = state.tables[numel, dim, index] = SegmentPlan([numel], [0], [0], [dim], [index])
    c = torch.ops.rbd_cuda.project_grouped([x], plan.table, plan.total, **keys).div_(world)
    state.stats.add("all_reduce", c.numel() * c.element_size(), world)
    fut = dist.all_reduce(c, group=group, async_op=True).get_future()
    scale = state.scale(numel, dim)

    def expand_back(f: torch.futures.Future) -> torch.Tensor:
        try:
            mean_c = f.value()[0]
        except RuntimeError as error:
            raise RuntimeError(f"rbd_cuda: the all-reduce of bucket {index}'s coefficients at hook step "
                               f"{step} failed: another rank raised, exited or timed out ({error})") from error
        grad.zero_()
        torch.ops.rbd_cuda.expand_grouped_([grad], mean_c, [scale], plan.table, **keys)
        if state.error_feedback:
            state.residuals[index] = (layout, x.sub_(grad))
        return grad

    return fut.then(expand_back)


__all__ = ["Collective", "CommStats", "DistributedFPD", "DistributedRBD", "RandomBasesHook", "init_process_group",
           "random_bases_hook"]

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
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from . import ops
from .optim import FPD, RBD
from .optim.compartments import Compression, Fixed, as_dim_rule
from .optim.rbd import ENTRY_VARIANCE, NORMALIZATIONS

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


def _run(what: str, group, fn: Callable[[], object]):
    """Run a collective; a peer that raised, exited or timed out becomes an error saying which
    collective of which rank failed (the backend's own message is kept as the cause)."""
    try:
        return fn()
    except RuntimeError as error:  # DistBackendError, DistNetworkError and gloo's errors
        raise RuntimeError(f"rbd_cuda: {what} failed on rank {dist.get_rank(group)} of "
                           f"{dist.get_world_size(group)}: another rank raised, exited or timed out "
                           f"({type(error).__name__}: {error})") from error


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


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """A 64-bit hash of the exact bits of ``tensors`` (in order): equal iff equal, in practice."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def check_consistency(tensors: Iterable[torch.Tensor], group=None, what: str = "parameters") -> None:
    """Raise on every rank when ``tensors`` are not bit-identical on all ranks of ``group``.

    One all-gather of a 64-bit hash per rank; every rank sees every hash, so all ranks raise the
    same ``RuntimeError`` (none is left waiting in a later collective).
    """
    tensors = list(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    mine = torch.tensor([fingerprint(tensors)], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    hashes = [torch.empty_like(mine) for _ in range(world)]
    _run(f"the consistency check of the {what}", group, lambda: dist.all_gather(hashes, mine, group=group))
    values = [int(h) for h in hashes]
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(f"rbd_cuda: the {what} differ across ranks: rank(s) {differ} differ from "
                           f"rank 0 (hashes {[f'{v & (2**64 - 1):016x}' for v in values]})")


class _Distributed:
    """The distributed step shared by DistributedRBD and DistributedFPD (see the module docstring)."""

    def __init__(self, params, lr: float, dim, *, scheme: str = "shared", reduction: str = "mean",
                 group=None, check_every: int = 0, broadcast: bool = True, **kwargs):
        if scheme not in SCHEMES:
            raise ValueError(f"rbd_cuda: scheme must be one of {SCHEMES}, got {scheme!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"rbd_cuda: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"rbd_cuda: check_every must be an int >= 0 (0: never), got {check_every!r}")
        for option in ("record", "diagnostics"):
            if kwargs.get(option):
                raise ValueError(f"rbd_cuda: {option}=True is not supported by the distributed optimizers")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("rbd_cuda: the distributed optimizers need an initialised process group "
                               "(torch.distributed.init_process_group or rbd_cuda.distributed.init_process_group)")
        super().__init__(params, lr, dim, **kwargs)
        self.scheme, self.reduction, self.group, self.check_every = scheme, reduction, group, check_every
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.comm = CommStats()
        n_comp = len(self.compartments)
        if scheme == "independent" and self.world_size * n_comp > 2**32:
            raise ValueError(f"rbd_cuda: {self.world_size} ranks × {n_comp} compartments exceed the 2**32 "
                             "stream ids")
        params_in_order = self._params()
        self._device = params_in_order[0].device
        self._grad_bytes = sum(p.numel() * p.element_size() for p in params_in_order)
        # Buffer layout: every compartment's coefficients, then one flag per segment (1 where this
        # rank has the gradient). The flags let ranks whose set of gradients differ agree on
        # which segments each update touches.
        self._coeff_slices, offset = [], 0
        for comp in self.compartments:
            self._coeff_slices.append(slice(offset, offset + comp.dim))
            offset += comp.dim
        self._flag_slices = []
        for comp in self.compartments:
            self._flag_slices.append(slice(offset, offset + len(comp.segments)))
            offset += len(comp.segments)
        self._buffer_numel = offset
        self._check_configuration()
        if broadcast:
            for p in params_in_order:
                _run("the broadcast of the initial parameters", group,
                     lambda p=p: dist.broadcast(p.data, src=dist.get_global_rank(group, 0) if group else 0,
                                                group=group))
                self.comm.setup_bytes += p.numel() * p.element_size()

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_configuration(self) -> None:
        """All ranks must agree on everything that defines the bases and the buffer layout."""
        fields = {
            "seed": ops._seed_to_int64(self.seed),
            "scheme": SCHEMES.index(self.scheme),
            "reduction": REDUCTIONS.index(self.reduction),
            "distribution": tuple(ENTRY_VARIANCE).index(self.distribution),
            "normalize": NORMALIZATIONS.index(self.normalize),
            "optimizer (RBD or FPD)": int(self._redraw),
            "compartments": len(self.compartments),
            "directions": sum(c.dim for c in self.compartments),
            "parameters": self._total_numel,
            "steps_taken": self.steps_taken,
        }
        mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=self._device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        _run("the configuration check", self.group, lambda: dist.all_gather(gathered, mine, group=self.group))
        self.comm.setup_bytes += mine.numel() * 8
        for r, theirs in enumerate(gathered):
            for name, a, b in zip(fields, mine.tolist(), theirs.tolist(), strict=True):
                if a != b:
                    raise ValueError(f"rbd_cuda: ranks disagree on {name}: {b} on rank {r}, {a} on rank "
                                     f"{self.rank}; every rank must build the optimizer with the same "
                                     "arguments and parameters")

    def check_consistency(self) -> None:
        """Raise on every rank if the parameters are not bit-identical across ranks."""
        check_consistency(self._params(), self.group)
        self.comm.setup_bytes += 8

    def _stream(self, comp, rank: int) -> int:
        """The stream of ``comp``'s basis on ``rank`` (module docstring: r·K + k when independent)."""
        return comp.stream if self.scheme == "shared" else rank * len(self.compartments) + comp.stream

    def _local_buffer(self) -> torch.Tensor:
        buf = torch.zeros(self._buffer_numel, dtype=torch.float32, device=self._device)
        for comp, cs, fs in zip(self.compartments, self._coeff_slices, self._flag_slices, strict=True):
            c = self.coefficients(comp, self._stream(comp, self.rank))
            if c is not None:
                buf[cs] = c.to(self._device)
            buf[fs] = torch.tensor([float(seg.param.grad is not None) for seg in comp.segments])
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        local = self._local_buffer()
        nbytes = local.numel() * local.element_size()
        what = f"the {{}} of step {self.steps_taken}'s coefficients"
        if self.scheme == "shared":
            _run(what.format("all-reduce"), self.group,
                 lambda: dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group))
            rows = [local]
            self.comm.add("all_reduce", nbytes, self.world_size)
        else:
            rows = [torch.empty_like(local) for _ in range(self.world_size)]
            _run(what.format("all-gather"), self.group, lambda: dist.all_gather(rows, local, group=self.group))
            self.comm.add("all_gather", nbytes, self.world_size)
        weight = 1.0 / self.world_size if self.reduction == "mean" else 1.0
        for comp, cs, fs in zip(self.compartments, self._coeff_slices, self._flag_slices, strict=True):
            terms = []
            for r, row in enumerate(rows):
                segments = [k for k, flag in enumerate(row[fs].tolist()) if flag > 0]
                if segments:  # rows are identical on every rank, so every rank builds the same terms
                    terms.append((row[cs] * weight, self._stream(comp, r), segments))
            if terms:
                self.apply_sum(comp, terms)
        self.steps_taken += 1
        self.comm.steps += 1
        self.comm.dense_bytes += self._grad_bytes
        if self.check_every and self.steps_taken % self.check_every == 0:
            self.check_consistency()
        return loss


class DistributedRBD(_Distributed, RBD):
    """``RBD`` on every rank of a process group; only coefficients are communicated.

    Args (beyond ``RBD``'s; ``record`` and ``diagnostics`` are not supported):
        scheme: ``"shared"`` (one basis for all ranks, coefficients all-reduced) or
            ``"independent"`` (a basis per rank, coefficients all-gathered, W updates applied;
            rank r's compartment k uses stream r·K + k).
        reduction: ``"mean"`` (the ranks' updates are averaged: with ``normalize="unbiased"``
            E[Δθ] = −lr·ḡ, the mean gradient) or ``"sum"`` (summed, as in the paper's code).
        group: the process group (default: the world).
        check_every: every that many steps, check (one all-gather of a hash) that the parameters
            are bit-identical across ranks and raise on every rank if not; 0 never checks.
        broadcast: copy the parameters of the group's rank 0 to all ranks at construction (as
            DDP does), so the ranks start identical.

    At construction the ranks also check that they agree on seed, scheme, distribution,
    normalisation, compartments and sizes, and raise ``ValueError`` naming what differs.
    ``opt.comm`` (``CommStats``) counts the bytes communicated.
    """


class DistributedFPD(_Distributed, FPD):
    """``FPD`` (one basis for the whole run) on every rank; arguments as ``DistributedRBD``. With
    ``scheme="independent"`` each rank keeps its own fixed basis: the model moves in a fixed
    W·d-dimensional subspace."""


# ---- DDP communication hook -----------------------------------------------------------------


HOOK_NORMALIZATIONS = ("unbiased", "projection")


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
        normalize: ``"unbiased"`` (s = 1/(dσ²): E[s P Pᵀ g] = g, the variance grows with D/d) or
            ``"projection"`` (s = 1/(Dσ²): s P Pᵀ is close to the orthogonal projection on the d
            directions, a contraction, which error feedback needs). Default: ``"projection"``
            with error feedback, ``"unbiased"`` without.
        error_feedback: keep per bucket the residual e ← (g + e) − ĝ of what the compressed
            all-reduce did not carry (ĝ: the averaged result), and add it to the next step's
            gradient (as PowerSGD does).
        group: the process group (default: the world).

    ``stats`` (``CommStats``) counts the coefficients' bytes and those of the dense all-reduce.
    """

    def __init__(self, dim=None, *, seed: int = 0, distribution: str = "normal",
                 normalize: str | None = None, error_feedback: bool = False, group=None):
        rule = as_dim_rule(Compression(100, minimum=10) if dim is None else dim)
        if not isinstance(rule, (Fixed, Compression)):
            raise TypeError(f"rbd_cuda: the hook's dim must be an int, Fixed or Compression, got {dim!r}")
        if distribution not in ENTRY_VARIANCE:
            raise ValueError(f"rbd_cuda: distribution must be one of {tuple(ENTRY_VARIANCE)}, got {distribution!r}")
        if normalize is None:
            normalize = "projection" if error_feedback else "unbiased"
        if normalize not in HOOK_NORMALIZATIONS:
            raise ValueError(f"rbd_cuda: normalize must be one of {HOOK_NORMALIZATIONS}, got {normalize!r}")
        ops._seed_to_int64(seed)
        self.rule, self.seed, self.distribution = rule, seed, distribution
        self.normalize, self.error_feedback, self.group = normalize, error_feedback, group
        self.step = 0
        # bucket index -> (the bucket's parameters, by identity and in order; the residual)
        self.residuals: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        self.stats = CommStats()

    def dim_for(self, numel: int) -> int:
        return self.rule.allocate([numel])[0]

    def scale(self, numel: int, dim: int) -> float:
        var = ENTRY_VARIANCE[self.distribution]
        return 1.0 / (dim * var) if self.normalize == "unbiased" else 1.0 / (numel * var)


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
    kw = {"seed": state.seed, "step": step, "stream": index, "distribution": state.distribution}
    c = ops.project(x, dim, **kw).float().div_(world)
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
        ops.expand_(grad, mean_c, scale, **kw)
        if state.error_feedback:
            state.residuals[index] = (layout, x.sub_(grad))
        return grad

    return fut.then(expand_back)


__all__ = ["CommStats", "DistributedFPD", "DistributedRBD", "RandomBasesHook", "check_consistency",
           "fingerprint", "init_process_group", "random_bases_hook"]

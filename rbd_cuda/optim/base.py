"""The one base of the optimizers that step in random bases (RBD, FPD, NES).

It owns what they share: the compartments (``rbd_cuda.layout``), the bases (``rbd_cuda.basis``),
the param groups (read at step time, so schedulers and loaded state dicts take effect), the
checks that make a step all-or-nothing, and the state dict, which holds everything that decides
the trajectory and is checked on load.
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Sequence
from typing import ClassVar, NoReturn

import torch

from ..basis import (
    Basis,
    check_count,
    check_distribution,
    check_finite,
    check_normalize,
    check_seed,
    scale,
    table_keywords,
)
from ..layout import (
    Compartment,
    check_saved,
    describe,
    is_row_shard,
    local_pieces,
    plan,
    sharded_as,
)
from ..ops import SegmentPlan

# Version of the "rbd" entry of state_dict(). Entries without "format" were written by a02b069
# (whose optimizer kept only steps_taken and a layout check); format 2 is from before weight
# decay (whose groups may hold a "weight_decay" that was ignored). Both still load.
FORMAT = 3
PARAMETER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Why the steps are excluded from torch.compile's tracing (torch.compiler.disable): Dynamo drops
# the attribute mutations of optimizers, so a traced step would keep steps_taken at 0 and reuse
# the first basis at every step. A compiled train step breaks its graph at the step, which runs
# eagerly; with fullgraph=True Dynamo refuses it, showing this reason.
EAGER_STEP = ("rbd_cuda: the optimizers' step runs eagerly, since a traced step would lose its step count "
              "(and freeze the basis)")
# Segment tables an optimizer keeps (_table): a run needs a few; past this many, it starts over.
TABLES_KEPT = 64
# Keys torch.optim.Optimizer itself puts in a param group.
TORCH_GROUP_KEYS = ("params", "param_names")
# Keys torch's schedulers add to the groups of the optimizer they drive (every LRScheduler's
# initial_lr, OneCycleLR's and CyclicLR's, SWALR's): a state dict saved under one holds them.
SCHEDULER_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr")
# Attributes a copy (deepcopy, pickle) leaves out, as torch.optim.Optimizer's own copies do: the
# hooks, and the step an LR scheduler wraps, which would step the original.
UNCOPIED = ("step", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks")


def _on_stack(function) -> bool:
    """Whether ``function`` (None: not loaded) is running below the caller of this module's check."""
    code = getattr(function, "__code__", None)
    frame = sys._getframe(2) if code is not None else None
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


def _built_by_zero() -> bool:
    """Whether a ``ZeroRedundancyOptimizer`` is building this optimizer: its
    ``_init_local_optimizer`` is on the call stack (nothing it passes says so)."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return _on_stack(getattr(getattr(zero, "ZeroRedundancyOptimizer", None), "_init_local_optimizer", None))


def stepped_by_checkpoint() -> bool:
    """Whether ``torch.distributed.checkpoint``'s state-dict helpers are calling ``step``: to create
    the state of an optimizer that has none, ``get_optimizer_state_dict`` and
    ``set_optimizer_state_dict`` step it once with zero gradients at lr 0 (``_init_optim_state``).
    That step would change no parameter but would count, moving every later basis: saving a
    checkpoint would change the run. The optimizers' ``step`` returns at once instead."""
    helpers = sys.modules.get("torch.distributed.checkpoint.state_dict")
    return _on_stack(getattr(helpers, "_init_optim_state", None))


def _first_overlap(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """The names of two parameters whose entries on this process share memory, or None."""
    spans = []
    for name, p in named:
        local = p.to_local() if is_row_shard(p) else p
        if local.numel() and local.device.type != "meta":  # meta tensors have no memory to share
            start = local.data_ptr()
            spans.append((str(local.device), start, start + local.numel() * local.element_size(), name))
    spans.sort()
    for before, after in itertools.pairwise(spans):
        if before[0] == after[0] and after[1] < before[2]:
            return before[3], after[3]
    return None


def refuse_copy(holder: str) -> NoReturn:
    """Raise at copy time for an optimizer bound to a process group, which cannot be copied."""
    raise TypeError(f"rbd_cuda: {holder} cannot be copied or pickled, since a process group cannot: copy its "
                    "state_dict() instead and load it into an optimizer built over the copy's parameters")


class RandomBasesOptimizer(torch.optim.Optimizer):
    """Base of RBD, FPD and NES: ``params`` are planned into compartments once, at construction.

    Subclasses set ``HYPERPARAMETERS`` (each group's values, validated at construction and at
    every step) and ``redraw`` (a new basis per step, or one for the run), and write ``step``;
    ``shards=True`` from a subclass whose step sums its coefficients across the mesh of FSDP2's
    row shards (``self.mesh``) lets it be built over them.
    """

    # name -> (low, high, high excluded) of each param-group hyperparameter
    HYPERPARAMETERS: ClassVar[dict[str, tuple[float, float, bool]]] = {"lr": (0.0, float("inf"), False)}
    # names of the per-parameter state entries (self.state[p]) a step keeps
    STATE_KEYS: ClassVar[tuple[str, ...]] = ()
    # how the optimizer trains on several ranks, named when a ZeroRedundancyOptimizer is refused
    DATA_PARALLEL: ClassVar[str] = ("RBD and FPD under DistributedDataParallel, or "
                                    "rbd_cuda.distributed.DistributedRBD")
    redraw = True

    def __init__(self, params, defaults: dict, dim, *, compartments, distribution: str, normalize: str, seed,
                 shards: bool = False):
        if _built_by_zero():
            # ZeRO builds one optimizer per rank over that rank's partition of the parameters: other
            # compartments than the model's on every rank (a "global" one per partition, each on
            # stream 0), stepped without an error.
            name = type(self).__name__
            raise ValueError(f"rbd_cuda: {name} cannot be the optimizer_class of a ZeroRedundancyOptimizer, "
                             "which builds it on each rank over that rank's partition of the parameters, so "
                             "that its compartments and bases are not the model's (and there is little state to "
                             "shard: momentum at most). "
                             f"Build {name} over all the parameters on every rank instead ({self.DATA_PARALLEL})")
        self.seed = check_seed(seed)  # a plain int, so state dicts load with weights_only=True
        self.distribution = check_distribution(distribution)
        self.normalize = check_normalize(normalize)
        self._planned = False
        super().__init__(params, defaults)

        named = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"], strict=True):
                label = name or f"param{len(named)}"
                if p.dtype not in PARAMETER_DTYPES:
                    raise ValueError(f"rbd_cuda: parameter {label} has dtype {p.dtype}; the random-bases ops "
                                     "update float32, float16 or bfloat16 parameters")
                if not p.is_contiguous():
                    raise ValueError(f"rbd_cuda: parameter {label} must be contiguous (the update is "
                                     "applied in place to its flattened view)")
                named.append((name, p))
        if compartments == "layer" and any(name is None for name, _ in named):
            raise ValueError("rbd_cuda: compartments='layer' needs named parameters: pass "
                             "model.named_parameters()")
        labelled = [(name or f"param{i}", p) for i, (name, p) in enumerate(named)]
        planned = plan(labelled, compartments, dim, shards=shards)
        overlap = _first_overlap(labelled)
        if overlap:
            raise ValueError(f"rbd_cuda: parameters {overlap[0]} and {overlap[1]} share memory (one is a view of "
                             "the other, or they overlap): each is updated in place, so every step would move "
                             "the shared entries twice; pass each tensor once")
        self._params = [p for _, p in named]
        # The whole layout (over row shards too), as every rank and one process on the whole model plan it.
        self._layout = describe(planned, self._params)
        # With row shards (``shards``: FSDP2's), the device mesh they are sharded on, and each
        # compartment's segments cut to this rank's pieces; decided here, once, so that a step over
        # whole parameters looks for no DTensor.
        self.mesh = self._params[0].device_mesh if shards and is_row_shard(self._params[0]) else None
        self.compartments: list[Compartment] = planned if self.mesh is None else local_pieces(planned)
        # Group index of every parameter and segment: groups are looked up at step time, since
        # load_state_dict and schedulers replace or change the group dicts.
        self._group_of = self._groups_by_id()
        self._segment_groups = [[self._group_of[id(s.param)] for s in c.segments] for c in self.compartments]
        self.total_numel = sum(p.numel() for p in self._params)
        # The segment tables of the steps' products (_table), built once per distinct set of
        # segments and streams: a run uses a few (the segments with gradients, and with
        # distributed training each rank's streams).
        self._tables: dict[tuple, SegmentPlan] = {}
        self.steps_taken = 0
        self._planned = True

    def _groups_by_id(self) -> dict[int, int]:
        return {id(p): k for k, group in enumerate(self.param_groups) for p in group["params"]}

    # ---- copies -------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer's copies keep defaults, state and param_groups only: a copy without
        # the seed, step count and compartments could not step.
        return {key: value for key, value in self.__dict__.items() if key not in UNCOPIED and key != "_group_of"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_params" in state:  # a copy (torch's load_state_dict passes the groups and state alone)
            self._group_of = self._groups_by_id()  # the copy's parameters are other objects

    def add_param_group(self, param_group: dict) -> None:
        if self._planned:
            raise ValueError("rbd_cuda: add_param_group is not supported once the optimizer is built: the "
                             "compartments and their bases are planned over all parameters at construction; "
                             "build a new optimizer with every param group instead")
        if isinstance(param_group, dict):
            # A key no step reads would be kept and silently ignored (HF Trainer's weight_decay was).
            unknown = [key for key in param_group if key not in TORCH_GROUP_KEYS and key not in self.HYPERPARAMETERS]
            if unknown:
                raise ValueError(f"rbd_cuda: param group {len(self.param_groups)} has the key {unknown[0]!r}, "
                                 f"which {type(self).__name__} does not implement; its groups take "
                                 f"{', '.join(self.HYPERPARAMETERS)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # Plain floats (not numpy scalars), so state dicts load with weights_only=True.
        group.update(self._check_group(len(self.param_groups) - 1, group))

    def _check_group(self, index: int, group: dict) -> dict[str, float]:
        return {name: check_finite(f"{name} (param group {index})", group[name], low=low, high=high,
                                   open_high=open_)
                for name, (low, high, open_) in self.HYPERPARAMETERS.items()}

    def hyperparameters(self) -> list[dict[str, float]]:
        """Every group's ``HYPERPARAMETERS`` values now (validated: a step changes nothing when one
        is not finite)."""
        return [self._check_group(k, group) for k, group in enumerate(self.param_groups)]

    @torch.no_grad()
    def _decay(self, params: Sequence[torch.Tensor], hyper: list[dict[str, float]]) -> None:
        """Decoupled weight decay (AdamW's): θ ← θ · (1 − lr · weight_decay) with each parameter's
        group values, on ``params`` (those the step updates), before the subspace update."""
        for p in params:
            group = hyper[self._group_of[id(p)]]
            if group.get("weight_decay"):
                p.mul_(1.0 - group["lr"] * group["weight_decay"])

    # ---- bases ------------------------------------------------------------------------------

    def basis_step(self) -> int:
        """The stream ``step`` of the basis the next ``step()`` uses."""
        return self.steps_taken if self.redraw else 0

    def basis(self, comp: Compartment, stream: int | None = None) -> Basis:
        """Compartment ``comp``'s basis for the next step (on ``stream`` instead of ``comp.stream``
        when given: distributed training's per-rank bases)."""
        return Basis(self.seed, self.basis_step(), comp.stream if stream is None else stream, self.distribution)

    def stream_kwargs(self, comp: Compartment) -> dict:
        """The ops' keywords addressing ``comp``'s basis for the next step."""
        return self.basis(comp).kwargs

    def scale(self, comp: Compartment, *, root: bool = False) -> float:
        """s of ``comp`` (``rbd_cuda.basis.scale``), or √s with ``root``."""
        return scale(self.normalize, self.distribution, comp.dim, comp.numel, self.total_numel, root=root)

    # ---- the products: one call each way per step ----------------------------------------------

    def _table(self, comps: tuple[tuple[int, int], ...], segments: tuple[tuple[int, int], ...]) -> SegmentPlan:
        """The segment table whose compartments are ``comps`` ((compartment index, stream) pairs:
        one compartment's basis on one stream) and whose segments are ``segments`` ((position in
        ``comps``, segment index) pairs), built and checked once (C++), then kept."""
        key = (comps, segments)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= TABLES_KEPT:
                self._tables.clear()
            chosen = [self.compartments[index].segments[k] for (index, _), k in
                      ((comps[j], k) for j, k in segments)]
            table = self._tables[key] = SegmentPlan(
                [seg.numel for seg in chosen], [seg.row_offset for seg in chosen], [j for j, _ in segments],
                [self.compartments[index].dim for index, _ in comps], [stream for _, stream in comps])
        return table

    def _keys(self) -> dict:
        """The grouped ops' keywords of the next step's bases (seed, step, distribution)."""
        return table_keywords(Basis(self.seed, self.basis_step(), 0, self.distribution))

    def project_gradients(self, present: Sequence[Sequence[int]], streams: Sequence[int]) -> list[torch.Tensor | None]:
        """Per compartment, Σ Pᵀg over its segments ``present[i]`` (those with a gradient) on stream
        ``streams[i]``, in fp32 (None where none is present): one ``project_grouped`` call over every
        compartment, per device and dtype of the gradients (one for a model on one device in one dtype)."""
        groups: dict[tuple, tuple[list, list]] = {}
        comps = tuple((index, stream) for index, stream in enumerate(streams))
        for index, segments in enumerate(present):
            for k in segments:
                seg = self.compartments[index].segments[k]
                grad = seg.local(seg.param.grad).reshape(-1)[seg.start: seg.start + seg.numel]
                tensors, where = groups.setdefault((grad.device, grad.dtype), ([], []))
                tensors.append(grad)
                where.append((index, k))
        c = None
        for tensors, where in groups.values():
            table = self._table(comps, tuple(where))
            part = torch.ops.rbd_cuda.project_grouped(tensors, table.table, table.total, **self._keys())
            c = part if c is None else c + part.to(c.device)
        coeffs, start = [], 0
        for comp, segments in zip(self.compartments, present, strict=True):
            coeffs.append(c[start: start + comp.dim] if segments else None)
            start += comp.dim
        return coeffs

    def expand_updates(self, updates: Sequence[tuple[int, torch.Tensor, int, Sequence[tuple[torch.Tensor, int, float]]]]
                       ) -> None:
        """``out += alpha · P c`` for every update ``(compartment index, c, stream, targets)``, its
        targets ``(out, segment index, alpha)``: one ``expand_grouped_`` call over all of them, per
        device and dtype of the outs. The outs must not overlap (one call updates them all)."""
        groups: dict[tuple, tuple[list, list, list, dict]] = {}
        for index, c, stream, targets in updates:
            for out, k, alpha in targets:
                outs, alphas, where, coeffs = groups.setdefault((out.device, out.dtype), ([], [], [], {}))
                j = coeffs.setdefault((index, stream), (len(coeffs), c))[0]
                outs.append(out)
                alphas.append(alpha)
                where.append((j, k))
        keys = self._keys()
        for (device, _), (outs, alphas, where, coeffs) in groups.items():
            c = torch.cat([c.to(device=device, dtype=torch.float32) for _, c in coeffs.values()])
            torch.ops.rbd_cuda.expand_grouped_(outs, c, alphas, self._table(tuple(coeffs), tuple(where)).table, **keys)

    # ---- introspection and checkpoints ----------------------------------------------------

    def summary(self) -> dict:
        """Compartments (name, stream, entries, directions) and the overall compression ratio."""
        rows = [{"name": c.name, "stream": c.stream, "numel": c.numel, "dim": c.dim} for c in self.compartments]
        total_dim = sum(c.dim for c in self.compartments)
        return {"compartments": rows, "numel": self.total_numel, "dim": total_dim,
                "compression": self.total_numel / total_dim}

    def config(self) -> dict:
        """Everything besides the param groups and the step count that decides the trajectory, as
        plain values: saved by ``state_dict``, checked by ``load_state_dict`` and ``replay``."""
        return {"optimizer": type(self).__name__, "seed": self.seed, "distribution": self.distribution,
                "normalize": self.normalize, "redraw": self.redraw,
                "compartments": copy.deepcopy(self._layout)}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rbd"] = {"format": FORMAT, "steps_taken": self.steps_taken, **self.config()}
        if self.mesh is not None:  # a rank's momentum buffers are its rows only
            sd["rbd"]["shard"] = self._shard()
        return sd

    def _shard(self) -> dict[str, int] | None:
        """Which rank of how many holds this optimizer's row shards (None: whole parameters)."""
        return None if self.mesh is None else {"rank": self.mesh.get_local_rank(), "ranks": self.mesh.size()}

    def agreement_fields(self) -> dict[str, object]:
        """What ranks stepping one model together must agree on: the configuration, the step
        count and every group's values."""
        return {**self.config(), "steps_taken": self.steps_taken, "param groups' values": self.hyperparameters()}

    def loaded_fields(self, checked: tuple[dict, int] | None) -> dict[str, object]:
        """The step count and groups' values a checked state dict (``check_state_dict``) loads,
        for the ranks' agreement on a load (all None where this rank's state dict was refused)."""
        if checked is None:
            return dict.fromkeys(("steps_taken", "param groups' values"))
        state_dict, steps = checked
        return {"steps_taken": steps, "param groups' values": [{name: group[name] for name in self.HYPERPARAMETERS}
                                                               for group in state_dict["param_groups"]]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer (formats 1–3); everything is checked (configuration,
        groups, step count, state tensors) before anything changes."""
        self._load_checked(self.check_state_dict(state_dict))

    def check_state_dict(self, state_dict: dict) -> tuple[dict, int]:
        """``state_dict`` as torch's ``load_state_dict`` takes it (groups completed and validated)
        and its step count, or a ``ValueError`` (``TypeError`` for a value of the wrong type)
        naming what is wrong; changes nothing."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"rbd_cuda: a state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        saved = state_dict.pop("rbd", None)
        name = type(self).__name__
        if not isinstance(saved, dict):
            # torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state" and "param_groups".
            raise ValueError(f"rbd_cuda: this state_dict has no 'rbd' entry (not saved by {name}'s state_dict; "  # noqa: TRY004
                             "torch.distributed.checkpoint's get_optimizer_state_dict drops it: save opt.state_dict() "
                             "instead, on each rank under FSDP2)")
        if "format" not in saved and "layout" not in saved:
            raise ValueError("rbd_cuda: the state_dict's 'rbd' entry has no 'format': every version after a02b069 "
                             "writes one (and a02b069's entries hold a 'layout'), so the entry was changed after "
                             "it was saved")
        version = saved.get("format", 1)  # a02b069 wrote no format; its layout entries are [stream, dim, numel]
        if version == 1:
            mine = [entry[:3] for entry in self._layout]
            check_saved(saved, {"layout": mine}, "the saved compartments (stream, dim, numel) differ from this "
                        "optimizer's")
        elif version in (2, FORMAT):
            check_saved(saved, self.config(), "the state_dict is from an optimizer built with other arguments, "
                        "which would give another trajectory")
        else:
            raise ValueError(f"rbd_cuda: state_dict format {version!r} is not one this version reads (1 to {FORMAT})")
        steps = check_count("the state_dict's steps_taken", saved.get("steps_taken"))
        # Equal shard shapes would let a rank load another's rows without an error.
        if saved.get("shard") != self._shard():
            def holder(shard):
                return "whole parameters" if shard is None else f"rank {shard['rank']} of {shard['ranks']}'s row shards"
            raise ValueError(f"rbd_cuda: this state_dict was saved over {holder(saved.get('shard'))}; this optimizer "
                             f"steps {holder(self._shard())}: load on each rank the state_dict that rank saved")

        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"rbd_cuda: the state_dict must hold {len(self.param_groups)} param groups, as this "
                             f"optimizer does; it holds {len(groups) if isinstance(groups, list) else groups!r}")
        completed, param_of = [], {}
        for k, (group, mine) in enumerate(zip(groups, self.param_groups, strict=True)):
            if not isinstance(group, dict) or len(group.get("params", ())) != len(mine["params"]):
                raise ValueError(f"rbd_cuda: the state_dict's param group {k} does not hold "
                                 f"{len(mine['params'])} parameters, as this optimizer's does")
            group = dict(group)
            if version == 1 and "momentum" not in self.HYPERPARAMETERS:
                group.pop("momentum", None)  # a02b069's NES derived from RBD: its groups held an unused momentum
            # As at construction (add_param_group): a key no step reads would load and be ignored.
            unknown = [key for key in group if key not in (*TORCH_GROUP_KEYS, *SCHEDULER_GROUP_KEYS)
                       and key not in self.HYPERPARAMETERS]
            if unknown:
                raise ValueError(f"rbd_cuda: the state_dict's param group {k} has the key {unknown[0]!r}, which {name} "
                                 f"does not implement; its groups take {', '.join(self.HYPERPARAMETERS)} (and the "
                                 f"keys torch's schedulers add: {', '.join(SCHEDULER_GROUP_KEYS)})")
            if version < FORMAT and "weight_decay" in self.HYPERPARAMETERS:
                if group.get("weight_decay", 0.0) != 0.0:
                    raise ValueError(f"rbd_cuda: param group {k} of this state_dict (format {version}) holds "
                                     f"weight_decay={group['weight_decay']!r}, which the version that saved it "
                                     "ignored: set it to 0.0 in the state_dict to continue that trajectory, or "
                                     "build a new optimizer to train with weight decay")
                group["weight_decay"] = 0.0
            missing = [key for key in self.HYPERPARAMETERS if key not in group]
            if missing:
                raise ValueError(f"rbd_cuda: the state_dict's param group {k} has no {missing[0]!r}")
            group.update(self._check_group(k, group))
            completed.append(group)
            param_of.update(zip(group["params"], mine["params"]))

        state = state_dict.get("state")
        if not isinstance(state, dict):
            raise TypeError(f"rbd_cuda: the state_dict's state must be a dict, got {type(state).__name__}")
        for key, entry in state.items():
            if key not in param_of:
                raise ValueError(f"rbd_cuda: the state_dict has state for {key!r}, which is none of its groups' "
                                 "parameters")
            p = param_of[key]
            if not isinstance(entry, dict):
                raise TypeError(f"rbd_cuda: the state of parameter {key} must be a dict, got {type(entry).__name__}")
            for entry_name, value in entry.items():
                where = f"the state_dict's {entry_name!r} of parameter {key}"
                if entry_name not in self.STATE_KEYS:
                    raise ValueError(f"rbd_cuda: {where} is not state {name} keeps "
                                     f"({', '.join(self.STATE_KEYS) or 'it keeps none'})")
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    raise ValueError(f"rbd_cuda: {where} must be a floating-point tensor, got "
                                     f"{type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}")
                if value.shape != p.shape:
                    raise ValueError(f"rbd_cuda: {where} has shape {tuple(value.shape)}; the parameter has "
                                     f"{tuple(p.shape)}")
                if self.mesh is not None:
                    if not sharded_as(value, p):
                        raise ValueError(f"rbd_cuda: {where} is not sharded as its parameter (placements "
                                         f"{tuple(p.placements)} on its mesh, this rank's rows): load on each rank "
                                         "the state_dict that rank saved, on a mesh of the same size")
                    value = value.to_local()
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"rbd_cuda: {where} holds non-finite values")
        return {**state_dict, "param_groups": completed}, steps

    def _load_checked(self, checked: tuple[dict, int]) -> None:
        """Load what ``check_state_dict`` returned."""
        state_dict, steps = checked
        super().load_state_dict(state_dict)
        self.steps_taken = steps

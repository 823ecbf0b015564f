"""The one base of the optimizers that step in random bases (RBD, FPD, NES).

It owns what they share: the compartments (``rbd_cuda.layout``), the bases (``rbd_cuda.basis``),
the param groups (read at step time, so schedulers and loaded state dicts take effect), and the
products of a step, one grouped call each way over one segment table. The policy around the
algorithm lives in modules of its own that the base and the optimizers call: the checks that make
a step all-or-nothing (``guards``), the state dict's formats and load checks (``formats``), row
shards (``rbd_cuda.sharding``), the ranks' agreement (``ranks``) and who is calling (``callers``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..basis import (
    Basis,
    check_distribution,
    check_finite,
    check_normalize,
    check_seed,
    scale,
    table_keywords,
)
from ..layout import Compartment, describe, plan
from ..ops import SegmentPlan
from ..sharding import is_row_shard, local_pieces
from . import formats
from .callers import built_by_zero
from .guards import check_no_overlap, check_parameter

# Why the steps are excluded from torch.compile's tracing (torch.compiler.disable): Dynamo drops
# the attribute mutations of optimizers, so a traced step would keep steps_taken at 0 and reuse
# the first basis at every step. A compiled train step breaks its graph at the step, which runs
# eagerly; with fullgraph=True Dynamo refuses it, showing this reason.
EAGER_STEP = ("rbd_cuda: the optimizers' step runs eagerly, since a traced step would lose its step count "
              "(and freeze the basis)")
# Segment tables an optimizer keeps (_table): a run needs a few; past this many, it starts over.
TABLES_KEPT = 64
# Attributes a copy (deepcopy, pickle) leaves out, as torch.optim.Optimizer's own copies do: the
# hooks, and the step an LR scheduler wraps, which would step the original.
UNCOPIED = ("step", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks")


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
        if built_by_zero():
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
                check_parameter(name or f"param{len(named)}", p)
                named.append((name, p))
        if compartments == "layer" and any(name is None for name, _ in named):
            raise ValueError("rbd_cuda: compartments='layer' needs named parameters: pass "
                             "model.named_parameters()")
        labelled = [(name or f"param{i}", p) for i, (name, p) in enumerate(named)]
        planned = plan(labelled, compartments, dim, shards=shards)
        check_no_overlap(labelled)
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
        self._one_kind = len({(p.device, p.dtype) for p in self._params}) == 1
        self._scales = [self.scale(comp) for comp in self.compartments]
        self._dims = [comp.dim for comp in self.compartments]
        # The last projection's coefficient vector and its per-compartment views (project_gradients).
        self._projected: tuple[torch.Tensor | None, tuple[torch.Tensor, ...]] = (None, ())
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
            unknown = [key for key in param_group if key not in formats.TORCH_GROUP_KEYS and key not in self.HYPERPARAMETERS]
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

    def _by_kind(self, tensors: list[torch.Tensor], where: list[tuple[int, int]], *more: list) -> list[tuple]:
        """``(tensors, where, *more)`` split by the tensors' device and dtype (a grouped call takes
        one of each), ``where`` as a tuple: one part when every parameter has one device and dtype
        (known from construction: gradients, and the buffers the guards check, follow them)."""
        if self._one_kind:
            return [(tensors, tuple(where), *more)]
        parts: dict[tuple, tuple[list, ...]] = {}
        for i, t in enumerate(tensors):
            lists = parts.setdefault((t.device, t.dtype), tuple([] for _ in range(2 + len(more))))
            for target, source in zip(lists, (tensors, where, *more), strict=True):
                target.append(source[i])
        return [(ts, tuple(ws), *rest) for ts, ws, *rest in parts.values()]

    def project_gradients(self, present: Sequence[Sequence[int]], streams: Sequence[int]) -> list[torch.Tensor | None]:
        """Per compartment, Σ Pᵀg over its segments ``present[i]`` (those with a gradient) on stream
        ``streams[i]``, in fp32 (None where none is present): one ``project_grouped`` call over every
        compartment, per device and dtype of the gradients (one for a model on one device in one dtype)."""
        tensors, where = [], []
        for index, segments in enumerate(present):
            segs = self.compartments[index].segments
            for k in segments:
                tensors.append(segs[k].piece(segs[k].param.grad))
                where.append((index, k))
        comps, keys, c = tuple(enumerate(streams)), self._keys(), None
        for part_tensors, part_where in self._by_kind(tensors, where):
            table = self._table(comps, part_where)
            part = torch.ops.rbd_cuda.project_grouped(part_tensors, table.table, table.total, **keys)
            c = part if c is None else c + part.to(c.device)
        # Views of c, one per compartment; expand_updates hands c itself to the grouped op when its
        # coefficients are these views, in this order (a step without an exchange that changes them).
        views = c.split(self._dims)
        self._projected = (c, views)
        return [view if segments else None for view, segments in zip(views, present, strict=True)]

    def expand_updates(self, updates: Sequence[tuple[int, torch.Tensor, int, list[torch.Tensor], list[int],
                                                     list[float]]]) -> None:
        """``out += alpha · P c`` for every update ``(compartment index, c, stream, outs, segment
        indices, alphas)``: one ``expand_grouped_`` call over all of them, per device and dtype of
        the outs. The outs must not overlap (one call updates them all)."""
        comps, coeffs, outs, where, alphas = [], [], [], [], []
        for index, c, stream, update_outs, segments, update_alphas in updates:
            comps.append((index, stream))
            coeffs.append(c)
            outs += update_outs
            where += [(len(comps) - 1, k) for k in segments]
            alphas += update_alphas
        keys = self._keys()
        # The coefficients of every update (the table keeps every update's compartment), laid out as
        # the table reads them; moved to each part's device below.
        projected, views = self._projected
        if len(coeffs) == len(views) and all(a is b for a, b in zip(coeffs, views)):
            every = projected
        else:
            if len({c.device for c in coeffs}) > 1:
                coeffs = [c.to(coeffs[0].device) for c in coeffs]
            every = torch.cat(coeffs).float()
        for part_outs, part_where, part_alphas in self._by_kind(outs, where, alphas):
            c = every.to(part_outs[0].device)
            table = self._table(tuple(comps), part_where)
            torch.ops.rbd_cuda.expand_grouped_(part_outs, c, part_alphas, table.table, **keys)

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
        return {**super().state_dict(), "rbd": formats.saved_entry(self)}

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
        """``state_dict`` as torch's ``load_state_dict`` takes it and its step count, or the error
        naming what is wrong (``rbd_cuda.optim.formats``); changes nothing."""
        return formats.check_state_dict(self, state_dict)

    def _load_checked(self, checked: tuple[dict, int]) -> None:
        """Load what ``check_state_dict`` returned."""
        state_dict, steps = checked
        super().load_state_dict(state_dict)
        self.steps_taken = steps

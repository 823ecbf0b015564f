"""Compartments: which parameters share one random basis, and how many directions each gets.

The one layout module of the optimizers, ``RandomSubspace`` and distributed training. A compartment is a list of segments (contiguous pieces of flattened parameters). Its basis
vectors span all of its segments: segment s addresses rows ``[row_offset_s, row_offset_s + n_s)``
of the compartment's matrix, and every compartment has its own ``stream`` id, so compartments
draw independent bases from one seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .ops import as_int
from .sharding import check_whole


@dataclass(frozen=True)
class Segment:
    """``param.view(-1)[start : start + numel]`` at rows ``row_offset ...`` of its compartment;
    ``name`` is the parameter's name. A ``sharded`` segment is a piece of this rank's shard of a
    DTensor parameter (``rbd_cuda.sharding.local_pieces``): ``start`` counts in the shard."""

    param: torch.Tensor
    start: int
    numel: int
    row_offset: int
    name: str = ""
    sharded: bool = False
    # Whether the segment is all of its (local) tensor: then ``piece`` is the tensor itself.
    whole: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "whole", self.start == 0 and self.numel == self.local(self.param).numel())

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor ``start`` indexes: ``tensor`` (the parameter, its grad or a state buffer), or
        this rank's shard of it (the optimizers step under no_grad, where it is the shard itself)."""
        return tensor.to_local() if self.sharded else tensor

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same piece of ``tensor`` (the parameter itself, its grad or a state buffer)."""
        return self.local(tensor).view(-1)[self.start : self.start + self.numel]

    def piece(self, tensor: torch.Tensor) -> torch.Tensor:
        """The segment's entries of ``tensor`` as the grouped ops take them (they flatten it): the
        tensor itself for a whole segment, no view made (a step's hot path), else its slice."""
        local = self.local(tensor)
        return local if self.whole else local.reshape(-1)[self.start : self.start + self.numel]


@dataclass
class Compartment:
    stream: int
    dim: int = 0
    segments: list[Segment] = field(default_factory=list)
    name: str = ""
    # Entries of the whole compartment where ``segments`` are only this rank's pieces of it.
    whole_numel: int | None = None

    @property
    def numel(self) -> int:
        return self.whole_numel if self.whole_numel is not None else sum(s.numel for s in self.segments)


# ---- dimension allocation ---------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """The same number of directions ``dim`` for every compartment."""

    dim: int

    def allocate(self, sizes: Sequence[int]) -> list[int]:
        return [self.dim] * len(sizes)


@dataclass(frozen=True)
class Proportional:
    """A total of ``total`` directions split in proportion to compartment size, at least
    ``minimum`` each: the dims sum to ``total`` exactly, deterministically.

    Each share is rounded down (to ``minimum`` where it is smaller) and what rounding left over
    goes to the largest remainders, ties to the earlier compartment. Where the minimums took more
    than rounding left, the compartments above the minimum give directions back one at a time, the
    one furthest above its share (relative to it) first.
    """

    total: int
    minimum: int = 1

    def allocate(self, sizes: Sequence[int]) -> list[int]:
        if self.total < self.minimum * len(sizes):
            raise ValueError(f"rbd_cuda: Proportional(total={self.total}, minimum={self.minimum}) cannot give each "
                             f"of {len(sizes)} compartments {self.minimum} direction(s): the total must be at least "
                             f"{self.minimum * len(sizes)}")
        whole = sum(sizes)
        # Shares and remainders in floats, as the rule computed them before it had a minimum: the
        # splits it made then (saved in state dicts) stay the same.
        dims = [max(self.minimum, math.floor(self.total * n / whole)) for n in sizes]
        order = sorted(range(len(sizes)), key=lambda k: (-(self.total * sizes[k] / whole - dims[k]), k))
        for k in order[: max(0, self.total - sum(dims))]:
            dims[k] += 1
        while sum(dims) > self.total:
            k = max((k for k in range(len(sizes)) if dims[k] > self.minimum),
                    key=lambda k: (Fraction(dims[k] * whole, self.total * sizes[k]), -k))
            dims[k] -= 1
        return dims


@dataclass(frozen=True)
class Compression:
    """The paper's rule: ``ceil(numel / factor)`` directions, at least ``minimum``."""

    factor: float
    minimum: int = 10

    def allocate(self, sizes: Sequence[int]) -> list[int]:
        return [max(self.minimum, math.ceil(n / self.factor)) for n in sizes]


def as_dim_rule(dim) -> Fixed | Proportional | Compression:
    """``dim`` as a rule; an integer (numpy's too, as the ops take them) means ``Fixed``."""
    if isinstance(dim, (Fixed, Proportional, Compression)):
        rule = dim
    else:
        try:
            rule = Fixed(as_int("dim", dim))
        except TypeError:
            raise TypeError(f"rbd_cuda: dim must be an int, Fixed, Proportional or Compression, "
                            f"got {dim!r}") from None
    for name in ("dim", "total", "minimum"):
        if hasattr(rule, name):
            value = as_int(f"{type(rule).__name__}'s {name}", getattr(rule, name))
            if value <= 0:
                raise ValueError(f"rbd_cuda: {type(rule).__name__}'s {name} must be positive, got {value}")
    if isinstance(rule, Compression):
        factor = rule.factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ValueError(f"rbd_cuda: Compression's factor must be a finite number > 0, got {factor!r}")
    return rule


# ---- layouts ------------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """``"layers.0.weight"`` -> ``("layers.0", "weight")``: the owning module and the attribute."""
    module, _, attr = name.rpartition(".")
    return module, attr


def layer_of(name: str) -> str:
    """The layer of a parameter name: its module's path (``compartments="layer"`` groups by it)."""
    return split_name(name)[0]


def plan(named_params: Sequence[tuple[str, torch.Tensor]], mode, dim, *, shards: bool = False) -> list[Compartment]:
    """Compartments for ``named_params`` (in order) under ``mode``:

    - ``"global"``: one compartment for everything;
    - ``"tensor"``: one per parameter tensor;
    - ``"layer"``: one per module (parameters whose names share the prefix before the last dot);
    - an int ``w``: pack parameters in order into compartments of at most ``w`` entries,
      splitting a tensor larger than ``w`` into pieces;
    - a list of lists of parameters: exactly those compartments (each parameter once).

    Every parameter must be whole on this process, or with ``shards`` every one a row shard on
    one mesh (``rbd_cuda.sharding.check_whole``): the compartments are then planned over the whole
    parameters, and ``rbd_cuda.sharding.local_pieces`` cuts them to this rank's shards.
    """
    sharded = [check_whole(name, p, shards=shards) for name, p in named_params]
    if any(sharded):
        mesh = named_params[sharded.index(True)][1].device_mesh
        for (name, p), row_shard in zip(named_params, sharded, strict=True):
            # A whole parameter among shards would be projected, and its coefficients summed, once per rank.
            if not row_shard or p.device_mesh != mesh:
                what = "on another device mesh than" if row_shard else "a plain tensor among"
                raise ValueError(f"rbd_cuda: parameter {name} is {what} the other parameters' row shards: shard "
                                 "every parameter on one mesh (fully_shard the root module too)")
    rule = as_dim_rule(dim)
    params = [p for _, p in named_params]
    name_of = {id(p): name for name, p in named_params}
    groups: list[tuple[str, list[Segment]]] = []

    def whole(p: torch.Tensor, offset: int) -> Segment:
        return Segment(p, 0, p.numel(), offset, name_of[id(p)])

    if mode == "global":
        segs, offset = [], 0
        for p in params:
            segs.append(whole(p, offset))
            offset += p.numel()
        groups.append(("global", segs))
    elif mode == "tensor":
        groups = [(name, [whole(p, 0)]) for name, p in named_params]
    elif mode == "layer":
        by_module: dict[str, list[Segment]] = {}
        offsets: dict[str, int] = {}
        for name, p in named_params:
            module = layer_of(name)
            by_module.setdefault(module, []).append(whole(p, offsets.get(module, 0)))
            offsets[module] = offsets.get(module, 0) + p.numel()
        groups = list(by_module.items())
    elif isinstance(mode, int) and not isinstance(mode, bool):
        if mode <= 0:
            raise ValueError(f"rbd_cuda: a compartment size must be positive, got {mode}")
        segs, filled = [], 0
        for p in params:
            start = 0
            while start < p.numel():
                take = min(p.numel() - start, mode - filled)
                segs.append(Segment(p, start, take, filled, name_of[id(p)]))
                start += take
                filled += take
                if filled == mode:
                    groups.append((f"block{len(groups)}", segs))
                    segs, filled = [], 0
        if segs:
            groups.append((f"block{len(groups)}", segs))
    elif isinstance(mode, (list, tuple)):
        known = {id(p) for p in params}
        for k, members in enumerate(mode):
            segs, offset = [], 0
            for p in members:
                if id(p) not in known:
                    raise ValueError("rbd_cuda: compartments lists a tensor that is not among the "
                                     "optimizer's parameters")
                segs.append(whole(p, offset))
                offset += p.numel()
            groups.append((f"compartment{k}", segs))
    else:
        raise ValueError(f"rbd_cuda: compartments must be 'global', 'tensor', 'layer', a size (int) or "
                         f"a list of parameter lists, got {mode!r}")

    covered = {}
    for _, segs in groups:
        for s in segs:
            covered[id(s.param)] = covered.get(id(s.param), 0) + s.numel
    for p in params:
        if covered.get(id(p), 0) != p.numel():
            raise ValueError("rbd_cuda: every parameter must be in exactly one compartment (a tensor "
                             f"of {p.numel()} entries has {covered.get(id(p), 0)} entries in compartments)")

    compartments = [Compartment(stream=k, segments=segs, name=name) for k, (name, segs) in enumerate(groups)
                    if segs]
    for c, d in zip(compartments, rule.allocate([c.numel for c in compartments]), strict=True):
        c.dim = d
    return compartments


def spans(sizes: Sequence[int], start: int = 0) -> tuple[list[slice], int]:
    """Consecutive slices of the given sizes from ``start``, and where the last ends: e.g. every
    compartment's coefficients laid out in one flat buffer (sizes: the dims)."""
    slices = []
    for size in sizes:
        slices.append(slice(start, start + size))
        start += size
    return slices, start


def describe(compartments: Sequence[Compartment], params: Sequence[torch.Tensor]) -> list[list]:
    """A plain description of a layout, for state dicts and records: per compartment
    ``[stream, dim, numel, [[parameter index, start, numel, row_offset], ...]]``, parameters
    numbered in ``params``'s order."""
    index = {id(p): k for k, p in enumerate(params)}
    return [[c.stream, c.dim, c.numel, [[index[id(s.param)], s.start, s.numel, s.row_offset] for s in c.segments]]
            for c in compartments]


# ---- "the saved configuration differs from mine" --------------------------------------------
# Optimizer state dicts, records, RandomSubspace's extra state and the DDP hook's state all save
# a plain configuration (``config()``: seed, distribution, layout, ...) and refuse to load one
# that differs. The message names the first differing field of each compartment, for a few
# compartments: its length does not grow with the model.

COMPARTMENT_FIELDS = ("stream", "dim", "numel", "segments")
SHOWN = 3  # compartments named in a message; the others are counted


def _plain(value):
    """Tuples as lists (state dicts round-trip through torch.save), recursively."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compartment_differences(saved, mine: list) -> list[str]:
    saved, mine = _plain(saved), _plain(mine)
    # A compartment is a list of COMPARTMENT_FIELDS (the optimizers) or a dict (RandomSubspace).
    kind = dict if mine and isinstance(mine[0], dict) else list
    if not isinstance(saved, list) or not all(isinstance(entry, kind) for entry in saved):
        return [f"compartments: {_short(saved)} saved, not a list of compartments"]
    found = [] if len(saved) == len(mine) else [f"{len(saved)} compartments saved, {len(mine)} here"]
    differing = 0
    for k, (theirs, ours) in enumerate(zip(saved, mine)):
        fields = ([(name, theirs.get(name), value) for name, value in ours.items()] if kind is dict
                  else zip(COMPARTMENT_FIELDS, theirs, ours))
        for name, a, b in fields:
            if a != b:
                differing += 1
                if differing <= SHOWN:
                    found.append(f"compartment {k}'s {name}: {_short(a)} saved, {_short(b)} here")
                break
    if differing > SHOWN:
        found.append(f"{differing - SHOWN} more compartments differ")
    return ["compartments: " + ", ".join(found)] if found else []


def check_saved(saved, mine: dict, what: str, *, saved_as: str = "saved") -> None:
    """Raise ``ValueError("rbd_cuda: {what}: ...")`` naming every key of ``mine`` (a ``config()``)
    whose value in ``saved`` differs, and for the compartment table (key ``"compartments"`` or
    a02b069's ``"layout"``) the first differing field of each compartment; values are shortened,
    ``saved_as`` is the word for ``saved``'s side ("saved", "recorded")."""
    if not isinstance(saved, dict):
        raise TypeError(f"rbd_cuda: {what}: expected a dict, got {type(saved).__name__}")
    differ = []
    for key, value in mine.items():
        theirs = saved.get(key)
        if key in ("compartments", "layout"):
            differ += [d.replace(" saved", f" {saved_as}") for d in _compartment_differences(theirs, value)]
        elif _plain(theirs) != _plain(value):
            differ.append(f"{key}: {_short(theirs)} {saved_as}, {_short(value)} here")
    if differ:
        raise ValueError(f"rbd_cuda: {what}: " + "; ".join(differ))

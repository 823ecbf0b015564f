"""Compartments: which parameters share one random basis, and how many directions each gets.

A compartment is a list of segments (contiguous pieces of flattened parameters). Its basis
vectors span all of its segments: segment s addresses rows ``[row_offset_s, row_offset_s + n_s)``
of the compartment's matrix, and every compartment has its own ``stream`` id, so compartments
draw independent bases from one seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    """``param.view(-1)[start : start + numel]`` at rows ``row_offset ...`` of its compartment."""

    param: torch.Tensor
    start: int
    numel: int
    row_offset: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same piece of ``tensor`` (the parameter itself, its grad or a state buffer)."""
        return tensor.view(-1)[self.start : self.start + self.numel]


@dataclass
class Compartment:
    stream: int
    dim: int = 0
    segments: list[Segment] = field(default_factory=list)
    name: str = ""

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.segments)


# ---- dimension allocation ---------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """The same number of directions ``dim`` for every compartment."""

    dim: int

    def allocate(self, sizes: Sequence[int]) -> list[int]:
        return [self.dim] * len(sizes)


@dataclass(frozen=True)
class Proportional:
    """A total of ``total`` directions split in proportion to compartment size (at least 1 each)."""

    total: int

    def allocate(self, sizes: Sequence[int]) -> list[int]:
        if self.total < len(sizes):
            raise ValueError(f"rbd_cuda: Proportional(total={self.total}) cannot give each of "
                             f"{len(sizes)} compartments a direction")
        whole = sum(sizes)
        dims = [max(1, math.floor(self.total * n / whole)) for n in sizes]
        # Hand out what rounding left over to the largest remainders, deterministically.
        order = sorted(range(len(sizes)), key=lambda k: (-(self.total * sizes[k] / whole - dims[k]), k))
        for k in order[: max(0, self.total - sum(dims))]:
            dims[k] += 1
        return dims


@dataclass(frozen=True)
class Compression:
    """The paper's rule: ``ceil(numel / factor)`` directions, at least ``minimum``."""

    factor: float
    minimum: int = 10

    def allocate(self, sizes: Sequence[int]) -> list[int]:
        return [max(self.minimum, math.ceil(n / self.factor)) for n in sizes]


def as_dim_rule(dim) -> Fixed | Proportional | Compression:
    if isinstance(dim, (Fixed, Proportional, Compression)):
        rule = dim
    elif isinstance(dim, int) and not isinstance(dim, bool):
        rule = Fixed(dim)
    else:
        raise TypeError(f"rbd_cuda: dim must be an int, Fixed, Proportional or Compression, got {dim!r}")
    value = getattr(rule, "dim", getattr(rule, "total", None))
    if value is not None and value <= 0:
        raise ValueError(f"rbd_cuda: dim must be positive, got {value}")
    if isinstance(rule, Compression) and (rule.factor <= 0 or rule.minimum <= 0):
        raise ValueError(f"rbd_cuda: Compression needs factor > 0 and minimum > 0, got {rule}")
    return rule


# ---- layouts ------------------------------------------------------------------------------


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def plan(named_params: Sequence[tuple[str, torch.Tensor]], mode, dim) -> list[Compartment]:
    """Compartments for ``named_params`` (in order) under ``mode``:

    - ``"global"``: one compartment for everything;
    - ``"tensor"``: one per parameter tensor;
    - ``"layer"``: one per module (parameters whose names share the prefix before the last dot);
    - an int ``w``: pack parameters in order into compartments of at most ``w`` entries,
      splitting a tensor larger than ``w`` into pieces;
    - a list of lists of parameters: exactly those compartments (each parameter once).
    """
    rule = as_dim_rule(dim)
    params = [p for _, p in named_params]
    groups: list[tuple[str, list[Segment]]] = []

    def whole(p: torch.Tensor, offset: int) -> Segment:
        return Segment(p, 0, p.numel(), offset)

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
            module = _module_of(name)
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
                segs.append(Segment(p, start, take, filled))
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

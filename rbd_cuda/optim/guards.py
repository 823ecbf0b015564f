"""The checks the optimizers make around the algorithm: on the parameters at construction, and
before a step changes anything (the step is all-or-nothing: a refused step leaves the
parameters, the state and the step count as they were); and the refusal to copy an optimizer
bound to a process group."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NoReturn

import torch

from ..sharding import is_row_shard, sharded_as

PARAMETER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_parameter(label: str, p: torch.Tensor) -> None:
    """A parameter the ops can update in place: float32, float16 or bfloat16, contiguous."""
    if p.dtype not in PARAMETER_DTYPES:
        raise ValueError(f"rbd_cuda: parameter {label} has dtype {p.dtype}; the random-bases ops "
                         "update float32, float16 or bfloat16 parameters")
    if not p.is_contiguous():
        raise ValueError(f"rbd_cuda: parameter {label} must be contiguous (the update is "
                         "applied in place to its flattened view)")


def check_no_overlap(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Refuse parameters whose entries share memory: each is updated in place."""
    overlap = _first_overlap(named)
    if overlap:
        raise ValueError(f"rbd_cuda: parameters {overlap[0]} and {overlap[1]} share memory (one is a view of "
                         "the other, or they overlap): each is updated in place, so every step would move "
                         "the shared entries twice; pass each tensor once")


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


def present_gradients(opt) -> list[list[int]]:
    """Per compartment, the segments whose parameter has a gradient (checked: strided)."""
    present = []
    for comp in opt.compartments:
        segments = []
        for k, seg in enumerate(comp.segments):
            grad = seg.param.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise ValueError(f"rbd_cuda: parameter {seg.name} has a {grad.layout} gradient; "
                                 f"{type(opt).__name__} needs dense gradients (e.g. sparse=False "
                                 "in nn.Embedding)")
            segments.append(k)
        present.append(segments)
    return present


def check_buffers(opt, present: list[list[int]]) -> None:
    """Momentum buffers the step will use must match their parameter (a state changed by hand)."""
    for comp, segments in zip(opt.compartments, present, strict=True):
        for k in segments:
            p = comp.segments[k].param
            buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
            if buf is not None and (buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device):
                raise ValueError(f"rbd_cuda: the momentum buffer of parameter {comp.segments[k].name} is "
                                 f"{buf.dtype} {tuple(buf.shape)} on {buf.device}; the parameter is {p.dtype} "
                                 f"{tuple(p.shape)} on {p.device}")
            if buf is not None and comp.segments[k].sharded and not sharded_as(buf, p):
                raise ValueError(f"rbd_cuda: the momentum buffer of parameter {comp.segments[k].name} is not "
                                 f"sharded as the parameter (placements {tuple(p.placements)} on its mesh)")


def check_finite_step(opt, terms: Sequence[Sequence[tuple]], present: list[list[int]]) -> None:
    """Refuse a step whose coefficients are not finite: one NaN or infinite gradient entry would
    turn its whole compartment into NaN. The combined coefficients are checked (Σd numbers, the
    same on every rank, so that every rank refuses), then the gradients, to name the parameter."""
    # Each coefficient tensor once: those of one projection are views of one vector.
    distinct = {id(t): t for comp_terms in terms for c, _, _ in comp_terms
                for t in (c if c._base is None else c._base,)}
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in distinct.values():
        by_device.setdefault(t.device, []).append(t.reshape(-1))
    if all(bool(torch.isfinite(cs[0] if len(cs) == 1 else torch.cat(cs)).all()) for cs in by_device.values()):
        return
    unchanged = f"step {opt.steps_taken} was not taken (the parameters and the step count are unchanged)"
    for comp, segments in zip(opt.compartments, present, strict=True):
        for k in segments:
            seg = comp.segments[k]
            if not bool(torch.isfinite(seg.view(seg.param.grad)).all()):
                raise ValueError(f"rbd_cuda: the gradient of parameter {seg.name} holds NaN or infinite values; "
                                 f"{unchanged}")
    raise ValueError("rbd_cuda: the gradient's coefficients are not finite, though this process's gradients "
                     "are: another rank's gradient holds NaN or infinite values, or a half-precision "
                     f"projection overflowed; {unchanged}")

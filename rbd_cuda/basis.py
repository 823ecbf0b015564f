"""The random basis: which matrix P an update uses, how it is scaled, and the products over a
compartment.

One basis is one ``(seed, step, stream, distribution)``: entry ``P[i, j]`` of it is a pure
function of ``(i, j)`` (docs/random_stream.md). Optimizers, ``RandomSubspace`` and the DDP hook
all describe their bases with ``Basis`` and scale them with ``scale``, and every product over a
compartment's segments goes through ``project_compartment``, ``expand_compartment_`` (in place,
the optimizers' update) or ``expand_compartment`` (differentiable, the subspace wrapper).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import ops

ENTRY_VARIANCE = {"normal": 1.0, "uniform": 1.0 / 3.0, "rademacher": 1.0}

# s of the update −lr·s·P Pᵀ g (equivalently: every basis vector multiplied by √s), for a
# compartment of d directions and n entries in a model of D entries, entries of variance σ²:
#   "unbiased"    1/(d σ²): E[s P Pᵀ] = I
#   "paper"       1/D: every basis vector divided by √D, the paper's auto_norm (Table 1)
#   "dim"         1/d: the paper's normalized=False
#   "none"        1
#   "projection"  1/(n σ²): s P Pᵀ close to the orthogonal projection on the d directions
NORMALIZATIONS = ("unbiased", "paper", "dim", "none", "projection")
STREAM_STEPS = 2**32


def check_seed(seed) -> int:
    """``seed`` as a plain Python int (numpy integers accepted), or an error naming it: a seed is
    any 64-bit value, signed or unsigned."""
    if isinstance(seed, bool):
        raise TypeError("rbd_cuda: seed must be an int, got bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"rbd_cuda: seed must be an int, got {type(seed).__name__}") from None
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"rbd_cuda: seed must fit in 64 bits, i.e. in [-2**63, 2**64), got {seed}")
    return seed


def check_count(name: str, value) -> int:
    """``value`` as a plain int >= 0 (numpy integers accepted; floats, bools and strings refused):
    a saved step count."""
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except (TypeError, RuntimeError):
        count = -1
    if count < 0:
        raise ValueError(f"rbd_cuda: {name} must be an int >= 0, got {value!r}")
    return count


def check_distribution(distribution) -> str:
    if distribution not in ops.DISTRIBUTIONS:
        raise ValueError(f"rbd_cuda: distribution must be one of {ops.DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def check_normalize(normalize, allowed: Sequence[str] = NORMALIZATIONS) -> str:
    if normalize not in allowed:
        raise ValueError(f"rbd_cuda: normalize must be one of {tuple(allowed)}, got {normalize!r}")
    return normalize


def check_finite(name: str, value, *, low: float = 0.0, high: float = math.inf, open_high: bool = False) -> float:
    """A finite real ``value`` in [low, high] (or [low, high) with ``open_high``) as a float."""
    try:
        if isinstance(value, (bool, str, bytes)):  # float("0.1") would take a string
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"rbd_cuda: {name} must be a real number, got {type(value).__name__}") from None
    inside = low <= value and (value < high if open_high else value <= high)
    if not (math.isfinite(value) and inside):
        bracket = ")" if open_high else "]"
        raise ValueError(f"rbd_cuda: {name} must be finite and in [{low}, {high}{bracket}, got {value}")
    return value


def scale(normalize: str, distribution: str, dim: int, numel: int, total_numel: int, *, root: bool = False) -> float:
    """The constant s of the update −lr·s·P Pᵀ g for a compartment of ``dim`` directions and
    ``numel`` entries in a model of ``total_numel`` entries (the table above ``NORMALIZATIONS``); with
    ``root``, √s, the factor of each basis vector (NES's update, the subspace wrapper)."""
    if normalize == "unbiased":
        denominator = dim * ENTRY_VARIANCE[distribution]
    elif normalize == "paper":
        denominator = total_numel
    elif normalize == "dim":
        denominator = dim
    elif normalize == "projection":
        denominator = numel * ENTRY_VARIANCE[distribution]
    else:
        return 1.0
    # 1/x and x**-0.5 round as the optimizers of a02b069 did, so resumed runs stay bit-identical.
    return denominator ** -0.5 if root else 1.0 / denominator


@dataclass(frozen=True)
class Basis:
    """One random matrix of the stream: ``(seed, step, stream, distribution)``.

    ``kwargs`` are the keywords the ops take for it (``torch.ops.rbd_cuda``'s too: the seed as an
    int64); a compartment's segments add their ``row_offset``. Build it with ``check_seed``-valid
    values (the optimizers validate once at construction, so a step does not re-validate).
    """

    seed: int
    step: int = 0
    stream: int = 0
    distribution: str = "normal"

    @property
    def kwargs(self) -> dict:
        if not 0 <= self.step < STREAM_STEPS:
            raise RuntimeError(f"rbd_cuda: the random stream has 2**32 steps; step {self.step} is beyond them")
        return {"seed": ops.int64_seed(self.seed), "step": self.step, "stream": self.stream,
                "distribution": self.distribution}


# ---- the products over one compartment ------------------------------------------------------
# A compartment's segments are pieces of flattened tensors at rows ``row_offset ...`` of its
# matrix; these functions are the only places that loop over them (or hand them to the grouped
# ops in one call).


def _one_launch(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a compartment's segments go to the grouped ops (one launch per product with the
    CUDA kernels): several fp32 tensors on one device, for which the grouped ops compute exactly
    what the per-segment loop computes. Half-precision segments keep the loop, which rounds each
    segment's coefficients to its dtype as recorded trajectories did."""
    return (len(tensors) > 1 and all(t.dtype == torch.float32 for t in tensors)
            and len({t.device for t in tensors}) == 1)


def _stream_of(basis: Basis, plan: ops.SegmentPlan) -> dict:
    """``basis``'s keywords for the ops (its step checked), for ``plan``, one compartment on ``basis``'s stream."""
    if plan.streams != (basis.stream,):
        raise ValueError(f"rbd_cuda: the plan's streams {plan.streams} are not the basis's ({basis.stream},)")
    return basis.kwargs


def project_compartment(basis: Basis, plan: ops.SegmentPlan, pieces: Sequence[torch.Tensor],
                        device: torch.device | None = None) -> torch.Tensor:
    """``c = Σ_s P_sᵀ g_s`` over the 1-D ``pieces`` g_s, the segments of ``plan`` (one compartment of
    ``plan.total`` directions on ``basis``'s stream, built once by the caller), in fp32 on ``device``
    (default: the first piece's). The plan was validated when built: nothing of it is checked here
    (the C++ ops still check what they are given)."""
    kw = _stream_of(basis, plan)
    if _one_launch(pieces):
        c = torch.ops.rbd_cuda.project_grouped(list(pieces), plan.row_offsets, plan.compartments, plan.dims,
                                               plan.streams, seed=kw["seed"], step=kw["step"],
                                               distribution=kw["distribution"])
        return c if device is None else c.to(device)
    c = None
    for piece, row_offset in zip(pieces, plan.row_offsets, strict=True):
        part = torch.ops.rbd_cuda.project(piece, plan.total, row_offset=row_offset, **kw).float()
        c = part if c is None else c + part.to(c.device)
    return c if device is None else c.to(device)


def expand_compartment_(basis: Basis, plan: ops.SegmentPlan, outs: Sequence[torch.Tensor], coeffs: torch.Tensor,
                        alpha: float, *, col_offset: int = 0) -> None:
    """In place ``out_s += alpha · P_s c`` for the 1-D views ``outs``, the segments of ``plan`` (as
    for ``project_compartment``; ``c`` addressing columns ``col_offset ...``: NES perturbs along one
    column with one coefficient)."""
    kw = _stream_of(basis, plan)
    if col_offset == 0 and coeffs.numel() == plan.total and _one_launch(outs):
        c = coeffs if coeffs.device == outs[0].device else coeffs.to(outs[0].device)
        torch.ops.rbd_cuda.expand_grouped_(list(outs), c, [float(alpha)] * len(outs), plan.row_offsets,
                                           plan.compartments, plan.dims, plan.streams, seed=kw["seed"],
                                           step=kw["step"], distribution=kw["distribution"])
        return
    for out, row_offset in zip(outs, plan.row_offsets, strict=True):
        torch.ops.rbd_cuda.expand_(out, coeffs if coeffs.device == out.device else coeffs.to(out.device),
                                   float(alpha), row_offset=row_offset, col_offset=col_offset, **kw)


def expand_compartment(basis: Basis, coeffs: Sequence[torch.Tensor], numels: Sequence[int],
                       row_offsets: Sequence[int]) -> list[torch.Tensor]:
    """``[P_s c_s]`` (differentiable in each ``c_s``; one coefficient vector per segment, so a
    caller can scale a segment's coefficients): the subspace wrapper's forward."""
    kw = basis.kwargs
    return [ops.expand(c, numel, row_offset=row_offset, **kw)
            for c, numel, row_offset in zip(coeffs, numels, row_offsets, strict=True)]

"""The random basis: which matrix P an update uses, how it is scaled, and the products over a
compartment.

One basis is one ``(seed, step, stream, distribution)``: entry ``P[i, j]`` of it is a pure
function of ``(i, j)`` (docs/random_stream.md). Optimizers, ``RandomSubspace`` and the DDP hook
all describe their bases with ``Basis`` and scale them with ``scale``; their products go to the
grouped ops over one segment table (``table_keywords``, and ``expand_segments``, differentiable,
for the subspace wrapper).
"""

from __future__ import annotations

import math
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
    seed = ops.as_int("seed", seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"rbd_cuda: seed must fit in 64 bits, i.e. in [-2**63, 2**64), got {seed}")
    return seed


def check_count(name: str, value) -> int:
    """``value`` as a plain int >= 0 (numpy integers accepted; floats, bools and strings refused):
    a saved step count."""
    return ops.as_int(name, value, minimum=0, error=ValueError)


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


# ---- the products over a segment table ------------------------------------------------------
# The optimizers, RandomSubspace and the DDP hook hold their segments in one table
# (``ops.SegmentPlan``, built once) and call the grouped ops on it directly: one call each way per
# step, whatever the number of compartments.


def table_keywords(basis: Basis) -> dict:
    """``basis``'s keywords for the grouped ops (its step checked): the stream is the table's."""
    kw = basis.kwargs
    del kw["stream"]
    return kw


class _ExpandSegments(torch.autograd.Function):
    """``[P_s c_s]`` over a table's segments in one ``expand_grouped_`` (into fp32 zeros: what
    ``expand`` computes, bit for bit); its derivative is one ``project_grouped`` of the incoming
    gradients (each segment's ``project``)."""

    @staticmethod
    def forward(c, table, total, numels, keys):
        outs = [c.new_zeros(n, dtype=torch.float32) for n in numels]
        torch.ops.rbd_cuda.expand_grouped_(outs, c.detach(), [1.0] * len(outs), table, **dict(keys))
        return tuple(outs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.table, ctx.total, ctx.numels, ctx.keys = inputs
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, *grads):
        grad_c = torch.ops.rbd_cuda.project_grouped([g.contiguous() for g in grads], ctx.table, ctx.total,
                                                    **dict(ctx.keys))
        return grad_c.to(ctx.dtype), None, None, None, None


class _ExpandSegmentsForward(_ExpandSegments):
    """The same with a tangent (forward AD, torch.func.jvp): kept apart because torch.compile cannot
    trace a Function with a custom jvp (``ops.forward_transform_active`` picks)."""

    @staticmethod
    def jvp(ctx, c_tangent, *_):
        # Linear in c: the tangent of each output is the same product of c's tangent.
        return _ExpandSegmentsForward.apply(c_tangent.contiguous(), ctx.table, ctx.total, ctx.numels, ctx.keys)


def expand_segments(plan: ops.SegmentPlan, c: torch.Tensor, basis: Basis) -> tuple[torch.Tensor, ...]:
    """``P_s c_k`` (fp32, one per segment s of ``plan``, k its compartment; c laid out as the
    grouped ops' coefficients), differentiable in ``c``: the subspace wrapper's forward, in one
    call each way."""
    function = _ExpandSegmentsForward if ops.forward_transform_active() else _ExpandSegments
    return function.apply(c, plan.table, plan.total, plan.numels, tuple(table_keywords(basis).items()))

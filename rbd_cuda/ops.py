"""Typed wrappers over ``torch.ops.rbd_cuda`` and the fake kernels torch.compile traces with.

The random matrix P is addressed, never stored: entry ``P[i, j]`` of the stream
``(seed, step, stream, distribution)`` is a pure function of ``(i, j)``. ``row_offset``
and ``col_offset`` select the sub-matrix an op works on, so
``project(g, dim, row_offset=r, col_offset=k)[j] == sum_i P[r + i, k + j] * g[i]``.

The products (also ``rbd_cuda.project`` etc.): ``project``, ``expand``, ``expand_``,
``project_grouped``, ``expand_grouped_`` (over a ``SegmentPlan``, built once); for tests and debugging, ``materialize`` (the matrix
itself) and ``philox4x32`` (the raw generator). Which kernels run, and facts about the build:
``rbd_cuda.backends``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _C  # noqa: F401  (loading the extension registers torch.ops.rbd_cuda)

__all__ = ["DISTRIBUTIONS", "Distribution", "SegmentPlan", "expand", "expand_", "expand_grouped_", "materialize",
           "philox4x32", "project", "project_grouped"]

Distribution = Literal["normal", "uniform", "rademacher"]
DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform", "rademacher")

_SEED_MIN = -(2**63)
_SEED_MAX = 2**64  # exclusive


def _seed_to_int64(seed: int) -> int:
    """Map any 64-bit seed (signed or unsigned) to the int64 holding the same bits."""
    seed = as_int("seed", seed)
    if not _SEED_MIN <= seed < _SEED_MAX:
        raise ValueError(f"rbd_cuda: seed must fit in 64 bits, i.e. in [-2**63, 2**64), got {seed}")
    return int64_seed(seed)


def int64_seed(seed: int) -> int:
    """The int64 holding the bits of a seed already known to lie in [-2**63, 2**64) (the ops take that)."""
    return seed - 2**64 if seed >= 2**63 else seed


def as_int(name: str, value, *, minimum: int | None = None, error: type[Exception] = TypeError) -> int:
    """``value`` as a plain int: an int or a numpy integer (``operator.index``), never a bool, a
    float (refused rather than truncated) or a string; with ``minimum``, at least that. The
    library's one integer check, its message naming ``name``; ``error`` is what a non-integer
    raises (``ValueError`` where a saved or configured value is wrong rather than of a wrong type
    to a caller)."""
    bound = "" if minimum is None else f" >= {minimum}"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except (TypeError, RuntimeError):  # RuntimeError: a tensor of several entries
        raise error(f"rbd_cuda: {name} must be an int{bound}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"rbd_cuda: {name} must be an int{bound}, got {value!r}")
    return number


def _stream_kwargs(seed, step, stream, distribution, row_offset, col_offset) -> dict:
    """The stream keywords as the ops take them: the integers converted (``as_int``), the seed as
    the int64 holding its 64 bits. Every rule on them (ranges, the stream's row and column range,
    the distribution) is the C++ ops' (``make_stream_args``, csrc/common.h), checked once there,
    for the wrappers' callers and ``torch.ops.rbd_cuda``'s alike."""
    return {"seed": _seed_to_int64(seed), "step": as_int("step", step), "stream": as_int("stream", stream),
            "distribution": distribution, "row_offset": as_int("row_offset", row_offset),
            "col_offset": as_int("col_offset", col_offset)}


def _dense(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` if the kernels can read it: a dense (strided), unquantized tensor (the dispatcher
    would raise NotImplementedError for the others, naming no argument)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rbd_cuda: {name} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"rbd_cuda: {name} must be a dense tensor, got a {t.layout} one (use .to_dense())")
    if t.is_quantized:
        raise ValueError(f"rbd_cuda: {name} must not be quantized (use .dequantize())")
    return t


def project(
    g: torch.Tensor,
    dim: int,
    *,
    seed: int,
    step: int = 0,
    stream: int = 0,
    distribution: Distribution = "normal",
    row_offset: int = 0,
    col_offset: int = 0,
) -> torch.Tensor:
    """Coefficients ``c = Pᵀ g`` of ``g`` on ``dim`` random directions.

    ``g`` (any shape, fp32/fp16/bf16) is flattened to length D; returns a 1-D tensor
    of length ``dim`` with ``g``'s dtype and device, accumulated in fp32:
    ``c[j] = sum_i P[row_offset + i, col_offset + j] * g[i]``. P is generated on the fly.
    """
    kw = _stream_kwargs(seed, step, stream, distribution, row_offset, col_offset)
    return _differentiable("project", _dense("g", g), as_int("dim", dim), kw)


def expand(
    c: torch.Tensor,
    numel: int,
    *,
    seed: int,
    step: int = 0,
    stream: int = 0,
    distribution: Distribution = "normal",
    row_offset: int = 0,
    col_offset: int = 0,
) -> torch.Tensor:
    """The vector ``u = P c`` of length ``numel`` (``c`` is 1-D, one coefficient per direction).

    ``u[i] = sum_j P[row_offset + i, col_offset + j] * c[j]``, accumulated in fp32 and
    returned in ``c``'s dtype on ``c``'s device.
    """
    kw = _stream_kwargs(seed, step, stream, distribution, row_offset, col_offset)
    return _differentiable("expand", _dense("c", c), as_int("numel", numel), kw)


def expand_(
    out: torch.Tensor,
    c: torch.Tensor,
    alpha: float = 1.0,
    *,
    seed: int,
    step: int = 0,
    stream: int = 0,
    distribution: Distribution = "normal",
    row_offset: int = 0,
    col_offset: int = 0,
) -> torch.Tensor:
    """In place ``out += alpha * P c`` (``out`` contiguous, any shape, flattened); returns ``out``.

    No temporary of ``out``'s size is created: this is the optimizer's update.
    The sum is formed in fp32 and rounded to ``out``'s dtype once per element. ``c`` gets no
    gradient (use ``expand`` to differentiate): a ``c`` that requires one is refused in grad mode.
    """
    _dense("out", out)
    _no_gradient_to("expand_", _dense("c", c))
    torch.ops.rbd_cuda.expand_(
        out,
        c,
        float(alpha),
        **_stream_kwargs(seed, step, stream, distribution, row_offset, col_offset),
    )
    return out


def _no_gradient_to(op: str, c: torch.Tensor) -> None:
    # The in-place ops are not differentiable: c.grad would stay None without a word.
    if c.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"rbd_cuda: {op} does not carry a gradient to c, which requires grad: use expand "
                         "(out + expand(c, ...)) to differentiate, or pass c.detach()")


def materialize(
    numel: int,
    dim: int,
    *,
    seed: int,
    step: int = 0,
    stream: int = 0,
    distribution: Distribution = "normal",
    row_offset: int = 0,
    col_offset: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The sub-matrix ``P[row_offset : row_offset + numel, col_offset : col_offset + dim]``.

    For tests and debugging: this is the D×d matrix the other ops never store.
    """
    return torch.ops.rbd_cuda.materialize(
        as_int("numel", numel),
        as_int("dim", dim),
        **_stream_kwargs(seed, step, stream, distribution, row_offset, col_offset),
        dtype=dtype,
        device=torch.device(device) if device is not None else None,
    )


def philox4x32(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Raw Philox4x32-``rounds`` blocks (debugging and known-answer tests).

    ``counter``: int64 (N, 4) and ``key``: int64 (N, 2), each word in [0, 2**32);
    returns int64 (N, 4). Runs the same header code as the kernels.
    """
    return torch.ops.rbd_cuda.philox4x32(counter, key, as_int("rounds", rounds))


# ---- fake kernels: shapes and dtypes only, for torch.compile / meta tensors ----


@torch.library.register_fake("rbd_cuda::project")
def _project_fake(g, dim, *, seed, step=0, stream=0, distribution="normal", row_offset=0, col_offset=0):
    torch._check(dim > 0, lambda: f"rbd_cuda: dim must be positive, got {dim}")
    return g.new_empty((dim,))


@torch.library.register_fake("rbd_cuda::expand")
def _expand_fake(c, numel, *, seed, step=0, stream=0, distribution="normal", row_offset=0, col_offset=0):
    torch._check(numel >= 0, lambda: f"rbd_cuda: numel must be non-negative, got {numel}")
    return c.new_empty((numel,))


@torch.library.register_fake("rbd_cuda::expand_")
def _expand_inplace_fake(out, c, alpha=1.0, *, seed, step=0, stream=0, distribution="normal",
                         row_offset=0, col_offset=0):
    return None


@torch.library.register_fake("rbd_cuda::materialize_")
def _materialize_inplace_fake(out, *, seed, step=0, stream=0, distribution="normal", row_offset=0,
                              col_offset=0):
    return None


@torch.library.register_fake("rbd_cuda::philox4x32")
def _philox_fake(counter, key, rounds=10):
    return torch.empty_like(counter)


# ---- derivatives: project and expand are each other's adjoint ------------------------------
#   c = Pᵀ g  =>  ∂L/∂g = P ∂L/∂c = expand(∂L/∂c)
#   u = P c   =>  ∂L/∂c = Pᵀ ∂L/∂u = project(∂L/∂u)
# The same stream keywords address the same P, so the backward regenerates it (never stored).


# Forward mode (jvp, forward_ad: the tangent of a linear map is the map of the tangent) and
# torch.func (grad, jacrev, vmap) need an autograd.Function, which register_autograd (below, for
# reverse mode and for callers of torch.ops.rbd_cuda) does not give: the wrappers ``project`` and
# ``expand`` use this one when such a transform is active.
_KEYS = ("seed", "step", "stream", "distribution", "row_offset", "col_offset")


def forward_transform_active() -> bool:
    """Whether forward AD or a torch.func transform is active, outside torch.compile: then, and
    only then, the products go through an autograd.Function with a custom jvp. Elsewhere they do
    not: such a Function costs about 0.1 ms a call (much of a small optimizer step), and
    torch.compile cannot trace a custom jvp."""
    return not torch.compiler.is_compiling() and (_forward_ad._current_level >= 0
                                                  or torch._C._functorch.maybe_current_level() is not None)


def _differentiable(name: str, x: torch.Tensor, size: int, kw: dict) -> torch.Tensor:
    # The op is called directly, reverse mode then using its registered backward, unless a
    # forward transform needs the jvp.
    if not forward_transform_active():
        return getattr(torch.ops.rbd_cuda, name)(x, size, **kw)
    return _Linear.apply(x, name, size, *(kw[k] for k in _KEYS))


class _Linear(torch.autograd.Function):
    """``op(x, size, **keys)`` for op = project or expand: the derivative is the adjoint op (the
    other one) of the incoming gradient, the tangent the op itself of the incoming tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, name, size, *keys):
        return getattr(torch.ops.rbd_cuda, name)(x, size, **dict(zip(_KEYS, keys, strict=True)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.name, ctx.size, *ctx.keys = inputs
        ctx.shape, ctx.dtype = x.shape, x.dtype

    @staticmethod
    def backward(ctx, grad):
        adjoint = "expand" if ctx.name == "project" else "project"
        grad_x = _Linear.apply(grad.contiguous(), adjoint, math.prod(ctx.shape), *ctx.keys)
        return (grad_x.reshape(ctx.shape).to(ctx.dtype), None, None, *(None for _ in _KEYS))

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _Linear.apply(tangent.contiguous(), ctx.name, ctx.size, *ctx.keys)


def _save_stream(ctx, inputs, keyword_only_inputs, output):
    ctx.stream = dict(keyword_only_inputs)
    ctx.shape, ctx.dtype = inputs[0].shape, inputs[0].dtype


def _project_backward(ctx, grad_c):
    numel = math.prod(ctx.shape)
    grad_g = torch.ops.rbd_cuda.expand(grad_c.contiguous(), numel, **ctx.stream)
    return grad_g.reshape(ctx.shape).to(ctx.dtype), None


def _expand_backward(ctx, grad_u):
    grad_c = torch.ops.rbd_cuda.project(grad_u.contiguous(), ctx.shape[0], **ctx.stream)
    return grad_c.to(ctx.dtype), None


torch.library.register_autograd("rbd_cuda::project", _project_backward, setup_context=_save_stream)
torch.library.register_autograd("rbd_cuda::expand", _expand_backward, setup_context=_save_stream)


# ---- grouped ops: one call (one launch with the CUDA kernels) over a segment table ------------
#
# Segment s is the flattened tensor g[s] (or out[s]) of plan.numels[s] entries at rows
# plan.row_offsets[s] of compartment plan.compartments[s]'s matrix; compartment k has
# plan.dims[k] directions on stream plan.streams[k] (the other stream keywords are shared). The
# coefficients of all compartments are one fp32 vector, compartment k's at
# [sum(dims[:k]), sum(dims[:k + 1])). An optimizer builds its plans once; a step is
#     c = project_grouped(grads, plan, ...); expand_grouped_(params, c, alphas, plan, ...)
# whatever the number of tensors and compartments.


class SegmentPlan:
    """The segment table of the grouped ops: built and validated once, in C++
    (``torch.ops.rbd_cuda.segment_table``), and held as ``table``, the int64 tensor the ops take
    (as variable-length attention kernels take ``cu_seqlens``); the ops then check only what a call
    brings (the tensors against the table, the coefficients, the stream keywords).

    Per segment s: ``numels[s]`` entries at rows ``row_offsets[s]`` of compartment
    ``compartments[s]``; per compartment k: ``dims[k]`` directions on stream ``streams[k]``. Any
    int sequences are accepted and kept as tuples of ints; ``total`` is ``sum(dims)``. Immutable:
    what was checked stays what is used (the ops refuse a table tensor changed since).
    """

    __slots__ = ("compartments", "dims", "numels", "row_offsets", "streams", "table", "total")

    def __init__(self, numels, row_offsets, compartments, dims, streams):
        lists = {name: tuple(as_int(f"{name}[{i}]", v) for i, v in enumerate(values)) for name, values in
                 (("numels", numels), ("row_offsets", row_offsets), ("compartments", compartments), ("dims", dims),
                  ("streams", streams))}
        table = torch.ops.rbd_cuda.segment_table(*lists.values())
        for name, values in lists.items():
            object.__setattr__(self, name, values)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "total", int(table[3]))

    def __setattr__(self, name, value):
        raise AttributeError(f"rbd_cuda: a SegmentPlan is immutable (build another); cannot set {name}")

    def __reduce__(self):  # copies and pickles rebuild the table (and check it) from the lists
        return SegmentPlan, (self.numels, self.row_offsets, self.compartments, self.dims, self.streams)

    def __repr__(self) -> str:
        return (f"SegmentPlan(numels={self.numels}, row_offsets={self.row_offsets}, compartments={self.compartments}, "
                f"dims={self.dims}, streams={self.streams})")

    def select(self, segments: Sequence[int]) -> SegmentPlan:
        """The plan of the segments at indices ``segments`` (in that order), all compartments kept."""
        segments = [as_int(f"segments[{i}]", s) for i, s in enumerate(segments)]
        for i, s in enumerate(segments):
            # A negative index would silently take a segment from the end.
            if not 0 <= s < len(self.numels):
                raise ValueError(f"rbd_cuda: segments[{i}] must be in [0, {len(self.numels)}), got {s}")
        return SegmentPlan([self.numels[s] for s in segments], [self.row_offsets[s] for s in segments],
                           [self.compartments[s] for s in segments], self.dims, self.streams)


def _plan_of(plan) -> SegmentPlan:
    if not isinstance(plan, SegmentPlan):
        raise TypeError(f"rbd_cuda: plan must be a SegmentPlan, got {type(plan).__name__}")
    return plan


def _table_keywords(seed, step, distribution) -> dict:
    """The grouped ops' stream keywords as the ops take them (the ops check their ranges)."""
    return {"seed": _seed_to_int64(seed), "step": as_int("step", step), "distribution": distribution}


def project_grouped(g, plan: SegmentPlan, *, seed: int, step: int = 0,
                    distribution: Distribution = "normal") -> torch.Tensor:
    """Coefficients of every compartment of ``plan`` in one fp32 vector of length ``plan.total``.

    ``g``: one tensor per segment of ``plan`` (one dtype, one device, any shape, flattened).
    Compartment k's coefficients are the sum over its segments s, in list order, of
    ``project(g[s].float(), dims[k], row_offset=row_offsets[s], stream=streams[k], ...)``, bit for
    bit on each device; a compartment without segments gets zeros. Differentiable in ``g`` (the
    derivative is the adjoint, ``expand`` of each compartment's incoming gradient).
    """
    plan = _plan_of(plan)
    g = [_dense(f"g[{s}]", t) for s, t in enumerate(g)]
    return torch.ops.rbd_cuda.project_grouped(g, plan.table, plan.total, **_table_keywords(seed, step, distribution))


def expand_grouped_(out, c: torch.Tensor, alphas, plan: SegmentPlan, *, seed: int, step: int = 0,
                    distribution: Distribution = "normal"):
    """In place ``out[s] += alphas[s] * P_k c_k`` for every segment s of ``plan`` (k =
    ``plan.compartments[s]``); returns ``out``.

    Each segment gets exactly what ``expand_(out[s], c_k, alphas[s], row_offset=row_offsets[s],
    stream=streams[k], ...)`` gives it; ``c`` holds ``plan.total`` coefficients, laid out as
    ``project_grouped`` returns them. The tensors of ``out`` (contiguous, one dtype, one device)
    must not overlap.
    """
    plan = _plan_of(plan)
    tensors = [_dense(f"out[{s}]", t) for s, t in enumerate(out)]
    _no_gradient_to("expand_grouped_", _dense("c", c))
    torch.ops.rbd_cuda.expand_grouped_(tensors, c, [float(a) for a in alphas], plan.table,
                                       **_table_keywords(seed, step, distribution))
    return out


@torch.library.register_fake("rbd_cuda::project_grouped")
def _project_grouped_fake(g, table, total, *, seed, step=0, distribution="normal"):
    return g[0].new_empty((total,), dtype=torch.float32)


def _save_segment_table(ctx, inputs, keyword_only_inputs, output):
    g, ctx.table, _ = inputs
    ctx.stream = dict(keyword_only_inputs)
    ctx.shapes, ctx.dtype = [t.shape for t in g], g[0].dtype


def _project_grouped_backward(ctx, grad_c):
    # c_k = Σ_s P_sᵀ g_s over compartment k's segments, so ∂L/∂g_s = P_s ∂L/∂c_k: each segment's
    # expand, in one call into zeros (what expand is, bit for bit).
    grads = [grad_c.new_zeros(math.prod(shape)) for shape in ctx.shapes]
    torch.ops.rbd_cuda.expand_grouped_(grads, grad_c, [1.0] * len(grads), ctx.table, **ctx.stream)
    return [grad.reshape(shape).to(ctx.dtype) for grad, shape in zip(grads, ctx.shapes, strict=True)], None, None


torch.library.register_autograd("rbd_cuda::project_grouped", _project_grouped_backward,
                                setup_context=_save_segment_table)


@torch.library.register_fake("rbd_cuda::expand_grouped_")
def _expand_grouped_fake(out, c, alphas, table, *, seed, step=0, distribution="normal"):
    return None

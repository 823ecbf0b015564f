"""Typed wrappers over ``torch.ops.rbd_cuda`` and the fake kernels torch.compile traces with.

The random matrix P is addressed, never stored: entry ``P[i, j]`` of the stream
``(seed, step, stream, distribution)`` is a pure function of ``(i, j)``. ``row_offset``
and ``col_offset`` select the sub-matrix an op works on, so
``project(g, dim, row_offset=r, col_offset=k)[j] == sum_i P[r + i, k + j] * g[i]``.
"""

from __future__ import annotations

import math
import operator
from typing import Literal

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _C  # noqa: F401  (loading the extension registers torch.ops.rbd_cuda)

Distribution = Literal["normal", "uniform", "rademacher"]
DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform", "rademacher")

_SEED_MIN = -(2**63)
_SEED_MAX = 2**64  # exclusive


def _seed_to_int64(seed: int) -> int:
    """Map any 64-bit seed (signed or unsigned) to the int64 holding the same bits."""
    seed = _integer("seed", seed)
    if not _SEED_MIN <= seed < _SEED_MAX:
        raise ValueError(f"rbd_cuda: seed must fit in 64 bits, i.e. in [-2**63, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def _integer(name: str, value) -> int:
    """An integer argument as int; floats are refused rather than truncated."""
    if isinstance(value, bool):
        raise TypeError(f"rbd_cuda: {name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"rbd_cuda: {name} must be an int, got {type(value).__name__}") from None


def _stream_kwargs(numel, dim, seed, step, stream, distribution, row_offset, col_offset) -> dict:
    """Validated keyword arguments for the ops, for a sub-matrix of ``numel`` rows and ``dim`` columns.

    The C++ ops check the same conditions (for callers of ``torch.ops.rbd_cuda`` directly);
    checking here first gives a plain Python traceback. It also keeps bad scalars away from C++
    error paths: with torch 2.11 on an H200 machine one of those crashed the process inside the
    exception machinery instead of raising (benchmarks/README.md, "Known problems").
    """
    numel, dim = _integer("numel", numel), _integer("dim", dim)
    kw = {
        "seed": _seed_to_int64(seed),
        "step": _integer("step", step),
        "stream": _integer("stream", stream),
        "distribution": distribution,
        "row_offset": _integer("row_offset", row_offset),
        "col_offset": _integer("col_offset", col_offset),
    }
    if dim <= 0:
        raise ValueError(f"rbd_cuda: dim must be positive, got {dim}")
    if numel < 0:
        raise ValueError(f"rbd_cuda: numel must be non-negative, got {numel}")
    for name in ("step", "stream"):
        if not 0 <= kw[name] < 2**32:
            raise ValueError(f"rbd_cuda: {name} must be in [0, 2**32), got {kw[name]}")
    for name in ("row_offset", "col_offset"):
        if kw[name] < 0:
            raise ValueError(f"rbd_cuda: {name} must be non-negative, got {kw[name]}")
    if kw["row_offset"] + numel > 2**34:
        raise ValueError("rbd_cuda: row_offset + numel must be at most 2**34 (the stream's row range), "
                         f"got row_offset={kw['row_offset']}, numel={numel}")
    if kw["col_offset"] + dim > 2**32:
        raise ValueError("rbd_cuda: col_offset + dim must be at most 2**32 (the stream's column range), "
                         f"got col_offset={kw['col_offset']}, dim={dim}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"rbd_cuda: distribution must be one of 'normal', 'uniform', 'rademacher', "
                         f"got {distribution!r}")
    return kw


def _coefficient_count(c: torch.Tensor) -> int:
    if c.dim() != 1:
        raise ValueError(f"rbd_cuda: c must be 1-D (one coefficient per direction), got shape {tuple(c.shape)}")
    if c.numel() == 0:
        raise ValueError("rbd_cuda: c must hold at least one coefficient (dim > 0)")
    return c.numel()


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
    kw = _stream_kwargs(g.numel(), dim, seed, step, stream, distribution, row_offset, col_offset)
    return _differentiable("project", g, _integer("dim", dim), kw)


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
    kw = _stream_kwargs(numel, _coefficient_count(c), seed, step, stream, distribution, row_offset, col_offset)
    return _differentiable("expand", c, _integer("numel", numel), kw)


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
    The sum is formed in fp32 and rounded to ``out``'s dtype once per element.
    """
    torch.ops.rbd_cuda.expand_(
        out,
        c,
        float(alpha),
        **_stream_kwargs(out.numel(), _coefficient_count(c), seed, step, stream, distribution, row_offset,
                         col_offset),
    )
    return out


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
        _integer("numel", numel),
        _integer("dim", dim),
        **_stream_kwargs(numel, dim, seed, step, stream, distribution, row_offset, col_offset),
        dtype=dtype,
        device=torch.device(device) if device is not None else None,
    )


def philox4x32(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Raw Philox4x32-``rounds`` blocks (debugging and known-answer tests).

    ``counter``: int64 (N, 4) and ``key``: int64 (N, 2), each word in [0, 2**32);
    returns int64 (N, 4). Runs the same header code as the kernels.
    """
    return torch.ops.rbd_cuda.philox4x32(counter, key, _integer("rounds", rounds))


def built_with_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(torch.ops.rbd_cuda.built_with_cuda())


def stream_version() -> int:
    """Version of the random-stream layout: the same version gives the same matrices."""
    return int(torch.ops.rbd_cuda.stream_version())


def cpu_isa() -> str:
    """Instruction set of the CPU kernels for a call made now: ``"avx512"``, ``"avx2"`` or ``"baseline"``.

    The best one this CPU runs (``cpu_isas()[0]``), unless the environment variable
    ``RBD_CPU_ISA`` names another of ``cpu_isas()``; it is read on every call. Every path gives
    the same results bit for bit: only the speed differs.
    """
    return str(torch.ops.rbd_cuda.cpu_isa())


def cpu_isas() -> list[str]:
    """The CPU kernels' instruction sets this CPU (and build) can run, best first; always ends with ``"baseline"``."""
    return [str(name) for name in torch.ops.rbd_cuda.cpu_isas()]


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


def _differentiable(name: str, x: torch.Tensor, size: int, kw: dict) -> torch.Tensor:
    # The op is called directly, reverse mode then using its registered backward, unless forward
    # AD or a torch.func transform is active: an autograd.Function costs about 0.1 ms a call (much
    # of a small optimizer step), and torch.compile cannot trace a custom jvp.
    if torch.compiler.is_compiling() or (_forward_ad._current_level < 0
                                         and torch._C._functorch.maybe_current_level() is None):
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

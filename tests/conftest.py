"""Shared data and helpers for the rbd_cuda tests.

Tolerances for the products: the kernels accumulate in fp32 (entries exact for
uniform/rademacher, ~1e-6 absolute for normal) and round the result once to the
output dtype. So for every element we allow

    |actual - ref| <= out_rtol(dtype) * |ref| + ACC_TOL * scale + tiny(dtype)

where ``ref`` is the float64 reference and ``scale`` bounds the size of the
summed terms (``sum |P| |x|`` plus ``sum |x|`` for the normal entries' error).
A wrong entry anywhere shows up as an error of order ``|P_ij x_i|`` >> 1e-5 * scale.
"""

from __future__ import annotations

import functools

import pytest
import torch

import rbd_cuda
from rbd_cuda import reference

# Random123 known-answer vectors (DEShawResearch/random123, tests/kat_vectors, commit 9545ff6),
# copied verbatim: name rounds counter[0..3] key[0..1]   output[0..3], hex 32-bit words.
KAT_TEXT = """\
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000   5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
"""


def _parse_kat(text: str) -> list[tuple[int, list[int], list[int], list[int]]]:
    rows = []
    for line in text.splitlines():
        name, rounds, *words = line.split()
        assert name == "philox4x32" and len(words) == 10
        w = [int(x, 16) for x in words]
        rows.append((int(rounds), w[0:4], w[4:6], w[6:10]))
    return rows


KAT = _parse_kat(KAT_TEXT)
assert len(KAT) == 6

DISTRIBUTIONS = ("normal", "uniform", "rademacher")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Seeds: small, signed, both halves of the key, >= 2**63 and the extremes.
SEEDS = (0, 1, -1, 12345, 2**32, 2**32 - 1, 2**63, 2**64 - 1, -(2**63), 0x0123456789ABCDEF)

ACC_TOL = 1e-5
OUT_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TINY = {torch.float32: 1e-30, torch.float16: 1e-7, torch.bfloat16: 1e-30}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_vector(n: int, dtype=torch.float32, seed: int = 0, device="cpu",
                  scale: float = 1.0) -> torch.Tensor:
    """A reproducible N(0, scale^2) vector, rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def assert_close_to_ref(actual: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, dtype,
                        what: str = "") -> None:
    """Elementwise check described in the module docstring; shows the worst element."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref.shape)}"
    a = actual.detach().cpu().double()
    tol = OUT_RTOL[dtype] * ref.abs() + ACC_TOL * scale + TINY[dtype]
    err = (a - ref).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        k = int(bad.nonzero()[0, 0]) if a.dim() == 1 else int(bad.reshape(-1).nonzero()[0, 0])
        a_f, r_f, t_f = a.reshape(-1), ref.reshape(-1), tol.reshape(-1)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; first at {k}: "
            f"got {a_f[k].item():.9g}, reference {r_f[k].item():.9g}, tol {t_f[k].item():.3g}"
        )


@functools.lru_cache(maxsize=8)
def _ref_matrix(numel: int, dim: int, items: tuple) -> torch.Tensor:
    return reference.materialize(numel, dim, **dict(items))


def ref_matrix(numel: int, dim: int, **kw) -> torch.Tensor:
    """``reference.materialize`` (float64), cached across dtypes. Read-only."""
    return _ref_matrix(int(numel), int(dim), tuple(sorted(kw.items())))


def ref_project(g: torch.Tensor, dim: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_ref, scale) for ``project(g, dim, **kw)``."""
    g64 = g.detach().cpu().reshape(-1).double()
    P = ref_matrix(g64.numel(), dim, **kw)
    return P.T @ g64, P.abs().T @ g64.abs() + g64.abs().sum()


def ref_expand(c: torch.Tensor, numel: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_ref, scale) for ``expand(c, numel, **kw)``."""
    c64 = c.detach().cpu().double()
    P = ref_matrix(numel, c64.numel(), **kw)
    return P @ c64, P.abs() @ c64.abs() + c64.abs().sum()


def check_project(g: torch.Tensor, dim: int, **kw) -> torch.Tensor:
    c = rbd_cuda.project(g, dim, **kw)
    ref, scale = ref_project(g, dim, **kw)
    assert c.device == g.device
    assert_close_to_ref(c, ref, scale, g.dtype, f"project(numel={g.numel()}, dim={dim}, {kw})")
    return c


def check_expand(c: torch.Tensor, numel: int, **kw) -> torch.Tensor:
    u = rbd_cuda.expand(c, numel, **kw)
    ref, scale = ref_expand(c, numel, **kw)
    assert u.device == c.device
    assert_close_to_ref(u, ref, scale, c.dtype, f"expand(numel={numel}, dim={c.numel()}, {kw})")
    return u


def check_expand_(out: torch.Tensor, c: torch.Tensor, alpha: float, **kw) -> torch.Tensor:
    out0 = out.detach().cpu().reshape(-1).double()
    u, scale = ref_expand(c, out.numel(), **kw)
    res = rbd_cuda.expand_(out, c, alpha, **kw)
    assert res is out
    ref = out0 + alpha * u
    # fp32 rounding of out0 + alpha*u adds at most eps32 * |out0| beyond |ref|.
    assert_close_to_ref(out.reshape(-1), ref, abs(alpha) * scale + 0.1 * out0.abs(), out.dtype,
                        f"expand_(numel={out.numel()}, dim={c.numel()}, alpha={alpha}, {kw})")
    return out


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _devices() -> list:
    """CPU always; CUDA when a GPU is present (then marked, so `-m cuda` selects it)."""
    cuda = pytest.param("cuda", marks=pytest.mark.cuda)
    return ["cpu", cuda] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=_devices())
def device(request) -> str:
    """Every test that takes ``device`` runs on the CPU and, where a GPU is present, on CUDA.
    On a GPU machine a build without the CUDA kernels fails instead of passing on the CPU alone."""
    if request.param == "cuda" and not rbd_cuda.backends.built_with_cuda():
        pytest.fail("a CUDA GPU is present but rbd_cuda was built without its CUDA kernels "
                    "(rebuild with RBD_CUDA=1)")
    return request.param

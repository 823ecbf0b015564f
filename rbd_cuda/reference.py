"""Plain pure-torch oracle for the rbd_cuda random stream (v1) and its products.

Written to be obviously right, not fast: every entry of P is computed on its own,
straight from the layout in ``csrc/include/rbd/philox.h`` (and docs/random_stream.md), in
int64 / float64 torch arithmetic. Tests compare the fused kernels against it.

    key     = 64-bit seed, low word first
    counter = (i >> 2, j, step, stream)        normal, uniform;  output word i & 3
    counter = (i >> 2, j >> 5, step, stream)   rademacher;       word i & 3, bit j & 31 (set -> -1)

    uniform:  (x >> 8) * 2^-23 - 1
    normal:   Box-Muller on word pairs (0, 1) -> rows 4b, 4b+1 and (2, 3) -> rows 4b+2, 4b+3:
              u1 = ((a >> 8) + 1) * 2^-24,  v = (b >> 8) * 2^-23 - 1,
              z0 = sqrt(-2 ln u1) cos(pi v) (even row),  z1 = sqrt(-2 ln u1) sin(pi v) (odd row)

Only small matrices should be materialised here (a few million entries at most).
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MAX_ROWS = 2**34
MAX_COLS = 2**32
DISTRIBUTIONS = ("normal", "uniform", "rademacher")


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, a and b in [0, 2**32).

    a * b can reach 2**64, beyond int64, so b is split into 16-bit halves:
    a * b = a * b_hi * 2**16 + a * b_lo with both partial products below 2**48.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # < 2**48 each
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # product minus its top bits, < 2**49
    lo = t & MASK32
    hi = (p_hi >> 16) + (t >> 32)  # < 2**32 as the true high word is
    return hi, lo


def philox4x32(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Philox4x32-``rounds``: int64 ``counter`` (N, 4), ``key`` (N, 2) -> int64 (N, 4).

    Every word is in [0, 2**32). Same convention as ``rbd_cuda.ops.philox4x32``.
    """
    if rounds not in (7, 10):
        raise ValueError(f"rounds must be 7 or 10, got {rounds}")
    counter = counter.to(torch.int64)
    key = key.to(torch.int64)
    c0, c1, c2, c3 = (counter[:, w] & MASK32 for w in range(4))
    k0, k1 = key[:, 0] & MASK32, key[:, 1] & MASK32
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=1)


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key (low word, high word) of a seed in [-2**63, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    s = seed & (2**64 - 1)  # two's complement for negative seeds
    return s & MASK32, s >> 32


def _check(numel, dim, step, stream, distribution, row_offset, col_offset):
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if numel < 0:
        raise ValueError(f"numel must be non-negative, got {numel}")
    if not (0 <= step < 2**32 and 0 <= stream < 2**32):
        raise ValueError(f"step and stream must be in [0, 2**32), got {step}, {stream}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}")
    if row_offset < 0 or row_offset + numel > MAX_ROWS:
        raise ValueError(f"rows [{row_offset}, {row_offset + numel}) outside [0, 2**34)")
    if col_offset < 0 or col_offset + dim > MAX_COLS:
        raise ValueError(f"columns [{col_offset}, {col_offset + dim}) outside [0, 2**32)")


def materialize(
    numel: int,
    dim: int,
    *,
    seed: int,
    step: int = 0,
    stream: int = 0,
    distribution: str = "normal",
    row_offset: int = 0,
    col_offset: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``P[row_offset : row_offset + numel, col_offset : col_offset + dim]``, in float64."""
    _check(numel, dim, step, stream, distribution, row_offset, col_offset)
    k0, k1 = seed_key(seed)
    i = torch.arange(row_offset, row_offset + numel, dtype=torch.int64)
    j = torch.arange(col_offset, col_offset + dim, dtype=torch.int64)
    ii, jj = (t.reshape(-1) for t in torch.meshgrid(i, j, indexing="ij"))
    n = ii.numel()
    col_word = (jj >> 5) if distribution == "rademacher" else jj
    counter = torch.stack(
        [ii >> 2, col_word, torch.full_like(ii, step), torch.full_like(ii, stream)], dim=1
    )
    key = torch.tensor([[k0, k1]], dtype=torch.int64).expand(n, 2)
    words = philox4x32(counter, key, rounds=10)  # (n, 4)
    w = ii & 3  # the output word of each entry

    def word(idx: torch.Tensor) -> torch.Tensor:
        return words.gather(1, idx[:, None])[:, 0]

    if distribution == "rademacher":
        bit = (word(w) >> (jj & 31)) & 1
        out = 1.0 - 2.0 * bit.to(torch.float64)
    elif distribution == "uniform":
        out = (word(w) >> 8).to(torch.float64) * 2.0**-23 - 1.0
    else:  # normal: words (2p, 2p + 1) feed rows 4b + 2p (cos) and 4b + 2p + 1 (sin)
        pair = w >> 1
        a, b = word(2 * pair), word(2 * pair + 1)
        u1 = ((a >> 8) + 1).to(torch.float64) * 2.0**-24
        v = (b >> 8).to(torch.float64) * 2.0**-23 - 1.0
        radius = torch.sqrt(-2.0 * torch.log(u1))
        z0, z1 = radius * torch.cos(math.pi * v), radius * torch.sin(math.pi * v)
        out = torch.where((w & 1) == 0, z0, z1)
    return out.reshape(numel, dim).to(dtype)


def project(g: torch.Tensor, dim: int, **kw) -> torch.Tensor:
    """``c = Pᵀ g`` in float64 (``g`` flattened)."""
    g = g.reshape(-1).to(torch.float64)
    return materialize(g.numel(), dim, **kw).T @ g


def expand(c: torch.Tensor, numel: int, **kw) -> torch.Tensor:
    """``u = P c`` in float64 (``c`` 1-D)."""
    c = c.to(torch.float64)
    return materialize(numel, c.numel(), **kw) @ c

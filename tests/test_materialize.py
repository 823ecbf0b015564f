"""materialize(): entries against the reference, sub-matrix addressing, and the statistics of P."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import DISTRIBUTIONS, SEEDS

import rbd_cuda
from rbd_cuda import reference

# (numel, dim, row_offset, col_offset, step, stream): odd shapes, offsets off the 4-row blocks
# and 32-column Rademacher groups, extreme step/stream words.
CASES = [
    (1, 1, 0, 0, 0, 0),
    (3, 5, 1, 3, 1, 0),
    (7, 33, 2, 31, 0, 1),
    (37, 70, 5, 37, 2**32 - 1, 2**32 - 1),
    (101, 17, 4099, 1_000_003, 12345, 77),
    (16, 97, 2**34 - 16, 2**32 - 97, 5, 6),  # the last rows and columns of the stream
    (5, 40, 3, 2**32 - 40, 0, 3),
]


def _kw(seed, step, stream, dist, row_offset, col_offset):
    return {"seed": seed, "step": step, "stream": stream, "distribution": dist,
            "row_offset": row_offset, "col_offset": col_offset}


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:2])) + f"@{c[2]},{c[3]}")
@pytest.mark.parametrize("seed", [0, -1, 2**63, 2**64 - 1, -(2**63) + 5, 0x0123456789ABCDEF])
def test_matches_reference(dist, case, seed):
    numel, dim, r0, c0, step, stream = case
    kw = _kw(seed, step, stream, dist, r0, c0)
    got = rbd_cuda.ops.materialize(numel, dim, **kw)
    assert got.shape == (numel, dim) and got.dtype == torch.float32
    ref = reference.materialize(numel, dim, **kw)
    if dist == "normal":
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, ref.float()), f"max diff {(got.double() - ref).abs().max()}"
        if dist == "rademacher":
            assert set(got.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_seed_signed_unsigned_equivalence(dist):
    # A seed >= 2**63 and its two's-complement negative are the same key.
    for s in (2**63, 2**64 - 1, 2**63 + 12345):
        a = rbd_cuda.ops.materialize(9, 11, seed=s, distribution=dist)
        b = rbd_cuda.ops.materialize(9, 11, seed=s - 2**64, distribution=dist)
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_dtypes_are_casts_of_fp32(dist, dtype):
    kw = {"seed": 3, "step": 1, "distribution": dist, "row_offset": 2, "col_offset": 5}
    got = rbd_cuda.ops.materialize(13, 19, dtype=dtype, **kw)
    assert got.dtype == dtype
    assert torch.equal(got, rbd_cuda.ops.materialize(13, 19, **kw).to(dtype))


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_materialize_inplace_and_device_arg(dist):
    kw = {"seed": 5, "step": 2, "stream": 3, "distribution": dist, "row_offset": 6, "col_offset": 7}
    out = torch.full((10, 12), float("nan"))
    torch.ops.rbd_cuda.materialize_(out, **kw)
    assert torch.equal(out, rbd_cuda.ops.materialize(10, 12, device="cpu", **kw))


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_prefix_and_submatrix_exact(dist):
    kw = {"seed": -77, "step": 4, "stream": 1, "distribution": dist}
    big = rbd_cuda.ops.materialize(50, 70, **kw)
    assert torch.equal(rbd_cuda.ops.materialize(10, 5, **kw), big[:10, :5])
    assert torch.equal(rbd_cuda.ops.materialize(50, 1, **kw), big[:, :1])
    for r, c in [(1, 1), (3, 31), (5, 33), (17, 64), (49, 69)]:
        sub = rbd_cuda.ops.materialize(50 - r, 70 - c, row_offset=r, col_offset=c, **kw)
        assert torch.equal(sub, big[r:, c:]), (r, c)
        one = rbd_cuda.ops.materialize(1, 1, row_offset=r, col_offset=c, **kw)
        assert torch.equal(one, big[r:r + 1, c:c + 1])


# ---- statistics --------------------------------------------------------------------------
#
# The stream is deterministic, so a fixed seed either passes or fails for good; thresholds sit at
# 7+ standard errors of each statistic (probability < 1e-11 that a correct stream fails) while a
# wrong transform (shift off by one, wrong scale, half the words reused) misses by hundreds.

N_ROWS, N_COLS = 2**16, 32  # 2**21 entries


@pytest.fixture(scope="module")
def samples():
    return {
        d: rbd_cuda.ops.materialize(N_ROWS, N_COLS, seed=20240601, step=3, stream=1, distribution=d,
                                row_offset=1, col_offset=3, dtype=torch.float64)
        for d in DISTRIBUTIONS
    }


# mean, variance, 4th moment (kurtosis = m4 / var^2) of each law
LAW = {"normal": (0.0, 1.0, 3.0), "uniform": (0.0, 1 / 3, 1.8), "rademacher": (0.0, 1.0, 1.0)}


def _moments(x):
    x = x.reshape(-1)
    n = x.numel()
    mean = x.mean().item()
    d = x - mean
    var = (d * d).mean().item()
    skew = (d**3).mean().item() / var**1.5
    kurt = (d**4).mean().item() / var**2
    return n, mean, var, skew, kurt


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_moments(samples, dist):
    n, mean, var, skew, kurt = _moments(samples[dist])
    mu, sigma2, kappa = LAW[dist]
    se_mean = math.sqrt(sigma2 / n)
    se_var = math.sqrt((kappa - 1) * sigma2**2 / n) if dist != "rademacher" else math.sqrt(1 / n)
    assert abs(mean - mu) < 8 * se_mean, mean
    assert abs(var - sigma2) < 8 * se_var + 1e-12, var
    assert abs(skew) < 8 * math.sqrt(15 / n), skew
    assert abs(kurt - kappa) < 8 * math.sqrt(96 / n) + 1e-9, kurt
    x = samples[dist]
    assert x.min() >= -6 and x.max() <= 6
    if dist == "uniform":
        assert x.min() >= -1 and x.max() < 1
        assert x.min() < -1 + 1e-4 and x.max() > 1 - 1e-4


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_moments_per_word_and_column(samples, dist):
    # Each of the 4 output words (row i & 3) and column positions feeds entries of the same law:
    # catches e.g. a sine/cosine mix-up that makes odd rows one-signed, or a Rademacher bit
    # index that leaves some columns constant.
    x = samples[dist]
    mu, sigma2, _ = LAW[dist]
    for w in range(4):
        rows = x[(3 + w) % 4::4]  # row_offset=1: local row k is stream row k + 1
        n = rows.numel()
        assert abs(rows.mean().item() - mu) < 8 * math.sqrt(sigma2 / n), w
        se_var = math.sqrt(max(LAW[dist][2] - 1, 1e-3) * sigma2**2 / n)
        assert abs(rows.var().item() - sigma2) < 8 * se_var, w
    col_means = x.mean(dim=0)
    assert (col_means.abs() < 8 * math.sqrt(sigma2 / N_ROWS)).all(), col_means


def test_distribution_ks(samples):
    xs = samples["normal"].reshape(-1)[: 2**20].numpy()
    assert scipy.stats.kstest(xs, "norm").pvalue > 1e-6
    xs = samples["uniform"].reshape(-1)[: 2**20].numpy()
    assert scipy.stats.kstest(xs, scipy.stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-6
    # the wrong laws are rejected at this sample size
    xs = samples["normal"].reshape(-1)[: 2**20].numpy()
    assert scipy.stats.kstest(xs * 1.01, "norm").pvalue < 1e-6
    assert scipy.stats.kstest(xs, scipy.stats.uniform(loc=-1, scale=2.01).cdf).pvalue < 1e-6


def test_rademacher_fraction_and_bits(samples):
    x = samples["rademacher"]
    n = x.numel()
    frac = (x == -1).double().mean().item()
    assert abs(frac - 0.5) < 8 * 0.5 / math.sqrt(n)
    assert ((x == -1) | (x == 1)).all()
    # every bit position (column mod 32) is used: per column fraction near 1/2
    per_col = (x == -1).double().mean(dim=0)
    assert ((per_col - 0.5).abs() < 8 * 0.5 / math.sqrt(N_ROWS)).all(), per_col


def _corr(a, b):
    a = a.reshape(-1).double()
    b = b.reshape(-1).double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_within_block_independence(samples, dist):
    # Rows sharing one Philox block, and neighbouring columns, must be uncorrelated (in value
    # and in square, which catches Box-Muller pairs that share more than the radius).
    x = samples[dist][3:]  # local row 3 = stream row 4: start at a block boundary
    x = x[: (x.shape[0] // 4) * 4].reshape(-1, 4, N_COLS)
    n = x[:, 0].numel()
    lim = 6 / math.sqrt(n)
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(_corr(x[:, a], x[:, b])) < lim, (a, b)
            if dist != "rademacher":
                assert abs(_corr(x[:, a] ** 2, x[:, b] ** 2)) < lim, (a, b)
    # every pair of columns (catches a Rademacher bit index that repeats within a word)
    cols = samples[dist]
    for y in (cols, cols**2) if dist != "rademacher" else (cols,):
        r = torch.corrcoef(y.T.double())
        off = r - torch.diag(torch.diagonal(r))
        assert off.abs().max() < 6 / math.sqrt(cols.shape[0]), off.abs().max()


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_different_keys_uncorrelated(dist):
    numel, dim = 1000, 64
    n = numel * dim
    base = {"seed": 12345, "step": 7, "stream": 3, "distribution": dist}
    variants = [
        dict(base, seed=12346),
        dict(base, seed=12345 + 2**32),  # only the high key word differs
        dict(base, seed=12345 - 2**64 + 2**63),
        dict(base, step=8),
        dict(base, step=7 + 2**31),
        dict(base, stream=4),
        dict(base, stream=3 + 2**31),
        dict(base, row_offset=4),  # the next blocks of rows
        dict(base, col_offset=64),  # the next columns
    ]
    p0 = rbd_cuda.ops.materialize(numel, dim, **base)
    for v in variants:
        p1 = rbd_cuda.ops.materialize(numel, dim, **v)
        assert not torch.equal(p0, p1)
        r = _corr(p0, p1)
        assert abs(r) < 5 / math.sqrt(n), (v, r)


def test_different_seeds_differ_everywhere():
    # Not a single shared entry pattern: two seeds agree only as often as chance allows.
    a = rbd_cuda.ops.materialize(256, 64, seed=1, distribution="uniform")
    b = rbd_cuda.ops.materialize(256, 64, seed=2, distribution="uniform")
    assert (a == b).double().mean() < 1e-3


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_materialize_deterministic(dist):
    kw = _kw(99, 1, 2, dist, 3, 29)
    a = rbd_cuda.ops.materialize(3001, 45, **kw)
    b = rbd_cuda.ops.materialize(3001, 45, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_seed_words(seed):
    k0, k1 = reference.seed_key(seed)
    assert 0 <= k0 < 2**32 and 0 <= k1 < 2**32
    assert (k1 << 32 | k0) == seed % 2**64
    assert np.uint64(seed % 2**64) == np.uint64(k1) << np.uint64(32) | np.uint64(k0)

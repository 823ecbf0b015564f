"""project / expand / expand_ on every device (the ``device`` fixture: the CPU, and CUDA where a
GPU is present): against the float64 reference, and the algebra that the stream contract promises
(adjointness, prefixes, offsets, determinism)."""

import math

import pytest
import torch
from conftest import (
    DISTRIBUTIONS,
    DTYPES,
    SEEDS,
    check_expand,
    check_expand_,
    check_project,
    dtype_id,
    random_vector,
)

import rbd_cuda

# (numel, dim, row_offset, col_offset): tiny, off-block offsets, several row chunks, the maximum
# number of row chunks (> 65536 rows), dims across Rademacher groups and 16-column tiles.
SHAPES = [
    (1, 1, 0, 0),
    (3, 7, 1, 3),
    (5, 32, 4, 32),
    (4097, 33, 2, 31),
    (1030, 97, 3, 1000),
    (70_001, 5, 6, 17),
    (1001, 40, 2**34 - 1001, 2**32 - 40),  # the last rows and columns of the stream
]
SHAPE_IDS = [f"{n}x{d}@{r},{c}" for n, d, r, c in SHAPES]
STREAM = {"seed": 2**63 + 5, "step": 11, "stream": 2**32 - 2}


def assert_same_sums(a: torch.Tensor, b: torch.Tensor, device: str, what="") -> None:
    """Equal bit for bit on the CPU, whose sums run in an order fixed by the rows alone; within fp32
    rounding on CUDA, whose tiles and row chunks follow the requested columns
    (docs/random_stream.md)."""
    if device == "cpu":
        assert torch.equal(a, b), what
    else:
        scale = b.abs().max().item() + 1e-30
        assert (a - b).abs().max().item() <= 2e-5 * scale, what


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)  # varies fastest: the reference is cached
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_project_matches_reference(device, dtype, shape, dist):
    numel, dim, r0, c0 = shape
    g = random_vector(numel, dtype, seed=numel + dim, device=device)
    c = check_project(g, dim, distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    assert c.shape == (dim,)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)  # varies fastest: the reference is cached
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_expand_matches_reference(device, dtype, shape, dist):
    numel, dim, r0, c0 = shape
    c = random_vector(dim, dtype, seed=dim, device=device)
    u = check_expand(c, numel, distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    assert u.shape == (numel,)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_seeds_steps_streams_match_reference(device, seed, dist):
    for step, stream in [(0, 0), (1, 0), (0, 1), (2**32 - 1, 2**31 + 3)]:
        kw = {"seed": seed, "step": step, "stream": stream, "distribution": dist,
              "row_offset": 9, "col_offset": 45}
        check_project(random_vector(517, seed=step, device=device), 29, **kw)
        check_expand(random_vector(29, seed=stream, device=device), 517, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("alpha", [1.0, -0.37, 2.5])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", [SHAPES[k] for k in (1, 3, 4)],
                         ids=[SHAPE_IDS[k] for k in (1, 3, 4)])
def test_expand_inplace_matches_reference(device, dtype, shape, alpha, dist):
    numel, dim, r0, c0 = shape
    out = random_vector(numel, dtype, seed=1, scale=3.0, device=device)
    c = random_vector(dim, torch.float32, seed=2, device=device)
    check_expand_(out, c, alpha, distribution=dist, row_offset=r0, col_offset=c0, **STREAM)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_expand_inplace_is_out_plus_alpha_expand(device, dtype, dist):
    kw = dict(distribution=dist, row_offset=3, col_offset=9, **STREAM)
    out0 = random_vector(2001, dtype, seed=4, device=device)
    c = random_vector(21, dtype, seed=5, device=device)
    out = out0.clone()
    ret = rbd_cuda.expand_(out, c, -0.5, **kw)
    assert ret is out and ret.data_ptr() == out.data_ptr()
    # The contract: u = P c summed in fp32, then out0 + alpha * u formed in fp32 and rounded to
    # dtype once. expand() of the fp32 coefficients gives that same fp32 u.
    u32 = rbd_cuda.expand(c.float(), 2001, **kw)
    assert torch.equal(out, (out0.float() + (-0.5) * u32).to(dtype))
    # alpha = 0 leaves out bit-identical
    out = out0.clone()
    rbd_cuda.expand_(out, c, 0.0, **kw)
    assert torch.equal(out, out0)
    # alpha = 1 from zeros is expand
    out = torch.zeros(2001, dtype=dtype, device=device)
    rbd_cuda.expand_(out, c, **kw)
    assert torch.equal(out, rbd_cuda.expand(c, 2001, **kw))


def test_expand_inplace_any_shape_and_c_dtype(device):
    kw = {"seed": 3, "distribution": "normal", "row_offset": 1}
    out = random_vector(6 * 7 * 5, seed=1, device=device).reshape(6, 7, 5)
    flat = out.reshape(-1).clone()
    c = random_vector(9, torch.bfloat16, seed=2, device=device)
    rbd_cuda.expand_(out, c, 0.25, **kw)
    rbd_cuda.expand_(flat, c.float(), 0.25, **kw)
    assert out.shape == (6, 7, 5)
    assert torch.equal(out.reshape(-1), flat)


def test_project_flattens_any_shape_and_layout(device):
    kw = {"seed": -3, "step": 2, "distribution": "uniform", "row_offset": 5, "col_offset": 2}
    g = random_vector(6 * 35, seed=7, device=device).reshape(6, 35)
    ref = rbd_cuda.project(g.reshape(-1), 13, **kw)
    assert torch.equal(rbd_cuda.project(g, 13, **kw), ref)
    assert torch.equal(rbd_cuda.project(g.reshape(6, 5, 7), 13, **kw), ref)
    gt = g.T.contiguous().T  # same values, non-contiguous layout
    assert not gt.is_contiguous()
    assert torch.equal(rbd_cuda.project(gt, 13, **kw), ref)


# ---- adjointness ----------------------------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("numel,dim,r0,c0", [(1, 1, 0, 0), (4097, 33, 3, 5), (50_000, 70, 2, 40)])
def test_adjoint(device, dist, numel, dim, r0, c0):
    kw = {"seed": 42, "step": 1, "stream": 2, "distribution": dist,
          "row_offset": r0, "col_offset": c0}
    g = random_vector(numel, seed=1, device=device)
    c = random_vector(dim, seed=2, device=device)
    lhs = torch.dot(rbd_cuda.project(g, dim, **kw).double(), c.double()).item()
    rhs = torch.dot(g.double(), rbd_cuda.expand(c, numel, **kw).double()).item()
    # both are gᵀ P c; magnitude ~ |g| |c|, fp32 error ~ 1e-7 of that
    scale = g.norm().item() * c.norm().item()
    assert abs(lhs - rhs) <= 1e-5 * scale, (lhs, rhs, scale)


# ---- prefixes and offsets ---------------------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_project_prefix(device, dist):
    # Each column is its own sum: on the CPU in an order fixed by the rows, so a prefix is exact.
    g = random_vector(5003, seed=3, device=device)
    for c0 in (0, 7, 33):
        kw = {"seed": 9, "step": 4, "distribution": dist, "col_offset": c0, "row_offset": 1}
        c20 = rbd_cuda.project(g, 20, **kw)
        c200 = rbd_cuda.project(g, 200, **kw)
        assert_same_sums(rbd_cuda.project(g, 10, **kw), c20[:10], device)
        assert_same_sums(c20, c200[:20], device)
        assert_same_sums(rbd_cuda.project(g, 1, **kw), c20[:1], device)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_project_col_offset_is_column_slice(device, dist):
    g = random_vector(3001, seed=4, device=device)
    kw = {"seed": -12, "step": 2, "stream": 5, "distribution": dist, "row_offset": 2}
    big = rbd_cuda.project(g, 100, **kw)
    for k in (1, 3, 16, 31, 32, 33, 64, 90):
        part = rbd_cuda.project(g, 100 - k, col_offset=k, **kw)
        assert_same_sums(part, big[k:], device, k)
        part = rbd_cuda.project(g, 5, col_offset=k, **kw)
        assert_same_sums(part, big[k:k + 5], device, k)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_project_concatenation_with_row_offset(device, dist):
    kw = {"seed": 77, "step": 3, "stream": 1, "distribution": dist}
    for n1, n2 in [(1, 1), (5, 7), (1023, 2050), (30_001, 4099)]:
        g1, g2 = random_vector(n1, seed=n1, device=device), random_vector(n2, seed=n2 + 1, device=device)
        whole = rbd_cuda.project(torch.cat([g1, g2]), 37, **kw).double()
        parts = (rbd_cuda.project(g1, 37, **kw).double()
                 + rbd_cuda.project(g2, 37, row_offset=n1, **kw).double())
        assert (whole - parts).norm() <= 1e-5 * whole.norm() + 1e-6, (n1, n2)
        # a wrong offset is far off: the check has teeth
        wrong = (rbd_cuda.project(g1, 37, **kw).double()
                 + rbd_cuda.project(g2, 37, row_offset=n1 + 1, **kw).double())
        assert (whole - wrong).norm() > 0.1 * whole.norm()


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_expand_prefix_and_row_slices_exact(device, dist):
    kw = {"seed": 5, "step": 6, "stream": 7, "distribution": dist}
    c = random_vector(20, seed=8, device=device)
    u = rbd_cuda.expand(c, 4001, **kw)
    # rows are independent: a prefix of rows, or rows from an offset, are exact slices
    assert torch.equal(rbd_cuda.expand(c, 10, **kw), u[:10])
    for r in (1, 2, 3, 4, 5, 31, 1000, 3999):
        assert torch.equal(rbd_cuda.expand(c, 4001 - r, row_offset=r, **kw), u[r:]), r
    # a prefix block of coefficients equals the full block with the rest zeroed
    c10 = torch.cat([c[:10], torch.zeros(10, device=device)])
    assert_same_sums(rbd_cuda.expand(c[:10], 4001, **kw), rbd_cuda.expand(c10, 4001, **kw), device)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_expand_col_offset_matches_zero_padded(device, dist):
    kw = {"seed": -5, "step": 1, "distribution": dist, "row_offset": 3}
    c = random_vector(25, seed=9, device=device)
    for k in (1, 5, 16, 31, 40):
        a = rbd_cuda.expand(c, 3000, col_offset=k, **kw).double()
        b = rbd_cuda.expand(torch.cat([torch.zeros(k, device=device), c]), 3000, **kw).double()
        assert (a - b).abs().max() <= 1e-5 * c.abs().sum(), k


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_expand_inplace_split_parameter_exact(device, dist):
    # The optimizer's use: one basis spanning two tensors via row_offset.
    kw = {"seed": 1234, "step": 3, "stream": 4, "distribution": dist}
    c = random_vector(19, seed=1, device=device)
    whole = random_vector(3003, seed=2, device=device)
    p1, p2 = whole[:1001].clone(), whole[1001:].clone()
    rbd_cuda.expand_(whole, c, -0.1, **kw)
    rbd_cuda.expand_(p1, c, -0.1, **kw)
    rbd_cuda.expand_(p2, c, -0.1, row_offset=1001, **kw)
    assert torch.equal(torch.cat([p1, p2]), whole)


# ---- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_same_call_bit_identical(device, dist):
    kw = {"seed": 8, "step": 2, "stream": 1, "distribution": dist, "row_offset": 3, "col_offset": 5}
    g = random_vector(50_001, seed=1, device=device)
    c = random_vector(45, seed=2, device=device)
    assert torch.equal(rbd_cuda.project(g, 45, **kw), rbd_cuda.project(g, 45, **kw))
    assert torch.equal(rbd_cuda.expand(c, 50_001, **kw), rbd_cuda.expand(c, 50_001, **kw))
    a, b = g.clone(), g.clone()
    rbd_cuda.expand_(a, c, 0.3, **kw)
    rbd_cuda.expand_(b, c, 0.3, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_thread_count_invariance(dist, restore_threads):
    numel, dim = 300_000, 37
    kw = {"seed": -99, "step": 5, "stream": 6, "distribution": dist,
          "row_offset": 1, "col_offset": 3}
    g = random_vector(numel, seed=1)
    c = random_vector(dim, seed=2)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        out = g.clone()
        rbd_cuda.expand_(out, c, -0.7, **kw)
        results.append((rbd_cuda.project(g, dim, **kw), out))
    for proj, out in results[1:]:
        assert torch.equal(proj, results[0][0])
        assert torch.equal(out, results[0][1])


# ---- edge cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_empty(device, dtype, dist):
    kw = {"seed": 1, "distribution": dist, "row_offset": 7}
    c = rbd_cuda.project(torch.empty(0, dtype=dtype, device=device), 5, **kw)
    assert c.dtype == dtype and torch.equal(c, torch.zeros(5, dtype=dtype, device=device))
    u = rbd_cuda.expand(torch.ones(3, dtype=dtype, device=device), 0, **kw)
    assert u.dtype == dtype and u.shape == (0,)
    out = torch.empty(0, dtype=dtype, device=device)
    assert rbd_cuda.expand_(out, torch.ones(3, dtype=dtype, device=device), **kw) is out


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_propagates(device, dist, bad):
    kw = {"seed": 3, "distribution": dist, "row_offset": 2, "col_offset": 1}
    g = random_vector(1000, seed=1, device=device)
    g[517] = bad
    c = rbd_cuda.project(g, 40, **kw)
    assert not torch.isfinite(c).any(), c  # every column sums the bad row
    if math.isnan(bad):
        assert torch.isnan(c).all()
    cc = random_vector(40, seed=2, device=device)
    cc[13] = bad
    u = rbd_cuda.expand(cc, 1000, **kw)
    assert not torch.isfinite(u).any()
    out = random_vector(1000, seed=3, device=device)
    out[5] = bad
    rbd_cuda.expand_(out, random_vector(40, seed=4, device=device), **kw)
    assert not math.isfinite(out[5].item())
    assert torch.isfinite(torch.cat([out[:5], out[6:]])).all()


def test_large_values_fp16_round_once(device):
    # expand_ rounds out + alpha*u once: adding a tiny update to a large fp16 value may be lost,
    # but must never be rounded through an fp16 temporary of alpha*u.
    kw = {"seed": 0, "distribution": "rademacher"}
    out = torch.full((64,), 1024.0, dtype=torch.float16, device=device)  # fp16 spacing here is 1.0
    c = torch.full((4,), 0.1875, device=device)  # |P c| in {0, 0.375, 0.75}, alpha*u = 0.75 rounds up to 1 step
    rbd_cuda.expand_(out, c, 1.0, **kw)
    u = rbd_cuda.expand(c, 64, **kw)
    assert torch.equal(out, (1024.0 + u).half())


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_expand_inplace_with_c_a_view_of_out(device, dist):
    # c is read as it was before the update, even when it aliases out.
    x = random_vector(1000, seed=9, device=device)
    expected = x.clone()
    rbd_cuda.expand_(expected, x[:7].clone(), 0.5, seed=3, distribution=dist)
    rbd_cuda.expand_(x, x[:7], 0.5, seed=3, distribution=dist)
    assert torch.equal(x, expected)

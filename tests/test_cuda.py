"""CUDA kernels against the CPU kernels (the CPU side is itself checked against the reference).

Only what compares the two devices, or concerns CUDA alone, lives here: the op tests
(test_products.py, test_grouped.py, ...) run on CUDA through the ``device`` fixture.

Skipped when no GPU is present. When a GPU is present, every test here FAILS (does not skip) if
the extension was built without its CUDA kernels: a CPU-only build on a GPU machine is a
broken install, not a reason to pass.

Contract checked: the integer stream is identical on both devices (uniform and rademacher
entries bit-exact, normal within 1e-5 + 2e-7/|z| since the transcendentals differ); products agree within
float tolerance; CUDA results are deterministic run to run; every output element is written.
"""

import pytest
import torch
from conftest import DISTRIBUTIONS, DTYPES, KAT, dtype_id, random_vector

import rbd_cuda

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = "cuda"  # the device under test
ERR = (ValueError, RuntimeError)


@pytest.fixture(autouse=True)
def _require_cuda_kernels():
    if not rbd_cuda.backends.built_with_cuda():
        pytest.fail("a CUDA GPU is present but rbd_cuda was built without its CUDA kernels "
                    "(rebuild with RBD_CUDA=1)")


def test_built_with_cuda():
    assert rbd_cuda.backends.built_with_cuda()


# (numel, dim, row_offset, col_offset): sizes 1, 3, 4097, 1_000_003 and dims 1, 7, 33, 256, with
# offsets that are not multiples of 4 (row blocks) or 32 (Rademacher column groups).
SHAPES = [
    (1, 1, 0, 0),
    (1, 33, 3, 32),
    (3, 7, 1, 3),
    (3, 256, 2, 1),
    (4097, 33, 2, 31),
    (4097, 256, 0, 0),
    (1_000_003, 1, 3, 0),
    (1_000_003, 7, 5, 33),
    (1_000_003, 33, 0, 5),
    (1_000_003, 256, 7, 61),
]
SHAPE_IDS = [f"{n}x{d}@{r},{c}" for n, d, r, c in SHAPES]
STREAM = {"seed": 2**63 + 12345, "step": 77, "stream": 2**32 - 3}

# Norm-relative and elementwise tolerances for CUDA vs CPU products (both accumulate in fp32 in
# different orders, then round once to the output dtype).
NORM_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_matches_cpu(got: torch.Tensor, cpu: torch.Tensor, what: str = "") -> None:
    assert got.device.type == torch.device(CUDA).type, what
    assert got.dtype == cpu.dtype and got.shape == cpu.shape, (what, got.dtype, got.shape)
    a, b = got.cpu().double(), cpu.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite output"
    if b.numel() == 0:
        return
    eps = torch.finfo(cpu.dtype).eps
    rms = b.pow(2).mean().sqrt().item()
    err = (a - b).abs()
    assert (a - b).norm() <= NORM_RTOL[cpu.dtype] * b.norm() + 1e-30, (
        f"{what}: relative error {((a - b).norm() / b.norm()).item():.3g}")
    tol = 2 * eps * b.abs() + 1e-4 * rms + 1e-7
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements off; worst "
                           f"{err.max().item():.3g} (rms {rms:.3g})")


def assert_normal_entries_close(got: torch.Tensor, cpu: torch.Tensor) -> None:
    """CUDA normal entries use the SFU log2, whose ~2^-22 absolute error moves the Box–Muller
    radius r by ~1.7e-7 / r; with |z| <= r that bounds the error by 1e-5 + 2e-7 / |z|."""
    assert torch.isfinite(got).all()
    err = (got.double() - cpu.double()).abs()
    bound = 1e-5 + 2e-7 / cpu.double().abs().clamp_min(1e-12)
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} normal entries off; worst error {err.max().item():.3g}"
    assert err.max() <= 1e-3  # the radius error is at most ~4e-4 at any u1
    assert (err > 1e-5).double().mean() <= 1e-3  # only entries with a tiny radius exceed 1e-5


def poison_cache(numel: int, dtype=torch.float32) -> None:
    """Leave NaN in the caching allocator's free blocks so an unwritten output shows up."""
    blocks = [torch.full((max(numel, 1) + k,), float("nan"), dtype=dtype, device=CUDA)
              for k in (0, 1, 512)]
    torch.cuda.synchronize()
    del blocks


# ---- Philox and materialize -------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [7, 10])
def test_philox_known_answers(rounds):
    rows = [r for r in KAT if r[0] == rounds]
    counter = torch.tensor([r[1] for r in rows], dtype=torch.int64, device=CUDA)
    key = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=CUDA)
    out = rbd_cuda.ops.philox4x32(counter, key, rounds)
    assert out.device.type == torch.device(CUDA).type and out.dtype == torch.int64
    assert out.cpu().tolist() == [r[3] for r in rows]


@pytest.mark.parametrize("rounds", [7, 10])
def test_philox_random_words_match_cpu(rounds):
    gen = torch.Generator().manual_seed(rounds)
    counter = torch.randint(0, 2**32, (100_003, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (100_003, 2), generator=gen, dtype=torch.int64)
    got = rbd_cuda.ops.philox4x32(counter.to(CUDA), key.to(CUDA), rounds)
    assert torch.equal(got.cpu(), rbd_cuda.ops.philox4x32(counter, key, rounds))


MAT_SHAPES = [(1, 1, 0, 0), (3, 7, 1, 3), (4097, 33, 2, 31), (257, 256, 5, 61),
              (1_000_003, 1, 3, 0),
              (64, 100, 2**34 - 64, 2**32 - 100)]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", MAT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}@{s[2]},{s[3]}")
def test_materialize_matches_cpu(shape, dist):
    numel, dim, r0, c0 = shape
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    poison_cache(numel * dim)
    got = rbd_cuda.ops.materialize(numel, dim, device=CUDA, **kw)
    cpu = rbd_cuda.ops.materialize(numel, dim, **kw)
    assert got.device.type == torch.device(CUDA).type
    assert got.dtype == torch.float32 and got.shape == (numel, dim)
    got = got.cpu()
    if dist == "normal":
        assert_normal_entries_close(got, cpu)
    else:
        assert torch.equal(got, cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_materialize_dtypes_bit_exact(dist, dtype):
    kw = dict(distribution=dist, row_offset=3, col_offset=7, **STREAM)
    got = rbd_cuda.ops.materialize(1001, 45, dtype=dtype, device=CUDA, **kw)
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), rbd_cuda.ops.materialize(1001, 45, dtype=dtype, **kw))


@pytest.mark.parametrize("seed", [0, -1, 2**63, 2**64 - 1, 0x0123456789ABCDEF])
def test_materialize_seeds_steps_streams(seed):
    for step, stream in [(0, 0), (1, 2**32 - 1), (2**32 - 1, 5)]:
        kw = {"seed": seed, "step": step, "stream": stream, "distribution": "uniform",
              "row_offset": 1, "col_offset": 2}
        got = rbd_cuda.ops.materialize(33, 40, device=CUDA, **kw)
        assert torch.equal(got.cpu(), rbd_cuda.ops.materialize(33, 40, **kw))


# ---- products ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_project_matches_cpu(shape, dist, dtype):
    numel, dim, r0, c0 = shape
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    g = random_vector(numel, dtype, seed=numel)
    poison_cache(dim)
    got = rbd_cuda.project(g.to(CUDA), dim, **kw)
    assert_matches_cpu(got, rbd_cuda.project(g, dim, **kw), f"project {shape} {dist}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_expand_matches_cpu(shape, dist, dtype):
    numel, dim, r0, c0 = shape
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    c = random_vector(dim, dtype, seed=dim)
    poison_cache(numel, dtype)
    got = rbd_cuda.expand(c.to(CUDA), numel, **kw)
    assert_matches_cpu(got, rbd_cuda.expand(c, numel, **kw), f"expand {shape} {dist}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_expand_inplace_matches_cpu(shape, dist, dtype):
    numel, dim, r0, c0 = shape
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    c = random_vector(dim, torch.float32, seed=dim)
    out_cpu = random_vector(numel, dtype, seed=1, scale=2.0)
    out = out_cpu.to(CUDA)
    ptr = out.data_ptr()
    ret = rbd_cuda.expand_(out, c.to(CUDA), -0.3, **kw)
    assert ret is out and out.data_ptr() == ptr
    rbd_cuda.expand_(out_cpu, c, -0.3, **kw)
    assert_matches_cpu(out, out_cpu, f"expand_ {shape} {dist}")


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_unaligned_and_strided_inputs(dist):
    kw = dict(distribution=dist, row_offset=1, col_offset=3, **STREAM)
    base = random_vector(40_011, seed=3)
    for off in (1, 2, 3):  # storage offsets break 16-byte alignment
        g = base[off:off + 40_000]
        got = rbd_cuda.project(base.to(CUDA)[off:off + 40_000], 37, **kw)
        assert_matches_cpu(got, rbd_cuda.project(g, 37, **kw), f"unaligned {off}")
        out_cpu = g.clone()
        out = base.to(CUDA)[off:off + 40_000]
        rbd_cuda.expand_(out, torch.ones(37, device=CUDA), 0.5, **kw)
        rbd_cuda.expand_(out_cpu, torch.ones(37), 0.5, **kw)
        assert_matches_cpu(out, out_cpu, f"unaligned expand_ {off}")
    g2 = random_vector(2 * 20_000, seed=4).reshape(200, 200).T  # non-contiguous
    assert_matches_cpu(rbd_cuda.project(g2.to(CUDA), 37, **kw), rbd_cuda.project(g2, 37, **kw))


# ---- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_deterministic(dist):
    kw = dict(distribution=dist, row_offset=3, col_offset=5, **STREAM)
    g = random_vector(8_000_003, seed=5).to(CUDA)  # many row chunks: a multi-block reduction
    c = random_vector(300, seed=6).to(CUDA)
    projs = [rbd_cuda.project(g, 300, **kw) for _ in range(3)]
    assert all(torch.equal(p, projs[0]) for p in projs[1:])
    projs = [rbd_cuda.project(g[:4_000_000].to(torch.bfloat16), 1000, **kw) for _ in range(3)]
    assert all(torch.equal(p, projs[0]) for p in projs[1:])
    exps = [rbd_cuda.expand(c, 1_000_003, **kw) for _ in range(3)]
    assert all(torch.equal(e, exps[0]) for e in exps[1:])
    outs = []
    for _ in range(3):
        out = g[:1_000_003].clone()
        rbd_cuda.expand_(out, c, 0.1, **kw)
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


# ---- coverage of outputs and propagation -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_poison(dist, dtype):
    kw = dict(distribution=dist, row_offset=2, col_offset=31, **STREAM)
    c = random_vector(33, dtype, seed=1)
    for numel in (1, 3, 4097, 1_000_003):
        # expand_ must read out: NaN stays NaN
        out = torch.full((numel,), float("nan"), dtype=dtype, device=CUDA)
        rbd_cuda.expand_(out, c.to(CUDA), **kw)
        assert torch.isnan(out).all(), numel
        # a fresh result must cover every element, whatever the allocator hands back
        poison_cache(numel, dtype)
        got = rbd_cuda.expand(c.to(CUDA), numel, **kw)
        assert_matches_cpu(got, rbd_cuda.expand(c, numel, **kw), f"fresh expand {numel}")
        poison_cache(numel * 33)
        m = rbd_cuda.ops.materialize(numel, 33, device=CUDA, **kw)
        assert torch.isfinite(m).all()


# ---- bad input ------------------------------------------------------------------------------


def test_mixed_devices_rejected():
    out_gpu = torch.zeros(10, device=CUDA)
    with pytest.raises(RuntimeError, match=r"out.*c|c.*out") as e:
        rbd_cuda.expand_(out_gpu, torch.ones(4), seed=0)
    assert "cuda" in str(e.value) and "cpu" in str(e.value)
    out_cpu = torch.zeros(10)
    with pytest.raises(RuntimeError, match=r"out.*c|c.*out"):
        rbd_cuda.expand_(out_cpu, torch.ones(4, device=CUDA), seed=0)
    assert torch.equal(out_cpu, torch.zeros(10))
    with pytest.raises(RuntimeError, match=r"counter.*key|key.*counter"):
        rbd_cuda.ops.philox4x32(torch.zeros(1, 4, dtype=torch.int64, device=CUDA),
                            torch.zeros(1, 2, dtype=torch.int64))


def test_bad_input_cuda():
    g = torch.ones(10, device=CUDA)
    with pytest.raises(ERR, match="dim"):
        rbd_cuda.project(g, 0, seed=0)
    with pytest.raises(ERR, match=r"\bg must be"):
        rbd_cuda.project(g.double(), 4, seed=0)
    with pytest.raises(ERR, match="distribution"):
        rbd_cuda.project(g, 4, seed=0, distribution="gauss")
    with pytest.raises(ERR, match="row_offset"):
        rbd_cuda.project(g, 4, seed=0, row_offset=2**34 - 5)
    with pytest.raises(ERR, match=r"\bc must be 1-D"):
        rbd_cuda.expand(torch.ones(2, 2, device=CUDA), 10, seed=0)
    with pytest.raises(ERR, match=r"\bout must be contiguous"):
        rbd_cuda.expand_(torch.zeros(10, 4, device=CUDA).T, torch.ones(4, device=CUDA), seed=0)
    with pytest.raises(ERR, match="rounds"):
        rbd_cuda.ops.philox4x32(torch.zeros(1, 4, dtype=torch.int64, device=CUDA),
                            torch.zeros(1, 2, dtype=torch.int64, device=CUDA), 8)


# ---- the v2 kernels and the one-launch grouped ops (rbd_cuda.backends.cuda.kernels) --------------


@pytest.fixture(params=["v1", "v2"])
def kernels(request, monkeypatch):
    """Both CUDA kernel families in one run, whatever the setting is outside (RBD_CUDA_KERNELS)."""
    monkeypatch.setattr(rbd_cuda.backends.cuda, "kernels", request.param)
    assert rbd_cuda.backends.cuda.kernels == request.param
    return request.param


# Large and awkward shapes the reference cannot afford: many row chunks, d % 32 in 1..31 (v2's
# narrow last tile), offsets off the row blocks and column groups.
V2_SHAPES = [(1_000_003, 100, 1, 0), (1_000_003, 1, 2, 7), (300_001, 128, 0, 33), (2_000_001, 37, 3, 61)]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", V2_SHAPES, ids=[f"{n}x{d}@{r},{c}" for n, d, r, c in V2_SHAPES])
def test_products_match_cpu_large(kernels, shape, dist):
    numel, dim, r0, c0 = shape
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    g, c = random_vector(numel, seed=numel), random_vector(dim, seed=dim)
    assert_matches_cpu(rbd_cuda.project(g.to(CUDA), dim, **kw), rbd_cuda.project(g, dim, **kw), f"{kernels} project")
    out_cpu = random_vector(numel, seed=1)
    out = out_cpu.to(CUDA)
    rbd_cuda.expand_(out, c.to(CUDA), -0.3, **kw)
    rbd_cuda.expand_(out_cpu, c, -0.3, **kw)
    assert_matches_cpu(out, out_cpu, f"{kernels} expand_")


# Coefficients staged in more than one pass: expand stages 2048 coefficients at a time (v1, and v2
# for normal and uniform); v2's Rademacher table holds 16 column groups (512 columns) at a time.
# Column offset 5 adds a group, and rows too few to fill the GPU add column lanes (JS = 32).
MULTI_STAGE = [("normal", 4096), ("uniform", 4096), ("rademacher", 1024), ("rademacher", 4096)]


@pytest.mark.parametrize("dist,dim", MULTI_STAGE, ids=[f"{d}-{n}" for d, n in MULTI_STAGE])
def test_multi_stage_products_match_cpu(kernels, dist, dim):
    kw = dict(distribution=dist, row_offset=3, col_offset=5, **STREAM)
    c = random_vector(dim, seed=dim)
    few = 10_003
    g = random_vector(few, seed=2)
    assert_matches_cpu(rbd_cuda.project(g.to(CUDA), dim, **kw), rbd_cuda.project(g, dim, **kw), f"{kernels} project")
    assert_matches_cpu(rbd_cuda.expand(c.to(CUDA), few, **kw), rbd_cuda.expand(c, few, **kw), f"{kernels} expand")
    # One column lane per row block (JS = 1) walks every stage; three slices of rows checked.
    many = 4_200_001
    u = rbd_cuda.expand(c.to(CUDA), many, **kw)
    for first in (0, many // 2 + 1, many - 777):
        want = rbd_cuda.expand(c, 777, **{**kw, "row_offset": kw["row_offset"] + first})
        assert_matches_cpu(u[first:first + 777], want, f"{kernels} expand rows {first}..")


def _sparse_rows(numel: int, dtype) -> dict[int, float]:
    """Rows at both ends of 2**31 and 2**32 (and the last one) that lie in [0, numel), with values."""
    rows = sorted({r for r in (0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32 + 5, numel - 2, numel - 1)
                   if 0 <= r < numel})
    vals = random_vector(len(rows), dtype, seed=numel).tolist()
    return dict(zip(rows, vals, strict=True))


@pytest.mark.parametrize("numel,dtype", [(2**31 + 4099, torch.float32), (2**34 - 4, torch.float16)],
                         ids=["2^31+4099-fp32", "2^34-4-fp16"])
def test_products_beyond_2_31_rows(kernels, numel, dtype):
    """project and expand_ over a vector of more than 2**31 entries (row blocks past 2**29 and, for
    2**34 - 4 rows, up to the last 32-bit row block). g is zero but at a few rows around 2**31 and
    2**32, so c = sum of g_i P[i, :] there, checked against the CPU's rows of P; expand_ then adds
    P c into g, checked at the same rows."""
    need = numel * torch.empty((), dtype=dtype).element_size()
    if torch.cuda.mem_get_info()[0] < 1.5 * need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    try:
        _check_sparse_products(kernels, numel, dtype)
    finally:  # test workers share the GPU: return the memory to it
        torch.cuda.empty_cache()


def _check_sparse_products(kernels: str, numel: int, dtype) -> None:
    dim = 33
    g = torch.zeros(numel, dtype=dtype, device=CUDA)
    rows = _sparse_rows(numel, dtype)
    for r, v in rows.items():
        g[r] = v
    for dist in DISTRIBUTIONS:
        kw = dict(distribution=dist, row_offset=1, col_offset=7, **STREAM)
        P = torch.cat([rbd_cuda.ops.materialize(1, dim, **{**kw, "row_offset": 1 + r}) for r in rows]).double()
        gv = torch.tensor(list(rows.values()), dtype=torch.float64)
        c = rbd_cuda.project(g, dim, **kw)
        assert_matches_cpu(c, (P.T @ gv).to(dtype), f"{kernels} {dist} project over {numel} rows")
        c32 = random_vector(dim, seed=5)
        before, tail = g[list(rows)].cpu(), g[-1000:].to("cpu", copy=True)
        rbd_cuda.expand_(g, c32.to(CUDA), 0.5, **kw)
        want = (before.double() + 0.5 * (P @ c32.double())).to(dtype)
        assert_matches_cpu(g[list(rows)], want, f"{kernels} {dist} expand_ over {numel} rows")
        want = (tail.double() + 0.5 * rbd_cuda.expand(c32, 1000, **{**kw, "row_offset": 1 + numel - 1000})).to(dtype)
        assert_matches_cpu(g[-1000:], want, f"{kernels} {dist} expand_, the last 1000 of {numel} rows")
        g.zero_()
        for r, v in rows.items():
            g[r] = v


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_grouped_large_segments_are_the_single_ops(kernels, dist):
    """A ResNet-8-like table (a compartment per tensor, d = 100) plus a compartment of three large
    segments at unaligned row offsets: each compartment's c and each segment's update equal the
    single ops' bit for bit, whichever kernel generation runs (v2: one launch, segments cut on
    their own)."""
    sizes = [432, 16, 2304, 16, 4608, 32, 9216, 32, 18432, 64, 36864, 64, 640, 10, 1_000_003, 2_000_001, 77]
    n = len(sizes)
    comps = list(range(n - 3)) + [n - 3] * 3
    rows = [0] * (n - 3) + [0, 1_000_003, 3_000_004]
    dims = [100] * (n - 3) + [300]
    plan = rbd_cuda.SegmentPlan(sizes, rows, comps, dims, [2 * k + 1 for k in range(n - 2)])
    kw = {"seed": 9, "step": 4, "distribution": dist}
    g = [random_vector(m, seed=s).to(CUDA) for s, m in enumerate(sizes)]
    c = rbd_cuda.project_grouped(g, plan, **kw)
    out = [t.clone() for t in g]
    rbd_cuda.expand_grouped_(out, c, [-0.1] * n, plan, **kw)
    off = [0]
    for d in dims:
        off.append(off[-1] + d)
    for k, d in enumerate(dims):
        want = None
        for s in (s for s in range(n) if comps[s] == k):
            part = rbd_cuda.project(g[s], d, row_offset=rows[s], stream=2 * k + 1, seed=9, step=4, distribution=dist)
            want = part if want is None else want + part
        assert torch.equal(c[off[k]:off[k + 1]], want), (kernels, k)
    for s in range(n):
        k = comps[s]
        ref = g[s].clone()
        rbd_cuda.expand_(ref, c[off[k]:off[k + 1]], -0.1, row_offset=rows[s], stream=2 * k + 1, seed=9, step=4,
                         distribution=dist)
        assert torch.equal(out[s], ref), (kernels, s)


def _kernel_launches(fn) -> int:
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for e in prof.events())


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_grouped_one_launch_with_v2(kernels, dist):
    """v2: one project launch and one reduction, one expand_ launch, for 40 segments in 40
    compartments; v1 loops over the segments. Both give each segment its single-op result."""
    sizes = [1 + 37 * s for s in range(40)]
    g = [random_vector(n, seed=s).to(CUDA) for s, n in enumerate(sizes)]
    plan = rbd_cuda.SegmentPlan(sizes, [s % 5 for s in range(40)], list(range(40)), [10] * 40, list(range(40)))
    stream = {"seed": 1, "step": 2, "distribution": dist}
    c = rbd_cuda.project_grouped(g, plan, **stream)
    out = [t.clone() for t in g]
    rbd_cuda.expand_grouped_(out, c, [0.5] * 40, plan, **stream)
    for s in range(40):
        kw = {"row_offset": s % 5, "stream": s, "seed": 1, "step": 2, "distribution": dist}
        assert torch.equal(c[10 * s: 10 * s + 10], rbd_cuda.project(g[s], 10, **kw))
        want = g[s].clone()
        rbd_cuda.expand_(want, c[10 * s: 10 * s + 10], 0.5, **kw)
        assert torch.equal(out[s], want)
    projects = _kernel_launches(lambda: rbd_cuda.project_grouped(g, plan, **stream))
    expands = _kernel_launches(lambda: rbd_cuda.expand_grouped_(out, c, [0.5] * 40, plan, **stream))
    if kernels == "v2":
        assert (projects, expands) == (2, 1)
    else:
        assert projects >= 40 and expands >= 40


@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_expand_keeps_the_integer_stream(kernels, dist):
    """Uniform and Rademacher entries are exact functions of the Philox words: expanding a unit
    coefficient reads out one column of P, which must equal materialize's (no switch changes it)."""
    m = rbd_cuda.ops.materialize(10_001, 70, distribution=dist, row_offset=3, col_offset=5, device=CUDA, **STREAM)
    for col in (0, 5, 31, 63):
        e = torch.zeros(70, device=CUDA)
        e[col] = 1.0
        u = rbd_cuda.expand(e, 10_001, distribution=dist, row_offset=3, col_offset=5, **STREAM)
        assert torch.equal(u, m[:, col]), (kernels, col)


def test_grouped_mixed_devices_rejected(kernels):
    table = {"row_offsets": [0, 0], "compartments": [0, 0], "dims": [4], "streams": [0], "seed": 0}
    plan = rbd_cuda.SegmentPlan([5, 3], [0, 0], [0, 0], [4], [0])
    g = [torch.ones(5, device=CUDA), torch.ones(3)]
    with pytest.raises(ValueError, match=r"g\[1\]"):
        rbd_cuda.project_grouped(g, plan, seed=0)
    with pytest.raises((ValueError, RuntimeError), match=r"g\[1\]"):
        torch.ops.rbd_cuda.project_grouped(g, **table)
    out = [torch.zeros(5, device=CUDA), torch.zeros(3, device=CUDA)]
    with pytest.raises(RuntimeError, match=r"out.*c|c.*out"):
        rbd_cuda.expand_grouped_(out, torch.ones(4), [1.0, 1.0], plan, seed=0)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


# ---- optimizers on CUDA parameters ----------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_rbd_step_on_cuda_matches_cpu(dist):
    from rbd_cuda.optim import RBD

    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5))
    cuda_model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5)).to(CUDA)
    cuda_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.randn(64, 50), torch.randint(0, 5, (64,))
    for model, device in ((cpu_model, "cpu"), (cuda_model, CUDA)):
        opt = RBD(model.named_parameters(), lr=0.5, dim=16, compartments="layer", distribution=dist, seed=4)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    for a, b in zip(cpu_model.parameters(), cuda_model.parameters(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)

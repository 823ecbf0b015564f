"""The CUDA kernels against the CPU kernels (the CPU side is itself checked against the reference).

Every test runs the CUDA source twice over where it can:

- ``emu``: csrc/cuda compiled by g++ over the SIMT emulator (csrc/emu), registered as
  ``torch.ops.rbd_emu`` on CPU tensors: the project's own host code (argument checks, segment
  tables, plans, launches) and kernels, run on the CPU in every test run. It checks the kernels'
  logic, not the GPU's float bits (docs/building.md, "The emulated CUDA kernels").
- ``cuda``: the real kernels on a GPU (marked ``cuda``; skipped without one, and FAILING when a GPU
  is present but the extension was built without its CUDA kernels).

Shapes are the GPU's where the emulator can afford them and smaller (``Kernels.rows``) where not.

Contract checked: the integer stream is identical on both devices (uniform and rademacher
entries bit-exact, normal within 1e-5 + 2e-7/|z| since the transcendentals differ); products agree
with the CPU within float tolerance, and bit for bit where the sums are exact (Rademacher entries
and integer inputs); results are deterministic run to run and, emulated, the same under every
schedule and grid size; every output element is written; grouped ops give each segment its
single-op bits in one launch each way.
"""

import functools
import importlib.util
import os

import pytest
import torch
from conftest import DISTRIBUTIONS, DTYPES, KAT, dtype_id, random_vector

import rbd_cuda
from rbd_cuda.ops import int64_seed

ERR = (ValueError, RuntimeError)


class Kernels:
    """The CUDA kernels as the tests call them: through ``torch.ops.rbd_cuda`` on a GPU's tensors,
    or through ``torch.ops.rbd_emu`` (the same source, emulated) on CPU tensors. Seeds are taken
    as the library takes them (any 64-bit value)."""

    def __init__(self, name: str):
        self.name = name
        self.gpu = name == "cuda"
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.ops = torch.ops.rbd_cuda if self.gpu else torch.ops.rbd_emu

    def rows(self, n: int) -> int:
        """``n`` on a GPU; at most 100,003 emulated (still more than 32 row chunks a segment)."""
        return n if self.gpu else min(n, 100_003)

    def to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def project(self, g, dim, *, seed, **kw):
        return self.ops.project(g, dim, seed=int64_seed(seed), **kw)

    def expand(self, c, numel, *, seed, **kw):
        return self.ops.expand(c, numel, seed=int64_seed(seed), **kw)

    def expand_(self, out, c, alpha=1.0, *, seed, **kw):
        self.ops.expand_(out, c, float(alpha), seed=int64_seed(seed), **kw)
        return out

    def materialize(self, numel, dim, *, seed, dtype=torch.float32, **kw):
        """Into a NaN-filled tensor: an entry left unwritten stays NaN."""
        out = torch.full((numel, dim), float("nan"), dtype=dtype, device=self.device)
        self.ops.materialize_(out, seed=int64_seed(seed), **kw)
        return out

    def philox4x32(self, counter, key, rounds=10):
        return self.ops.philox4x32(counter, key, rounds)

    def project_grouped(self, g, plan, *, seed, **kw):
        return self.ops.project_grouped(list(g), plan.table, plan.total, seed=int64_seed(seed), **kw)

    def expand_grouped_(self, out, c, alphas, plan, *, seed, **kw):
        self.ops.expand_grouped_(list(out), c, [float(a) for a in alphas], plan.table, seed=int64_seed(seed), **kw)
        return out

    def launches(self, fn) -> int:
        """Kernel launches made by ``fn()``."""
        if not self.gpu:
            before = torch.ops.rbd_emu.launches()
            fn()
            return torch.ops.rbd_emu.launches() - before
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for e in prof.events())


def _emu_built() -> bool:
    return bool(os.environ.get("RBD_EMU_LIBRARY")) or importlib.util.find_spec("rbd_cuda._emu") is not None


@functools.cache
def _load_emu() -> tuple:
    """Registers torch.ops.rbd_emu: rbd_cuda._emu, or the build RBD_EMU_LIBRARY names (tests/emu_check.py
    runs these tests against sanitized and mutated builds). Returns the emulator's settings as the
    environment made them (EMU_SCHED, EMU_SEED, EMU_SMS, EMU_WORKERS): schedule, its seed, emulated
    SMs, worker threads (0: one per core)."""
    library = os.environ.get("RBD_EMU_LIBRARY")
    if library:
        torch.ops.load_library(library)
    else:
        import rbd_cuda._emu  # noqa: F401
    return tuple(torch.ops.rbd_emu.configuration())


BACKENDS = [
    pytest.param("emu", marks=pytest.mark.skipif(not _emu_built(), reason="rbd_cuda._emu not built (RBD_EMU=1)")),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


@pytest.fixture(params=BACKENDS)
def kern(request) -> Kernels:
    if request.param == "cuda":
        if not rbd_cuda.backends.built_with_cuda():
            pytest.fail("a CUDA GPU is present but rbd_cuda was built without its CUDA kernels "
                        "(rebuild with RBD_CUDA=1)")
        return Kernels("cuda")
    settings = _load_emu()
    torch.ops.rbd_emu.configure(*settings)
    yield Kernels("emu")
    torch.ops.rbd_emu.configure(*settings)


@pytest.fixture
def gpu(kern) -> Kernels:
    """For what only a GPU can test (its memory, its tensors beside the CPU's, the optimizers)."""
    if not kern.gpu:
        pytest.skip("a GPU property")
    return kern


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


def assert_matches_cpu(got: torch.Tensor, cpu: torch.Tensor, kern: Kernels, what: str = "") -> None:
    assert got.device.type == kern.device.type, what
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


def integer_vector(n: int, dtype=torch.float32, seed: int = 0, high: int = 8) -> torch.Tensor:
    """Integers in [-high, high): products with ±1 entries sum exactly in fp32 in any order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-high, high, (n,), generator=gen).to(dtype)


def poison_cache(kern: Kernels, numel: int, dtype=torch.float32) -> None:
    """On a GPU, leave NaN in the caching allocator's free blocks so an unwritten output shows up."""
    if not kern.gpu:
        return
    blocks = [torch.full((max(numel, 1) + k,), float("nan"), dtype=dtype, device=kern.device)
              for k in (0, 1, 512)]
    torch.cuda.synchronize()
    del blocks


# ---- Philox and materialize -------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [7, 10])
def test_philox_known_answers(kern, rounds):
    rows = [r for r in KAT if r[0] == rounds]
    counter = torch.tensor([r[1] for r in rows], dtype=torch.int64, device=kern.device)
    key = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=kern.device)
    out = kern.philox4x32(counter, key, rounds)
    assert out.device.type == kern.device.type and out.dtype == torch.int64
    assert out.cpu().tolist() == [r[3] for r in rows]


@pytest.mark.parametrize("rounds", [7, 10])
def test_philox_random_words_match_cpu(kern, rounds):
    gen = torch.Generator().manual_seed(rounds)
    counter = torch.randint(0, 2**32, (100_003, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (100_003, 2), generator=gen, dtype=torch.int64)
    got = kern.philox4x32(kern.to(counter), kern.to(key), rounds)
    assert torch.equal(got.cpu(), rbd_cuda.ops.philox4x32(counter, key, rounds))


MAT_SHAPES = [(1, 1, 0, 0), (3, 7, 1, 3), (4097, 33, 2, 31), (257, 256, 5, 61),
              (1_000_003, 1, 3, 0),
              (64, 100, 2**34 - 64, 2**32 - 100)]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", MAT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}@{s[2]},{s[3]}")
def test_materialize_matches_cpu(kern, shape, dist):
    numel, dim, r0, c0 = shape
    numel = kern.rows(numel)
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    got = kern.materialize(numel, dim, **kw)
    cpu = rbd_cuda.ops.materialize(numel, dim, **kw)
    assert got.device.type == kern.device.type
    assert got.dtype == torch.float32 and got.shape == (numel, dim)
    got = got.cpu()
    if dist == "normal":
        assert_normal_entries_close(got, cpu)
    else:
        assert torch.equal(got, cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_materialize_dtypes_bit_exact(kern, dist, dtype):
    kw = dict(distribution=dist, row_offset=3, col_offset=7, **STREAM)
    got = kern.materialize(1001, 45, dtype=dtype, **kw)
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), rbd_cuda.ops.materialize(1001, 45, dtype=dtype, **kw))


@pytest.mark.parametrize("seed", [0, -1, 2**63, 2**64 - 1, 0x0123456789ABCDEF])
def test_materialize_seeds_steps_streams(kern, seed):
    for step, stream in [(0, 0), (1, 2**32 - 1), (2**32 - 1, 5)]:
        kw = {"seed": seed, "step": step, "stream": stream, "distribution": "uniform",
              "row_offset": 1, "col_offset": 2}
        got = kern.materialize(33, 40, **kw)
        assert torch.equal(got.cpu(), rbd_cuda.ops.materialize(33, 40, **kw))


# ---- products ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_project_matches_cpu(kern, shape, dist, dtype):
    numel, dim, r0, c0 = shape
    numel = kern.rows(numel)
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    g = random_vector(numel, dtype, seed=numel)
    poison_cache(kern, dim)
    got = kern.project(kern.to(g), dim, **kw)
    assert_matches_cpu(got, rbd_cuda.project(g, dim, **kw), kern, f"project {shape} {dist}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_expand_matches_cpu(kern, shape, dist, dtype):
    numel, dim, r0, c0 = shape
    numel = kern.rows(numel)
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    c = random_vector(dim, dtype, seed=dim)
    poison_cache(kern, numel, dtype)
    got = kern.expand(kern.to(c), numel, **kw)
    assert_matches_cpu(got, rbd_cuda.expand(c, numel, **kw), kern, f"expand {shape} {dist}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_expand_inplace_matches_cpu(kern, shape, dist, dtype):
    numel, dim, r0, c0 = shape
    numel = kern.rows(numel)
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    c = random_vector(dim, torch.float32, seed=dim)
    out_cpu = random_vector(numel, dtype, seed=1, scale=2.0)
    out = kern.to(out_cpu.clone())
    ptr = out.data_ptr()
    ret = kern.expand_(out, kern.to(c), -0.3, **kw)
    assert ret is out and out.data_ptr() == ptr
    rbd_cuda.expand_(out_cpu, c, -0.3, **kw)
    assert_matches_cpu(out, out_cpu, kern, f"expand_ {shape} {dist}")


# Rademacher entries are ±1: with integer inputs every partial sum is an integer below 2**24, exact
# in fp32 whatever the order, so the kernels must give the CPU's bits, in every dtype that holds the
# integers. The rows at the top of the stream's range (2**34) check the 32-bit row-block counters.
EXACT_SHAPES = SHAPES[:-1] + [(1003, 33, 2**34 - 1003, 0), (4097, 70, 2**34 - 4097, 2**32 - 70)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=[f"{n}x{d}@{r},{c}" for n, d, r, c in EXACT_SHAPES])
def test_rademacher_products_of_integers_are_the_cpus_bits(kern, shape, dtype):
    numel, dim, r0, c0 = shape
    numel = kern.rows(numel)
    kw = dict(distribution="rademacher", row_offset=r0, col_offset=c0, **STREAM)
    g = integer_vector(numel, dtype, seed=numel, high=8 if dtype != torch.bfloat16 else 2)
    c = integer_vector(dim, dtype, seed=dim)
    got = kern.project(kern.to(g), dim, **kw).cpu()
    assert torch.equal(got, rbd_cuda.project(g, dim, **kw)), f"project {shape}"
    got = kern.expand(kern.to(c), numel, **kw).cpu()
    assert torch.equal(got, rbd_cuda.expand(c, numel, **kw)), f"expand {shape}"
    out = kern.to(g.clone())
    kern.expand_(out, kern.to(c), 2.0, **kw)
    assert torch.equal(out.cpu(), rbd_cuda.expand_(g.clone(), c, 2.0, **kw)), f"expand_ {shape}"


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_unaligned_and_strided_inputs(kern, dist):
    kw = dict(distribution=dist, row_offset=1, col_offset=3, **STREAM)
    base = random_vector(40_011, seed=3)
    for off in (1, 2, 3):  # storage offsets break 16-byte alignment
        g = base[off:off + 40_000]
        got = kern.project(kern.to(base)[off:off + 40_000], 37, **kw)
        assert_matches_cpu(got, rbd_cuda.project(g, 37, **kw), kern, f"unaligned {off}")
        out_cpu = g.clone()
        whole = kern.to(base.clone())
        out = whole[off:off + 40_000]
        kern.expand_(out, kern.to(torch.ones(37)), 0.5, **kw)
        rbd_cuda.expand_(out_cpu, torch.ones(37), 0.5, **kw)
        assert_matches_cpu(out, out_cpu, kern, f"unaligned expand_ {off}")
        # nothing outside the view is written
        assert torch.equal(whole[:off].cpu(), base[:off]) and torch.equal(whole[off + 40_000:].cpu(),
                                                                          base[off + 40_000:]), off
    g2 = random_vector(2 * 20_000, seed=4).reshape(200, 200).T  # non-contiguous
    assert_matches_cpu(kern.project(kern.to(g2), 37, **kw), rbd_cuda.project(g2, 37, **kw), kern)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_half_precision_views_at_every_alignment(kern, dist, dtype):
    """fp16/bf16 g is read 4 rows at a time (one 8-byte load) only where aligned: views starting at
    elements 0..3 and row offsets 0..3 take both paths."""
    base = integer_vector(20_007, dtype, seed=7, high=4)
    for off in range(4):
        for r0 in range(4):
            kw = dict(distribution=dist, row_offset=r0, col_offset=5, **STREAM)
            g = base[off:off + 20_000]
            got = kern.project(kern.to(base)[off:off + 20_000], 45, **kw)
            assert_matches_cpu(got, rbd_cuda.project(g, 45, **kw), kern, f"view at {off}, rows at {r0}")


# ---- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_deterministic(kern, dist):
    kw = dict(distribution=dist, row_offset=3, col_offset=5, **STREAM)
    g = kern.to(random_vector(kern.rows(8_000_003), seed=5))  # many row chunks: a multi-block reduction
    c = kern.to(random_vector(300, seed=6))
    projs = [kern.project(g, 300, **kw) for _ in range(3)]
    assert all(torch.equal(p, projs[0]) for p in projs[1:])
    wide = 1000 if kern.gpu else 200
    projs = [kern.project(g[:kern.rows(4_000_000)].to(torch.bfloat16), wide, **kw) for _ in range(3)]
    assert all(torch.equal(p, projs[0]) for p in projs[1:])
    exps = [kern.expand(c, kern.rows(1_000_003), **kw) for _ in range(3)]
    assert all(torch.equal(e, exps[0]) for e in exps[1:])
    outs = []
    for _ in range(3):
        out = g[:kern.rows(1_000_003)].clone()
        kern.expand_(out, c, 0.1, **kw)
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


# The emulator's schedules (the order in which a block's threads run between barriers) and grid
# sizes (the grids are the resident blocks, EMU_SMS x 2): a missing barrier or a result that depends
# on which block takes which work item changes the bits.
SCHEDULES = [("fwd", 0, 4, 1), ("rev", 0, 1, 2), ("rand", 1, 132, 0), ("rand", 2, 7, 2)]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_emulated_results_are_the_same_under_every_schedule_and_grid(kern, dist):
    if kern.gpu:
        pytest.skip("the emulator's schedules")
    from rbd_cuda.ops import SegmentPlan

    kw = dict(distribution=dist, row_offset=3, col_offset=37, **STREAM)
    g, c = random_vector(50_003, seed=8), random_vector(70, seed=9)
    plan = SegmentPlan([5_003, 17, 30_001], [1, 0, 5_004], [0, 1, 0], [70, 9], [3, 4])
    pieces = [random_vector(n, seed=n) for n in plan.numels]
    results = []
    for setting in SCHEDULES:
        torch.ops.rbd_emu.configure(*setting)
        out = g.clone()
        kern.expand_(out, c, -0.5, **kw)
        grouped = [p.clone() for p in pieces]
        cg = kern.project_grouped(pieces, plan, seed=5, distribution=dist)
        kern.expand_grouped_(grouped, cg, [0.5, 1.0, -1.0], plan, seed=5, distribution=dist)
        results.append([kern.project(g, 70, **kw), kern.project(g, 3, **kw), out, cg, *grouped])
    for setting, got in zip(SCHEDULES[1:], results[1:], strict=True):
        for k, (a, b) in enumerate(zip(got, results[0], strict=True)):
            assert torch.equal(a, b), (setting, k)


# ---- coverage of outputs and propagation -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_poison(kern, dist, dtype):
    kw = dict(distribution=dist, row_offset=2, col_offset=31, **STREAM)
    c = random_vector(33, dtype, seed=1)
    for numel in (1, 3, 4097, kern.rows(1_000_003)):
        # expand_ must read out: NaN stays NaN
        out = torch.full((numel,), float("nan"), dtype=dtype, device=kern.device)
        kern.expand_(out, kern.to(c), **kw)
        assert torch.isnan(out).all(), numel
        # a fresh result must cover every element, whatever the allocator hands back
        poison_cache(kern, numel, dtype)
        got = kern.expand(kern.to(c), numel, **kw)
        assert_matches_cpu(got, rbd_cuda.expand(c, numel, **kw), kern, f"fresh expand {numel}")
        m = kern.materialize(numel, 33, **kw)  # into NaN
        assert torch.isfinite(m).all()


# ---- bad input ------------------------------------------------------------------------------


def test_mixed_devices_rejected(gpu):
    out_gpu = torch.zeros(10, device=gpu.device)
    with pytest.raises(RuntimeError, match=r"out.*c|c.*out") as e:
        rbd_cuda.expand_(out_gpu, torch.ones(4), seed=0)
    assert "cuda" in str(e.value) and "cpu" in str(e.value)
    out_cpu = torch.zeros(10)
    with pytest.raises(RuntimeError, match=r"out.*c|c.*out"):
        rbd_cuda.expand_(out_cpu, torch.ones(4, device=gpu.device), seed=0)
    assert torch.equal(out_cpu, torch.zeros(10))
    with pytest.raises(RuntimeError, match=r"counter.*key|key.*counter"):
        rbd_cuda.ops.philox4x32(torch.zeros(1, 4, dtype=torch.int64, device=gpu.device),
                                torch.zeros(1, 2, dtype=torch.int64))


def test_bad_input(kern):
    """The CUDA host code's own checks (the emulated build runs them as they are)."""
    g = torch.ones(10, device=kern.device)
    with pytest.raises(ERR, match="dim"):
        kern.project(g, 0, seed=0)
    with pytest.raises(ERR, match=r"\bg must be"):
        kern.project(g.double(), 4, seed=0)
    with pytest.raises(ERR, match="distribution"):
        kern.project(g, 4, seed=0, distribution="gauss")
    with pytest.raises(ERR, match="row_offset"):
        kern.project(g, 4, seed=0, row_offset=2**34 - 5)
    with pytest.raises(ERR, match=r"\bc must be 1-D"):
        kern.expand(torch.ones(2, 2, device=kern.device), 10, seed=0)
    with pytest.raises(ERR, match=r"\bout must be contiguous"):
        kern.expand_(torch.zeros(10, 4, device=kern.device).T, torch.ones(4, device=kern.device), seed=0)
    with pytest.raises(ERR, match="rounds"):
        kern.philox4x32(torch.zeros(1, 4, dtype=torch.int64, device=kern.device),
                        torch.zeros(1, 2, dtype=torch.int64, device=kern.device), 8)
    from rbd_cuda.ops import SegmentPlan

    plan = SegmentPlan([5, 3], [0, 0], [0, 0], [4], [0])
    out = [torch.zeros(5, device=kern.device), torch.zeros(3, device=kern.device)]
    with pytest.raises(ERR, match=r"c must be 1-D with sum\(dims\)=4"):
        kern.expand_grouped_(out, torch.ones(5, device=kern.device), [1.0, 1.0], plan, seed=0)
    with pytest.raises(ERR, match="must not overlap"):
        whole = torch.zeros(8, device=kern.device)
        kern.expand_grouped_([whole[:5], whole[2:5]], torch.ones(4, device=kern.device), [1.0, 1.0],
                             SegmentPlan([5, 3], [0, 0], [0, 0], [4], [0]), seed=0)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


# ---- large and awkward shapes, grouped tables --------------------------------------------------

# Many row chunks, d % 32 in 1..31 (the narrow last tile), offsets off the row blocks and column
# groups.
LARGE_SHAPES = [(1_000_003, 100, 1, 0), (1_000_003, 1, 2, 7), (300_001, 128, 0, 33), (2_000_001, 37, 3, 61)]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=[f"{n}x{d}@{r},{c}" for n, d, r, c in LARGE_SHAPES])
def test_products_match_cpu_large(kern, shape, dist):
    numel, dim, r0, c0 = shape
    numel = kern.rows(numel)
    kw = dict(distribution=dist, row_offset=r0, col_offset=c0, **STREAM)
    g, c = random_vector(numel, seed=numel), random_vector(dim, seed=dim)
    assert_matches_cpu(kern.project(kern.to(g), dim, **kw), rbd_cuda.project(g, dim, **kw), kern, "project")
    out_cpu = random_vector(numel, seed=1)
    out = kern.to(out_cpu.clone())
    kern.expand_(out, kern.to(c), -0.3, **kw)
    rbd_cuda.expand_(out_cpu, c, -0.3, **kw)
    assert_matches_cpu(out, out_cpu, kern, "expand_")


# Coefficients staged in more than one pass: expand stages 2048 coefficients at a time for normal
# and uniform; the Rademacher table holds 16 column groups (512 columns) at a time. Column offset 5
# adds a group. Rows too few to fill the GPU split the columns over lanes (32 of them here); many
# rows take one lane per row block, which walks every stage itself.
MULTI_STAGE = [("normal", 4096), ("uniform", 4096), ("rademacher", 1024), ("rademacher", 4096)]


@pytest.mark.parametrize("dist,dim", MULTI_STAGE, ids=[f"{d}-{n}" for d, n in MULTI_STAGE])
def test_multi_stage_products_match_cpu(kern, dist, dim):
    if not kern.gpu and dist != "rademacher":
        dim = 2100  # two stages; the emulator's normal and uniform entries cost libm calls
    kw = dict(distribution=dist, row_offset=3, col_offset=5, **STREAM)
    c = random_vector(dim, seed=dim)
    few = 10_003 if kern.gpu else 403
    g = random_vector(few, seed=2)
    assert_matches_cpu(kern.project(kern.to(g), dim, **kw), rbd_cuda.project(g, dim, **kw), kern, "project")
    assert_matches_cpu(kern.expand(kern.to(c), few, **kw), rbd_cuda.expand(c, few, **kw), kern, "expand")
    many = 4_200_001 if kern.gpu else 20_003
    u = kern.expand(kern.to(c), many, **kw)
    for first in (0, many // 2 + 1, many - 777):
        want = rbd_cuda.expand(c, 777, **{**kw, "row_offset": kw["row_offset"] + first})
        assert_matches_cpu(u[first:first + 777], want, kern, f"expand rows {first}..")


def _sparse_rows(numel: int, dtype) -> dict[int, float]:
    """Rows at both ends of 2**31 and 2**32 (and the last one) that lie in [0, numel), with values."""
    rows = sorted({r for r in (0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32 + 5, numel - 2, numel - 1)
                   if 0 <= r < numel})
    vals = random_vector(len(rows), dtype, seed=numel).tolist()
    return dict(zip(rows, vals, strict=True))


@pytest.mark.parametrize("numel,dtype", [(2**31 + 4099, torch.float32), (2**34 - 4, torch.float16)],
                         ids=["2^31+4099-fp32", "2^34-4-fp16"])
def test_products_beyond_2_31_rows(gpu, numel, dtype):
    """project and expand_ over a vector of more than 2**31 entries (row blocks past 2**29 and, for
    2**34 - 4 rows, up to the last 32-bit row block). g is zero but at a few rows around 2**31 and
    2**32, so c = sum of g_i P[i, :] there, checked against the CPU's rows of P; expand_ then adds
    P c into g, checked at the same rows."""
    need = numel * torch.empty((), dtype=dtype).element_size()
    if torch.cuda.mem_get_info()[0] < 1.5 * need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    try:
        _check_sparse_products(gpu, numel, dtype)
    finally:  # test workers share the GPU: return the memory to it
        torch.cuda.empty_cache()


def _check_sparse_products(kern: Kernels, numel: int, dtype) -> None:
    dim = 33
    g = torch.zeros(numel, dtype=dtype, device=kern.device)
    rows = _sparse_rows(numel, dtype)
    for r, v in rows.items():
        g[r] = v
    for dist in DISTRIBUTIONS:
        kw = dict(distribution=dist, row_offset=1, col_offset=7, **STREAM)
        P = torch.cat([rbd_cuda.ops.materialize(1, dim, **{**kw, "row_offset": 1 + r}) for r in rows]).double()
        gv = torch.tensor(list(rows.values()), dtype=torch.float64)
        c = kern.project(g, dim, **kw)
        assert_matches_cpu(c, (P.T @ gv).to(dtype), kern, f"{dist} project over {numel} rows")
        c32 = random_vector(dim, seed=5)
        before, tail = g[list(rows)].cpu(), g[-1000:].to("cpu", copy=True)
        kern.expand_(g, kern.to(c32), 0.5, **kw)
        want = (before.double() + 0.5 * (P @ c32.double())).to(dtype)
        assert_matches_cpu(g[list(rows)], want, kern, f"{dist} expand_ over {numel} rows")
        want = (tail.double() + 0.5 * rbd_cuda.expand(c32, 1000, **{**kw, "row_offset": 1 + numel - 1000})).to(dtype)
        assert_matches_cpu(g[-1000:], want, kern, f"{dist} expand_, the last 1000 of {numel} rows")
        g.zero_()
        for r, v in rows.items():
            g[r] = v


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_grouped_large_segments_are_the_single_ops(kern, dist):
    """A ResNet-8-like table (a compartment per tensor, d = 100) plus a compartment of three large
    segments at unaligned row offsets: each compartment's c and each segment's update equal the
    single ops' bit for bit (one launch, each segment cut on its own)."""
    big = [kern.rows(1_000_003), kern.rows(2_000_001) - 2]
    sizes = [432, 16, 2304, 16, 4608, 32, 9216, 32, 18432, 64, 36864, 64, 640, 10, big[0], big[1], 77]
    n = len(sizes)
    comps = list(range(n - 3)) + [n - 3] * 3
    rows = [0] * (n - 3) + [0, big[0], big[0] + big[1] + 1]
    dims = [100] * (n - 3) + [300]
    plan = rbd_cuda.SegmentPlan(sizes, rows, comps, dims, [2 * k + 1 for k in range(n - 2)])
    kw = {"seed": 9, "step": 4, "distribution": dist}
    g = [kern.to(random_vector(m, seed=s)) for s, m in enumerate(sizes)]
    c = kern.project_grouped(g, plan, **kw)
    out = [t.clone() for t in g]
    kern.expand_grouped_(out, c, [-0.1] * n, plan, **kw)
    off = [0]
    for d in dims:
        off.append(off[-1] + d)
    for k, d in enumerate(dims):
        want = None
        for s in (s for s in range(n) if comps[s] == k):
            part = kern.project(g[s], d, row_offset=rows[s], stream=2 * k + 1, **kw)
            want = part if want is None else want + part
        assert torch.equal(c[off[k]:off[k + 1]], want), k
    for s in range(n):
        k = comps[s]
        ref = g[s].clone()
        kern.expand_(ref, c[off[k]:off[k + 1]], -0.1, row_offset=rows[s], stream=2 * k + 1, **kw)
        assert torch.equal(out[s], ref), s


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_grouped_ops_are_one_launch_each_way(kern, dist):
    """One project launch and one reduction, one expand_ launch, for 40 segments in 40
    compartments; each segment gets its single-op result."""
    sizes = [1 + 37 * s for s in range(40)]
    g = [kern.to(random_vector(n, seed=s)) for s, n in enumerate(sizes)]
    plan = rbd_cuda.SegmentPlan(sizes, [s % 5 for s in range(40)], list(range(40)), [10] * 40, list(range(40)))
    stream = {"seed": 1, "step": 2, "distribution": dist}
    c = kern.project_grouped(g, plan, **stream)
    # the segments as views of one buffer with a guard entry after each: nothing else is written
    buffer = torch.full((sum(sizes) + 40,), 7.0, device=kern.device)
    out, at = [], 0
    for t in g:
        out.append(buffer[at:at + t.numel()].copy_(t))
        at += t.numel() + 1
    kern.expand_grouped_(out, c, [0.5] * 40, plan, **stream)
    guards = torch.tensor([sum(sizes[:s + 1]) + s for s in range(40)], device=kern.device)
    assert torch.equal(buffer[guards], torch.full((40,), 7.0, device=kern.device))
    for s in range(40):
        kw = {"row_offset": s % 5, "stream": s, "seed": 1, "step": 2, "distribution": dist}
        assert torch.equal(c[10 * s: 10 * s + 10], kern.project(g[s], 10, **kw))
        want = g[s].clone()
        kern.expand_(want, c[10 * s: 10 * s + 10], 0.5, **kw)
        assert torch.equal(out[s], want)
    projects = kern.launches(lambda: kern.project_grouped(g, plan, **stream))
    expands = kern.launches(lambda: kern.expand_grouped_(out, c, [0.5] * 40, plan, **stream))
    assert (projects, expands) == (2, 1)


@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_expand_keeps_the_integer_stream(kern, dist):
    """Uniform and Rademacher entries are exact functions of the Philox words: expanding a unit
    coefficient reads out one column of P, which must equal materialize's, and the CPU's."""
    kw = dict(distribution=dist, row_offset=3, col_offset=5, **STREAM)
    m = kern.materialize(10_001, 70, **kw)
    assert torch.equal(m.cpu(), rbd_cuda.ops.materialize(10_001, 70, **kw))
    for col in (0, 5, 31, 63):
        e = torch.zeros(70, device=kern.device)
        e[col] = 1.0
        u = kern.expand(e, 10_001, **kw)
        assert torch.equal(u, m[:, col]), col


def test_normal_products_use_the_entries_materialize_writes(kern):
    """A unit coefficient's expand and a unit vector's project read out a column and a row of
    P: materialize's normal entries (the kernels' own Box–Muller, not the CPU's), to within the
    rounding of the fp32 sums."""
    kw = dict(distribution="normal", row_offset=6, col_offset=40, **STREAM)
    m = kern.materialize(4_001, 250, **kw)
    for col in (0, 33, 249):
        e = torch.zeros(250, device=kern.device)
        e[col] = 1.0
        assert torch.equal(kern.expand(e, 4_001, **kw), m[:, col]), col
    for row in (0, 1, 2, 3, 4_000):
        e = torch.zeros(4_001, device=kern.device)
        e[row] = 1.0
        assert torch.equal(kern.project(e, 250, **kw), m[row]), row


def test_grouped_mixed_devices_rejected(gpu):
    plan = rbd_cuda.SegmentPlan([5, 3], [0, 0], [0, 0], [4], [0])
    g = [torch.ones(5, device=gpu.device), torch.ones(3)]
    with pytest.raises(ValueError, match=r"g\[1\]"):
        rbd_cuda.project_grouped(g, plan, seed=0)
    with pytest.raises((ValueError, RuntimeError), match=r"g\[1\]"):
        torch.ops.rbd_cuda.project_grouped(g, plan.table, plan.total, seed=0)
    out = [torch.zeros(5, device=gpu.device), torch.zeros(3, device=gpu.device)]
    with pytest.raises(RuntimeError, match=r"out.*c|c.*out"):
        rbd_cuda.expand_grouped_(out, torch.ones(4), [1.0, 1.0], plan, seed=0)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


# ---- optimizers on CUDA parameters ----------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_rbd_step_on_cuda_matches_cpu(gpu, dist):
    from rbd_cuda.optim import RBD

    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5))
    cuda_model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5)).to(gpu.device)
    cuda_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.randn(64, 50), torch.randint(0, 5, (64,))
    for model, device in ((cpu_model, "cpu"), (cuda_model, gpu.device)):
        opt = RBD(model.named_parameters(), lr=0.5, dim=16, compartments="layer", distribution=dist, seed=4)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    for a, b in zip(cpu_model.parameters(), cuda_model.parameters(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)

"""The grouped ops against the per-segment ops (bit for bit) and the float64 reference.

project_grouped sums each compartment's per-segment projections in list order, and
expand_grouped_ gives every segment what expand_ gives it, on every device: with the CUDA kernels
that is one launch per op instead of one per segment (tests/test_cuda.py, emulated and on a GPU).
"""

import copy
import itertools

import pytest
import torch
from conftest import (
    DISTRIBUTIONS,
    DTYPES,
    assert_close_to_ref,
    dtype_id,
    random_vector,
    ref_project,
)

import rbd_cuda

KW = {"seed": 2**63 + 7, "step": 11}

# name: (segment sizes, row_offsets, compartments, dims, streams)
LAYOUTS = {
    # one compartment over four tensors, at row offsets that are not multiples of 4
    "global": ([7, 33, 1, 4097], [0, 7, 40, 41], [0, 0, 0, 0], [33], [5]),
    # a compartment per tensor, dims not multiples of 32 (and 1)
    "tensor": ([7, 33, 1, 4097], [0, 0, 0, 0], [0, 1, 2, 3], [3, 100, 1, 40], [0, 1, 2, 2**32 - 1]),
    # segments listed out of compartment order, an empty segment, a compartment without segments
    "mixed": ([50, 0, 3, 1000, 9], [2, 0, 0, 50, 1], [2, 0, 1, 2, 0], [5, 64, 70, 9], [3, 1, 4, 8]),
}


def _segments(layout: str, dtype=torch.float32, device="cpu", seed: int = 0) -> list[torch.Tensor]:
    sizes = LAYOUTS[layout][0]
    return [random_vector(n, dtype, seed=seed + s, device=device) for s, n in enumerate(sizes)]


def _plan(tensors, row_offsets, compartments, dims, streams) -> rbd_cuda.SegmentPlan:
    return rbd_cuda.SegmentPlan([t.numel() for t in tensors], row_offsets, compartments, dims, streams)


def _offsets(dims) -> list[int]:
    return [0, *itertools.accumulate(dims)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_project_grouped_is_the_sum_of_projects(device, layout, dist, dtype):
    _, rows, comps, dims, streams = LAYOUTS[layout]
    g = _segments(layout, dtype, device)
    c = rbd_cuda.project_grouped(g, _plan(g, rows, comps, dims, streams), distribution=dist, **KW)
    assert c.dtype == torch.float32 and c.device == g[0].device and c.shape == (sum(dims),)
    off = _offsets(dims)
    for k, dim in enumerate(dims):
        want = None
        for s in (s for s, ks in enumerate(comps) if ks == k):
            part = rbd_cuda.project(g[s].float(), dim, row_offset=rows[s], stream=streams[k], distribution=dist, **KW)
            want = part if want is None else want + part
        want = torch.zeros(dim, device=device) if want is None else want
        assert torch.equal(c[off[k]: off[k + 1]], want), (layout, dist, k)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_project_grouped_matches_reference(device, layout, dist):
    _, rows, comps, dims, streams = LAYOUTS[layout]
    g = _segments(layout, device=device, seed=5)
    c = rbd_cuda.project_grouped(g, _plan(g, rows, comps, dims, streams), distribution=dist, **KW)
    off = _offsets(dims)
    for k, dim in enumerate(dims):
        ref, scale = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
        for s in (s for s, ks in enumerate(comps) if ks == k):
            r, sc = ref_project(g[s], dim, row_offset=rows[s], stream=streams[k], distribution=dist, **KW)
            ref, scale = ref + r, scale + sc
        assert_close_to_ref(c[off[k]: off[k + 1]], ref, scale, torch.float32, f"{layout} compartment {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_expand_grouped_is_each_expand(device, layout, dist, dtype):
    _, rows, comps, dims, streams = LAYOUTS[layout]
    out = _segments(layout, dtype, device, seed=20)
    want = [o.clone() for o in out]
    c = random_vector(sum(dims), device=device, seed=99)
    alphas = [0.5 - 0.3 * s for s in range(len(out))]
    off = _offsets(dims)
    for s, k in enumerate(comps):
        rbd_cuda.expand_(want[s], c[off[k]: off[k + 1]], alphas[s], row_offset=rows[s], stream=streams[k],
                         distribution=dist, **KW)
    versions = [o._version for o in out]
    res = rbd_cuda.expand_grouped_(out, c, alphas, _plan(out, rows, comps, dims, streams), distribution=dist, **KW)
    assert res is out
    for s in range(len(out)):
        assert torch.equal(out[s], want[s]), (layout, dist, s)
        assert out[s]._version > versions[s] or out[s].numel() == 0


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_grouped_pieces_of_one_tensor(device, dist):
    """Int-mode packing: one tensor cut into pieces of two compartments (views of one base)."""
    base = random_vector(1000, device=device, seed=3)
    pieces = [base[:337], base[337:]]
    rows, comps, dims, streams = [0, 0], [0, 1], [17, 40], [0, 1]
    c = rbd_cuda.project_grouped(pieces, _plan(pieces, rows, comps, dims, streams), distribution=dist, **KW)
    assert torch.equal(c[:17], rbd_cuda.project(pieces[0], 17, stream=0, distribution=dist, **KW))
    assert torch.equal(c[17:], rbd_cuda.project(pieces[1], 40, stream=1, distribution=dist, **KW))
    want = base.clone()
    rbd_cuda.expand_(want[:337], c[:17], -1.0, stream=0, distribution=dist, **KW)
    rbd_cuda.expand_(want[337:], c[17:], -1.0, stream=1, distribution=dist, **KW)
    rbd_cuda.expand_grouped_(pieces, c, [-1.0, -1.0], _plan(pieces, rows, comps, dims, streams), distribution=dist, **KW)
    assert torch.equal(base, want)


def test_expand_grouped_reads_c_before_updating(device):
    """c may be a view of an out: every segment sees the coefficients as they were on entry."""
    out = [random_vector(64, device=device, seed=1), random_vector(30, device=device, seed=2)]
    c = out[0][:10]
    want = [o.clone() for o in out]
    c0 = c.clone()
    rbd_cuda.expand_(want[0], c0[:4], 2.0, **KW)
    rbd_cuda.expand_(want[1], c0[4:], 2.0, stream=1, **KW)
    rbd_cuda.expand_grouped_(out, c, [2.0, 2.0], _plan(out, [0, 0], [0, 1], [4, 6], [0, 1]), **KW)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


def test_grouped_deterministic(device):
    _, rows, comps, dims, streams = LAYOUTS["mixed"]
    g = _segments("mixed", device=device, seed=8)
    first = rbd_cuda.project_grouped(g, _plan(g, rows, comps, dims, streams), **KW)
    for _ in range(3):
        assert torch.equal(rbd_cuda.project_grouped(g, _plan(g, rows, comps, dims, streams), **KW), first)


BAD_TABLE = [
    ("row_offsets and compartments", ([5, 3], [0], [0, 0], [4], [0])),
    ("dims and streams", ([5, 3], [0, 0], [0, 0], [4], [0, 1])),
    ("compartments\\[1\\] must be in", ([5, 3], [0, 0], [0, 1], [4], [0])),
    ("dims\\[0\\] must be in \\[1, 2\\*\\*32\\]", ([5, 3], [0, 0], [0, 0], [0], [0])),
    ("dims\\[0\\] must be in \\[1, 2\\*\\*32\\]", ([5, 3], [0, 0], [0, 0], [2**32 + 1], [0])),
    ("streams\\[0\\] must be in", ([5, 3], [0, 0], [0, 0], [4], [2**32])),
    ("row_offsets\\[1\\] must be in", ([5, 3], [0, -1], [0, 0], [4], [0])),
    ("numels\\[1\\] must be in \\[0, 2\\*\\*34\\]", ([5, -1], [0, 0], [0, 0], [4], [0])),
    ("at least one segment", ([], [], [], [4], [0])),
]


@pytest.mark.parametrize("direct", [False, True], ids=["SegmentPlan", "torch.ops"])
@pytest.mark.parametrize("message,table", BAD_TABLE, ids=[m for m, _ in BAD_TABLE])
def test_the_segment_table_is_checked_when_built(message, table, direct):
    build = torch.ops.rbd_cuda.segment_table if direct else rbd_cuda.SegmentPlan
    with pytest.raises((ValueError, RuntimeError), match=message):
        build(*table)


def test_the_ops_check_the_tensors_against_the_table_and_refuse_another_table():
    plan = rbd_cuda.SegmentPlan([5, 3], [0, 5], [0, 0], [4], [0])
    g = [torch.ones(5), torch.ones(3)]
    table = plan.table
    assert torch.equal(torch.ops.rbd_cuda.project_grouped(g, table, 4, seed=0), rbd_cuda.project_grouped(g, plan, seed=0))
    with pytest.raises(ValueError, match="g needs one tensor per segment of the table \\(2\\), got 1"):
        torch.ops.rbd_cuda.project_grouped(g[:1], table, 4, seed=0)
    with pytest.raises(ValueError, match="g\\[1\\] has 4 entries; the table's segment 1 has 3"):
        torch.ops.rbd_cuda.project_grouped([g[0], torch.ones(4)], table, 4, seed=0)
    with pytest.raises(ValueError, match="total must be the table's sum\\(dims\\)=4, got 5"):
        torch.ops.rbd_cuda.project_grouped(g, table, 5, seed=0)
    with pytest.raises(ValueError, match="g\\[1\\] is Half"):
        torch.ops.rbd_cuda.project_grouped([g[0], g[1].half()], table, 4, seed=0)
    changed = table.clone()
    changed[4 + 2] = 1  # the second segment's row offset: would be taken unchecked
    for bad in (changed, torch.zeros_like(table), table.int(), table[:-1]):
        with pytest.raises(ValueError, match="table"):
            torch.ops.rbd_cuda.project_grouped(g, bad, 4, seed=0)
        with pytest.raises(ValueError, match="table"):
            torch.ops.rbd_cuda.expand_grouped_(g, torch.ones(4), [1.0, 1.0], bad, seed=0)


def test_segment_plan_converts_the_lists_and_is_immutable():
    with pytest.raises(TypeError, match="dims\\[0\\] must be an int"):
        rbd_cuda.SegmentPlan([5], [0], [0], [4.0], [0])
    plan = rbd_cuda.SegmentPlan([5, 3], [0, 5], [0, 0], [4], [0])
    assert plan.total == 4 and plan.numels == (5, 3) and plan.select([1]).row_offsets == (5,)
    for bad in (-1, 2):
        with pytest.raises(ValueError, match=f"segments\\[1\\] must be in \\[0, 2\\), got {bad}"):
            plan.select([0, bad])
    with pytest.raises(AttributeError):
        plan.dims = (5,)  # what was checked stays what is used
    copied = copy.deepcopy(plan)
    assert copied.dims == plan.dims and torch.equal(copied.table, plan.table)
    g = [torch.ones(5), torch.ones(3)]
    with pytest.raises(TypeError, match="plan must be a SegmentPlan"):
        rbd_cuda.project_grouped(g, [0, 5], seed=0)
    with pytest.raises(ValueError, match="g needs one tensor per segment of the table \\(2\\), got 1"):
        rbd_cuda.project_grouped(g[:1], plan, seed=0)
    with pytest.raises(ValueError, match="out\\[0\\] has 6 entries"):
        rbd_cuda.expand_grouped_([torch.ones(6), g[1]], torch.ones(4), [1.0, 1.0], plan, seed=0)
    with pytest.raises(ValueError, match="step must be in"):
        rbd_cuda.project_grouped(g, plan, seed=0, step=2**32)
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        rbd_cuda.project_grouped(g, plan, seed=2**64)


@pytest.mark.parametrize("direct", [False, True], ids=["wrapper", "torch.ops"])
def test_expand_grouped_bad_input(device, direct):
    plan = rbd_cuda.SegmentPlan([5, 3], [0, 0], [0, 0], [4], [0])

    def fn(out, c, alphas, **kw):
        if direct:
            return torch.ops.rbd_cuda.expand_grouped_(out, c, alphas, plan.table, **kw)
        return rbd_cuda.expand_grouped_(out, c, alphas, plan, **kw)

    out = [torch.zeros(5, device=device), torch.zeros(3, device=device)]
    c = torch.ones(4, device=device)
    with pytest.raises((ValueError, RuntimeError), match="alphas"):
        fn(out, c, [1.0], seed=0)
    with pytest.raises((ValueError, RuntimeError), match="c must be 1-D with sum\\(dims\\)=4"):
        fn(out, torch.ones(5, device=device), [1.0, 1.0], seed=0)
    base = torch.zeros(8, device=device)
    with pytest.raises((ValueError, RuntimeError), match="must not overlap"):
        fn([base[:5], base[2:5]], c, [1.0, 1.0], seed=0)
    with pytest.raises((ValueError, RuntimeError), match="out must be contiguous"):
        fn([torch.zeros(5, 2, device=device).t()[0], out[1]], c, [1.0, 1.0], seed=0)
    with pytest.raises((ValueError, RuntimeError), match="distribution"):
        fn(out, c, [1.0, 1.0], seed=0, distribution="cauchy")


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_opcheck_grouped(device, dist):
    _, rows, comps, dims, streams = LAYOUTS["mixed"]
    g = _segments("mixed", device=device)
    plan = _plan(g, rows, comps, dims, streams)
    keys = {"distribution": dist, "seed": 3, "step": 1}
    torch.library.opcheck(torch.ops.rbd_cuda.project_grouped.default, (g, plan.table, plan.total), keys)
    c = random_vector(sum(dims), device=device)
    torch.library.opcheck(torch.ops.rbd_cuda.expand_grouped_.default, (g, c, [1.0] * len(g), plan.table), keys)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_project_grouped_differentiates_as_the_sum_of_projects(device, dtype):
    """Its derivative is the adjoint (expand of each compartment's incoming gradient), as autograd
    gives it for the per-segment projects it sums; with inputs that require grad, opcheck runs it."""
    _, rows, comps, dims, streams = LAYOUTS["mixed"]
    g = [t.requires_grad_() for t in _segments("mixed", dtype, device)]
    weights = random_vector(sum(dims), device=device, seed=9)
    c = rbd_cuda.project_grouped(g, _plan(g, rows, comps, dims, streams), **KW)
    assert c.requires_grad
    (c * weights).sum().backward()
    off = _offsets(dims)
    ref = [t.detach().clone().requires_grad_() for t in g]
    sum((rbd_cuda.project(t.float(), dims[k], row_offset=r, stream=streams[k], **KW) * weights[off[k]:off[k + 1]]).sum()
        for t, r, k in zip(ref, rows, comps, strict=True)).backward()
    for s, (got, want) in enumerate(zip(g, ref, strict=True)):
        assert got.grad.dtype == dtype and torch.equal(got.grad, want.grad), s
    plan = _plan(g, rows, comps, dims, streams)
    torch.library.opcheck(torch.ops.rbd_cuda.project_grouped.default, (g, plan.table, plan.total), {"seed": 3, "step": 1})


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_expand_segments_is_each_expand_and_differentiates_as_each(device, dist):
    """The subspace wrapper's path (rbd_cuda.basis.expand_segments: one expand_grouped_ forward, one
    project_grouped backward) gives, bit for bit, the single expand per segment and its derivative."""
    from rbd_cuda.basis import Basis, expand_segments

    basis = Basis(seed=KW["seed"], step=KW["step"], distribution=dist)
    sizes, rows, dims, streams = [300, 10, 4097, 1], [0, 300, 310, 4407], [37, 37, 5, 37], [3, 3, 1, 3]
    plan = rbd_cuda.SegmentPlan(sizes, rows, range(4), dims, streams)
    c = random_vector(sum(dims), device=device, seed=4).requires_grad_()
    weights = [random_vector(n, device=device, seed=10 + s) for s, n in enumerate(sizes)]
    sum((u * w).sum() for u, w in zip(expand_segments(plan, c, basis), weights, strict=True)).backward()
    ref = c.detach().clone().requires_grad_()
    off = _offsets(dims)
    total = 0
    for s, n in enumerate(sizes):
        u = rbd_cuda.expand(ref[off[s]: off[s + 1]], n, row_offset=rows[s], stream=streams[s], distribution=dist, **KW)
        assert torch.equal(u, expand_segments(plan, c, basis)[s])
        total = total + (u * weights[s]).sum()
    total.backward()
    assert torch.equal(c.grad, ref.grad)


# (numel, dim, row_offset, distribution): the two segments the issue found (2**34 rows, dim 524288:
# a 32-bit chunk of 2**32 row blocks, i.e. 0; 2**34 - 4 rows: a 32-bit loop counter that wraps),
# the widest Rademacher segment, and ordinary ones.
PLANS = [(2**34, 524_288, 0, "normal"), (2**34 - 4, 524_288, 0, "normal"), (2**34 - 5, 2**32 - 31, 1, "rademacher"),
         (2**34 - 8, 1, 7, "uniform"), (2**31 + 3, 1000, 0, "normal"), (1000, 10, 2, "uniform"), (1, 1, 0, "normal"),
         (0, 5, 3, "rademacher")]


@pytest.mark.parametrize("numel,dim,row_offset,dist", PLANS)
def test_cuda_project_plan_keeps_chunks_in_32_bits(numel, dim, row_offset, dist):
    """The CUDA project cuts each segment into work items on the host (the same arithmetic in
    every build, torch.ops.rbd_cuda._cuda_project_plan) and walks a chunk's row blocks with a 32-bit
    counter: the chunks must cover the segment's row blocks and hold at most 2**30 of them."""
    tiles, chunk, n_chunks = torch.ops.rbd_cuda._cuda_project_plan(numel, dim, row_offset, dist)
    n_rb = 0 if numel == 0 else (row_offset + numel + 3) // 4 - row_offset // 4
    assert 1 <= chunk <= 2**30
    assert n_chunks == -(-n_rb // chunk)
    assert tiles == -(-dim // 32)  # column tiles, or 32-column groups (column offset 0)
    assert 0 < tiles * n_chunks < 2**32 or n_rb == 0
    if (numel, dim) == (2**34, 524_288):
        assert chunk == 2**30 and n_chunks == 4  # uncapped: one chunk of 2**32 row blocks


def test_cuda_project_plan_bad_input():
    with pytest.raises((ValueError, RuntimeError), match="numel must be non-negative"):
        torch.ops.rbd_cuda._cuda_project_plan(-1, 4)
    with pytest.raises((ValueError, RuntimeError), match="row_offset \\+ numel must be at most 2\\*\\*34"):
        torch.ops.rbd_cuda._cuda_project_plan(2**34, 4, 1)
    with pytest.raises((ValueError, RuntimeError), match="distribution"):
        torch.ops.rbd_cuda._cuda_project_plan(10, 4, 0, "cauchy")

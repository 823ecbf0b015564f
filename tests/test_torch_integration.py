"""torch.library.opcheck on the ops (every device of the ``device`` fixture) and torch.compile of a
function using them."""

import pytest
import torch
from conftest import random_vector

import rbd_cuda

OPS = torch.ops.rbd_cuda

STREAM_KW = [
    {"seed": 0},
    {"seed": -(2**62) - 7, "step": 2**32 - 1, "stream": 5, "distribution": "uniform",
     "row_offset": 3, "col_offset": 31},
    {"seed": 2**40 + 1, "step": 3, "stream": 2**31, "distribution": "rademacher",
     "row_offset": 6, "col_offset": 33},
]


@pytest.mark.parametrize("kw", STREAM_KW, ids=["default", "uniform", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(device, kw, dtype):
    g = random_vector(1001, dtype, seed=1, device=device)
    c = random_vector(19, dtype, seed=2, device=device)
    torch.library.opcheck(OPS.project, (g, 19), kw)
    torch.library.opcheck(OPS.project, (g.reshape(7, 143), 5), kw)
    torch.library.opcheck(OPS.expand, (c, 1001), kw)
    torch.library.opcheck(OPS.expand_, (random_vector(1001, dtype, seed=3, device=device), c, -0.5), kw)
    torch.library.opcheck(OPS.expand_, (random_vector(77, dtype, seed=3, device=device).reshape(7, 11), c), kw)
    torch.library.opcheck(OPS.materialize_, (torch.empty(33, 9, dtype=dtype, device=device),), kw)


def test_opcheck_philox(device):
    counter = torch.randint(0, 2**32, (8, 4), dtype=torch.int64, device=device)
    key = torch.randint(0, 2**32, (8, 2), dtype=torch.int64, device=device)
    torch.library.opcheck(OPS.philox4x32, (counter, key, 7))
    torch.library.opcheck(OPS.philox4x32, (counter, key))


def _rbd_update(param, grad, step):
    """One RBD update: project the gradient, expand the coefficients back into the parameter."""
    c = rbd_cuda.project(grad, 24, seed=2**63 + 1, step=step, stream=1, row_offset=2)
    rbd_cuda.expand_(param, c, -0.01, seed=2**63 + 1, step=step, stream=1, row_offset=2)
    return c


def _rbd_step(param, grad, step):
    """The update plus ordinary torch ops around the custom ops."""
    c = _rbd_update(param, grad * 0.5, step)
    u = rbd_cuda.expand(c * 2, 100, seed=7, distribution="uniform", col_offset=3)
    return c, u.sum()


def _run(fn, steps=(0, 1)):
    param = random_vector(3001, seed=1)
    grad = random_vector(3001, seed=2)
    outs = [fn(param, grad, s) for s in steps]
    return param, outs


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_matches_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_rbd_step, backend=backend, fullgraph=True)
    p_eager, out_eager = _run(_rbd_step)
    p_comp, out_comp = _run(compiled)
    # Same kernels on the same inputs: the ops' results are bit-identical.
    assert torch.equal(p_comp, p_eager)
    for (c1, s1), (c2, s2) in zip(out_comp, out_eager):
        assert torch.equal(c1, c2)
        torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-5)


def test_compile_inductor_matches_eager():
    # Default backend; only the custom ops in the graph so no C++ kernel has to be compiled.
    torch._dynamo.reset()
    compiled = torch.compile(_rbd_update, fullgraph=True)
    p_eager, out_eager = _run(_rbd_update, steps=(3,))
    p_comp, out_comp = _run(compiled, steps=(3,))
    assert torch.equal(p_comp, p_eager)
    assert torch.equal(out_comp[0], out_eager[0])


def test_compile_grouped_over_a_plan_matches_eager():
    """The grouped products take a SegmentPlan (a frozen Python object, a constant to Dynamo): a
    compiled update over it traces in one graph and gives the eager update bit for bit."""
    plan = rbd_cuda.SegmentPlan([300, 17, 40], [0, 300, 0], [0, 0, 1], [24, 5], [1, 7])

    def update(tensors, step):
        c = rbd_cuda.project_grouped(tensors, plan, seed=2**63 + 1, step=step)
        rbd_cuda.expand_grouped_(tensors, c, [-0.01, 0.5, 2.0], plan, seed=2**63 + 1, step=step)
        return c

    torch._dynamo.reset()
    compiled = torch.compile(update, backend="aot_eager", fullgraph=True)
    eager_t = [random_vector(n, seed=n) for n in plan.numels]
    comp_t = [t.clone() for t in eager_t]
    for step in (0, 1):
        assert torch.equal(compiled(comp_t, step), update(eager_t, step))
    assert all(torch.equal(a, b) for a, b in zip(comp_t, eager_t, strict=True))


def test_compile_fake_shapes():
    # The fake kernels give the right shapes and dtypes under dynamic shapes.
    @torch.compile(backend="aot_eager", dynamic=True, fullgraph=True)
    def f(g, dim_src):
        c = rbd_cuda.project(g, 9, seed=1)
        return rbd_cuda.expand(c, g.numel(), seed=1) + dim_src.sum()

    for n in (17, 33):
        g = random_vector(n, torch.bfloat16, seed=n)
        out = f(g, torch.zeros(1, dtype=torch.bfloat16))
        assert out.shape == (n,) and out.dtype == torch.bfloat16
        assert torch.equal(out, rbd_cuda.expand(rbd_cuda.project(g, 9, seed=1), n, seed=1))


# ---- autograd: no derivatives yet, and in-place updates are visible to autograd -------------


def test_expand_inplace_bumps_the_version_counter():
    x = torch.zeros(10)
    before = x._version
    rbd_cuda.expand_(x, torch.ones(3), seed=1)
    assert x._version > before


def test_backward_through_an_overwritten_tensor_raises():
    a = torch.randn(10, requires_grad=True)
    y = a.exp()
    rbd_cuda.expand_(y, torch.ones(3), seed=1)
    with pytest.raises(RuntimeError):
        y.sum().backward()


def test_expand_inplace_on_a_leaf_that_requires_grad_raises():
    w = torch.zeros(10, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        rbd_cuda.expand_(w, torch.ones(3), seed=1)
    with torch.no_grad():  # how an optimizer updates parameters
        rbd_cuda.expand_(w, torch.ones(3), seed=1)
    assert w.abs().sum() > 0


# ---- derivatives: project and expand are each other's adjoint -------------------------------

GRAD_KW = {"seed": 77, "step": 4, "stream": 2, "row_offset": 5, "col_offset": 33}


@pytest.mark.parametrize("distribution", ["normal", "uniform", "rademacher"])
def test_gradients_are_products_with_the_same_matrix(distribution):
    kw = {**GRAD_KW, "distribution": distribution}
    P = rbd_cuda.ops.materialize(300, 9, **kw).double()
    g = random_vector(300, seed=1).reshape(20, 15).requires_grad_()
    w = random_vector(9, seed=2)
    (rbd_cuda.project(g, 9, **kw) * w).sum().backward()
    torch.testing.assert_close(g.grad.reshape(-1).double(), P @ w.double(), rtol=1e-5, atol=1e-5)

    c = random_vector(9, seed=3).requires_grad_()
    v = random_vector(300, seed=4)
    (rbd_cuda.expand(c, 300, **kw) * v).sum().backward()
    torch.testing.assert_close(c.grad.double(), P.T @ v.double(), rtol=1e-5, atol=1e-4)


def test_gradient_keeps_the_input_dtype_and_double_backward_works():
    g = random_vector(64, torch.bfloat16, seed=5).requires_grad_()
    (grad_g,) = torch.autograd.grad((rbd_cuda.project(g, 4, seed=1) ** 2).sum(), g)
    assert grad_g.dtype == torch.bfloat16 and grad_g.shape == g.shape
    c = random_vector(4, seed=6).requires_grad_()
    (gc,) = torch.autograd.grad(rbd_cuda.expand(c, 50, seed=1).pow(2).sum(), c, create_graph=True)
    (hvp,) = torch.autograd.grad(gc.sum(), c)  # d²/dc² of |P c|² is 2 PᵀP
    P = rbd_cuda.ops.materialize(50, 4, seed=1).double()
    torch.testing.assert_close(hvp.double(), 2 * P.T @ P @ torch.ones(4, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)


def test_compiled_backward_equals_eager():
    w = random_vector(16, seed=7)

    def loss(theta, c):
        u = rbd_cuda.expand(c, theta.numel(), seed=9, stream=1)
        return (rbd_cuda.project(theta + u, 16, seed=9, stream=2) * w).sum()

    theta, c = random_vector(500, seed=8), random_vector(16, seed=9)
    eager = torch.autograd.grad(loss(theta.requires_grad_(), c.requires_grad_()), (theta, c))
    compiled_fn = torch.compile(loss, backend="aot_eager", fullgraph=True)
    compiled = torch.autograd.grad(compiled_fn(theta, c), (theta, c))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)

"""Forward mode and torch.func through project, expand and RandomSubspace.

Both ops are linear, so the tangent of ``project(g)`` along v is Pᵀ v and that of ``expand(c)``
along w is P w; the references below are float64 products with ``rbd_cuda.reference``.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

import rbd_cuda
from rbd_cuda import reference
from rbd_cuda.nn import RandomSubspace

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

D, DIM = 70, 6
KW = {"seed": 17, "step": 3, "stream": 2, "row_offset": 5, "col_offset": 1}


def vectors(device, *sizes):
    gen = torch.Generator().manual_seed(sum(sizes))
    return [torch.randn(n, generator=gen).to(device) for n in sizes]


def matrix(distribution):
    return reference.materialize(D, DIM, distribution=distribution, **KW)


def project(g, distribution):
    return rbd_cuda.project(g, DIM, distribution=distribution, **KW)


def expand(c, distribution):
    return rbd_cuda.expand(c, D, distribution=distribution, **KW)


def close(actual, expected):
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "rademacher"])
def test_jvp_is_the_op_applied_to_the_tangent(device, distribution):
    g, v, c, w = vectors(device, D, D, DIM, DIM)
    P = matrix(distribution)
    out, tangent = torch.func.jvp(lambda x: project(x, distribution), (g,), (v,))
    close(out, P.T @ g.double().cpu())
    close(tangent, P.T @ v.double().cpu())
    out, tangent = torch.func.jvp(lambda x: expand(x, distribution), (c,), (w,))
    close(tangent, P @ w.double().cpu())
    with torch.no_grad():  # forward mode does not depend on grad mode
        _, tangent = torch.func.jvp(lambda x: expand(x, distribution), (c,), (w,))
    close(tangent, P @ w.double().cpu())


def test_forward_ad_dual_tensors(device):
    g, v, c, w = vectors(device, D, D, DIM, DIM)
    P = matrix("normal")
    with fwAD.dual_level():
        close(fwAD.unpack_dual(project(fwAD.make_dual(g, v), "normal")).tangent, P.T @ v.double().cpu())
        close(fwAD.unpack_dual(expand(fwAD.make_dual(c, w), "normal")).tangent, P @ w.double().cpu())
        # the derivative of a product of the two: d/dt Pᵀ(P (c + t w)) = Pᵀ P w
        round_trip = project(expand(fwAD.make_dual(c, w), "normal"), "normal")
        close(fwAD.unpack_dual(round_trip).tangent, P.T @ (P @ w.double().cpu()))


def test_torch_func_transforms(device):
    g, c = vectors(device, D, DIM)
    P = matrix("uniform")
    g64 = g.double().cpu()
    close(torch.func.grad(lambda x: project(x, "uniform").pow(2).sum())(g), 2 * P @ (P.T @ g64))
    close(torch.func.jacrev(lambda x: expand(x, "uniform"))(c), P)
    close(torch.func.jacfwd(lambda x: project(x, "uniform"))(g), P.T)
    batch = torch.stack([g, 2 * g, -g])
    grads = torch.func.vmap(torch.func.grad(lambda x: project(x, "uniform").pow(2).sum()))(batch)
    close(grads, torch.stack([2 * P @ (P.T @ row) for row in batch.double().cpu()]))
    close(torch.func.hessian(lambda x: expand(x, "uniform").pow(2).sum())(c), 2 * P.T @ P)


def test_random_subspace_jvp_equals_the_reverse_mode_jvp(device):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
    wrapper = RandomSubspace(module, 4, seed=3, compartments="layer", said=True)
    x = torch.randn(8, 6).to(device)
    c, v = vectors(device, wrapper.dim, wrapper.dim)
    c = c * 0.3

    def out(coeffs):
        return functional_call(wrapper, {"c": coeffs}, (x,), strict=False)

    _, forward = torch.func.jvp(out, (c,), (v,))
    _, reverse = torch.autograd.functional.jvp(out, (c,), (v,))  # by double backward, no forward mode
    assert forward.abs().max() > 1e-3
    torch.testing.assert_close(forward, reverse, rtol=1e-4, atol=1e-5)


def test_in_place_expand_with_a_dual_tensor_names_the_op(device):
    out = torch.zeros(D, device=device)
    c, w = vectors(device, DIM, DIM)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="rbd_cuda::expand_"):
        rbd_cuda.expand_(out, fwAD.make_dual(c, w), 1.0, seed=1)

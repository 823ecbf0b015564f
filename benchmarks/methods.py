"""What the suite times: the fused ops and the baselines, built as zero-argument callables, and the
checks each must pass before it is timed.

Ops (for a case: distribution, D rows, d directions, input dtype, device):
  project   c = Pᵀg
  expand    u = P c (a new vector, as the baselines produce)
  step      a whole RBD step: c = Pᵀg, then θ -= lr · P c in place. Fused: ``RBD.step()`` on one
            flat parameter of D entries whose gradient is g. Baselines: P drawn once for both
            matvecs (materialised), or regenerated chunk by chunk in a second pass (chunked),
            since c must be complete before any of P c can be formed.

Methods:
  fused          rbd_cuda, P generated inside the product (never in memory)
  torch          P drawn into memory with torch (randn / uniform_ / randint → ±1), then matvecs
  torch_chunked  the same, row chunks of bounded size (``chunk_rows``) drawn from one seeded
                 generator; the second pass of a step re-seeds it and draws the same chunks again
  numpy          numpy's Philox (Philox4x64-10, another stream than rbd_cuda's) into memory + BLAS
  numpy_chunked  the same, chunked
  cupy           CuPy's cuRAND host generator set to PHILOX4_32_10 + cuBLAS (GPU)
  cupy_chunked   the same, chunked
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

import rbd_cuda
from rbd_cuda import reference
from rbd_cuda.optim import RBD

OPS = ("project", "expand", "step")
BASELINES = ("torch", "torch_chunked", "numpy", "numpy_chunked", "cupy", "cupy_chunked")
METHODS = ("fused", *BASELINES)
SEED = 99
LR = 1e-3
ENTRY_VARIANCE = {"normal": 1.0, "uniform": 1.0 / 3.0, "rademacher": 1.0}
# Normwise relative error allowed against a float64 product of the same P: fp32 accumulation over
# at most a few thousand terms in the checks; bf16 results are rounded to 8 bits of mantissa.
TOL = {"float32": 1e-4, "bfloat16": 3e-2}


class CheckFailed(RuntimeError):
    """A fused op or a baseline gave a wrong result; nothing of it is timed (a wrong fused op stops
    the suite; a wrong baseline is reported as failed, the others are still timed, and the suite
    exits non-zero)."""


@dataclass(frozen=True)
class Case:
    dist: str
    D: int
    d: int
    dtype: str  # "float32" or "bfloat16"
    device: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def entries(self) -> int:
        return self.D * self.d

    def label(self) -> str:
        return f"{self.dist} D={self.D:,} d={self.d} {self.dtype} {self.device}"

    def as_dict(self) -> dict:
        return asdict(self)


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    kw = {"device": case.device, "dtype": case.torch_dtype}
    return {"g": torch.randn(case.D, generator=gen).to(**kw), "c": torch.randn(case.d, generator=gen).to(**kw),
            "out": torch.zeros(case.D, **kw)}


def applies(method: str, case: Case) -> str | None:
    """None when ``method`` can run ``case``, else why not."""
    lib = method.removesuffix("_chunked")
    if lib == "numpy" and (case.device != "cpu" or case.dtype != "float32"):
        return "numpy: CPU and float32 only"
    if lib == "cupy" and (case.device != "cuda" or case.dtype != "float32"):
        return "cupy: CUDA and float32 only"
    if lib == "cupy":
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "cupy is not installed"
    return None


# --- fused ---------------------------------------------------------------------------------------

def _fused_kw(case: Case) -> dict:
    return {"seed": SEED, "step": 1, "stream": 0, "distribution": case.dist}


def _step_optimizer(case: Case, x: dict, lr: float, normalize: str) -> tuple[RBD, torch.Tensor]:
    p = torch.zeros_like(x["g"])
    p.grad = x["g"]
    return RBD([p], lr=lr, dim=case.d, distribution=case.dist, normalize=normalize, seed=SEED), p


def fused(op: str, case: Case, x: dict):
    kw = _fused_kw(case)
    if op == "project":
        # rbd_cuda.project is looked up at every call, so a patched op is the one that runs.
        return lambda: rbd_cuda.project(x["g"], case.d, **kw)
    if op == "expand":
        return lambda: rbd_cuda.expand(x["c"], case.D, **kw)
    opt, _ = _step_optimizer(case, x, LR, "unbiased")
    return opt.step


def _rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    actual = actual.detach().cpu().double().reshape(-1)
    return ((actual - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_fused(case: Case, x: dict) -> dict:
    """Checks the fused ops on this case; raises CheckFailed, else returns the errors found.

    - slice: project and expand on 64 rows in the middle of P (up to 64 columns) against the
      float64 oracle ``rbd_cuda.reference`` (the layout written out entry by entry);
    - pass consistency at full size: gᵀ(P c) = ‖c‖² for c = Pᵀg, which holds only if both products
      regenerated the same P (docs/performance.md §3);
    - step: one RBD step (lr 1, no scaling) from θ = 0 moves θ by exactly -P Pᵀg at full size.
    """
    kw, tol = _fused_kw(case), TOL[case.dtype]
    g = x["g"]
    n, k = min(case.D, 64), min(case.d, 64)
    r = (case.D - n) // 2
    errs = {}
    c_slice = rbd_cuda.project(g[r:r + n], k, row_offset=r, **kw)
    errs["project_slice_rel_err"] = _rel_err(c_slice, reference.project(g[r:r + n].cpu(), k, row_offset=r, **kw))
    u_slice = rbd_cuda.expand(x["c"][:k], n, row_offset=r, **kw)
    errs["expand_slice_rel_err"] = _rel_err(u_slice, reference.expand(x["c"][:k].cpu(), n, row_offset=r, **kw))

    opt, p = _step_optimizer(case, x, 1.0, "none")
    step_kw = opt.stream_kwargs(opt.compartments[0])
    c = rbd_cuda.project(g, case.d, **step_kw)
    u = rbd_cuda.expand(c, case.D, **step_kw)
    lhs = torch.dot(g.double(), u.double()).item()
    rhs = torch.dot(c.double(), c.double()).item()
    errs["pass_consistency_rel_err"] = abs(lhs - rhs) / max(rhs, 1e-300)
    opt.step()
    errs["step_rel_err"] = _rel_err(p, -u.detach().cpu().double().reshape(-1))
    bad = {name: e for name, e in errs.items() if not e <= tol}
    if bad:
        raise CheckFailed(f"fused ops wrong for {case.label()}: {bad} (tolerance {tol})")
    return errs


# --- baselines -----------------------------------------------------------------------------------

class TorchLib:
    """P drawn with torch's own generator on the case's device, in the input dtype."""

    def __init__(self, case: Case):
        self.device, self.dtype = case.device, case.torch_dtype

    def generator(self, seed: int):
        return torch.Generator(device=self.device).manual_seed(seed)

    def draw(self, gen, rows: int, d: int, dist: str):
        kw = {"device": self.device, "dtype": self.dtype}
        if dist == "normal":
            return torch.randn(rows, d, generator=gen, **kw)
        if dist == "uniform":
            return torch.empty(rows, d, **kw).uniform_(-1.0, 1.0, generator=gen)
        # int8 {0, 1} -> ±1: the cheapest torch route to random signs.
        signs = torch.randint(0, 2, (rows, d), generator=gen, device=self.device, dtype=torch.int8)
        return signs.to(self.dtype).mul_(2).sub_(1)

    def wrap(self, t: torch.Tensor):
        return t

    def to_torch(self, a) -> torch.Tensor:
        return a

    def zeros_f32(self, n: int):
        return torch.zeros(n, device=self.device)

    def empty(self, n: int):
        return torch.empty(n, device=self.device, dtype=self.dtype)

    def f32(self, a):
        return a.float()

    def cast(self, a):
        return a.to(self.dtype)

    def axpy_(self, out, alpha: float, v) -> None:
        out.add_(v, alpha=alpha)


class NumpyLib:
    """numpy.random.Generator(Philox(seed)): Philox4x64-10 (not rbd_cuda's stream), float32, BLAS."""

    def __init__(self, case: Case):
        del case

    def generator(self, seed: int):
        return np.random.Generator(np.random.Philox(seed))

    def draw(self, gen, rows: int, d: int, dist: str):
        if dist == "normal":
            return gen.standard_normal((rows, d), dtype=np.float32)
        if dist == "uniform":
            P = gen.random((rows, d), dtype=np.float32)
        else:
            P = gen.integers(0, 2, (rows, d), dtype=np.int8).astype(np.float32)
        P *= 2
        P -= 1
        return P

    def wrap(self, t: torch.Tensor):
        return t.numpy()

    def to_torch(self, a) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a))

    def zeros_f32(self, n: int):
        return np.zeros(n, dtype=np.float32)

    def empty(self, n: int):
        return np.empty(n, dtype=np.float32)

    def f32(self, a):
        return a

    def cast(self, a):
        return a

    def axpy_(self, out, alpha: float, v) -> None:
        np.add(out, np.float32(alpha) * v, out=out)


class CupyLib:
    """CuPy's cuRAND host API with PHILOX4_32_10 (set explicitly; CuPy's default is XORWOW) + cuBLAS.

    CuPy allocates through torch's caching allocator, so ``max_memory_allocated`` sees its arrays
    (cuRAND's own generator state is allocated by cuRAND and is not counted).
    """

    _allocator_set = False

    def __init__(self, case: Case):
        del case
        import cupy

        self.cp = cupy
        if not CupyLib._allocator_set:
            def malloc(size, device_id):
                return torch.cuda.caching_allocator_alloc(size, device_id)

            def free(ptr, device_id):
                torch.cuda.caching_allocator_delete(ptr)

            cupy.cuda.set_allocator(cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc)
            CupyLib._allocator_set = True

    def generator(self, seed: int):
        return self.cp.random.RandomState(seed, method=self.cp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)

    def draw(self, gen, rows: int, d: int, dist: str):
        cp = self.cp
        if dist == "normal":
            return gen.standard_normal((rows, d), dtype=cp.float32)
        if dist == "uniform":
            return gen.uniform(-1.0, 1.0, (rows, d), dtype=cp.float32)
        P = gen.random_sample((rows, d), dtype=cp.float32)
        P -= 0.5
        return cp.copysign(1.0, P, out=P)

    def wrap(self, t: torch.Tensor):
        return self.cp.from_dlpack(t)

    def to_torch(self, a) -> torch.Tensor:
        return torch.from_dlpack(a)

    def zeros_f32(self, n: int):
        return self.cp.zeros(n, dtype=self.cp.float32)

    def empty(self, n: int):
        return self.cp.empty(n, dtype=self.cp.float32)

    def f32(self, a):
        return a

    def cast(self, a):
        return a

    def axpy_(self, out, alpha: float, v) -> None:
        self.cp.add(out, self.cp.float32(alpha) * v, out=out)


LIBS = {"torch": TorchLib, "numpy": NumpyLib, "cupy": CupyLib}


def spans(D: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, D)) for a in range(0, D, rows)]


def baseline(method: str, op: str, case: Case, x: dict, chunk_rows: int):
    """The callable for a baseline; materialised methods are one chunk of D rows."""
    lib = LIBS[method.removesuffix("_chunked")](case)
    rows = chunk_rows if method.endswith("_chunked") else case.D
    g, c, out = lib.wrap(x["g"]), lib.wrap(x["c"]), lib.wrap(x["out"])
    D, d, dist, parts = case.D, case.d, case.dist, spans(case.D, rows)

    def project():
        gen, acc = lib.generator(SEED), lib.zeros_f32(d)
        for a, b in parts:
            acc += lib.f32(lib.draw(gen, b - a, d, dist).T @ g[a:b])
        return lib.cast(acc)

    def expand(coef=c):
        gen, u = lib.generator(SEED), lib.empty(D)
        for a, b in parts:
            u[a:b] = lib.draw(gen, b - a, d, dist) @ coef
        return u

    def step():
        if len(parts) == 1:  # P fits: draw it once and use it for both products
            P = lib.draw(lib.generator(SEED), D, d, dist)
            lib.axpy_(out, -LR, P @ (P.T @ g))
            return out
        coef = project()
        gen = lib.generator(SEED)  # the same seed again: the same chunks, in the same order
        for a, b in parts:
            lib.axpy_(out[a:b], -LR, lib.draw(gen, b - a, d, dist) @ coef)
        return out

    return {"project": project, "expand": expand, "step": step}[op]


def build(method: str, op: str, case: Case, x: dict, chunk_rows: int):
    if method == "fused":
        return fused(op, case, x)
    return baseline(method, op, case, x, chunk_rows)


def check_baseline(method: str, case: Case) -> dict:
    """A baseline on 1,000 rows of the case (chunked ones in 3 chunks, the last one short) against a
    float64 product of the same P, redrawn from the same seed; and P's entries have the
    distribution's mean and variance (0, and 1, 1/3 or 1). Raises CheckFailed."""
    small = Case(case.dist, 1000, case.d, case.dtype, case.device)
    rows = 384 if method.endswith("_chunked") else small.D
    lib = LIBS[method.removesuffix("_chunked")](small)
    gen = lib.generator(SEED)
    P = torch.cat([lib.to_torch(lib.draw(gen, b - a, small.d, small.dist)).double().cpu()
                   for a, b in spans(small.D, rows)])
    x = make_inputs(small)
    g, c = x["g"].cpu().double(), x["c"].cpu().double()
    errs = {
        "project_rel_err": _rel_err(lib.to_torch(baseline(method, "project", small, x, rows)()), P.T @ g),
        "expand_rel_err": _rel_err(lib.to_torch(baseline(method, "expand", small, x, rows)()), P @ c),
    }
    coef = P.T @ g
    baseline(method, "step", small, x, rows)()
    errs["step_rel_err"] = _rel_err(x["out"], -LR * (P @ coef.to(case.torch_dtype).double()))
    tol = TOL[case.dtype]
    bad = {name: e for name, e in errs.items() if not e <= tol}
    var = ENTRY_VARIANCE[case.dist]
    if abs(P.mean().item()) > 5 * (var / P.numel()) ** 0.5 + 1e-3 or abs(P.var().item() / var - 1) > 0.1:
        bad["moments"] = (P.mean().item(), P.var().item())
    if bad:
        raise CheckFailed(f"baseline {method} wrong for {small.label()}: {bad} (tolerance {tol})")
    return errs

"""A short tour of the ops: ``python -m examples.demo [--device cpu|cuda] [--D N] [--d N]``.

1. Project a million-entry vector onto 256 random directions and expand it back,
   with the D×d basis generated inside the products (never stored).
2. Check the two products use the same matrix: <Pᵀg, c> = <g, P c>.
3. Random bases descent in a few lines on a quadratic, against a fixed basis:
   re-drawing the basis every step keeps descending, a fixed one stalls.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import rbd_cuda


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def descent(D: int, d: int, steps: int, redraw: bool, seed: int = 0) -> list[float]:
    """Minimise ½‖θ − θ*‖² with steps θ −= α P Pᵀ g; α = 1/(D + d) is the expected-optimal size."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(D, generator=gen)
    theta = torch.zeros(D)
    losses = []
    for t in range(steps):
        g = theta - target
        losses.append(0.5 * float(g.dot(g)))
        step = t if redraw else 0  # FPD keeps one basis for the whole run
        c = rbd_cuda.project(g, d, seed=seed, step=step)
        rbd_cuda.expand_(theta, c, -1.0 / (D + d), seed=seed, step=step)
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--D", type=int, default=1_000_000, help="vector length (parameters)")
    ap.add_argument("--d", type=int, default=256, help="random directions")
    args = ap.parse_args(argv)
    device, D, d = args.device, args.D, args.d

    print(f"rbd_cuda {rbd_cuda.__version__} (random stream v{rbd_cuda.backends.stream_version()}); device {device}, "
          f"{torch.get_num_threads()} CPU threads, CUDA kernels built: {rbd_cuda.backends.built_with_cuda()}")
    print(f"\n1. Project a vector of D = {D:,} entries onto d = {d} random directions.")
    print(f"   The basis P would take {4 * D * d / 2**30:.2f} GiB in fp32; it is generated on the fly.")
    g = torch.randn(D, device=device)
    rbd_cuda.project(g[:4096], d, seed=0)  # warm-up
    for dist in rbd_cuda.ops.DISTRIBUTIONS:
        kw = {"seed": 42, "step": 1, "distribution": dist}
        c, t_p = _timed(functools.partial(rbd_cuda.project, g, d, **kw), device)
        _, t_e = _timed(functools.partial(rbd_cuda.expand, c, D, **kw), device)
        print(f"   {dist:>10}: project {t_p * 1e3:8.1f} ms ({D * d / t_p / 1e9:6.2f} G entries/s), "
              f"expand {t_e * 1e3:8.1f} ms ({D * d / t_e / 1e9:6.2f} G entries/s)")

    print("\n2. Both products regenerate the same matrix: <Pᵀg, c> equals <g, P c>.")
    c = torch.randn(d, device=device)
    lhs = float(rbd_cuda.project(g, d, seed=7).double().dot(c.double()))
    rhs = float(g.double().dot(rbd_cuda.expand(c, D, seed=7).double()))
    print(f"   <Pᵀg, c> = {lhs:.6e}   <g, P c> = {rhs:.6e}   relative difference {abs(lhs - rhs) / abs(rhs):.1e}")

    small_D, small_d, steps = 2_000, 50, 200
    print(f"\n3. Descent on ½‖θ − θ*‖² (D = {small_D}, d = {small_d}, {steps} steps, θ −= P Pᵀ g / (D + d)):")
    rbd = descent(small_D, small_d, steps, redraw=True)
    fpd = descent(small_D, small_d, steps, redraw=False)
    for t in (0, 10, 50, 100, steps - 1):
        print(f"   step {t:4d}: re-drawn basis (RBD) loss {rbd[t]:10.3f}    fixed basis (FPD) loss {fpd[t]:10.3f}")
    print(f"   RBD reached {rbd[-1] / rbd[0]:.1%} of the initial loss; a fixed {small_d}-dim basis can "
          f"only remove its own {small_d}/{small_D} share and stalls at {fpd[-1] / fpd[0]:.1%}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

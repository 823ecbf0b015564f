"""Random Bases Descent (RBD) and the fixed-projection baseline (FPD) as torch optimizers.

Per compartment k (``compartments.py``) with d_k directions, each step:

    c_k = P_kᵀ g_k            (project the backprop gradient; P_k generated on the fly)
    θ_k ← θ_k − lr · s · P_k c_k   (expand back in place, no temporary of the model's size)

with a fresh basis every step (RBD: the optimizer step is the stream's ``step``) or one basis
for the whole run (FPD, Li et al. 2018: ``step`` stays 0). ``s`` is set by ``normalize``:

| normalize  | s              | E[Δθ] (entries with variance σ²: 1 normal/rademacher, 1/3 uniform) |
|------------|----------------|---------------------------------------------------------------|
| "unbiased" | 1 / (d σ²)     | −lr · g  (SGD in expectation)                                  |
| "paper"    | 1 / D          | −lr · (d σ² / D) · g  (every basis vector divided by √D, D = all parameters of the optimizer: the paper's auto_norm, used for its Table 1) |
| "dim"      | 1 / d          | −lr · σ² · g  (the paper's normalized=False)                   |
| "none"     | 1              | −lr · d σ² · g                                                 |
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from .compartments import Compartment, plan

NORMALIZATIONS = ("unbiased", "paper", "dim", "none")
ENTRY_VARIANCE = {"normal": 1.0, "uniform": 1.0 / 3.0, "rademacher": 1.0}


def basis_scale(normalize: str, distribution: str, dim: int, total_numel: int) -> float:
    """The constant s of the update −lr · s · P Pᵀ g (module docstring's table)."""
    if normalize == "unbiased":
        return 1.0 / (dim * ENTRY_VARIANCE[distribution])
    if normalize == "paper":
        return 1.0 / total_numel
    if normalize == "dim":
        return 1.0 / dim
    return 1.0


class RBD(torch.optim.Optimizer):
    """Random Bases Descent: SGD on the projection of each gradient onto re-drawn random bases.

    Args:
        params: parameters or named parameters (``model.named_parameters()``; needed for
            ``compartments="layer"``) or param groups, as for ``torch.optim.SGD``.
        lr: learning rate (per param group as usual).
        dim: directions per compartment (int), or a rule from ``rbd_cuda.optim``:
            ``Fixed(d)``, ``Proportional(total)``, ``Compression(factor, minimum)``.
        compartments: ``"global"``, ``"tensor"``, ``"layer"``, an int (pack parameters into
            compartments of at most that many entries, splitting large tensors) or a list of
            parameter lists. Each compartment draws its own basis (its own stream id).
        distribution: ``"normal"``, ``"uniform"`` or ``"rademacher"`` entries.
        normalize: ``"unbiased"``, ``"paper"``, ``"dim"`` or ``"none"`` (module docstring).
        momentum: the paper's EMA form, v ← m v + (1 − m) u, θ ← θ − lr v (0 disables it).
        seed: 64-bit seed of the bases; with the step count it fixes every basis of the run.
        diagnostics: after each step, ``opt.diagnostics`` holds per compartment the cosine between
            the update direction P Pᵀ g and the gradient g (costs one extra expand per
            compartment) and statistics of the coefficients c.
        record: keep every step's coefficients in ``opt.record`` (d floats per compartment per
            step), from which ``replay`` rebuilds the trained parameters exactly.

    Parameters whose ``grad`` is None are skipped (neither projected nor updated), as in SGD.
    """

    _redraw = True

    def __init__(self, params, lr: float, dim, *, compartments="global", distribution: str = "normal",
                 normalize: str = "unbiased", momentum: float = 0.0, seed: int = 0,
                 diagnostics: bool = False, record: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"rbd_cuda: lr must be non-negative, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"rbd_cuda: momentum must be in [0, 1), got {momentum}")
        if distribution not in ENTRY_VARIANCE:
            raise ValueError(f"rbd_cuda: distribution must be one of {tuple(ENTRY_VARIANCE)}, got {distribution!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"rbd_cuda: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        ops._seed_to_int64(seed)  # validates the seed
        super().__init__(params, {"lr": lr, "momentum": momentum})

        named = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"], strict=True):
                if not p.is_contiguous():
                    raise ValueError(f"rbd_cuda: parameter {name or ''} must be contiguous (the update "
                                     "is applied in place to its flattened view)")
                named.append((name, p))
        if compartments == "layer" and any(name is None for name, _ in named):
            raise ValueError("rbd_cuda: compartments='layer' needs named parameters: pass "
                             "model.named_parameters()")
        self.compartments: list[Compartment] = plan(
            [(name or f"param{i}", p) for i, (name, p) in enumerate(named)], compartments, dim)
        self.seed = seed
        self.distribution = distribution
        self.normalize = normalize
        self.steps_taken = 0
        self.track_diagnostics = diagnostics
        self.diagnostics: list[dict] = []
        self.record: list[dict] | None = [] if record else None
        self._total_numel = sum(p.numel() for _, p in named)
        self._group_of = {id(p): group for group in self.param_groups for p in group["params"]}

    def _scale(self, comp: Compartment) -> float:
        return basis_scale(self.normalize, self.distribution, comp.dim, self._total_numel)

    def basis_step(self) -> int:
        """The stream ``step`` of the basis the next ``step()`` uses."""
        return self.steps_taken if self._redraw else 0

    def stream_kwargs(self, comp: Compartment, stream: int | None = None) -> dict:
        """The keywords that address compartment ``comp``'s basis for the next step (on stream
        ``stream`` instead of ``comp.stream`` when given: distributed training's per-rank bases)."""
        step = self.basis_step()
        if step >= 2**32:
            raise RuntimeError("rbd_cuda: the random stream has 2**32 steps; this run has used them all")
        return {"seed": self.seed, "step": step, "stream": comp.stream if stream is None else stream,
                "distribution": self.distribution}

    def coefficients(self, comp: Compartment, stream: int | None = None) -> torch.Tensor | None:
        """``c = Pᵀ g`` of compartment ``comp`` (fp32; on ``stream`` instead of ``comp.stream`` when
        given), or None when none of its parameters has a grad."""
        kw = self.stream_kwargs(comp, stream)
        c = None
        for seg in comp.segments:
            if seg.param.grad is None:
                continue
            part = ops.project(seg.view(seg.param.grad), comp.dim, row_offset=seg.row_offset, **kw).float()
            c = part if c is None else c + part.to(c.device)
        return c

    def apply(self, comp: Compartment, c: torch.Tensor, segments: list[int]) -> None:
        """θ ← θ − lr · s · P c on the segments of ``comp`` listed by index (those with a grad)."""
        self.apply_sum(comp, [(c, comp.stream, segments)])

    def apply_sum(self, comp: Compartment, terms: list[tuple[torch.Tensor, int, list[int]]]) -> None:
        """θ ← θ − lr · s · Σₜ Pₜ cₜ for terms (cₜ, stream, segment indices): several bases'
        updates of one compartment in one step (``rbd_cuda.distributed``, a basis per rank).
        Momentum sees their sum as the step's one update."""
        scale = self._scale(comp)
        for index in sorted({k for _, _, segments in terms for k in segments}):
            seg = comp.segments[index]
            group = self._group_of[id(seg.param)]
            lr, momentum = group["lr"], group["momentum"]
            target = seg.view(seg.param)
            mine = [(c.to(seg.param.device), self.stream_kwargs(comp, stream))
                    for c, stream, segments in terms if index in segments]
            if momentum == 0.0:
                for coeffs, kw in mine:
                    ops.expand_(target, coeffs, -lr * scale, row_offset=seg.row_offset, **kw)
                continue
            state = self.state[seg.param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(seg.param)
            buf = seg.view(state["momentum_buffer"])
            buf.mul_(momentum)
            for coeffs, kw in mine:
                ops.expand_(buf, coeffs, (1.0 - momentum) * scale, row_offset=seg.row_offset, **kw)
            target.add_(buf, alpha=-lr)

    def _diagnose(self, comp: Compartment, c: torch.Tensor, segments: list[int]) -> dict:
        kw = self.stream_kwargs(comp)
        dot = u_sq = g_sq = 0.0
        for index in segments:
            seg = comp.segments[index]
            g = seg.view(seg.param.grad).double()
            u = ops.expand(c.to(g.device), seg.numel, row_offset=seg.row_offset, **kw).double()
            dot, u_sq, g_sq = dot + float(u @ g), u_sq + float(u @ u), g_sq + float(g @ g)
        return {"stream": comp.stream, "cosine": dot / max((u_sq * g_sq) ** 0.5, 1e-300),
                "coeff_mean": float(c.mean()), "coeff_std": float(c.std()) if c.numel() > 1 else 0.0,
                "coeff_absmax": float(c.abs().max())}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        diagnostics, recorded = [], {}
        for comp in self.compartments:
            c = self.coefficients(comp)
            if c is None:
                continue
            segments = [k for k, seg in enumerate(comp.segments) if seg.param.grad is not None]
            if self.track_diagnostics:
                diagnostics.append(self._diagnose(comp, c, segments))
            if self.record is not None:
                recorded[comp.stream] = (c.detach().cpu(), segments)
            self.apply(comp, c, segments)
        if self.track_diagnostics:
            self.diagnostics = diagnostics
        if self.record is not None:
            self.record.append({"step": self.steps_taken, "lr": [g["lr"] for g in self.param_groups],
                                "coefficients": recorded})
        self.steps_taken += 1
        return loss

    # ---- introspection and checkpoints ----------------------------------------------------

    def summary(self) -> dict:
        """Compartments (name, stream, entries, directions) and the overall compression ratio."""
        rows = [{"name": c.name, "stream": c.stream, "numel": c.numel, "dim": c.dim} for c in self.compartments]
        total_dim = sum(c.dim for c in self.compartments)
        return {"compartments": rows, "numel": self._total_numel, "dim": total_dim,
                "compression": self._total_numel / total_dim}

    def _layout(self) -> list[list[int]]:
        return [[c.stream, c.dim, c.numel] for c in self.compartments]

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rbd"] = {"steps_taken": self.steps_taken, "seed": self.seed, "distribution": self.distribution,
                     "normalize": self.normalize, "layout": self._layout()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        rbd = state_dict.pop("rbd", None)
        if rbd is None:
            raise ValueError("rbd_cuda: this state_dict has no 'rbd' entry (not saved by RBD/FPD)")
        if [list(x) for x in rbd["layout"]] != self._layout():
            raise ValueError("rbd_cuda: the saved compartments (stream, dim, numel) differ from this "
                             f"optimizer's: {rbd['layout']} vs {self._layout()}")
        super().load_state_dict(state_dict)
        self.steps_taken = int(rbd["steps_taken"])
        self.seed = rbd["seed"]
        self.distribution = rbd["distribution"]
        self.normalize = rbd["normalize"]


class FPD(RBD):
    """Fixed Projection Descent (Li et al. 2018): RBD with one basis for the whole run.

    Equivalent to SGD on θ = θ₀ + P c with P fixed. The paper's code evaluated the forward pass at
    θ_t + P c_{t−1} (its coordinates were never reset); here the model is always at θ_t, as in Li et al.
    """

    _redraw = False


@torch.no_grad()
def replay(optimizer: RBD, record: list[dict]) -> None:
    """Re-apply a recorded run: ``optimizer`` is a fresh RBD/FPD with the same arguments, built on
    the initial parameters; afterwards they equal the trained ones bit for bit (same device).

    The record holds, per step, the learning rates and d coefficients per compartment: a model
    update that ships as d floats per step instead of D.
    """
    by_stream = {comp.stream: comp for comp in optimizer.compartments}
    for entry in record:
        if entry["step"] != optimizer.steps_taken:
            raise ValueError(f"rbd_cuda: the record continues at step {entry['step']}, the optimizer "
                             f"is at step {optimizer.steps_taken}")
        for group, lr in zip(optimizer.param_groups, entry["lr"], strict=True):
            group["lr"] = lr
        for stream, (c, segments) in entry["coefficients"].items():
            optimizer.apply(by_stream[stream], c, segments)
        optimizer.steps_taken += 1


class NES(RBD):
    """The natural-evolution-strategies baseline of the paper (Salimans et al. 2017 style).

    Each step evaluates the loss at θ + σ ε_i for ``population`` directions ε_i (the columns of
    one random basis over all parameters, re-drawn every step; never materialised: each
    perturbation is one ``expand_`` of a single column), shapes the fitness by rank (the lowest
    loss gets +0.5, the highest −0.5), and moves θ ← θ + lr · s · Σ_i a_i ε_i / (σ n). With
    ``antithetic`` the population is n/2 directions evaluated at θ ± σ ε. ``normalize="paper"``
    divides the update by √D as the paper's code does (s = 1/√D); ``"none"`` uses s = 1.

    ``step(closure)`` needs a closure that returns the loss at the current parameters (no
    backward needed; it runs under ``torch.no_grad``); ``step`` returns the population's mean
    loss. The paper gives each population member its own minibatch: a closure that draws a new
    batch per call does that.
    """

    def __init__(self, params, lr: float, population: int, sigma: float = 0.01, *, antithetic: bool = False,
                 distribution: str = "normal", normalize: str = "paper", seed: int = 0):
        if isinstance(population, bool) or not isinstance(population, int) or population < 2:
            raise ValueError(f"rbd_cuda: population must be an int >= 2, got {population!r}")
        if antithetic and population % 2:
            raise ValueError(f"rbd_cuda: an antithetic population must be even, got {population}")
        if not sigma > 0:
            raise ValueError(f"rbd_cuda: sigma must be positive, got {sigma}")
        if normalize not in ("paper", "none"):
            raise ValueError(f"rbd_cuda: NES normalize must be 'paper' or 'none', got {normalize!r}")
        directions = population // 2 if antithetic else population
        super().__init__(params, lr, directions, compartments="global", distribution=distribution,
                         normalize="none", seed=seed)
        self.population, self.sigma, self.antithetic = population, sigma, antithetic
        self.nes_normalize = normalize

    def _perturb(self, comp: Compartment, column: int, amount: float) -> None:
        kw = {**self.stream_kwargs(comp), "col_offset": column}
        for seg in comp.segments:
            coeff = torch.full((1,), amount, device=seg.param.device)
            ops.expand_(seg.view(seg.param), coeff, 1.0, row_offset=seg.row_offset, **kw)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if closure is None:
            raise ValueError("rbd_cuda: NES.step needs a closure that returns the loss")
        comp = self.compartments[0]
        saved = [seg.param.detach().clone() for seg in comp.segments]
        members = [(j, sign) for j in range(comp.dim) for sign in ((1.0, -1.0) if self.antithetic else (1.0,))]
        losses = []
        for j, sign in members:
            self._perturb(comp, j, sign * self.sigma)
            losses.append(float(closure()))
            for seg, original in zip(comp.segments, saved, strict=True):
                seg.param.copy_(original)  # exact restore: no drift from adding and subtracting
        n = len(members)
        order = sorted(range(n), key=lambda i: -losses[i])  # rank 0 = highest loss
        shaped = [0.0] * n
        for rank, i in enumerate(order):
            shaped[i] = rank / (n - 1) - 0.5
        c = torch.zeros(comp.dim)
        for (j, sign), a in zip(members, shaped, strict=True):
            c[j] += sign * a / (self.sigma * n)
        scale = self._total_numel ** -0.5 if self.nes_normalize == "paper" else 1.0
        kw = self.stream_kwargs(comp)
        for seg in comp.segments:
            lr = self._group_of[id(seg.param)]["lr"]
            ops.expand_(seg.view(seg.param), c.to(seg.param.device), lr * scale, row_offset=seg.row_offset, **kw)
        self.steps_taken += 1
        return sum(losses) / n

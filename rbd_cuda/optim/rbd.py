"""Random Bases Descent (RBD) and the fixed-projection baseline (FPD) as torch optimizers.

Per compartment k (``rbd_cuda.layout``) with d_k directions, each step:

    c_k = P_kᵀ g_k            (project the backprop gradient; P_k generated on the fly)
    θ_k ← θ_k − lr · s · P_k c_k   (expand back in place, no temporary of the model's size)

with a fresh basis every step (RBD: the optimizer step is the stream's ``step``) or one basis
for the whole run (FPD, Li et al. 2018: ``step`` stays 0). ``s`` is set by ``normalize``
(``rbd_cuda.basis.scale``; entries of variance σ²: 1 normal/rademacher, 1/3 uniform):

| normalize    | s          | E[Δθ]                                                              |
|--------------|------------|--------------------------------------------------------------------|
| "unbiased"   | 1 / (d σ²) | −lr · g  (SGD in expectation)                                      |
| "paper"      | 1 / D      | −lr · (d σ² / D) · g  (basis vectors divided by √D, D = all parameters of the optimizer: the paper's auto_norm, its Table 1) |
| "dim"        | 1 / d      | −lr · σ² · g  (the paper's normalized=False)                       |
| "none"       | 1          | −lr · d σ² · g                                                     |
| "projection" | 1 / (n σ²) | −lr · (d / n) · g  (n = the compartment's entries)                 |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from ..basis import expand_segments
from . import formats, guards
from .base import EAGER_STEP, RandomBasesOptimizer
from .callers import stepped_by_checkpoint
from .exchange import Exchange, RowShards, Term

__all__ = ["FPD", "RBD", "Exchange", "replay"]


class RBD(RandomBasesOptimizer):
    """Random Bases Descent: SGD on the projection of each gradient onto re-drawn random bases.

    Args:
        params: parameters or named parameters (``model.named_parameters()``; needed for
            ``compartments="layer"``) or param groups, as for ``torch.optim.SGD``; float32,
            float16 or bfloat16, contiguous. All groups are given here: ``add_param_group`` is
            refused, since the compartments are planned over every parameter at construction.
        lr: learning rate (per param group; read at every step, so schedulers work).
        dim: directions per compartment (int), or a rule from ``rbd_cuda.layout``:
            ``Fixed(d)``, ``Proportional(total)``, ``Compression(factor, minimum)``.
        compartments: ``"global"``, ``"tensor"``, ``"layer"``, an int (pack parameters into
            compartments of at most that many entries, splitting large tensors) or a list of
            parameter lists. Each compartment draws its own basis (its own stream id).
        distribution: ``"normal"``, ``"uniform"`` or ``"rademacher"`` entries.
        normalize: one of ``rbd_cuda.basis.NORMALIZATIONS`` (module docstring).
        momentum: the paper's EMA form, v ← m v + (1 − m) u, θ ← θ − lr v (0 disables it; per
            param group, read at every step).
        weight_decay: decoupled weight decay (AdamW's): each step first multiplies every parameter
            it updates by 1 − lr · weight_decay, outside the subspace and the momentum (per param
            group, read at every step; 0 disables it).
        seed: 64-bit seed of the bases; with the step count it fixes every basis of the run.
        diagnostics: after each step, ``opt.diagnostics`` holds per compartment the cosine between
            the update direction P Pᵀ g and the gradient g (costs one extra expand per
            compartment) and statistics of the coefficients c.
        record: keep every step's coefficients, learning rates and momenta in ``opt.record``
            (a dict of plain values with the run's seed and layout: d floats per compartment per
            step), from which ``replay`` rebuilds the trained parameters exactly.
        exchange: how coefficients are combined before the update (``Exchange``; distributed
            training passes its own).

    Over FSDP2's row shards (``fully_shard(model, mesh=...)`` on a 1-D mesh: every parameter a
    DTensor with placements ``(Shard(0),)``), every rank of the mesh builds the optimizer alike
    and steps it: each projects its shards, the coefficients are summed across the mesh (one
    all-reduce of Σd floats per step, ``RowShards``) and each expands them into its shards, as one
    process would on the whole model (docs/distributed.md, "Sharded parameters"). ``record``,
    ``diagnostics`` and ``exchange`` are refused there.

    Param groups take ``lr``, ``momentum`` and ``weight_decay``; any other key is refused.
    Parameters whose ``grad`` is None are skipped (neither projected, decayed nor updated), as in
    SGD. A step is all-or-nothing: the groups' values, every gradient and momentum buffer are
    checked before any parameter changes, and a gradient holding NaN or infinite values is refused
    with a ``ValueError`` naming its parameter (GradScaler skips such steps without calling
    ``step``). ``step`` runs eagerly under ``torch.compile`` (it is
    excluded from tracing, so its step count and bases advance as in eager mode).
    """

    HYPERPARAMETERS: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "lr": (0.0, float("inf"), False), "momentum": (0.0, 1.0, True), "weight_decay": (0.0, float("inf"), False)}
    STATE_KEYS = ("momentum_buffer",)

    def __init__(self, params, lr: float, dim, *, compartments="global", distribution: str = "normal",
                 normalize: str = "unbiased", momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
                 diagnostics: bool = False, record: bool = False, exchange: Exchange | None = None):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, dim,
                         compartments=compartments, distribution=distribution, normalize=normalize, seed=seed,
                         shards=exchange is None)
        if self.mesh is not None and (record or diagnostics):
            # Each rank's coefficients and gradient are its shards' part of them.
            raise ValueError(f"rbd_cuda: {type(self).__name__} over row shards (FSDP2) keeps no record and no "
                             "diagnostics: build it with record=False and diagnostics=False")
        self.track_diagnostics = diagnostics
        self.diagnostics: list[dict] = []
        self.record: dict | None = {"format": formats.RECORD_FORMAT, **self.config(), "steps": []} if record else None
        self.exchange = exchange if exchange is not None else RowShards(self.mesh) if self.mesh else Exchange()
        self.exchange.bind(self)

    @torch.no_grad()
    def apply_coefficients(self, terms: Sequence[Sequence[Term]], hyper: list[dict[str, float]] | None = None) -> None:
        """The update of one step from its coefficients: per compartment, θ ← θ − lr · s · Σₜ Pₜ cₜ
        over its terms (cₜ, stream, segment indices), after the decoupled weight decay, with each
        parameter's group values (``hyper``, default: the groups' values now); momentum sees a
        compartment's terms as the step's one update. ``step`` ends with it and ``replay`` re-applies
        recorded coefficients with it; the step count is the caller's to advance.

        One ``expand_grouped_`` call updates every compartment (per device and dtype of the
        parameters), and one more per further term a compartment has (the independent bases of
        distributed training: one per rank), since a call's outputs must not overlap."""
        hyper = self.hyperparameters() if hyper is None else hyper
        if any(group["weight_decay"] for group in hyper):
            self._decay(self._updated(terms), hyper)
        buffers = {}
        if any(group["momentum"] for group in hyper):
            for index, comp_terms in enumerate(terms):
                comp, groups = self.compartments[index], self._segment_groups[index]
                for k in sorted({k for _, _, segments in comp_terms for k in segments}):
                    momentum = hyper[groups[k]]["momentum"]
                    if momentum:
                        state = self.state[comp.segments[k].param]
                        if "momentum_buffer" not in state:
                            state["momentum_buffer"] = torch.zeros_like(comp.segments[k].param)
                        buffers[index, k] = comp.segments[k].piece(state["momentum_buffer"]).mul_(momentum)
        # Per group, the alpha of a segment of scale s: (1 − momentum)·s into its buffer, −lr·s into θ.
        factors = [1.0 - group["momentum"] if group["momentum"] else -group["lr"] for group in hyper]
        for round_ in range(max((len(comp_terms) for comp_terms in terms), default=0)):
            updates = []
            for index, comp_terms in enumerate(terms):
                if round_ >= len(comp_terms):
                    continue
                c, stream, segments = comp_terms[round_]
                segs, groups, s = self.compartments[index].segments, self._segment_groups[index], self._scales[index]
                outs = [buffers[index, k] if (index, k) in buffers else segs[k].piece(segs[k].param) for k in segments]
                updates.append((index, c, stream, outs, segments, [factors[groups[k]] * s for k in segments]))
            self.expand_updates(updates)
        for (index, k), buf in buffers.items():
            seg = self.compartments[index].segments[k]
            seg.piece(seg.param).add_(buf, alpha=-hyper[self._segment_groups[index][k]]["lr"])

    def _diagnose(self, index: int, c: torch.Tensor, segments: list[int]) -> dict:
        comp = self.compartments[index]
        segs = [comp.segments[k] for k in segments]
        table = self._table(((index, comp.stream),), tuple((0, k) for k in segments))
        updates = expand_segments(table, c.to(segs[0].param.device), self.basis(comp))
        dot = u_sq = g_sq = 0.0
        for seg, u in zip(segs, updates, strict=True):
            g = seg.param.grad.reshape(-1)[seg.start: seg.start + seg.numel].double()
            u = u.to(g.device).double()
            dot, u_sq, g_sq = dot + float(u @ g), u_sq + float(u @ u), g_sq + float(g @ g)
        return {"stream": comp.stream, "cosine": dot / max((u_sq * g_sq) ** 0.5, 1e-300),
                "coeff_mean": float(c.mean()), "coeff_std": float(c.std()) if c.numel() > 1 else 0.0,
                "coeff_absmax": float(c.abs().max())}

    def _updated(self, terms: Sequence[Sequence[Term]]) -> list[torch.Tensor]:
        """The parameters ``terms`` update (with distributed training: those any rank updates)."""
        touched = {id(comp.segments[k].param) for comp, comp_terms in zip(self.compartments, terms, strict=True)
                   for _, _, segments in comp_terms for k in segments}
        return [p for p in self._params if id(p) in touched]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer (formats 1–3); everything is checked (configuration,
        groups, step count, state tensors) before anything changes, on every rank where the
        exchange spans several (each rank loads its own copy, or its own shards' state)."""
        try:
            checked, problem = self.check_state_dict(state_dict), None
        except (ValueError, TypeError) as error:  # raised on every rank after the exchange's agreement
            checked, problem = None, error
        self.exchange.agree_on_load(self, checked, problem)
        self._load_checked(checked)

    @torch.compiler.disable(reason=EAGER_STEP)
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if stepped_by_checkpoint():
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can be refused is checked before the first parameter changes.
        hyper = self.hyperparameters()
        present = guards.present_gradients(self)
        guards.check_buffers(self, present)
        coeffs = self.project_gradients(present, [self.exchange.stream(comp) for comp in self.compartments])
        terms = self.exchange.combine(self.compartments, coeffs, present, self.steps_taken)
        guards.check_finite_step(self, terms, present)
        if self.track_diagnostics:
            self.diagnostics = [self._diagnose(index, c, segments) for index, (c, segments)
                                in enumerate(zip(coeffs, present, strict=True)) if c is not None]
        self.apply_coefficients(terms, hyper)
        if self.record is not None:
            self.record["steps"].append({
                "step": self.steps_taken, **{name: [h[name] for h in hyper] for name in self.HYPERPARAMETERS},
                "coefficients": {comp.stream: (c.detach().cpu(), segments) for comp, c, segments
                                 in zip(self.compartments, coeffs, present, strict=True) if c is not None}})
        self.steps_taken += 1
        self.exchange.after_step(self)
        return loss


class FPD(RBD):
    """Fixed Projection Descent (Li et al. 2018): RBD with one basis for the whole run.

    Equivalent to SGD on θ = θ₀ + P c with P fixed. The paper's code evaluated the forward pass at
    θ_t + P c_{t−1} (its coordinates were never reset); here the model is always at θ_t, as in Li et al.
    """

    redraw = False


@torch.no_grad()
def replay(optimizer: RBD, record: dict) -> None:
    """Re-apply a recorded run: ``optimizer`` is a fresh RBD/FPD built with the same arguments on
    the initial parameters; afterwards they equal the trained ones bit for bit (same device).

    The record (``RBD(..., record=True).record``) holds the run's seed, distribution,
    normalisation and layout, and per step the groups' learning rates and momenta and d
    coefficients per compartment: a model update that ships as d floats per step instead of D.
    An optimizer that differs from the recorded one in any of these is refused.
    """
    formats.check_record(optimizer, record)
    index_of = {comp.stream: k for k, comp in enumerate(optimizer.compartments)}
    for entry in record["steps"]:
        if entry["step"] != optimizer.steps_taken:
            raise ValueError(f"rbd_cuda: the record continues at step {entry['step']}, the optimizer "
                             f"is at step {optimizer.steps_taken}")
        for group, lr, momentum, wd in zip(optimizer.param_groups, entry["lr"], entry["momentum"],
                                           entry["weight_decay"], strict=True):
            group["lr"], group["momentum"], group["weight_decay"] = lr, momentum, wd
        terms = [[] for _ in optimizer.compartments]
        for stream, (c, segments) in entry["coefficients"].items():
            terms[index_of[stream]].append((c, stream, segments))
        optimizer.apply_coefficients(terms)
        optimizer.steps_taken += 1

"""The one base of the optimizers that step in random bases (RBD, FPD, NES).

It owns what they share: the compartments (``rbd_cuda.layout``), the bases (``rbd_cuda.basis``),
the param groups (read at step time, so schedulers and loaded state dicts take effect), the
checks that make a step all-or-nothing, and the state dict, which holds everything that decides
the trajectory and is checked on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..basis import (
    Basis,
    check_distribution,
    check_finite,
    check_normalize,
    check_seed,
    expand_compartment_,
    scale,
)
from ..layout import Compartment, describe, plan

# Version of the "rbd" entry of state_dict(). Entries without "format" were written by a02b069
# (whose optimizer kept only steps_taken and a layout check); they still load.
FORMAT = 2
PARAMETER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RandomBasesOptimizer(torch.optim.Optimizer):
    """Base of RBD, FPD and NES: ``params`` are planned into compartments once, at construction.

    Subclasses set ``HYPERPARAMETERS`` (each group's values, validated at construction and at
    every step) and ``redraw`` (a new basis per step, or one for the run), and write ``step``.
    """

    # name -> (low, high, high excluded) of each param-group hyperparameter
    HYPERPARAMETERS: ClassVar[dict[str, tuple[float, float, bool]]] = {"lr": (0.0, float("inf"), False)}
    redraw = True

    def __init__(self, params, defaults: dict, dim, *, compartments, distribution: str, normalize: str, seed):
        self.seed = check_seed(seed)  # a plain int, so state dicts load with weights_only=True
        self.distribution = check_distribution(distribution)
        self.normalize = check_normalize(normalize)
        self._planned = False
        super().__init__(params, defaults)

        named = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"], strict=True):
                label = name or f"param{len(named)}"
                if p.dtype not in PARAMETER_DTYPES:
                    raise ValueError(f"rbd_cuda: parameter {label} has dtype {p.dtype}; the random-bases ops "
                                     "update float32, float16 or bfloat16 parameters")
                if not p.is_contiguous():
                    raise ValueError(f"rbd_cuda: parameter {label} must be contiguous (the update is "
                                     "applied in place to its flattened view)")
                named.append((name, p))
        if compartments == "layer" and any(name is None for name, _ in named):
            raise ValueError("rbd_cuda: compartments='layer' needs named parameters: pass "
                             "model.named_parameters()")
        self.compartments: list[Compartment] = plan(
            [(name or f"param{i}", p) for i, (name, p) in enumerate(named)], compartments, dim)
        self._params = [p for _, p in named]
        group_of = {id(p): k for k, group in enumerate(self.param_groups) for p in group["params"]}
        # Group index of every segment: groups are looked up at step time, since load_state_dict
        # and schedulers replace or change the group dicts.
        self._segment_groups = [[group_of[id(s.param)] for s in c.segments] for c in self.compartments]
        self.total_numel = sum(p.numel() for p in self._params)
        self.steps_taken = 0
        self._planned = True

    def add_param_group(self, param_group: dict) -> None:
        if self._planned:
            raise ValueError("rbd_cuda: add_param_group is not supported once the optimizer is built: the "
                             "compartments and their bases are planned over all parameters at construction; "
                             "build a new optimizer with every param group instead")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # Plain floats (not numpy scalars), so state dicts load with weights_only=True.
        group.update(zip(self.HYPERPARAMETERS, self._check_group(len(self.param_groups) - 1, group), strict=True))

    def _check_group(self, index: int, group: dict) -> tuple[float, ...]:
        return tuple(check_finite(f"{name} (param group {index})", group[name], low=low, high=high, open_high=open_)
                     for name, (low, high, open_) in self.HYPERPARAMETERS.items())

    def hyperparameters(self) -> list[tuple[float, ...]]:
        """Every group's ``HYPERPARAMETERS`` values now (validated: a step changes nothing when one
        is not finite)."""
        return [self._check_group(k, group) for k, group in enumerate(self.param_groups)]

    # ---- bases ------------------------------------------------------------------------------

    def basis_step(self) -> int:
        """The stream ``step`` of the basis the next ``step()`` uses."""
        return self.steps_taken if self.redraw else 0

    def basis(self, comp: Compartment, stream: int | None = None) -> Basis:
        """Compartment ``comp``'s basis for the next step (on ``stream`` instead of ``comp.stream``
        when given: distributed training's per-rank bases)."""
        return Basis(self.seed, self.basis_step(), comp.stream if stream is None else stream, self.distribution)

    def stream_kwargs(self, comp: Compartment) -> dict:
        """The ops' keywords addressing ``comp``'s basis for the next step."""
        return self.basis(comp).kwargs

    def scale(self, comp: Compartment, *, root: bool = False) -> float:
        """s of ``comp`` (``rbd_cuda.basis.scale``), or √s with ``root``."""
        return scale(self.normalize, self.distribution, comp.dim, comp.numel, self.total_numel, root=root)

    def _expand(self, basis: Basis, coeffs: torch.Tensor, targets: Sequence[tuple[torch.Tensor, int, float]],
                col_offset: int = 0) -> None:
        """``out += alpha · P c`` for ``(out, row_offset, alpha)`` targets: one product call per
        distinct alpha (segments of one compartment in groups with other learning rates)."""
        by_alpha: dict[float, tuple[list, list]] = {}
        for out, row_offset, alpha in targets:
            outs, rows = by_alpha.setdefault(alpha, ([], []))
            outs.append(out)
            rows.append(row_offset)
        for alpha, (outs, rows) in by_alpha.items():
            expand_compartment_(basis, outs, rows, coeffs, alpha, col_offset=col_offset)

    # ---- introspection and checkpoints ----------------------------------------------------

    def summary(self) -> dict:
        """Compartments (name, stream, entries, directions) and the overall compression ratio."""
        rows = [{"name": c.name, "stream": c.stream, "numel": c.numel, "dim": c.dim} for c in self.compartments]
        total_dim = sum(c.dim for c in self.compartments)
        return {"compartments": rows, "numel": self.total_numel, "dim": total_dim,
                "compression": self.total_numel / total_dim}

    def config(self) -> dict:
        """Everything besides the param groups and the step count that decides the trajectory, as
        plain values: saved by ``state_dict``, checked by ``load_state_dict`` and ``replay``."""
        return {"optimizer": type(self).__name__, "seed": self.seed, "distribution": self.distribution,
                "normalize": self.normalize, "redraw": self.redraw,
                "compartments": describe(self.compartments, self._params)}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rbd"] = {"format": FORMAT, "steps_taken": self.steps_taken, **self.config()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("rbd", None)
        if saved is None:
            raise ValueError(f"rbd_cuda: this state_dict has no 'rbd' entry (not saved by {type(self).__name__})")
        if "format" not in saved:  # a02b069: its layout entries are [stream, dim, numel]
            mine = [entry[:3] for entry in describe(self.compartments, self._params)]
            if [list(x) for x in saved["layout"]] != mine:
                raise ValueError("rbd_cuda: the saved compartments (stream, dim, numel) differ from this "
                                 f"optimizer's: {saved['layout']} vs {mine}")
        else:
            if saved["format"] != FORMAT:
                raise ValueError(f"rbd_cuda: state_dict format {saved['format']} is not this version's ({FORMAT})")
            differ = [f"{key}: {saved.get(key)!r} saved, {value!r} here" for key, value in self.config().items()
                      if saved.get(key) != value]
            if differ:
                raise ValueError("rbd_cuda: the state_dict is from an optimizer built with other arguments, "
                                 "which would give another trajectory: " + "; ".join(differ))
        super().load_state_dict(state_dict)
        self.hyperparameters()  # the loaded groups must hold valid values too
        self.steps_taken = int(saved["steps_taken"])

"""How a step of ``RBD``/``FPD`` turns this process's coefficients into the updates it applies: the
default ``Exchange`` (each compartment's own coefficients on its own basis), and ``RowShards``,
the sum across an FSDP2 mesh of the ranks' projections of their row shards.
``rbd_cuda.distributed`` plugs in its ``Collective`` (all-reduce or all-gather across ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.distributed as dist

from ..layout import Compartment, spans
from .guards import refuse_copy
from .ranks import agree, agree_on_load, collective_device, run_collective

# (coefficients, stream of their basis, indices of the compartment's segments they update)
Term = tuple[torch.Tensor, int, list[int]]


class Exchange:
    """How a step turns this process's coefficients into the updates it applies.

    This default applies each compartment's own coefficients on its own basis. Distributed
    training (``rbd_cuda.distributed``) plugs in one that all-reduces or all-gathers them.
    """

    def bind(self, optimizer) -> None:
        """Called once, at the end of the optimizer's construction."""

    def stream(self, comp: Compartment) -> int:
        """The stream this process projects ``comp``'s gradient on."""
        return comp.stream

    def combine(self, compartments: Sequence[Compartment], coeffs: Sequence[torch.Tensor | None],
                present: Sequence[list[int]], step: int) -> list[list[Term]]:
        """Per compartment, the terms to apply, from this process's coefficients (None where no
        segment has a gradient) and the indices of the segments that have one."""
        return [[(c, comp.stream, segments)] if c is not None else []
                for comp, c, segments in zip(compartments, coeffs, present, strict=True)]

    def after_step(self, optimizer) -> None:
        """Called after every step (consistency checks)."""

    def agree_on_load(self, optimizer, checked: tuple[dict, int] | None, problem: Exception | None) -> None:
        """Called by ``load_state_dict`` with what ``check_state_dict`` returned, or why it refused
        the state dict; raises to refuse it (before anything is loaded)."""
        if problem is not None:
            raise problem


class RowShards(Exchange):
    """The exchange of RBD and FPD over row shards (FSDP2's, ``rbd_cuda.sharding.local_pieces``).

    Each rank projected the pieces of its shards on the rows of their global positions; Pᵀg is the
    sum of these over the ranks, so one all-reduce (sum) of every compartment's coefficients over
    the mesh's process group (Σd floats) hands every rank the whole gradient's coefficients, and
    each rank expands them into its shards: the step of one process on the whole model.
    """

    def __init__(self, mesh):
        self.group = mesh.get_group()

    def __getstate__(self) -> NoReturn:
        refuse_copy("an optimizer over row shards (FSDP2)")

    def bind(self, optimizer) -> None:
        self.device = optimizer._params[0].to_local().device
        self._slices, self._numel = spans([comp.dim for comp in optimizer.compartments])
        # Ranks built with other seeds or settings would sum coefficients of other bases.
        agree(optimizer.agreement_fields(), self.group,
              f"{type(optimizer).__name__}'s configuration check over row shards", collective_device(self.group))

    def combine(self, compartments, coeffs, present, step):
        summed = torch.zeros(self._numel, dtype=torch.float32, device=self.device)
        for c, cs in zip(coeffs, self._slices, strict=True):
            if c is not None:
                summed[cs] = c.to(self.device)
        run_collective(f"the all-reduce of step {step}'s coefficients over row shards", self.group,
                       lambda: dist.all_reduce(summed, group=self.group))
        return [[(summed[cs], comp.stream, segments)] if segments else []
                for comp, segments, cs in zip(compartments, present, self._slices, strict=True)]

    def agree_on_load(self, optimizer, checked: tuple[dict, int] | None, problem: Exception | None) -> None:
        """Every rank loads its own shards' state: the ranks agree that each one's state dict is
        valid and holds the same step count and groups' values (one all-gather of hashes)."""
        agree_on_load(optimizer.loaded_fields(checked), problem, self.group, "the load of the state_dict", collective_device(self.group),
                      hint="each rank must load the state_dict it saved")

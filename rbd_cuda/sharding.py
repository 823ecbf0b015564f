"""Parameters a process holds only part of: which it refuses, and FSDP2's row shards, which RBD and
FPD step over (docs/distributed.md, "Sharded parameters").

``rbd_cuda.layout`` plans compartments over whole parameters and asks ``check_whole`` about each;
``local_pieces`` cuts a plan over row shards (``rbd_cuda.layout``'s ``Compartment`` and
``Segment``) to this rank's pieces, and the optimizers check their state against the shards with
``sharded_as``. Nothing here imports ``torch.distributed.tensor``: a DTensor exists only once its
module is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence

import torch


def _dtensor_type():
    # A DTensor exists only once its module is imported: looking it up costs no import.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_row_shard(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor sharded by rows over a 1-D device mesh (placements ``(Shard(0),)``),
    as FSDP2's ``fully_shard`` shards parameters: each rank holds a contiguous range of its
    flattened entries."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor) or p.device_mesh.ndim != 1 or len(p.placements) != 1:
        return False
    from torch.distributed.tensor import Shard

    # Exactly Shard: its subclass _StridedShard interleaves the ranks' rows.
    placement = p.placements[0]
    return type(placement) is Shard and placement.dim == 0 and p.dim() > 0


def check_whole(name: str, p: torch.Tensor, *, shards: bool = False) -> bool:
    """Refuse a parameter of which this process holds only a shard or a replica on a device mesh,
    except, with ``shards``, a row shard (``is_row_shard``, FSDP2's); returns whether ``p`` is one.

    A segment addresses rows of P by its entries' positions in the whole parameter, and a
    compartment's coefficients sum over all of its entries: a rank holding a shard must project it
    on the rows of the shard's global positions and sum the coefficients across ranks, which RBD
    and FPD do for row shards (docs/distributed.md, "Sharded parameters"); whoever else took a
    shard as a whole parameter would train another model without an error.
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(p, dtensor):
        if is_row_shard(p) and shards:
            return True
        if is_row_shard(p):
            raise ValueError(f"rbd_cuda: parameter {name} is a DTensor sharded by rows (FSDP2's fully_shard); only "
                             "RBD and FPD (without an exchange) step over such shards: use rbd_cuda.optim.RBD or FPD "
                             "(FSDP2 averages the gradients), or keep NES, DistributedRBD, DistributedFPD and "
                             "RandomSubspace's module unsharded (under DistributedDataParallel; to shard a "
                             "RandomSubspace, shard the wrapper: fully_shard(RandomSubspace(module)))")
        raise ValueError(f"rbd_cuda: parameter {name} is a DTensor with placements {tuple(p.placements)} on a "
                         f"{p.device_mesh.ndim}-D mesh (tensor parallelism, HSDP, a replica); the random-bases "
                         "updates take whole parameters as plain tensors, or with RBD and FPD, row shards: placements "
                         "(Shard(0),) on a 1-D mesh, as fully_shard(model, mesh=init_device_mesh(device, "
                         "(world_size,))) makes them. Or train under DistributedDataParallel (or with "
                         "rbd_cuda.distributed.DistributedRBD)")
    # FSDP1 marks its FlatParameters and the original parameters it made views of (use_orig_params).
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(f"rbd_cuda: parameter {name} is flattened by FullyShardedDataParallel (FSDP1), which "
                         "hands each rank a shard of a flat parameter (or views of it): the random-bases "
                         "updates need whole parameters. Train under DistributedDataParallel (what NO_SHARD "
                         "is), with rbd_cuda.distributed.DistributedRBD, or shard with FSDP2 (fully_shard), "
                         "whose row shards RBD and FPD step over")
    return False


def shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """The range of ``p``'s flattened entries this rank holds, ``p`` a row shard (``is_row_shard``):
    rank r of W holds rows [r·⌈n/W⌉, (r+1)·⌈n/W⌉) of the n, clipped (torch.chunk's split, which
    Shard(0) and fully_shard use: the last ranks may hold fewer rows, or none), checked against
    the shard's shape."""
    mesh, rows = p.device_mesh, p.shape[0]
    chunk = -(-rows // mesh.size())
    first = min(mesh.get_local_rank() * chunk, rows)
    held = min(chunk, rows - first)
    local = p.to_local()
    if tuple(local.shape) != (held, *p.shape[1:]):
        raise ValueError(f"rbd_cuda: a row shard of shape {tuple(p.shape)} holds {tuple(local.shape)} on rank "
                         f"{mesh.get_local_rank()} of {mesh.size()}, not the {held} rows from row {first} that "
                         "torch.chunk gives it")
    row = math.prod(p.shape[1:])  # p[0] would gather the whole parameter
    return first * row, (first + held) * row


def sharded_as(tensor: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether ``tensor`` (a state buffer) is sharded as the row shard ``p``: the same mesh,
    placements and rows on this rank, so that a segment's ``start`` indexes both."""
    dtensor = _dtensor_type()
    return (isinstance(tensor, dtensor) and tensor.device_mesh == p.device_mesh and tensor.placements == p.placements
            and tensor.to_local().shape == p.to_local().shape)


def local_pieces(compartments: Sequence) -> list:
    """``compartments`` of row shards (``plan(..., shards=True)``) cut to this rank's shards: each
    segment becomes the part of it this rank holds, at the rows of its global positions (none where
    the rank holds nothing of it); ``numel`` stays the whole compartment's."""
    held = {}
    pieces = []
    for comp in compartments:
        segments = []
        for s in comp.segments:
            if id(s.param) not in held:
                held[id(s.param)] = shard_rows(s.param)
            first, stop = held[id(s.param)]
            begin, end = max(s.start, first), min(s.start + s.numel, stop)
            if begin < end:
                segments.append(dataclasses.replace(s, start=begin - first, numel=end - begin,
                                                    row_offset=s.row_offset + begin - s.start, sharded=True))
        pieces.append(dataclasses.replace(comp, segments=segments, whole_numel=comp.numel))
    return pieces

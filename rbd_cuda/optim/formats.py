"""The optimizers' saved formats and their load checks: the "rbd" entry of ``state_dict()`` (its
format versions, the configuration it holds) and what ``load_state_dict`` accepts, each refusal
naming what is wrong before anything is loaded; the version of ``RBD(record=True).record``.
What every saved object looks like: docs/formats.md.
"""

from __future__ import annotations

import torch

from ..basis import check_count
from ..layout import check_saved
from ..sharding import sharded_as

# Version of the "rbd" entry of state_dict(). Entries without "format" were written by a02b069
# (whose optimizer kept only steps_taken and a layout check); format 2 is from before weight
# decay (whose groups may hold a "weight_decay" that was ignored). Both still load.
FORMAT = 3
# Keys torch.optim.Optimizer itself puts in a param group.
TORCH_GROUP_KEYS = ("params", "param_names")
# Keys torch's schedulers add to the groups of the optimizer they drive (every LRScheduler's
# initial_lr, OneCycleLR's and CyclicLR's, SWALR's): a state dict saved under one holds them.
SCHEDULER_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr")
# Version of RBD(record=True).record. Format 1 (before weight decay) no longer replays: nothing
# committed holds one (docs/formats.md).
RECORD_FORMAT = 2


def saved_entry(opt) -> dict:
    """The "rbd" entry of ``opt.state_dict()``: the format, the step count and ``opt.config()``
    (and, over row shards, which rank's shards the state is)."""
    entry = {"format": FORMAT, "steps_taken": opt.steps_taken, **opt.config()}
    if opt.mesh is not None:  # a rank's momentum buffers are its rows only
        entry["shard"] = shard_of(opt)
    return entry


def shard_of(opt) -> dict[str, int] | None:
    """Which rank of how many holds ``opt``'s row shards (None: whole parameters)."""
    return None if opt.mesh is None else {"rank": opt.mesh.get_local_rank(), "ranks": opt.mesh.size()}


def check_record(opt, record) -> None:
    """Refuse a record ``replay`` cannot re-apply with ``opt``: another format, or an optimizer not
    built as the recorded one was."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"rbd_cuda: replay needs a record of this version (format {RECORD_FORMAT}), as "
                         "RBD(..., record=True) keeps in opt.record")
    check_saved(record, opt.config(), "replay: the optimizer is not built as the recorded one was", saved_as="recorded")


def check_state_dict(opt, state_dict: dict) -> tuple[dict, int]:
    """``state_dict`` (of ``opt``, an optimizer of ``rbd_cuda.optim``) as torch's ``load_state_dict`` takes it (groups completed and validated)
    and its step count, or a ``ValueError`` (``TypeError`` for a value of the wrong type)
    naming what is wrong; changes nothing."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"rbd_cuda: a state_dict must be a dict, got {type(state_dict).__name__}")
    state_dict = dict(state_dict)
    saved = state_dict.pop("rbd", None)
    name = type(opt).__name__
    if not isinstance(saved, dict):
        # torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state" and "param_groups".
        raise ValueError(f"rbd_cuda: this state_dict has no 'rbd' entry (not saved by {name}'s state_dict; "  # noqa: TRY004
                         "torch.distributed.checkpoint's get_optimizer_state_dict drops it: save opt.state_dict() "
                         "instead, on each rank under FSDP2)")
    if "format" not in saved and "layout" not in saved:
        raise ValueError("rbd_cuda: the state_dict's 'rbd' entry has no 'format': every version after a02b069 "
                         "writes one (and a02b069's entries hold a 'layout'), so the entry was changed after "
                         "it was saved")
    version = saved.get("format", 1)  # a02b069 wrote no format; its layout entries are [stream, dim, numel]
    if version == 1:
        mine = [entry[:3] for entry in opt._layout]
        check_saved(saved, {"layout": mine}, "the saved compartments (stream, dim, numel) differ from this "
                    "optimizer's")
    elif version in (2, FORMAT):
        check_saved(saved, opt.config(), "the state_dict is from an optimizer built with other arguments, "
                    "which would give another trajectory")
    else:
        raise ValueError(f"rbd_cuda: state_dict format {version!r} is not one this version reads (1 to {FORMAT})")
    steps = check_count("the state_dict's steps_taken", saved.get("steps_taken"))
    # Equal shard shapes would let a rank load another's rows without an error.
    if saved.get("shard") != shard_of(opt):
        def holder(shard):
            return "whole parameters" if shard is None else f"rank {shard['rank']} of {shard['ranks']}'s row shards"
        raise ValueError(f"rbd_cuda: this state_dict was saved over {holder(saved.get('shard'))}; this optimizer "
                         f"steps {holder(shard_of(opt))}: load on each rank the state_dict that rank saved")

    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise ValueError(f"rbd_cuda: the state_dict must hold {len(opt.param_groups)} param groups, as this "
                         f"optimizer does; it holds {len(groups) if isinstance(groups, list) else groups!r}")
    completed, param_of = [], {}
    for k, (group, mine) in enumerate(zip(groups, opt.param_groups, strict=True)):
        if not isinstance(group, dict) or len(group.get("params", ())) != len(mine["params"]):
            raise ValueError(f"rbd_cuda: the state_dict's param group {k} does not hold "
                             f"{len(mine['params'])} parameters, as this optimizer's does")
        group = dict(group)
        if version == 1 and "momentum" not in opt.HYPERPARAMETERS:
            group.pop("momentum", None)  # a02b069's NES derived from RBD: its groups held an unused momentum
        # As at construction (add_param_group): a key no step reads would load and be ignored.
        unknown = [key for key in group if key not in (*TORCH_GROUP_KEYS, *SCHEDULER_GROUP_KEYS)
                   and key not in opt.HYPERPARAMETERS]
        if unknown:
            raise ValueError(f"rbd_cuda: the state_dict's param group {k} has the key {unknown[0]!r}, which {name} "
                             f"does not implement; its groups take {', '.join(opt.HYPERPARAMETERS)} (and the "
                             f"keys torch's schedulers add: {', '.join(SCHEDULER_GROUP_KEYS)})")
        if version < FORMAT and "weight_decay" in opt.HYPERPARAMETERS:
            if group.get("weight_decay", 0.0) != 0.0:
                raise ValueError(f"rbd_cuda: param group {k} of this state_dict (format {version}) holds "
                                 f"weight_decay={group['weight_decay']!r}, which the version that saved it "
                                 "ignored: set it to 0.0 in the state_dict to continue that trajectory, or "
                                 "build a new optimizer to train with weight decay")
            group["weight_decay"] = 0.0
        missing = [key for key in opt.HYPERPARAMETERS if key not in group]
        if missing:
            raise ValueError(f"rbd_cuda: the state_dict's param group {k} has no {missing[0]!r}")
        group.update(opt._check_group(k, group))
        completed.append(group)
        param_of.update(zip(group["params"], mine["params"]))

    state = state_dict.get("state")
    if not isinstance(state, dict):
        raise TypeError(f"rbd_cuda: the state_dict's state must be a dict, got {type(state).__name__}")
    for key, entry in state.items():
        if key not in param_of:
            raise ValueError(f"rbd_cuda: the state_dict has state for {key!r}, which is none of its groups' "
                             "parameters")
        p = param_of[key]
        if not isinstance(entry, dict):
            raise TypeError(f"rbd_cuda: the state of parameter {key} must be a dict, got {type(entry).__name__}")
        for entry_name, value in entry.items():
            where = f"the state_dict's {entry_name!r} of parameter {key}"
            if entry_name not in opt.STATE_KEYS:
                raise ValueError(f"rbd_cuda: {where} is not state {name} keeps "
                                 f"({', '.join(opt.STATE_KEYS) or 'it keeps none'})")
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"rbd_cuda: {where} must be a floating-point tensor, got "
                                 f"{type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}")
            if value.shape != p.shape:
                raise ValueError(f"rbd_cuda: {where} has shape {tuple(value.shape)}; the parameter has "
                                 f"{tuple(p.shape)}")
            if opt.mesh is not None:
                if not sharded_as(value, p):
                    raise ValueError(f"rbd_cuda: {where} is not sharded as its parameter (placements "
                                     f"{tuple(p.placements)} on its mesh, this rank's rows): load on each rank "
                                     "the state_dict that rank saved, on a mesh of the same size")
                value = value.to_local()
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"rbd_cuda: {where} holds non-finite values")
    return {**state_dict, "param_groups": completed}, steps

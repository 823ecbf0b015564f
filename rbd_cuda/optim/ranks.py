"""What the optimizers need on the ranks of a process group: collectives that fail with an error
saying which one failed where, and the ranks' agreement on named values, failing on every rank.

``NES`` uses them for its data-parallel step, ``RBD`` and ``FPD`` over row shards (FSDP2's),
``rbd_cuda.distributed`` for ``DistributedRBD``, ``DistributedFPD`` and the DDP hook
(``rbd_cuda.distributed`` builds on ``rbd_cuda.optim``, not the other way round).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist


def run_collective(what: str, group, fn: Callable[[], object]):
    """Run a collective; a peer that raised, exited or timed out becomes an error saying which
    collective of which rank failed (the backend's own message is kept as the cause)."""
    try:
        return fn()
    except RuntimeError as error:  # DistBackendError, DistNetworkError and gloo's errors
        raise RuntimeError(f"rbd_cuda: {what} failed on rank {dist.get_rank(group)} of "
                           f"{dist.get_world_size(group)}: another rank raised, exited or timed out "
                           f"({type(error).__name__}: {error})") from error


def collective_device(group) -> torch.device:
    """Where the tensors of ``group``'s collectives live: the current GPU under NCCL, else the CPU."""
    return (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
            else torch.device("cpu"))


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """A 64-bit hash of the exact bits of ``tensors`` (in order): equal iff equal, in practice."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _hash(value) -> int:
    """A 64-bit hash of a plain value (ints, floats, strings and lists of them) by its repr."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def agree(fields: dict[str, object], group, what: str, device: torch.device, error: type = ValueError,
          hint: str = "every rank must build it with the same arguments and parameters") -> int:
    """Raise on every rank, naming the first field whose value differs across the ranks of
    ``group``. One all-gather of a 64-bit hash per field; every rank sees every hash, so all ranks
    raise the same error (none is left waiting in a later collective). Returns the bytes sent."""
    mine = torch.tensor([_hash(v) for v in fields.values()], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    run_collective(what, group, lambda: dist.all_gather(gathered, mine, group=group))
    rows = [row.tolist() for row in gathered]
    for k, name in enumerate(fields):
        differ = [r for r, row in enumerate(rows) if row[k] != rows[0][k]]
        if differ:
            raise error(f"rbd_cuda: {what}: ranks disagree on {name}: rank(s) {differ} differ from rank 0 "
                        f"(this is rank {dist.get_rank(group)}, with {fields[name]!r}); {hint}")
    return mine.numel() * 8


def agree_on_load(fields: dict[str, object], problem: Exception | None, group, what: str, device: torch.device,
                  hint: str = "every rank must load the same state_dict") -> int:
    """The agreement of a distributed ``load_state_dict``, in one collective: every rank checked
    its state dict (``problem``: why it is refused, or None) and the ranks must agree on that and
    on ``fields`` (what was loaded), else every rank raises; a state dict refused on every rank
    raises each rank's own reason. Returns the bytes sent."""
    fields = {"whether the state_dict is valid": problem is None,
              **{name: value if problem is None else None for name, value in fields.items()}}
    try:
        sent = agree(fields, group, what, device, hint=hint)
    except ValueError as error:
        raise error from problem
    if problem is not None:
        raise problem
    return sent

"""One rank of tests/test_torchrun.py, started by the real launcher:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_worker.py OUT

Trains a small MLP a few steps with each way the library runs on several ranks (RBD under DDP,
DistributedRBD, NES, RBD over FSDP2's row shards) on this rank's share of each global batch, on
the device ``init_process_group`` gives it (gloo on the CPU, or NCCL on GPU ``LOCAL_RANK``), and
saves what it ended with to OUT/rank<r>.pt for the test to compare across ranks and with one
process.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rbd_cuda.distributed import DistributedRBD, init_process_group
from rbd_cuda.optim import NES, RBD

STEPS = 3
BATCH = 8  # per rank


def mlp(device="cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device)


def global_batch(step: int, world: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * BATCH, 6, generator=gen), torch.randint(0, 3, (world * BATCH,), generator=gen)


def mine(step: int, rank: int, world: int, device="cpu"):
    x, y = global_batch(step, world)
    return x[rank * BATCH:(rank + 1) * BATCH].to(device), y[rank * BATCH:(rank + 1) * BATCH].to(device)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().full_tensor().flatten() if hasattr(p, "full_tensor") else p.detach().flatten()
                      for p in model.parameters()]).cpu()


def train(model, opt, rank, world, device):
    for t in range(STEPS):
        x, y = mine(t, rank, world, device)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def main(out: str) -> None:
    device = init_process_group(timeout_s=60)  # from torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    found = {}

    ddp = torch.nn.parallel.DistributedDataParallel(mlp(device))
    train(ddp, RBD(ddp.parameters(), lr=0.5, dim=4, momentum=0.5, compartments="tensor", seed=1), rank, world,
          device)
    found["ddp"] = flat(ddp.module)

    model = mlp(device)
    train(model, DistributedRBD(model.parameters(), lr=0.5, dim=4, momentum=0.5, compartments="tensor", seed=1),
          rank, world, device)
    found["distributed"] = flat(model)

    model = mlp(device)
    opt = NES(model.parameters(), lr=0.5, population=6, sigma=0.05, seed=1)
    for t in range(STEPS):
        x, y = mine(t, rank, world, device)
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    found["nes"] = flat(model)

    from torch.distributed.fsdp import fully_shard

    model = mlp(device)
    for layer in model[0], model[2]:
        fully_shard(layer)
    fully_shard(model)
    train(model, RBD(model.parameters(), lr=0.5, dim=4, momentum=0.5, compartments="tensor", seed=1), rank, world,
          device)
    found["fsdp2"] = flat(model)

    torch.save(found, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""The library under the real launcher: ``torchrun --standalone --nproc_per_node=2`` (as
``python -m torch.distributed.run``) starts tests/torchrun_worker.py, whose ranks rendezvous from
torchrun's environment (``rbd_cuda.distributed.init_process_group``) and train with RBD under DDP,
DistributedRBD, NES and RBD over FSDP2's row shards. Every way keeps the ranks bit-identical and
equals one process on the whole batch (to float rounding: the ranks sum in another order).
On a GPU one NCCL rank runs the same (the DTensor and collective paths on CUDA). The other
multi-rank suites fork their ranks themselves (tests/test_distributed.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchrun_worker as worker  # the ranks' own module, for the one-process reference

from rbd_cuda.optim import NES, RBD

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(not hasattr(__import__("torch.distributed.fsdp", fromlist=["fully_shard"]), "fully_shard"),
                       reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)"),
]

HERE = Path(__file__).parent


def torchrun(out: Path, world: int, env: dict[str, str]) -> list[dict]:
    """Each rank's results from tests/torchrun_worker.py on ``world`` ranks."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={world}", str(HERE / "torchrun_worker.py"), str(out)],
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                         timeout=240, check=False)
    assert run.returncode == 0, f"torchrun exited with {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun(tmp_path_factory.mktemp("torchrun"), 2, {"CUDA_VISIBLE_DEVICES": ""})  # gloo on the CPU


def one_process_rbd(world: int, device: str) -> torch.Tensor:
    model = worker.mlp(device)
    opt = RBD(model.parameters(), lr=0.5, dim=4, momentum=0.5, compartments="tensor", seed=1)
    for t in range(worker.STEPS):
        x, y = worker.global_batch(t, world)
        # the mean over the whole batch = the mean of the ranks' means
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
    return worker.flat(model)


def one_process_nes(world: int, device: str) -> torch.Tensor:
    model = worker.mlp(device)
    opt = NES(model.parameters(), lr=0.5, population=6, sigma=0.05, seed=1)
    for t in range(worker.STEPS):
        shares = [worker.mine(t, r, world, device) for r in range(world)]
        opt.step(lambda shares=shares: sum(F.cross_entropy(model(x), y).double() for x, y in shares) / world)
    return worker.flat(model)


WAYS = ["ddp", "distributed", "nes", "fsdp2"]


def check(found: dict, way: str, world: int, device: str) -> None:
    reference = one_process_nes(world, device) if way == "nes" else one_process_rbd(world, device)
    assert not torch.equal(reference, worker.flat(worker.mlp()))  # the steps did something
    torch.testing.assert_close(found[way], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("way", WAYS)
def test_under_torchrun_the_ranks_stay_identical_and_equal_one_process(ranks, way):
    assert torch.equal(ranks[0][way], ranks[1][way])
    check(ranks[0], way, 2, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_under_torchrun_on_a_gpu_each_way_equals_one_process(tmp_path):
    # One rank (NCCL on GPU 0): the same code paths as on several GPUs, their collectives trivial.
    found = torchrun(tmp_path, 1, {})[0]
    for way in WAYS:
        check(found, way, 1, "cuda")

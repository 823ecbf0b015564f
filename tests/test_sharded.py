"""Sharded parameters on 2 gloo ranks: FSDP2 (fully_shard), tensor parallelism (DTensor), ZeRO
(ZeroRedundancyOptimizer) and FSDP1 (FullyShardedDataParallel).

An update in a random basis is right over sharded parameters only if each rank projects its shard
on the rows of P at the shard's global positions and the coefficients are summed across ranks
before they are expanded. RBD and FPD do so over row shards (FSDP2's; tests/test_fsdp2.py); the
other placements, NES, the distributed optimizers and RandomSubspace would train another model
than the one asked for, without an error, so they refuse such parameters when they are built
(docs/distributed.md). What does work, sharding a RandomSubspace wrapper (its c) with
fully_shard, is checked against one process.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import batch, launch_ok, local, mlp

from rbd_cuda.distributed import DistributedFPD, DistributedRBD
from rbd_cuda.nn import RandomSubspace
from rbd_cuda.optim import FPD, NES, RBD

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _has(module: str, name: str) -> bool:
    try:
        return hasattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        return False


HAS_FSDP2 = _has("torch.distributed.fsdp", "fully_shard")
HAS_TP = _has("torch.distributed.tensor.parallel", "parallelize_module")
HAS_ZERO = _has("torch.distributed.optim", "ZeroRedundancyOptimizer")
HAS_FSDP1 = _has("torch.distributed.fsdp", "FullyShardedDataParallel")
SUBSPACE_STEPS = 3


def refusal(build) -> str | None:
    """What ``build()`` raises (``"ValueError: ..."``), or None when it builds."""
    try:
        build()
    except Exception as error:  # noqa: BLE001 (the test checks which error)
        return f"{type(error).__name__}: {error}"
    return None


def fsdp2_cases(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def sharded():
        model = mlp()
        for layer in model[0], model[2]:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    out = {name: refusal(lambda build=build: build(sharded()))
           for name, build in [("RBD", lambda m: RBD(m.named_parameters(), lr=0.1, dim=4)),
                               ("FPD", lambda m: FPD(m.parameters(), lr=0.1, dim=4, compartments="tensor")),
                               ("NES", lambda m: NES(m.parameters(), lr=0.1, population=4)),
                               ("DistributedRBD", lambda m: DistributedRBD(m.parameters(), lr=0.1, dim=4)),
                               ("RandomSubspace", lambda m: RandomSubspace(m, dim=4))]}

    # The wrapper sharded (c a DTensor, θ₀ buffers left whole) trains as one process on the whole batch.
    wrapper = fully_shard(RandomSubspace(mlp(), dim=6, seed=3, compartments="tensor"), mesh=mesh)
    single = RandomSubspace(mlp(), dim=6, seed=3, compartments="tensor")
    for model, rows in (wrapper, lambda t: local(t, rank, world)), (single, lambda t: batch(t, world)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
        for t in range(SUBSPACE_STEPS):
            x, y = rows(t)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    out["subspace"] = {"sharded": wrapper.c.full_tensor().detach().clone(), "single": single.c.detach().clone()}
    return out


def tensor_parallel_cases(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    model = parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    replicated = mlp()
    replicated[2].weight = torch.nn.Parameter(distribute_tensor(replicated[2].weight.detach(), mesh, [Replicate()]))
    return {"sharded": refusal(lambda: RBD(model.named_parameters(), lr=0.1, dim=4, compartments="tensor")),
            "replicated": refusal(lambda: RBD(replicated.named_parameters(), lr=0.1, dim=4))}


def zero_cases(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def zero(params, optimizer_class, **kw):
        return lambda: ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, **kw)

    out = {"keywords": refusal(zero(mlp().parameters(), RBD, lr=0.1, dim=4, seed=1)),
           # dim passed with the class, as one does after the keyword is refused as a group key
           "partial": refusal(zero(mlp().parameters(), functools.partial(RBD, dim=4, seed=1), lr=0.1)),
           "NES": refusal(zero(mlp().parameters(), functools.partial(NES, population=4), lr=0.1))}
    # Two tensors of one shape: each rank's partition is one of them, so the ranks' DistributedFPD
    # configurations agree and its broadcast would copy rank 0's tensor into rank 1's other one.
    torch.manual_seed(0)
    twins = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6, bias=False))
    before = [p.detach().clone() for p in twins.parameters()]
    out["distributed"] = refusal(zero(twins.parameters(), functools.partial(DistributedFPD, dim=4), lr=0.1))
    out["twins unchanged"] = all(torch.equal(a, p) for a, p in zip(before, twins.parameters(), strict=True))
    return out


def fsdp1_cases(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    def wrapped(use_orig_params, strategy=ShardingStrategy.FULL_SHARD):
        return FullyShardedDataParallel(mlp(), use_orig_params=use_orig_params, device_id=torch.device("cpu"),
                                        sharding_strategy=strategy)

    return {"flat": refusal(lambda: RBD(wrapped(False).named_parameters(), lr=0.1, dim=4)),
            "orig": refusal(lambda: RBD(wrapped(True).parameters(), lr=0.1, dim=4, compartments="tensor")),
            "no-shard": refusal(lambda: FPD(wrapped(True, ShardingStrategy.NO_SHARD).parameters(), lr=0.1, dim=4)),
            "subspace": refusal(lambda: RandomSubspace(wrapped(False), dim=4))}


def cases(rank, world):
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # FSDP1's deprecation
    out = {}
    for name, available, run in [("fsdp2", HAS_FSDP2, fsdp2_cases), ("tp", HAS_TP, tensor_parallel_cases),
                                 ("zero", HAS_ZERO, zero_cases), ("fsdp1", HAS_FSDP1, fsdp1_cases)]:
        if available:
            out[name] = run(rank, world)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch_ok(tmp_path_factory.mktemp("sharded"), 2, cases)


@pytest.mark.skipif(not HAS_FSDP2, reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
def test_fsdp2_sharded_parameters_are_refused_but_by_rbd_and_fpd(results):
    shards = "is a DTensor sharded by rows (FSDP2's fully_shard); only RBD and FPD (without an exchange)"
    for res in results:
        found = res["fsdp2"]
        assert found["RBD"] is None and found["FPD"] is None
        for name in ("NES", "DistributedRBD"):
            assert f"ValueError: rbd_cuda: parameter param0 {shards}" in str(found[name]), name
        assert f"ValueError: rbd_cuda: parameter 0.weight {shards}" in str(found["RandomSubspace"])
        assert "fully_shard(RandomSubspace(module))" in str(found["NES"])


@pytest.mark.skipif(not HAS_FSDP2, reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
def test_a_sharded_random_subspace_trains_as_one_process(results):
    for res in results:
        c = res["fsdp2"]["subspace"]
        assert c["single"].abs().max() > 1e-3  # the steps did something
        torch.testing.assert_close(c["sharded"], c["single"], rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0]["fsdp2"]["subspace"]["sharded"], results[1]["fsdp2"]["subspace"]["sharded"])


@pytest.mark.skipif(not HAS_TP, reason="this torch has no torch.distributed.tensor.parallel")
def test_tensor_parallel_and_replicated_dtensors_are_refused(results):
    for res in results:
        # ColwiseParallel's Shard(0) is a row shard; RowwiseParallel's Shard(1) is not.
        assert "ValueError: rbd_cuda: parameter 2.weight is a DTensor with placements (Shard(dim=1),) on a 1-D mesh" in str(res["tp"]["sharded"])
        assert "ValueError: rbd_cuda: parameter 2.weight is a DTensor with placements (Replicate(),) on a 1-D mesh" in str(res["tp"]["replicated"])


@pytest.mark.skipif(not HAS_ZERO, reason="this torch has no torch.distributed.optim.ZeroRedundancyOptimizer")
def test_zero_redundancy_optimizer_cannot_build_the_optimizers(results):
    for res in results:
        found = res["zero"]
        for name, cls in (("keywords", "RBD"), ("partial", "RBD"), ("NES", "NES"), ("distributed", "DistributedFPD")):
            assert f"ValueError: rbd_cuda: {cls} cannot be the optimizer_class of a ZeroRedundancyOptimizer" in str(found[name]), name
        assert "DistributedDataParallel" in str(found["partial"])
        assert "NES over all the parameters on every rank instead (it averages its population's losses" in str(found["NES"])
        assert found["twins unchanged"]


@pytest.mark.skipif(not HAS_FSDP1, reason="this torch has no FullyShardedDataParallel (FSDP1)")
def test_fsdp1_flattened_parameters_are_refused(results):
    for res in results:
        found = res["fsdp1"]
        assert "ValueError: rbd_cuda: parameter _fsdp_wrapped_module._flat_param is flattened by FullyShardedDataParallel" in str(found["flat"])
        assert "ValueError: rbd_cuda: parameter param0 is flattened by FullyShardedDataParallel" in str(found["orig"])
        assert "ValueError: rbd_cuda: parameter param0 is flattened by FullyShardedDataParallel" in str(found["no-shard"])
        assert "parameter _fsdp_wrapped_module._flat_param is flattened" in str(found["subspace"])

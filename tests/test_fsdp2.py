"""RBD and FPD over FSDP2's row shards (fully_shard on a 1-D mesh) on 2 gloo ranks.

Each rank projects its shards on the rows of their global positions and the coefficients are
summed across the mesh, so a sharded run is one process's run on the whole batch: checked for
every compartment mode (each with another normalisation, "paper" and "projection" among them,
which need the whole model's sizes), with momentum, weight decay, two param groups, gradient
clipping and a scheduler, on a model whose shards are uneven (rank 1 holds no row of the last
layer). A checkpoint saved and loaded per rank (opt.state_dict()) continues as without the
interruption; what is not supported is refused.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import launch_ok

from rbd_cuda.optim import FPD, RBD

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(not hasattr(__import__("torch.distributed.fsdp", fromlist=["fully_shard"]), "fully_shard"),
                       reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)"),
]

BATCH = 6  # per rank
STEPS = 3
# Each mode with another normalisation: "paper" needs D of the whole model, "projection" each
# compartment's whole size; the width 13 cuts tensors, and the shards, into pieces.
MODES = [("global", "paper"), ("tensor", "projection"), ("layer", "unbiased"), (13, "projection"),
         ("lists", "paper")]


def model(seed: int = 0) -> torch.nn.Module:
    """7-5-3-1: over 2 ranks 0.weight splits 3 + 2 rows, 2.weight 2 + 1, and rank 1 holds no row of 4.*."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


def data(step: int, world: int):
    gen = torch.Generator().manual_seed(200 + step)
    x = torch.randn(world * BATCH, 7, generator=gen)
    teacher = torch.randn(7, 1, generator=torch.Generator().manual_seed(9))
    return x, torch.sin(3 * x @ teacher)


def sharded(mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    net = model()
    for layer in net[0], net[2], net[4]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def optimizer(cls, net, mode, normalize):
    named = dict(net.named_parameters())
    compartments = mode
    if mode == "lists":
        compartments = [[named["0.weight"], named["4.bias"], named["2.weight"]],
                        [named["0.bias"], named["2.bias"], named["4.weight"]]]
    groups = [{"params": [(n, p) for n, p in named.items() if n.endswith("weight")], "weight_decay": 0.1},
              {"params": [(n, p) for n, p in named.items() if n.endswith("bias")], "lr": 0.1, "momentum": 0.9}]
    return cls(groups, lr=0.3, dim=4, compartments=compartments, normalize=normalize, momentum=0.5, seed=5)


def train(net, opt, sched, steps, rows):
    for t in steps:
        x, y = rows(t)
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        opt.step()
        sched.step()


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.7 ** t)


def full(net) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in net.named_parameters()}


def cases(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))

    def mine(t):
        x, y = data(t, world)
        return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]

    out = {"runs": {}}
    for cls in RBD, FPD:
        for mode, normalize in MODES:
            net = sharded(mesh)
            opt = optimizer(cls, net, mode, normalize)
            train(net, opt, schedule(opt), range(STEPS), mine)
            single = model()
            opt = optimizer(cls, single, mode, normalize)
            train(single, opt, schedule(opt), range(STEPS), lambda t: data(t, world))
            out["runs"][cls.__name__, str(mode)] = {"sharded": full(net), "single": full(single)}

    # A checkpoint after 2 steps, each rank saving its own state dicts, continues as the run does.
    for cls, mode in (RBD, 13), (FPD, "layer"):
        net = sharded(mesh)
        opt = optimizer(cls, net, mode, "unbiased")
        sched = schedule(opt)
        train(net, opt, sched, range(2), mine)
        saved = io.BytesIO()
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, saved)
        train(net, opt, sched, range(2, 4), mine)
        saved.seek(0)
        checkpoint = torch.load(saved, weights_only=True)
        resumed = sharded(mesh)
        resumed.load_state_dict(checkpoint["model"])
        opt = optimizer(cls, resumed, mode, "unbiased")
        sched = schedule(opt)  # before the load, which gives back the groups' learning rates
        opt.load_state_dict(checkpoint["opt"])
        sched.load_state_dict(checkpoint["sched"])
        train(resumed, opt, sched, range(2, 4), mine)
        out["runs"][cls.__name__, f"resumed {mode}"] = {"sharded": full(resumed), "single": full(net)}
        # Momentum buffers are parameter-shaped: each rank keeps (and saves) its shards of them, and
        # none for a parameter of which it holds no row.
        out[f"buffers {cls.__name__}"] = {n: type(opt.state[p]["momentum_buffer"]).__name__
                                          for n, p in resumed.named_parameters() if p in opt.state}
        if mode == 13:
            out["loads"] = loads(rank, mesh, cls, mode, saved)
    out["refused"] = refusals(mesh)
    return out


def loads(rank, mesh, cls, mode, saved):
    """What loading another rank's checkpoint, or torch.distributed.checkpoint's state dict, does."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    blob = [saved.getvalue()]
    dist.broadcast_object_list(blob, src=0)
    net = sharded(mesh)
    opt = optimizer(cls, net, mode, "unbiased")
    before = {n: p.to_local().clone() for n, p in net.named_parameters()}
    found = {"rank 0's": refusal(lambda: opt.load_state_dict(torch.load(io.BytesIO(blob[0]), weights_only=True)["opt"])),
             "unchanged": opt.steps_taken == 0 and not opt.state
             and all(torch.equal(p.to_local(), before[n]) for n, p in net.named_parameters())}
    # Even shards (2 + 2 rows): the buffers have the same shapes on both ranks, so only the saved
    # shard tells rank 0's rows from rank 1's.
    from torch.distributed.fsdp import fully_shard

    even = fully_shard(torch.nn.Linear(3, 4), mesh=mesh)
    even_opt = RBD(even.parameters(), lr=0.1, dim=3, momentum=0.9)
    even(torch.ones(2, 3)).square().sum().backward()
    even_opt.step()
    mine = io.BytesIO()
    torch.save(even_opt.state_dict(), mine)
    even_blob = [mine.getvalue()]
    dist.broadcast_object_list(even_blob, src=0)
    found["even rank 0's"] = refusal(lambda: even_opt.load_state_dict(torch.load(io.BytesIO(even_blob[0]),
                                                                                 weights_only=True)))
    whole = torch.nn.Linear(3, 4)
    found["whole"] = refusal(lambda: RBD(whole.parameters(), lr=0.1, dim=3, momentum=0.9).load_state_dict(
        torch.load(io.BytesIO(even_blob[0]), weights_only=True)))
    # After a step (state to save), so that the helper takes no step of its own to create state.
    train(net, opt, schedule(opt), range(1), lambda t: [v[rank * BATCH:(rank + 1) * BATCH] for v in data(t, 2)])
    found["dcp"] = refusal(lambda: opt.load_state_dict(get_optimizer_state_dict(net, opt)))
    return found


def refusal(build) -> str | None:
    try:
        build()
    except Exception as error:  # noqa: BLE001 (the test checks which error)
        cause = f" (from {type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
        return f"{type(error).__name__}: {error}{cause}"
    return None


def refusals(mesh):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hsdp = model()
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard")))
    part = model()
    fully_shard(part[0], mesh=mesh)  # the root not sharded: its other parameters stay plain tensors
    return {"hsdp": refusal(lambda: RBD(hsdp.parameters(), lr=0.1, dim=4)),
            "part": refusal(lambda: FPD(part.named_parameters(), lr=0.1, dim=4, compartments="tensor")),
            "record": refusal(lambda: RBD(sharded(mesh).parameters(), lr=0.1, dim=4, record=True)),
            "diagnostics": refusal(lambda: FPD(sharded(mesh).parameters(), lr=0.1, dim=4, diagnostics=True)),
            "copy": refusal(lambda: copy.deepcopy(RBD(sharded(mesh).parameters(), lr=0.1, dim=4)))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch_ok(tmp_path_factory.mktemp("fsdp2"), 2, cases)


@pytest.mark.parametrize("name", ["RBD", "FPD"])
@pytest.mark.parametrize("mode", [str(mode) for mode, _ in MODES])
def test_a_sharded_run_is_one_process_on_the_whole_batch(results, name, mode):
    for res in results:
        run = res["runs"][name, mode]
        moved = max(float((run["single"][n] - model().state_dict()[n]).abs().max()) for n in run["single"])
        assert moved > 1e-3  # the steps did something
        for n, p in run["single"].items():
            torch.testing.assert_close(run["sharded"][n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    for n, p in results[0]["runs"][name, mode]["sharded"].items():
        assert torch.equal(p, results[1]["runs"][name, mode]["sharded"][n]), n


@pytest.mark.parametrize(("name", "mode"), [("RBD", "13"), ("FPD", "layer")])
def test_a_checkpoint_saved_per_rank_continues_the_run(results, name, mode):
    for res in results:
        run = res["runs"][name, f"resumed {mode}"]
        for n, p in run["single"].items():
            assert torch.equal(run["sharded"][n], p), n
    names = [n for n, _ in model().named_parameters()]
    assert results[0][f"buffers {name}"] == dict.fromkeys(names, "DTensor")
    assert results[1][f"buffers {name}"] == dict.fromkeys(names[:4], "DTensor")


def test_a_checkpoint_of_another_rank_or_from_dcp_helpers_is_refused(results):
    theirs = ("this state_dict was saved over rank 0 of 2's row shards; this optimizer steps rank 1 of 2's row "
              "shards: load on each rank the state_dict that rank saved")
    for case in "rank 0's", "even rank 0's":
        for res in results:
            assert ("ValueError: rbd_cuda: the load of the state_dict: ranks disagree on whether the state_dict is "
                    "valid: rank(s) [1] differ from rank 0") in str(res["loads"][case]), case
            assert "each rank must load the state_dict it saved" in str(res["loads"][case])
        assert f"(from ValueError: rbd_cuda: {theirs}" in str(results[1]["loads"][case]), case
    for res in results:
        assert ("ValueError: rbd_cuda: this state_dict was saved over rank 0 of 2's row shards; this optimizer steps "
                "whole parameters") in str(res["loads"]["whole"])
    for res in results:
        assert res["loads"]["unchanged"]
        assert "ValueError: rbd_cuda: this state_dict has no 'rbd' entry" in str(res["loads"]["dcp"])
        assert "get_optimizer_state_dict" in str(res["loads"]["dcp"])


def test_other_placements_plain_tensors_record_and_diagnostics_are_refused(results):
    for res in results:
        found = res["refused"]
        assert "ValueError: rbd_cuda: parameter param0 is a DTensor with placements (Replicate(), Shard(dim=0)) on a 2-D mesh" in str(found["hsdp"])
        assert "ValueError: rbd_cuda: parameter 2.weight is a plain tensor among the other parameters' row shards" in str(found["part"])
        assert "ValueError: rbd_cuda: RBD over row shards (FSDP2) keeps no record and no diagnostics" in str(found["record"])
        assert "ValueError: rbd_cuda: FPD over row shards (FSDP2) keeps no record and no diagnostics" in str(found["diagnostics"])
        assert ("TypeError: rbd_cuda: an optimizer over row shards (FSDP2) cannot be copied or pickled, since a "
                "process group cannot: copy its state_dict() instead") in str(found["copy"])

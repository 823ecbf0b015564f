"""NES on 2 gloo ranks (the launcher of test_distributed.py).

In a process group of several ranks NES averages its population's losses across the ranks before
it ranks them, so every member is judged on the union of the ranks' batches and every rank takes
the same update. Before, each rank ranked its population on its own batches and the ranks drifted
apart without an error. Ranks that disagree on what decides the trajectory are refused on every
rank; a one-rank process group trains each rank on its own, by choice.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import flat, launch_ok, local, mlp

from rbd_cuda.optim import NES

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
STEPS = 3
KW = {"lr": 0.5, "population": 6, "sigma": 0.05, "antithetic": True, "weight_decay": 0.01, "seed": 3}


def train(model, opt, rows, steps=range(STEPS)) -> list[float]:
    """NES steps on ``rows(t)``; the losses ``step`` returned."""
    losses = []
    for t in steps:
        x, y = rows(t)
        losses.append(opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y)))
    return losses


def refused(model, opt, closure=None) -> dict:
    """One step that should fail: its error, and whether it left the parameters and step count."""
    before = flat(model)
    x, y = local(0, 0, WORLD)
    found = None
    try:
        opt.step(closure or (lambda: F.cross_entropy(model(x), y)))
    except (ValueError, RuntimeError) as error:
        found = f"{type(error).__name__}: {error}"
    return {"error": found, "unchanged": torch.equal(before, flat(model)), "steps": opt.steps_taken}


def cases(rank, world):
    out = {}

    def mine(t):  # this rank's half of step t's batch
        return local(t, rank, world)

    model = mlp()
    opt = NES(model.parameters(), **KW)  # the default process group: the world
    out["losses"] = train(model, opt, mine)
    out["averaged"] = flat(model)
    ddp = torch.nn.parallel.DistributedDataParallel(mlp())
    train(ddp, NES(ddp.parameters(), **KW), mine)  # DDP's forward under no_grad synchronises nothing
    out["ddp"] = flat(ddp.module)

    own, _ = dist.new_subgroups(group_size=1)
    model = mlp()
    own_opt = NES(model.parameters(), group=own, **KW)
    train(model, own_opt, mine)
    out["own"] = flat(model)
    try:
        copy.deepcopy(own_opt)
        out["copy"] = None
    except TypeError as error:
        out["copy"] = str(error)
    first = dist.new_group([0])  # rank 1 is not in it
    try:
        NES(mlp().parameters(), group=first, **KW)
        out["not a member"] = None
    except ValueError as error:
        out["not a member"] = str(error)

    model = mlp()
    out["seed"] = refused(model, NES(model.parameters(), **{**KW, "seed": 3 + rank}))
    model = mlp()
    out["lr"] = refused(model, NES(model.parameters(), **{**KW, "lr": 0.5 + 0.1 * rank}))
    model = mlp(seed=rank)  # each rank its own initialisation, no DDP to broadcast rank 0's
    out["parameters"] = refused(model, NES(model.parameters(), **KW))

    # Rank 1 resumes from an older checkpoint: the next step is refused on both ranks.
    model = mlp()
    opt = NES(model.parameters(), **KW)
    train(model, opt, mine, range(1))
    early = copy.deepcopy(opt.state_dict())
    train(model, opt, mine, range(1, 2))
    opt.load_state_dict(early if rank == 1 else copy.deepcopy(opt.state_dict()))
    out["resumed"] = refused(model, opt)

    # After an agreed step, rank 1 alone changes its lr (a scheduler stepped there only).
    model = mlp()
    opt = NES(model.parameters(), **KW)
    train(model, opt, mine, range(1))
    if rank == 1:
        opt.param_groups[0]["lr"] *= 0.5
    out["lr later"] = refused(model, opt)

    # Rank 1's closure returns a non-finite loss: both ranks refuse the step (none waits for the other).
    model = mlp()
    opt = NES(model.parameters(), **KW)
    calls = []

    def closure():
        calls.append(1)
        x, y = mine(0)
        return torch.tensor(float("nan")) if rank == 1 and len(calls) == 3 else F.cross_entropy(model(x), y)

    out["nan"] = refused(model, opt, closure)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch_ok(tmp_path_factory.mktemp("nes"), WORLD, cases)


def one_process(closure_rows) -> tuple[torch.Tensor, list[float]]:
    """NES in this process (no process group), each member's loss from ``closure_rows(model, t)``."""
    model = mlp()
    opt = NES(model.parameters(), **KW)
    losses = [opt.step(lambda t=t: closure_rows(model, t)) for t in range(STEPS)]
    return flat(model), losses


def test_ranks_average_the_population_losses_as_one_process_on_both_halves(results):
    # Each member's loss is the mean of the two ranks' losses (in float64, as the all-reduce sums them).
    expected, losses = one_process(lambda model, t: sum(F.cross_entropy(model(x), y).double()
                                                        for x, y in (local(t, r, WORLD) for r in range(WORLD))) / WORLD)
    assert (expected - flat(mlp())).abs().max() > 1e-3  # the steps did something
    for r, res in enumerate(results):
        for key in ("averaged", "ddp"):
            assert torch.equal(res[key], results[0]["averaged"]), f"rank {r}'s {key} run differs from rank 0's"
        torch.testing.assert_close(res["averaged"], expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res["losses"], losses, rtol=1e-6, atol=1e-7)


def test_a_one_rank_group_trains_each_rank_on_its_own(results):
    for r, res in enumerate(results):
        expected, _ = one_process(lambda model, t, r=r: F.cross_entropy(model(local(t, r, WORLD)[0]),
                                                                        local(t, r, WORLD)[1]))
        torch.testing.assert_close(res["own"], expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(results[0]["own"], results[1]["own"])  # by choice, as before
    assert results[0]["not a member"] is None
    assert "NES built with a process group cannot be copied or pickled, since a process group cannot" in results[0]["copy"]
    assert "this rank (1) is not in the group" in results[1]["not a member"]


@pytest.mark.parametrize(("case", "field"), [("seed", "seed"), ("lr", "param groups' values"),
                                             ("parameters", "parameters"), ("resumed", "steps_taken"),
                                             ("lr later", "param groups' values")])
def test_ranks_that_disagree_are_refused_on_every_rank(results, case, field):
    for r, res in enumerate(results):
        found = res[case]
        assert found["error"] is not None, f"rank {r} stepped"
        assert f"ValueError: rbd_cuda: NES's agreement check: ranks disagree on {field}: rank(s) [1]" in found["error"]
        assert found["unchanged"], f"rank {r}'s parameters changed"
    steps = {"resumed": [2, 1], "lr later": [1, 1]}
    assert [res[case]["steps"] for res in results] == steps.get(case, [0, 0])


def test_a_non_finite_loss_on_one_rank_is_refused_on_every_rank(results):
    for res in results:
        assert res["nan"]["unchanged"] and res["nan"]["steps"] == 0
    assert "non-finite loss (nan) for population member 2 on this rank" in results[1]["nan"]["error"]
    assert "non-finite loss for population member 2 on another rank" in results[0]["nan"]["error"]

"""A step is one product call each way, whatever the number of compartments (issue 28), counted
with torch.profiler on the CPU (each call of a torch.ops.rbd_cuda op is one event; the DDP hook's
by wrapping the ops, as its test says); the CUDA kernels make one launch per call
(tests/test_cuda.py counts the emulated launches)."""

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rbd_cuda
from rbd_cuda.nn import RandomSubspace
from rbd_cuda.optim import FPD, RBD

OPS = ("rbd_cuda::project", "rbd_cuda::expand", "rbd_cuda::expand_", "rbd_cuda::project_grouped",
       "rbd_cuda::expand_grouped_")


def calls(fn) -> Counter:
    """The rbd_cuda ops ``fn()`` calls, by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name in OPS)


def many_tensors(n: int = 60, seed: int = 0) -> torch.nn.Module:
    """n small parameter tensors of assorted shapes, with a loss over all of them."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(3 + k % 7, 1 + k % 3, generator=gen))
                                   for k in range(n))
    return model


def backward(model) -> None:
    for p in model.parameters():
        p.grad = None
    sum((p.sin() * (k + 1)).sum() for k, p in enumerate(model.parameters())).backward()


def groups(model):
    params = list(model.parameters())
    return [{"params": params[::3], "lr": 0.05, "momentum": 0.9},
            {"params": params[1::3], "lr": 0.2, "weight_decay": 0.1},
            {"params": params[2::3]}]


@pytest.mark.parametrize("compartments", ["tensor", "global", 10])
@pytest.mark.parametrize("cls", [RBD, FPD])
def test_a_step_over_many_compartments_is_one_project_and_one_expand(cls, compartments):
    model = many_tensors()
    opt = cls(groups(model), lr=0.1, dim=5, compartments=compartments, seed=3)
    assert len(opt.compartments) > 20 or compartments == "global"
    for _ in range(3):  # the first step builds the table, later steps reuse it: each one call each way
        backward(model)
        assert calls(opt.step) == Counter({"rbd_cuda::project_grouped": 1, "rbd_cuda::expand_grouped_": 1})


def test_parameters_without_a_gradient_leave_the_step_one_call_each_way():
    model = many_tensors(30)
    opt = RBD(model.parameters(), lr=0.1, dim=4, compartments="tensor", momentum=0.5, seed=1)
    backward(model)
    for k, p in enumerate(model.parameters()):
        if k % 4 == 1:
            p.grad = None
    assert calls(opt.step) == Counter({"rbd_cuda::project_grouped": 1, "rbd_cuda::expand_grouped_": 1})


@pytest.mark.parametrize("compartments", ["tensor", "global", 10])
def test_the_step_is_the_single_ops_per_compartment_bit_for_bit(compartments):
    """What one call over every compartment computes is, bit for bit, the single ops per segment:
    c_k = Σ_s project(g_s) on stream k, θ_s ← θ_s · (1 − lr · wd) − lr_s · s_k · P_s c_k, each
    segment with its group's lr and weight decay."""
    model = many_tensors(25, seed=4)
    params = list(model.parameters())
    opt = RBD([{"params": params[::3], "lr": 0.05}, {"params": params[1::3], "lr": 0.2, "weight_decay": 0.3},
               {"params": params[2::3]}], lr=0.1, dim=6, compartments=compartments, seed=9)
    backward(model)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    want = {id(p): p.detach() * (1.0 - group_of[id(p)]["lr"] * group_of[id(p)]["weight_decay"])
            if group_of[id(p)]["weight_decay"] else p.detach().clone() for p in params}
    for comp in opt.compartments:
        c = None
        for seg in comp.segments:
            part = rbd_cuda.project(seg.view(seg.param.grad), comp.dim, seed=9, stream=comp.stream,
                                    row_offset=seg.row_offset)
            c = part if c is None else c + part
        for seg in comp.segments:
            rbd_cuda.expand_(seg.view(want[id(seg.param)]), c, -group_of[id(seg.param)]["lr"] * opt.scale(comp),
                             seed=9, stream=comp.stream, row_offset=seg.row_offset)
    opt.step()
    assert all(torch.equal(p, want[id(p)]) for p in params)


def test_random_subspace_is_one_expand_forward_and_one_project_backward():
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(12)))
    for said in (False, True):
        wrapper = RandomSubspace(model if not said else torch.nn.Sequential(*(torch.nn.Linear(4, 4)
                                                                              for _ in range(12))),
                                 8, compartments="tensor", said=said, seed=2)
        x = torch.randn(3, 4)
        assert calls(lambda w=wrapper, x=x: w(x).sum().backward()) == Counter(
            {"rbd_cuda::expand_grouped_": 1, "rbd_cuda::project_grouped": 1})


@pytest.mark.parametrize("antithetic", [False, True])
def test_an_nes_step_updates_in_one_expand(antithetic):
    """NES projects nothing; each of the population's perturbations is a column of the basis, one
    single expand_ per segment (the table tensor holds no column offset), and the update over
    every segment is one expand_grouped_."""
    model = many_tensors(12)
    opt = rbd_cuda.optim.NES(model.parameters(), lr=0.1, population=4, sigma=0.1, antithetic=antithetic, seed=4)

    def closure():
        with torch.no_grad():
            return sum((p.sin() * (k + 1)).sum() for k, p in enumerate(model.parameters()))

    assert calls(lambda: opt.step(closure)) == Counter({"rbd_cuda::expand_": 4 * 12,  # population × segments
                                                        "rbd_cuda::expand_grouped_": 1})


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_the_ddp_hook_is_one_project_and_one_expand_per_bucket(tmp_path, monkeypatch):
    """On one gloo rank in this process (the hook's exchange is the same on any number of ranks):
    every bucket of every step is one project_grouped and one expand_grouped_ over its table.
    Counted by wrapping the ops, not with the profiler: the expand runs in the all-reduce's
    callback, on gloo's thread when the reduction finishes after the callback is attached, and
    the profiler records only the threads it was started on."""
    from torch.nn.parallel import DistributedDataParallel

    from rbd_cuda.distributed import RandomBasesHook, random_bases_hook

    got = Counter()
    for name in ("project_grouped", "expand_grouped_"):
        op = getattr(torch.ops.rbd_cuda, name)
        monkeypatch.setattr(torch.ops.rbd_cuda, name,
                            lambda *a, _op=op, _name=name, **kw: got.update([_name]) or _op(*a, **kw))
    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(6))),
                                        bucket_cap_mb=0.002)
        buckets = []

        def hook(state, bucket):
            buckets.append(bucket.index())
            return random_bases_hook(state, bucket)

        model.register_comm_hook(RandomBasesHook(dim=8, seed=1), hook)
        x = torch.randn(4, 16)
        per_step = []
        for _ in range(3):  # DDP's first step has one bucket; it then rebuilds them at bucket_cap_mb
            buckets.clear()
            got.clear()
            model(x).square().sum().backward()
            assert got == Counter({"project_grouped": len(buckets), "expand_grouped_": len(buckets)})
            per_step.append(len(buckets))
        assert per_step[0] == 1 and per_step[-1] > 1
    finally:
        dist.destroy_process_group()

"""The RBD, FPD and NES optimizers and their compartments."""

import ast
import copy
import io
import itertools
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from rbd_cuda import reference
from rbd_cuda.basis import NORMALIZATIONS
from rbd_cuda.layout import Compression, Fixed, Proportional, plan
from rbd_cuda.optim import FPD, NES, RBD, replay

DATA = Path(__file__).parent / "data"
VARIANCE = {"normal": 1.0, "uniform": 1.0 / 3.0, "rademacher": 1.0}


def mlp(seed: int = 0, device="cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(device)


def classification_data(seed: int = 1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 20, generator=gen)
    teacher = torch.randn(20, 3, generator=gen)
    return x.to(device), (x @ teacher).argmax(1).to(device)


def train(model, opt, steps: int, data=None) -> list[float]:
    x, y = data or classification_data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- compartments -----------------------------------------------------------------------------


def coverage(compartments) -> dict:
    seen = {}
    for comp in compartments:
        rows = 0
        for seg in comp.segments:
            assert seg.row_offset == rows  # segments tile the compartment's rows in order
            rows += seg.numel
            seen.setdefault(id(seg.param), []).append((seg.start, seg.start + seg.numel))
    return seen


@pytest.mark.parametrize("mode", ["global", "tensor", "layer", 100, 7, 10_000])
def test_compartments_cover_every_parameter_exactly_once(mode):
    named = list(mlp().named_parameters())
    compartments = plan(named, mode, 5)
    seen = coverage(compartments)
    for _, p in named:
        pieces = sorted(seen[id(p)])
        assert pieces[0][0] == 0 and pieces[-1][1] == p.numel()
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))  # no gap, no overlap
    assert sum(c.numel for c in compartments) == sum(p.numel() for _, p in named)
    assert [c.stream for c in compartments] == list(range(len(compartments)))


def test_compartment_modes_shape():
    named = list(mlp().named_parameters())  # 320 + 16 + 48 + 3 entries
    assert [c.numel for c in plan(named, "global", 5)] == [387]
    assert [c.numel for c in plan(named, "tensor", 5)] == [320, 16, 48, 3]
    assert [c.numel for c in plan(named, "layer", 5)] == [336, 51]
    assert [c.numel for c in plan(named, 100, 5)] == [100, 100, 100, 87]


def test_explicit_compartments_must_partition():
    model = mlp()
    params = list(model.parameters())
    comps = plan(list(model.named_parameters()), [params[:2], params[2:]], 4)
    assert [c.numel for c in comps] == [336, 51]
    with pytest.raises(ValueError, match="exactly one compartment"):
        plan(list(model.named_parameters()), [params[:2], params[1:]], 4)
    with pytest.raises(ValueError, match="exactly one compartment"):
        plan(list(model.named_parameters()), [params[:2]], 4)


def test_dimension_rules():
    assert Fixed(7).allocate([10, 1000]) == [7, 7]
    dims = Proportional(100).allocate([320, 16, 48, 3])
    assert sum(dims) == 100 and dims[0] > dims[2] > dims[1] >= dims[3] >= 1
    assert Compression(400, minimum=10).allocate([101_770, 50]) == [255, 10]
    comps = plan(list(mlp().named_parameters()), "tensor", Proportional(40))
    assert sum(c.dim for c in comps) == 40


@pytest.mark.parametrize(("sizes", "total", "minimum", "expected"), [
    ([100_480, 1_290], 250, 1, [247, 3]),  # the FC network per layer
    # Per tensor: the two small tensors' shares fall below 1; rounding each up to 1 once made 251.
    ([100_352, 128, 1_280, 10], 250, 1, [245, 1, 3, 1]),
    ([100_352, 128, 1_280, 10], 250, 5, [235, 5, 5, 5]),
    ([320, 16, 48, 3], 100, 1, [83, 4, 12, 1]),  # what Proportional(100) gave before it had a minimum
    ([5, 5, 5], 10, 1, [4, 3, 3]),  # a tie goes to the earlier compartment
    ([1, 1, 1, 97], 8, 2, [2, 2, 2, 2]),
    ([7], 9, 9, [9]),
])
def test_proportional_splits_the_total_exactly_with_a_minimum_each(sizes, total, minimum, expected):
    assert Proportional(total, minimum).allocate(sizes) == expected


def _proportional_before_the_minimum(total: int, sizes: list[int]) -> list[int]:
    """Proportional(total) as it was before it had a minimum (its splits are saved in state dicts)."""
    whole = sum(sizes)
    dims = [max(1, math.floor(total * n / whole)) for n in sizes]
    order = sorted(range(len(sizes)), key=lambda k: (-(total * sizes[k] / whole - dims[k]), k))
    for k in order[: max(0, total - sum(dims))]:
        dims[k] += 1
    return dims


def test_proportional_sums_to_the_total_and_follows_the_sizes():
    rng = np.random.default_rng(0)
    unchanged = 0
    for _ in range(1000):
        sizes = [int(n) for n in rng.integers(1, 10**int(rng.integers(1, 6)), int(rng.integers(1, 7)))]
        minimum = int(rng.integers(1, 4)) if rng.random() < 0.5 else 1
        total = minimum * len(sizes) + int(rng.integers(0, 50))
        dims = Proportional(total, minimum).allocate(sizes)
        assert sum(dims) == total and min(dims) >= minimum, (sizes, total, minimum, dims)
        assert dims == Proportional(total, minimum).allocate(sizes)
        # A larger compartment never gets fewer directions; one above the minimum is within one
        # direction of its share of what the compartments at the minimum left.
        assert all(dims[i] <= dims[j] for i in range(len(sizes)) for j in range(len(sizes)) if sizes[i] < sizes[j])
        free = [k for k, d in enumerate(dims) if d > minimum]
        rest = total - minimum * (len(sizes) - len(free))
        for k in free:
            assert abs(dims[k] - rest * sizes[k] / sum(sizes[j] for j in free)) < 1, (sizes, total, minimum, dims)
        # Where the rule without a minimum summed to the total, its split is kept.
        before = _proportional_before_the_minimum(total, sizes)
        if minimum == 1 and sum(before) == total:
            assert dims == before, (sizes, total)
            unchanged += 1
    assert unchanged > 400
    assert Proportional(40) == Proportional(40, 1) == Proportional(total=40, minimum=1)


def test_proportional_refuses_a_total_below_the_minimums():
    with pytest.raises(ValueError, match=r"Proportional\(total=7, minimum=2\) cannot give each of 4 compartments 2 "
                                         r"direction\(s\): the total must be at least 8"):
        Proportional(7, 2).allocate([5, 5, 5, 5])
    assert Proportional(8, 2).allocate([5, 5, 5, 5]) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"Proportional\(total=3, minimum=1\) cannot give each of 4 compartments"):
        RBD(mlp().named_parameters(), lr=0.1, dim=Proportional(3), compartments="tensor")


def test_the_state_dict_refuses_another_split_of_the_total():
    """The compartments' dims are part of the saved configuration: a state dict of one split does
    not load into an optimizer of another (the rule itself is not saved; the dims it gave are)."""
    saved = RBD(mlp().named_parameters(), lr=0.1, dim=Proportional(12), compartments="tensor").state_dict()
    RBD(mlp().named_parameters(), lr=0.1, dim=Proportional(12), compartments="tensor").load_state_dict(saved)
    other = RBD(mlp().named_parameters(), lr=0.1, dim=Proportional(12, 2), compartments="tensor")
    with pytest.raises(ValueError, match="compartment 0's dim: 9 saved, 6 here"):
        other.load_state_dict(saved)


# ---- the update --------------------------------------------------------------------------------


def mean_step(g: torch.Tensor, steps: int, **rbd_kwargs) -> torch.Tensor:
    """The average of −Δθ over ``steps`` re-drawn RBD steps (lr 1) on the fixed gradient ``g``."""
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = RBD([p], lr=1.0, **rbd_kwargs)
    total = torch.zeros_like(g)
    for _ in range(steps):
        with torch.no_grad():
            p.zero_()
        p.grad = g.clone()
        opt.step()
        total -= p.detach()
    return total / steps


@pytest.mark.parametrize("distribution", ["normal", "uniform", "rademacher"])
def test_unbiased_update_averages_to_the_gradient(distribution):
    # E[P Pᵀ g] = d σ² g, so the "unbiased" step −lr P Pᵀ g / (d σ²) averages to −lr g.
    g = torch.randn(12, generator=torch.Generator().manual_seed(0))
    n = 4000
    mean = mean_step(g, n, dim=3, distribution=distribution, seed=5)
    # per-entry standard error of one draw is about |g| sqrt(1/d) (normal); 6 of them over n draws
    assert (mean - g).abs().max() < 6 * g.norm() / (3**0.5 * n**0.5) * 1.5
    assert torch.nn.functional.cosine_similarity(mean, g, dim=0) > 0.99


def test_paper_normalisation_scales_by_d_over_D():
    g = torch.randn(50, generator=torch.Generator().manual_seed(1))
    mean = mean_step(g, 3000, dim=5, normalize="paper", seed=2)
    assert abs(mean.dot(g) / g.dot(g) - 5 / 50) < 0.01  # E[Δθ] = −lr (d/D) g


def test_rbd_descends_faster_than_fpd():
    model = mlp()
    rbd_losses = train(model, RBD(model.parameters(), lr=0.5, dim=20, seed=3), 150)
    model = mlp()
    fpd_losses = train(model, FPD(model.parameters(), lr=0.5, dim=20, seed=3), 150)
    assert rbd_losses[0] == fpd_losses[0]
    assert rbd_losses[-1] < 0.6 * rbd_losses[0]
    assert rbd_losses[-1] < fpd_losses[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_parameters(dtype):
    model = mlp().to(dtype)
    x, y = classification_data()
    opt = RBD(model.parameters(), lr=0.5, dim=16, compartments="tensor", momentum=0.5, weight_decay=0.01, seed=1)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert all(p.dtype == dtype for p in model.parameters())
    assert loss.item() < first


def test_parameters_without_grad_are_left_alone_and_closure_loss_is_returned():
    model = mlp()
    frozen = model[2].bias
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    x, y = classification_data()
    opt = RBD([p for p in model.parameters() if p.requires_grad] + [frozen], lr=0.5, dim=8)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert torch.equal(frozen, before)


def test_param_groups_use_their_own_lr():
    model = mlp()
    opt = RBD([{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}],
              lr=0.5, dim=8)
    first = [p.detach().clone() for p in model[0].parameters()]
    second = [p.detach().clone() for p in model[2].parameters()]
    train(model, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, model[0].parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(second, model[2].parameters(), strict=True))


def test_momentum_keeps_a_buffer_and_descends():
    model = mlp()
    opt = RBD(model.parameters(), lr=0.5, dim=20, momentum=0.5)
    losses = train(model, opt, 100)
    assert losses[-1] < 0.7 * losses[0]
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_a_step_gradscaler_skips_changes_nothing_and_is_not_counted():
    model = mlp()
    opt = RBD(model.parameters(), lr=0.3, dim=6, momentum=0.5, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = classification_data()
    for step in range(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if step == 1:  # an overflow: the scaler skips opt.step and halves its scale
            model[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert opt.steps_taken == 1 and scaler.get_scale() == 2.0**9
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.steps_taken == 2


# ---- weight decay and the keys of param groups ---------------------------------------------------


def decay_groups(model, weight_decay: float) -> list[dict]:
    """The HF Trainer's groups: weights decayed, biases not."""
    return [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": weight_decay},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]


@pytest.mark.parametrize("cls", [RBD, FPD])
def test_weight_decay_is_decoupled_and_per_group(cls):
    lr, wd = 0.3, 0.5
    plain, decayed = mlp(), mlp()
    initial = [p.detach().clone() for p in plain.parameters()]
    train(plain, cls(decay_groups(plain, 0.0), lr=lr, dim=8, compartments="tensor", seed=4), 1)
    opt = cls(decay_groups(decayed, wd), lr=lr, dim=8, compartments="tensor", seed=4)
    train(decayed, opt, 1)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    for (name, p), q, p0 in zip(decayed.named_parameters(), plain.parameters(), initial, strict=True):
        if name.endswith("bias"):
            assert torch.equal(p, q), name
        else:  # θ(1 − lr·wd) plus the same subspace update, which does not depend on θ
            torch.testing.assert_close(p, p0 * (1 - lr * wd) + (q - p0), rtol=0, atol=1e-6)
            assert not torch.allclose(p, q)


def test_weight_decay_keyword_and_nes():
    model = mlp()
    assert RBD(model.parameters(), lr=0.1, dim=4, weight_decay=0.01).param_groups[0]["weight_decay"] == 0.01
    x, y = classification_data()
    runs = []
    for wd in (0.0, 0.5):
        model = mlp()
        NES(model.parameters(), lr=0.1, population=4, sigma=0.1, weight_decay=wd, seed=2).step(
            lambda model=model: torch.nn.functional.cross_entropy(model(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    initial = list(mlp().parameters())
    for plain, decayed, p0 in zip(*runs, initial, strict=True):
        torch.testing.assert_close(decayed, p0 * (1 - 0.05) + (plain - p0), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("cls", "kw"), [(RBD, {"dim": 4}), (FPD, {"dim": 4}), (NES, {"population": 4})])
@pytest.mark.parametrize("key", ["betas", "eps", "nesterov", "initial_lr"])
def test_a_group_key_the_optimizer_does_not_implement_is_refused(cls, kw, key):
    model = mlp()
    with pytest.raises(ValueError, match=f"param group 1 has the key '{key}', which {cls.__name__} does not implement"):
        cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), key: 0.9}], lr=0.1, **kw)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "0.1"])
def test_a_bad_weight_decay_is_refused(value):
    model = mlp()
    with pytest.raises((ValueError, TypeError), match=r"weight_decay \(param group 0\) must be"):
        RBD(decay_groups(model, value), lr=0.1, dim=4)


def format_2(sd: dict, weight_decay=None) -> dict:
    """``sd`` as the version before weight decay wrote it (its groups: whatever keys they were given)."""
    sd = {**sd, "rbd": {**sd["rbd"], "format": 2}, "param_groups": [dict(g) for g in sd["param_groups"]]}
    for group in sd["param_groups"]:
        del group["weight_decay"]
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
    return sd


def test_format_2_state_dicts_load_without_decay_and_refuse_the_decay_they_ignored():
    model = mlp()
    source = RBD(model.parameters(), lr=0.2, dim=4, momentum=0.5, seed=3)
    train(model, source, 2)
    opt = RBD(model.parameters(), lr=0.2, dim=4, momentum=0.5, weight_decay=0.3, seed=3)
    opt.load_state_dict(format_2(source.state_dict()))
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.steps_taken == 2
    before = opt.state_dict()
    with pytest.raises(ValueError, match="weight_decay=0.1, which the version that saved it ignored"):
        opt.load_state_dict(format_2(source.state_dict(), weight_decay=0.1))
    assert opt.state_dict()["param_groups"] == before["param_groups"]


# ---- loads check everything before they change anything --------------------------------------------


def corrupt(sd: dict, what: str) -> dict:
    sd = {**sd, "rbd": dict(sd["rbd"]), "param_groups": [dict(g) for g in sd["param_groups"]],
          "state": {k: dict(v) for k, v in sd["state"].items()}}
    buffer = sd["state"][0]["momentum_buffer"]
    if what in ("lr", "momentum"):
        sd["param_groups"][-1][what] = {"lr": float("nan"), "momentum": 1.0}[what]
    elif what.startswith("steps"):
        sd["rbd"]["steps_taken"] = {"steps str": "x", "steps negative": -1, "steps fraction": 2.5,
                                    "steps bool": True}[what]
    elif what == "buffer shape":
        sd["state"][0]["momentum_buffer"] = buffer.reshape(-1)[:-1]
    elif what == "buffer nan":
        sd["state"][0]["momentum_buffer"] = torch.full_like(buffer, float("nan"))
    elif what == "buffer int":
        sd["state"][0]["momentum_buffer"] = buffer.long()
    elif what == "unknown state":
        sd["state"][0]["exp_avg"] = buffer
    elif what == "groups":
        sd["param_groups"] = sd["param_groups"][:1]
    elif what == "format":
        sd["rbd"]["format"] = 99
    elif what == "no format":
        del sd["rbd"]["format"]
    elif what == "group key":
        sd["param_groups"][-1]["betas"] = (0.9, 0.999)
    return sd


@pytest.mark.parametrize("what", ["lr", "momentum", "steps str", "steps negative", "steps fraction", "steps bool",
                                  "buffer shape", "buffer nan", "buffer int", "unknown state", "groups", "format",
                                  "no format", "group key"])
def test_a_refused_load_changes_nothing(what):
    model = mlp()
    kw = {"lr": 0.2, "dim": 6, "compartments": "tensor", "momentum": 0.5, "seed": 8}
    source = RBD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], **kw)
    train(model, source, 2)
    fresh_model = mlp()
    opt = RBD([{"params": fresh_model[0].parameters()}, {"params": fresh_model[2].parameters()}], **kw)
    twin_model = mlp()
    twin = RBD([{"params": twin_model[0].parameters()}, {"params": twin_model[2].parameters()}], **kw)
    train(fresh_model, opt, 1)
    train(twin_model, twin, 1)
    with pytest.raises(ValueError, match="rbd_cuda: "):
        opt.load_state_dict(corrupt(source.state_dict(), what))
    # Nothing was loaded: the next steps are those of an optimizer never asked to load.
    train(fresh_model, opt, 2)
    train(twin_model, twin, 2)
    assert opt.steps_taken == twin.steps_taken == 3
    for a, b in zip(fresh_model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("cls", "kw"), [(RBD, {"dim": 4}), (FPD, {"dim": 4}), (NES, {"population": 4})])
@pytest.mark.parametrize("key", ["betas", "weight_deacy", "nesterov"])
def test_a_loaded_group_key_the_optimizer_does_not_implement_is_refused(cls, kw, key):
    model = mlp()
    opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1, **kw)
    sd = opt.state_dict()
    sd["param_groups"][1][key] = 0.9
    with pytest.raises(ValueError, match=f"param group 1 has the key '{key}', which {cls.__name__} does not implement"):
        opt.load_state_dict(sd)
    assert key not in opt.param_groups[1]


def test_the_keys_schedulers_add_load():
    opt = RBD(mlp().parameters(), lr=0.1, dim=4, momentum=0.5)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)  # initial_lr, max_lr, min_lr, momenta
    torch.optim.swa_utils.SWALR(opt, swa_lr=0.05)
    sd = opt.state_dict()
    added = {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"}
    assert added <= set(sd["param_groups"][0])
    fresh = RBD(mlp().parameters(), lr=0.1, dim=4, momentum=0.5)
    fresh.load_state_dict(sd)
    assert {key: fresh.param_groups[0][key] for key in added} == {key: sd["param_groups"][0][key] for key in added}


def test_a_state_dict_without_its_format_is_refused_naming_it():
    opt = RBD(mlp().parameters(), lr=0.1, dim=4)
    sd = opt.state_dict()
    del sd["rbd"]["format"]
    with pytest.raises(ValueError, match="the state_dict's 'rbd' entry has no 'format'"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("what", ["state", "steps", "lr", "weight_decay"])
def test_nes_and_fpd_loads_are_checked_too(what):
    for opt in (NES(mlp().parameters(), lr=0.1, population=4, seed=1),
                FPD(mlp().parameters(), lr=0.1, dim=4, seed=1)):
        sd = opt.state_dict()
        sd = {**sd, "rbd": dict(sd["rbd"]), "param_groups": [dict(g) for g in sd["param_groups"]]}
        if what == "state":
            if isinstance(opt, FPD):
                continue  # FPD keeps momentum buffers: test_a_refused_load_changes_nothing
            sd["state"] = {0: {"momentum_buffer": torch.zeros(16, 20)}}
        elif what == "steps":
            sd["rbd"]["steps_taken"] = 1.5
        else:
            sd["param_groups"][0][what] = -1.0
        with pytest.raises(ValueError, match="rbd_cuda: "):
            opt.load_state_dict(sd)
        assert opt.steps_taken == 0 and opt.param_groups[0]["lr"] == 0.1 and not opt.state


def test_a_momentum_buffer_changed_by_hand_fails_the_step_before_it_changes_anything():
    model = mlp()
    opt = RBD(model.named_parameters(), lr=0.2, dim=6, compartments="tensor", momentum=0.5)
    train(model, opt, 1)
    opt.state[model[2].bias]["momentum_buffer"] = torch.zeros(2)
    grads_everywhere(model)
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"momentum buffer of parameter 2.bias is torch.float32 \(2,\)"):
        opt.step()
    assert opt.steps_taken == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(buffers, model.parameters(),
                                                                              strict=True))


def test_a_mismatch_message_names_the_field_and_stays_short():
    big = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(40)])
    sd = RBD(big.named_parameters(), lr=0.1, dim=4, compartments="tensor").state_dict()
    with pytest.raises(ValueError) as error:
        RBD(big.named_parameters(), lr=0.1, dim=5, compartments="tensor").load_state_dict(sd)
    message = str(error.value)
    assert "compartment 0's dim: 4 saved, 5 here" in message and "77 more compartments differ" in message
    assert len(message) < 600


# ---- NES ------------------------------------------------------------------------------------


@pytest.mark.parametrize("antithetic", [False, True])
def test_nes_lowers_the_loss(antithetic):
    model = mlp()
    x, y = classification_data()

    def closure():
        return torch.nn.functional.cross_entropy(model(x), y)

    start = closure().item()
    opt = NES(model.parameters(), lr=0.05, population=20, sigma=0.05, antithetic=antithetic,
              normalize="none", seed=1)
    for _ in range(60):
        opt.step(closure)
    assert closure().item() < 0.8 * start


def test_nes_step_without_a_closure_fails_before_any_work():
    model = mlp()
    opt = NES(model.parameters(), lr=0.1, population=4, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="NES.step needs a closure that returns the loss"):
        opt.step()
    assert opt.steps_taken == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_nes_refuses_a_closure_that_runs_a_backward_pass_at_its_first_call():
    model = mlp()
    x, y = classification_data()
    opt = NES(model.parameters(), lr=0.1, population=4, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():  # what Lightning's automatic optimization hands a step
        calls.append(1)
        opt.zero_grad()
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        return loss

    with pytest.raises(ValueError, match="closure ran a backward pass"):
        opt.step(closure)
    assert len(calls) == 1 and opt.steps_taken == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # A closure that only clears the gradients (or leaves them) is fine.
    opt.step(lambda: (opt.zero_grad(), torch.nn.functional.cross_entropy(model(x), y))[1])
    assert opt.steps_taken == 1


def test_nes_step_moves_along_the_better_direction():
    # One direction, two antithetic members: a small step must go to the side of the lower loss.
    p = torch.nn.Parameter(torch.zeros(30))
    target = torch.randn(30, generator=torch.Generator().manual_seed(4))
    opt = NES([p], lr=1e-3, population=2, sigma=0.1, antithetic=True, normalize="none", seed=3)

    def closure():
        return (p - target).pow(2).sum()

    before = closure().item()
    opt.step(closure)
    assert closure().item() < before


@pytest.mark.parametrize(
    "kw,match",
    [({"population": 1}, "population"), ({"population": 5, "antithetic": True}, "even"),
     ({"sigma": 0.0}, "sigma"), ({"sigma": float("inf")}, "sigma"), ({"lr": float("inf")}, "lr"),
     ({"normalize": "sqrt"}, "normalize")],
    ids=repr,
)
def test_nes_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        NES(mlp().parameters(), **{"lr": 0.1, "population": 4, **kw})
    with pytest.raises(ValueError, match="closure"):
        NES(mlp().parameters(), lr=0.1, population=4).step()


def test_nes_skips_frozen_parameters_their_rows_unused():
    """A frozen parameter (requires_grad=False) is neither perturbed, decayed nor updated; the others
    follow the documented update (test_nes_step_equals_its_documented_update) on their own rows of
    P, the scale still that of all the parameters given."""
    model = mlp()
    model[0].bias.requires_grad_(False)
    x, y = classification_data()
    lr, sigma, wd, population = 0.2, 0.05, 0.5, 4
    opt = NES(model.parameters(), lr=lr, population=population, sigma=sigma, weight_decay=wd, normalize="paper",
              seed=4)
    theta0 = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    trained = torch.ones(387, dtype=torch.float64)
    trained[320:336] = 0.0  # 0.bias's rows
    seen, losses = [], []

    def closure():
        seen.append(torch.cat([p.detach().double().reshape(-1) for p in model.parameters()]))
        losses.append(float(torch.nn.functional.cross_entropy(model(x), y)))
        return losses[-1]

    opt.step(closure)
    P = reference.materialize(387, population, seed=4)
    for j, at in enumerate(seen):
        torch.testing.assert_close(at, theta0 + trained * sigma * P[:, j], rtol=1e-5, atol=1e-6)
    order = sorted(range(population), key=lambda i: losses[i])
    a = [0.0] * population
    for rank, i in enumerate(order):
        a[i] = 0.5 - rank / (population - 1)
    step = sum(a[j] * P[:, j] for j in range(population)) / (sigma * population)
    expected = theta0 * (1 - lr * wd * trained) + trained * lr * (1 / 387) ** 0.5 * step
    got = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[320:336], theta0[320:336])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter has requires_grad=False"):
        opt.step(closure)
    assert opt.steps_taken == 1 and torch.equal(torch.cat([p.detach().double().reshape(-1) for p in model.parameters()]), got)


# ---- copies ---------------------------------------------------------------------------------------


def through_torch_save(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
          "torch.save": through_torch_save}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("cls", [RBD, FPD, NES])
def test_a_copy_continues_as_the_original(cls, how):
    """A copy of a model and its optimizer (under an LR scheduler, which wraps opt.step) steps on its
    own and as the original does: the seed, the step count, the compartments and the state go with it."""
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}]
    opt = (NES(groups, lr=0.2, population=4, sigma=0.1, weight_decay=0.1, seed=5) if cls is NES else
           cls(groups, lr=0.2, dim=5, compartments="tensor", momentum=0.5, weight_decay=0.1, seed=5))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x, y = classification_data()

    def step(model, opt):
        if isinstance(opt, NES):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        else:
            train(model, opt, 1, (x, y))

    for _ in range(2):
        step(model, opt)
        scheduler.step()
    copied_model, copied = COPIES[how]((model, opt))
    assert copied.steps_taken == 2 and copied.seed == 5
    original = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        step(copied_model, copied)
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters(), strict=True))
    assert opt.steps_taken == 2
    for _ in range(2):
        step(model, opt)
    assert copied.steps_taken == opt.steps_taken == 4
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copied_model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(original, model.parameters(), strict=True))


# ---- diagnostics and replay ---------------------------------------------------------------------


def test_diagnostics_report_the_cosine_with_the_gradient():
    model = mlp()
    opt = RBD(model.named_parameters(), lr=0.1, dim=Fixed(3000), compartments="layer", diagnostics=True)
    train(model, opt, 1)
    assert [d["stream"] for d in opt.diagnostics] == [0, 1]
    # d >> D: P Pᵀ is close to d·I, so the update is almost parallel to the gradient
    assert all(d["cosine"] > 0.9 for d in opt.diagnostics)
    small = RBD(model.parameters(), lr=0.1, dim=2, diagnostics=True)
    train(model, small, 1)
    assert 0.0 < small.diagnostics[0]["cosine"] < 0.5  # about sqrt(d/D) for d << D
    assert small.diagnostics[0]["coeff_absmax"] > 0


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.5, 0.0), (0.5, 0.3)])
def test_replay_rebuilds_the_trained_parameters_exactly(momentum, weight_decay):
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model[2].bias.requires_grad_(False)  # a parameter without grad is skipped (not even decayed), and must stay so
    kw = {"lr": 0.4, "dim": Proportional(24), "compartments": 100, "momentum": momentum,
          "weight_decay": weight_decay, "seed": 5}
    opt = RBD(model.parameters(), record=True, **kw)
    train(model, opt, 4)
    opt.param_groups[0]["lr"] = 0.1  # a schedule
    train(model, opt, 4)
    assert len(opt.record["steps"]) == 8
    assert all(c.numel() == comp.dim for entry in opt.record["steps"]
               for (c, _), comp in zip(entry["coefficients"].values(), opt.compartments, strict=False))

    rebuilt = mlp(seed=42)
    rebuilt.load_state_dict(initial)
    replay(RBD(rebuilt.parameters(), **kw), opt.record)
    for a, b in zip(model.parameters(), rebuilt.parameters(), strict=True):
        assert torch.equal(a, b)


# ---- reproducibility ---------------------------------------------------------------------------


def test_same_seed_same_run_different_seed_different_run():
    runs = []
    for seed in (7, 7, 8):
        model = mlp()
        train(model, RBD(model.parameters(), lr=0.5, dim=10, compartments="tensor", seed=seed), 5)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("cls", [RBD, FPD])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_resume_from_state_dict_is_bit_identical(cls, momentum):
    kw = {"lr": 0.3, "dim": Proportional(30), "compartments": 100, "momentum": momentum,
          "weight_decay": 0.2 if momentum else 0.0, "seed": 11}
    model = mlp()
    opt = cls(model.named_parameters(), **kw)
    train(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 5)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = mlp(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = cls(resumed_model.named_parameters(), **kw)
    resumed.load_state_dict(saved["opt"])
    assert resumed.steps_taken == 5
    train(resumed_model, resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed_model.parameters(), strict=True))


@pytest.mark.parametrize(("changed", "name"), [
    ({"dim": 9}, "compartments"), ({"compartments": "tensor"}, "compartments"), ({"seed": 4}, "seed"),
    ({"distribution": "uniform"}, "distribution"), ({"normalize": "paper"}, "normalize"),
], ids=repr)
def test_state_dict_from_another_configuration_is_refused_naming_it(changed, name):
    model = mlp()
    kw = {"lr": 0.1, "dim": 8, "seed": 3}
    sd = RBD(model.parameters(), **kw).state_dict()
    with pytest.raises(ValueError, match=f"other arguments.*{name}: "):
        RBD(model.parameters(), **{**kw, **changed}).load_state_dict(sd)
    with pytest.raises(ValueError, match="optimizer: 'RBD' saved, 'FPD' here"):
        FPD(model.parameters(), **kw).load_state_dict(sd)


def test_summary():
    model = mlp()
    s = RBD(model.named_parameters(), lr=0.1, dim=Compression(10, minimum=4), compartments="layer").summary()
    assert [(r["name"], r["numel"], r["dim"]) for r in s["compartments"]] == [("0", 336, 34), ("2", 51, 6)]
    assert s["numel"] == 387 and s["dim"] == 40 and s["compression"] == pytest.approx(387 / 40)


# ---- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"dim": 0}, "dim"),
        ({"dim": -3}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": float("nan")}, "momentum"),
        ({"compartments": "rows"}, "compartments"),
        ({"compartments": 0}, "size"),
        ({"distribution": "gauss"}, "distribution"),
        ({"normalize": "sqrt"}, "normalize"),
        ({"seed": 2**64}, "seed"),
    ],
    ids=repr,
)
def test_bad_arguments(kw, match):
    args = {"lr": 0.1, "dim": 4, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        RBD(mlp().parameters(), **args)


def test_layer_compartments_need_names():
    with pytest.raises(ValueError, match="named_parameters"):
        RBD(mlp().parameters(), lr=0.1, dim=4, compartments="layer")


def test_parameters_that_share_memory_are_refused_naming_them():
    weight = torch.nn.Parameter(torch.zeros(10))
    view = torch.nn.Parameter(weight.data[4:8])
    bias = torch.nn.Parameter(torch.zeros(3))
    for cls, kw in ((RBD, {"dim": 2}), (NES, {"population": 2})):
        with pytest.raises(ValueError, match="parameters weight and view share memory"):
            cls([("weight", weight), ("bias", bias), ("view", view)], lr=0.1, **kw)
    RBD([("weight", weight), ("bias", bias)], lr=0.1, dim=2)
    flat = torch.zeros(13)  # adjacent pieces of one tensor do not overlap
    RBD([torch.nn.Parameter(flat[:10]), torch.nn.Parameter(flat[10:])], lr=0.1, dim=2)


def test_a_parameter_in_two_groups_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="more than one"):
        RBD([{"params": model.parameters()}, {"params": [model[0].weight]}], lr=0.1, dim=4)


# ---- param groups are read at step time (schedulers, resumed runs) -----------------------------


def run_with_scheduler(model, opt, sched, steps: int, data) -> None:
    for _ in range(steps):
        train(model, opt, 1, data)
        sched.step()


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.5, 0.1)])
def test_steplr_checkpoint_resume_is_bit_identical_and_replays(device, momentum, weight_decay):
    data = classification_data(device=device)
    kw = {"lr": 0.4, "dim": Proportional(24), "compartments": 100, "momentum": momentum,
          "weight_decay": weight_decay, "seed": 21}

    def build(model, record=False):
        opt = RBD(model.named_parameters(), record=record, **kw)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    model = mlp(device=device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt, sched = build(model, record=True)
    run_with_scheduler(model, opt, sched, 6, data)
    assert opt.param_groups[0]["lr"] == 0.4 * 0.5**3
    assert [entry["lr"] for entry in opt.record["steps"]] == [[0.4], [0.4], [0.2], [0.2], [0.1], [0.1]]

    interrupted = mlp(device=device)
    first, first_sched = build(interrupted)
    run_with_scheduler(interrupted, first, first_sched, 3, data)
    buffer = io.BytesIO()
    torch.save({"model": interrupted.state_dict(), "optimizer": first.state_dict(),
                "scheduler": first_sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=5, device=device)
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = build(resumed)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    run_with_scheduler(resumed, opt2, sched2, 3, data)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name

    rebuilt = mlp(seed=6, device=device)
    rebuilt.load_state_dict(initial)
    replay(RBD(rebuilt.named_parameters(), **kw), opt.record)
    for a, b in zip(model.parameters(), rebuilt.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loaded_and_changed_learning_rates_are_the_ones_used():
    model = mlp()
    frozen = RBD(model.parameters(), lr=0.0, dim=8, seed=2)
    opt = RBD(model.parameters(), lr=0.5, dim=8, seed=2)
    opt.load_state_dict(frozen.state_dict())  # lr 0 from now on
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.param_groups[0]["lr"] = 0.5
    train(model, opt, 1)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_add_param_group_is_refused():
    model = mlp()
    opt = RBD(model[0].parameters(), lr=0.1, dim=4)
    with pytest.raises(ValueError, match="add_param_group is not supported"):
        opt.add_param_group({"params": model[2].parameters()})
    assert len(opt.param_groups) == 1


# ---- all-or-nothing steps and clear errors ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.int32])
def test_parameters_the_ops_cannot_update_are_refused_at_construction(dtype):
    ok = torch.nn.Parameter(torch.zeros(5))
    bad = torch.zeros(3, dtype=dtype)
    with pytest.raises(ValueError, match=f"parameter param1 has dtype {dtype}"):
        RBD([ok, bad], lr=0.1, dim=2, compartments="tensor")


def grads_everywhere(model):
    model.zero_grad()
    x, y = classification_data()
    torch.nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("problem", ["inf lr", "nan momentum", "sparse grad", "nan grad"])
def test_a_refused_step_changes_nothing(problem):
    model = mlp()
    opt = RBD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1, dim=4,
              compartments="tensor", momentum=0.5)
    grads_everywhere(model)
    if problem == "inf lr":
        opt.param_groups[1]["lr"] = float("inf")
        match = r"lr \(param group 1\) must be finite"
    elif problem == "nan momentum":
        opt.param_groups[1]["momentum"] = float("nan")
        match = r"momentum \(param group 1\) must be finite"
    elif problem == "sparse grad":
        model[2].bias.grad = model[2].bias.grad.to_sparse()
        match = "parameter param3 has a torch.sparse_coo gradient"
    else:
        model[2].bias.grad[1] = float("nan")
        match = "the gradient of parameter param3 holds NaN or infinite values"
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.steps_taken == 0 and not opt.state


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [RBD, FPD])
def test_a_non_finite_gradient_entry_is_refused_naming_its_parameter(cls, dtype, value):
    model = mlp().to(dtype)
    opt = cls(model.named_parameters(), lr=0.3, dim=5, momentum=0.5, seed=2)
    x, y = classification_data()
    train(model, opt, 2, (x.to(dtype), y))  # the last step's gradients stay
    model[0].weight.grad[3, 7] = value  # one entry of 387
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"the gradient of parameter 0.weight holds NaN or infinite values; step 2 "
                                         r"was not taken \(the parameters and the step count are unchanged\)"):
        opt.step()
    assert opt.steps_taken == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(buffers, model.parameters(),
                                                                              strict=True))
    model[0].weight.grad[3, 7] = 0.0
    opt.step()
    assert opt.steps_taken == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_numpy_integers_are_taken_and_the_state_dict_loads_with_weights_only():
    model = mlp()
    opt = RBD(model.parameters(), lr=np.float32(0.1), dim=np.int64(5), seed=np.uint64(2**63 + 5))
    assert opt.compartments[0].dim == 5 and type(opt.seed) is int
    train(model, opt, 1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    RBD(model.parameters(), lr=0.1, dim=5, seed=2**63 + 5).load_state_dict(torch.load(buffer, weights_only=True))


# ---- checkpoints written by a02b069 -------------------------------------------------------------


def resume_a02b069(name: str) -> tuple[dict, dict]:
    """tests/data/a02b069_states.pt: per optimizer, the model and ``state_dict()`` after 3 steps
    and the model after 3 more, written by the optimizers of a02b069 on this test's task (RBD:
    blocks of 100, Proportional(30), momentum 0.9, seed 11; FPD: tensors, d 8, "paper", seed 12;
    NES: population 6 antithetic, sigma 0.05, lr 0.05, seed 13). Loads the state and takes the 3
    more steps; returns the model's state dict then, and the saved one.

    The 3 more steps are fed stored inputs (tests/data/a02b069_inputs.pt: each step's gradients;
    NES's closure losses, in call order), not recomputed: torch's matrix products differ in their
    last bits across CPUs, the optimizers' products must not (they are the project's, the same on
    every ISA and thread count). The inputs were computed on this task by fcd40d6 on a machine
    whose products reproduced a02b069's "after" weights bit for bit, which was checked when they
    were written."""
    saved = torch.load(DATA / "a02b069_states.pt", weights_only=True)[name]
    inputs = torch.load(DATA / "a02b069_inputs.pt", weights_only=True)[name]
    assert "format" not in saved["optimizer"]["rbd"]
    model = mlp(seed=3)
    model.load_state_dict(saved["model"])
    if name == "NES":
        opt = NES(model.parameters(), lr=0.05, population=6, sigma=0.05, antithetic=True, seed=13)
        opt.load_state_dict(saved["optimizer"])
        losses = iter(inputs["losses"].tolist())
        for _ in range(3):
            opt.step(lambda: next(losses))
        assert next(losses, None) is None
    else:
        opt = (RBD(model.named_parameters(), lr=0.3, dim=Proportional(30), compartments=100, momentum=0.9, seed=11)
               if name == "RBD" else
               FPD(model.named_parameters(), lr=0.3, dim=8, compartments="tensor", normalize="paper", seed=12))
        opt.load_state_dict(saved["optimizer"])
        for grads in inputs["grads"]:
            for key, p in model.named_parameters():
                p.grad = grads[key].clone()
            opt.step()
    assert opt.steps_taken == 6
    return model.state_dict(), saved


@pytest.mark.parametrize("name", ["RBD", "FPD", "NES"])
def test_state_dicts_written_by_a02b069_resume(name):
    """a02b069's states load and continue: bit for bit as the kernels of issue 31 continue them
    (tests/data/a02b069_after_issue31.pt), and within fp32 rounding of a02b069's own "after"
    weights. Issue 31 changed the CPU kernels' arithmetic (normal entries and the normal and
    uniform products by fused multiply-adds, Rademacher expand's sums three columns at a time;
    CHANGELOG.md), which is the same on every ISA and thread count but not a02b069's, so the old
    trajectory is not repeated bit for bit. The new weights were written by resume_a02b069 on the
    baseline, AVX2 and AVX-512 paths at 1 and 2 threads, which all gave the same bits."""
    after, saved = resume_a02b069(name)
    pinned = torch.load(DATA / "a02b069_after_issue31.pt", weights_only=True)[name]
    for key, value in after.items():
        assert torch.equal(value, pinned[key]), key
        old = saved["after"][key]
        assert (value - old).abs().max() <= 1e-6 * old.abs().max(), key
    wrong = RBD(mlp().parameters(), lr=0.3, dim=31, compartments=100)
    with pytest.raises(ValueError, match=r"saved compartments.*compartment \d+'s dim: \d+ saved, 31 here"):
        wrong.load_state_dict(torch.load(DATA / "a02b069_states.pt", weights_only=True)["RBD"]["optimizer"])


# ---- replay refuses another optimizer -----------------------------------------------------------


@pytest.mark.parametrize(("changed", "name"), [
    ({"seed": 6}, "seed"), ({"dim": 5}, "compartments"), ({"distribution": "rademacher"}, "distribution"),
    ({"compartments": "tensor"}, "compartments"), ({"normalize": "dim"}, "normalize"),
], ids=repr)
def test_replay_refuses_an_optimizer_built_otherwise(changed, name):
    kw = {"lr": 0.2, "dim": 4, "seed": 5}
    model = mlp()
    opt = RBD(model.parameters(), record=True, **kw)
    train(model, opt, 2)
    fresh = mlp()
    with pytest.raises(ValueError, match=f"not built as the recorded one was: .*{name}: "):
        replay(RBD(fresh.parameters(), **{**kw, **changed}), opt.record)
    assert all(torch.equal(a, b) for a, b in zip(mlp().parameters(), fresh.parameters(), strict=True))


# ---- NES: parameters restored whatever the closure does ----------------------------------------


@pytest.mark.parametrize("failure", [RuntimeError("data loader died"), KeyboardInterrupt(), float("nan"),
                                     float("inf")], ids=repr)
def test_nes_restores_the_parameters_whatever_the_closure_does(failure):
    model = mlp()
    x, y = classification_data()
    opt = NES(model.parameters(), lr=0.1, population=4, sigma=0.1, seed=2)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            if isinstance(failure, BaseException):
                raise failure
            return torch.tensor(failure)
        return torch.nn.functional.cross_entropy(model(x), y)

    before = [p.detach().clone() for p in model.parameters()]
    expected = type(failure) if isinstance(failure, BaseException) else ValueError
    with pytest.raises(expected, match=None if isinstance(failure, BaseException) else "non-finite loss"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.steps_taken == 0


# ---- exact one-step oracles (float64, from the reference matrices) ------------------------------


def oracle_scale(normalize, distribution, d, n, total):
    return {"unbiased": 1 / (d * VARIANCE[distribution]), "paper": 1 / total, "dim": 1 / d, "none": 1.0,
            "projection": 1 / (n * VARIANCE[distribution])}[normalize]


def compartment_rows(opt, comp, tensors):
    """The compartment's rows of per-parameter tensors (in the optimizer's order), float64."""
    index = {id(p): k for k, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return torch.cat([tensors[index[id(s.param)]].detach().double().cpu().reshape(-1)[s.start: s.start + s.numel]
                      for s in comp.segments])


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("cls", [RBD, FPD])
def test_two_steps_equal_the_float64_formula(device, cls, normalize):
    """θ_{t+1} = θ_t − lr·s·P_t P_tᵀ g_t per compartment; RBD draws step t's basis, FPD step 0's."""
    distribution = {"unbiased": "uniform", "projection": "rademacher"}.get(normalize, "normal")
    model = mlp(device=device)
    opt = cls(model.parameters(), lr=0.3, dim=Proportional(12), compartments=150, distribution=distribution,
              normalize=normalize, seed=9)
    assert len(opt.compartments) == 3  # blocks that split tensors: row offsets matter
    x, y = classification_data(device=device)
    for t in range(2):
        theta = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for comp in opt.compartments:
            P = reference.materialize(comp.numel, comp.dim, seed=9, step=t if cls is RBD else 0,
                                      stream=comp.stream, distribution=distribution)
            s = oracle_scale(normalize, distribution, comp.dim, comp.numel, 387)
            expected = compartment_rows(opt, comp, theta) - 0.3 * s * (P @ (P.T @ compartment_rows(opt, comp, grads)))
            got = compartment_rows(opt, comp, list(model.parameters()))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("antithetic", [False, True])
def test_nes_step_equals_its_documented_update(device, antithetic, normalize):
    """θ₁ = θ₀ + lr·√s·Σ_i a_i ε_i / (σ n), ε_i = ±column j_i of P (step 0, stream 0), a_i the
    centred rank of member i's loss (lowest +0.5, highest −0.5), s of d = the directions."""
    model = mlp(device=device)
    x, y = classification_data(device=device)
    lr, sigma, population = 0.2, 0.05, 6
    opt = NES(model.parameters(), lr=lr, population=population, sigma=sigma, antithetic=antithetic,
              normalize=normalize, seed=4)
    theta0 = torch.cat([p.detach().double().cpu().reshape(-1) for p in model.parameters()])
    seen, losses = [], []

    def closure():
        seen.append(torch.cat([p.detach().double().cpu().reshape(-1) for p in model.parameters()]))
        losses.append(float(torch.nn.functional.cross_entropy(model(x), y)))
        return losses[-1]

    opt.step(closure)
    d = population // 2 if antithetic else population
    P = reference.materialize(387, d, seed=4)
    members = [(j, sign) for j in range(d) for sign in ((1.0, -1.0) if antithetic else (1.0,))]
    for (j, sign), at in zip(members, seen, strict=True):
        torch.testing.assert_close(at, theta0 + sign * sigma * P[:, j], rtol=1e-5, atol=1e-6)
    order = sorted(range(population), key=lambda i: losses[i])  # ascending loss
    a = [0.0] * population
    for rank, i in enumerate(order):
        a[i] = 0.5 - rank / (population - 1)
    step = sum(a[i] * sign * P[:, j] for i, (j, sign) in enumerate(members)) / (sigma * population)
    expected = theta0 + lr * oracle_scale(normalize, "normal", d, 387, 387) ** 0.5 * step
    got = torch.cat([p.detach().double().cpu().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- layering -----------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    """The rbd_cuda modules a source file imports (relative imports resolved)."""
    package = "rbd_cuda." + ".".join(path.relative_to(Path(__file__).parent.parent / "rbd_cuda").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rstrip(".").split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.update({name} | {f"{name}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("rbd_cuda")}


def test_layers_import_downwards_only():
    root = Path(__file__).parent.parent / "rbd_cuda"
    uses = {path: imported_modules(path) for path in [root / "basis.py", root / "layout.py", root / "sharding.py",
                                                      root / "nn.py", root / "distributed.py",
                                                      *sorted((root / "optim").glob("*.py"))]}
    for path, modules in uses.items():
        top = {".".join(m.split(".")[:2]) for m in modules}
        if path.name == "sharding.py":
            assert top == set(), (path, top)
        elif path.name in ("basis.py", "layout.py"):
            assert top <= {"rbd_cuda", "rbd_cuda.ops", "rbd_cuda.sharding"}, (path, top)  # "from . import ops"
        # Above them, rbd_cuda.ops for the segment tables (SegmentPlan) the products take.
        elif path.parent.name == "optim":
            assert top <= {"rbd_cuda.basis", "rbd_cuda.layout", "rbd_cuda.ops", "rbd_cuda.sharding",
                           "rbd_cuda.optim"}, (path, top)
        elif path.name == "nn.py":
            assert top <= {"rbd_cuda.basis", "rbd_cuda.layout", "rbd_cuda.ops"}, (path, top)
        else:  # distributed: the optimizers and their Exchange interface, nothing private
            assert top <= {"rbd_cuda.basis", "rbd_cuda.layout", "rbd_cuda.ops", "rbd_cuda.optim"}, (path, top)
            assert not any(m.split(".")[-1].startswith("_") for m in modules), modules


def test_the_private_torch_functions_the_optimizers_look_for_exist_in_the_pinned_torch():
    """rbd_cuda.optim.callers recognises ZeRO building an optimizer and the checkpoint helpers
    stepping one by their private functions on the call stack (its docstring says why nothing
    public does): a torch that renamed them would let both pass unnoticed, so this fails first."""
    import importlib

    from rbd_cuda.optim import callers

    for module, path in (callers.ZERO_BUILDER, callers.CHECKPOINT_STEPPER):
        found = importlib.import_module(module)
        for name in path.split("."):
            found = getattr(found, name)
        assert callable(found) and hasattr(found, "__code__"), (module, path)
        assert callers._loaded((module, path)) is found


def test_the_algorithm_module_holds_no_guards_or_formats():
    """RBD's module is the algorithm: the checks, formats, exchanges and caller detection live in
    modules of their own (issue 28)."""
    from rbd_cuda.optim import rbd

    text = Path(rbd.__file__).read_text()
    for name in ("def check_state_dict", "def _on_stack", "def is_row_shard", "sharded_as", "class RowShards",
                 "class Exchange", "FORMAT =", "def _check_buffers", "def _present"):
        assert name not in text, name

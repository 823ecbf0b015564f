"""The RBD and FPD optimizers and their compartments."""

import io
import itertools

import pytest
import torch

from rbd_cuda.optim import FPD, NES, RBD, Compression, Fixed, Proportional, replay
from rbd_cuda.layout import plan


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def classification_data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 20, generator=gen)
    teacher = torch.randn(20, 3, generator=gen)
    return x, (x @ teacher).argmax(1)


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
    opt = RBD(model.parameters(), lr=0.5, dim=16, compartments="tensor", seed=1)
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
     ({"sigma": 0.0}, "sigma"), ({"normalize": "unbiased"}, "normalize")],
    ids=repr,
)
def test_nes_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        NES(mlp().parameters(), **{"lr": 0.1, "population": 4, **kw})
    with pytest.raises(ValueError, match="closure"):
        NES(mlp().parameters(), lr=0.1, population=4).step()


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


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_replay_rebuilds_the_trained_parameters_exactly(momentum):
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model[2].bias.requires_grad_(False)  # a parameter without grad is skipped, and must stay so
    kw = {"lr": 0.4, "dim": Proportional(24), "compartments": 100, "momentum": momentum, "seed": 5}
    opt = RBD(model.parameters(), record=True, **kw)
    train(model, opt, 4)
    opt.param_groups[0]["lr"] = 0.1  # a schedule
    train(model, opt, 4)
    assert len(opt.record) == 8
    assert all(c.numel() == comp.dim for entry in opt.record
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
    kw = {"lr": 0.3, "dim": Proportional(30), "compartments": 100, "momentum": momentum, "seed": 11}
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
    resumed = cls(resumed_model.named_parameters(), **{**kw, "seed": 0})
    resumed.load_state_dict(saved["opt"])
    assert resumed.seed == 11 and resumed.steps_taken == 5
    train(resumed_model, resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed_model.parameters(), strict=True))


def test_state_dict_from_another_layout_is_refused():
    model = mlp()
    sd = RBD(model.parameters(), lr=0.1, dim=8).state_dict()
    with pytest.raises(ValueError, match="compartments"):
        RBD(model.parameters(), lr=0.1, dim=9).load_state_dict(sd)


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
        ({"momentum": 1.0}, "momentum"),
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


def test_a_parameter_in_two_groups_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="more than one"):
        RBD([{"params": model.parameters()}, {"params": [model[0].weight]}], lr=0.1, dim=4)

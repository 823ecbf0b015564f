"""rbd_cuda.nn.RandomSubspace: θ = θ₀ + P c with P regenerated in forward and backward."""

import copy
import io
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import rbd_cuda
from rbd_cuda.layout import Proportional
from rbd_cuda.nn import RandomSubspace
from rbd_cuda.optim import FPD

VARIANCE = {"normal": 1.0, "uniform": 1.0 / 3.0, "rademacher": 1.0}
NORMALIZATIONS = ("unbiased", "paper", "dim", "none", "projection")


def mlp(seed: int = 0, act=nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3))


def data(n: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# ---- an independent float64 reference: P materialised, θ = θ₀ + √s P c by matrix products ------


def reference_compartments(named, mode):
    """Compartments as lists of (name, start, stop) pieces in row order, written from the planner's
    documented semantics (not from its code)."""
    if mode == "global":
        return [[(n, 0, p.numel()) for n, p in named]]
    if mode == "tensor":
        return [[(n, 0, p.numel())] for n, p in named]
    if mode == "layer":
        layers = {}
        for n, p in named:
            layers.setdefault(n.rsplit(".", 1)[0], []).append((n, 0, p.numel()))
        return list(layers.values())
    # an int w: the parameters concatenated in order, cut every w entries
    comps, current, filled = [], [], 0
    for n, p in named:
        start = 0
        while start < p.numel():
            take = min(p.numel() - start, mode - filled)
            current.append((n, start, start + take))
            start, filled = start + take, filled + take
            if filled == mode:
                comps.append(current)
                current, filled = [], 0
    return comps + ([current] if current else [])


def reference_theta(named, mode, dims, c, lambdas=None, *, seed, distribution="normal", normalize="unbiased"):
    """θ₀ + √s_k P_k c_k per compartment k (stream k, step 0), λ per layer scaling its rows; float64."""
    total = sum(p.numel() for _, p in named)
    layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in named))
    flat = {n: p.detach().double().reshape(-1).clone() for n, p in named}
    deltas = {n: [] for n, _ in named}
    offset = 0
    for k, (pieces, d) in enumerate(zip(reference_compartments(named, mode), dims, strict=True)):
        rows = sum(stop - start for _, start, stop in pieces)
        P = rbd_cuda.ops.materialize(rows, d, seed=seed, stream=k, distribution=distribution).double()
        s = {"unbiased": 1 / (d * VARIANCE[distribution]), "paper": 1 / total, "dim": 1 / d, "none": 1.0,
             "projection": 1 / (rows * VARIANCE[distribution])}[normalize]
        u = math.sqrt(s) * (P @ c[offset: offset + d])
        row = 0
        for n, start, stop in pieces:
            part = u[row: row + stop - start]
            if lambdas is not None:
                part = part * lambdas[layers.index(n.rsplit(".", 1)[0])]
            deltas[n].append((start, part))
            row += stop - start
        offset += d
    theta = {}
    for n, p in named:
        delta = torch.cat([part for _, part in sorted(deltas[n], key=lambda x: x[0])])
        theta[n] = (flat[n] + delta).reshape(p.shape)
    return theta


def reference_loss(module64, theta, x, y):
    return nn.functional.cross_entropy(functional_call(module64, theta, (x.double(),)), y)


MODES = ["global", "tensor", "layer", 13]


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("normalize,distribution", [("unbiased", "normal"), ("paper", "uniform"),
                                                    ("dim", "rademacher"), ("none", "normal"),
                                                    ("projection", "uniform")])
def test_gradients_equal_autograd_through_the_materialised_matrix(mode, normalize, distribution):
    original = mlp(seed=2)
    named = [(n, p.detach().clone()) for n, p in original.named_parameters()]
    module64 = copy.deepcopy(original).double()
    wrapper = RandomSubspace(original, 4, seed=11, distribution=distribution, compartments=mode,
                             normalize=normalize)
    dims = [comp.dim for comp in wrapper.compartments]
    assert len(dims) == len(reference_compartments(named, mode))
    with torch.no_grad():
        wrapper.c.copy_(torch.randn(wrapper.dim, generator=torch.Generator().manual_seed(3)) * 0.3)
    x, y = data()
    loss = nn.functional.cross_entropy(wrapper(x), y)
    loss.backward()

    c64 = wrapper.c.detach().double().requires_grad_()
    theta = reference_theta(named, mode, dims, c64, seed=11, distribution=distribution, normalize=normalize)
    ref = reference_loss(module64, theta, x, y)
    ref.backward()
    for n, value in wrapper.weights().items():
        torch.testing.assert_close(value.double(), theta[n].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wrapper.c.grad.double(), c64.grad, rtol=1e-4,
                               atol=1e-5 * float(c64.grad.abs().max()))


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_said_scales_and_their_gradients(mode):
    original = mlp(seed=4)
    named = [(n, p.detach().clone()) for n, p in original.named_parameters()]
    module64 = copy.deepcopy(original).double()
    wrapper = RandomSubspace(original, 5, seed=1, compartments=mode, said=True)
    assert wrapper.lambdas.shape == (3,)  # one per Linear
    assert wrapper.summary()["trainable"] == wrapper.dim + 3
    assert [p for p in wrapper.parameters()] == [wrapper.c, wrapper.lambdas]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        wrapper.c.copy_(torch.randn(wrapper.dim, generator=gen) * 0.3)
        wrapper.lambdas.copy_(torch.tensor([0.5, 1.5, -2.0]))
    x, y = data()
    nn.functional.cross_entropy(wrapper(x), y).backward()

    c64 = wrapper.c.detach().double().requires_grad_()
    lam64 = wrapper.lambdas.detach().double().requires_grad_()
    dims = [comp.dim for comp in wrapper.compartments]
    reference_loss(module64, reference_theta(named, mode, dims, c64, lam64, seed=1), x, y).backward()
    torch.testing.assert_close(wrapper.c.grad.double(), c64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wrapper.lambdas.grad.double(), lam64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_and_second_derivatives():
    wrapper = RandomSubspace(mlp(seed=6), 5, seed=2, compartments="tensor", said=True)
    x, y = data(8)
    params = dict(wrapper.named_parameters())

    def loss(c, lambdas):
        return nn.functional.cross_entropy(functional_call(wrapper, {"c": c, "lambdas": lambdas}, (x,)), y)

    c = (torch.randn(wrapper.dim, generator=torch.Generator().manual_seed(7)) * 0.3).requires_grad_()
    lam = params["lambdas"].detach().clone().requires_grad_()
    # fp32 ops (they take no float64): central differences with a large step (the loss is smooth)
    # and fp32 tolerances; the float64 reference above is the tight check.
    assert torch.autograd.gradcheck(loss, (c, lam), eps=1e-2, atol=2e-3, rtol=2e-2)

    # Hessian-vector product in c through the registered double backward, against float64.
    original = mlp(seed=6)
    named = [(n, p.detach().clone()) for n, p in original.named_parameters()]
    module64 = original.double()
    dims = [comp.dim for comp in wrapper.compartments]
    v = torch.randn(wrapper.dim, generator=torch.Generator().manual_seed(8))
    (g,) = torch.autograd.grad(loss(c, lam), c, create_graph=True)
    (hvp,) = torch.autograd.grad(g @ v, c)
    c64, lam64 = c.detach().double().requires_grad_(), lam.detach().double()
    (g64,) = torch.autograd.grad(
        reference_loss(module64, reference_theta(named, "tensor", dims, c64, lam64, seed=2), x, y), c64,
        create_graph=True)
    (hvp64,) = torch.autograd.grad(g64 @ v.double(), c64)
    torch.testing.assert_close(hvp.double(), hvp64, rtol=1e-4, atol=1e-5 * float(hvp64.abs().max()))


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("said", [False, True])
def test_at_c_zero_the_wrapped_model_equals_the_original(mode, said):
    module = mlp(seed=3, act=nn.ReLU)
    before = copy.deepcopy(module)
    wrapper = RandomSubspace(module, 7, seed=5, compartments=mode, said=said)
    x, _ = data(32)
    assert torch.equal(wrapper(x), before(x))
    for n, value in wrapper.weights().items():
        assert torch.equal(value, before.get_parameter(n))
    assert list(wrapper.parameters()) == list(wrapper.subspace_parameters())
    assert {n for n, _ in wrapper.named_buffers()} == {f"module.{n}" for n, _ in before.named_parameters()}


def test_any_optimizer_trains_it():
    x, _ = data(256, seed=9)
    y = mlp(seed=12)(x).argmax(1)  # labels a network of the same shape can fit
    for make, steps in ((lambda p: torch.optim.Adam(p, lr=0.05), 30),
                        (lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), 30),
                        (lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=10), 3)):  # 10 evaluations a step
        wrapper = RandomSubspace(mlp(seed=1), 20, seed=3)
        opt = make(wrapper.parameters())

        def closure(opt=opt, wrapper=wrapper):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(wrapper(x), y)
            loss.backward()
            return loss

        first = closure().item()
        for _ in range(steps):
            opt.step(closure)
        assert closure().item() < 0.8 * first, type(opt).__name__


# ---- the same trajectory as the FPD optimizer -------------------------------------------------


@pytest.mark.parametrize("mode,dim,normalize,distribution", [
    ("global", 12, "unbiased", "normal"),
    ("layer", 5, "paper", "uniform"),
    (40, Proportional(30), "dim", "rademacher"),
])
def test_sgd_on_the_wrapper_follows_fpd(mode, dim, normalize, distribution):
    # With basis vectors scaled by √s, SGD(lr) on c gives θ_{t+1} = θ_t − lr·s·P Pᵀ g(θ_t): FPD's step.
    x, y = data(64, seed=4)
    lr, steps = 0.3, 25
    direct = mlp(seed=8)
    fpd = FPD(direct.named_parameters(), lr=lr, dim=dim, compartments=mode, normalize=normalize,
              distribution=distribution, seed=77)
    wrapper = RandomSubspace(mlp(seed=8), dim, compartments=mode, normalize=normalize,
                             distribution=distribution, seed=77)
    sgd = torch.optim.SGD(wrapper.parameters(), lr=lr)
    assert wrapper.summary()["compartments"] == fpd.summary()["compartments"]  # names, streams, sizes, dims
    for step in range(steps):
        for model, opt in ((direct, fpd), (wrapper, sgd)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if step in (0, steps - 1):
            theta = wrapper.weights()
            for n, p in direct.named_parameters():
                torch.testing.assert_close(theta[n].detach(), p.detach(), rtol=1e-4, atol=2e-5)
    moved = sum(float((theta[n].detach() - wrapper.get_buffer(f"module.{n}")).abs().sum()) for n in theta)
    assert moved > 0.1  # the comparison is not between two models that stayed at θ₀


# ---- torch.compile and opcheck ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_equals_eager(backend):
    x, y = data(32, seed=2)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        wrapper = RandomSubspace(mlp(seed=5, act=nn.ReLU), 9, seed=4, compartments="layer", said=True)
        model = torch.compile(wrapper, backend=backend, fullgraph=True) if compiled else wrapper
        opt = torch.optim.SGD(wrapper.parameters(), lr=0.2)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), wrapper.c.detach().clone(), wrapper.lambdas.detach().clone()))
    (l_eager, c_eager, lam_eager), (l_comp, c_comp, lam_comp) = runs
    assert c_eager.abs().sum() > 0
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_comp, c_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lam_comp, lam_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{"seed": 3}, {"seed": -(2**62) - 5, "stream": 4, "distribution": "rademacher",
                                              "row_offset": 7, "col_offset": 2}])
def test_opcheck_with_gradients(kw):
    # Inputs that require grad make opcheck's autograd-registration and aot_dispatch tests run the
    # registered backward (each op's derivative is the other op).
    g = torch.randn(300, 2).requires_grad_()
    c = torch.randn(11).requires_grad_()
    torch.library.opcheck(torch.ops.rbd_cuda.project, (g, 11), kw)
    torch.library.opcheck(torch.ops.rbd_cuda.expand, (c, 300), kw)


# ---- export, checkpoints, frozen and tied parameters, low precision -----------------------------


def test_export_gives_a_plain_module_with_the_trained_weights():
    wrapper = RandomSubspace(mlp(seed=1), 6, seed=9, said=True)
    with torch.no_grad():
        wrapper.c.normal_()
        wrapper.lambdas.mul_(0.7)
    x, _ = data()
    plain = wrapper.export()
    assert type(plain) is nn.Sequential
    assert [n for n, _ in plain.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                                         "4.bias"]
    assert list(plain.buffers()) == []
    assert all(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(x), wrapper(x), rtol=0, atol=0)
    theta0 = wrapper.get_buffer("module.0.weight").clone()
    with torch.no_grad():
        plain[0].weight.zero_()  # the export owns its weights
    assert torch.equal(wrapper.get_buffer("module.0.weight"), theta0)


def test_state_dict_round_trip():
    wrapper = RandomSubspace(mlp(seed=1), 6, seed=9, compartments="tensor")
    with torch.no_grad():
        wrapper.c.normal_()
    buffer = io.BytesIO()
    torch.save(wrapper.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"c", "_extra_state"} | {f"module.{n}" for n in ("0.weight", "0.bias", "2.weight",
                                                                           "2.bias", "4.weight", "4.bias")}
    assert json.loads(bytes(state["_extra_state"].tolist()))["seed"] == 9
    restored = RandomSubspace(mlp(seed=2), 6, seed=9, compartments="tensor")
    restored.load_state_dict(state)
    x, _ = data()
    assert torch.equal(restored(x), wrapper(x))


def test_the_state_dict_is_tensors_only_and_safetensors_round_trips_it(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors is in requirements-dev.txt")
    wrapper = RandomSubspace(Tied(), 3, seed=2, said=True)
    with torch.no_grad():
        wrapper.c.normal_()
        wrapper.lambdas.mul_(0.5)
    state = wrapper.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # The tied matrix once (safetensors refuses two names for one storage), plus c, λ and the configuration.
    assert set(state) == {"c", "lambdas", "_extra_state", "module.embed.weight"}
    assert json.loads(bytes(state["_extra_state"].tolist())) == wrapper.subspace_config()
    safetensors.save_file(state, tmp_path / "w.safetensors")
    restored = RandomSubspace(Tied(), 3, seed=2, said=True)
    restored.load_state_dict(safetensors.load_file(tmp_path / "w.safetensors"))
    tokens = torch.tensor([1, 5])
    assert torch.equal(restored(tokens), wrapper(tokens))
    assert restored.module.out.weight is restored.module.embed.weight


def test_subspace_config_does_not_take_the_name_config():
    # Frameworks read model.config as a transformers configuration (the Trainer sets model.config.use_cache).
    wrapper = RandomSubspace(mlp(), 4, seed=3)
    assert getattr(wrapper, "config", None) is None
    assert wrapper.subspace_config()["seed"] == 3


@pytest.mark.parametrize(("changed", "field"), [
    ({"seed": 10}, "seed: 9 saved, 10 here"), ({"distribution": "uniform"}, "distribution: 'normal' saved"),
    ({"normalize": "paper"}, "normalize: 'unbiased' saved"), ({"compartments": "global"}, "compartment 0's numel: 30 saved, 74 here"),
    ({"dim": 5}, "compartment 0's dim: 6 saved, 5 here"), ({"said": True}, "said: False saved, True here"),
], ids=repr)
def test_a_state_from_another_wrapper_is_refused_naming_the_difference(changed, field):
    kw = {"dim": 6, "seed": 9, "compartments": "tensor"}
    state = RandomSubspace(mlp(seed=1), **kw).state_dict()
    other = RandomSubspace(mlp(seed=1), **{**kw, **changed})
    with pytest.raises(ValueError, match=f"other arguments, whose weights differ: .*{field}"):
        other.load_state_dict(state, strict=False)  # strict=False: SAID adds a parameter


def test_the_difference_message_is_bounded():
    # 3003 compartments of one entry each against one: the message names the count and the first difference.
    wide = nn.Sequential(nn.Linear(1000, 3))
    state = RandomSubspace(wide, 1, seed=0, compartments=1).state_dict()
    with pytest.raises(ValueError, match=r"differ: compartments: 3003 compartments saved, 1 here, compartment 0's numel: 1 saved, 3003 here$") as error:
        RandomSubspace(nn.Sequential(nn.Linear(1000, 3)), 1, seed=0).load_state_dict(state, strict=False)
    assert len(str(error.value)) < 200


def _spoiled(state, key, value):
    return {**state, key: value}


def _config(**changes):
    wrapper = RandomSubspace(mlp(seed=1), 5, seed=4, compartments="layer", said=True)
    text = json.dumps({**wrapper.subspace_config(), **changes})
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


BAD_STATES = {
    "c from another seed": (lambda s: {**RandomSubspace(mlp(seed=1), 5, seed=5, compartments="layer", said=True)
                                       .state_dict(), "c": torch.ones(15)}, ValueError, "seed: 5 saved, 4 here"),
    "non-finite c": (lambda s: _spoiled(s, "c", torch.full((15,), math.nan)), ValueError, "'c' holds non-finite"),
    "infinite lambda": (lambda s: _spoiled(s, "lambdas", torch.tensor([1.0, math.inf, 1.0])), ValueError,
                        "'lambdas' holds non-finite"),
    "non-finite theta0": (lambda s: _spoiled(s, "module.2.bias", torch.full((4,), math.nan)), ValueError,
                          "'module.2.bias' holds non-finite"),
    "c of another length": (lambda s: _spoiled(s, "c", torch.zeros(16)), ValueError, r"'c' has shape \(16,\)"),
    "float64 c": (lambda s: _spoiled(s, "c", torch.zeros(15, dtype=torch.float64)), ValueError,
                  "coefficients are loaded into fp32 from float32, float16 or bfloat16 only"),
    "integer c": (lambda s: _spoiled(s, "c", torch.zeros(15, dtype=torch.int64)), ValueError, "'c' has dtype torch.int64"),
    "bf16 theta0": (lambda s: _spoiled(s, "module.0.weight", s["module.0.weight"].bfloat16()), ValueError,
                    r"\(θ₀\) has dtype torch.bfloat16"),
    "a list for c": (lambda s: _spoiled(s, "c", [0.0] * 15), TypeError, "'c' must be a tensor, got list"),
    "no configuration": (lambda s: {k: v for k, v in s.items() if k != "_extra_state"}, ValueError,
                         "no '_extra_state'.* required even with strict=False"),
    "garbage configuration": (lambda s: _spoiled(s, "_extra_state", torch.tensor([1, 2, 3], dtype=torch.uint8)),
                              ValueError, "not a RandomSubspace configuration"),
    "configuration of another format": (lambda s: _spoiled(s, "_extra_state", _config(format=3)), ValueError,
                                        "not a format-2 RandomSubspace configuration"),
    "configuration with another layout": (lambda s: _spoiled(s, "_extra_state", _config(compartments=[])),
                                          ValueError, "compartments: 0 compartments saved, 3 here"),
    "an unexpected entry": (lambda s: _spoiled(s, "module.9.weight", torch.zeros(2)), ValueError,
                            r"unexpected entries \['module.9.weight'\]"),
    "a missing entry": (lambda s: {k: v for k, v in s.items() if k != "module.4.bias"}, ValueError,
                        r"lacks \['module.4.bias'\]"),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_a_refused_state_changes_nothing(case):
    spoil, error, match = BAD_STATES[case]
    source = RandomSubspace(mlp(seed=1), 5, seed=4, compartments="layer", said=True)
    with torch.no_grad():
        source.c.normal_()
    target = RandomSubspace(mlp(seed=2), 5, seed=4, compartments="layer", said=True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(error, match=match):
        target.load_state_dict(spoil(source.state_dict()))
    after = target.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before), case


def test_strict_false_leaves_missing_entries_as_they_are():
    source = RandomSubspace(mlp(seed=1), 5, seed=4)
    with torch.no_grad():
        source.c.normal_()
    target = RandomSubspace(mlp(seed=2), 5, seed=4)
    bias = target.get_buffer("module.4.bias").clone()
    state = {k: v for k, v in source.state_dict().items() if k != "module.4.bias"}
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == ["module.4.bias"]
    assert torch.equal(target.c, source.c) and torch.equal(target.get_buffer("module.4.bias"), bias)


def test_assign_keeps_tied_weights_tied_and_coefficients_fp32():
    source = RandomSubspace(Tied(), 3, seed=2)
    with torch.no_grad():
        source.c.normal_()
    target = RandomSubspace(Tied(), 3, seed=2)
    target.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    assert target.module.out.weight is target.module.embed.weight
    tokens = torch.tensor([0, 3, 6])
    assert torch.equal(target(tokens), source(tokens))
    with pytest.raises(ValueError, match="with assign=True the coefficients must be float32"):
        target.load_state_dict({**source.state_dict(), "c": source.c.detach().half()}, assign=True)
    assert target.c.dtype == torch.float32


def test_a_state_of_format_1_is_refused_by_name():
    # fcd40d6 saved the configuration as a dict; nothing committed holds such a state (docs/formats.md).
    wrapper = RandomSubspace(Tied(), 3, seed=2)
    config = wrapper.subspace_config()
    old = {"format": 1, **{k: config[k] for k in ("seed", "distribution", "normalize", "said")},
           "compartments": [[c["stream"], c["dim"], c["numel"],
                             [[g["param"], g["start"], g["numel"], g["row_offset"]] for g in c["segments"]]]
                            for c in config["compartments"]]}
    theta0 = wrapper.get_buffer("module.embed.weight")
    state = {"c": wrapper.c.detach().clone(), "module.embed.weight": theta0, "_extra_state": old}
    with pytest.raises(ValueError, match="of format 1 .* no longer reads"):
        RandomSubspace(Tied(), 3, seed=2).load_state_dict(state)


def test_frozen_parameters_stay_outside_the_subspace():
    module = mlp(seed=1)
    module[4].bias.requires_grad_(False)
    wrapper = RandomSubspace(module, 4, seed=1)
    assert wrapper.numel == sum(p.numel() for p in mlp().parameters()) - 3
    assert {n for n, _ in wrapper.named_parameters()} == {"c", "module.4.bias"}
    assert "4.bias" not in wrapper.weights()
    x, y = data()
    nn.functional.cross_entropy(wrapper(x), y).backward()
    assert wrapper.c.grad is not None and module[4].bias.grad is None
    assert not wrapper.export()[4].bias.requires_grad


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.embed(tokens))


def test_tied_weights_share_one_slice_of_the_subspace():
    wrapper = RandomSubspace(Tied(), 3, seed=2)
    assert wrapper.numel == 28  # the shared matrix counts once
    with torch.no_grad():
        wrapper.c.normal_()
    tokens = torch.tensor([0, 3, 6])
    weight = wrapper.weights()["embed.weight"]
    expected = weight[tokens] @ weight.T
    torch.testing.assert_close(wrapper(tokens), expected)
    plain = wrapper.export()
    assert plain.out.weight is plain.embed.weight
    torch.testing.assert_close(plain(tokens), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_coefficients_stay_fp32_through_dtype_conversions(dtype):
    wrapper = RandomSubspace(mlp(seed=1), 8, seed=1, said=True)
    x, y = data()
    nn.functional.cross_entropy(wrapper(x), y).backward()
    with torch.no_grad():
        wrapper.c.normal_()
    c = wrapper.c.detach().clone()
    assert wrapper.to(dtype) is wrapper
    assert wrapper.c.dtype == wrapper.lambdas.dtype == wrapper.c.grad.dtype == torch.float32
    assert torch.equal(wrapper.c, c)  # not rounded on the way
    assert wrapper.get_buffer("module.0.weight").dtype == dtype
    assert wrapper(x.to(dtype)).dtype == dtype
    wrapper.half().float()
    assert torch.equal(wrapper.c, c)


def test_tied_weights_stay_tied_through_conversions():
    wrapper = RandomSubspace(Tied(), 3, seed=2)
    with torch.no_grad():
        wrapper.c.normal_()
    wrapper.to(torch.bfloat16)
    assert wrapper.module.out.weight is wrapper.module.embed.weight
    tokens = torch.tensor([0, 3, 6])
    weight = wrapper.weights()["embed.weight"]
    torch.testing.assert_close(wrapper(tokens), weight[tokens] @ weight.T)


def test_bfloat16_module():
    module = mlp(seed=1).to(torch.bfloat16)
    wrapper = RandomSubspace(module, 8, seed=1)
    assert wrapper.c.dtype == torch.float32  # coefficients keep fp32; the weights are rounded to bf16
    with torch.no_grad():
        wrapper.c.normal_()
    x, y = data()
    out = wrapper(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    nn.functional.cross_entropy(out.float(), y).backward()
    assert wrapper.c.grad.dtype == torch.float32 and wrapper.c.grad.abs().sum() > 0


# ---- argument errors -------------------------------------------------------------------------


@pytest.mark.parametrize("module,kwargs,error,match", [
    (mlp, {"dim": 0}, ValueError, "dim must be positive"),
    (mlp, {"dim": -3}, ValueError, "dim must be positive"),
    (mlp, {"dim": 2.5}, TypeError, "dim must be an int"),
    (nn.ReLU, {"dim": 4}, ValueError, "module has no trainable parameters"),
    (lambda: mlp().requires_grad_(False), {"dim": 4}, ValueError, "module has no trainable parameters"),
    (lambda: mlp().double(), {"dim": 4}, ValueError, "parameter 0.weight has dtype torch.float64"),
    (mlp, {"dim": 4, "normalize": "l2"}, ValueError, "normalize must be one of"),
    (mlp, {"dim": 4, "distribution": "cauchy"}, ValueError, "distribution must be one of"),
    (mlp, {"dim": 4, "seed": 2**64}, ValueError, "seed must fit in 64 bits"),
    (mlp, {"dim": 4, "seed": 1.5}, TypeError, "seed must be an int"),
    (mlp, {"dim": 4, "compartments": "row"}, ValueError, "compartments must be"),
    (lambda: "not a module", {"dim": 4}, TypeError, "module must be a torch.nn.Module"),
])
def test_bad_arguments_name_the_argument(module, kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomSubspace(module(), **kwargs)

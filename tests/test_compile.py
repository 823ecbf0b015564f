"""The optimizers under torch.compile: PyTorch's recipe ``torch.compile(opt.step)`` and a compiled
train step (forward, backward and step in one compiled function) give the eager run's weights (bit
for bit with aot_eager, to rounding with inductor).

Dynamo drops attribute mutations of torch.optim.Optimizer subclasses: a traced step would keep
``steps_taken`` at 0 and reuse the first basis forever (RBD silently becoming FPD). The steps are
excluded from tracing, so they run eagerly inside the compiled code."""

import pytest
import torch
from test_optim import classification_data, mlp

from rbd_cuda.optim import FPD, NES, RBD


def build(cls, model):
    if cls is NES:
        return NES(model.parameters(), lr=0.1, population=4, sigma=0.1, weight_decay=0.1, seed=3)
    return cls(model.named_parameters(), lr=0.3, dim=6, compartments="tensor", momentum=0.5, weight_decay=0.1,
               seed=3)


def run(cls, compile_step: bool, steps: int = 3):
    torch._dynamo.reset()
    model = mlp()
    opt = build(cls, model)
    x, y = classification_data()
    step = torch.compile(opt.step) if compile_step else opt.step
    for _ in range(steps):
        if cls is NES:
            step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        else:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            step()
    return opt, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [RBD, FPD, NES])
def test_compiled_opt_step_equals_eager(cls):
    eager_opt, eager = run(cls, False)
    compiled_opt, compiled = run(cls, True)
    assert eager_opt.steps_taken == compiled_opt.steps_taken == 3
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))


def train_steps(cls, backend: str | None, steps: int = 3) -> list[torch.Tensor]:
    """The weights after ``steps`` train steps (forward, backward, step), compiled with ``backend``
    (None: eagerly)."""
    torch._dynamo.reset()
    x, y = classification_data()
    model = mlp()
    opt = build(cls, model)

    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step = train_step if backend is None else torch.compile(train_step, backend=backend)
    for _ in range(steps):
        step()
    assert opt.steps_taken == steps
    return [p.detach().clone() for p in model.parameters()]


def test_compiled_train_step_equals_eager():
    eager, compiled = train_steps(RBD, None), train_steps(RBD, "aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))


def test_a_train_step_compiled_with_inductor_redraws_the_basis_and_stays_within_rounding():
    """Inductor's forward and backward sum the gradients in another order than eager mode (as for
    SGD): the weights agree to rounding, not bit for bit (docs/optimizers.md, "Compilation"). The
    step count still advances and the basis is re-drawn: RBD does not become FPD."""
    eager, rbd, fpd = train_steps(RBD, None), train_steps(RBD, "inductor"), train_steps(FPD, "inductor")
    for a, b in zip(eager, rbd, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(rbd, fpd, strict=True))


def test_a_compiled_graph_without_breaks_is_refused_with_the_reason():
    torch._dynamo.reset()
    model = mlp()
    opt = build(RBD, model)
    x, y = classification_data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(Exception, match="a traced step would lose its step count"):
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    assert opt.steps_taken == 0

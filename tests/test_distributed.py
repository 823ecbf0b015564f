"""rbd_cuda.distributed on gloo, with 2–3 local processes spawned by the tests.

Starting a process costs seconds (importing torch), so one 3-rank launch runs every scenario and
the tests below check its results; a second launch checks that a rank that raises makes the
others fail instead of hanging. Every launch is bounded: collectives time out, and the launcher
kills what is still running at its deadline and fails the test.
"""

from __future__ import annotations

import copy
import datetime
import io
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import rbd_cuda
from rbd_cuda.distributed import (
    DistributedFPD,
    DistributedRBD,
    RandomBasesHook,
    random_bases_hook,
)
from rbd_cuda.optim import RBD
from rbd_cuda.optim.ranks import fingerprint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 3
BATCH = 8  # per rank
COLLECTIVE_TIMEOUT_S = 15
LAUNCH_DEADLINE_S = 90


# ---- launcher -----------------------------------------------------------------------------------


def _entry(rank: int, world: int, folder: str, target, args: tuple) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = {"ok": target(rank, world, *args)}
    except Exception as error:  # noqa: BLE001 (reported to the test, which decides whether it was expected)
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    if "ok" in result:
        dist.destroy_process_group()


def launch(folder: Path, world: int, target, *args) -> tuple[list[dict], float]:
    """Run ``target(rank, world, *args)`` on ``world`` gloo ranks; their results and the seconds taken.

    The ranks are forked from a fork server that has imported torch and rbd_cuda once: fast to
    start, and safe, since the server never ran an OpenMP region (forking a process that has is
    not). The fork server starts with OMP_NUM_THREADS=1, which its children inherit.
    """
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo: torch.optim.Optimizer imports it on first use (seconds, in every rank otherwise).
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "rbd_cuda.distributed", "pytest"])
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=_entry, args=(r, world, str(folder), target, args)) for r in range(world)]
        start = time.monotonic()
        for p in procs:
            p.start()
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
    for p in procs:
        p.join(max(0.0, start + LAUNCH_DEADLINE_S - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    elapsed = time.monotonic() - start
    assert not hung, f"ranks {hung} still running after {LAUNCH_DEADLINE_S} s"
    results = []
    for r in range(world):
        path = folder / f"rank{r}.pt"
        assert path.exists(), f"rank {r} exited with code {procs[r].exitcode} and no result"
        results.append(torch.load(path, weights_only=False))
    return results, elapsed


# ---- what the ranks run -------------------------------------------------------------------------


def launch_ok(folder: Path, world: int, target, *args) -> list[dict]:
    """``launch``, failing the test with a rank's traceback if any raised; each rank's result."""
    out, _ = launch(folder, world, target, *args)
    for r, res in enumerate(out):
        assert "ok" in res, f"rank {r} raised:\n{res.get('traceback')}"
    return [res["ok"] for res in out]


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))


def batch(step: int, world: int):
    """The global batch of ``step`` (BATCH rows per rank) from a fixed teacher."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * BATCH, 10, generator=gen)
    teacher = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    return x, (x @ teacher).argmax(1)


def local(step: int, rank: int, world: int):
    x, y = batch(step, world)
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train_steps(model, opt, steps: int, rank: int, world: int) -> None:
    for t in range(steps):
        x, y = local(t, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def shared_vs_single(rank, world):
    """Shared bases with momentum, against one process stepping on the concatenated batches."""
    kw = {"lr": 0.3, "dim": 8, "compartments": "tensor", "seed": 5, "momentum": 0.5}
    model = mlp()
    train_steps(model, DistributedRBD(model.parameters(), scheme="shared", check_every=1, **kw), 3, rank, world)
    single = mlp()
    opt = RBD(single.parameters(), **kw)
    for t in range(3):
        x, y = batch(t, world)
        opt.zero_grad()
        F.cross_entropy(single(x), y).backward()
        opt.step()
    return {"distributed": flat(model), "single": flat(single)}


def independent_one_step(rank, world, reduction):
    """One independent-bases step: the inputs the test needs to recompute it, and the result."""
    model = mlp()
    opt = DistributedRBD(model.parameters(), lr=0.5, dim=6, compartments="tensor", seed=11,
                         scheme="independent", reduction=reduction)
    x, y = local(0, rank, world)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    return {"before": before, "grads": grads, "after": [p.detach().clone() for p in model.parameters()],
            "comm": opt.comm.as_dict()}


def runs_stay_identical(rank, world):
    """Several optimizers and schemes, checked every step; returns the final hashes."""
    out = {}
    for name, cls, scheme, kw in [
        ("rbd-independent-momentum", DistributedRBD, "independent", {"momentum": 0.9, "compartments": "layer"}),
        ("rbd-shared-rademacher", DistributedRBD, "shared", {"distribution": "rademacher", "compartments": 50}),
        ("fpd-shared", DistributedFPD, "shared", {}),
        ("fpd-independent", DistributedFPD, "independent", {"reduction": "sum"}),
    ]:
        # Different initialisations per rank: the broadcast makes them rank 0's.
        model = mlp(seed=rank)
        params = model.named_parameters() if kw.get("compartments") == "layer" else model.parameters()
        opt = cls(params, lr=0.2, dim=7, seed=3, scheme=scheme, check_every=1, **kw)
        train_steps(model, opt, 4, rank, world)
        out[name] = fingerprint(model.parameters())
    return out


def divergence_is_detected(rank, world):
    model = mlp()
    opt = DistributedRBD(model.parameters(), lr=0.1, dim=4, seed=1)
    train_steps(model, opt, 1, rank, world)
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-6
    try:
        opt.check_consistency()
    except RuntimeError as error:
        return str(error)
    return None


def non_finite_on_one_rank(rank, world):
    """Rank 1's gradient holds a NaN: every rank refuses the step (the coefficients they all-reduce
    are NaN), none changes, and a clean step afterwards keeps them identical."""
    model = mlp()
    opt = DistributedRBD(model.parameters(), lr=0.1, dim=4, seed=1, check_every=1)
    x, y = local(0, rank, world)
    F.cross_entropy(model(x), y).backward()
    if rank == 1:
        model[2].weight.grad[1, 4] = float("nan")
    before = flat(model)
    try:
        opt.step()
        error = None
    except ValueError as refusal:
        error = str(refusal)
    unchanged = torch.equal(flat(model), before) and opt.steps_taken == 0
    train_steps(model, opt, 1, rank, world)
    return {"error": error, "unchanged": unchanged, "hash": fingerprint(model.parameters())}


def copies(rank, world):
    """A copy of a distributed optimizer (on the default group) steps as the original; one built with
    a process group, which cannot be copied, is refused at copy time."""
    model = mlp()
    opt = DistributedRBD(model.parameters(), lr=0.1, dim=4, seed=1, momentum=0.5)
    copied_model, copied = copy.deepcopy((model, opt))
    train_steps(model, opt, 2, rank, world)
    train_steps(copied_model, copied, 2, rank, world)
    grouped = DistributedRBD(mlp().parameters(), lr=0.1, dim=4, seed=1, group=dist.new_group(list(range(world))))
    try:
        copy.deepcopy(grouped)
        refusal = None
    except TypeError as error:
        refusal = str(error)
    return {"same": torch.equal(flat(model), flat(copied_model)), "refusal": refusal}


def mismatched_seed_is_refused(rank, world):
    model = mlp()
    try:
        DistributedRBD(model.parameters(), lr=0.1, dim=4, seed=1 + (rank == 2))
    except ValueError as error:
        return str(error)
    return None


def hook_one_step(rank, world):
    """The hook's input (local bucket) and output (what DDP hands the optimizer), per bucket."""
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    state = RandomBasesHook(dim=20, seed=9)
    seen = []

    def recording_hook(state, bucket):
        given = bucket.buffer().clone()
        return random_bases_hook(state, bucket).then(
            lambda f: seen.append({"index": bucket.index(), "in": given, "out": f.value().clone()}) or f.value())

    model.register_comm_hook(state, recording_hook)
    x, y = local(0, rank, world)
    F.cross_entropy(model(x), y).backward()
    # A bucket no larger than d goes through a plain all-reduce: DDP's mean gradient.
    plain = mlp()
    F.cross_entropy(plain(x), y).backward()
    uncompressed = torch.nn.parallel.DistributedDataParallel(mlp())
    uncompressed.register_comm_hook(RandomBasesHook(dim=10_000, seed=9), random_bases_hook)
    F.cross_entropy(uncompressed(x), y).backward()
    return {"buckets": seen, "stats": state.stats.as_dict(),
            "local_grads": [p.grad.clone() for p in plain.parameters()],
            "uncompressed_grads": [p.grad.clone() for p in uncompressed.parameters()]}


NORMALIZATIONS = ("unbiased", "paper", "dim", "none", "projection")


def hook_each_normalisation(rank, world):
    """Per normalisation, every bucket's input and output of one hooked step (d = 20, uniform)."""
    out = {}
    for normalize in NORMALIZATIONS:
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        seen = []

        def recording_hook(state, bucket, seen=seen):
            given = bucket.buffer().clone()
            return random_bases_hook(state, bucket).then(
                lambda f: seen.append({"index": bucket.index(), "in": given, "out": f.value().clone()}) or f.value())

        model.register_comm_hook(RandomBasesHook(dim=20, seed=5, distribution="uniform", normalize=normalize),
                                 recording_hook)
        x, y = local(1, rank, world)
        F.cross_entropy(model(x), y).backward()
        out[normalize] = seen
    return out


def mismatched_lr_is_refused(rank, world):
    try:
        DistributedRBD(mlp().parameters(), lr=0.1 + 0.1 * (rank == 2), dim=4, seed=1)
    except ValueError as error:
        return str(error)
    return None


def lr_changed_on_one_rank_is_found(rank, world):
    model = mlp()
    opt = DistributedRBD(model.parameters(), lr=0.1, dim=4, seed=1, check_every=2)
    train_steps(model, opt, 1, rank, world)
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.05  # e.g. a scheduler stepped on one rank only
    try:
        train_steps(model, opt, 1, rank, world)  # the check of step 2
    except RuntimeError as error:
        return str(error)
    return None


def hook_seeds_differ(rank, world):
    """Last scenario: each rank's hook has its own seed; the first bucket's check must refuse it."""
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    model.register_comm_hook(RandomBasesHook(dim=20, seed=rank), random_bases_hook)
    x, y = local(0, rank, world)
    try:
        F.cross_entropy(model(x), y).backward()
    except Exception as error:  # noqa: BLE001 (DDP may wrap the hook's ValueError)
        return str(error)
    return None


def hook_error_feedback(rank, world):
    """Three steps with error feedback: per step and bucket, the input, output, layout and residual."""
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    state = RandomBasesHook(dim=20, seed=4, error_feedback=True)
    seen = []

    def recording_hook(state, bucket):
        given, step = bucket.buffer().clone(), state.step
        layout = tuple(id(p) for p in bucket.parameters())

        def record(f):
            seen.append({"step": step, "index": bucket.index(), "layout": layout, "in": given,
                         "out": f.value().clone(), "residual": state.residuals[bucket.index()][1].clone()})
            return f.value()

        return random_bases_hook(state, bucket).then(record)

    model.register_comm_hook(state, recording_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(3):
        x, y = local(t, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return seen


def hook_trains(rank, world, error_feedback):
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    state = RandomBasesHook(dim=rbd_cuda.layout.Compression(4, minimum=8), seed=9, error_feedback=error_feedback)
    model.register_comm_hook(state, random_bases_hook)
    opt = torch.optim.SGD(model.parameters(), lr=1.0 if error_feedback else 0.4)
    x, y = batch(0, world)  # a fixed task: loss on the whole batch before and after
    first = F.cross_entropy(model(x), y).item()
    for t in range(40):
        xl, yl = local(t % 4, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(xl), yl).backward()
        opt.step()
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
    return {"first": first, "last": last, "hash": fingerprint(model.parameters()),
            "stats": state.stats.per_step()}


def scenarios(rank, world):
    return {
        "shared": shared_vs_single(rank, world),
        "independent-sum": independent_one_step(rank, world, "sum"),
        "independent-mean": independent_one_step(rank, world, "mean"),
        "identical": runs_stay_identical(rank, world),
        "divergence": divergence_is_detected(rank, world),
        "seed": mismatched_seed_is_refused(rank, world),
        "non-finite": non_finite_on_one_rank(rank, world),
        "copies": copies(rank, world),
        "hook-step": hook_one_step(rank, world),
        "hook-ef": hook_error_feedback(rank, world),
        "hook-trains": hook_trains(rank, world, False),
        "hook-trains-ef": hook_trains(rank, world, True),
        "hook-normalize": hook_each_normalisation(rank, world),
        "lr": mismatched_lr_is_refused(rank, world),
        "lr-later": lr_changed_on_one_rank_is_found(rank, world),
        "hook-seeds": hook_seeds_differ(rank, world),
    }


def one_rank_raises(rank, world):
    model = mlp()
    opt = DistributedRBD(model.parameters(), lr=0.1, dim=4, seed=1)
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    start = time.monotonic()
    try:
        train_steps(model, opt, 1, rank, world)
    except RuntimeError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    return {"error": None}


def loads(rank, world):
    """load_state_dict of the optimizer and of the hook's state, on 2 ranks (a collective each)."""
    kw = {"lr": 0.2, "dim": 5, "compartments": "tensor", "momentum": 0.5, "weight_decay": 0.1, "seed": 4,
          "check_every": 2}

    def run(model, opt, steps):
        for t in steps:
            x, y = local(t, rank, world)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def refusal(load):
        try:
            load()
        except ValueError as error:
            return str(error)
        return None

    out = {}
    model = mlp()
    opt = DistributedRBD(model.parameters(), **kw)
    run(model, opt, range(1))
    early = copy.deepcopy(opt.state_dict())
    run(model, opt, range(1, 3))
    late, late_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    run(model, opt, range(3, 5))
    out["uninterrupted"] = flat(model)
    # Every rank resumes from the same checkpoint: the uninterrupted run, bit for bit.
    resumed = mlp(seed=9)
    resumed.load_state_dict(late_model)
    resumed_opt = DistributedRBD(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(late)
    run(resumed, resumed_opt, range(3, 5))
    out["resumed"] = flat(resumed)
    # Rank 1 loads an older checkpoint: refused on both ranks, nothing loaded.
    other = DistributedRBD(mlp().parameters(), **kw)
    out["older"] = refusal(lambda: other.load_state_dict(early if rank == 1 else late))
    out["older-steps"] = other.steps_taken
    # Rank 0's state dict is invalid: both ranks raise (none waits in a later collective).
    bad = copy.deepcopy(late)
    bad["param_groups"][0]["lr"] = float("nan")
    out["invalid"] = refusal(lambda: other.load_state_dict(bad if rank == 0 else late))
    out["both-invalid"] = refusal(lambda: other.load_state_dict(bad))
    mistyped = copy.deepcopy(late)
    mistyped["param_groups"][0]["lr"] = "0.2"  # a TypeError on rank 0, agreed on like the others
    out["mistyped"] = refusal(lambda: other.load_state_dict(mistyped if rank == 0 else late))
    out["after-refusals"] = (other.steps_taken, other.param_groups[0]["lr"])
    # The hook's state, loaded with another step on one rank.
    hook = RandomBasesHook(20, seed=3)
    out["hook"] = refusal(lambda: hook.load_state_dict({**hook.state_dict(), "step": 7 if rank == 0 else 5}))
    out["hook-step"] = hook.step
    hook.load_state_dict({**hook.state_dict(), "step": 7})
    out["hook-same"] = hook.step
    return out


def test_distributed_loads_are_agreed_by_every_rank(tmp_path):
    results = launch_ok(tmp_path, 2, loads)
    for res in results:
        assert torch.equal(res["resumed"], res["uninterrupted"])
        assert torch.equal(res["uninterrupted"], results[0]["uninterrupted"])
        assert "the load of the state_dict: ranks disagree on steps_taken: rank(s) [1]" in res["older"]
        assert res["older-steps"] == 0
        assert "ranks disagree on whether the state_dict is valid: rank(s) [1]" in res["invalid"]
        assert "lr (param group 0) must be finite" in res["both-invalid"]
        assert "ranks disagree on whether the state_dict is valid: rank(s) [1]" in res["mistyped"]
        assert res["after-refusals"] == (0, 0.2)
        assert "the load of the hook's state: ranks disagree on step: rank(s) [1]" in res["hook"]
        assert res["hook-step"] == 0 and res["hook-same"] == 7


# ---- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch_ok(tmp_path_factory.mktemp("dist"), WORLD, scenarios)


def test_shared_bases_equal_one_process_on_the_concatenated_batch(results):
    ref = results[0]["shared"]
    for r, res in enumerate(results):
        assert torch.equal(res["shared"]["distributed"], ref["distributed"]), f"rank {r} differs from rank 0"
    moved = (ref["single"] - flat(mlp())).abs().max()
    assert moved > 1e-3  # the steps did something
    torch.testing.assert_close(ref["distributed"], ref["single"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_independent_bases_apply_every_ranks_update(results, reduction):
    """θ₁ = θ₀ − lr·s·w·Σ_r P_r P_rᵀ g_r, rank r's tensor k on stream r·K + k (K = 4 tensors)."""
    runs = [res[f"independent-{reduction}"] for res in results]
    n_tensors, dim, lr = 4, 6, 0.5
    weight = 1.0 if reduction == "sum" else 1.0 / WORLD
    for k in range(n_tensors):
        before = runs[0]["before"][k].double().reshape(-1)
        update = torch.zeros_like(before)
        for r, run in enumerate(runs):
            P = rbd_cuda.ops.materialize(before.numel(), dim, seed=11, step=0, stream=r * n_tensors + k,
                                     dtype=torch.float64)
            update += P @ (P.T @ run["grads"][k].double().reshape(-1))
        expected = before - lr / dim * weight * update
        for r, run in enumerate(runs):
            assert torch.equal(run["after"][k], runs[0]["after"][k]), f"tensor {k}: rank {r} differs"
        torch.testing.assert_close(runs[0]["after"][k].double().reshape(-1), expected, rtol=1e-5, atol=1e-6)
    n_coeffs = n_tensors * dim + n_tensors  # coefficients + one flag per segment
    comm = runs[0]["comm"]
    assert comm["payload_bytes"] == 4 * n_coeffs and comm["collectives"] == 1
    assert comm["ring_sent_bytes"] == (WORLD - 1) * 4 * n_coeffs
    assert comm["dense_bytes"] == 4 * sum(p.numel() for p in mlp().parameters())


def test_every_scheme_keeps_the_ranks_bit_identical(results):
    hashes = [res["identical"] for res in results]
    assert len(hashes[0]) == 4
    assert all(h == hashes[0] for h in hashes)


def test_a_rank_that_diverges_is_reported_on_every_rank(results):
    for r, res in enumerate(results):
        assert res["divergence"] is not None, f"rank {r} did not see the difference"
        assert "rank(s) [1] differ from rank 0" in res["divergence"]


def test_a_non_finite_gradient_on_one_rank_is_refused_on_every_rank(results):
    for r, res in enumerate(results):
        error = res["non-finite"]["error"]
        assert error is not None and res["non-finite"]["unchanged"], f"rank {r} stepped"
        if r == 1:
            assert "the gradient of parameter param2 holds NaN or infinite values; step 0 was not taken" in error
        else:
            assert "another rank's gradient holds NaN or infinite values" in error
        assert res["non-finite"]["hash"] == results[0]["non-finite"]["hash"]


def test_a_copy_of_a_distributed_optimizer_steps_as_the_original(results):
    for res in results:
        assert res["copies"]["same"]
        assert ("a distributed optimizer built with a process group cannot be copied or pickled, since a process "
                "group cannot: copy its state_dict()") in res["copies"]["refusal"]


def test_ranks_with_different_seeds_are_refused(results):
    for res in results:
        assert res["seed"] is not None and "ranks disagree on seed" in res["seed"]


def test_hook_all_reduces_coefficients_and_expands_them(results):
    by_rank = [{b["index"]: b for b in res["hook-step"]["buckets"]} for res in results]
    assert by_rank[0], "the hook saw no bucket"
    for index, bucket in by_rank[0].items():
        numel = bucket["in"].numel()
        P = rbd_cuda.ops.materialize(numel, 20, seed=9, step=0, stream=index, dtype=torch.float64)
        mean_c = sum(P.T @ ranks[index]["in"].double() for ranks in by_rank) / WORLD
        torch.testing.assert_close(bucket["out"].double(), P @ mean_c / 20, rtol=1e-5, atol=1e-6)
        for ranks in by_rank:
            assert torch.equal(ranks[index]["out"], bucket["out"])
    stats = results[0]["hook-step"]["stats"]
    assert stats["payload_bytes"] == 4 * 20 * len(by_rank[0])
    assert stats["dense_bytes"] == 4 * sum(p.numel() for p in mlp().parameters())


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_hook_output_equals_the_float64_formula_for_each_normalisation(results, normalize):
    """out = s·P·mean_r(Pᵀ in_r), with the bucket (n entries) as compartment and model."""
    by_rank = [{b["index"]: b for b in res["hook-normalize"][normalize]} for res in results]
    assert by_rank[0]
    for index, bucket in by_rank[0].items():
        n = bucket["in"].numel()
        P = rbd_cuda.ops.materialize(n, 20, seed=5, step=0, stream=index, distribution="uniform", dtype=torch.float64)
        s = {"unbiased": 3 / 20, "paper": 1 / n, "dim": 1 / 20, "none": 1.0, "projection": 3 / n}[normalize]
        mean_c = sum(P.T @ ranks[index]["in"].double() for ranks in by_rank) / WORLD
        torch.testing.assert_close(bucket["out"].double(), s * (P @ mean_c), rtol=1e-5, atol=1e-6)


def test_ranks_with_different_learning_rates_are_refused(results):
    for res in results:
        assert res["lr"] is not None and "ranks disagree on param groups' values" in res["lr"]


def test_a_learning_rate_changed_on_one_rank_is_found_by_the_periodic_check(results):
    for r, res in enumerate(results):
        assert res["lr-later"] is not None, f"rank {r} did not see the difference"
        assert "ranks disagree on param groups' values: rank(s) [1]" in res["lr-later"]


def test_hooks_with_different_seeds_are_refused_on_every_rank(results):
    for r, res in enumerate(results):
        assert res["hook-seeds"] is not None, f"rank {r} trained with mismatched hooks"
        assert "the hook's configuration check: ranks disagree on seed" in res["hook-seeds"]


def test_hook_all_reduces_a_bucket_no_larger_than_d_as_it_is(results):
    runs = [res["hook-step"] for res in results]
    for k, got in enumerate(runs[0]["uncompressed_grads"]):
        mean = sum(run["local_grads"][k] for run in runs) / WORLD
        torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-7)


def test_hook_error_feedback_carries_the_residual_to_the_next_step(results):
    """x = g + e (e only from a bucket with the same parameters in the same order);
    ĝ = P·mean_r(Pᵀ x_r)/D (normalize="projection" by default with error feedback); e ← x − ĝ."""
    runs = [res["hook-ef"] for res in results]
    assert {r["step"] for r in runs[0]} == {0, 1, 2}
    reused = 0
    for i, rec in enumerate(runs[0]):
        xs = []
        for run in runs:
            mine = run[i]
            assert (mine["step"], mine["index"]) == (rec["step"], rec["index"])
            before = [r for r in run[:i] if r["step"] == mine["step"] - 1 and r["index"] == mine["index"]]
            x = mine["in"].double()
            if before and before[0]["layout"] == mine["layout"]:
                x = x + before[0]["residual"].double()
                reused += 1
            torch.testing.assert_close(mine["residual"].double(), x - mine["out"].double(), rtol=1e-5, atol=1e-6)
            xs.append(x)
        numel = rec["in"].numel()
        P = rbd_cuda.ops.materialize(numel, 20, seed=4, step=rec["step"], stream=rec["index"], dtype=torch.float64)
        mean_c = sum(P.T @ x for x in xs) / WORLD
        torch.testing.assert_close(rec["out"].double(), P @ mean_c / numel, rtol=1e-5, atol=1e-6)
    assert reused >= WORLD  # at least one step after the rebuild added its residual back


@pytest.mark.parametrize("key", ["hook-trains", "hook-trains-ef"])
def test_hook_trains_a_small_model(results, key):
    runs = [res[key] for res in results]
    assert all(run["hash"] == runs[0]["hash"] for run in runs)  # DDP's replicas stay in sync
    assert runs[0]["last"] < 0.4 * runs[0]["first"], runs[0]
    assert runs[0]["stats"]["compression"] > 3


def test_a_rank_that_raises_makes_the_others_fail_fast(tmp_path):
    out, elapsed = launch(tmp_path, 2, one_rank_raises)
    assert out[1]["error"] == "ValueError: rank 1 fails on purpose"
    survivor = out[0]["ok"]
    assert survivor["error"] is not None, "rank 0 stepped without its peer"
    assert "rbd_cuda: the all-reduce of step 0's coefficients failed on rank 0 of 2" in survivor["error"]
    assert survivor["seconds"] < COLLECTIVE_TIMEOUT_S + 5
    assert elapsed < LAUNCH_DEADLINE_S


# ---- single-process checks (no process group needed) ------------------------------------------


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"scheme": "ring"}, ValueError, "scheme must be one of"),
    ({"reduction": "max"}, ValueError, "reduction must be one of"),
    ({"check_every": -1}, ValueError, "check_every must be an int >= 0"),
    ({"record": True}, ValueError, "record is not supported"),
    ({}, RuntimeError, "need an initialised process group"),
])
def test_optimizer_arguments_are_checked(kw, error, match):
    with pytest.raises(error, match=match):
        DistributedRBD(mlp().parameters(), lr=0.1, dim=4, **kw)


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"dim": rbd_cuda.layout.Proportional(10)}, TypeError, "hook's dim must be"),
    ({"dim": 0}, ValueError, "dim must be positive"),
    ({"normalize": "sqrt"}, ValueError, "normalize must be one of"),
    ({"distribution": "bernoulli"}, ValueError, "distribution must be one of"),
    ({"seed": 2**64}, ValueError, "seed must fit in 64 bits"),
])
def test_hook_arguments_are_checked(kw, error, match):
    with pytest.raises(error, match=match):
        RandomBasesHook(**kw)


def test_hook_normalisation_follows_error_feedback():
    assert RandomBasesHook().normalize == "unbiased"
    assert RandomBasesHook(error_feedback=True).normalize == "projection"
    state = RandomBasesHook(10, distribution="uniform", normalize="projection")
    assert state.dim_for(1000) == 10 and state.scale(1000, 10) == pytest.approx(3 / 1000)
    assert RandomBasesHook().dim_for(101_770) == 1018  # Compression(100, minimum=10)


def test_fingerprint_sees_every_bit():
    a = torch.randn(100)
    b = a.clone()
    assert fingerprint([a]) == fingerprint([b])
    b.view(torch.int32)[57] ^= 1  # the lowest mantissa bit of one entry
    assert fingerprint([a]) != fingerprint([b])
    assert fingerprint([a.to(torch.bfloat16)]) != fingerprint([a.to(torch.float16)])


def test_hook_state_dict_round_trip_and_refusal():
    state = RandomBasesHook(30, seed=3, distribution="rademacher", error_feedback=True)
    state.step = 7
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = RandomBasesHook(30, seed=3, distribution="rademacher", error_feedback=True)
    resumed.load_state_dict(saved)
    assert resumed.step == 7
    with pytest.raises(ValueError, match="other arguments: seed: 3 saved, 4 here"):
        RandomBasesHook(30, seed=4, distribution="rademacher", error_feedback=True).load_state_dict(saved)
    for step in ("x", -1, 2.5, None):
        with pytest.raises(ValueError, match="the hook state's step must be an int >= 0"):
            resumed.load_state_dict({**saved, "step": step})
    assert resumed.step == 7

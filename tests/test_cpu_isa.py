"""rbd_cuda.backends: the setting (the CPU instruction set), and the CPU kernels'
instruction-set paths (baseline, AVX2, AVX-512): each one this CPU runs is selected with
``backends.cpu.isa`` and must give the baseline's results bit for bit (words, entries of all three
distributions, products) and agree with the float64 reference. The baseline is always among them,
so every machine tests the fallback."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    DISTRIBUTIONS,
    DTYPES,
    KAT,
    check_expand,
    check_expand_,
    check_project,
    dtype_id,
    random_vector,
    ref_matrix,
)

import rbd_cuda
from rbd_cuda import backends, reference

ISAS = backends.cpu.isas
SIMD_ISAS = [isa for isa in ISAS if isa != "baseline"]
KNOWN = ("avx512", "avx2", "baseline")


@pytest.fixture
def use_isa(monkeypatch):
    """Selects a path for the calls that follow; the previous one is restored after the test."""
    def select(isa):
        monkeypatch.setattr(backends.cpu, "isa", isa)
        assert backends.cpu.isa == isa
    return select


def test_isa_list():
    assert ISAS[-1] == "baseline"
    assert len(set(ISAS)) == len(ISAS) and set(ISAS) <= set(KNOWN)
    assert ISAS == sorted(ISAS, key=KNOWN.index)  # best first


def test_auto_is_best(use_isa):
    use_isa("baseline")
    backends.cpu.isa = "auto"
    assert backends.cpu.isa == ISAS[0]


def test_bad_settings_are_refused_and_change_nothing(use_isa):
    use_isa("baseline")
    with pytest.raises(ValueError, match="the CPU ISA must be 'avx512', 'avx2', 'baseline' or 'auto', got 'sse9'"):
        backends.cpu.isa = "sse9"
    with pytest.raises(TypeError, match="rbd_cuda.backends.cpu.isa must be a str, got int"):
        backends.cpu.isa = 2
    assert backends.cpu.isa == "baseline"


@pytest.mark.parametrize("isa", KNOWN)
def test_unavailable_isa_is_refused(isa):
    if isa in ISAS:
        pytest.skip(f"{isa} is available on this CPU")
    with pytest.raises(ValueError, match=f"the CPU ISA '{isa}' is not available.*baseline"):
        backends.cpu.isa = isa


def test_the_settings_are_attributes_and_context_managers(monkeypatch):
    monkeypatch.setattr(backends.cpu, "isa", ISAS[0])
    with backends.cpu.use_isa("baseline"):
        assert backends.cpu.isa == "baseline"
    assert backends.cpu.isa == ISAS[0]
    with pytest.raises(KeyError), backends.cpu.use_isa("baseline"):
        raise KeyError  # restored on the way out of an exception too
    assert backends.cpu.isa == ISAS[0]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter importing this copy of rbd_cuda, with ``env`` set (None: unset)."""
    environ = {k: v for k, v in os.environ.items() if k != "RBD_CPU_ISA"}
    root = os.path.dirname(os.path.dirname(rbd_cuda.__file__))
    environ["PYTHONPATH"] = os.pathsep.join([root, environ.get("PYTHONPATH", "")])
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_environment_gives_the_initial_values_once_at_import():
    code = """import os, torch, rbd_cuda
from rbd_cuda import backends
print(backends.cpu.isa)
# Read once: changing the variable afterwards changes nothing, and no op call reads it.
os.environ["RBD_CPU_ISA"] = "sse9"
rbd_cuda.project(torch.ones(8), 4, seed=0)
print(backends.cpu.isa)"""
    run = _python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [ISAS[0]] * 2  # the default: the best ISA
    run = _python(code, RBD_CPU_ISA="baseline")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["baseline"] * 2
    run = _python("import rbd_cuda", RBD_CPU_ISA="sse9")
    assert run.returncode != 0
    assert ("RBD_CPU_ISA='sse9' sets rbd_cuda.backends.cpu.isa: the CPU ISA must be 'avx512', 'avx2', "
            "'baseline' or 'auto', got 'sse9'") in run.stderr


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rounds", [7, 10])
def test_philox_words(isa, rounds, use_isa):
    # The SIMD Philox against the scalar reference: known answers, edge words, random words;
    # 1003 counters leave a partial vector at the end.
    use_isa(isa)
    rows = [r for r in KAT if r[0] == rounds]
    out = rbd_cuda.ops.philox4x32(torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]), rounds)
    assert out.tolist() == [r[3] for r in rows]
    gen = torch.Generator().manual_seed(17 + rounds)
    counter = torch.randint(0, 2**32, (1003, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (1003, 2), generator=gen, dtype=torch.int64)
    counter[:5] = 2**32 - 1
    key[3:9] = 2**32 - 1  # the key schedule wraps mod 2**32
    assert torch.equal(rbd_cuda.ops.philox4x32(counter, key, rounds), reference.philox4x32(counter, key, rounds))


# (numel, dim, row_offset, col_offset): partial tiles and groups, a row range with many row
# chunks, more columns than one materialize_ call (512), the stream's last rows and columns; the
# narrow widths 1, 2, 4, 8 (cpu::kernel_width; Rademacher: the bits from bit 0 of the first group,
# so the column offset's shift counts), with partial vectors of row blocks.
SHAPES = [
    (1, 1, 0, 0),
    (1003, 2, 5, 3),
    (517, 4, 1, 0),
    (9, 5, 2, 3),
    (70_001, 8, 6, 24),
    (7, 17, 3, 45),
    (1001, 77, 2, 31),
    (3, 600, 1, 7),
    (70_001, 33, 6, 64),
    (37, 300, 2**34 - 37, 2**32 - 300),
]
SHAPE_IDS = [f"{n}x{d}@{r},{c}" for n, d, r, c in SHAPES]
STREAM = {"seed": 2**63 + 12345, "step": 9, "stream": 2**32 - 3}


def _run_all(isa, use_isa, numel, dim, kw, dtype):
    use_isa(isa)
    g = random_vector(numel, dtype, seed=numel)
    c = random_vector(dim, dtype, seed=dim)
    out = random_vector(numel, dtype, seed=3)
    rbd_cuda.expand_(out, c, -0.6, **kw)
    results = {"project": rbd_cuda.project(g, dim, **kw), "expand": rbd_cuda.expand(c, numel, **kw),
               "expand_": out}
    if numel * dim <= 2_000_000:
        results["materialize"] = rbd_cuda.ops.materialize(numel, dim, **kw)
    return results


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_paths_are_bit_identical(isa, shape, dist, use_isa):
    numel, dim, r0, c0 = shape
    kw = {**STREAM, "distribution": dist, "row_offset": r0, "col_offset": c0}
    for dtype in DTYPES:
        base = _run_all("baseline", use_isa, numel, dim, kw, dtype)
        simd = _run_all(isa, use_isa, numel, dim, kw, dtype)
        assert simd.keys() == base.keys()
        for name, expected in base.items():
            assert torch.equal(simd[name], expected), f"{isa} {name} differs from baseline ({dtype_id(dtype)})"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dim,col_offset", [(97, 1000), (3, 1026)])  # tiles (groups); narrow: 4 (8)
def test_paths_match_reference(isa, dist, dim, col_offset, use_isa):
    use_isa(isa)
    numel = 1030
    kw = {**STREAM, "distribution": dist, "row_offset": 3, "col_offset": col_offset}
    m = rbd_cuda.ops.materialize(numel, dim, **kw)
    ref = ref_matrix(numel, dim, **kw)
    if dist == "normal":
        assert (m.double() - ref).abs().max().item() <= 1e-6
    else:
        assert torch.equal(m, ref.float())
    for dtype in DTYPES:
        check_project(random_vector(numel, dtype, seed=1), dim, **kw)
        check_expand(random_vector(dim, dtype, seed=2), numel, **kw)
        check_expand_(random_vector(numel, dtype, seed=3), random_vector(dim, seed=4), 0.5, **kw)


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dim", [45, 6])  # tiles (groups), and a narrow width
def test_paths_thread_count_invariance(isa, dist, dim, use_isa, restore_threads):
    use_isa(isa)
    numel = 200_003
    kw = {**STREAM, "distribution": dist, "row_offset": 1, "col_offset": 3}
    g, c = random_vector(numel, seed=1), random_vector(dim, seed=2)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append((rbd_cuda.project(g, dim, **kw), rbd_cuda.expand(c, numel, **kw)))
    for proj, u in results[1:]:
        assert torch.equal(proj, results[0][0])
        assert torch.equal(u, results[0][1])

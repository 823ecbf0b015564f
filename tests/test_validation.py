"""Bad input is rejected with an error naming the offending argument."""

import pytest
import torch

import rbd_cuda
from rbd_cuda import reference
from rbd_cuda.layout import Compression, Fixed, Proportional
from rbd_cuda.optim import RBD

ERR = (ValueError, RuntimeError)
G = torch.ones(10)
C = torch.ones(4)


def _project(**kw):
    args = {"g": G, "dim": 4, "seed": 0}
    args.update(kw)
    return rbd_cuda.project(args.pop("g"), args.pop("dim"), **args)


def _expand(**kw):
    args = {"c": C, "numel": 10, "seed": 0}
    args.update(kw)
    return rbd_cuda.expand(args.pop("c"), args.pop("numel"), **args)


def _expand_(**kw):
    args = {"out": torch.zeros(10), "c": C, "seed": 0}
    args.update(kw)
    return rbd_cuda.expand_(args.pop("out"), args.pop("c"), **args)


def _materialize(**kw):
    args = {"numel": 10, "dim": 4, "seed": 0}
    args.update(kw)
    return rbd_cuda.ops.materialize(args.pop("numel"), args.pop("dim"), **args)


OPS = {"project": _project, "expand": _expand, "expand_": _expand_, "materialize": _materialize}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"distribution": "gaussian"}, "distribution"),
        ({"distribution": "Normal"}, "distribution"),
        ({"distribution": ""}, "distribution"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"step": -1}, "step"),
        ({"step": 2**32}, "step"),
        ({"stream": -1}, "stream"),
        ({"stream": 2**32}, "stream"),
        ({"row_offset": -1}, "row_offset"),
        ({"col_offset": -1}, "col_offset"),
        ({"row_offset": 2**34 - 9}, "row_offset"),  # row_offset + numel = 2**34 + 1
        ({"col_offset": 2**32 - 3}, "col_offset"),  # col_offset + dim = 2**32 + 1
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else None,
)
def test_bad_stream_arguments(op, kw, match):
    with pytest.raises(ERR, match=match):
        OPS[op](**kw)


@pytest.mark.parametrize("op", OPS)
def test_stream_range_limits_are_inclusive(op):
    # The very last rows and columns of the stream are valid.
    OPS[op](row_offset=2**34 - 10, col_offset=2**32 - 4, step=2**32 - 1, stream=2**32 - 1,
            seed=2**64 - 1)
    OPS[op](seed=-(2**63))


RAW_OK = {"seed": 0, "step": 0, "stream": 0, "distribution": "normal", "row_offset": 0, "col_offset": 0}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"distribution": "gaussian"}, "distribution"),
        ({"step": -1}, "step"),
        ({"step": 2**32}, "step"),
        ({"stream": 2**32}, "stream"),
        ({"row_offset": -1}, "row_offset"),
        ({"col_offset": 2**32}, "col_offset"),
    ],
    ids=repr,
)
def test_raw_ops_validate_too(kw, match):
    # Callers of torch.ops.rbd_cuda.* bypass the Python wrapper's checks: C++ checks the same.
    ops, args = torch.ops.rbd_cuda, {**RAW_OK, **kw}
    with pytest.raises(ValueError, match=match):
        ops.project(G, 4, **args)
    with pytest.raises(ValueError, match=match):
        ops.expand(C, 10, **args)
    with pytest.raises(ValueError, match=match):
        ops.expand_(torch.zeros(10), C, 1.0, **args)
    with pytest.raises(ValueError, match=match):
        ops.materialize_(torch.zeros(10, 4), **args)


def test_raw_ops_validate_sizes():
    ops = torch.ops.rbd_cuda
    with pytest.raises(ValueError, match="dim"):
        ops.project(G, 0, **RAW_OK)
    with pytest.raises(ValueError, match="numel"):
        ops.expand(C, -1, **RAW_OK)
    with pytest.raises(ValueError, match=r"\bc must hold at least one"):
        ops.expand_(torch.zeros(10), torch.ones(0), 1.0, **RAW_OK)


def test_seed_type():
    with pytest.raises(TypeError, match="seed"):
        _project(seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        _project(seed=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["step", "stream", "row_offset", "col_offset"])
def test_fractional_integers_are_refused_not_truncated(op, name):
    with pytest.raises(TypeError, match=name):
        OPS[op](**{name: 1.7})


def test_fractional_sizes_are_refused():
    with pytest.raises(TypeError, match="dim"):
        _project(dim=3.9)
    with pytest.raises(TypeError, match="numel"):
        _expand(numel=10.0)
    with pytest.raises(TypeError, match="rounds"):
        rbd_cuda.ops.philox4x32(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64), 10.0)


@pytest.mark.parametrize("dim", [0, -1])
def test_bad_dim(dim):
    with pytest.raises(ERR, match="dim"):
        _project(dim=dim)
    with pytest.raises(ERR, match="dim"):
        _materialize(dim=dim)


def test_bad_numel():
    with pytest.raises(ERR, match="numel"):
        _expand(numel=-1)
    with pytest.raises(ERR, match="numel"):
        _materialize(numel=-1)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64]
)
def test_bad_dtypes(dtype):
    with pytest.raises(ERR, match=r"\bg must be"):
        _project(g=torch.ones(10, dtype=dtype))
    with pytest.raises(ERR, match=r"\bc must be"):
        _expand(c=torch.ones(4, dtype=dtype))
    with pytest.raises(ERR, match=r"\bc must be"):
        _expand_(c=torch.ones(4, dtype=dtype))
    with pytest.raises(ERR, match=r"\bout must be"):
        _expand_(out=torch.zeros(10, dtype=dtype))


def test_bad_materialize_dtype():
    with pytest.raises(ERR, match="out must be a floating-point"):
        _materialize(dtype=torch.int32)


@pytest.mark.parametrize("shape", [(2, 2), (), (1, 4)])
def test_c_not_1d(shape):
    c = torch.ones(shape)
    with pytest.raises(ERR, match=r"\bc must be 1-D"):
        _expand(c=c)
    with pytest.raises(ERR, match=r"\bc must be 1-D"):
        _expand_(c=c)


def test_c_empty():
    with pytest.raises(ERR, match=r"\bc must hold at least one"):
        _expand(c=torch.ones(0))
    with pytest.raises(ERR, match=r"\bc must hold at least one"):
        _expand_(c=torch.ones(0))


def test_out_not_contiguous():
    out = torch.zeros(10, 4).T
    with pytest.raises(ERR, match=r"\bout must be contiguous"):
        _expand_(out=out)
    with pytest.raises(ERR, match=r"\bout must be contiguous"):
        _expand_(out=torch.zeros(20)[::2])
    with pytest.raises(ERR, match=r"\bout must be contiguous"):
        torch.ops.rbd_cuda.materialize_(torch.zeros(4, 10).T, seed=0)
    with pytest.raises(ERR, match=r"\bout must be 2-D"):
        torch.ops.rbd_cuda.materialize_(torch.zeros(40), seed=0)


PLAN = rbd_cuda.SegmentPlan([10, 10], [0, 10], [0, 0], [4], [0])


def _grouped(which: str, tensor: torch.Tensor):
    if which == "project_grouped":
        return rbd_cuda.project_grouped([G, tensor], PLAN, seed=0)
    return rbd_cuda.expand_grouped_([torch.zeros(10), tensor], C, [1.0, 1.0], PLAN, seed=0)


@pytest.mark.filterwarnings("ignore:.*(beta state|deprecated):UserWarning")
@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "quantized"])
def test_sparse_and_quantized_inputs_are_refused_naming_the_argument(kind):
    def convert(t):
        if kind == "sparse_coo":
            return t.to_sparse()
        if kind == "sparse_csr":
            return t.reshape(2, -1).to_sparse_csr()
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)

    match = "must be a dense tensor" if kind.startswith("sparse") else "must not be quantized"
    with pytest.raises(ValueError, match=rf"\bg {match}"):
        _project(g=convert(G))
    with pytest.raises(ValueError, match=rf"\bc {match}"):
        _expand(c=convert(C))
    with pytest.raises(ValueError, match=rf"\bc {match}"):
        _expand_(c=convert(C))
    with pytest.raises(ValueError, match=rf"\bout {match}"):
        _expand_(out=convert(torch.zeros(10)))
    with pytest.raises(ValueError, match=rf"\bg\[1\] {match}"):
        _grouped("project_grouped", convert(torch.ones(10)))
    with pytest.raises(ValueError, match=rf"\bout\[1\] {match}"):
        _grouped("expand_grouped_", convert(torch.zeros(10)))


def test_the_in_place_expands_refuse_a_c_that_requires_grad():
    c = torch.ones(4, requires_grad=True)
    out = torch.zeros(10)
    with pytest.raises(ValueError, match="expand_ does not carry a gradient to c"):
        _expand_(out=out, c=c)
    with pytest.raises(ValueError, match="expand_grouped_ does not carry a gradient to c"):
        rbd_cuda.expand_grouped_([out], c, [1.0], rbd_cuda.SegmentPlan([10], [0], [0], [4], [0]), seed=0)
    assert torch.equal(out, torch.zeros(10))
    with torch.no_grad():  # no gradient is asked for: the update of an optimizer
        _expand_(out=out, c=c)
    assert out.abs().sum() > 0


def test_failed_expand_inplace_leaves_out_untouched():
    out = torch.arange(10.0)
    with pytest.raises(ERR):
        _expand_(out=out, distribution="bogus")
    with pytest.raises(ERR):
        _expand_(out=out, row_offset=-1)
    assert torch.equal(out, torch.arange(10.0))


@pytest.mark.parametrize("rounds", [0, 1, 6, 8, 9, 11, 12, 20])
def test_philox_bad_rounds(rounds):
    counter, key = torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ERR, match="rounds"):
        rbd_cuda.ops.philox4x32(counter, key, rounds)
    with pytest.raises(ValueError, match="rounds"):
        reference.philox4x32(counter, key, rounds)


def test_philox_bad_shapes():
    def z(*shape, dtype=torch.int64):
        return torch.zeros(*shape, dtype=dtype)

    with pytest.raises(ERR, match="counter"):
        rbd_cuda.ops.philox4x32(z(1, 3), z(1, 2))
    with pytest.raises(ERR, match="counter"):
        rbd_cuda.ops.philox4x32(z(1, 4, dtype=torch.int32), z(1, 2))
    with pytest.raises(ERR, match="key"):
        rbd_cuda.ops.philox4x32(z(2, 4), z(1, 2))
    with pytest.raises(ERR, match="key"):
        rbd_cuda.ops.philox4x32(z(1, 4), z(1, 3))


@pytest.mark.parametrize("words", [[-1, 0, 0, 0], [2**32, 0, 0, 0]])
def test_philox_words_out_of_range(words):
    with pytest.raises(ValueError, match="counter"):
        rbd_cuda.ops.philox4x32(torch.tensor([words]), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="key"):
        rbd_cuda.ops.philox4x32(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([words[:2]]))


def test_reference_rejects_the_same():
    with pytest.raises(ValueError, match="dim"):
        reference.materialize(3, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        reference.materialize(3, 1, seed=2**64)
    with pytest.raises(ValueError, match="distribution"):
        reference.materialize(3, 1, seed=0, distribution="gauss")
    with pytest.raises(ValueError, match="rows"):
        reference.materialize(3, 1, seed=0, row_offset=2**34 - 2)


@pytest.mark.parametrize(("rule", "match"), [
    (Compression(float("nan")), "Compression's factor must be a finite number > 0, got nan"),
    (Compression(float("inf")), "Compression's factor must be a finite number > 0, got inf"),
    (Compression(0), "Compression's factor must be a finite number > 0, got 0"),
    (Compression(10, minimum=2.5), "Compression's minimum must be an int, got 2.5"),
    (Compression(10, minimum=0), "Compression's minimum must be positive"),
    (Fixed(2.5), "Fixed's dim must be an int, got 2.5"),
    (Proportional(0), "Proportional's total must be positive"),
    (Proportional(250, 0), "Proportional's minimum must be positive, got 0"),
    (Proportional(250, 2.5), "Proportional's minimum must be an int, got 2.5"),
], ids=repr)
def test_bad_dimension_rules_name_the_argument(rule, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RBD(torch.nn.Linear(3, 2).parameters(), lr=0.1, dim=rule)

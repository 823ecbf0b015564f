"""Philox4x32 known answers (Random123) for the op and the reference, and op == reference."""

import pytest
import torch
from conftest import KAT

import rbd_cuda
from rbd_cuda import reference


def kat_tensors(rounds):
    rows = [r for r in KAT if r[0] == rounds]
    counter = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    key = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    expected = torch.tensor([r[3] for r in rows], dtype=torch.int64)
    return counter, key, expected


@pytest.mark.parametrize("rounds", [7, 10])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_known_answers(rounds, impl):
    counter, key, expected = kat_tensors(rounds)
    assert len(counter) == 3
    fn = rbd_cuda.ops.philox4x32 if impl == "op" else reference.philox4x32
    out = fn(counter, key, rounds)
    assert out.dtype == torch.int64 and out.shape == (3, 4)
    assert out.tolist() == expected.tolist()


def test_default_rounds_is_10():
    counter, key, expected = kat_tensors(10)
    assert rbd_cuda.ops.philox4x32(counter, key).tolist() == expected.tolist()
    assert reference.philox4x32(counter, key).tolist() == expected.tolist()


@pytest.mark.parametrize("rounds", [7, 10])
def test_op_matches_reference_on_random_words(rounds):
    gen = torch.Generator().manual_seed(rounds)
    n = 4096
    counter = torch.randint(0, 2**32, (n, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (n, 2), generator=gen, dtype=torch.int64)
    counter[:8] = 2**32 - 1  # edge words, where a careless 32x32 product would overflow int64
    key[:4] = 2**32 - 1
    out = rbd_cuda.ops.philox4x32(counter, key, rounds)
    assert ((out >= 0) & (out < 2**32)).all()
    assert torch.equal(out, reference.philox4x32(counter, key, rounds))


def test_mulhilo_exhaustive_edges():
    # The reference's split multiply against Python's exact integers.
    vals = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0x9E3779B9]
    b = torch.tensor(vals, dtype=torch.int64)
    for a in (reference.PHILOX_M0, reference.PHILOX_M1, 0xFFFFFFFF):
        hi, lo = reference._mulhilo32(a, b)
        assert hi.tolist() == [(a * v) >> 32 for v in vals]
        assert lo.tolist() == [(a * v) & 0xFFFFFFFF for v in vals]


def test_stream_block_is_philox10_of_layout():
    # materialize(uniform) entry (i, j) is word i & 3 of Philox10((i >> 2, j, step, stream), seed).
    seed, step, stream = 0xDEADBEEF12345678, 7, 9
    rows, cols = [0, 1, 2, 3, 4, 4099], [0, 5, 77]
    for i in rows:
        for j in cols:
            x = reference.philox4x32(
                torch.tensor([[i >> 2, j, step, stream]]),
                torch.tensor([[seed & 0xFFFFFFFF, seed >> 32]]),
            )[0, i & 3].item()
            expected = (x >> 8) * 2.0**-23 - 1.0
            got = rbd_cuda.ops.materialize(1, 1, seed=seed, step=step, stream=stream,
                                       distribution="uniform", row_offset=i, col_offset=j)
            assert got.item() == expected


def test_stream_version():
    assert rbd_cuda.backends.stream_version() == 1

"""Property test: project / expand / expand_ against the reference over the whole argument space."""

import torch
from conftest import (
    DISTRIBUTIONS,
    DTYPES,
    check_expand,
    check_expand_,
    check_project,
    random_vector,
    ref_matrix,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rbd_cuda

U32 = st.integers(0, 2**32 - 1)

stream_args = st.fixed_dictionaries(
    {
        "seed": st.one_of(st.integers(-(2**63), 2**64 - 1),
                       st.sampled_from([0, -1, 2**63, 2**64 - 1, -(2**63)])),
        "step": U32,
        "stream": U32,
        "distribution": st.sampled_from(DISTRIBUTIONS),
        "row_offset": st.integers(0, 100),
        "col_offset": st.integers(0, 100),
    }
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numel=st.integers(0, 3000),
    dim=st.integers(1, 70),
    kw=stream_args,
    dtype=st.sampled_from(DTYPES),
    data_seed=st.integers(0, 2**31),
)
def test_products_match_reference(numel, dim, kw, dtype, data_seed):
    g = random_vector(numel, dtype, seed=data_seed)
    c = random_vector(dim, dtype, seed=data_seed + 1)
    check_project(g, dim, **kw)
    check_expand(c, numel, **kw)
    out = random_vector(numel, dtype, seed=data_seed + 2)
    check_expand_(out, c, -0.75, **kw)
    m = rbd_cuda.ops.materialize(numel, dim, **kw)
    ref = ref_matrix(numel, dim, **kw)
    if kw["distribution"] == "normal":
        torch.testing.assert_close(m.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(m, ref.float())

"""rbd_cuda: training in re-drawn random subspaces with fused Philox projection kernels.

Each op regenerates the needed entries of a D×d random matrix P from a
counter-based RNG inside the product, so P never exists in memory.
"""

from . import basis, layout, nn, optim
from .ops import (
    DISTRIBUTIONS,
    built_with_cuda,
    cpu_isa,
    cpu_isas,
    cuda_kernels,
    expand,
    expand_,
    expand_grouped_,
    materialize,
    philox4x32,
    project,
    project_grouped,
    stream_version,
)

__all__ = [
    "DISTRIBUTIONS",
    "basis",
    "built_with_cuda",
    "cpu_isa",
    "cpu_isas",
    "cuda_kernels",
    "expand",
    "expand_",
    "expand_grouped_",
    "layout",
    "materialize",
    "nn",
    "optim",
    "philox4x32",
    "project",
    "project_grouped",
    "stream_version",
]
__version__ = "0.1.0"

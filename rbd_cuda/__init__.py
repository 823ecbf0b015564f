"""rbd_cuda: training in re-drawn random subspaces with fused Philox projection kernels.

Each op regenerates the needed entries of a D×d random matrix P from a counter-based RNG inside
the product, so P never exists in memory. The products are here; the rest lives in its
subpackage: ``ops`` (the products' home, ``DISTRIBUTIONS``, and ``materialize``/``philox4x32`` for
tests and debugging), ``backends`` (which kernels run, build facts), ``basis``, ``layout``,
``optim``, ``nn`` (``RandomSubspace``) and ``distributed``.
"""

from . import backends, basis, layout, nn, ops, optim
from .ops import SegmentPlan, expand, expand_, expand_grouped_, project, project_grouped

__all__ = [
    "SegmentPlan",
    "backends",
    "basis",
    "expand",
    "expand_",
    "expand_grouped_",
    "layout",
    "nn",
    "ops",
    "optim",
    "project",
    "project_grouped",
]
__version__ = "0.1.0"

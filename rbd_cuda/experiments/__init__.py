"""The paper's experiments, built on the library: data, models, the one training loop, the
training and Table 1 CLIs, the intrinsic-dimension tool and their reports.

The library (``rbd_cuda.ops``, ``optim``, ``nn``, ``distributed``, ``reference``) never imports
from here; these modules import the library as any trainer would. Their command lines are short:
``python -m rbd_cuda.train``, ``rbd_cuda.reproduce``, ``rbd_cuda.intrinsic_dim`` and
``rbd_cuda.data``.
"""

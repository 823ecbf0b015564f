"""The paper's experiments, built on the ``rbd_cuda`` library: data, models, the one training loop,
the training and Table 1 command lines, the intrinsic-dimension tool and their reports.

The library never imports from here; these modules import it as any trainer would. Installed by the
same ``pip install -e .`` as the library, with the console scripts ``rbd-train``, ``rbd-reproduce``,
``rbd-intrinsic-dim`` and ``rbd-data``.
"""

"""``python -m rbd_cuda.intrinsic_dim``: the command line of ``rbd_cuda.experiments.intrinsic_dim`` (see its docstring)."""

if __name__ == "__main__":
    import sys

    from .experiments.intrinsic_dim import main

    sys.exit(main())

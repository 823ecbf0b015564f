"""``python -m rbd_cuda.data``: the command line of ``rbd_cuda.experiments.data`` (see its docstring)."""

if __name__ == "__main__":
    import sys

    from .experiments.data import main

    sys.exit(main())

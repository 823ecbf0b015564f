"""``python -m rbd_cuda.reproduce``: the command line of ``rbd_cuda.experiments.reproduce`` (see its docstring)."""

if __name__ == "__main__":
    import sys

    from .experiments.reproduce import main

    sys.exit(main())

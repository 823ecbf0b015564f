"""``python -m rbd_cuda.train``: the command line of ``rbd_cuda.experiments.train`` (see its docstring)."""

if __name__ == "__main__":
    import sys

    from .experiments.train import main

    sys.exit(main())

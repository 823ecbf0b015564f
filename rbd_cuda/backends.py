"""Which kernels the ops run, and facts about the build.

``cpu.isa`` is the CPU kernels' instruction set, ``"avx512"``, ``"avx2"`` or ``"baseline"`` (one
of ``cpu.isas``, the ones this CPU and build run, best first); assigning ``"auto"`` selects the
best. Every path gives the same results bit for bit: only the speed differs. It is a process-wide
setting, read by the ops on every call: a change applies to every thread's calls.
``with cpu.use_isa("avx2"):`` sets it for a block and restores the previous value. The environment
variable ``RBD_CPU_ISA`` gives the initial value, read once when ``rbd_cuda`` is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import _C  # noqa: F401  (loading the extension registers torch.ops.rbd_cuda)

__all__ = ["arithmetic_version", "built_with_cuda", "cpu", "stream_version"]


def _name(setting: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"rbd_cuda: {setting} must be a str, got {type(value).__name__}")
    return value


class CPU:
    """The CPU kernels (the module's ``cpu``)."""

    @property
    def isa(self) -> str:
        """The instruction set the CPU kernels use; assign a name of ``isas`` or ``"auto"``."""
        return str(torch.ops.rbd_cuda.cpu_isa())

    @isa.setter
    def isa(self, name: str) -> None:
        torch.ops.rbd_cuda.set_cpu_isa(_name("rbd_cuda.backends.cpu.isa", name))

    @property
    def isas(self) -> list[str]:
        """The instruction sets this CPU (and build) runs, best first; always ends with ``"baseline"``."""
        return [str(name) for name in torch.ops.rbd_cuda.cpu_isas()]

    @contextlib.contextmanager
    def use_isa(self, name: str) -> Iterator[None]:
        """``isa = name`` for the block, then the previous value again."""
        previous = self.isa
        self.isa = name
        try:
            yield
        finally:
            self.isa = previous


cpu = CPU()


def built_with_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(torch.ops.rbd_cuda.built_with_cuda())


def stream_version() -> int:
    """Version of the random-stream layout: the same version gives the same matrices."""
    return int(torch.ops.rbd_cuda.stream_version())


def arithmetic_version() -> int:
    """Version of the products' arithmetic (fused multiply-adds, the normal entries' functions,
    summation order): with the same stream version, the same arithmetic version gives the same
    results bit for bit on one device kind; another continues a trajectory within fp32 rounding."""
    return int(torch.ops.rbd_cuda.arithmetic_version())


def _initial(variable: str, setting: str, owner, attribute: str) -> None:
    value = os.environ.get(variable, "")
    if not value:
        return
    try:
        setattr(owner, attribute, value)
    except ValueError as error:
        raise ValueError(f"rbd_cuda: the environment variable {variable}={value!r} sets {setting}: "
                         + str(error).removeprefix("rbd_cuda: ")) from None


_initial("RBD_CPU_ISA", "rbd_cuda.backends.cpu.isa", cpu, "isa")

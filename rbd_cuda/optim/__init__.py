"""Optimizers that train in random subspaces: RBD (re-drawn bases), FPD (one fixed basis) and the
NES evolution-strategies baseline, plus ``replay`` of a recorded RBD run."""

from .base import RandomBasesOptimizer
from .nes import NES
from .rbd import FPD, RBD, Exchange, replay

__all__ = ["FPD", "NES", "RBD", "Exchange", "RandomBasesOptimizer", "replay"]

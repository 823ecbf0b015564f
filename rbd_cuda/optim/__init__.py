"""Optimizers that train in random subspaces: RBD (re-drawn bases), FPD (one fixed basis) and the
NES evolution-strategies baseline, plus ``replay`` of a recorded RBD run."""

from .compartments import Compartment, Compression, Fixed, Proportional, Segment
from .rbd import FPD, NES, NORMALIZATIONS, RBD, replay

__all__ = ["FPD", "NES", "NORMALIZATIONS", "RBD", "Compartment", "Compression", "Fixed", "Proportional", "Segment", "replay"]

"""Optimizers built on lowrank_ops' linear algebra."""
from .galore import GaLoreAdamW, GaLoreProjector
from .mfac import MFAC

__all__ = ["GaLoreAdamW", "GaLoreProjector", "MFAC"]

"""Optimizers built on lowrank_ops' linear algebra."""
from .galore import GaLoreAdamW, GaLoreAdamW8bit, GaLoreProjector
from .ggpo import GGPO
from .mfac import MFAC

__all__ = ["GGPO", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreProjector", "MFAC"]

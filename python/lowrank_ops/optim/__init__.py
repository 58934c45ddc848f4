"""Optimizers built on lowrank_ops' linear algebra."""
from .galore import GaLoreAdamW, GaLoreAdamW8bit, GaLoreProjector
from .ggpo import GGPO
from .mfac import MFAC
from .mkor import MKOR

__all__ = ["GGPO", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreProjector", "MFAC", "MKOR"]

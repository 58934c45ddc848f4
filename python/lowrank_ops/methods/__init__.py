"""Method modules built on the ops: one module per method (SLTrain, M-FAC pruning, SoRA,
low-rank weight compression, ...)."""
from . import lowrank_compress, mfac_pruning, sltrain, sora

__all__ = ["lowrank_compress", "mfac_pruning", "sltrain", "sora"]

"""Method modules built on the ops: one module per method (SLTrain, M-FAC pruning, SoRA, ...)."""
from . import mfac_pruning, sltrain, sora

__all__ = ["mfac_pruning", "sltrain", "sora"]

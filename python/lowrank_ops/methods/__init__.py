"""Method modules built on the ops: one module per method (SLTrain, M-FAC pruning, ...)."""
from . import mfac_pruning, sltrain

__all__ = ["mfac_pruning", "sltrain"]

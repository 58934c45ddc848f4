"""Method modules built on the ops: one module per method (SLTrain, ...)."""
from . import sltrain

__all__ = ["sltrain"]
from . import mfac_pruning
__all__ += ["mfac_pruning"]

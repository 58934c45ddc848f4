"""Method modules built on the ops: one module per method (SLTrain, M-FAC pruning, SoRA,
low-rank weight compression, LoRA-GA init, ...)."""
from . import lora_ga, lowrank_compress, mfac_pruning, sltrain, sora

__all__ = ["lora_ga", "lowrank_compress", "mfac_pruning", "sltrain", "sora"]

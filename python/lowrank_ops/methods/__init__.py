"""Method modules built on the ops: one module per method (SLTrain, M-FAC pruning, SoRA,
low-rank weight compression, LoRA-GA init, ...)."""
from . import lora_ga, lowrank_compress, mfac_pruning, sltrain, sora

__all__ = ["lora_ga", "lowrank_compress", "mfac_pruning", "sltrain", "sora"]
low-rank weight compression, FastRP node embeddings, ...)."""
from . import fastrp, lowrank_compress, mfac_pruning, sltrain, sora

__all__ = ["fastrp", "lowrank_compress", "mfac_pruning", "sltrain", "sora"]

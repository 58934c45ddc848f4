"""Method modules built on the ops: one module per method (SLTrain, M-FAC pruning, SoRA,
low-rank weight compression, LoRA-GA init, FastRP node embeddings, TRP, SST, WeLore,
Perfusion's rank-1 editing, ...)."""
from . import fastrp, lora_ga, lowrank_compress, mfac_pruning, perfusion, sltrain, sora, sst, trp, welore

__all__ = ["fastrp", "lora_ga", "lowrank_compress", "mfac_pruning", "perfusion", "sltrain", "sora", "sst", "trp",
           "welore"]

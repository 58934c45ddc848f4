"""Method modules built on the ops: one module per method (SLTrain, M-FAC pruning, SoRA,
low-rank weight compression, LoRA-GA init, FastRP node embeddings, TRP, SST, WeLore,
Perfusion's rank-1 editing, IncreLoRA rank allocation, Maestro ordered low-rank layers, ...)."""
from . import (fastrp, increlora, lora_ga, lowrank_compress, maestro, mfac_pruning, perfusion, sltrain, sora, sst,
               trp, welore)

__all__ = ["fastrp", "increlora", "lora_ga", "lowrank_compress", "maestro", "mfac_pruning", "perfusion", "sltrain",
           "sora", "sst", "trp", "welore"]

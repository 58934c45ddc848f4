"""``torch.nn`` modules built on lowrank_ops' ops."""
from .lora import LoRALinear
from .lora_multi import MultiLoRALinear
from .sparse_lowrank import SparseLowRankLinear
from .svfit import SVFitLinear

__all__ = ["LoRALinear", "MultiLoRALinear", "SVFitLinear", "SparseLowRankLinear"]

"""``torch.nn`` modules built on lowrank_ops' ops."""
from .loldu import LoLDULinear
from .lora import LoRALinear
from .lora_multi import MultiLoRALinear
from .sparse_lowrank import SparseLowRankLinear
from .spectral import SpectralLinear
from .svfit import SVFitLinear

__all__ = ["LoLDULinear", "LoRALinear", "MultiLoRALinear", "SVFitLinear", "SparseLowRankLinear", "SpectralLinear"]

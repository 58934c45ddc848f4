"""Differentiable ops (torch tensors in, torch tensors out), one module per op family."""
from .sparse import fixed_sparse_matmul, spmv
from .sparse_lowrank import sparse_lowrank_linear
from .svd import batched_svd

__all__ = ["fixed_sparse_matmul", "spmv", "sparse_lowrank_linear", "batched_svd"]
from . import ot  # noqa: E402  (entropic OT kernel ops: lowrank_ops.ops.ot)
from .mfac import mfac_combine, mfac_dots
__all__ += ["mfac_dots", "mfac_combine"]
from .lora import lora_linear, lora_merge, lora_unmerge
__all__ += ["lora_linear", "lora_merge", "lora_unmerge"]
from .dora import dora_linear, dora_row_norm
__all__ += ["dora_linear", "dora_row_norm"]
from .lora_multi import lora_linear_multi
__all__ += ["lora_linear_multi"]

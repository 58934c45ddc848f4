"""Differentiable ops (torch tensors in, torch tensors out), one module per op family.

The optimal-transport kernel ops live in :mod:`lowrank_ops.ops.ot` (used by
:mod:`lowrank_ops.ot`'s solvers), the Krylov kernel ops in :mod:`lowrank_ops.ops.krylov`
(used by :mod:`lowrank_ops.krylov`'s solvers).
"""
from . import base_linear, krylov, ot, qr
from ._library import composite, mark_undifferentiable_ops
from .dora import dora_linear, dora_row_norm
from .lora import lora_linear, lora_merge, lora_unmerge
from .lora_multi import lora_linear_multi
from .mfac import mfac_combine, mfac_dots
from .sparse import fixed_sparse_matmul, spmv
from .sparse_lowrank import sparse_lowrank_linear
from .svd import batched_svd

mark_undifferentiable_ops()  # once every op family is defined (see its docstring)

__all__ = [
    "base_linear", "batched_svd", "composite", "dora_linear", "dora_row_norm", "fixed_sparse_matmul", "krylov", "lora_linear", "lora_linear_multi",
    "lora_merge", "lora_unmerge", "mfac_combine", "mfac_dots", "ot", "qr", "sparse_lowrank_linear", "spmv",
]

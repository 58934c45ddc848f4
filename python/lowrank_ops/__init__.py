"""lowrank_ops: fast low-rank, sparse and second-order ops for machine learning.

Importing never fails because a back end is missing; :func:`info` reports what was
compiled (CPU kernels, CUDA kernels and their architectures) and what is usable now.

Public modules:

* :mod:`lowrank_ops.ops`: differentiable ops (``lora_linear``, ``lora_linear_multi``,
  ``dora_linear``, ``fixed_sparse_matmul``, ``spmv``, ``sparse_lowrank_linear``, ...)
* :mod:`lowrank_ops.nn`: modules (``LoRALinear`` with DoRA and gates, ``MultiLoRALinear``,
  ``SparseLowRankLinear``, ``NOLALinear``, ``RandLoRALinear``, ``SVFitLinear``, ``LoLDULinear``,
  ``SpectralLinear``)
* :mod:`lowrank_ops.integrations.peft`: ``use_lowrank_ops`` (PEFT's LoRA on our fused layer;
  imported on demand, PEFT is optional)
* :mod:`lowrank_ops.methods`: method modules (``sltrain``, ``mfac_pruning``, ``lora_ga``,
  ``perfusion``, ``increlora``, ``maestro``, ``sora``, ``sst``, ``trp``, ``welore``,
  ``lowrank_compress``, ``fastrp``)
* :mod:`lowrank_ops.linalg`: ``rsvd``, ``adaptive_rsvd``, ``pca_lowrank``, ``range_finder``,
  ``batched_svd``, ``cholesky_qr2``, ``lowrank_error``, ``effective_rank``, ``cur``
* :mod:`lowrank_ops.optim`: ``GaLoreAdamW``, ``GaLoreAdamW8bit``, ``MFAC``, ``MKOR``, ``GGPO`` (LoRA-GGPO)
* :mod:`lowrank_ops.second_order`: ``MFACInverse`` (M-FAC inverse-Hessian-vector products),
  ``hessian_trace``
* :mod:`lowrank_ops.krylov`: ``gmres``, ``cg``, ``GCRODR`` (recycling), ``DeflatedCG`` (recycling CG, SPD), ``solve_sequence`` (SKR)
* :mod:`lowrank_ops.ot`: ``sinkhorn`` (log domain), ``sinkhorn_newton_sparse`` (SNS)
* :mod:`lowrank_ops.pde`: seeded Darcy / Poisson / Helmholtz / thermal problem generators
* :mod:`lowrank_ops.sparse`: :class:`~lowrank_ops.sparse.FixedSupport` patterns
* :mod:`lowrank_ops.reference`: pure-torch float64-capable references of the public ops
  (the kernel-level passes, e.g. M-FAC's, are checked against torch formulas in their tests)
"""
from . import krylov, linalg, methods, nn, ops, optim, ot, pde, reference, second_order, sparse
from .info import __version__, info

__all__ = ["__version__", "info", "krylov", "linalg", "methods", "nn", "ops", "optim", "ot", "pde", "reference", "second_order", "sparse"]

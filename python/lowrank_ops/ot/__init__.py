"""Entropic optimal transport: log-domain Sinkhorn and Sinkhorn-Newton-Sparse (SNS).

``sinkhorn(a, b, C, reg)`` and ``sinkhorn_newton_sparse(a, b, C, reg)`` solve a problem or
a batch of problems given a cost matrix or point clouds (cost computed inside the
kernels); both return an :class:`OTResult`.  Kernels: :mod:`lowrank_ops.ops.ot`.
"""
from .result import OTResult
from .sinkhorn import sinkhorn
from .sns import sinkhorn_newton_sparse

__all__ = ["sinkhorn", "sinkhorn_newton_sparse", "OTResult"]

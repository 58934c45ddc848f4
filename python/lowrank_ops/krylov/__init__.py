"""Krylov solvers for sparse linear systems, with subspace recycling for sequences (SKR).

* :func:`gmres`: restarted GMRES(m); :func:`cg`: conjugate gradients (SPD);
* :class:`GCRODR`: GCRO-DR(m, k), keeps its recycled subspace between ``solve`` calls;
* :func:`solve_sequence`: SKR (Wang et al., ICLR 2024): sort the systems by a feature
  (greedy nearest neighbour), then solve them in that order with recycling;
* :class:`CSRMatrix`: the sparse matrix the solvers (and :mod:`lowrank_ops.pde`) use;
* :class:`SolveInfo`, :class:`SequenceResult`: what the solvers report.

GCRO-DR follows Parks, de Sturler et al. (SIAM J. Sci. Comput. 2006).
"""
from .cg import cg
from .gcrodr import GCRODR
from .gmres import gmres
from .info import SolveInfo
from .operators import CSRMatrix, LinearOperator, as_operator
from .skr import SequenceResult, greedy_order, solve_sequence

__all__ = [
    "CSRMatrix", "GCRODR", "LinearOperator", "SequenceResult", "SolveInfo", "as_operator", "cg", "gmres",
    "greedy_order", "solve_sequence",
]

"""Krylov solvers for sparse linear systems, with subspace recycling for sequences (SKR).

* :func:`gmres`: restarted GMRES(m); :func:`cg`: conjugate gradients (SPD);
* :class:`GCRODR`: GCRO-DR(m, k), keeps its recycled subspace between ``solve`` calls;
* :class:`DeflatedCG`: deflated CG for sequences of SPD systems, keeps ``k`` Ritz vectors
  of the earlier solves as its deflation space (on SPD sequences plain CG already matches
  GCRO-DR's products at a fraction of its work per product, so this is the recycling
  solver to use there);
* :func:`solve_sequence`: SKR (Wang et al., ICLR 2024): sort the systems by a feature
  (greedy nearest neighbour), then solve them in that order with recycling;
* :class:`CSRMatrix`: the sparse matrix the solvers (and :mod:`lowrank_ops.pde`) use;
* :class:`SolveInfo`, :class:`SequenceResult`: what the solvers report.

GCRO-DR follows Parks, de Sturler et al. (SIAM J. Sci. Comput. 2006); deflated CG
follows Saad, Yeung, Erhel and Guyomarc'h (SIAM J. Sci. Comput. 2000).
"""
from .cg import cg
from .defcg import DeflatedCG
from .gcrodr import GCRODR
from .gmres import gmres
from .info import SolveInfo
from .operators import CSRMatrix, LinearOperator, as_operator
from .skr import SequenceResult, greedy_order, solve_sequence

__all__ = [
    "CSRMatrix", "DeflatedCG", "GCRODR", "LinearOperator", "SequenceResult", "SolveInfo", "as_operator", "cg", "gmres",
    "greedy_order", "solve_sequence",
]

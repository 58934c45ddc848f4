"""Krylov solvers for sparse linear systems, with subspace recycling for sequences (SKR).

* :func:`gmres`: restarted GMRES(m); :func:`cg`: conjugate gradients (SPD);
* :class:`GCRODR`: GCRO-DR(m, k), keeps its recycled subspace between ``solve`` calls;
* :class:`DeflatedCG`: deflated CG for sequences of SPD systems, keeps ``k`` Ritz vectors
  of the earlier solves as its deflation space.  On SPD sequences plain CG already needs
  about GCRO-DR's products at a fraction of its work per product; deflated CG needs
  1.3-1.5x fewer than CG (Darcy, k = 10), but each step costs ``2 k`` more vector passes
  and the Lanczos record, so on the CPU with a 5-point SpMV plain CG stayed faster in wall
  time (bench/results/cpu-intel-xeon-2core/krylov-spd*): it pays where products are
  expensive;
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

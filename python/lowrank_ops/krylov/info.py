"""The result record every Krylov solver returns next to its solution."""
from __future__ import annotations

import dataclasses
from typing import List

__all__ = ["SolveInfo"]


@dataclasses.dataclass
class SolveInfo:
    """How a solve went.

    Attributes
    ----------
    converged : bool
        True when the final true residual meets the tolerance, ``||b - A x|| <= max(tol ||b||, atol)``:
        exactly when ``status`` is ``"converged"`` or ``"zero_rhs"``.
    iterations : int
        Krylov iterations (Arnoldi steps, or CG steps) over all restart cycles.
    matvecs : int
        Products with ``A`` (Krylov steps, residual recomputations, ``C = A U`` refreshes).
    residuals : list of float
        Relative residual norm after 0, 1, ..., ``iterations`` iterations: the solver's
        running estimate inside a cycle, the recomputed true residual at each cycle's end.
        A solver's ``callback`` receives ``residuals[1:]``, in order.
    true_residual : float
        ``||b - A x|| / ||b||`` of the returned ``x``, recomputed from ``x`` with the
        unpreconditioned ``A`` (0 for a zero right-hand side).
    status : str
        ``"converged"``, ``"zero_rhs"`` (b = 0, x = 0 returned), ``"maxiter"`` (iteration
        budget spent), ``"stagnation"`` (a restart cycle made no progress, e.g. an
        inconsistent singular system; CG: ten restarts from the true residual in a row
        that did not halve it, at the dtype's attainable accuracy) or ``"breakdown"`` (CG
        on a matrix that is not positive definite, or A or M returned NaN or inf).
    restarts : int
        Restart cycles run (GMRES / GCRO-DR); 0 for CG.
    """

    converged: bool
    iterations: int
    matvecs: int
    residuals: List[float]
    true_residual: float
    status: str
    restarts: int = 0

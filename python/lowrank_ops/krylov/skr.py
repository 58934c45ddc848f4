"""SKR: sort a sequence of systems so neighbours are similar, then solve it with recycling.

Wang et al., "Accelerating Data Generation for Neural Operators via Krylov Subspace
Recycling" (ICLR 2024).  Step 1 orders the systems by a greedy nearest-neighbour chain
on a feature of each system (by default its coefficient field); step 2 solves them in
that order with one :class:`~lowrank_ops.krylov.GCRODR` whose recycled subspace is
carried from each system to the next.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from ._common import check_positive_int
from .cg import cg
from .defcg import DeflatedCG
from .gcrodr import GCRODR
from .gmres import gmres
from .info import SolveInfo

__all__ = ["SequenceResult", "greedy_order", "solve_sequence"]

#: 2-D feature fields are average-pooled to at most this many cells per side before the
#: O(N^2 d) distance computation (128 x 128 fields -> 32 x 32: 16x fewer flops, and the
#: ordering only needs the fields' coarse structure).
_FEATURE_SIDE = 32

#: The recycling methods of :func:`solve_sequence` and the type their ``recycler`` must have.
_RECYCLERS = {"gcrodr": GCRODR, "defcg": DeflatedCG}


@dataclasses.dataclass
class SequenceResult:
    """Solutions and statistics of :func:`solve_sequence`, in the caller's order.

    Attributes
    ----------
    solutions : list of Tensor[n]
    infos : list of SolveInfo
        Per system (iterations, matvecs, true residual, ...).
    seconds : list of float
        Wall time of each system's solve.
    order : list of int
        The order the systems were solved in (indices into the input).
    sort_seconds : float
        Time spent computing features and the order.
    """

    solutions: List[torch.Tensor]
    infos: List[SolveInfo]
    seconds: List[float]
    order: List[int]
    sort_seconds: float

    @property
    def matvecs(self) -> int:
        """Total products with the matrices."""
        return sum(info.matvecs for info in self.infos)

    @property
    def iterations(self) -> int:
        return sum(info.iterations for info in self.infos)

    @property
    def converged(self) -> bool:
        return all(info.converged for info in self.infos)

    @property
    def total_seconds(self) -> float:
        return self.sort_seconds + sum(self.seconds)


def greedy_order(features: torch.Tensor, start: int = 0) -> List[int]:
    """Greedy nearest-neighbour chain through the rows of ``features`` (``[N, d]``).

    Starts at ``start`` and repeatedly moves to the closest (Euclidean) unvisited row.
    O(N^2 d) for the distances plus O(N^2) for the chain.  Distances are computed
    pairwise (not through ``|a|^2 + |b|^2 - 2 a.b``, torch's choice past 25 rows, which
    cancels when the rows share a large common part: errors of 0.35 between rows 0.006
    apart), on the features divided by their largest finite magnitude (entries of 1e200
    no longer overflow); infinite or NaN distances come last.

    Parameters
    ----------
    features : Tensor[N, d]
        One feature vector per system (e.g. its coefficient field, flattened); any real
        dtype (the distances are computed in float64, an ``[N, N]`` matrix) and device.
    start : int
        Index of the first row, ``0 <= start < N``.

    Returns
    -------
    list of int
        A permutation of ``range(N)`` beginning with ``start`` (ties go to the lower
        index); empty for ``N = 0``.

    Raises
    ------
    ValueError
        ``features`` not 2-D, or ``start`` out of range.
    """
    if features.dim() != 2:
        raise ValueError(f"greedy_order: features has shape {tuple(features.shape)}; expected (N, d)")
    count = features.shape[0]
    if count == 0:
        return []
    if not 0 <= start < count:
        raise ValueError(f"greedy_order: start must be in [0, {count}); got {start}")
    features = features.to(torch.float64)
    finite = features[torch.isfinite(features)]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    if largest > 0.0:
        features = features / largest
    distances = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    # Unvisited rows at distance inf or NaN rank after every finite distance; visited ones
    # (inf) after those, so the chain always moves to an unvisited row.
    distances = torch.nan_to_num(distances, nan=_LAST, posinf=_LAST)
    distances.fill_diagonal_(float("inf"))
    order = [start]
    distances[:, start] = float("inf")
    current = start
    for _ in range(count - 1):
        current = int(torch.argmin(distances[current]))
        order.append(current)
        distances[:, current] = float("inf")
    return order


_LAST = torch.finfo(torch.float64).max  # greedy_order's rank for infinite and NaN distances


def _unpack(problem, index: int):
    """``(A, b, feature or None)`` from a PDE problem object or an ``(A, b[, feature])`` tuple."""
    if hasattr(problem, "matrix") and hasattr(problem, "rhs"):
        return problem.matrix, problem.rhs, getattr(problem, "coefficient", None)
    if isinstance(problem, (tuple, list)) and len(problem) in (2, 3):
        return problem[0], problem[1], problem[2] if len(problem) == 3 else None
    raise TypeError(
        f"solve_sequence: problems[{index}] must be a PDE problem (with .matrix and .rhs) or a tuple (A, b[, feature]); "
        f"got {type(problem).__name__}"
    )


def _matrix_entries(A):
    """A matrix's entries as a feature (a 2-D one for a dense matrix, pooled like a
    coefficient field; the stored values of a sparse one); None for a callable."""
    values = getattr(A, "values", None)
    if isinstance(values, torch.Tensor):  # a CSRMatrix
        return values
    if isinstance(A, torch.Tensor):
        if A.layout == torch.strided:
            return A
        return (A.coalesce() if A.layout == torch.sparse_coo else A).values()
    if hasattr(A, "tocsr") and hasattr(A, "nnz"):  # scipy.sparse
        return torch.as_tensor(A.tocsr().data)
    if isinstance(A, np.ndarray):
        return torch.as_tensor(A)
    return None


def _feature(feature, A, b) -> torch.Tensor:
    if feature is None:
        entries = _matrix_entries(A)  # the entries carry the coefficients
        feature = entries if entries is not None else b
    feature = torch.as_tensor(feature).to(torch.float64)
    if feature.dim() == 2 and max(feature.shape) > _FEATURE_SIDE:
        side = (min(_FEATURE_SIDE, feature.shape[0]), min(_FEATURE_SIDE, feature.shape[1]))
        feature = torch.nn.functional.adaptive_avg_pool2d(feature[None, None], side)[0, 0]
    return feature.reshape(-1).cpu()


def solve_sequence(problems: Sequence, *, method: str = "gcrodr", order: str = "skr", m: Optional[int] = None,
                   k: Optional[int] = None,
                   tol: Optional[float] = None, atol: float = 0.0, M=None, maxiter: Optional[int] = None,
                   features: Optional[torch.Tensor] = None,
                   recycler: Union[GCRODR, DeflatedCG, None] = None,
                   callback: Optional[Callable[[int, int, torch.Tensor, SolveInfo], None]] = None) -> SequenceResult:
    """Solve a sequence of systems, SKR-style by default.

    Parameters
    ----------
    problems : sequence
        Each a PDE problem (``.matrix``, ``.rhs``, optional ``.coefficient``; see
        :mod:`lowrank_ops.pde`) or a tuple ``(A, b)`` / ``(A, b, feature)``.
    method : {"gcrodr", "defcg", "gmres", "cg"}
        ``"gcrodr"``: one GCRO-DR(m, k) solver carried through the sequence (recycling);
        ``"defcg"``: one deflated CG (:class:`~lowrank_ops.krylov.DeflatedCG`, ``k``
        deflation vectors) carried through the sequence (SPD systems only);
        ``"gmres"``: independent GMRES(m) solves; ``"cg"``: independent CG solves.
    order : {"skr", "given"}
        ``"skr"``: greedy nearest-neighbour order of the features; ``"given"``: as passed.
    m, k : int, optional
        Cycle length (GMRES / GCRO-DR; default 40) and recycled vectors (``k`` only for
        ``"gcrodr"`` and ``"defcg"``; default 10).  With a ``recycler``, its own (given
        ones must match it).
    tol : float, optional
        Relative residual tolerance of every solve; default (None) 1e-8 in float64,
        1e-5 in float32.
    atol : float
        Absolute residual tolerance of every solve (finite, >= 0): each stops once
        ``||b - A x|| <= max(tol ||b||, atol)``.
    M : None, 'jacobi', Tensor[n] or callable
        Preconditioner of every solve (with a ``recycler``, give it to the recycler).
    maxiter : int, optional
        Iteration budget per solve (with a ``recycler``, give it to the recycler).
    features : Tensor[N, d] or array, optional
        Sorting features (default: each problem's coefficient field, else its matrix
        entries (a dense matrix's, or a sparse one's stored values), else (a callable A)
        its right-hand side; 2-D fields pooled to at most 32 x 32).  With ``order="skr"``
        the defaults must have one length: systems of different sizes need ``features``.
    recycler : GCRODR or DeflatedCG, optional
        For ``"gcrodr"`` (a :class:`GCRODR`) or ``"defcg"`` (a :class:`DeflatedCG`): the
        solver to use (and leave updated), e.g. to continue a sequence; default a fresh
        ``GCRODR(m, k, M=M, maxiter=maxiter)`` or ``DeflatedCG(k, M=M, maxiter=maxiter)``.
    callback : callable, optional
        ``callback(done, index, x, info)`` after each solve (``done`` = systems solved so far);
        not the solvers' per-iteration callback.

    Returns
    -------
    SequenceResult
        Solutions and per-system statistics in the caller's order.
    """
    if method not in ("gcrodr", "defcg", "gmres", "cg"):
        raise ValueError(f"solve_sequence: method must be 'gcrodr', 'defcg', 'gmres' or 'cg'; got {method!r}")
    expected = _RECYCLERS.get(method)
    if recycler is not None and expected is not None and not isinstance(recycler, expected):
        raise TypeError(f"solve_sequence: recycler must be a {expected.__name__} for method={method!r}; "
                        f"got {type(recycler).__name__}")
    if recycler is not None:  # its settings are its own: a conflicting one here was silently ignored
        if M is not None or maxiter is not None:
            raise ValueError(f"solve_sequence: M and maxiter are the recycler's own settings (its M and maxiter "
                             f"arguments); got M={M!r}, maxiter={maxiter!r} with a recycler")
        for name, value in (("m", m), ("k", k)):
            if value is not None and value != getattr(recycler, name):
                raise ValueError(f"solve_sequence: {name} = {value!r} differs from the recycler's {name} = "
                                 f"{getattr(recycler, name)}; pass one (or neither)")
    if order not in ("skr", "given"):
        raise ValueError(f"solve_sequence: order must be 'skr' or 'given'; got {order!r}")
    m = 40 if m is None else m
    k = 10 if k is None else k
    check_positive_int("solve_sequence", "m", m)
    unpacked = [_unpack(problem, index) for index, problem in enumerate(problems)]
    count = len(unpacked)
    start = time.perf_counter()
    if order == "skr" and count > 1:
        if features is None:
            defaults = [_feature(feature, A, b) for A, b, feature in unpacked]
            if len({f.numel() for f in defaults}) > 1:
                raise ValueError("solve_sequence: order='skr' compares the problems' default features, which have "
                                 "different lengths here (systems of different sizes or sparsity patterns); pass "
                                 "features [N, d] or order='given'")
            features = torch.stack(defaults)
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[0] != count:
            raise ValueError(f"solve_sequence: features has shape {tuple(features.shape)}; expected (N, d) with N = {count}")
        sequence = greedy_order(features)
    else:
        sequence = list(range(count))
    sort_seconds = time.perf_counter() - start
    if method == "gcrodr":
        solver = recycler if recycler is not None else GCRODR(m, k, M=M, maxiter=maxiter)

        def solve(A, b):
            return solver.solve(A, b, tol=tol, atol=atol)
    elif method == "defcg":
        deflated = recycler if recycler is not None else DeflatedCG(k, M=M, maxiter=maxiter)

        def solve(A, b):
            return deflated.solve(A, b, tol=tol, atol=atol)
    elif method == "gmres":
        def solve(A, b):
            return gmres(A, b, tol=tol, restart=m, maxiter=maxiter, M=M, atol=atol)
    else:
        def solve(A, b):
            return cg(A, b, tol=tol, maxiter=maxiter, M=M, atol=atol)
    solutions: List[Optional[torch.Tensor]] = [None] * count
    infos: List[Optional[SolveInfo]] = [None] * count
    seconds = [0.0] * count
    for done, index in enumerate(sequence, start=1):
        A, b, _ = unpacked[index]
        began = time.perf_counter()
        solutions[index], infos[index] = solve(A, b)
        seconds[index] = time.perf_counter() - began
        if callback is not None:
            callback(done, index, solutions[index], infos[index])
    return SequenceResult(solutions, infos, seconds, sequence, sort_seconds)

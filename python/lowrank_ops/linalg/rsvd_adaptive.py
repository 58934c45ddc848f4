"""Fixed-accuracy randomized SVD: the smallest rank whose factors meet an error tolerance.

:func:`adaptive_rsvd` answers "the low-rank factors of A within ``tol`` of A", where
:func:`~lowrank_ops.linalg.rsvd` answers "the rank-k factors of A": what compression
methods (LoRD, WeLore, SVD-LLM's rank selection, energy thresholds) need, and what
``torch.svd_lowrank`` cannot do (its callers double the rank and call again, or take a
full SVD to read the spectrum).

Algorithm: randQB_pEI (Yu, Gu and Li, "Efficient randomized algorithms for the
fixed-precision low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 2018), on the
tall orientation ``M [p, q]`` of A.  Blocks of ``b`` columns are added to an orthonormal
basis ``Q`` until the exact error indicator reaches the tolerance::

    E = ||M||_F^2
    repeat:
        Q_i = orth(M W_i - Q (B W_i))                     W_i Gaussian [q, b]
        n_iter times: Z = orth(M^T Q_i - B^T (Q^T Q_i)); Q_i = orth(M Z - Q (B Z))
        Q_i = orth(Q_i - Q (Q^T Q_i))                     (re-orthogonalization)
        B_i = Q_i^T M;  Q = [Q, Q_i];  B = [B; B_i]
        E -= ||B_i||_F^2                                  (= ||M - Q B||_F^2 exactly)
    until E <= tol^2 ||M||_F^2 or the basis has max_rank columns

Then ``B = Ub S Vh`` (a small SVD), ``U = Q Ub``, and the rank is the smallest ``k`` with
``||M||_F^2 - sum_{i<=k} s_i^2 <= tol^2 ||M||_F^2``: the factors' error is known without
another pass over A.  Each block costs ``2 n_iter + 2`` products of A with ``b`` columns,
so the flops are those of one rsvd at the final rank rounded up to a block; the products
read A ``(2 n_iter + 2)`` times per block (more passes than rsvd's at large ranks: raise
``block_size`` for large expected ranks).

Accuracy of the indicator: ``E`` is a difference of squared norms, each computed with
relative rounding ``~u`` (the unit roundoff of the compute dtype) times the products'
own (``B = Q^T M`` sums ``p`` terms), so ``E`` is known to some ``10-100 u ||A||_F^2``:
measured, the reported error stalls at 1.1e-7 ``||A||_F`` in float64 (2048 x 512, true
error 4e-15) and was off by 6.4e-4 ``||A||_F`` in float32 (reported 9.99e-4, true 1.19e-3,
i^-2 spectrum).  Tolerances below ``_MIN_TOL_UNITS sqrt(u)`` are therefore rejected
(float32: 3.9e-3, float64: 1.7e-7; use float64 input for tighter ones); at the minimum
the indicator's error is a few percent of the tolerance.  Norms are formed relative to
``||A||_F`` (no squared norm of A itself), so entries of 1e-200 or 1e200 work.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._args import is_integer, is_real_number, require_generator
from .._autocast import without_autocast
from .._csr import check_sparse_invariants
from .._finite import all_finite
from .._signs import normalize_signs
from .._thin_svd import graded_thin_svd
from ..ops._library import refuse_transforms
from .rsvd import _overflow_error, _randn, _scaled_norm, check_n_iter

__all__ = ["adaptive_rsvd", "AdaptiveRSVDResult"]

#: Smallest accepted relative tolerance, in units of sqrt(u) of the compute dtype (see the
#: module docstring): float32 16 sqrt(u) = 3.9e-3, float64 1.7e-7.  (4 units, until stop 30,
#: let the indicator's rounding pass errors of 1.19x tol in float32 as converged.)
_MIN_TOL_UNITS = 16.0


class AdaptiveRSVDResult(NamedTuple):
    """Factors ``U [m, k]``, ``S [k]``, ``Vh [k, n]`` of the rank ``k`` chosen, their error
    ``||A - U diag(S) Vh||_F`` (a 0-d tensor, from the indicator), and whether it meets the
    tolerance (False: ``max_rank`` was reached first, or the indicator, at its rounding
    floor, could not confirm the tolerance)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    error: torch.Tensor
    converged: bool


def _min_tol(dtype: torch.dtype) -> float:
    return _MIN_TOL_UNITS * math.sqrt(torch.finfo(dtype).eps / 2)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


def adaptive_rsvd(
    A: torch.Tensor,
    tol: float,
    *,
    max_rank: Optional[int] = None,
    block_size: int = 32,
    n_iter: int = 2,
    generator: Optional[torch.Generator] = None,
    check_finite: Optional[bool] = None,
) -> AdaptiveRSVDResult:
    """Low-rank factors of ``A`` with ``||A - U diag(S) Vh||_F <= tol ||A||_F`` at the smallest rank found.

    Parameters
    ----------
    A : Tensor[m, n]
        float32 or float64 (float16 / bfloat16 computed in float32); dense, or a 2-D
        sparse COO / CSR / CSC matrix (read only through products, never densified).
    tol : float
        Relative Frobenius tolerance, ``min_tol <= tol < 1`` with ``min_tol = 4 sqrt(u)``:
        9.8e-4 for float32 and 4.2e-8 for float64 (the indicator's accuracy, see the
        module docstring).
    max_rank : int, optional
        Largest rank to build (default ``min(m, n)``): the search stops there and reports
        ``converged=False`` if the tolerance is not met.
    block_size : int
        Basis columns added per step (``b``); the rank is then trimmed to the smallest
        that meets the tolerance, so ``b`` changes the cost, not the rank.
    n_iter : int
        Power iterations per block (``>= 0``).  They decide how close the rank found is
        to the optimal one: on ``s_i = 1 / i`` spectra (1024 x 1024 at tol 0.1, 2048 x 2048
        at 0.05; optimal ranks 57 and 217) 1 iteration gave ranks 62 and 230, 2 (default)
        58 and 224, for 1.05-1.4x the time of 1.
    generator : torch.Generator, optional
        Source of the Gaussian test blocks (on A's device): same state, same result.
    check_finite : bool, optional
        Raise ``ValueError`` on NaN/inf in A (default: True on the CPU, False on CUDA).

    Returns
    -------
    AdaptiveRSVDResult (U, S, Vh, error, converged)
        ``U [m, k]`` and ``Vh [k, n]`` orthonormal, ``S [k]`` descending, in A's dtype
        (float32 for half A), signs as :func:`~lowrank_ops.linalg.rsvd`'s; ``error`` the
        absolute ``||A - U diag(S) Vh||_F`` from the indicator (0-d, the factors' dtype);
        ``converged`` whether ``error <= tol ||A||_F``.  A zero matrix gives ``k = 0``.
        Not differentiable (the rank is a discrete choice): the factors are detached.
        On CUDA the stopping test reads one number back per block (a host
        synchronization each; the rank decides the shapes, so it cannot be avoided).

    Raises
    ------
    TypeError
        A that is not a floating tensor; ``tol``, ``max_rank``, ``block_size`` or
        ``n_iter`` of the wrong type.
    ValueError
        A that is not 2-D or holds NaN/inf (with ``check_finite``); ``tol`` outside
        ``[min_tol, 1)``; ``max_rank`` outside ``[1, min(m, n)]``; ``block_size < 1``;
        ``n_iter < 0``.
    """
    op = "adaptive_rsvd"
    refuse_transforms(op, "the rank is a discrete choice made from the values (not differentiable, and factors of "
                          "different shapes per matrix); call it per matrix, outside the transform")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A must be a tensor; got {type(A).__name__}")
    if A.dim() != 2:
        raise ValueError(f"{op}: A has shape {tuple(A.shape)}; expected a 2-D matrix [m, n]")
    if A.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: A has dtype {A.dtype}; expected float32, float64, float16 or bfloat16")
    check_sparse_invariants(op, "A", A)
    compute = torch.float64 if A.dtype == torch.float64 else torch.float32
    m, n = A.shape
    smallest = min(m, n)
    if not is_real_number(tol):
        raise TypeError(f"{op}: tol must be a number; got {type(tol).__name__}")
    low = _min_tol(compute)
    if not low <= tol < 1.0:
        raise ValueError(f"{op}: tol must be in [{low:.1e}, 1) for {compute} (the error indicator's accuracy is "
                         f"some 3-10 sqrt(u) ||A||_F; pass float64 A for tighter tolerances); got {tol!r}")
    for name, value, minimum in (("block_size", block_size, 1), ("n_iter", n_iter, 0)):
        if not is_integer(value):
            raise TypeError(f"{op}: {name} must be an int; got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{op}: {name} must be >= {minimum}; got {value}")
    check_n_iter(op, "n_iter", n_iter, auto=False)
    require_generator(op, "generator", generator, A.device, "A")
    if max_rank is None:
        max_rank = smallest
    elif not is_integer(max_rank):
        raise TypeError(f"{op}: max_rank must be an int; got {type(max_rank).__name__}")
    elif not 1 <= max_rank <= max(smallest, 1):
        raise ValueError(f"{op}: max_rank must be in [1, min(m, n)] = [1, {smallest}]; got {max_rank}")
    if check_finite is None:
        check_finite = A.device.type == "cpu"
    if check_finite and not all_finite(A):
        raise ValueError(f"{op}: A contains NaN or infinite values")
    with torch.no_grad(), without_autocast(A.device):
        return _adaptive(A.detach().to(compute), float(tol), int(max_rank), int(block_size), int(n_iter), generator)


def _adaptive(A, tol, max_rank, block, n_iter, generator) -> AdaptiveRSVDResult:
    m, n = A.shape
    transposed = m < n
    M = A.transpose(0, 1) if transposed else A  # [p, q], p >= q
    p, q = M.shape
    dense = M.layout == torch.strided
    if M.layout == torch.sparse_coo:  # an uncoalesced COO's stored values are not A's entries (duplicates add up)
        M = M.coalesce()
    values = M if dense else (M._values() if M.layout == torch.sparse_coo else M.values())
    # Everything relative to ||A||_F: its square under- or overflowed float64 for entries of
    # 1e-160 or 1e160 (a rank-0 "converged" answer for a matrix of rank 12).
    norm = float(_scaled_norm(values.reshape(1, -1).double())) if values.numel() else 0.0
    target = tol * tol
    options = dict(dtype=A.dtype, device=A.device)

    def times(X):  # M X
        return M @ X

    def transposed_times(Y):  # M^T Y, for a dense M as (Y^T M)^T: BLAS reads M along its rows
        return (Y.transpose(0, 1) @ M).transpose(0, 1) if dense else M.transpose(0, 1) @ Y

    Q = torch.empty(p, 0, **options)
    B = torch.empty(0, q, **options)
    remaining = 1.0 if norm > 0 else 0.0
    while remaining > target and Q.shape[1] < min(max_rank, q):
        b = min(block, min(max_rank, q) - Q.shape[1])
        W = _randn(q, b, generator=generator, **options)
        Y = _orth(times(W) - Q @ (B @ W))
        for _ in range(n_iter):
            Z = _orth(transposed_times(Y) - B.transpose(0, 1) @ (Q.transpose(0, 1) @ Y))
            Y = _orth(times(Z) - Q @ (B @ Z))
        # Projected out of range(Q) twice ("twice is enough"): once the basis nears A's
        # numerical rank, Y is mostly rounding, and one projection left it 1e-12 to 1e-1
        # along Q; the basis then counted its top directions twice.
        for _ in range(2):
            Y = _orth(Y - Q @ (Q.transpose(0, 1) @ Y))
        B_i = transposed_times(Y).transpose(0, 1)  # Q_i^T M
        Q, B = torch.cat([Q, Y], dim=1), torch.cat([B, B_i], dim=0)
        remaining -= (float(_scaled_norm(B_i.double())) / norm) ** 2
    try:
        Ub, S, Vh = graded_thin_svd(B)
    except torch.linalg.LinAlgError:
        if all_finite(B):
            raise
        raise _overflow_error("adaptive_rsvd", values) from None
    captured = torch.cumsum((S.double() / norm).square(), 0) if norm > 0 else S.double()
    errors_sq = (1.0 - captured).clamp_min(0.0)  # relative, squared
    meets = (errors_sq <= target).nonzero()
    converged = norm == 0 or meets.numel() > 0
    if norm == 0:  # the zero matrix: rank 0
        k = 0
    else:
        k = int(meets[0]) + 1 if meets.numel() else S.shape[0]
    error = norm * math.sqrt(float(errors_sq[k - 1])) if k else norm
    U = Q @ Ub[:, :k]
    S, Vh = S[:k], Vh[:k]
    if transposed:
        U, Vh = Vh.transpose(0, 1), U.transpose(0, 1)
    U, Vh = normalize_signs(U, Vh)
    return AdaptiveRSVDResult(U.contiguous(), S.contiguous(), Vh.contiguous(), torch.tensor(error, **options),
                              bool(converged))

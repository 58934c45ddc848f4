"""Recycled-subspace algebra of GCRO-DR (Parks, de Sturler, Mackey, Johnson, Maiti 2006).

The recycled space is kept as two row-stacked tensors ``U`` and ``C`` (``[kc, n]``)
with ``A U = C`` and ``C`` orthonormal, in the preconditioned variable (``A`` here is
``A M^{-1}``).  Two operations maintain it:

* :func:`refresh` for a new operator: ``C = A U`` (kc products), then re-orthonormalize
  (``C <- T C``, ``U <- T U`` with ``T`` from the Gram matrix of ``C``, twice); directions
  that became dependent are dropped.
* :func:`harmonic_ritz` after every cycle (then re-orthonormalized as by :func:`refresh`,
  without the products): the ``k`` harmonic Ritz vectors of smallest
  harmonic Ritz value over ``span(U, V)``, from the small generalized eigenproblem
  ``G^T G z = theta G^T (W^T Vhat) z`` (``Vhat = [U D, V_j]``, ``W = [C, V_{j+1}]``,
  ``G = [[D, B], [0, Hbar]]``, ``D`` the inverse column norms of ``U``).  It is solved as
  the standard eigenproblem of ``(G^T G)^{-1} G^T W^T Vhat`` (eigenvalues ``1/theta``:
  the largest in modulus are wanted).  Complex pairs contribute their real and
  imaginary parts, so the space stays real.

The small dense work (at most ``(m + 1) x m``) runs in float64 through numpy's LAPACK:
torch's MKL runs even 40 x 40 problems on its OpenMP team, which costs milliseconds
per call on shared cores.  Products with the long vectors go through the block kernels
(``gram``, ``combine_rows``): one sweep over the basis for all k vectors at once.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .._finite import all_finite
from ._arnoldi import Cycle
from ._kernels import combine_rows, gram, row_norms

__all__ = ["refresh", "harmonic_ritz"]

_RANK_TOLERANCE = 1e-12  # relative size below which a direction counts as dependent
_GRAM_TOLERANCE = 1e-14  # the same for squared sizes (Gram eigenvalues): 1e-7 in singular values
_ORTHONORMAL = 1e-8  # |C C^T - I| below which a harmonic Ritz update is kept as it is


def _orthonormalize(image: torch.Tensor, U: torch.Tensor,
                    products: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Gram-matrix pass: ``(image', U')`` with ``image' = T image``, ``U' = T U`` and ``image'`` orthonormal
    (``products``: ``image image^T`` when the caller has it).

    ``T = Lambda^{-1/2} Z^T`` from the eigendecomposition of the ``kc x kc`` Gram matrix
    ``image image^T = Z Lambda Z^T``; eigenvalues below ``_GRAM_TOLERANCE * max`` (singular
    values below ``1e-7 * max``: numerically dependent directions) are dropped, all of them
    when ``A U = 0`` (a zero matrix).
    """
    if image.shape[0] == 0:  # every direction dropped by a first pass
        return image, U
    if products is None:
        products = gram(image, image)
    values, vectors = np.linalg.eigh((products + products.T) / 2)
    keep = values > _GRAM_TOLERANCE * values.max()
    transform = vectors[:, keep] / np.sqrt(values[keep])  # [kc, kept]: columns of T^T
    return combine_rows(image, transform), combine_rows(U, transform)


def refresh(apply: Callable[[torch.Tensor], torch.Tensor], U: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(C, U)`` for a new operator: ``C = A U`` orthonormalized, ``A U_new = C`` (``kc`` products).

    Two Gram-matrix passes (as in CholeskyQR2) instead of a thin SVD of the ``[n, kc]``
    image: the passes are ``kc`` fused kernel calls each, where LAPACK's SVD takes tens of
    milliseconds on shared cores; the second pass restores orthogonality to working
    precision after the first (which is accurate to ``eps * cond^2``).
    """
    if U.shape[0] == 0:  # nothing recycled (every direction dropped earlier)
        return U, U
    # (each product copied before the next call: a callable may return one buffer it reuses)
    image = torch.stack([apply(u.contiguous()).clone() for u in U])
    if not all_finite(image):  # A or M returned NaN or inf: nothing to recycle (the solve reports the breakdown)
        return image[:0], U[:0]
    for _ in range(2):
        image, U = _orthonormalize(image, U)
    return image, U


def harmonic_ritz(basis: torch.Tensor, kc: int, U: torch.Tensor, cycle: Cycle, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """New ``(U, C)`` (``[k', n]`` each, ``k' <= k``) from the cycle that just ended.

    Parameters
    ----------
    basis : Tensor[kc + j + 1, n]
        Rows ``[:kc]``: ``C``; rows ``kc:``: the cycle's Arnoldi vectors ``V_{j+1}``
        (so the rows are ``W``).
    kc : int
        Recycled vectors used in the cycle (0 on a first cycle).
    U : Tensor[kc, n]
        The recycled ``U`` used in the cycle (``A U = C``).
    cycle : Cycle
        Its Hessenberg matrix, ``B`` and step count.
    k : int
        Number of vectors to keep.
    """
    j = cycle.steps
    V = basis[kc: kc + j + 1]
    scale = 1.0 / row_norms(U)  # D: unit columns keep G well scaled
    size = kc + j
    G = np.zeros((size + 1, size))
    G[:kc, :kc] = np.diag(scale)
    G[:kc, kc:] = cycle.b
    G[kc:, kc:] = cycle.hbar
    WV = np.zeros((size + 1, size))  # W^T Vhat, Vhat = [U D, V_j]
    if kc:
        WV[:, :kc] = gram(basis[: kc + j + 1], U) * scale
    WV[kc: kc + j, kc:] = np.eye(j)
    values, vectors = np.linalg.eig(_pencil(G, WV))
    P = _real_basis(values, vectors, min(k, size))
    Q, R = np.linalg.qr(G @ P)
    keep = np.abs(np.diag(R)) > _RANK_TOLERANCE * np.abs(np.diag(R)).max()
    if not keep.all():  # a direction A maps (numerically) into the others: drop it
        P = P[:, keep]
        Q, R = np.linalg.qr(G @ P)
    # U_new = Vhat P R^{-1}, C_new = W Q: combinations of the rows of [U D; V_j] and [C; V_{j+1}].
    P_R = P @ np.linalg.inv(R)
    U_new = combine_rows(V[:j], P_R[kc:])
    if kc:
        combine_rows(U, scale[:, None] * P_R[:kc], out=U_new)
    C_new = combine_rows(basis[: kc + j + 1], Q)
    # C_new is orthonormal only as far as the rows of [C; V] are: the loss grew from cycle to
    # cycle (|C C^T - I| 1e-4, 0.1, 0.6, 10 over five solves of one ill-conditioned matrix,
    # the later ones ending 2.5-24x worse than x0 = 0).  Two Gram passes, as in refresh
    # (no products with A: A U_new = C_new is kept by the transform), when C_new is off by
    # more than sqrt(eps) (each pass costs about 20 % of a 40-step cycle on a 64 x 64 grid).
    products = gram(C_new, C_new)
    if np.abs(products - np.eye(products.shape[0])).max() > _ORTHONORMAL:
        C_new, U_new = _orthonormalize(C_new, U_new, products)
        C_new, U_new = _orthonormalize(C_new, U_new)
    return U_new, C_new


def _pencil(G: np.ndarray, WV: np.ndarray) -> np.ndarray:
    """``(G^T G)^{-1} G^T WV``, the matrix whose eigenvalues are the inverse harmonic Ritz values.

    Through the QR factorization of ``G`` when it has full rank (``R^{-1} Q^T WV``: the
    conditioning of ``G`` instead of ``G^T G``'s square, and 80 us against 230 us for a
    least-squares solve of the normal equations at 41 x 40); the minimum-norm
    least-squares solution of the normal equations when ``G`` is rank-deficient (a
    breakdown on a singular operator).
    """
    Q, R = np.linalg.qr(G)
    diagonal = np.abs(np.diag(R))
    if diagonal.min() > _RANK_TOLERANCE * diagonal.max():
        return np.linalg.solve(R, Q.T @ WV)
    return np.linalg.lstsq(G.T @ G, G.T @ WV, rcond=None)[0]


def _real_basis(values: np.ndarray, vectors: np.ndarray, count: int) -> np.ndarray:
    """An orthonormal real ``[size, <= count]`` basis of the eigenvectors of largest ``|value|``.

    A complex eigenvector contributes its real and imaginary parts (its conjugate's span
    is the same); when only one slot is left, its real part alone.
    """
    order = np.argsort(-np.abs(values), kind="stable")
    scale = float(np.abs(values).max()) if values.size else 0.0
    columns, taken = [], []
    for index in order:
        if len(columns) >= count:
            break
        value, vector = values[index], vectors[:, index]
        if abs(value.imag) <= 1e-12 * scale:
            columns.append(vector.real)
        elif any(abs(t - np.conj(value)) <= 1e-10 * scale for t in taken):
            continue  # the conjugate's real and imaginary parts are already in
        else:
            columns.append(vector.real)
            if len(columns) < count:
                columns.append(vector.imag)
        taken.append(value)
    Q, R = np.linalg.qr(np.stack(columns, axis=1))
    keep = np.abs(np.diag(R)) > _RANK_TOLERANCE * np.abs(np.diag(R)).max()
    return Q[:, keep]

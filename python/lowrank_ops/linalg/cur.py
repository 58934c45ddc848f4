"""CUR decomposition (skeleton approximation) ``A ~= C U R`` from actual rows and columns of A.

``C = A[:, J]`` (``c`` columns), ``R = A[I, :]`` (``r`` rows) and a small core ``U [c, r]``:

* ``u="intersection"`` (default; ANNCUR's ``CURApprox``, Yadav et al., EMNLP 2022):
  ``U = pinv(W)`` of the intersection ``W = A[I, J] [r, c]``.  Reads only the selected rows
  and columns of A (ANNCUR's use: exact scores of new items against anchor items
  only).  Exact when ``rank(W) = rank(A)``: ``C pinv(W) R = A`` (the skeleton theorem).
* ``u="projection"``: ``U = pinv(C) A pinv(R)``, the Frobenius-optimal core for the chosen
  ``C``, ``R`` (``C U R`` is then the projection of A onto ``range(C)`` and ``range(R^T)``,
  never worse than the intersection core); one more pass over A.

The pseudo-inverses are truncated: singular values below ``rcond`` times the largest are
dropped (and, with ``rank``, all beyond the ``rank``-th): a nearly singular intersection
(anchors that nearly repeat each other, or more anchors than A's numerical rank) would
otherwise amplify rounding and the trailing singular values by ``1 / sigma_min(W)``.
ANNCUR's ``np.linalg.pinv`` truncates only at numpy's ``rcond=1e-15`` and runs on the CPU
in NumPy; here the SVD of ``W`` (``lowrank_ops._thin_svd``) runs on A's device.

Index selection (``rows`` / ``cols`` not given):

* ``"leverage"`` (default): sampled without replacement with probabilities proportional to
  the rank-``rank`` leverage scores, the squared row norms of ``U_k`` (rows) and of
  ``V_k`` (columns) from :func:`lowrank_ops.linalg.rsvd` (approximate leverage scores,
  Drineas, Mahoney & Muthukrishnan 2008).
* ``"uniform"``: sampled uniformly without replacement.
* ``"pivoted"``: deterministic given rsvd's factors: greedy column-pivoted QR (Q-DEIM,
  Drmac & Gugercin 2016) of ``V_s^T`` for the columns and of ``U_s^T`` for the rows, with
  ``s`` = the number of picks (``s = rank`` is Q-DEIM on ``V_k^T``; more picks than the
  rank use that many leading singular vectors, from one rsvd of rank ``max(r, c)``).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .._args import is_integer, is_real_number, require_generator
from .._autocast import without_autocast
from .._csr import check_sparse_invariants
from .._finite import all_finite
from .._thin_svd import thin_svd
from ..ops._library import refuse_transforms
from .rsvd import rsvd

__all__ = ["cur", "CURResult"]

_METHODS = ("leverage", "uniform", "pivoted")
_CORES = ("intersection", "projection")

# Default picks: this many times rank (capped at the dimension).  Why: measured on
# sigma_i = 1 / i and 1 / i^2 matrices (tests/test_cur.py, bench/bench_cur.py), leverage
# sampling with c = r = k leaves ||A - C U R||_F several times the optimal rank-k error,
# while 4k brings it within a small factor; see the docstring of cur for the numbers.
_OVERSAMPLING = 4

# torch.multinomial's limit on the number of categories (rows or columns to sample from).
_MAX_CATEGORIES = 1 << 24


class CURResult(NamedTuple):
    """``A ~= C @ U @ R`` (:meth:`reconstruct`).

    ``C [..., m, c]`` (columns ``col_index`` of A), ``U [..., c, r]``, ``R [..., r, n]``
    (rows ``row_index`` of A); ``row_index [..., r]``, ``col_index [..., c]`` int64 (one per
    matrix of a batch when sampled; 1-D when given).
    """

    C: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    row_index: torch.Tensor
    col_index: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        """``C @ U @ R [..., m, n]`` (the cheaper association order)."""
        m, c = self.C.shape[-2:]
        r, n = self.R.shape[-2:]
        if m * c * r + m * r * n <= c * r * n + m * c * n:
            return (self.C @ self.U) @ self.R
        return self.C @ (self.U @ self.R)


def _pinv(X: torch.Tensor, rcond: float, rank: Optional[int]) -> torch.Tensor:
    """Truncated pseudo-inverse ``[..., q, p]`` of ``X [..., p, q]`` by its SVD: singular values
    ``<= rcond * sigma_1`` and beyond the ``rank``-th count as zero."""
    U, S, Vh = thin_svd(X)
    keep = S > rcond * S[..., :1]
    if rank is not None:
        keep[..., rank:] = False
    inv = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    return (Vh.transpose(-2, -1) * inv.unsqueeze(-2)) @ U.transpose(-2, -1)


# The projection core's default truncation, in units of sqrt(eps) of the compute dtype.
# C pinv(C) A pinv(R) R rounds to about eps / rcond of ||A|| (one ill-conditioned factor
# against its pseudo-inverse), while the truncation drops up to about rcond ||A||: the two
# balance near sqrt(eps).  Measured (1000 x 800 and 3000 x 500, k = 20 and 60, 4k leverage
# picks, spectra i^-2, i^-3, e^(-i/8), e^(-i/4), i^-1; error over the optimal rank-k
# error): the best rcond was 3e-9 in float64 and 3e-5 to 6e-5 in float32, about
# sqrt(eps) / 8 in both.  numpy's eps * max(p, q), the default before, left e^(-i/4), k =
# 60 at 105-183x the optimal in float64 (now 0.02-0.06x: the core's rank is up to 4k) and
# i^-3, k = 60 at 16-18x in float32 (now 7-8x; float32 C and R hold its tail to ~1e-4 only);
# elsewhere equal or better.  The intersection core, truncated at rank k as well, was best
# with numpy's default.
_PROJECTION_RCOND = 1.0 / 8.0

# _pivoted_columns recomputes the residual's column norms every this many steps and
# downdates them in between (norm^2 -= coefficient^2): a downdate loses up to about u times
# the column's original norm^2 per step, so a periodic recompute keeps the lost accuracy
# at a few dozen u -- far below the residual norms that compete for a pivot (the residual
# keeps its rank until the last pick).
_RECOMPUTE_EVERY = 8


def _pivoted_columns(X: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` pivots ``[..., count]`` (sorted ascending) of the column-pivoted QR
    of ``X [..., s, n]``: each step picks the column of largest residual norm, then projects
    it out of the rest (Businger-Golub; torch has no pivoted QR).

    The residual is kept row-major (rsvd's ``U^T`` is a column-major view) and updated in
    place by one rank-one ``baddbmm_``; the norms are downdated (see ``_RECOMPUTE_EVERY``).
    Measured, one thread, ``[128, 2048]`` float32, 128 picks: 166 ms on the column-major
    view with exact norms every step, 68-86 ms row-major, 39 ms with both changes (the same
    picks on rsvd factors and random float64 blocks)."""
    s, n = X.shape[-2:]
    residual = X.reshape(-1, s, n).clone(memory_format=torch.contiguous_format)  # [b, s, n]
    taken = torch.zeros(residual.shape[0], n, dtype=torch.bool, device=X.device)
    picks = []
    norms = residual.square().sum(-2)
    for step in range(count):
        if step and step % _RECOMPUTE_EVERY == 0:
            norms = residual.square().sum(-2)
        j = norms.masked_fill(taken, -1.0).argmax(-1, keepdim=True)  # [b, 1]
        picks.append(j)
        taken.scatter_(-1, j, True)
        column = residual.gather(-1, j.unsqueeze(-2).expand(-1, s, 1))  # [b, s, 1]
        q = column / column.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
        coefficients = q.transpose(-2, -1) @ residual  # [b, 1, n]
        residual.baddbmm_(q, coefficients, alpha=-1)
        norms.sub_(coefficients.squeeze(-2).square())
    return torch.cat(picks, dim=-1).sort(-1).values.reshape(*X.shape[:-2], count)  # ascending, as the sampled ones


def _sample(weights: torch.Tensor, count: int, generator) -> torch.Tensor:
    """``count`` distinct indices ``[..., count]`` drawn without replacement with probabilities
    proportional to ``weights [..., n]`` (sorted ascending)."""
    batch = weights.shape[:-1]
    flat = weights.reshape(-1, weights.shape[-1])
    if flat.shape[0] == 0:
        return torch.empty(*batch, count, dtype=torch.long, device=weights.device)
    # A floor keeps every index drawable: exact zeros (a column outside the rank-k row
    # space) would make torch.multinomial refuse to draw more indices than it has positives.
    flat = flat.double().clamp_min(1e-300) if flat.device.type == "cpu" else flat.clamp_min(torch.finfo(flat.dtype).tiny)
    picks = torch.multinomial(flat, count, replacement=False, generator=generator)
    return picks.sort(-1).values.reshape(*batch, count)


def _as_index(op: str, name: str, value, size: int, dim_name: str, device) -> torch.Tensor:
    """``value`` (a sequence of ints or an integer tensor) as a 1-D int64 tensor of distinct
    indices in ``[0, size)``."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must hold integers; got dtype {value.dtype}")
        index = value.detach().to(device=device, dtype=torch.long)
    else:
        try:
            values = list(value)
        except TypeError:
            raise TypeError(f"{op}: {name} must be a 1-D integer tensor or a sequence of ints; "
                            f"got {type(value).__name__}") from None
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):  # NumPy ints too
            raise TypeError(f"{op}: {name} must hold ints; got {values!r}")
        index = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"{op}: {name} must be a non-empty 1-D index; got shape {tuple(index.shape)}")
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(f"{op}: {name} holds {bad}, out of range: expected indices in [0, {dim_name}) = [0, {size})")
    if torch.unique(index).numel() != index.numel():
        values, counts = torch.unique(index, return_counts=True)
        raise ValueError(f"{op}: {name} has duplicate indices {values[counts > 1].tolist()}; "
                         "a repeated row or column makes the intersection singular")
    return index


def _select(method: str, count: int, length: int, vectors: Optional[torch.Tensor], work: torch.Tensor,
            generator) -> torch.Tensor:
    """``count`` of ``length`` indices per matrix by ``method``; ``vectors [..., k, length]``
    are the leading singular vectors of that side as rows (None for "uniform")."""
    batch = work.shape[:-2]
    if method == "uniform":
        # (torch.ones, not work.new_ones: that takes a sparse A's layout)
        return _sample(torch.ones(*batch, length, dtype=work.dtype, device=work.device), count, generator)
    if method == "leverage":
        return _sample(vectors.square().sum(-2), count, generator)
    if batch.numel() == 0:  # an empty batch: shapes only
        return torch.empty(*batch, count, dtype=torch.long, device=work.device)
    return _pivoted_columns(vectors[..., :count, :], count)


def _take(A: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """The rows (``dim=-2``) or columns (``dim=-1``) ``index`` of ``A``, dense; ``index`` 1-D
    (shared) or ``[..., count]`` (one per matrix of the batch)."""
    if A.layout != torch.strided:  # 2-D sparse: torch's index_select keeps it sparse, then densify the slice
        coo = A.to_sparse_coo() if A.layout != torch.sparse_coo else A
        return coo.index_select(dim % 2, index.reshape(-1)).to_dense()
    if index.dim() == 1:
        return A.index_select(dim, index)
    if dim == -1:
        return A.gather(-1, index.unsqueeze(-2).expand(*A.shape[:-1], index.shape[-1]))
    return A.gather(-2, index.unsqueeze(-1).expand(*A.shape[:-2], index.shape[-1], A.shape[-1]))


def _count(op: str, name: str, value, default: int, rank: Optional[int], size: int, dim_name: str) -> int:
    if value is None:
        return min(default, size)
    if not is_integer(value) or not 1 <= value <= size:
        raise ValueError(f"{op}: {name} must be an int in [1, {dim_name}] = [1, {size}]; got {value!r}")
    if rank is not None and value < rank:
        raise ValueError(f"{op}: {name} = {value} is below rank = {rank}; expected {name} >= rank "
                         "(fewer rows or columns than the rank cannot capture it)")
    return int(value)


def cur(
    A: torch.Tensor,
    rank: Optional[int] = None,
    *,
    rows: Union[torch.Tensor, Sequence[int], None] = None,
    cols: Union[torch.Tensor, Sequence[int], None] = None,
    n_rows: Optional[int] = None,
    n_cols: Optional[int] = None,
    method: str = "leverage",
    u: str = "intersection",
    rcond: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    check_finite: Optional[bool] = None,
) -> CURResult:
    """CUR decomposition ``A ~= C U R`` from rows and columns of A (module docstring).

    Parameters
    ----------
    A : Tensor[..., m, n]
        float32 or float64 (float16 / bfloat16 are computed, and returned, in float32).
        Leading dimensions are a batch (each matrix gets its own sampled indices).  A
        2-D sparse matrix (COO, CSR, CSC) is supported: rsvd reads it through products,
        the selected rows and columns are densified (``C``, ``R``), nothing else is.
    rank : int, optional
        Target rank ``k``, ``1 <= k <= min(m, n)``: the rank of the leverage scores and of
        the pivoting basis, and the truncation rank of the pseudo-inverses (``U`` has
        rank at most ``k``).  Needed when indices are sampled; optional when ``rows`` and
        ``cols`` are both given (then no rank truncation beyond ``rcond``).
    rows, cols : 1-D integer tensor or sequence of ints, optional
        Given indices (ANNCUR's anchors): kept in the given order (the rows of ``R`` and
        columns of ``C`` follow it), distinct, in ``[0, m)`` and ``[0, n)``; shared by the
        whole batch.  The one not given is selected by ``method``.  Checking them reads
        them on the host (one synchronization on CUDA).
    n_rows, n_cols : int, optional
        Number of rows / columns to select, ``rank <= n <= m`` (``n``).  Default
        ``min(4 rank, m)`` (``min(4 rank, n)``): with ``rank`` picks, leverage sampling
        misses part of the dominant subspace often enough to cost several times the
        optimal error; 4x oversampling keeps it within a small factor (Notes).
    method : {"leverage", "uniform", "pivoted"}
        Index selection (module docstring).  The random draws (rsvd's test matrix, the
        sampling) come from ``generator``: same generator state, same indices.
    u : {"intersection", "projection"}
        The core: ``pinv(A[I, J])`` (ANNCUR's; no pass over A beyond the rows and columns)
        or ``pinv(C) A pinv(R)`` (Frobenius-optimal for C and R; one pass over A,
        ``O(m n min(r, c))`` flops).
    rcond : float, optional
        Relative truncation of the pseudo-inverses: singular values ``<= rcond sigma_1``
        are dropped.  Default: for the intersection ``eps * max(p, q)`` of the matrix
        inverted ``[p, q]`` in the compute dtype (numpy's and torch's ``pinv`` default
        ``rtol``); for the projection ``sqrt(eps) / 8`` (:data:`_PROJECTION_RCOND`).
    generator : torch.Generator, optional
        On A's device.
    check_finite : bool, optional
        Raise on NaN/inf in A; default True on the CPU, False on CUDA (a host sync).

    Returns
    -------
    CURResult (C, U, R, row_index, col_index)
        ``C [..., m, c]``, ``U [..., c, r]``, ``R [..., r, n]`` in A's dtype (float32 for
        half types); ``row_index [..., r]`` and ``col_index [..., c]`` int64 (1-D when
        given, one row per matrix of the batch when selected; selected ones ascending).
        ``result.reconstruct()`` forms ``C @ U @ R``.  Not differentiable (indices are
        discrete; the factors are computed without autograd).

    Notes
    -----
    Accuracy, ``||A - C U R||_F`` over the optimal rank-k error ``||A - A_k||_F``
    (tests/test_cur.py: 300 x 200 float64, ``sigma_i = i^-1`` and ``i^-2``, k = 10, seeds
    0-4, intersection core): leverage 1.20-1.24 with the default 4k picks, 1.48-1.92 with
    2k, 5-240 with k; pivoted 1.16-1.23 (4k), 1.32-1.56 (2k), 1.9-3.0 (k); uniform 1.26-1.36
    (4k).  The projection core is never worse there (0.27-0.92 at 4k: its rank is up to
    4k).  In float32, spectra steeper than about ``i^-3`` are past the resolution of float32
    ``C`` and ``R``: 1000 x 800, ``i^-3``, k = 60: 5.9x the optimal for the intersection
    core, 7.9x for the projection (float64 1.26x / 0.11x).
    bench/bench_cur.py, 2048 x 1024, ``sigma_i = 1 / i``, k = 32, float32: 1.29 for the
    default; ANNCUR's untruncated ``pinv`` on the same 128 + 128 anchors: 11.0, as this
    function with ``rows``, ``cols`` and no ``rank`` -- pass ``rank`` with given anchors to
    truncate the intersection's pseudo-inverse at that rank.

    Cost: a rank-k rsvd (``"leverage"``; none for ``"uniform"`` or given indices), then
    gathering ``m c + r n`` entries, an SVD of the ``[r, c]`` intersection and ``O((m + n) r
    c)`` flops; ``u="projection"`` adds SVDs of ``C`` and ``R`` and ``2 m n min(r, c)``
    flops.  ``"pivoted"`` runs rsvd at rank ``max(r, c)`` and a pivoting loop of ``max(r,
    c)`` steps of ``O(max(r, c) (m + n))`` flops each (bench/bench_cur.py, one thread on a
    busy 2-core Xeon, 2048 x 1024 float32, k = 32: leverage 31-46 ms, leverage +
    projection 47-74 ms, pivoted 110 ms; rsvd alone 52 ms at rank 32, 114 at rank 128).
    """
    op = "cur"
    refuse_transforms(op, "the rows and columns are selected from the values (not differentiable); pass the "
                          "matrices as a batch [..., m, n], outside the transform")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A must be a tensor; got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"{op}: A has shape {tuple(A.shape)}; expected [..., m, n] with at least 2 dimensions")
    if A.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: A has dtype {A.dtype}; expected float32, float64, float16 or bfloat16")
    if A.layout != torch.strided and A.dim() != 2:
        raise ValueError(f"{op}: A is a {A.layout} tensor of shape {tuple(A.shape)}; expected a 2-D matrix "
                         "(batches of sparse matrices are not supported)")
    check_sparse_invariants(op, "A", A)
    if method not in _METHODS:
        raise ValueError(f"{op}: method must be one of {_METHODS}; got {method!r}")
    if u not in _CORES:
        raise ValueError(f"{op}: u must be one of {_CORES}; got {u!r}")
    m, n = A.shape[-2:]
    sampled = rows is None or cols is None
    if rank is not None or sampled:
        if not is_integer(rank) or not 1 <= rank <= min(m, n):
            need = "" if rank is not None else " (needed to select rows or columns: rows and cols not both given)"
            raise ValueError(f"{op}: rank must be an int in [1, min(m, n)] = [1, {min(m, n)}]{need}; got {rank!r}")
        rank = int(rank)
    if rcond is not None and (not is_real_number(rcond)
                              or not 0 <= rcond < 1):
        raise ValueError(f"{op}: rcond must be a number in [0, 1); got {rcond!r}")
    if sampled and method != "pivoted" and max(m if rows is None else 0, n if cols is None else 0) > _MAX_CATEGORIES:
        raise ValueError(f"{op}: method={method!r} samples with torch.multinomial, which takes at most 2^24 "
                         f"categories; A has shape {tuple(A.shape)}: use method='pivoted' or give rows / cols")
    row_index = None if rows is None else _as_index(op, "rows", rows, m, "m", A.device)
    col_index = None if cols is None else _as_index(op, "cols", cols, n, "n", A.device)
    default = _OVERSAMPLING * rank if rank is not None else 0
    if row_index is None:
        r = _count(op, "n_rows", n_rows, default, rank, m, "m")
    elif n_rows is not None and n_rows != row_index.numel():
        raise ValueError(f"{op}: n_rows = {n_rows} but rows holds {row_index.numel()} indices")
    if col_index is None:
        c = _count(op, "n_cols", n_cols, default, rank, n, "n")
    elif n_cols is not None and n_cols != col_index.numel():
        raise ValueError(f"{op}: n_cols = {n_cols} but cols holds {col_index.numel()} indices")
    require_generator(op, "generator", generator, A.device, "A")
    if check_finite is None:
        check_finite = A.device.type == "cpu"
    if check_finite and not all_finite(A):
        raise ValueError(f"{op}: A contains NaN or infinite values")

    work = A.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    batch = work.shape[:-2]
    with torch.no_grad(), without_autocast(A.device):
        if sampled and method != "uniform":
            size = rank if method == "leverage" else max(r if row_index is None else 0, c if col_index is None else 0)
            size = min(size, m, n)
            if batch.numel() == 0:  # an empty batch: shapes only
                U_k = work.new_empty(*batch, m, size)
                Vh_k = work.new_empty(*batch, size, n)
            else:
                U_k, _, Vh_k = rsvd(work, size, generator=generator, check_finite=False)
        # Rows read U_k (rows of A), columns Vh_k: the same selection on either factor,
        # given as [..., k, length] (the singular vectors as rows).
        if row_index is None:
            row_index = _select(method, r, m, None if method == "uniform" else U_k.transpose(-2, -1), work, generator)
        if col_index is None:
            col_index = _select(method, c, n, None if method == "uniform" else Vh_k, work, generator)
        C = _take(work, col_index, -1)
        R = _take(work, row_index, -2)
        eps = torch.finfo(work.dtype).eps
        if u == "intersection":
            W = _take(C, row_index, -2)  # [..., r, c]
            core = _pinv(W, eps * max(W.shape[-2:]) if rcond is None else rcond, rank)
        else:
            # No rank truncation here: the full pseudo-inverses give the optimal core for C, R.
            cut = _PROJECTION_RCOND * eps ** 0.5 if rcond is None else rcond
            pinv_C = _pinv(C, cut, None)  # [..., c, m]
            pinv_R = _pinv(R, cut, None)  # [..., n, r]
            if work.layout == torch.strided:
                core = (pinv_C @ work) @ pinv_R
            else:  # (A^T pinv_C^T)^T: the sparse operand on the left
                core = (work.transpose(0, 1) @ pinv_C.transpose(-2, -1)).transpose(-2, -1) @ pinv_R
    return CURResult(C, core, R, row_index, col_index)

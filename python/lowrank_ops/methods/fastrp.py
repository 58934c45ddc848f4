"""FastRP node embeddings: very sparse random projection of powers of the transition matrix.

Chen, Sultan, Tian, Chen and Skiena, "Fast and Accurate Network Embeddings via Very
Sparse Random Projection" (CIKM 2019), ALGORITHMS.md section 8.

Algorithm 1 of the paper, for a graph of ``n`` nodes with (weighted) adjacency ``S``:

1. ``R [n, d]``: a very sparse random projection (Li, Hastie and Church 2006), entries
   i.i.d. ``sqrt(s) * {+1 w.p. 1/(2s), 0 w.p. 1 - 1/s, -1 w.p. 1/(2s)}``, ``s = sqrt(n)``
   by default (``s = 1`` or ``3``: Achlioptas' database-friendly projections).  Every
   entry has mean 0 and variance 1, so ``E[R R^T] = d I_n``.
2. ``A = D^-1 S`` (the random-walk transition matrix; ``D = diag(d_1, ..., d_n)``, the
   weighted out-degrees), ``L = diag((d_j / 2m)^beta)`` (``2m = sum_j d_j``; ``beta`` the
   normalization strength: a Tukey power transform of the node degrees, ``beta < 0``
   down-weights the contribution of high-degree nodes).
3. ``N_1 = A L R``, ``N_i = A N_{i-1}`` for ``i = 2 .. k``.
4. ``N = alpha_1 N_1 + ... + alpha_k N_k`` (``k = len(weights)``).

With ``normalize=True`` (default) every ``N_i`` has its rows scaled to unit L2 norm before
the weighted sum, as the authors' code does with its ``normalization`` flag (their code
standardizes the columns of N at the end too; that is left to the caller: it is not in
Algorithm 1 and it makes embeddings depend on the whole node set).  With row
normalization the ``(2m)^-beta`` factor of L cancels; without it, it is a global scale.

Nodes of degree 0 (no stored entry with a positive weight in their row) have a zero row
in A and the weight 0 in L (instead of ``0^beta``, infinite for ``beta < 0``): they
contribute nothing, and their embedding row is exactly 0 (the row normalization leaves a
zero row at zero; no NaN).  Degrees are row sums: for a directed graph, out-degrees.

Cost: ``k`` sparse-dense products ``[n, n] x [n, d]`` (``2 nnz d`` flops each) with the
library's CSR SpMM kernel (``torch.ops.lowrank_ops.csr_spmm``, CPU and CUDA), in a
``[d, n]`` layout (each product writes a ``[d, n]`` block that the next one reads in place);
A is never densified; R is drawn sparsely (only its about ``n d / s`` non-zero entries:
geometric gaps between them, so the draw is O(nnz(R)), not O(n d)).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .._args import require_finite_number, require_generator, require_int, require_number
from .._csr import check_sparse_invariants, quiet_sparse_csr_beta

__all__ = ["fastrp", "sparse_random_projection", "DEFAULT_WEIGHTS"]

#: The weights of the powers A^1 .. A^4 used by default (alpha_1 = alpha_2 = 0: the first
#: two powers are too local; A^4 weighted most, as in the tuned settings of the paper).
DEFAULT_WEIGHTS: Tuple[float, ...] = (0.0, 0.0, 1.0, 6.0)

_INT32_MAX = 2**31 - 1
_FLOAT_DTYPES = (torch.float32, torch.float64)


def sparse_random_projection(
    n: int,
    dim: int,
    *,
    s: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """A very sparse random projection matrix ``R [n, dim]`` as a coalesced sparse COO tensor.

    Entries i.i.d. ``sqrt(s) * {+1 w.p. 1/(2s), 0 w.p. 1 - 1/s, -1 w.p. 1/(2s)}`` (Li,
    Hastie and Church 2006): mean 0, variance 1, so ``E[R R^T] = dim * I_n`` and
    ``E[R^T R] = n * I_dim``.  Only the non-zero entries are drawn: the gaps between
    consecutive non-zero positions (row-major) are geometric with success probability
    ``1/s``, which gives exactly i.i.d. Bernoulli(1/s) positions in O(nnz) work.

    Parameters
    ----------
    n, dim : int
        Shape (``n >= 0``, ``dim >= 1``).
    s : float, optional
        Sparsity parameter, ``>= 1`` (finite); default ``sqrt(n)`` (at least 1).  ``s = 1``:
        dense ``+-1``; ``s = 3``: Achlioptas' projection.
    generator : torch.Generator, optional
        Source of randomness (on ``device``); the result is a function of its state.
    dtype : torch.dtype
        float32 (default) or float64.
    device : torch.device or str, optional
        Default: the CPU.

    Returns
    -------
    Tensor[n, dim], sparse COO, coalesced (indices sorted row-major).
    """
    where = "sparse_random_projection"
    n = require_int(where, "n", n, minimum=0)
    dim = require_int(where, "dim", dim)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype must be torch.float32 or torch.float64; got {dtype}")
    s = _sparsity(where, s, n)
    device = torch.device("cpu") if device is None else torch.device(device)
    require_generator(where, "generator", generator, device, "the projection")  # (torch's geometric_ error before)
    positions = _bernoulli_positions(n * dim, 1.0 / s, generator, device)
    signs = torch.randint(0, 2, (positions.numel(),), generator=generator, device=device).to(dtype)
    values = (signs * 2 - 1) * math.sqrt(s)
    indices = torch.stack((torch.div(positions, dim, rounding_mode="floor"), positions % dim))
    return torch.sparse_coo_tensor(indices, values, (n, dim), is_coalesced=True, check_invariants=False)


def _sparsity(where: str, s, n: int) -> float:
    if s is None:
        return max(1.0, math.sqrt(n))
    return require_number(where, "s", s, 1.0)


def _bernoulli_positions(total: int, p: float, generator, device) -> torch.Tensor:
    """The sorted positions in ``[0, total)`` of i.i.d. Bernoulli(p) successes (int64)."""
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if p >= 1.0:
        return torch.arange(total, device=device)
    expected = total * p
    # Gaps drawn in chunks: the first one covers the whole range with probability about
    # 1 - 1e-9 (6 standard deviations above the expected count), more are drawn if not.
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    pieces, last = [], -1
    while True:
        # float64 gaps: exact integers up to 2^53, far above any tensor's element count.
        gaps = torch.empty(chunk, dtype=torch.float64, device=device).geometric_(p, generator=generator)
        positions = last + torch.cumsum(gaps, 0).to(torch.int64)
        pieces.append(positions)
        last = int(positions[-1])
        if last >= total:
            break
    positions = torch.cat(pieces)
    return positions[positions < total]


def _as_csr(where: str, adjacency, dtype: Optional[torch.dtype]):
    """``(row_ptr, col_idx, values, n)`` of a square adjacency matrix, on its device, in the
    result dtype (int32 indices when they fit); checks shape, finiteness and signs."""
    if isinstance(adjacency, torch.Tensor):
        source_dtype = adjacency.dtype
        if adjacency.dim() != 2:
            raise ValueError(f"{where}: adjacency must be 2-D [n, n]; got shape {tuple(adjacency.shape)}")
        check_sparse_invariants(where, "adjacency", adjacency)  # (torch's conversions and products trust them)
        if adjacency.layout == torch.strided:
            with quiet_sparse_csr_beta():
                csr = adjacency.to_sparse_csr()  # the stored entries of a dense matrix: its non-zeros
        elif adjacency.layout == torch.sparse_coo:
            with quiet_sparse_csr_beta():
                csr = adjacency.coalesce().to_sparse_csr()  # duplicates summed
        elif adjacency.layout == torch.sparse_csr:
            csr = adjacency
        else:
            raise TypeError(f"{where}: adjacency must be a dense, sparse COO or sparse CSR tensor; "
                            f"got layout {adjacency.layout}")
        row_ptr, col_idx, values = csr.crow_indices(), csr.col_indices(), csr.values()
    elif hasattr(adjacency, "tocsr") and hasattr(adjacency, "shape"):  # scipy.sparse matrix or array
        scipy_csr = adjacency.tocsr()
        if not scipy_csr.has_canonical_format:
            scipy_csr = scipy_csr.copy()  # tocsr() may return the caller's matrix: not summed in place
            scipy_csr.sum_duplicates()
        if np.iscomplexobj(scipy_csr.data):
            raise TypeError(f"{where}: adjacency must be real; got a complex scipy matrix ({scipy_csr.dtype})")
        source_dtype = torch.float64 if scipy_csr.dtype == np.float64 else torch.float32
        row_ptr = torch.from_numpy(np.asarray(scipy_csr.indptr, dtype=np.int64))
        col_idx = torch.from_numpy(np.asarray(scipy_csr.indices, dtype=np.int64))
        values = torch.from_numpy(np.asarray(scipy_csr.data, dtype=np.float64))
        shape = scipy_csr.shape
        if len(shape) != 2:
            raise ValueError(f"{where}: adjacency must be 2-D [n, n]; got shape {tuple(shape)}")
    else:
        raise TypeError(f"{where}: adjacency must be a torch tensor (dense, sparse COO or CSR) or a scipy.sparse "
                        f"matrix; got {type(adjacency).__name__}")
    shape = (row_ptr.numel() - 1, int(adjacency.shape[1]))
    if shape[0] != shape[1]:
        raise ValueError(f"{where}: adjacency must be square [n, n]; got shape {shape}")
    if values.is_complex():
        raise TypeError(f"{where}: adjacency must be real; got dtype {values.dtype}")
    if dtype is None:
        dtype = source_dtype if source_dtype in _FLOAT_DTYPES else torch.float32
    elif dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype must be torch.float32 or torch.float64; got {dtype}")
    values = values.to(dtype)
    if values.numel():
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{where}: adjacency has non-finite entries")
        low = float(values.min())
        if low < 0:
            raise ValueError(f"{where}: adjacency must have non-negative weights (a random walk's transition "
                             f"probabilities); got a minimum of {low}")
    index_dtype = torch.int32 if max(shape[0], col_idx.numel()) <= _INT32_MAX else torch.int64
    return row_ptr.to(index_dtype), col_idx.to(index_dtype), values, shape[0]


def _check_weights(where: str, weights) -> Tuple[float, ...]:
    try:
        weights = tuple(weights)
    except TypeError:
        raise TypeError(f"{where}: weights must be a sequence of numbers (alpha_1, ..., alpha_k); "
                        f"got {type(weights).__name__}") from None
    if not weights:
        raise ValueError(f"{where}: weights must hold at least one number (alpha_1, ..., alpha_k); got ()")
    return tuple(require_finite_number(where, f"weights[{i}]", float(w) if isinstance(w, np.floating) else w)
                 for i, w in enumerate(weights))


def _projection_columns(where: str, projection, n: int, dim: int, dtype, device) -> Tuple[torch.Tensor, ...]:
    """``(rows, cols, values)`` of the stored entries of a user's ``projection [n, dim]``."""
    if not isinstance(projection, torch.Tensor):
        raise TypeError(f"{where}: projection must be a tensor [n, dim]; got {type(projection).__name__}")
    if tuple(projection.shape) != (n, dim):
        raise ValueError(f"{where}: projection has shape {tuple(projection.shape)}; expected (n, dim) = ({n}, {dim})")
    if projection.device != device:
        raise ValueError(f"{where}: projection is on {projection.device}; expected {device} (the adjacency's device)")
    if projection.layout == torch.strided:
        projection = projection.to_sparse()
    elif projection.layout != torch.sparse_coo:
        projection = projection.to_sparse_coo()
    projection = projection.coalesce()
    values = projection.values().to(dtype)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: projection has non-finite entries")
    rows, cols = projection.indices()
    return rows, cols, values


def fastrp(
    adjacency,
    dim: int,
    *,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    beta: float = 0.0,
    s: Optional[float] = None,
    normalize: bool = True,
    projection: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """FastRP node embeddings (Chen et al., CIKM 2019, Algorithm 1; see the module docstring).

    ``N = sum_i alpha_i N_i`` with ``N_1 = A L R``, ``N_i = A N_{i-1}``, ``A = D^-1 S``,
    ``L = diag((d_j / 2m)^beta)`` and ``R`` a very sparse random projection; each ``N_i``
    with unit-norm rows when ``normalize``.

    Parameters
    ----------
    adjacency : Tensor[n, n] (dense, sparse COO or sparse CSR) or scipy.sparse matrix
        The graph's (weighted) adjacency S: finite, non-negative weights; a COO tensor or
        scipy matrix has its duplicate entries summed.  Row i lists the edges out of node
        i (for an undirected graph, store both directions).  The result is on its device.
    dim : int
        Embedding dimension d (``>= 1``).
    weights : sequence of float
        ``(alpha_1, ..., alpha_k)``, finite, at least one: the weights of ``A^1 .. A^k``
        (``k`` products); default ``(0, 0, 1, 6)``.
    beta : float
        Normalization strength (finite): the power of the degrees in L; 0 (default) leaves
        R unweighted; the paper tunes it in ``[-1, 0]``.
    s : float, optional
        Sparsity of R (``>= 1``); default ``sqrt(n)``.  Ignored with ``projection``.
    normalize : bool
        Scale every row of every ``N_i`` to unit L2 norm before the weighted sum
        (default True).  Zero rows stay zero.
    projection : Tensor[n, dim], optional
        Use this R (dense or sparse COO / CSR, on the adjacency's device) instead of
        drawing one: e.g. the same R for several graphs, or for a reference computation.
    generator : torch.Generator, optional
        Draws R (on the adjacency's device); the result is a function of its state.
        Ignored with ``projection``.
    dtype : torch.dtype, optional
        float32 or float64; default the adjacency's dtype when it is one of those, else
        float32 (a scipy matrix: float64 data gives float64).

    Returns
    -------
    Tensor[n, dim]
        The embeddings, one row per node, contiguous; rows of nodes of degree 0 are 0.

    Raises
    ------
    TypeError
        adjacency of another type or layout, complex, a dtype not float32 / float64,
        weights not a sequence of numbers, beta not a number, normalize not a bool,
        projection not a tensor.
    ValueError
        adjacency not 2-D square, with non-finite or negative weights; dim < 1; weights
        empty or not finite; beta not finite; s < 1; projection of another shape or
        device, or non-finite.
    """
    where = "fastrp"
    dim = require_int(where, "dim", dim)
    weights = _check_weights(where, weights)
    beta = require_finite_number(where, "beta", float(beta) if isinstance(beta, np.floating) else beta)
    if not isinstance(normalize, bool):
        raise TypeError(f"{where}: normalize must be a bool; got {type(normalize).__name__}")
    row_ptr, col_idx, values, n = _as_csr(where, adjacency, dtype)
    dtype, device = values.dtype, values.device
    if projection is None:
        s = _sparsity(where, s, n)  # checked before the draw: a bad s fails fast
    if n == 0:
        return torch.zeros(0, dim, dtype=dtype, device=device)

    # Degrees (row sums) and the transition matrix A = D^-1 S, in CSR (S's pattern).
    entry_rows = torch.repeat_interleave(torch.arange(n, device=device), row_ptr[1:] - row_ptr[:-1],
                                         output_size=values.numel())
    # In float64, on the weights divided by the largest one (A and L do not change): in the
    # weights' own dtype, degrees of float32 weights of 1e38 overflowed (all-zero embeddings),
    # and subnormal weights' reciprocals did (NaN); (d / 2m)^beta of a huge total too.
    work = values.to(torch.float64)
    largest = work.abs().max() if work.numel() else work.new_ones(())
    work = work / torch.where((largest > 0) & (largest < float("inf")), largest, 1.0)
    degree = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, entry_rows, work)
    has_edges = degree > 0
    inv_degree = torch.where(has_edges, degree.reciprocal(), torch.zeros_like(degree))
    transition = (work * inv_degree[entry_rows]).to(dtype)
    total = degree.sum()
    # L_j = (d_j / 2m)^beta for d_j > 0, 0 for degree-0 nodes (see the module docstring).
    safe_share = torch.where(has_edges, degree / torch.clamp(total, min=torch.finfo(torch.float64).tiny),
                             torch.ones_like(degree))
    degree_weight = torch.where(has_edges, safe_share.pow(beta), torch.zeros_like(degree)).to(dtype)

    if projection is None:
        R = sparse_random_projection(n, dim, s=s, generator=generator, dtype=dtype, device=device)
        rows, cols = R.indices()
        r_values = R.values()
    else:
        rows, cols, r_values = _projection_columns(where, projection, n, dim, dtype, device)
    # (L R)^T as a dense [dim, n] block: the SpMM's layout (out[b, i] = sum_j A_ij x[b, j]).
    block = torch.zeros(dim, n, dtype=dtype, device=device)
    block.index_put_((cols, rows), r_values * degree_weight[rows], accumulate=True)

    spmm = torch.ops.lowrank_ops.csr_spmm  # registered by lowrank_ops.ops.sparse (imported with the package)
    result = None  # [dim, n]; the first weighted term initializes it (no zero fill of n * dim)
    for alpha in weights:
        block = spmm(row_ptr, col_idx, transition, None, block, n)  # N_i^T = (A N_{i-1})^T
        if alpha == 0.0:
            continue
        if normalize:
            norms = torch.linalg.vector_norm(block, dim=0)  # the row norms of N_i
            scale = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms)) * alpha
            result = block * scale if result is None else result.addcmul_(block, scale)
        else:
            result = block * alpha if result is None else result.add_(block, alpha=alpha)
    if result is None:  # every weight 0
        return torch.zeros(n, dim, dtype=dtype, device=device)
    return result.t().contiguous()

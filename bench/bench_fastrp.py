"""Benchmarks of FastRP node embeddings (:func:`lowrank_ops.methods.fastrp.fastrp`, ALGORITHMS.md section 8).

One op, ``fastrp``: embeddings of a random undirected graph (``n`` nodes, about ``deg``
edges per node, unit weights, drawn once from a fixed seed) with the defaults
(``weights = (0, 0, 1, 6)``: four products ``[n, n] x [n, dim]``, each power's rows
L2-normalized), ``beta = -0.5``, ``s = sqrt(n)``, float32.  Every impl uses the same R (the
one ``fastrp`` draws from the benchmark's seed):

* ``ours``: ``fastrp(A, dim, generator=...)`` on a torch CSR adjacency, the whole call
  timed (R drawn sparsely inside, the library's CSR SpMM in a ``[dim, n]`` layout).
* ``scipy``: the same algorithm in NumPy / scipy.sparse, the usual CPU reference (the
  authors' code is scipy): ``M = diag(1/deg) A`` (CSR), ``N_1 = M (L R)``, ``N_i = M
  N_{i-1}`` with dense ``[n, dim]`` blocks, rows normalized, weighted sum.  scipy's CSR
  times dense runs on one thread.
* ``scipy_sparse_chain``: the authors' structure (github.com/GTmac/FastRP, ``fastrp.py``):
  R kept sparse, so ``M @ R`` and the following powers are sparse-sparse products whose
  fill grows with each power, densified only at the merge.
* ``torch_csr``: the same algorithm with torch's CSR ``@`` ([n, dim] layout).

The error column is ``max |N - N_ref| / max |N_ref|`` against the float64 scipy computation
with the same R.  Flops: ``2 nnz dim`` per product; bytes: one read of A's values and
column indices and one write of the ``[n, dim]`` block per product (nominal, the same for
every impl: the GFLOP/s column only compares times).
"""
from __future__ import annotations

import functools
from typing import List

import numpy as np
import pytest
import torch

from lowrank_ops.methods.fastrp import DEFAULT_WEIGHTS, fastrp, sparse_random_projection

from _harness import DEVICES, FULL, Case, measure, params, rel_error, require_device

FAMILY = "fastrp"
SEED = 0
BETA = -0.5
# (n, average degree, dim)
_PROBLEMS = [(100_000, 10, 128), (1_000_000, 10, 128)] if FULL else [(100_000, 10, 128)]
_IMPLS = ("ours", "scipy", "scipy_sparse_chain", "torch_csr")


def _cases() -> List[Case]:
    return [Case(FAMILY, "fastrp", impl, device, "float32", f"n={n} deg={deg} dim={dim}", (n, deg, dim))
            for device in DEVICES for n, deg, dim in _PROBLEMS for impl in _IMPLS]


@functools.lru_cache(maxsize=1)
def _graph(n: int, deg: int):
    """A random undirected graph as a scipy CSR matrix (float64): ``n deg / 2`` random pairs,
    both directions stored, self-loops dropped, repeated pairs summed."""
    import scipy.sparse

    rng = np.random.default_rng(SEED)
    pairs = n * deg // 2
    rows, cols = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    A = scipy.sparse.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    A = (A + A.T).tocsr()
    A.sum_duplicates()
    return A


@functools.lru_cache(maxsize=1)
def _projection(n: int, dim: int):
    """The R ``fastrp`` draws from ``SEED`` (float64 sparse COO)."""
    return sparse_random_projection(n, dim, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)


def _scipy_fastrp(A, R, dtype, weights=DEFAULT_WEIGHTS, beta=BETA, dense_blocks=True):
    """FastRP (Algorithm 1) with NumPy / scipy.sparse; ``R`` a scipy sparse ``[n, dim]``."""
    import scipy.sparse

    degree = np.asarray(A.sum(axis=1)).ravel()
    inv = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
    M = (scipy.sparse.diags(inv) @ A).tocsr().astype(dtype)
    share = np.divide(degree, degree.sum(), out=np.ones_like(degree), where=degree > 0)
    L = np.where(degree > 0, share ** beta, 0.0)
    LR = (scipy.sparse.diags(L) @ R).tocsr().astype(dtype)
    block = LR.toarray() if dense_blocks else LR
    out = None
    for alpha in weights:
        block = M @ block
        if alpha == 0.0:
            continue
        dense = block if dense_blocks else block.toarray()
        norms = np.linalg.norm(dense, axis=1, keepdims=True)
        term = np.divide(dense, norms, out=np.zeros_like(dense), where=norms > 0) * dtype(alpha)
        out = term if out is None else out + term
    return out


@functools.lru_cache(maxsize=1)
def _reference(n: int, deg: int, dim: int) -> torch.Tensor:
    R = _projection(n, dim)
    import scipy.sparse

    indices = R.indices().numpy()
    R_scipy = scipy.sparse.csr_matrix((R.values().numpy(), (indices[0], indices[1])), shape=(n, dim))
    return torch.from_numpy(_scipy_fastrp(_graph(n, deg), R_scipy, np.float64))


def _torch_csr_fastrp(P: torch.Tensor, LR: torch.Tensor, weights=DEFAULT_WEIGHTS) -> torch.Tensor:
    block, out = LR, torch.zeros_like(LR)
    for alpha in weights:
        block = P @ block
        if alpha == 0.0:
            continue
        norms = block.norm(dim=1, keepdim=True)
        out += torch.where(norms > 0, block / norms, torch.zeros_like(block)) * alpha
    return out


@pytest.mark.parametrize("case", params(_cases()))
def test_fastrp(benchmark, case: Case):
    require_device(case.device)
    n, deg, dim = case.problem
    A = _graph(n, deg)
    reference = _reference(n, deg, dim)
    k = len(DEFAULT_WEIGHTS)

    def build():
        import scipy.sparse

        if case.impl == "ours":
            adjacency = torch.sparse_csr_tensor(
                torch.from_numpy(A.indptr.astype(np.int64)), torch.from_numpy(A.indices.astype(np.int64)),
                torch.from_numpy(A.data.astype(np.float32)), A.shape, check_invariants=True).to(case.device)
            if case.device != "cpu":  # a CUDA generator draws another R: pass the CPU's R (its draw untimed)
                R = _projection(n, dim).to(device=case.device, dtype=torch.float32)
                return lambda: fastrp(adjacency, dim, beta=BETA, projection=R)
            generator = torch.Generator()
            return lambda: fastrp(adjacency, dim, beta=BETA, generator=generator.manual_seed(SEED))
        if case.device != "cpu":
            raise RuntimeError("scipy and the CPU-layout peers run on the CPU only")
        R = _projection(n, dim)
        indices = R.indices().numpy()
        R_scipy = scipy.sparse.csr_matrix((R.values().numpy(), (indices[0], indices[1])), shape=(n, dim))
        if case.impl in ("scipy", "scipy_sparse_chain"):
            dense_blocks = case.impl == "scipy"
            return lambda: _scipy_fastrp(A, R_scipy, np.float32, dense_blocks=dense_blocks)
        # torch_csr: transition and L R prepared outside the timing would favour it; built inside.
        crow = torch.from_numpy(A.indptr.astype(np.int64))
        col = torch.from_numpy(A.indices.astype(np.int64))
        values = torch.from_numpy(A.data.astype(np.float32))
        R32 = R.to(torch.float32)

        def torch_csr():
            rows = torch.repeat_interleave(torch.arange(n), crow[1:] - crow[:-1])
            degree = torch.zeros(n).index_add_(0, rows, values)
            inv = torch.where(degree > 0, 1 / degree, torch.zeros_like(degree))
            P = torch.sparse_csr_tensor(crow, col, values * inv[rows], (n, n), check_invariants=True)
            share = torch.where(degree > 0, degree / degree.sum(), torch.ones_like(degree))
            L = torch.where(degree > 0, share ** BETA, torch.zeros_like(degree))
            LR = R32.to_dense() * L[:, None]
            return _torch_csr_fastrp(P, LR)
        return torch_csr

    def check(result) -> float:
        out = torch.from_numpy(np.asarray(result)) if isinstance(result, np.ndarray) else result
        return rel_error([out.cpu()], [reference])

    nnz = A.nnz
    flops = 2.0 * nnz * dim * k
    moved = k * (nnz * 8.0 + 4.0 * n * dim)
    measure(benchmark, case, build, check, flops=flops, bytes=moved)


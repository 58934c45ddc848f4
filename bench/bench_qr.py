"""Benchmarks of CholeskyQR's tall-skinny steps and of CholeskyQR2 (ALGORITHMS.md section 4).

Ops, on blocks ``Y [m, n]`` with ``m >> n`` (rsvd's bases: 4096 x 74 is rank 64 plus the
default oversampling of 10), row-major (``row``: the layout of a product ``A Z``) or
column-major (``col``: of rsvd's transposed product ``(Q^T A)^T``, and of the kernels' Q):

* ``tall_gram``: ``G = Y^T Y``.  ``ours``: :func:`lowrank_ops.ops.qr.tall_gram` (CPU
  kernel); ``torch``: ``Y.mT @ Y`` (MKL's SGEMM on CPU, cuBLAS on CUDA).
* ``tall_solve_upper``: ``Q = Y R^-1`` with R the Cholesky factor of G.  ``ours``:
  :func:`lowrank_ops.ops.qr.tall_solve_upper`; ``torch``:
  ``torch.linalg.solve_triangular(R, Y, upper=True, left=False)`` (MKL's TRSM).
* ``cholesky_qr2``: an orthonormal basis of ``range(Y)``.  ``ours``:
  :func:`lowrank_ops.linalg.cholesky_qr2` (a shifted pass and two plain ones, each a
  Gram, a Cholesky factorization and a solve; for float32 a plain float64 pass and one
  float32 pass, since stop 30); ``torch``: ``torch.linalg.qr`` (Householder,
  LAPACK's geqrf + orgqr), the orthonormalization torch.svd_lowrank uses.

Sizes: quick default 4096 x 74 (row and col), float32; ``LOWRANK_OPS_BENCH_FULL=1`` adds
4096 x 138 (rank 128), 11008 x 74 and 25600 x 74 (an embedding's rows), and float64.
Inputs: N(0, 1), fixed seed.

Error column: ``tall_gram`` and ``tall_solve_upper`` against float64 (rel_error);
``cholesky_qr2``: the larger of ``max |Q^T Q - I|`` and ``||Q R - Y||_F / ||Y||_F``.

Roofline (same for both impls): ``tall_gram`` ``m n^2`` flops (the upper triangle; a GEMM
does twice that), ``tall_solve_upper`` ``m n^2``, ``cholesky_qr2`` ``3 (2 m n^2)`` (three
passes of Gram and solve; Householder QR's ``4 m n^2 - 4 n^3 / 3`` is less); bytes: Y read
once, the result written once.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Tuple

import pytest
import torch

from lowrank_ops.linalg import cholesky_qr2
from lowrank_ops.ops.qr import tall_gram, tall_solve_upper

from _harness import DEVICES, FULL, Case, measure, params, rel_error, require_device

FAMILY = "qr"
SEED = 0
_SHAPES = [(4096, 74)] + ([(4096, 138), (11008, 74), (25600, 74)] if FULL else [])
_LAYOUTS = ("row", "col")
_DTYPES = ("float32", "float64") if FULL else ("float32",)
_IMPLS = ("ours", "torch")
_OPS = ("tall_gram", "tall_solve_upper", "cholesky_qr2")


def _label(problem: Tuple[int, int, str]) -> str:
    m, n, layout = problem
    return f"{m}x{n} {layout}"


def _cases(op: str) -> List[Case]:
    return [
        Case(FAMILY, op, impl, device, dtype, _label((m, n, layout)), (m, n, layout))
        for device in DEVICES
        for m, n in _SHAPES
        for layout in _LAYOUTS
        for dtype in _DTYPES
        for impl in _IMPLS
    ]


@functools.lru_cache(maxsize=2)
def _inputs(problem: tuple, dtype: torch.dtype, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(Y, R)``: the block in its layout and the Cholesky factor of its Gram (upper, contiguous)."""
    m, n, layout = problem
    generator = torch.Generator().manual_seed(SEED)
    Y = torch.randn(m, n, generator=generator, dtype=torch.float64)
    R = torch.linalg.cholesky(Y.mT @ Y).mT.contiguous()
    Y, R = Y.to(device=device, dtype=dtype), R.to(device=device, dtype=dtype)
    if layout == "col":
        Y = Y.mT.contiguous().mT
    return Y, R


def _build(case: Case, Y: torch.Tensor, R: torch.Tensor) -> Callable[[], Callable]:
    def build():
        ours = case.impl == "ours"
        if case.op == "tall_gram":
            return (lambda: tall_gram(Y)) if ours else (lambda: Y.mT @ Y)
        if case.op == "tall_solve_upper":
            if ours:
                return lambda: tall_solve_upper(Y, R)
            return lambda: torch.linalg.solve_triangular(R, Y, upper=True, left=False)
        return (lambda: cholesky_qr2(Y)) if ours else (lambda: tuple(torch.linalg.qr(Y)))

    return build


def _check(case: Case, Y: torch.Tensor, R: torch.Tensor) -> Callable:
    Y64, R64 = Y.double().cpu(), R.double().cpu()
    if case.op == "tall_gram":
        reference = Y64.mT @ Y64
        return lambda G: rel_error([G], [reference])
    if case.op == "tall_solve_upper":
        reference = torch.linalg.solve_triangular(R64, Y64, upper=True, left=False)
        return lambda Q: rel_error([Q], [reference])

    def qr_error(result) -> float:
        Q, Rq = (t.double().cpu() for t in result)
        orthogonality = (Q.mT @ Q - torch.eye(Q.shape[-1], dtype=torch.float64)).abs().max()
        residual = torch.linalg.matrix_norm(Q @ Rq - Y64) / torch.linalg.matrix_norm(Y64)
        return max(float(orthogonality), float(residual))

    return qr_error


def _roofline(case: Case, Y: torch.Tensor) -> Tuple[float, float]:
    m, n = Y.shape
    element = Y.element_size()
    if case.op == "tall_gram":
        return m * n * n, element * (m * n + n * n)
    if case.op == "tall_solve_upper":
        return m * n * n, element * (2 * m * n + n * n)
    return 6 * m * n * n, element * (2 * m * n + n * n)


@pytest.mark.parametrize("case", params([case for op in _OPS for case in _cases(op)]))
def test_qr(benchmark, case: Case):
    require_device(case.device)
    Y, R = _inputs(case.problem, case.torch_dtype, case.device)
    flops, moved = _roofline(case, Y)
    measure(benchmark, case, _build(case, Y, R), _check(case, Y, R), flops=flops, bytes=moved)

"""Benchmarks of the CUR decomposition (:func:`lowrank_ops.linalg.cur`, ALGORITHMS.md section 8).

One op, ``cur``: a rank-k skeleton approximation of A [m, n] (spectrum ``s_i = 1 / i``,
:func:`_harness.spectral_matrix`, float32), every impl on the same matrix in the same run:

* ``ours``: ``cur(A, k)`` with its defaults (leverage-score sampling of ``4k`` rows and
  ``4k`` columns from a rank-k rsvd, intersection core ``pinv(W)`` truncated at rank k);
  ``ours_projection``: the same indices with the core ``pinv(C) A pinv(R)`` (one more pass
  over A; its rank is up to ``4k``, so its error may fall below the optimal rank-k error);
  ``ours_pivoted`` / ``ours_pivoted_projection``: ``method="pivoted"`` (greedy pivoted QR
  of rsvd's leading right / left singular vectors, deterministic given rsvd's factors).
* ``ours_anchors``: ``cur(A, rows=I, cols=J)`` with the indices ``ours`` selected, given
  as anchors (ANNCUR's use: the selection is not timed), no rank truncation: the
  like-for-like peer of ``numpy_anncur``.
* ``numpy_anncur``: ANNCUR's ``CURApprox`` in NumPy on the same anchors: ``C = A[:, J]``,
  ``R = A[I, :]``, ``U = np.linalg.pinv(C[I])`` (numpy's default ``rcond``, no rank
  truncation), float32 as A.
* ``scipy_id``: scipy.linalg.interpolative's ``interp_decomp(A, k)`` (randomized ID of rank
  k, ``A ~= A[:, idx[:k]] P``) plus ``reconstruct_matrix_from_id``.  A different
  decomposition (k columns and an interpolation matrix, no row selection), the standard
  peer for column-subset approximations.  scipy's ID accepts only float64 / complex128:
  it runs on a float64 copy of A (the copy is made outside the timed call), so its time
  is that of double precision.

The error column is ``||A - approx||_F / ||A - A_k||_F - 1`` (``A_k`` the optimal rank-k
approximation, known from the prescribed spectrum): 0 is optimal, negative for the
projection cores of rank above k.  Flops and bytes are nominal (one pass over A: ``2 m
n k`` flops, ``4 m n`` bytes), the same for every impl: the GFLOP/s column only compares
times.
"""
from __future__ import annotations

import functools
from typing import List

import numpy as np
import pytest
import torch

from lowrank_ops.linalg import cur

from _harness import DEVICES, FULL, Case, measure, params, require_device, spectral_matrix

FAMILY = "cur"
_PROBLEMS = [(2048, 1024, 32), (8192, 4096, 64)] if FULL else [(2048, 1024, 32)]
_IMPLS = ("ours", "ours_projection", "ours_pivoted", "ours_pivoted_projection", "ours_anchors", "numpy_anncur",
          "scipy_id")
SEED = 1


def _cases() -> List[Case]:
    return [Case(FAMILY, "cur", impl, device, "float32", f"{m}x{n} k={k}", (m, n, k))
            for device in DEVICES for m, n, k in _PROBLEMS for impl in _IMPLS]


@functools.lru_cache(maxsize=2)
def _anchors(m: int, n: int, k: int, device: str):
    """The rows and columns ``cur(A, k)`` selects with the benchmark's generator seed."""
    A, _ = spectral_matrix(0, m, n, device)
    out = cur(A, k, generator=torch.Generator(device=device).manual_seed(SEED), check_finite=False)
    return out.row_index, out.col_index


def _numpy_anncur(array: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    C = array[:, cols]
    R = array[rows, :]
    U = np.linalg.pinv(C[rows, :])
    return C, U, R


@pytest.mark.parametrize("case", params(_cases()))
def test_cur(benchmark, case: Case):
    require_device(case.device)
    m, n, k = case.problem
    A, spectrum = spectral_matrix(0, m, n, case.device)
    optimal = float(spectrum[k:].square().sum().sqrt())

    def build():
        generator = torch.Generator(device=case.device)
        if case.impl.startswith("ours") and case.impl != "ours_anchors":
            method = "pivoted" if "pivoted" in case.impl else "leverage"
            u = "projection" if case.impl.endswith("projection") else "intersection"
            return lambda: cur(A, k, method=method, u=u, generator=generator.manual_seed(SEED), check_finite=False)
        rows, cols = _anchors(m, n, k, case.device)
        if case.impl == "ours_anchors":
            return lambda: cur(A, rows=rows, cols=cols, check_finite=False)
        if case.device != "cpu":
            raise RuntimeError("NumPy and scipy run on the CPU only")
        if case.impl == "numpy_anncur":
            array, I, J = A.numpy(), rows.numpy(), cols.numpy()
            return lambda: _numpy_anncur(array, I, J)
        from scipy.linalg import interpolative  # a bench extra, imported lazily

        array = A.double().numpy()  # scipy's ID takes float64 only
        rng = np.random.default_rng(SEED)

        def scipy_id():
            idx, proj = interpolative.interp_decomp(array, k, rng=rng)
            return interpolative.reconstruct_matrix_from_id(array[:, idx[:k]], idx, proj)
        return scipy_id

    def check(result) -> float:
        if isinstance(result, np.ndarray):
            approx = torch.from_numpy(result).double()
        elif isinstance(result, tuple) and isinstance(result[0], np.ndarray):
            C, U, R = (torch.from_numpy(x).double() for x in result)
            approx = C @ U @ R
        else:
            approx = result.C.double() @ result.U.double() @ result.R.double()
        error = torch.linalg.matrix_norm(A.double().cpu() - approx.cpu())
        return float(error / optimal - 1)

    measure(benchmark, case, build, check, flops=2.0 * m * n * k, bytes=4.0 * m * n)

"""Benchmarks of the Krylov family (ALGORITHMS.md section 7): SKR on PDE sequences.

One case solves a whole sequence of systems to the relative residual 1e-8, with
no preconditioner, and records the total matrix-vector products next to the wall time:

* ``ours``: SKR, greedy nearest-neighbour order + GCRO-DR(40, 10) carried through the sequence;
* ``ours_gmres``: our GMRES(40), each system from scratch;
* ``ours_unsorted``: GCRO-DR(40, 10) recycling in the given (random) order;
* ``scipy_gmres``: ``scipy.sparse.linalg.gmres(restart=40)``, each system from scratch;
* ``scipy_gcrotmk``: ``scipy.sparse.linalg.gcrotmk(m=30, k=10)`` with its recycling
  (the ``CU`` list carried between systems, ``discard_C=True`` since A changes): the
  same 30 new directions and 10 recycled ones per cycle as ours;
* ``ours_defcg``: SKR order + deflated CG (:class:`~lowrank_ops.krylov.DeflatedCG`,
  10 deflation vectors) carried through the sequence;
* ``ours_cg``: our CG, each system from scratch;
* ``scipy_cg``: ``scipy.sparse.linalg.cg``, each system from scratch.

The three CG impls need SPD matrices: Darcy is SPD, Helmholtz is indefinite (CG does not
apply), so they are recorded unsupported on Helmholtz.  On an SPD sequence plain CG is
the baseline a recycling solver has to beat: it needs about as many products as
GCRO-DR(40, 10) at a fraction of the work per product.

``max_error`` is the largest true relative residual ``||b - A x|| / ||b||`` over the
sequence (recomputed with scipy); the ``note`` gives each impl's total products and how
many systems missed the tolerance.  Sort time is included in ``ours``.  GMRES baselines
get at most 5000 iterations per system (1500 by default; restarted GMRES stagnates on
Helmholtz).

Sizes: default Darcy 32 x 32 (10 systems) and Helmholtz 20 x 20 (6 systems); FULL
(``LOWRANK_OPS_BENCH_FULL=1``): the issue's 100 Darcy systems at 64 x 64 and 128 x 128
and 100 Helmholtz systems at 64 x 64.  A case takes seconds to minutes, so it is timed
in one round after the accuracy run (its warm-up), instead of the harness's 5-round minimum
(``measure``).  ``python bench/bench_krylov.py darcy 64 100`` prints the speedup curve
(products and time of SKR against our GMRES(m) after the first N systems).
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Callable, List, Tuple

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from lowrank_ops import pde
from lowrank_ops.krylov import solve_sequence

from _harness import FULL, Case, grid_cases, params, require_device, synchronize, unsupported

FAMILY = "krylov"
SEED = 0
TOL = 1e-8
M, K = 40, 10
_GMRES_MAXITER = 5000 if FULL else 1500
_ROUNDS = 1

if FULL:
    _PROBLEMS = {"cpu": [("darcy", 64, 100), ("darcy", 128, 100), ("helmholtz", 64, 100)],
                 "cuda": [("darcy", 128, 100)]}
else:
    _PROBLEMS = {"cpu": [("darcy", 32, 10), ("helmholtz", 20, 6)], "cuda": [("darcy", 32, 10)]}
_IMPLS = {"float64": ("ours", "ours_gmres", "ours_unsorted", "scipy_gmres", "scipy_gcrotmk", "ours_defcg", "ours_cg",
                      "scipy_cg")}
_CG_IMPLS = ("ours_defcg", "ours_cg", "scipy_cg")
_SPD_FAMILIES = ("darcy", "poisson", "thermal")


def _label(problem: Tuple[str, int, int]) -> str:
    family, grid, count = problem
    return f"{family} {grid}x{grid} N={count}"


@functools.lru_cache(maxsize=1)
def _problems(problem: Tuple[str, int, int], device: str):
    family, grid, count = problem
    systems = pde.generate(family, grid, count, seed=SEED)
    for system in systems:
        system.matrix = system.matrix.to(device)
        system.rhs = system.rhs.to(device)
    return systems


def _scipy_systems(systems):
    return [(s.matrix.to_scipy(), s.rhs.cpu().numpy()) for s in systems]


class _Counted(spla.LinearOperator):
    """A scipy operator that counts its products."""

    def __init__(self, matrix):
        super().__init__(np.float64, matrix.shape)
        self.matrix, self.count = matrix, 0

    def _matvec(self, x):
        self.count += 1
        return self.matrix @ x


def _runner(impl: str, systems, device: str) -> Callable[[], Tuple[List, int, List[float]]]:
    """``run()`` solving the sequence with ``impl``: ``(solutions, total products, per-system seconds)``."""
    if impl.startswith("scipy") and device != "cpu":
        raise RuntimeError("scipy runs on the CPU only")
    if impl in _CG_IMPLS and systems[0].family not in _SPD_FAMILIES:
        raise RuntimeError(f"CG needs a symmetric positive definite matrix; {systems[0].family} is not (indefinite)")
    if impl == "ours":
        def run():
            result = solve_sequence(systems, method="gcrodr", order="skr", m=M, k=K, tol=TOL)
            return result.solutions, result.matvecs, [result.seconds[i] for i in result.order]
    elif impl == "ours_unsorted":
        def run():
            result = solve_sequence(systems, method="gcrodr", order="given", m=M, k=K, tol=TOL)
            return result.solutions, result.matvecs, result.seconds
    elif impl == "ours_gmres":
        def run():
            result = solve_sequence(systems, method="gmres", order="given", m=M, tol=TOL, maxiter=_GMRES_MAXITER)
            return result.solutions, result.matvecs, result.seconds
    elif impl == "ours_defcg":
        def run():
            result = solve_sequence(systems, method="defcg", order="skr", k=K, tol=TOL)
            return result.solutions, result.matvecs, [result.seconds[i] for i in result.order]
    elif impl == "ours_cg":
        def run():
            result = solve_sequence(systems, method="cg", order="given", tol=TOL)
            return result.solutions, result.matvecs, result.seconds
    else:
        scipy_systems = _scipy_systems(systems)

        def run():
            solutions, total, seconds, recycled = [], 0, [], []
            for A, b in scipy_systems:
                operator = _Counted(A)
                start = time.perf_counter()
                if impl == "scipy_gmres":
                    x, _ = spla.gmres(operator, b, rtol=TOL, atol=0.0, restart=M, maxiter=_GMRES_MAXITER // M)
                elif impl == "scipy_cg":
                    x, _ = spla.cg(operator, b, rtol=TOL, atol=0.0, maxiter=10 * b.size)
                else:
                    x, _ = spla.gcrotmk(operator, b, rtol=TOL, atol=0.0, m=M - K, k=K, CU=recycled, discard_C=True,
                                        maxiter=_GMRES_MAXITER // (M - K))
                seconds.append(time.perf_counter() - start)
                solutions.append(x)
                total += operator.count
            return solutions, total, seconds
    return run


def _residuals(systems, solutions) -> List[float]:
    out = []
    for (A, b), x in zip(_scipy_systems(systems), solutions):
        x = np.asarray(torch.as_tensor(x).double().cpu())
        out.append(float(np.linalg.norm(b - A @ x) / np.linalg.norm(b)))
    return out


@pytest.mark.parametrize("case", params(grid_cases(FAMILY, "solve_sequence", _PROBLEMS, _IMPLS, _label)))
def test_solve_sequence(benchmark, case: Case):
    require_device(case.device)
    systems = _problems(case.problem, case.device)
    benchmark.group = case.group
    benchmark.extra_info.update({key: getattr(case, key) for key in ("family", "op", "shape", "dtype", "impl", "device")})
    try:
        run = _runner(case.impl, systems, case.device)
    except RuntimeError as error:
        unsupported(case, error)
    # Roofline per product: one SpMV (2 nnz flops; values, indices and two vectors moved).
    nnz, n = systems[0].matrix.nnz, systems[0].rhs.numel()
    solutions, matvecs, seconds = run()
    residuals = _residuals(systems, solutions)
    missed = sum(r > TOL * (1 + 1e-6) for r in residuals)
    benchmark.extra_info.update({
        "max_error": max(residuals), "matvecs": matvecs, "missed": missed,
        "flops": 2.0 * nnz * matvecs, "bytes": (12.0 * nnz + 16.0 * n) * matvecs,
        "cumulative_seconds": np.cumsum(seconds).tolist(),
        "note": f"{matvecs} matvecs" + (f", {missed}/{len(systems)} systems missed tol {TOL:g}" if missed else ""),
    })

    def timed():
        result = run()
        synchronize(case.device)
        return result

    benchmark.pedantic(timed, rounds=_ROUNDS, warmup_rounds=0, iterations=1)


def _curve(family: str, grid: int, count: int) -> None:
    """Speedup of SKR over our GMRES(m) after the first N systems (products and time)."""
    systems = pde.generate(family, grid, count, seed=SEED)
    skr = solve_sequence(systems, method="gcrodr", order="skr", m=M, k=K, tol=TOL)
    base = solve_sequence(systems, method="gmres", order="given", m=M, tol=TOL, maxiter=_GMRES_MAXITER)
    skr_mv = np.cumsum([skr.infos[i].matvecs for i in skr.order])
    skr_s = np.cumsum([skr.seconds[i] for i in skr.order]) + skr.sort_seconds
    base_mv = np.cumsum([info.matvecs for info in base.infos])
    base_s = np.cumsum(base.seconds)
    print(f"{family} {grid}x{grid}: N, matvecs GMRES/SKR, time GMRES/SKR")
    for n in sorted({1, 2, 5} | set(range(10, count + 1, 10)) | {count}):
        if n <= count:
            print(f"{n:4d}  {base_mv[n - 1] / skr_mv[n - 1]:6.2f}x  {base_s[n - 1] / skr_s[n - 1]:6.2f}x")


if __name__ == "__main__":
    _curve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

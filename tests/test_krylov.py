"""Krylov solvers (ALGORITHMS.md section 7): GMRES, CG, GCRO-DR, SKR sequences and their kernels."""
from __future__ import annotations

import gc
import io
import re
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from lowrank_ops import pde, reference
from lowrank_ops.krylov import CSRMatrix, DeflatedCG, GCRODR, cg, gmres, greedy_order, solve_sequence
from lowrank_ops.krylov import _arnoldi, _kernels

_cg_module = sys.modules["lowrank_ops.krylov.cg"]  # the package's attribute "cg" is the function
from lowrank_ops.krylov.operators import as_operator


# ---------------------------------------------------------------------------- systems
def _laplacian(n: int) -> sp.csr_matrix:
    T = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    return (sp.kron(sp.eye(n), T) + sp.kron(T, sp.eye(n))).tocsr() * (n + 1) ** 2


def _convection_diffusion(n: int, velocity: float = 40.0) -> sp.csr_matrix:
    """Nonsymmetric: Laplacian plus first-order upwind convection in x."""
    h = 1.0 / (n + 1)
    D = sp.diags([-1.0, 1.0], [-1, 0], shape=(n, n)) / h
    return (_laplacian(n) + velocity * sp.kron(sp.eye(n), D)).tocsr()


def _system(kind: str, generator: torch.Generator):
    """(scipy CSR matrix, numpy rhs) of a small SPD, nonsymmetric or indefinite system."""
    if kind == "spd":
        A = pde.darcy(16, seed=1, index=2).matrix.to_scipy()
    elif kind == "nonsymmetric":
        A = _convection_diffusion(16)
    else:  # Helmholtz, k^2 about 100 > 2 pi^2: indefinite
        A = pde.helmholtz(16, seed=1, index=2).matrix.to_scipy()
    b = torch.randn(A.shape[0], generator=generator, dtype=torch.float64).numpy()
    return A, b


def _relative_residual(A, b, x) -> float:
    x = np.asarray(torch.as_tensor(x).double().cpu())
    return float(np.linalg.norm(b - A @ x) / np.linalg.norm(b))


def _scipy_gmres_iterations(A, b, restart: int, tol: float) -> int:
    count = [0]

    def step(_):
        count[0] += 1

    spla.gmres(A, b, rtol=tol, restart=restart, maxiter=10_000, callback=step, callback_type="pr_norm")
    return count[0]


# ---------------------------------------------------------------------------- GMRES / GCRO-DR basics
def test_gmres_iterations_match_scipy(generator):
    # Both are right-preconditioning-free restarted GMRES with the same stopping rule; the
    # counts can differ only when a residual lands within rounding of the threshold.
    A, b = _convection_diffusion(20), torch.randn(400, generator=generator, dtype=torch.float64).numpy()
    x, info = gmres(A, b, tol=1e-8, restart=20)
    assert info.converged and info.status == "converged"
    assert abs(info.iterations - _scipy_gmres_iterations(A, b, 20, 1e-8)) <= 1
    assert _relative_residual(A, b, x) <= 1e-8
    assert len(info.residuals) == info.iterations + 1
    assert info.restarts == -(-info.iterations // 20)


@pytest.mark.parametrize("solver", ["cg", "gmres", "GCRODR.solve", "DeflatedCG.solve"])
def test_torch_func_transforms_are_refused_by_name(solver):
    """Not differentiable and stopping per system: inside grad the solvers failed with
    "Sparse CSR tensors do not have strides", under vmap with "data-dependent control flow"."""
    solve = {"cg": cg, "gmres": gmres, "GCRODR.solve": GCRODR(5, 2).solve, "DeflatedCG.solve": DeflatedCG(2).solve}
    A = 3 * torch.eye(5, dtype=torch.float64) + 0.1
    b = torch.randn(2, 5, dtype=torch.float64)
    for transform, rhs in ((torch.func.vmap, b), (torch.func.grad, b[0])):
        with pytest.raises(RuntimeError, match=f"{re.escape(solver)}: torch.func transforms .* are not supported"):
            transform(lambda b: solve[solver](A, b)[0].sum())(rhs)


def test_gcrodr_k0_reproduces_gmres(generator):
    A, b = _system("nonsymmetric", generator)
    x_gmres, gmres_info = gmres(A, b, tol=1e-9, restart=15)
    x_k0, k0_info = GCRODR(15, 0).solve(A, b, tol=1e-9)
    assert k0_info.iterations == gmres_info.iterations
    assert k0_info.matvecs == gmres_info.matvecs
    assert k0_info.residuals == gmres_info.residuals
    torch.testing.assert_close(x_k0, x_gmres, rtol=0, atol=0)


def test_gmres_first_cycle_is_minimal_residual(generator):
    # After j steps GMRES minimizes ||b - A x|| over the Krylov space K_j(A, b): compare
    # the running estimates with a dense least-squares solve over an orthonormal basis.
    A, b = _system("nonsymmetric", generator)
    _, info = gmres(A, b, tol=1e-14, restart=12, maxiter=12)
    dense = A.toarray()
    basis = [b / np.linalg.norm(b)]
    for j in range(1, 13):
        Q, _ = np.linalg.qr(np.stack(basis, axis=1))
        y = np.linalg.lstsq(dense @ Q, b, rcond=None)[0]
        minimal = np.linalg.norm(b - dense @ Q @ y) / np.linalg.norm(b)
        assert info.residuals[j] == pytest.approx(minimal, rel=1e-6, abs=1e-13), j
        basis.append(dense @ Q[:, -1])


@pytest.mark.parametrize("kind", ["spd", "nonsymmetric", "indefinite"])
@pytest.mark.parametrize("solver", ["gmres", "gcrodr", "gcrodr_jacobi", "cg"])
def test_final_true_residual_meets_tolerance(kind, solver, generator):
    if solver == "cg" and kind != "spd":
        pytest.skip("CG is for SPD systems")
    A, b = _system(kind, generator)
    tol = 1e-9
    if solver == "gmres":
        x, info = gmres(A, b, tol=tol, restart=80, maxiter=20_000)  # GMRES(30) stagnates on the indefinite one
    elif solver == "cg":
        x, info = cg(A, b, tol=tol, M="jacobi")
    else:
        x, info = GCRODR(30, 8, M="jacobi" if solver.endswith("jacobi") else None).solve(A, b, tol=tol)
    assert info.converged, info.status
    assert info.true_residual <= tol
    assert _relative_residual(A, b, x) <= tol * (1 + 1e-6)  # recomputed independently (scipy)
    assert x.dtype == torch.float64 and torch.isfinite(x).all()


def test_cg_matches_direct_solve(generator):
    A, b = _system("spd", generator)
    x, info = cg(A, b, tol=1e-12)
    exact = spla.spsolve(A.tocsc(), b)
    assert info.converged
    # forward error <= cond(A) * relative residual
    bound = np.linalg.cond(A.toarray()) * 1e-12
    assert np.linalg.norm(x.numpy() - exact) / np.linalg.norm(exact) <= bound


def test_float32_and_callable_operator(generator):
    A, b = _system("spd", generator)
    matrix = CSRMatrix.from_scipy(A, torch.float32)
    x, info = gmres(matrix, torch.as_tensor(b, dtype=torch.float32), tol=1e-5, restart=40)
    assert x.dtype == torch.float32 and info.converged and _relative_residual(A, b, x) <= 2e-5

    class Operator:
        shape = A.shape

        def __call__(self, v):
            return torch.from_numpy(A @ v.numpy())

    x, info = GCRODR(30, 5).solve(Operator(), b, tol=1e-8)
    assert info.converged and _relative_residual(A, b, x) <= 1e-8


def test_inputs_accepted_as_torch_sparse_dense_and_numpy(generator):
    A, b = _system("nonsymmetric", generator)
    dense = torch.from_numpy(A.toarray())
    for operator in (dense, dense.to_sparse_csr(), dense.to_sparse(), A.toarray()):
        x, info = gmres(operator, torch.from_numpy(b), tol=1e-8, restart=30)
        assert info.converged and _relative_residual(A, b, x) <= 1e-8


# ---------------------------------------------------------------------------- recycling
def test_recycled_sequence_gives_the_independent_solutions():
    problems = pde.generate("darcy", 16, 8, seed=3)
    tol = 1e-10
    recycled = solve_sequence(problems, method="gcrodr", order="skr", m=30, k=8, tol=tol)
    independent = solve_sequence(problems, method="gmres", order="given", m=30, tol=tol)
    assert recycled.converged and independent.converged
    for problem, x_recycled, x_independent in zip(problems, recycled.solutions, independent.solutions):
        A = problem.matrix.to_scipy()
        b = problem.rhs.numpy()
        exact = spla.spsolve(A.tocsc(), b)
        bound = np.linalg.cond(A.toarray()) * tol  # forward error of any solution with residual <= tol
        for x in (x_recycled, x_independent):
            assert _relative_residual(A, b, x) <= tol * (1 + 1e-6)
            assert np.linalg.norm(x.numpy() - exact) / np.linalg.norm(exact) <= bound
    # Recycling pays: fewer products than restarting from scratch for every system.
    assert recycled.matvecs < independent.matvecs
    assert sorted(recycled.order) == list(range(len(problems)))


def test_recycled_space_is_refreshed_for_a_new_matrix():
    first, second = pde.darcy(16, index=0), pde.darcy(16, index=1)
    solver = GCRODR(30, 6)
    solver.solve(first.matrix, first.rhs, tol=1e-9)
    for problem in (second, first):  # new matrix, then back: C = A U must hold for each
        solver.solve(problem.matrix, problem.rhs, tol=1e-9)
        U, C = solver.U, solver.C
        image = torch.stack([problem.matrix @ u for u in U])
        torch.testing.assert_close(image, C, rtol=0, atol=1e-8 * float(image.abs().max()))
        torch.testing.assert_close(C @ C.T, torch.eye(C.shape[0], dtype=C.dtype), rtol=0, atol=1e-10)


def test_same_matrix_twice_skips_the_refresh(generator, monkeypatch):
    from lowrank_ops.krylov import gcrodr as gcrodr_module

    refreshes = []
    original = gcrodr_module.refresh
    monkeypatch.setattr(gcrodr_module, "refresh", lambda apply, U: refreshes.append(U.shape[0]) or original(apply, U))
    problem = pde.darcy(16, index=4)
    solver = GCRODR(30, 6)
    _, first = solver.solve(problem.matrix, problem.rhs, tol=1e-9)
    b2 = problem.rhs + 0.1 * torch.randn(problem.rhs.shape, generator=generator, dtype=torch.float64)
    _, same = solver.solve(problem.matrix, b2, tol=1e-9)
    assert refreshes == []  # same matrix object: C = A U is still valid
    assert same.iterations < first.iterations  # and the recycled space helps
    problem.matrix.values.mul_(2.0)  # changed in place: the values' version counter tells
    solver.solve(problem.matrix, problem.rhs, tol=1e-9)
    assert refreshes == [solver.k]
    copy = CSRMatrix(problem.matrix.row_ptr, problem.matrix.col_idx, problem.matrix.values.clone(), problem.matrix.shape)
    solver.solve(copy, problem.rhs, tol=1e-9)
    solver.solve(copy, problem.rhs, tol=1e-9)
    assert len(refreshes) == 2  # another matrix object: recomputed once
    # values reassigned (not changed in place): a new tensor at version 0, which the key
    # (the counter alone) took for the old one; the stale C made the solve stagnate.
    copy.values = copy.values * 5.0
    _, info = solver.solve(copy, problem.rhs, tol=1e-9)
    assert len(refreshes) == 3 and info.converged


def test_numpy_and_scipy_matrices_changed_in_place_are_refreshed(monkeypatch):
    """A NumPy array or scipy matrix has no version counter: the key compares its converted
    entries.  Changed in place, GCRODR kept the old matrix's C = A U (true residual 5.3,
    reported as stagnation); unchanged, the recycled space is still reused as is."""
    import scipy.sparse as sp

    from lowrank_ops.krylov import gcrodr as gcrodr_module

    refreshes = []
    original = gcrodr_module.refresh
    monkeypatch.setattr(gcrodr_module, "refresh", lambda apply, U: refreshes.append(U.shape[0]) or original(apply, U))
    first, second = pde.darcy(16, index=0), pde.darcy(16, index=5)
    for kind in ("numpy", "scipy"):
        dense = first.matrix.to_dense().numpy().copy()
        A = dense if kind == "numpy" else sp.csr_matrix(dense)
        solver = GCRODR(30, 8)
        solver.solve(A, first.rhs, tol=1e-9)
        solver.solve(A, first.rhs, tol=1e-9)
        assert refreshes == []  # the same entries: reused
        if kind == "numpy":
            A[:] = 3.0 * second.matrix.to_dense().numpy()
        else:
            A.data *= 3.0
        _, info = solver.solve(A, first.rhs, tol=1e-9)
        assert refreshes == [solver.k] and info.converged, kind
        refreshes.clear()


def test_new_matrix_at_a_dead_matrix_id_is_refreshed(monkeypatch):
    """A new matrix that gets the id() of a garbage-collected one (CPython reuses freed
    addresses) is a new operator: C = A U is recomputed.  id() is made to return one value
    for every object, as if each new matrix landed where the last one died."""
    from lowrank_ops.krylov import _common, gcrodr as gcrodr_module

    refreshes = []
    original = gcrodr_module.refresh
    monkeypatch.setattr(gcrodr_module, "refresh", lambda apply, U: refreshes.append(U.shape[0]) or original(apply, U))
    monkeypatch.setattr(_common, "id", lambda obj: 1, raising=False)  # shadows the builtin where it was used

    def fresh(problem):  # values version 0 in both: only identity tells the matrices apart
        m = problem.matrix
        return CSRMatrix(m.row_ptr, m.col_idx, m.values.clone(), m.shape)

    first, second = pde.darcy(16, index=0), pde.darcy(16, index=1)
    solver = GCRODR(30, 6)
    matrix = fresh(first)
    solver.solve(matrix, first.rhs, tol=1e-9)
    del matrix
    gc.collect()
    matrix = fresh(second)
    _, info = solver.solve(matrix, second.rhs, tol=1e-9)
    assert refreshes == [6]
    assert info.converged
    image = torch.stack([matrix @ u for u in solver.U])  # the new pair satisfies A U = C for the new matrix
    torch.testing.assert_close(image, solver.C, rtol=0, atol=1e-8 * float(image.abs().max()))
    solver.solve(matrix, second.rhs, tol=1e-9)  # the same live matrix again: no refresh
    assert refreshes == [6]


@pytest.mark.parametrize("solver", ["gmres", "cg"])
def test_solution_carries_no_graph_from_a_differentiable_x0(solver):
    # x0 with requires_grad: the solution came back attached to x0's graph (the kernels
    # update it in place outside autograd), with d(sum x)/d x0 = 1 instead of 0.
    problem = pde.darcy(8)
    x0 = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    x, info = {"gmres": gmres, "cg": cg}[solver](problem.matrix, problem.rhs, x0=x0)
    assert info.converged and not x.requires_grad and x.grad_fn is None


def test_operator_identity_key():
    """The solvers' operator key: equal only while both sides refer to one live object; a bound
    method (a new object at every access) by its instance and function."""
    from lowrank_ops.krylov._common import _identity

    class Operator:
        shape = (2, 2)

        def matvec(self, x):
            return x

    a, b = Operator(), Operator()
    assert _identity(a) == _identity(a) and _identity(a) != _identity(b)
    assert _identity(a.matvec) == _identity(a.matvec) and _identity(a.matvec) != _identity(b.matvec)
    key = _identity(a)
    del a
    gc.collect()
    assert key != key  # its object died: equal to nothing, itself included
    unreferenceable = (1, 2)  # tuples take no weak references: held, so the key stays valid
    assert _identity(unreferenceable) == _identity(unreferenceable)


def test_skr_order_and_caller_order():
    features = torch.tensor([[0.0], [5.0], [1.0], [4.0], [2.0], [3.0]])
    assert greedy_order(features) == [0, 2, 4, 5, 3, 1]
    problems = pde.generate("poisson", 12, 5, seed=2)
    result = solve_sequence(problems, order="skr", m=20, k=4, tol=1e-10)
    for problem, x in zip(problems, result.solutions):  # solutions come back in the caller's order
        assert _relative_residual(problem.matrix.to_scipy(), problem.rhs.numpy(), x) <= 1e-10 * (1 + 1e-6)


def test_callables_returning_their_own_buffer():
    """A callable A returning an output buffer it reuses: DeflatedCG stacked k views of that
    one buffer as A W (the second solve ended at a residual of 2.6e18) and GCRODR needed
    156 / 119 iterations instead of 77.  Such products are copied now (also an A returning
    x itself, the identity, whose product the solvers then updated in place)."""
    class ReusedBuffer:
        def __init__(self, dense):
            self.dense, self.shape = dense, dense.shape
            self.buffer = torch.empty(dense.shape[0], dtype=dense.dtype)

        def __call__(self, v):
            return torch.mv(self.dense, v, out=self.buffer)

    for solver in (DeflatedCG(6), GCRODR(20, 6)):
        for problem in pde.generate("darcy", 16, 3, seed=1):
            x, info = solver.solve(ReusedBuffer(torch.as_tensor(problem.matrix.to_scipy().toarray())), problem.rhs)
            assert info.converged and info.iterations <= 100, (type(solver).__name__, info.status, info.iterations)
    b = torch.arange(1.0, 6.0, dtype=torch.float64)
    identity = type("Identity", (), {"shape": (5, 5), "__call__": lambda self, v: v})()
    for solve in (cg, gmres, lambda A, b: GCRODR(4, 2).solve(A, b), lambda A, b: DeflatedCG(2).solve(A, b)):
        x, info = solve(identity, b)
        assert info.converged and torch.allclose(x, b)


def test_cg_never_returns_worse_than_its_start():
    """x0 was never a candidate for the returned iterate: from the exact solution (rounded to
    float32, residual 5.4e-6) at a float32 tolerance of 1e-6, cg returned an iterate at
    7.6e-6 (gmres keeps x0).  The start is kept now when nothing confirmed beats it."""
    import scipy.sparse.linalg as spla

    problem = pde.darcy(32)
    matrix, b = problem.matrix.to(dtype=torch.float32), problem.rhs.float()
    x0 = torch.as_tensor(spla.spsolve(problem.matrix.to_scipy().tocsc(), problem.rhs.numpy())).float()
    for solve in (cg, lambda A, b, x0, tol: DeflatedCG(4).solve(A, b, x0, tol)):
        x, info = solve(matrix, b, x0=x0, tol=1e-6)
        assert not info.converged and info.true_residual <= info.residuals[0] * (1 + 1e-6)


def test_csr_matrix_pattern_cannot_be_changed_after_validation():
    """The kernels trust a CSRMatrix's pattern, checked once: a reassigned shorter values or
    larger shape was read out of bounds (SIGSEGV), and edits to the caller's int32 index
    arrays (kept, not copied) changed a validated pattern.  The pattern attributes are
    read-only now, a reassigned values is checked, the index arrays are copies; pickles
    from before (public attribute names) still load."""
    import pickle

    row_ptr, col_idx = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    matrix = CSRMatrix(row_ptr, col_idx, torch.ones(2, dtype=torch.float64), (2, 2))
    col_idx[1] = 0  # the caller's array: the matrix keeps its own copy
    torch.testing.assert_close(matrix.matvec(torch.tensor([1.0, 2.0], dtype=torch.float64)),
                               torch.tensor([1.0, 2.0], dtype=torch.float64))
    for name, value in (("row_ptr", row_ptr.long()), ("col_idx", col_idx), ("shape", (200_000_000, 2))):
        with pytest.raises(AttributeError):
            setattr(matrix, name, value)
    with pytest.raises(ValueError, match=r"CSRMatrix.values: the new values have shape \(1,\); expected \(nnz,\) = \(2,\)"):
        matrix.values = torch.ones(1, dtype=torch.float64)
    with pytest.raises(TypeError, match="the new values have dtype torch.int64"):
        matrix.values = torch.ones(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="the new values hold 1 non-finite entries"):
        matrix.values = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    matrix.values = torch.arange(8.0, dtype=torch.float64)[::4]  # strided: stored contiguous
    torch.testing.assert_close(matrix.matvec(torch.ones(2, dtype=torch.float64)),
                               torch.tensor([0.0, 4.0], dtype=torch.float64))
    old = CSRMatrix.__new__(CSRMatrix)
    old.__dict__.update(row_ptr=matrix.row_ptr, col_idx=matrix.col_idx, values=matrix.values, shape=matrix.shape)
    restored = pickle.loads(pickle.dumps(old))
    assert restored.shape == (2, 2) and torch.equal(restored.values, matrix.values)


def test_arnoldi_op_refuses_a_matrix_inside_its_basis():
    """krylov_arnoldi_ checked that r is apart from the basis it overwrites, not the
    matrix's arrays: values stored in basis rows changed the cycle silently ([4, 0]
    instead of [3, 1], the Hessenberg matrix 1.15 off)."""
    problem = pde.darcy(4)
    m = problem.matrix
    storage = torch.zeros(8, 64, dtype=torch.float64)
    values = storage.view(-1)[80: 80 + m.nnz]  # rows 1-2 of storage: basis row 2 starts at 128
    values.copy_(m.values)
    with pytest.raises(ValueError, match="basis must not share memory with values"):
        ops.krylov_arnoldi_(m.row_ptr, m.col_idx, values, storage[:6, :16], problem.rhs.clone(), 0, 3,
                            float(problem.rhs.norm()), 0.0, float(problem.rhs.norm()))
    apart = storage[6:].reshape(-1)[: m.nnz]  # the same storage, past the basis's bytes: accepted
    apart.copy_(m.values)
    ops.krylov_arnoldi_(m.row_ptr, m.col_idx, apart, storage[:6, :16], problem.rhs.clone(), 0, 3,
                        float(problem.rhs.norm()), 0.0, float(problem.rhs.norm()))


def test_scipy_conversions_copy():
    """to_scipy (documented as a copy) and from_scipy shared float64 memory with the scipy
    matrix: writing to it changed a CSRMatrix validated once (NaN got in), without bumping
    its version, so GCRODR reused a stale recycled space (true residual 1.86 > x0's 1)."""
    matrix = pde.darcy(8).matrix
    before = matrix.values.clone()
    matrix.to_scipy().data *= 3
    assert torch.equal(matrix.values, before)
    source = sp.eye(4, format="csr")
    converted = CSRMatrix.from_scipy(source)
    source.data[0] = np.nan
    assert torch.equal(converted.values, torch.ones(4, dtype=torch.float64))


def test_greedy_order_is_a_permutation_for_any_features():
    """Once every remaining distance was inf (inf features, or entries of 1e200 whose
    distances overflowed), argmin picked a visited row: [0, 2, 0, 0], and solve_sequence
    solved system 0 four times and left the others None.  Past 25 rows torch.cdist used
    |a|^2 + |b|^2 - 2 a.b, which cancels for rows sharing a large common part: the chain
    through rows t * 1e-3 apart on a common 1e6 part was random; it is monotone now."""
    inf, nan = float("inf"), float("nan")
    assert greedy_order(torch.tensor([[0.0], [inf], [1.0], [inf]])) == [0, 2, 1, 3]
    assert greedy_order(torch.tensor([[0.0], [1e200], [1.0], [-1e200]])) == [0, 2, 1, 3]
    assert greedy_order(torch.tensor([[0.0], [nan], [1.0], [2.0]])) == [0, 2, 3, 1]
    generator = torch.Generator().manual_seed(0)
    N, d = 40, 64
    t = torch.randperm(N, generator=generator).double()
    common = torch.randn(d, generator=generator, dtype=torch.float64) * 1e6
    direction = torch.randn(d, generator=generator, dtype=torch.float64) * 1e-3
    order = [int(t[i]) for i in greedy_order(common + t[:, None] * direction, start=int(torch.argmin(t)))]
    assert order == list(range(N))
    big = [(CSRMatrix(p.matrix.row_ptr, p.matrix.col_idx, p.matrix.values * 1e160, p.matrix.shape), p.rhs)
           for p in pde.generate("darcy", 8, 4)]
    result = solve_sequence(big, method="cg")
    assert sorted(result.order) == [0, 1, 2, 3] and all(s is not None for s in result.solutions)


def test_skr_default_features_and_their_errors():
    """The default features of (A, b) tuples are A's entries for every matrix kind (a dense
    or scipy A fell back to b: Darcy's all-ones b made the order the given one);
    problems of different sizes name the fix (was torch.stack's 'equal size' error); numpy
    features are taken (an AttributeError on .dim())."""
    problems = pde.generate("darcy", 8, 6, seed=3)
    by_coefficient = solve_sequence(problems, m=20, k=4).order
    assert by_coefficient != list(range(6))  # (the b-only fallback: all-ones b, the given order)
    for convert in (lambda m: m, lambda m: m.to_dense(), lambda m: m.to_scipy()):
        tuples = [(convert(p.matrix), p.rhs) for p in problems]
        assert solve_sequence(tuples, m=20, k=4).order == by_coefficient
    mixed = pde.generate("darcy", 8, 2) + pde.generate("darcy", 12, 2)
    with pytest.raises(ValueError, match="default features, which have different lengths.*pass features"):
        solve_sequence(mixed)
    assert solve_sequence(mixed, order="given", m=20, k=4).order == [0, 1, 2, 3]
    result = solve_sequence(problems[:4], features=np.array([[3.0], [0.0], [2.0], [1.0]]), m=20, k=4)
    assert result.order == [0, 2, 3, 1]


# ---------------------------------------------------------------------------- deflated CG
@pytest.mark.parametrize("family,grid", [("darcy", 8), ("darcy", 16), ("poisson", 12)])
@pytest.mark.parametrize("M", [None, "jacobi"])
def test_defcg_sequence_matches_dense_solve(family, grid, M):
    problems = pde.generate(family, grid, 5, seed=4)
    tol = 1e-10
    result = solve_sequence(problems, method="defcg", k=6, tol=tol, M=M)
    assert result.converged
    for problem, x, info in zip(problems, result.solutions, result.infos):
        A, b = problem.matrix.to_scipy().toarray(), problem.rhs.numpy()
        exact = np.linalg.solve(A, b)
        assert info.status == "converged" and info.true_residual <= tol
        assert _relative_residual(A, b, x) <= tol * (1 + 1e-6)  # recomputed independently
        # forward error <= cond(A) * relative residual
        assert np.linalg.norm(x.numpy() - exact) / np.linalg.norm(exact) <= np.linalg.cond(A) * tol


@pytest.mark.parametrize("M", [None, "jacobi"])
def test_defcg_k0_is_cg_step_for_step(M, monkeypatch):
    monkeypatch.setattr(_cg_module, "NATIVE", False)  # DeflatedCG's loop is cg's Python loop, op for op
    for problem in pde.generate("darcy", 16, 3, seed=5):
        x_cg, info_cg = cg(problem.matrix, problem.rhs, tol=1e-10, M=M)
        x, info = DeflatedCG(0, M=M).solve(problem.matrix, problem.rhs, tol=1e-10)
        assert (info.iterations, info.matvecs, info.status) == (info_cg.iterations, info_cg.matvecs, info_cg.status)
        assert info.residuals == info_cg.residuals and torch.equal(x, x_cg)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("M", [None, "jacobi"])
def test_defcg_recycling_cuts_iterations(dtype, tol, M, monkeypatch):
    # Darcy 16 x 16, 8 systems, seed 0, measured (default m = 64): 784 CG iterations against 600
    # deflated (0.77x) in float64, 547 against 377 (0.69x) with Jacobi; 510 against 366 (0.72x) and
    # 369 against 224 (0.61x) in float32.  CG's Python loop, whose arithmetic DeflatedCG's loop repeats
    # (cg's C++ loop sums in another order: one iteration apart in float32).
    monkeypatch.setattr(_cg_module, "NATIVE", False)
    problems = [(p.matrix.to(dtype=dtype), p.rhs.to(dtype), p.coefficient) for p in pde.generate("darcy", 16, 8, seed=0)]
    plain = solve_sequence(problems, method="cg", order="skr", tol=tol, M=M)
    deflated = solve_sequence(problems, method="defcg", order="skr", k=8, tol=tol, M=M)
    assert plain.converged and deflated.converged
    assert all(x.dtype == dtype for x in deflated.solutions)
    # float32: the solver's residual is float32 arithmetic, recomputed here in float64 (as in
    # test_float32_and_callable_operator, 2 tol).
    for (A, b, _), x in zip(problems, deflated.solutions):
        assert _relative_residual(A.to_scipy(), b.double().numpy(), x) <= tol * (1 + (1e-6 if dtype == torch.float64 else 1.0))
    first = deflated.order[0]  # nothing to deflate with yet: CG's count
    assert deflated.infos[first].iterations == plain.infos[first].iterations
    assert deflated.iterations <= 0.9 * plain.iterations  # a real reduction, deterministic
    assert deflated.matvecs < plain.matvecs  # including the k products per new matrix


def test_defcg_lanczos_record_and_deflation_space(monkeypatch):
    from lowrank_ops.krylov import defcg as defcg_module

    captured = {}
    refresh, ritz = defcg_module._refresh, defcg_module._Lanczos.ritz

    def capture_refresh(system, W):
        captured["W"], captured["AW"] = refresh(system, W)
        return captured["W"], captured["AW"]

    def capture_ritz(self):
        captured["V"], captured["T"] = self.V[: self.size].clone(), self.T[: self.size, : self.size].copy()
        return ritz(self)

    monkeypatch.setattr(defcg_module, "_refresh", capture_refresh)
    monkeypatch.setattr(defcg_module._Lanczos, "ritz", capture_ritz)
    first, second = pde.darcy(12, index=0), pde.darcy(12, index=1)
    for M in (None, "jacobi"):
        solver = DeflatedCG(3, m=200, M=M)  # m > iterations: no restart, the record is plain Lanczos
        solver.solve(first.matrix, first.rhs, tol=1e-10)
        x, info = solver.solve(second.matrix, second.rhs, tol=1e-10)
        assert info.converged
        A = second.matrix.to_scipy().toarray()
        W, AW = captured["W"].numpy(), captured["AW"].numpy()
        np.testing.assert_allclose(AW, W @ A, rtol=0, atol=1e-12 * np.abs(AW).max())  # AW = A W for the new matrix
        np.testing.assert_allclose(W @ AW.T, np.eye(3), rtol=0, atol=1e-12)  # A-orthonormal
        V, T = captured["V"].numpy()[:20], captured["T"][:20, :20]
        metric = np.eye(len(A)) if M is None else np.diag(np.diag(A))
        np.testing.assert_allclose(V @ metric @ V.T, np.eye(20), rtol=0, atol=1e-12)  # M-orthonormal Lanczos vectors
        deflated = A - AW.T @ AW  # A_d = A - AW (W^T A W)^{-1} AW^T
        np.testing.assert_allclose(V @ deflated @ V.T, T, rtol=0, atol=1e-12 * np.abs(T).max())
        # V^T M W = R^T W / sqrt(rz) = 0: the rounding in W^T A p = 0 meets a shrinking residual, so
        # the error grows with the step (3e-12 at step 20 measured, float64).
        np.testing.assert_allclose(V @ metric @ W.T, 0.0, rtol=0, atol=1e-10)
        assert solver.W.shape == (3, len(A)) and solver.AW is None  # updated from this solve: A W recomputed next time


def test_defcg_reports_non_spd_as_breakdown(generator):
    A, b = _system("indefinite", generator)
    x, info = DeflatedCG(4).solve(A, b, tol=1e-10)
    assert not info.converged and info.status == "breakdown" and torch.isfinite(x).all()
    # A deflation space from an SPD solve meets a negative definite matrix: every direction dropped.
    problem = pde.darcy(12, index=3)
    solver = DeflatedCG(4)
    solver.solve(problem.matrix, problem.rhs, tol=1e-10)
    negative = problem.matrix.to_scipy() * -1.0
    x, info = solver.solve(negative, problem.rhs, tol=1e-10)
    assert not info.converged and info.status == "breakdown" and torch.isfinite(x).all()
    assert solver.W.shape[0] == 0  # W^T A W < 0: nothing kept
    x, info = solver.solve(problem.matrix, problem.rhs, tol=1e-10)
    assert info.converged
    # A NaN operator: nothing deflated with, no LAPACK call on NaN.
    solver.solve(problem.matrix, problem.rhs, tol=1e-10)
    x, info = solver.solve(_NonFinite(problem.matrix.to_scipy(), 0), problem.rhs)
    assert info.status == "breakdown" and solver.W.shape[0] == 0 and torch.isfinite(x).all()


def test_defcg_bad_arguments_give_clear_errors():
    A, b = _laplacian(4), np.ones(16)
    with pytest.raises(ValueError, match="DeflatedCG: k must be an integer >= 0; got -1"):
        DeflatedCG(-1)
    with pytest.raises(ValueError, match="DeflatedCG: m must be larger than 2 k; got m = 8, k = 4"):
        DeflatedCG(4, m=8)
    with pytest.raises(ValueError, match="DeflatedCG: maxiter must be an integer >= 1; got 0"):
        DeflatedCG(2, maxiter=0)
    with pytest.raises(TypeError, match="DeflatedCG: M must be None, 'jacobi' or a Tensor"):
        DeflatedCG(2, M=lambda y: y)
    with pytest.raises(ValueError, match="DeflatedCG.solve: M must be None, 'jacobi'"):
        DeflatedCG(2, M="ilu").solve(A, b)
    with pytest.raises(ValueError, match="DeflatedCG.solve: tol must be None or a positive finite number"):
        DeflatedCG(2).solve(A, b, tol=0.0)
    with pytest.raises(ValueError, match=r"DeflatedCG.solve: b has shape \(15,\); expected \(n,\) = \(16,\)"):
        DeflatedCG(2).solve(A, np.ones(15))
    with pytest.raises(TypeError, match="recycler must be a DeflatedCG for method='defcg'; got GCRODR"):
        solve_sequence([(A, b)], method="defcg", recycler=GCRODR(10, 2))
    # A recycler's settings are its own: conflicting ones here were silently ignored.
    with pytest.raises(ValueError, match="M and maxiter are the recycler's own settings.*got M='jacobi'"):
        solve_sequence([(A, b)], method="defcg", M="jacobi", recycler=DeflatedCG(4))
    with pytest.raises(ValueError, match="maxiter=5 with a recycler"):
        solve_sequence([(A, b)], maxiter=5, recycler=GCRODR(10, 2))
    with pytest.raises(ValueError, match="m = 30 differs from the recycler's m = 10"):
        solve_sequence([(A, b)], m=30, recycler=GCRODR(10, 2))
    with pytest.raises(ValueError, match="k = 3 differs from the recycler's k = 4"):
        solve_sequence([(A, b)], method="defcg", k=3, recycler=DeflatedCG(4))
    assert solve_sequence([(A, b)], m=10, k=2, recycler=GCRODR(10, 2)).converged == 1
    x, info = DeflatedCG(0, M=lambda y: y).solve(A, b)  # a callable M is plain PCG's
    assert info.converged


# ---------------------------------------------------------------------------- breakdown
@pytest.mark.parametrize("solver", ["gmres", "gcrodr", "cg", "defcg"])
def test_exact_solution_found_early(solver):
    # b is an eigenvector: the Krylov space is invariant after one step (lucky breakdown).
    A = sp.diags(np.arange(1.0, 101.0)).tocsr()
    b = np.zeros(100)
    b[7] = 3.0
    run = {"gmres": lambda: gmres(A, b, tol=1e-12), "gcrodr": lambda: GCRODR(20, 5).solve(A, b, tol=1e-12),
           "cg": lambda: cg(A, b, tol=1e-12), "defcg": lambda: DeflatedCG(5).solve(A, b, tol=1e-12)}[solver]
    x, info = run()
    assert info.converged and info.iterations == 1
    assert torch.isfinite(x).all() and _relative_residual(A, b, x) <= 1e-15


@pytest.mark.parametrize("solver", ["gmres", "gcrodr", "cg", "defcg"])
def test_zero_rhs(solver):
    A = _laplacian(6)
    run = {"gmres": gmres, "cg": cg, "gcrodr": lambda A, b, tol: GCRODR(10, 3).solve(A, b, tol=tol),
           "defcg": lambda A, b, tol: DeflatedCG(3).solve(A, b, tol=tol)}[solver]
    x, info = run(A, np.zeros(36), tol=1e-8)
    assert info.converged and info.status == "zero_rhs" and info.matvecs == 0
    assert torch.equal(x, torch.zeros(36, dtype=torch.float64))
    x, info = run(sp.csr_matrix((0, 0)), np.zeros(0), tol=1e-8)  # the empty system
    assert info.converged and x.shape == (0,)


def test_singular_systems():
    # 1-D Neumann Laplacian: singular (constants in the null space).
    n = 50
    A = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n)).tolil()
    A[0, 0] = A[n - 1, n - 1] = 1.0
    A = A.tocsr()
    consistent = A @ np.sin(np.arange(n))
    x, info = gmres(A, consistent, tol=1e-10, restart=60)
    assert info.converged and _relative_residual(A, consistent, x) <= 1e-10
    inconsistent = np.ones(n)  # orthogonal to the range: no solution
    for solve in (lambda: gmres(A, inconsistent, tol=1e-10, restart=20, maxiter=400),
                  lambda: GCRODR(20, 5, maxiter=400).solve(A, inconsistent, tol=1e-10)):
        x, info = solve()
        assert not info.converged and info.status in ("stagnation", "maxiter")
        assert torch.isfinite(x).all() and np.isfinite(info.true_residual)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_cg_reports_indefinite_breakdown(generator, native, monkeypatch):
    monkeypatch.setattr(_cg_module, "NATIVE", native)
    A, b = _system("indefinite", generator)
    x, info = cg(A, b, tol=1e-10)
    assert not info.converged and info.status == "breakdown"
    assert torch.isfinite(x).all()


# solve(A, b, maxiter) through the step-by-step CG loop: cg, and DeflatedCG (k = 4) recording its Lanczos process
_PYTHON_CG_SOLVERS = {"cg": lambda A, b, maxiter: cg(A, b, tol=1e-10, maxiter=maxiter),
                      "defcg": lambda A, b, maxiter: DeflatedCG(4, maxiter=maxiter).solve(A, b, tol=1e-10)}


@pytest.mark.parametrize("solver", ["cg", "defcg"])
def test_python_cg_breakdown_leaves_the_last_iterate(solver, device, generator, monkeypatch):
    """On the indefinite system the step with p^T A p <= 0 updates nothing (the loop updates
    r on the device first and x only once the host has checked the curvature): x is the
    iterate of the steps before it, bitwise, on CPU (the Python loop forced) and CUDA."""
    monkeypatch.setattr(_cg_module, "NATIVE", False)
    A, b = _system("indefinite", generator)
    matrix, b = CSRMatrix.from_scipy(A, torch.float64).to(device), torch.as_tensor(b).to(device)
    solve = _PYTHON_CG_SOLVERS[solver]
    x, info = solve(matrix, b, None)
    assert not info.converged and info.status == "breakdown" and info.iterations >= 1
    assert torch.isfinite(x).all() and len(info.residuals) == info.iterations + 1
    assert info.matvecs == info.iterations + 3  # the breakdown step's product, the initial and final residuals
    x_before, before = solve(matrix, b, info.iterations)
    assert before.status == "maxiter" and torch.equal(x, x_before)
    assert info.residuals[1:] == before.residuals[1:]


@pytest.mark.parametrize("M", [None, "jacobi"])
def test_python_cg_loop_reads_the_host_once_per_step(M, monkeypatch):
    """The step-by-step loop (CUDA's) waits for the device once per step: counted as the host
    reads of tensors (tolist, item, float, int, bool) in solves of 20 and 40 steps, whose
    difference is the 20 extra steps' (the loop used to read three scalars a step).
    DeflatedCG's second solve deflates with the first's space (its record, m = 100, does
    not restart within 40 steps)."""
    monkeypatch.setattr(_cg_module, "NATIVE", False)
    reads = [0]
    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            reads[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    problem = pde.darcy(24, seed=3, index=1)
    first = pde.darcy(24, seed=3, index=0)
    deflated = DeflatedCG(4, m=100, M=M)
    deflated.solve(first.matrix, first.rhs, tol=1e-10)

    def count(solve, steps: int) -> int:
        reads[0] = 0
        _, info = solve(steps)
        assert info.status == "maxiter" and info.iterations == steps
        return reads[0]

    def deflated_solve(steps: int):
        solver = DeflatedCG(4, m=100, M=M, maxiter=steps)
        solver.W = deflated.W  # the first solve's space (AW follows for the new matrix)
        return solver.solve(problem.matrix, problem.rhs, tol=1e-14)

    solvers = {"cg": lambda steps: cg(problem.matrix, problem.rhs, tol=1e-14, M=M, maxiter=steps),
               "defcg": deflated_solve}
    for name, solve in solvers.items():
        assert deflated.W is not None and deflated.W.shape[0] == 4
        extra = count(solve, 40) - count(solve, 20)
        assert extra == 20, name


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("M", [None, "jacobi", "diagonal"])
def test_native_cg_matches_python_loop(dtype, tol, M, generator, monkeypatch):
    """The C++ loop (krylov_cg_) against the Python loop over the kernel ops: the same
    arithmetic with sums grouped otherwise (chunked SIMD sums, torch's norm).  CG amplifies
    such rounding differences as it loses orthogonality, so the residual histories agree
    closely only early (20 steps: 1e-8 relative in float64, 1e-3 in float32), the iteration
    counts within one step (measured: equal in float64, 72 vs 71 in float32 with Jacobi; the
    float32 runs may confirm on the true residual a different number of times) and the
    solutions to the tolerance times cond (~1e3)."""
    problem = pde.darcy(24, seed=3, index=1)
    matrix, b = problem.matrix.to(dtype=dtype), problem.rhs.to(dtype)
    preconditioner = {"diagonal": 1.0 / torch.diagonal(torch.as_tensor(matrix.to_scipy().toarray())).to(dtype)}.get(M, M)
    results = {}
    for native in (True, False):
        monkeypatch.setattr(_cg_module, "NATIVE", native)
        results[native] = cg(matrix, b, tol=tol, M=preconditioner)
    (x_native, native), (x_python, python) = results[True], results[False]
    assert native.converged and python.converged and native.status == python.status == "converged"
    assert abs(native.iterations - python.iterations) <= 1
    np.testing.assert_allclose(native.residuals[:20], python.residuals[:20], rtol=1e-3 if dtype == torch.float32 else 1e-8)
    torch.testing.assert_close(x_native, x_python, rtol=0, atol=1e3 * tol * float(x_python.abs().max()))
    assert _relative_residual(matrix.to_scipy(), b.double().numpy(), x_native) <= tol * (1 + 1e-6)


def test_native_cg_restarts_when_the_true_residual_lags(monkeypatch):
    """maxiter is honoured across the kernel's calls, and a run cut by it reports maxiter."""
    problem = pde.darcy(16, seed=1, index=0)
    x, info = cg(problem.matrix, problem.rhs, tol=1e-12, maxiter=7)
    assert not info.converged and info.status == "maxiter" and info.iterations == 7
    assert len(info.residuals) == 8 and info.matvecs == 7 + 2  # the initial and the final true residual


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("solver", ["cg", "deflated"])
def test_float32_cg_stops_at_its_attainable_accuracy(solver, native, monkeypatch):
    """Darcy at grid 48 in float32 levels off at a true residual of ~2.2e-5, above the
    default tol 1e-5: after the first restart CG's recursive residual met the target every
    2-3 steps and the true one never did, so cg and DeflatedCG ran 10 n = 23040 steps
    (0.85 s) to "maxiter".  Now ten restarts in a row that do not halve the true residual
    end the solve as "stagnation" (240 steps), with the best confirmed iterate; float64
    on the same system still converges (264 steps)."""
    monkeypatch.setattr(_cg_module, "NATIVE", native)
    problem = pde.darcy(48, seed=0)
    matrix32 = problem.matrix.to(dtype=torch.float32)
    solve = cg if solver == "cg" else (lambda A, b: DeflatedCG(8).solve(A, b))
    x, info = solve(matrix32, problem.rhs.float())
    assert not info.converged and info.status == "stagnation", info.status
    assert info.iterations <= 400, info.iterations
    residual = _relative_residual(matrix32.to_scipy(), problem.rhs.numpy(), x)  # float64 arithmetic
    assert residual <= 4e-5 and info.true_residual == pytest.approx(residual, rel=0.1)
    x64, info64 = solve(problem.matrix, problem.rhs)
    assert info64.converged and info64.iterations <= 300


def test_stagnation_counts_restarts_that_do_not_halve_the_residual_and_keeps_the_best_iterate():
    """The strikes reset when a confirmed true residual is at most half the reference, the
    ``PATIENCE``-th strike in a row reports stagnation, and the best confirmed iterate is a
    copy (the loops go on updating ``x`` in place)."""
    from lowrank_ops.krylov._common import Stagnation

    x = torch.zeros(3)
    stagnation = Stagnation(x, 5.0)  # the start: a candidate, worse than every confirmation below
    assert not stagnation.failed_confirmation(x.fill_(1.0), 1.0)  # the first one sets the reference
    assert not stagnation.failed_confirmation(x.fill_(2.0), 0.4)  # halved: strikes reset
    assert not stagnation.failed_confirmation(x.fill_(3.0), 0.3)  # the best, but not halved: strike 1
    for strike in range(2, Stagnation.PATIENCE):
        assert not stagnation.failed_confirmation(x.fill_(10.0 + strike), 0.35), strike
    assert not stagnation.failed_confirmation(x.fill_(4.0), 0.19)  # halves 0.4: strikes reset
    for strike in range(1, Stagnation.PATIENCE):
        assert not stagnation.failed_confirmation(x.fill_(20.0 + strike), 0.2), strike
    assert stagnation.failed_confirmation(x.fill_(5.0), 0.25)
    best, rnorm = stagnation.best_solution(x, 0.25)
    assert rnorm == 0.19 and torch.equal(best, torch.full((3,), 4.0))
    final = torch.ones(3)
    assert stagnation.best_solution(final, 0.1) == (final, 0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_op_matches_reference_step_for_step(dtype, preconditioned):
    """krylov_cg_ against reference.krylov_cg (the same steps in torch ops, same dtype): the
    same step count and status, histories and iterates equal to the rounding of the
    different summation orders (20 steps, before CG's rounding drift grows)."""
    problem = pde.darcy(12, seed=4, index=0)
    m, b = problem.matrix.to(dtype=dtype), problem.rhs.to(dtype)
    diagonal = 1.0 / torch.diagonal(torch.as_tensor(m.to_scipy().toarray())).to(dtype) if preconditioned else None
    bnorm = float(b.norm())
    x, r = torch.zeros_like(b), b.clone()
    history, info = ops.krylov_cg_(m.row_ptr, m.col_idx, m.values, diagonal, x, r, 20, 0.0, bnorm)
    x_ref, r_ref, history_ref, taken, status = reference.krylov_cg(m.row_ptr, m.col_idx, m.values, diagonal,
                                                                   torch.zeros_like(b), b.clone(), 20, 0.0, bnorm)
    assert info.tolist() == [taken, status] == [20, 1]
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    np.testing.assert_allclose(history.numpy(), history_ref.numpy(), rtol=tol)
    torch.testing.assert_close(x, x_ref, rtol=tol, atol=tol * float(x_ref.abs().max()))
    # a tiny target: the first step below it stops with status 0
    history, info = ops.krylov_cg_(m.row_ptr, m.col_idx, m.values, diagonal, torch.zeros_like(b), b.clone(), 500,
                                   1e-4 * bnorm, bnorm)
    *_, taken, status = reference.krylov_cg(m.row_ptr, m.col_idx, m.values, diagonal, torch.zeros_like(b), b.clone(),
                                            500, 1e-4 * bnorm, bnorm)
    assert info[1] == status == 0 and abs(int(info[0]) - taken) <= 1


def test_cg_op_opcheck_and_bad_input(generator):
    problem = pde.darcy(8, seed=0, index=0)
    m, b = problem.matrix, problem.rhs
    x = torch.zeros_like(b)
    bnorm = float(b.norm())
    for diagonal, n_chunks in ((None, None), (1.0 / torch.ones_like(b) * 0.5, 3)):
        torch.library.opcheck(ops.krylov_cg_.default, (m.row_ptr, m.col_idx, m.values, diagonal, x.clone(), b.clone(),
                                                      20, 1e-6 * bnorm, bnorm, n_chunks))
    history, info = ops.krylov_cg_(m.row_ptr, m.col_idx, m.values, None, x.clone(), b.clone(), 500, 1e-10 * bnorm,
                                   bnorm)
    assert info[1] == 0 and 0 < info[0] < 500 and history[int(info[0]) - 1] <= 1e-10

    def call(*args, x=x, r=b, diagonal=None, pattern=(m.row_ptr, m.col_idx, m.values)):
        return ops.krylov_cg_(*pattern, diagonal, x.clone(), r.clone(), *args)

    with pytest.raises(ValueError, match="krylov_cg_: steps must be an integer >= 1; got 0"):
        call(0, 0.0, bnorm)
    with pytest.raises(ValueError, match="krylov_cg_: bnorm must be a positive finite number; got nan"):
        call(5, 0.0, float("nan"))
    with pytest.raises(ValueError, match=r"krylov_cg_: r has shape \(63,\); expected \(n,\) = \(64,\)"):
        call(5, 0.0, bnorm, r=b[:63])
    with pytest.raises(ValueError, match=r"krylov_cg_: x has dtype torch.float32 on cpu; expected torch.float64"):
        call(5, 0.0, bnorm, x=x.float())
    with pytest.raises(ValueError, match=r"krylov_cg_: inverse_diagonal has shape \(3,\)"):
        call(5, 0.0, bnorm, diagonal=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"krylov_cg_: n_chunks must be in \[1, n\] = \[1, 64\]; got 65"):
        ops.krylov_cg_(m.row_ptr, m.col_idx, m.values, None, x.clone(), b.clone(), 5, 0.0, bnorm, 65)
    # x and r are written while inverse_diagonal (and values) are read: sharing memory with
    # them made the preconditioner change under the kernel (a false breakdown after 2 steps).
    shared = torch.ones(64, dtype=torch.float64)
    with pytest.raises(ValueError, match="krylov_cg_: x must not share memory with inverse_diagonal"):
        ops.krylov_cg_(m.row_ptr, m.col_idx, m.values, shared, shared, b.clone(), 5, 0.0, bnorm)
    with pytest.raises(ValueError, match="krylov_cg_: r must not share memory with values"):
        ops.krylov_cg_(m.row_ptr, m.col_idx, m.values, None, x.clone(), m.values[:64], 5, 0.0, bnorm)



def test_cpu_loop_impls_take_numpy_numbers():
    """cg_cpu (and arnoldi_cpu / defcg_cpu, sharing the check) refused an np.int64 target or
    bnorm ("target must be a non-negative finite number; got np.int64(0)") while taking
    np.float64: NumPy integers are numbers; bools stay refused."""
    from lowrank_ops.ops.krylov import cg_cpu

    problem = pde.darcy(8, seed=0, index=0)
    m, b = problem.matrix, problem.rhs
    bnorm = float(b.norm())
    x = torch.zeros_like(b)
    run = lambda *args: cg_cpu(m.row_ptr, m.col_idx, m.values, None, x.clone(), b.clone(), *args)
    for expected, got in zip(run(5, 0.0, bnorm), run(np.int64(5), np.int64(0), np.float64(bnorm))):
        assert torch.equal(expected, got)
    with pytest.raises(ValueError, match="krylov_cg_: bnorm must be a positive finite number; got True"):
        run(5, 0.0, True)

def _defcg_reference(A, d, W, AW, x, r, steps, reproject=False):
    """Deflated CG in float64 torch ops, step for step as krylov_defcg_ documents it:
    ``(x, r, history, alphas, betas, Lanczos vectors)``; ``reproject``: every step restores
    ``W^T r = 0`` (``reproject_below`` above every residual)."""
    z = r * d if d is not None else r.clone()
    p = z - W.T @ (AW @ z)
    rho = float(r @ z)
    history, alphas, betas, vectors = [], [], [], []
    for _ in range(steps):
        q = A @ p
        alpha = rho / float(p @ q)
        vectors.append(z / rho ** 0.5)
        x, r = x + alpha * p, r - alpha * q
        history.append(float(r.norm()))
        if reproject:
            c = W @ r
            x, r = x + W.T @ c, r - AW.T @ c
        z = r * d if d is not None else r.clone()
        rho_new = float(r @ z)
        alphas.append(alpha), betas.append(rho_new / rho)
        p = z + (rho_new / rho) * p - W.T @ (AW @ z)
        rho = rho_new
    return x, r, history, alphas, betas, torch.stack(vectors)


@pytest.mark.parametrize("preconditioned", [False, True])
@pytest.mark.parametrize("kc", [0, 3])
def test_defcg_op_matches_reference_and_resumes(preconditioned, kc, generator):
    """krylov_defcg_ against the float64 torch reference (12 steps: histories, alphas,
    betas, the recorded Lanczos vectors and the iterate to 1e-9 relative, summation order
    apart), and resuming: 5 + 7 steps in two calls equal 12 in one, bitwise (the same sums
    in the same order)."""
    problem = pde.darcy(10, seed=2, index=0)
    m, b = problem.matrix, problem.rhs
    A = torch.as_tensor(m.to_scipy().toarray())
    n = b.numel()
    d = 1.0 / torch.diagonal(A) if preconditioned else None
    # W: kc random directions made A-orthonormal (W A W^T = I, rows), as DeflatedCG keeps them
    W = torch.randn(kc, n, generator=generator, dtype=torch.float64)
    if kc:
        L = torch.linalg.cholesky(W @ A @ W.T)
        W = torch.linalg.solve_triangular(L, W, upper=False)
    AW = W @ A
    bnorm = float(b.norm())
    x_ref, r_ref, history_ref, alphas_ref, betas_ref, vectors_ref = _defcg_reference(
        A, d, W, AW, torch.zeros_like(b), b.clone(), 12)

    def state():
        return dict(x=torch.zeros_like(b), r=b.clone(), p=torch.empty_like(b), z=torch.empty_like(b),
                    rho=torch.zeros(1, dtype=torch.float64), record=torch.zeros(12, n, dtype=torch.float64))

    one = state()
    history, alphas, betas, info = ops.krylov_defcg_(
        m.row_ptr, m.col_idx, m.values, d, one["x"], one["r"], one["p"], one["z"], one["rho"], W, AW, one["record"],
        12, 0.0, bnorm, False)
    assert info.tolist() == [12, 1]
    np.testing.assert_allclose(history.numpy() * bnorm, history_ref, rtol=1e-9)
    np.testing.assert_allclose(alphas.numpy(), alphas_ref, rtol=1e-9)
    np.testing.assert_allclose(betas.numpy(), betas_ref, rtol=1e-9)
    torch.testing.assert_close(one["record"], vectors_ref, rtol=1e-9, atol=1e-9 * float(vectors_ref.abs().max()))
    torch.testing.assert_close(one["x"], x_ref, rtol=1e-9, atol=1e-9 * float(x_ref.abs().max()))
    if kc:  # the directions are A-conjugate to W, so W^T r never changes: W^T A p = 0
        torch.testing.assert_close(W @ one["r"], W @ b, rtol=0, atol=1e-9 * bnorm)
    two = state()
    parts = []
    for steps, resume, rows in ((5, False, slice(0, 5)), (7, True, slice(5, 12))):
        parts.append(ops.krylov_defcg_(m.row_ptr, m.col_idx, m.values, d, two["x"], two["r"], two["p"], two["z"],
                                       two["rho"], W, AW, two["record"][rows], steps, 0.0, bnorm, resume))
    assert torch.equal(torch.cat([parts[0][0], parts[1][0]]), history)
    assert all(torch.equal(one[key], two[key]) for key in ("x", "r", "p", "record", "rho"))


@pytest.mark.parametrize("preconditioned", [False, True])
def test_defcg_op_reprojects_below_the_threshold(preconditioned, generator):
    """reproject_below: steps ending below it restore W^T r = 0 (x += W c, r -= AW c) and take
    beta from the projected r, as the reference; above every residual, every step does, and
    W^T r ends at rounding although r started with W^T b != 0."""
    problem = pde.darcy(10, seed=2, index=0)
    m, b = problem.matrix, problem.rhs
    A = torch.as_tensor(m.to_scipy().toarray())
    n, kc = b.numel(), 3
    d = 1.0 / torch.diagonal(A) if preconditioned else None
    W = torch.randn(kc, n, generator=generator, dtype=torch.float64)
    W = torch.linalg.solve_triangular(torch.linalg.cholesky(W @ A @ W.T), W, upper=False)
    AW = W @ A
    bnorm = float(b.norm())
    x_ref, r_ref, history_ref, alphas_ref, betas_ref, _ = _defcg_reference(
        A, d, W, AW, torch.zeros_like(b), b.clone(), 12, reproject=True)
    x, r, p, z = torch.zeros_like(b), b.clone(), torch.empty_like(b), torch.empty_like(b)
    rho = torch.zeros(1, dtype=torch.float64)
    history, alphas, betas, info = ops.krylov_defcg_(m.row_ptr, m.col_idx, m.values, d, x, r, p, z, rho, W, AW,
                                                     torch.zeros(0, n, dtype=torch.float64), 12, 0.0, bnorm, False,
                                                     reproject_below=1e300)
    assert info.tolist() == [12, 1]
    np.testing.assert_allclose(history.numpy() * bnorm, history_ref, rtol=1e-9)
    np.testing.assert_allclose(alphas.numpy(), alphas_ref, rtol=1e-9)
    np.testing.assert_allclose(betas.numpy(), betas_ref, rtol=1e-9)
    torch.testing.assert_close(x, x_ref, rtol=1e-9, atol=1e-9 * float(x_ref.abs().max()))
    assert float((W @ r).abs().max()) <= 1e-12 * bnorm < float((W @ b).abs().max())
    with pytest.raises(ValueError, match="reproject_below must be a non-negative finite number; got -1.0"):
        ops.krylov_defcg_(m.row_ptr, m.col_idx, m.values, d, x, r, p, z, rho, W, AW,
                          torch.zeros(0, n, dtype=torch.float64), 2, 0.0, bnorm, False, reproject_below=-1.0)


@pytest.mark.parametrize("native", [True, False])
def test_float32_deflated_cg_levels_off_below_its_attainable_accuracy(native, monkeypatch):
    """W^T r drifts to about u ||A|| ||x||, CG's attainable accuracy: with a tolerance below
    it, the second float32 solve of a sequence diverged (4e-7 -> 9e3 relative over 10^4
    steps, 10^4 times worse than x0 = 0) where plain cg stagnates at 9e-6.  Steps below
    sqrt(eps) ||b|| restore W^T r = 0 now: the solve stagnates near plain cg's level."""
    monkeypatch.setattr(_cg_module, "NATIVE", native)
    first, second = pde.generate("darcy", 32, 2, seed=3)
    solver = DeflatedCG(4)
    solver.solve(first.matrix.to(dtype=torch.float32), first.rhs.float())
    matrix, b = second.matrix.to(dtype=torch.float32), second.rhs.float()
    x, info = solver.solve(matrix, b, tol=3e-7)
    plain = cg(matrix, b, tol=3e-7)[1]
    assert info.status == "stagnation" and info.iterations <= 600, (info.status, info.iterations)
    assert info.true_residual <= 3 * plain.true_residual, (info.true_residual, plain.true_residual)


def test_defcg_op_opcheck_and_bad_input():
    problem = pde.darcy(8, seed=0, index=0)
    m, b = problem.matrix, problem.rhs
    n, bnorm = b.numel(), float(b.norm())
    W = torch.eye(2, n, dtype=torch.float64) / 2.0
    AW = W @ torch.as_tensor(m.to_scipy().toarray())

    def args(**changes):
        values = dict(diagonal=None, x=torch.zeros_like(b), r=b.clone(), p=torch.empty_like(b), z=torch.empty_like(b),
                      rho=torch.zeros(1, dtype=torch.float64), W=W, AW=AW, record=torch.zeros(4, n, dtype=torch.float64),
                      steps=6, target=0.0, bnorm=bnorm, resume=False)
        values.update(changes)
        return (m.row_ptr, m.col_idx, m.values, *values.values())

    torch.library.opcheck(ops.krylov_defcg_.default, args())
    torch.library.opcheck(ops.krylov_defcg_.default, args(), {"reproject_below": 1e300})
    torch.library.opcheck(ops.krylov_defcg_.default, args(diagonal=torch.full_like(b, 0.25), W=W[:0], AW=AW[:0]))
    with pytest.raises(ValueError, match="krylov_defcg_: steps must be an integer >= 1; got 0"):
        ops.krylov_defcg_(*args(steps=0))
    with pytest.raises(ValueError, match=r"krylov_defcg_: p has shape \(5,\); expected \(n,\) = \(64,\)"):
        ops.krylov_defcg_(*args(p=torch.zeros(5, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"krylov_defcg_: deflation_product has shape \(1, 64\); expected \(2, 64\)"):
        ops.krylov_defcg_(*args(AW=AW[:1]))
    with pytest.raises(ValueError, match=r"krylov_defcg_: record has shape \(4, 63\); expected \(rows, n\)"):
        ops.krylov_defcg_(*args(record=torch.zeros(4, 63, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"krylov_defcg_: rho has shape \(2,\), dtype torch.float64 on cpu; expected"):
        ops.krylov_defcg_(*args(rho=torch.zeros(2, dtype=torch.float64)))
    shared = torch.zeros(2 * n, dtype=torch.float64)
    with pytest.raises(ValueError, match="krylov_defcg_: x must not share memory with p"):
        ops.krylov_defcg_(*args(x=shared[:n], p=shared[n // 2: n // 2 + n]))  # overlapping halves
    ops.krylov_defcg_(*args(x=shared[:n], p=shared[n:]))  # one storage, disjoint bytes: accepted


@pytest.mark.parametrize("M", [None, "jacobi"])
def test_native_defcg_matches_python_loop(M, monkeypatch):
    """DeflatedCG's C++ loop (krylov_defcg_, the Lanczos record restarted between calls)
    against its Python loop over the kernel ops: the same arithmetic with sums grouped
    otherwise.  Measured on this sequence: equal iteration counts system by system (one
    apart allowed: rounding), the same converged solutions to the tolerance; with k = 0
    it is cg's C++ loop (the same C++ function), bitwise."""
    problems = pde.generate("darcy", 16, 5, seed=3)
    results = {}
    for native in (True, False):
        monkeypatch.setattr(_cg_module, "NATIVE", native)
        results[native] = solve_sequence(problems, method="defcg", order="given", k=6, tol=1e-10, M=M)
        assert results[native].converged
    for fast, slow in zip(results[True].infos, results[False].infos):
        assert abs(fast.iterations - slow.iterations) <= 1 and fast.true_residual <= 1e-10
    assert results[True].iterations < 0.9 * solve_sequence(problems, method="cg", tol=1e-10, M=M).iterations
    monkeypatch.setattr(_cg_module, "NATIVE", True)
    for problem in problems[:2]:
        x_cg, info_cg = cg(problem.matrix, problem.rhs, tol=1e-10, M=M)
        x, info = DeflatedCG(0, M=M).solve(problem.matrix, problem.rhs, tol=1e-10)
        assert info.residuals == info_cg.residuals and torch.equal(x, x_cg)


@pytest.mark.parametrize("solver", ["gmres", "gcrodr", "cg", "defcg"])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float64, 1e160), (torch.float64, 1e-170), (torch.float32, 1e20),
                                             (torch.float32, 1e-30)])
def test_huge_and_tiny_rhs_are_solved(solver, dtype, magnitude, generator):
    # ||b||^2 overflows (or underflows) the working precision: the solvers used to return
    # x = 0 with status "converged" but converged = False (or "zero_rhs" for a tiny b).
    A = _laplacian(5)
    b = torch.randn(25, generator=generator, dtype=torch.float64)
    run = {"gmres": gmres, "cg": cg, "gcrodr": lambda A, b, tol: GCRODR(10, 3).solve(A, b, tol=tol),
           "defcg": lambda A, b, tol: DeflatedCG(3).solve(A, b, tol=tol)}[solver]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    x, info = run(CSRMatrix.from_scipy(A, dtype), (b * magnitude).to(dtype), tol=tol)
    assert info.converged and info.status == "converged" and info.true_residual <= tol
    assert torch.isfinite(x).all()
    expected = np.linalg.solve(A.toarray(), (b * magnitude).to(dtype).double().numpy() / magnitude)
    error = np.abs(x.double().numpy() / magnitude - expected).max() / np.abs(expected).max()
    assert error <= (1e-8 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("solver", ["gmres", "gcrodr", "cg", "defcg"])
def test_zero_matrix_reports_non_convergence(solver, generator):
    # nnz = 0 is a valid matrix (the kernels got null col_idx / values pointers and refused it).
    b = torch.randn(9, generator=generator, dtype=torch.float64)
    run = {"gmres": gmres, "cg": cg, "gcrodr": lambda A, b: GCRODR(6, 2).solve(A, b),
           "defcg": lambda A, b: DeflatedCG(2).solve(A, b)}[solver]
    for A in (torch.zeros(9, 9, dtype=torch.float64), sp.csr_matrix((9, 9))):
        x, info = run(A, b)
        assert not info.converged and info.status in ("stagnation", "breakdown")
        assert torch.equal(x, torch.zeros(9, dtype=torch.float64)) and info.true_residual == 1.0
    # A recycled space meets the zero matrix: every direction dropped (matrices kept alive:
    # the recycler tells matrices apart by id).
    laplacian, zero = _laplacian(3), sp.csr_matrix((9, 9))
    recycler = GCRODR(6, 2)
    recycler.solve(laplacian, b)
    x, info = recycler.solve(zero, b)
    assert not info.converged and info.status == "stagnation" and recycler.U.shape == (0, 9)
    x, info = recycler.solve(laplacian, b)
    assert info.converged


class _NonFinite:
    """``A x`` for the first ``good`` products, then NaN (or inf) entries."""

    def __init__(self, A, good: int, bad: float = float("nan")):
        self.A, self.good, self.bad, self.shape = A, good, bad, A.shape

    def __call__(self, x):
        self.good -= 1
        y = torch.from_numpy(self.A @ x.numpy())
        if self.good < 0:
            y[3] = self.bad
        return y


@pytest.mark.parametrize("solver", ["gmres", "gcrodr", "cg", "defcg"])
def test_non_finite_operator_or_preconditioner_is_a_breakdown(solver, generator, capfd):
    # gmres used to hand the NaN Hessenberg matrix to LAPACK (stderr: "On entry to DLASCL
    # parameter number 4 had an illegal value", then numpy's LinAlgError).
    A, b = _system("spd", generator)
    run = {"gmres": gmres, "cg": cg, "gcrodr": lambda A, b, M=None: GCRODR(20, 4, M=M).solve(A, b),
           "defcg": lambda A, b, M=None: DeflatedCG(0 if callable(M) else 4, M=M).solve(A, b)}[solver]
    for good, bad in ((0, float("nan")), (6, float("nan")), (6, float("inf"))):
        x, info = run(_NonFinite(A, good, bad), b)
        assert not info.converged and info.status == "breakdown"
        assert torch.isfinite(x).all() and not np.isfinite(info.true_residual)
        if good:  # the steps before the bad product were used
            assert 1 <= info.iterations <= good and np.isfinite(info.residuals[:-1]).all()
    x, info = run(A, b, M=lambda y: y * float("nan"))
    assert not info.converged and info.status == "breakdown" and torch.isfinite(x).all()
    assert info.true_residual == pytest.approx(1.0)  # x0 = 0 kept
    if solver in ("gmres", "gcrodr"):  # the fused C++ cycle on a matrix whose products overflow the squared norms
        x, info = run(A * 1e300, b)
        assert not info.converged and info.status == "breakdown" and torch.isfinite(x).all()
    assert capfd.readouterr().err == ""
    if solver == "gcrodr":  # a recycled space meets a NaN operator: nothing recycled, no LAPACK call on NaN
        recycler = GCRODR(20, 4)
        recycler.solve(A, b)
        x, info = recycler.solve(_NonFinite(A, 0), b)
        assert info.status == "breakdown" and recycler.U.shape[0] == 0 and torch.isfinite(x).all()
        assert capfd.readouterr().err == ""


@pytest.mark.parametrize("solver", ["gmres", "gmres_python", "gmres_callable", "gcrodr"])
@pytest.mark.parametrize("exponent", [66, -84])
def test_float32_operator_scale_does_not_change_the_solve(solver, exponent, generator, monkeypatch):
    # ||A v|| ~ 2^66 (or 2^-84) for unit v: its float32 square overflowed (underflowed) in
    # the Gram-Schmidt passes, so GMRES reported a breakdown at the first step (at 2^-84 it
    # converged after 3-4x the products, or stagnated).  The squared norms are now summed in
    # double, and scaling A by a power of two scales every quantity exactly: the same
    # iterations, and the solution scaled bit for bit.
    A, b = _system("nonsymmetric", generator)
    A = torch.from_numpy(A.toarray()).float()
    b = torch.from_numpy(b).float()
    if solver == "gmres_python":
        monkeypatch.setattr(_arnoldi, "NATIVE", False)

    def run(matrix):
        if solver == "gcrodr":  # the second solve uses the recycled space
            recycler = GCRODR(20, 5)
            recycler.solve(matrix, b)
            return recycler.solve(matrix, b * 1.5)
        if solver == "gmres_callable":
            operator = lambda v: matrix @ v  # noqa: E731
            operator.shape = matrix.shape
            return gmres(operator, b, restart=20)
        return gmres(matrix, b, restart=20)

    x, info = run(A)
    assert info.converged
    scale = 2.0 ** exponent
    x_scaled, info_scaled = run(A * scale)
    assert info_scaled.converged and info_scaled.status == "converged"
    assert (info_scaled.iterations, info_scaled.matvecs) == (info.iterations, info.matvecs)
    assert torch.equal(x_scaled * scale, x)


# ---------------------------------------------------------------------------- atol and callback
_SOLVERS = ["gmres", "gmres_python", "gcrodr", "cg", "cg_python", "defcg"]


def _runner(solver: str, monkeypatch, recycler=None):
    """``run(A, b, **keywords)`` for one solver; "_python" forces the step-by-step loop (the
    Arnoldi cycle or CG in Python instead of one C++ call).  With ``recycler`` (a GCRODR or
    DeflatedCG), its ``solve``: one solver through several calls."""
    if recycler is not None:
        return recycler.solve
    if solver == "gmres_python":
        monkeypatch.setattr(_arnoldi, "NATIVE", False)
    if solver == "cg_python":
        monkeypatch.setattr(_cg_module, "NATIVE", False)
    return {"gmres": lambda A, b, **kw: gmres(A, b, restart=20, **kw),
            "gmres_python": lambda A, b, **kw: gmres(A, b, restart=20, **kw),
            "gcrodr": lambda A, b, **kw: GCRODR(20, 5).solve(A, b, **kw),
            "cg": cg, "cg_python": cg,
            "defcg": lambda A, b, **kw: DeflatedCG(4).solve(A, b, **kw)}[solver]


@pytest.mark.parametrize("solver", _SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("magnitude", [1e6, 1e-6])
def test_atol_stops_at_the_absolute_target(solver, dtype, magnitude, generator, monkeypatch):
    # ||b|| = 1e6 or 1e-6 and atol = 1e-4 ||b||, far above tol ||b||: the solvers work on
    # b / scale (a power of two near max |b|), so atol must be divided by that scale too.
    # Undivided, the 1e6 solve would stop at x0 = 0 (target 100 against a scaled ||b|| ~ 10)
    # and the 1e-6 one would run to a scaled target of 1e-10, ~1e-11 relative.
    run = _runner(solver, monkeypatch)
    problem = pde.darcy(16, seed=2, index=1)
    matrix = problem.matrix.to(dtype=dtype)
    b = torch.randn(matrix.shape[0], generator=generator, dtype=torch.float64)
    b = (b * (magnitude / float(b.norm()))).to(dtype)
    bnorm = float(b.double().norm())
    tol = 1e-10 if dtype == torch.float64 else 1e-5  # reachable (for the comparison below), under 1e-4
    atol = 1e-4 * bnorm
    x, info = run(matrix, b, tol=tol, atol=atol)
    assert info.converged and info.status == "converged" and info.iterations > 0
    # Stopped at the first iterate under the target: the target equals the relative 1e-4 up to
    # the rounding of ||b / scale|| (float32: 1e-7 relative, so 1e-5 is ample).
    assert min(info.residuals[:-1]) > 1e-4 * (1 - 1e-5) and info.true_residual <= 1e-4 * (1 + 1e-5)
    # Independently in float64: the solver's own true residual plus the rounding of its
    # product A x (float32: ~nnz per row * eps * |A| |x| ~ 1e-5 ||b||, a tenth of atol).
    residual = np.linalg.norm(b.double().numpy() - matrix.to_scipy().astype(np.float64) @ x.double().numpy())
    assert residual <= atol * (1 + (1e-8 if dtype == torch.float64 else 1e-1))
    # The same solve as the relative tolerance atol / ||b||: the same iterates, step for step.
    _, relative = run(matrix, b, tol=1e-4)
    assert (info.iterations, info.matvecs) == (relative.iterations, relative.matvecs)
    np.testing.assert_allclose(info.residuals, relative.residuals, rtol=0, atol=0)
    # tol alone runs much longer; an atol under tol ||b|| changes nothing.
    _, strict = run(matrix, b, tol=tol)
    assert strict.converged and strict.iterations > info.iterations
    _, below = run(matrix, b, tol=tol, atol=1e-3 * tol * bnorm)
    assert below.residuals == strict.residuals


@pytest.mark.parametrize("solver", _SOLVERS)
def test_atol_above_the_initial_residual_returns_x0(solver, generator, monkeypatch):
    run = _runner(solver, monkeypatch)
    A = CSRMatrix.from_scipy(_laplacian(6))
    b = torch.randn(36, generator=generator, dtype=torch.float64)
    x0 = torch.randn(36, generator=generator, dtype=torch.float64)
    r0 = float((b - A.matvec(x0)).norm())
    x, info = run(A, b, x0=x0, atol=r0 * (1 + 1e-12))
    assert info.converged and info.status == "converged" and info.iterations == 0
    torch.testing.assert_close(x, x0, rtol=1e-15, atol=0)
    # atol / scale overflows (b ~ 1e-300): every finite residual meets it.
    x, info = run(A, b * 1e-300, atol=1e300)
    assert info.converged and info.iterations == 0 and torch.equal(x, torch.zeros(36, dtype=torch.float64))


@pytest.mark.parametrize("solver", _SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_callback_receives_the_residual_history(solver, dtype, generator, monkeypatch):
    # One float per iteration, in order: exactly info.residuals[1:] (the values after the
    # solver's revisions: true residuals at restarts and at convergence, projections onto
    # the recycled space), however the iterations ran (C++ cycle or loop, Python loop).
    # gcrodr, defcg: one solver object through the sequence, so the second solve recycles.
    recycler = {"gcrodr": GCRODR(20, 5), "defcg": DeflatedCG(4)}.get(solver)
    run = _runner(solver, monkeypatch, recycler)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for problem in pde.generate("darcy", 16, 2, seed=4):
        received = []
        x, info = run(problem.matrix.to(dtype=dtype), problem.rhs.to(dtype), tol=tol, callback=received.append)
        assert info.converged and info.iterations > 20  # several Arnoldi cycles
        assert all(type(value) is float for value in received)
        assert received == info.residuals[1:] and len(received) == info.iterations


def test_callback_sees_the_cg_restart_on_the_true_residual(monkeypatch):
    # tol 1e-14 is near the attainable accuracy: the recursive residual meets it before the
    # true one does, so both loops replace that history entry by the true residual and go on
    # (the native loop with a new kernel call): measured 3 confirmations, 123 / 124 steps.
    problem = pde.darcy(16, seed=1, index=0)
    for native in (True, False):
        monkeypatch.setattr(_cg_module, "NATIVE", native)
        received = []
        _, info = cg(problem.matrix, problem.rhs, tol=1e-14, maxiter=400, callback=received.append)
        assert info.matvecs > info.iterations + 2  # the initial and final residuals, and confirmations
        assert received == info.residuals[1:] and len(received) == info.iterations


@pytest.mark.parametrize("solver", ["gmres", "gcrodr", "cg", "cg_python", "defcg"])
def test_callback_exception_propagates_and_keeps_the_recycled_space(solver, monkeypatch):
    recycler = {"gcrodr": GCRODR(20, 5), "defcg": DeflatedCG(4)}.get(solver)
    run = _runner(solver, monkeypatch, recycler)
    first, second = pde.generate("darcy", 16, 2, seed=6)
    run(first.matrix, first.rhs)
    kept = None if recycler is None else (recycler.U if solver == "gcrodr" else recycler.W).clone()
    calls = []

    class Stop(Exception):
        pass

    def stop(value):
        calls.append(value)
        if len(calls) == 3:
            raise Stop("stop")

    with pytest.raises(Stop, match="stop"):
        run(second.matrix, second.rhs, callback=stop)
    assert len(calls) == 3
    if recycler is not None:
        assert torch.equal(recycler.U if solver == "gcrodr" else recycler.W, kept)
        _, info = run(second.matrix, second.rhs)  # the solver still works
        assert info.converged


def test_atol_passes_through_solve_sequence():
    problems = pde.generate("darcy", 12, 3, seed=7)
    for method in ("gcrodr", "defcg", "gmres", "cg"):
        result = solve_sequence(problems, method=method, order="given", m=20, k=4, tol=1e-12,
                                atol=1e-3 * float(problems[0].rhs.norm()))
        for problem, x, info in zip(problems, result.solutions, result.infos):
            residual = float((problem.rhs - problem.matrix.matvec(x)).norm())
            assert info.converged and residual <= 1e-3 * float(problems[0].rhs.norm()) * (1 + 1e-8)
            assert min(info.residuals[:-1]) * float(problem.rhs.norm()) > 1e-3 * float(problems[0].rhs.norm()) * (1 - 1e-8)


def test_bad_atol_and_callback_give_clear_errors():
    A, b = _laplacian(4), np.ones(16)
    solvers = {"gmres": gmres, "cg": cg, "GCRODR.solve": GCRODR(10, 2).solve, "DeflatedCG.solve": DeflatedCG(2).solve}
    for name, solve in solvers.items():
        for atol in (-1e-8, float("nan"), float("inf"), "1e-8", None, True, 10**400):
            with pytest.raises(ValueError, match=rf"{name}: atol must be a finite number >= 0; got {re.escape(repr(atol))}"):
                solve(A, b, atol=atol)
        for callback in ("print", 3, [print]):
            with pytest.raises(TypeError, match=rf"{name}: callback must be None or a callable .*; got {type(callback).__name__}"):
                solve(A, b, callback=callback)
    with pytest.raises(ValueError, match="gmres: atol must be a finite number >= 0; got -1.0"):
        solve_sequence([(A, b)], method="gmres", atol=-1.0)
    with pytest.raises(ValueError, match="cg: tol must be None or a positive finite number; got 1000000"):
        cg(A, b, tol=10**400)


# ---------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    A = _laplacian(4)
    b = np.ones(16)
    with pytest.raises(TypeError, match="CSRMatrix: row_ptr must be a tensor; got list"):
        CSRMatrix([0, 1], torch.tensor([0]), torch.tensor([1.0]), (1, 1))
    for shape in ((2.0, 2), (1, 1, 1), 3):  # a float size was truncated silently
        with pytest.raises(TypeError, match="CSRMatrix: shape must be a pair of ints"):
            CSRMatrix(torch.tensor([0, 1, 1]), torch.tensor([0]), torch.tensor([1.0]), shape)
    with pytest.raises(TypeError, match="CSRMatrix.from_dense: dense must be a tensor; got list"):
        CSRMatrix.from_dense([[1.0]])
    with pytest.raises(ValueError, match=r"A has shape \(16, 15\); expected a square matrix"):
        gmres(A[:, :15], b)
    with pytest.raises(ValueError, match=r"b has shape \(15,\); expected \(n,\) = \(16,\)"):
        gmres(A, np.ones(15))
    with pytest.raises(ValueError, match=r"x0 has shape \(3,\); expected \(n,\) = \(16,\)"):
        cg(A, b, x0=np.ones(3))
    with pytest.raises(ValueError, match=r"b has shape \(2, 8\); expected \(n,\) = \(16,\)"):
        gmres(A, np.ones((2, 8)))
    for solve in (gmres, cg):  # torch's "Could not infer dtype of NoneType" named nothing
        with pytest.raises(TypeError, match=r"b must be a vector .* of length n = 16; got NoneType"):
            solve(A, None)
    nan_b = b.copy()
    nan_b[3] = np.nan
    with pytest.raises(ValueError, match="b holds 1 non-finite"):
        GCRODR(10, 2).solve(A, nan_b)
    for tol in (0.0, -1e-8, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be None or a positive finite number"):
            gmres(A, b, tol=tol)
    with pytest.raises(ValueError, match="restart must be an integer >= 1; got 0"):
        gmres(A, b, restart=0)
    with pytest.raises(ValueError, match="k must be smaller than m; got m = 10, k = 10"):
        GCRODR(10, 10)
    with pytest.raises(ValueError, match="M must be None, 'jacobi'"):
        gmres(A, b, M="ilu")
    with pytest.raises(ValueError, match=r"M has shape \(3,\); expected \(n,\) = \(16,\)"):
        gmres(A, b, M=torch.ones(3))
    with pytest.raises(ValueError, match="non-finite entries"):
        bad = A.copy()
        bad.data[0] = np.inf
        gmres(bad, b)
    # Complex dense matrices: the imaginary part was dropped and the solve reported success.
    complex_A = A.toarray() + 3j * np.eye(16)
    for dense in (complex_A, torch.from_numpy(complex_A)):
        for solve in (gmres, cg, GCRODR(10, 2).solve, DeflatedCG(2).solve):
            with pytest.raises(TypeError, match=r"A has dtype .*complex128; expected real entries"):
                solve(dense, b)
    with pytest.raises(ValueError, match="col_idx must lie in"):
        CSRMatrix(torch.tensor([0, 1]), torch.tensor([5]), torch.tensor([1.0], dtype=torch.float64), (1, 2))
    with pytest.raises(ValueError, match="row_ptr must be non-decreasing"):
        CSRMatrix(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64), (3, 2))
    with pytest.raises(ValueError, match="method must be 'gcrodr', 'defcg', 'gmres' or 'cg'"):
        solve_sequence([(A, b)], method="bicgstab")
    with pytest.raises(TypeError, match=r"problems\[0\] must be a PDE problem"):
        solve_sequence([A])


# ---------------------------------------------------------------------------- kernels
def test_csr_matvec_checks_its_vectors(generator):
    dense = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    dense[dense.abs() < 0.5] = 0
    matrix = CSRMatrix.from_dense(dense)
    x = torch.randn(14, generator=generator, dtype=torch.float64)[::2]  # strided: copied, not misread
    torch.testing.assert_close(matrix.matvec(x), dense @ x, rtol=1e-14, atol=1e-14)
    out = torch.empty(5, dtype=torch.float64)
    assert matrix.matvec(x, out=out) is out
    torch.testing.assert_close(out, dense @ x, rtol=1e-14, atol=1e-14)
    with pytest.raises(TypeError, match="CSRMatrix.matvec: x has dtype torch.float32; expected torch.float64"):
        matrix.matvec(x.float())
    with pytest.raises(ValueError, match=r"CSRMatrix.matvec: x has shape \(6,\); expected \(7,\)"):
        matrix.matvec(x[:6].contiguous())
    with pytest.raises(ValueError, match=r"x has shape \(1, 7\); expected \(7,\)"):
        matrix.matvec(x[None])
    with pytest.raises(ValueError, match="x is on meta; expected cpu"):
        matrix.matvec(torch.empty(7, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="CSRMatrix.matvec: x must be a tensor; got list"):
        matrix.matvec(x.tolist())
    with pytest.raises(ValueError, match=r"CSRMatrix.matvec: out has shape \(4,\); expected \(5,\)"):
        matrix.matvec(x, out=torch.empty(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="out has dtype torch.float32"):
        matrix.matvec(x, out=torch.empty(5))
    with pytest.raises(ValueError, match="out must be contiguous"):
        matrix.matvec(x, out=torch.empty(10, dtype=torch.float64)[::2])
    square = CSRMatrix.from_dense(dense[:, :5])
    with pytest.raises(ValueError, match="out must not share memory with x"):
        square.matvec(out, out=out)
    huge = CSRMatrix(torch.tensor([0, 1]), torch.tensor([10**8 - 1]), torch.ones(1, dtype=torch.float64), (1, 10**8))
    with pytest.raises(ValueError, match=r"x has shape \(1,\); expected \(100000000,\)"):
        huge.matvec(torch.ones(1, dtype=torch.float64))  # read 10^8 - 1 entries past x
    # The solvers' operator checks what it is called with the same way.
    operator = as_operator("test", square, torch.float64, "cpu")
    torch.testing.assert_close(operator(x[:5]), dense[:, :5] @ x[:5], rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"LinearOperator: x has shape \(4,\); expected \(5,\)"):
        operator(x[:4])
    with pytest.raises(TypeError, match="LinearOperator: x has dtype torch.float32"):
        operator(x[:5].float())


def test_csr_matrix_rejects_indices_that_wrap_in_int32():
    # The pattern is stored in int32 when it fits: indices were converted before the checks.
    with pytest.raises(ValueError, match=r"row_ptr must start at 0 and end at nnz = 1; got 0 \.\.\. 4294967297"):
        CSRMatrix(torch.tensor([0, 2**32 + 1]), torch.tensor([0]), torch.ones(1, dtype=torch.float64), (1, 2))
    with pytest.raises(ValueError, match=r"col_idx must lie in \[0, n_cols\) = \[0, 2\); got \[4294967296, "):
        CSRMatrix(torch.tensor([0, 1]), torch.tensor([2**32]), torch.ones(1, dtype=torch.float64), (1, 2))


def test_csr_matrix_rejects_non_integer_indices():
    # A float index would be truncated silently by the conversion to the int32/int64 pattern.
    values = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"CSRMatrix: row_ptr has dtype torch.float32; expected an integer dtype"):
        CSRMatrix(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 1]), values, (2, 2))
    with pytest.raises(TypeError, match=r"CSRMatrix: col_idx has dtype torch.float64; expected an integer dtype"):
        CSRMatrix(torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.7], dtype=torch.float64), values, (2, 2))
    with pytest.raises(TypeError, match=r"CSRMatrix: col_idx has dtype torch.bool; expected an integer dtype"):
        CSRMatrix(torch.tensor([0, 1, 2]), torch.tensor([True, False]), values, (2, 2))
    small = CSRMatrix(torch.tensor([0, 1, 2], dtype=torch.int16), torch.tensor([1, 0], dtype=torch.uint8), values, (2, 2))
    assert small.row_ptr.dtype == torch.int32 and small.col_idx.tolist() == [1, 0]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_spmv_kernel_memory_safe_on_any_row_ptr(device, index_dtype, generator):
    # The kernels clamp each row's range to [0, nnz]: no read outside col_idx / values.
    col_idx = torch.tensor([0, 2, 1, 3], dtype=index_dtype)
    values = torch.randn(4, generator=generator, dtype=torch.float64)
    x = torch.randn(4, generator=generator, dtype=torch.float64)
    big = 2**31 - 1 if index_dtype == torch.int32 else 10**12
    for row_ptr in ([-big, 1, big], [big, 3, -big], [0, big - 5, 2]):
        expected = []
        for i in range(2):
            begin = min(max(row_ptr[i], 0), 4)
            entries = range(begin, min(max(row_ptr[i + 1], begin), 4))
            expected.append(sum(float(values[k] * x[col_idx[k]]) for k in entries))
        args = (torch.tensor(row_ptr, dtype=index_dtype, device=device), col_idx.to(device), values.to(device),
                x.to(device))
        for spmv in (_kernels.spmv, torch.ops.lowrank_ops.krylov_spmv_):  # the solvers' path and the checked op
            out = torch.full((2,), 7.0, dtype=torch.float64, device=device)
            spmv(*args, out)
            torch.testing.assert_close(out.cpu(), torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_rows", [0, 1, 300])
def test_spmv_kernel_against_reference(device, dtype, n_rows, generator):
    dense = torch.randn(n_rows, 200, generator=generator, dtype=torch.float64)
    dense[torch.rand(n_rows, 200, generator=generator) < 0.9] = 0  # ~10% stored entries
    matrix = CSRMatrix.from_dense(dense.to(dtype)).to(device)
    x = torch.randn(400, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)[::2]  # non-contiguous
    out = matrix @ x
    expected = reference.krylov_spmv(matrix.row_ptr.cpu(), matrix.col_idx.cpu(), matrix.values.cpu().double(),
                                     x.cpu().double(), n_rows)
    # Each output is a dot of <= 200 products: Higham's gamma_n bound in the accumulation type.
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    bound = 201 * unit / (1 - 201 * unit) * (dense.abs() @ x.cpu().double().abs()) + 1e-300
    assert out.shape == (n_rows,) and out.dtype == dtype
    assert ((out.cpu().double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows,n", [(1, 7), (9, 1000), (33, 70_000)])  # the last splits over threads
def test_gram_schmidt_kernel_against_reference(device, dtype, rows, n, generator):
    storage = torch.randn(rows, n + 3, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    basis = storage[:, :n]  # rows strided by n + 3
    w = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    h_ref, w_ref, before_ref, after_ref = reference.gram_schmidt_pass(basis.cpu().double(), w.cpu().double())
    rtol = 1e-12 if dtype == torch.float64 else 1e-4  # dots of n terms; results O(sqrt(n)) with O(n) cancellation
    scale = float(basis.abs().max()) * float(w.abs().max()) * n
    w_full, h = w.clone(), torch.empty(rows, dtype=dtype, device=device)
    before, after = _kernels.gram_schmidt(basis, w_full, h)
    assert (h.cpu().double() - h_ref).abs().max() <= rtol * scale
    assert (w_full.cpu().double() - w_ref).abs().max() <= rtol * scale * rows
    assert before == pytest.approx(float(before_ref) ** 0.5, rel=rtol)
    assert after == pytest.approx(float(after_ref) ** 0.5, rel=rtol * rows, abs=rtol * scale)
    assert (_kernels.dots(basis, w).cpu().double() - h_ref).abs().max() <= rtol * scale
    w_update = w.clone()
    _kernels.subtract(basis, w_update, h_ref.to(device=device, dtype=dtype))
    assert (w_update.cpu().double() - w_ref).abs().max() <= rtol * scale * rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows,cols,n", [(1, 1, 5), (0, 3, 10), (7, 4, 300), (41, 10, 70_000)])
def test_block_kernels_against_reference(device, dtype, rows, cols, n, generator):
    storage = torch.randn(rows, n + 2, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    basis = storage[:, :n]  # strided rows
    other = torch.randn(cols, n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    coefficients = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    q, w = basis.cpu().double(), other.cpu().double()
    # Higham's gamma_m bounds: m-term sums in the accumulation type, plus the final rounding.
    products = _kernels.gram(basis, other)
    bound = (n + 1) * unit / (1 - (n + 1) * unit) * (q.abs() @ w.abs().T)
    assert products.shape == (rows, cols)
    assert (np.abs(products - reference.krylov_gram(q, w).numpy()) <= bound.numpy()).all()
    coefficients_rounded = coefficients.to(dtype).double()  # the kernel sees them in the storage dtype
    expected = reference.krylov_combine(q, coefficients_rounded)
    bound = (rows + 2) * unit / (1 - (rows + 2) * unit) * (coefficients_rounded.abs().T @ q.abs() + w.abs()) + 1e-300
    combined = _kernels.combine_rows(basis, coefficients.numpy())
    assert combined.shape == (cols, n)
    assert ((combined.cpu().double() - expected).abs() <= bound).all()
    start = other.clone()
    _kernels.combine_rows(basis, coefficients.numpy(), out=start)  # accumulate
    assert ((start.cpu().double() - (w + expected)).abs() <= bound).all()


# ---------------------------------------------------------------------------- the torch.library ops (ops/krylov.py)
ops = torch.ops.lowrank_ops


def _op_inputs(device, dtype, generator, rows=7, cols=3, n=300):
    """A random CSR matrix [50, n] (~10% stored), and a basis [rows, n] with strided rows, W [cols, n], w, h, coef."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    dense = randn(50, n)
    dense[torch.rand(50, n, generator=generator) < 0.9] = 0
    matrix = CSRMatrix.from_dense(dense.to(dtype)).to(device)  # plain tensors (opcheck fakifies them)
    basis = randn(rows, n + 5)[:, :n].to(device=device, dtype=dtype)  # rows strided by n + 5
    return dict(matrix=matrix, basis=basis, other=randn(cols, n).to(device=device, dtype=dtype),
                x=randn(n).to(device=device, dtype=dtype), w=randn(n).to(device=device, dtype=dtype),
                h=randn(rows).to(device=device, dtype=dtype), coef=randn(rows, cols).to(device=device, dtype=dtype))


def _gamma(terms: int, dtype) -> float:
    """Higham's gamma_k for sums of ``terms`` products in ``dtype``'s accumulation."""
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    return terms * unit / (1 - terms * unit)


def test_ops_opcheck(device, generator):
    t = _op_inputs(device, torch.float64, generator)
    m = t["matrix"]
    torch.library.opcheck(ops.krylov_spmv_.default, (m.row_ptr, m.col_idx, m.values, t["x"], t["x"].new_empty(50)))
    torch.library.opcheck(ops.krylov_cgs_pass_.default, (t["basis"], t["w"].clone(), t["h"].clone()))
    torch.library.opcheck(ops.krylov_cgs_dots.default, (t["basis"], t["w"]))
    torch.library.opcheck(ops.krylov_cgs_update_.default, (t["basis"], t["w"].clone(), t["h"]))
    torch.library.opcheck(ops.krylov_gram.default, (t["basis"], t["other"]))
    for accumulate in (False, True):
        torch.library.opcheck(ops.krylov_combine_rows_.default, (t["basis"], t["coef"], t["other"].clone(), accumulate))
    if device == "cpu":  # the fused cycle has a CPU kernel only
        A, matrix, basis, C, r = _cycle_inputs(generator, n=100, kc=2)
        basis[2:] = 0  # opcheck compares runs: no NaN poison in rows the cycle may leave unwritten
        for n_chunks in (None, 3):
            torch.library.opcheck(ops.krylov_arnoldi_.default, (matrix.row_ptr, matrix.col_idx, matrix.values,
                                                                basis.clone(), r, 2, 12, float(r.norm()), 0.0, 1.0,
                                                                n_chunks))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ops_against_torch(device, dtype, generator):
    """Each op through the dispatcher (the checked impls) against dense float64 torch, within
    Higham's bounds for sums in the accumulation dtype."""
    t = _op_inputs(device, dtype, generator)
    m, basis, other, x, w, h, coef = (t[k] for k in ("matrix", "basis", "other", "x", "w", "h", "coef"))
    q, W, x64, w64 = basis.double(), other.double(), x.double(), w.double()
    dense = m.to_dense().double()
    rows, n = basis.shape
    cols = other.shape[0]

    out = torch.full((50,), float("nan"), dtype=dtype, device=device)
    assert ops.krylov_spmv_(m.row_ptr, m.col_idx, m.values, x, out) is None
    assert ((out.double() - dense @ x64).abs() <= _gamma(n + 1, dtype) * (dense.abs() @ x64.abs())).all()

    h_out, w_out = torch.empty_like(h), w.clone()
    norms = ops.krylov_cgs_pass_(basis, w_out, h_out)
    # The squared norms are float64 for both dtypes, accumulated in double: float64's bound.
    assert norms.shape == (2,) and norms.dtype == torch.float64 and norms.device == w.device
    assert ((h_out.double() - q @ w64).abs() <= _gamma(n + 1, dtype) * (q.abs() @ w64.abs())).all()
    expected_w = w64 - q.T @ h_out.double()  # the update with the h the kernel computed
    assert ((w_out.double() - expected_w).abs() <= _gamma(rows + 2, dtype) * (w64.abs() + q.abs().T @ h_out.double().abs())).all()
    assert abs(float(norms[0]) - float(w64 @ w64)) <= _gamma(n + 1, torch.float64) * float(w64 @ w64)
    updated = w_out.double()
    assert abs(float(norms[1]) - float(updated @ updated)) <= _gamma(n + 1, torch.float64) * float(updated @ updated)

    dots = ops.krylov_cgs_dots(basis, w)
    assert dots.shape == (rows,) and dots.dtype == dtype
    torch.testing.assert_close(dots, h_out, rtol=0, atol=0)  # the same sums as the full pass

    w_update = w.clone()
    norms = ops.krylov_cgs_update_(basis, w_update, h)
    expected_w = w64 - q.T @ h.double()
    assert ((w_update.double() - expected_w).abs() <= _gamma(rows + 2, dtype) * (w64.abs() + q.abs().T @ h.double().abs())).all()
    updated = w_update.double()
    assert float(norms[0]) == 0.0 and norms.dtype == torch.float64
    assert abs(float(norms[1]) - float(updated @ updated)) <= _gamma(n + 1, torch.float64) * float(updated @ updated)

    gram = ops.krylov_gram(basis, other)
    assert gram.shape == (rows, cols) and gram.dtype == dtype
    assert ((gram.double() - q @ W.T).abs() <= _gamma(n + 1, dtype) * (q.abs() @ W.abs().T)).all()

    c64 = coef.double()
    combined = torch.full((cols, n), float("nan"), dtype=dtype, device=device)
    ops.krylov_combine_rows_(basis, coef, combined, False)
    bound = _gamma(rows + 2, dtype) * (c64.abs().T @ q.abs())
    assert ((combined.double() - c64.T @ q).abs() <= bound).all()
    accumulated = other.clone()
    ops.krylov_combine_rows_(basis, coef, accumulated, True)
    assert ((accumulated.double() - (W + c64.T @ q)).abs() <= bound + _gamma(rows + 2, dtype) * W.abs()).all()


def test_ops_reject_bad_arguments(generator):
    t = _op_inputs("cpu", torch.float64, generator)
    m, basis, other, x, w, h, coef = (t[k] for k in ("matrix", "basis", "other", "x", "w", "h", "coef"))
    out = torch.empty(50, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"krylov_spmv_: row_ptr has shape \(51,\); expected \(n_rows \+ 1,\) = \(41,\)"):
        ops.krylov_spmv_(m.row_ptr, m.col_idx, m.values, x, out[:40])
    with pytest.raises(TypeError, match="krylov_spmv_: col_idx has dtype torch.int64; expected the dtype of row_ptr"):
        ops.krylov_spmv_(m.row_ptr, m.col_idx.long(), m.values, x, out)
    with pytest.raises(TypeError, match="krylov_spmv_: row_ptr has dtype torch.int16; expected int32 or int64"):
        ops.krylov_spmv_(m.row_ptr.short(), m.col_idx.short(), m.values, x, out)
    with pytest.raises(ValueError, match=r"krylov_spmv_: x has dtype torch.float32 on cpu; expected torch.float64 on cpu \(as values\)"):
        ops.krylov_spmv_(m.row_ptr, m.col_idx, m.values, x.float(), out)
    with pytest.raises(ValueError, match=r"krylov_spmv_: out has strides \(2,\); expected a contiguous tensor"):
        ops.krylov_spmv_(m.row_ptr, m.col_idx, m.values, x, torch.empty(100, dtype=torch.float64)[::2])
    square = torch.empty(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="krylov_spmv_: out must not share memory with x"):
        ops.krylov_spmv_(m.row_ptr[:51], m.col_idx, m.values, square, square)
    with pytest.raises(ValueError, match=r"krylov_cgs_pass_: w has shape \(299,\); expected \(n,\) = \(300,\)"):
        ops.krylov_cgs_pass_(basis, w[:299].clone(), h.clone())
    with pytest.raises(ValueError, match=r"krylov_cgs_pass_: h has shape \(6,\); expected \(rows,\) = \(7,\)"):
        ops.krylov_cgs_pass_(basis, w.clone(), h[:6].clone())
    with pytest.raises(ValueError, match="krylov_cgs_pass_: w must not share memory with basis"):
        ops.krylov_cgs_pass_(basis, basis[3], h.clone())
    with pytest.raises(TypeError, match="krylov_cgs_dots: basis has dtype torch.float16; expected float32 or float64"):
        ops.krylov_cgs_dots(basis.half(), w.half())
    with pytest.raises(ValueError, match=r"krylov_cgs_update_: w has strides \(2,\); expected a contiguous tensor"):
        ops.krylov_cgs_update_(basis, torch.empty(600, dtype=torch.float64)[::2], h)
    with pytest.raises(ValueError, match=r"krylov_gram: other has shape \(3, 299\); expected \(cols, n\) = \(cols, 300\)"):
        ops.krylov_gram(basis, other[:, :299])
    with pytest.raises(ValueError, match=r"krylov_combine_rows_: coef has shape \(7, 2\); expected \(rows, cols\) = \(7, 3\)"):
        ops.krylov_combine_rows_(basis, coef[:, :2], other.clone(), False)
    with pytest.raises(ValueError, match="krylov_combine_rows_: out has strides .*; expected unit column stride"):
        ops.krylov_combine_rows_(basis, coef, other.T.contiguous().T, False)
    with pytest.raises(ValueError, match="krylov_combine_rows_: out must not share memory with basis"):
        ops.krylov_combine_rows_(basis, coef[:, :1], basis[:1], True)
    # Read-only arguments of any layout are copied, not misread.
    transposed = basis.T.contiguous().T
    torch.testing.assert_close(ops.krylov_gram(transposed, other), ops.krylov_gram(basis, other), rtol=0, atol=0)


def test_ops_torch_compile_fullgraph(device, generator):
    """Under torch.compile the solvers' callers (CSRMatrix.matvec_unchecked, _kernels) trace the
    ops (eager_or_op), whose fake impls give the graph its shapes."""
    t = _op_inputs(device, torch.float64, generator)
    m, basis, x = t["matrix"], t["basis"], t["x"]
    square = CSRMatrix(m.row_ptr[:51].cpu(), m.col_idx[: int(m.row_ptr[50])].cpu() % 50,
                       m.values[: int(m.row_ptr[50])].cpu(), (50, 50)).to(device)

    def step(v, rows):
        w = square.matvec_unchecked(v)  # krylov_spmv_
        h = _kernels.dots(rows, w)  # krylov_cgs_dots
        norms = ops.krylov_cgs_update_(rows, w, h)  # w -= Q^T h (mutates a graph intermediate)
        return w * 2.0, h, norms

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    v, rows = x[:50].contiguous(), basis[:, :50]
    for got, want in zip(compiled(v, rows), step(v, rows)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cg_op_torch_compile_fullgraph():
    """krylov_cg_ under torch.compile (its fake impl gives the outputs' shapes; x and r are
    mutated in place): the same steps, iterate and history as eager."""
    problem = pde.darcy(10, seed=1, index=0)
    m, b = problem.matrix, problem.rhs
    bnorm = float(b.norm())

    def solve(x, r):
        history, info = ops.krylov_cg_(m.row_ptr, m.col_idx, m.values, None, x, r, 15, 0.0, bnorm)
        return history * 1.0, info, x * 1.0

    compiled = torch.compile(solve, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(torch.zeros_like(b), b.clone()), solve(torch.zeros_like(b), b.clone())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_defcg_op_torch_compile_fullgraph():
    """krylov_defcg_ under torch.compile (fake impl for the outputs; x, r, p, z, rho and the
    record mutated in place), deflated by two A-orthonormal directions: the same history,
    alphas, iterate and Lanczos record as eager, bitwise."""
    problem = pde.darcy(10, seed=1, index=0)
    m, b = problem.matrix, problem.rhs
    A = torch.as_tensor(m.to_scipy().toarray())
    n, bnorm = b.numel(), float(b.norm())
    # e_i / sqrt(A_ii) for grid nodes 0 and 2, not neighbours in the 5-point stencil: W A W^T = I
    W = torch.zeros(2, n, dtype=torch.float64)
    W[0, 0], W[1, 2] = A[0, 0] ** -0.5, A[2, 2] ** -0.5
    AW = W @ A
    torch.testing.assert_close(W @ AW.T, torch.eye(2, dtype=torch.float64))

    def solve(x, r, p, z, rho, record):
        history, alphas, betas, info = ops.krylov_defcg_(m.row_ptr, m.col_idx, m.values, None, x, r, p, z, rho, W,
                                                         AW, record, 12, 0.0, bnorm, False)
        return history * 1.0, alphas * 1.0, info, x * 1.0, record * 1.0

    def state():
        return (torch.zeros_like(b), b.clone(), torch.empty_like(b), torch.empty_like(b),
                torch.zeros(1, dtype=torch.float64), torch.zeros(12, n, dtype=torch.float64))

    compiled = torch.compile(solve, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*state()), solve(*state())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_arnoldi_op_has_no_cuda_kernel(cuda_device, generator):
    # The fused cycle is CPU only; on CUDA the solvers run it step by step (test_cuda_gmres_matches_cpu).
    A, matrix, basis, C, r = _cycle_inputs(generator, n=100, kc=2)
    matrix = matrix.to(cuda_device)
    with pytest.raises(NotImplementedError, match="krylov_arnoldi_"):
        ops.krylov_arnoldi_(matrix.row_ptr, matrix.col_idx, matrix.values, basis.to(cuda_device), r.to(cuda_device),
                            2, 5, float(r.norm()), 0.0, 1.0)


def test_cg_op_has_no_cuda_kernel_and_cg_runs_step_by_step_on_cuda(cuda_device):
    """krylov_cg_ is CPU only; cg on CUDA takes the kernel ops' Python loop and agrees with the CPU."""
    problem = pde.darcy(16, seed=2, index=0)
    matrix, b = problem.matrix.to(cuda_device), problem.rhs.to(cuda_device)
    with pytest.raises(NotImplementedError, match="krylov_cg_"):
        ops.krylov_cg_(matrix.row_ptr, matrix.col_idx, matrix.values, None, torch.zeros_like(b), b.clone(), 5, 0.0,
                       float(b.norm()))
    x_cuda, info_cuda = cg(matrix, b, tol=1e-10)
    x_cpu, info_cpu = cg(problem.matrix, problem.rhs, tol=1e-10)
    assert info_cuda.converged and abs(info_cuda.iterations - info_cpu.iterations) <= 1
    # both meet 1e-10 in relative residual: their difference is within cond(A) ~ 1e3 times that
    torch.testing.assert_close(x_cuda.cpu(), x_cpu, rtol=0, atol=1e-7 * float(x_cpu.abs().max()))


# ---------------------------------------------------------------------------- the fused C++ Arnoldi cycle
def _solve_pair(kind: str, M, k: int, dtype: torch.dtype, generator):
    """GCRO-DR(m, k) on two related systems (the second starts from the recycled space).

    m = 80 on the indefinite system, where GMRES(30) (k = 0) stagnates.
    """
    A, b = _system(kind, generator)
    A2 = (A + sp.diags(0.05 * np.abs(A.diagonal()))).tocsr()  # a nearby matrix: C = A U is refreshed
    solver = GCRODR(80 if kind == "indefinite" else 30, k, M=M)
    out = []
    for matrix in (A, A2):
        operator = CSRMatrix.from_scipy(matrix, dtype)
        out.append(solver.solve(operator, torch.as_tensor(b, dtype=dtype), tol=1e-9 if dtype == torch.float64 else 1e-5))
    return out


@pytest.mark.parametrize("kind", ["spd", "nonsymmetric", "indefinite"])
@pytest.mark.parametrize("M", [None, "jacobi"])
@pytest.mark.parametrize("k", [0, 4])
def test_native_cycle_matches_python_loop(kind, M, k, generator, monkeypatch):
    # Same kernels in the same order (SpMV, CGS passes, division by the norm); only the
    # Givens radius may differ in its last bit (CPython's math.hypot against glibc's), so
    # the iteration counts are identical and the solutions agree to rounding: relative
    # 1e-12, ~1e4 ulps for the amplification through the small triangular solves.
    seed = generator.initial_seed()
    native = _solve_pair(kind, M, k, torch.float64, torch.Generator().manual_seed(seed))
    monkeypatch.setattr(_arnoldi, "NATIVE", False)
    python = _solve_pair(kind, M, k, torch.float64, torch.Generator().manual_seed(seed))
    for (x_native, info_native), (x_python, info_python) in zip(native, python):
        assert info_native.converged and info_python.converged
        assert info_native.iterations == info_python.iterations
        assert info_native.matvecs == info_python.matvecs
        np.testing.assert_allclose(info_native.residuals, info_python.residuals, rtol=1e-6, atol=1e-14)
        torch.testing.assert_close(x_native, x_python, rtol=0, atol=1e-12 * float(x_python.abs().max()))


def test_native_cycle_matches_python_loop_float32(generator, monkeypatch):
    # float32: same kernels, so the same counts; solutions to float32 rounding of the
    # tolerance-level differences (1e-4 relative, the tolerance 1e-5 times cond ~ 10).
    seed = generator.initial_seed()
    native = _solve_pair("nonsymmetric", None, 4, torch.float32, torch.Generator().manual_seed(seed))
    monkeypatch.setattr(_arnoldi, "NATIVE", False)
    python = _solve_pair("nonsymmetric", None, 4, torch.float32, torch.Generator().manual_seed(seed))
    for (x_native, info_native), (x_python, info_python) in zip(native, python):
        assert x_native.dtype == torch.float32
        assert info_native.iterations == info_python.iterations
        torch.testing.assert_close(x_native, x_python, rtol=0, atol=1e-4 * float(x_python.abs().max()))


def _cycle_inputs(generator, n: int = 324, kc: int = 3, dtype=torch.float64):
    """A nonsymmetric CSR matrix (n a square), a basis holding an orthonormal C in its first kc rows, r orthogonal to C."""
    A = _convection_diffusion(int(n**0.5)) + sp.random(n, n, density=0.01, random_state=int(generator.initial_seed() % 2**31))
    A = A.tocsr()
    matrix = CSRMatrix.from_scipy(A, dtype)
    basis = torch.full((kc + 41, n), float("nan"), dtype=dtype)  # poison: every row the cycle reads is written first
    C = torch.linalg.qr(torch.randn(n, kc, generator=generator, dtype=torch.float64))[0].T
    basis[:kc] = C.to(dtype)
    r = torch.randn(n, generator=generator, dtype=torch.float64)
    r = (r - C.T @ (C @ r)).to(dtype)
    return A, matrix, basis, C, r


@pytest.mark.parametrize("n_chunks", [1, 3])
def test_native_cycle_against_arnoldi_relation(generator, n_chunks):
    A, matrix, basis, C, r = _cycle_inputs(generator)
    kc, steps, n = 3, 40, A.shape[0]
    beta = float(r.norm())
    out = _kernels.arnoldi(matrix, basis, kc, r, beta, steps, 0.0, 2.0, n_chunks=n_chunks)
    j = out.steps
    assert j == steps and not out.breakdown
    V = basis[kc: kc + j + 1].double().numpy()
    Hbar, B = out.hessenberg[kc: kc + j + 1, :j], out.hessenberg[:kc, :j]
    # (I - C C^T) A V_j = V_{j+1} Hbar and C^T A V_j = B, to rounding of O(j) inner products of
    # length n.  Orthogonality: a CGS pass that kept a fraction f >= 0.1 of ||w|| (below it a
    # second pass runs) loses about n eps / f, accumulated over the j + 1 steps.
    AV = (A @ V[:j].T)
    norm = np.linalg.norm(A.toarray(), 2)
    n_eps = n * 2.0**-52
    assert np.abs(AV - C.numpy().T @ B - V.T @ Hbar).max() <= (j + 1) * n_eps * norm
    assert np.abs(V @ V.T - np.eye(j + 1)).max() <= (j + 1) * n_eps / 0.1
    assert np.abs(C.numpy() @ V.T).max() <= (j + 1) * n_eps / 0.1
    np.testing.assert_allclose(V[0], r.numpy() / beta, rtol=0, atol=1e-15)
    # R is the triangular factor of Hbar's QR and g the rotated beta e1: R y = g[:j] is the
    # least-squares solution, |g[j]| its residual; the history holds the minimal residual
    # over the first i directions after step i.
    R = out.rotated[:j, :j]
    assert np.abs(np.tril(R, -1)).max() == 0
    np.testing.assert_allclose(R.T @ R, Hbar.T @ Hbar, rtol=0, atol=1e-12 * np.abs(Hbar).max() ** 2)
    for i in (1, 10, j):
        e1 = np.zeros(i + 1)
        e1[0] = beta
        minimum = np.linalg.norm(e1 - Hbar[: i + 1, :i] @ np.linalg.lstsq(Hbar[: i + 1, :i], e1, rcond=None)[0])
        assert out.history[i - 1] == pytest.approx(minimum / 2.0, rel=1e-8, abs=1e-15 * beta)
    e1 = np.zeros(j + 1)
    e1[0] = beta
    y = np.linalg.lstsq(Hbar, e1, rcond=None)[0]
    np.testing.assert_allclose(np.linalg.solve(R, out.g[:j]), y, rtol=1e-8, atol=1e-8 * np.abs(y).max())
    assert abs(out.g[j]) == pytest.approx(np.linalg.norm(e1 - Hbar @ y), rel=1e-8)


def test_native_cycle_chunks_agree(generator):
    # Chunked partial sums only regroup the additions: the same cycle to rounding.
    A, matrix, basis, C, r = _cycle_inputs(generator)
    other = basis.clone()
    one = _kernels.arnoldi(matrix, basis, 3, r, float(r.norm()), 30, 0.0, 1.0, n_chunks=1)
    three = _kernels.arnoldi(matrix, other, 3, r, float(r.norm()), 30, 0.0, 1.0, n_chunks=3)
    assert one.steps == three.steps
    np.testing.assert_allclose(one.hessenberg, three.hessenberg, rtol=0, atol=1e-12 * np.abs(one.hessenberg).max())
    torch.testing.assert_close(basis[:34], other[:34], rtol=0, atol=1e-12)


def test_native_cycle_stops_early_at_the_target(generator):
    A, matrix, basis, C, r = _cycle_inputs(generator)
    beta = float(r.norm())
    full = _kernels.arnoldi(matrix, basis.clone(), 3, r, beta, 40, 0.0, 1.0)
    target = 0.5 * (full.history[11] + full.history[12])  # between the estimates after steps 12 and 13
    early = _kernels.arnoldi(matrix, basis, 3, r, beta, 40, target, 1.0)
    assert early.steps == 13 and not early.breakdown
    np.testing.assert_array_equal(early.history[:13], full.history[:13])
    assert early.history[12] <= target < early.history[11]


def test_native_cycle_happy_breakdown():
    # diag(1, 2, 3) repeated: the Krylov space of any r has dimension 3, so step 3 finds the
    # exact solution and reports a breakdown instead of dividing by ~0.
    n = 30
    diagonal = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).repeat(n // 3)
    matrix = CSRMatrix.from_scipy(sp.diags(diagonal.numpy()))
    basis = torch.zeros(12, n, dtype=torch.float64)
    r = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    out = _kernels.arnoldi(matrix, basis, 0, r, float(r.norm()), 10, 0.0, float(r.norm()))
    assert out.breakdown and out.steps == 3
    assert out.history[2] <= 1e-13
    x, info = gmres(matrix, r, tol=1e-12, restart=10)
    assert info.converged and info.iterations == 3
    torch.testing.assert_close(x, r / diagonal, rtol=1e-12, atol=0)


def test_native_cycle_bad_input_errors(generator):
    # The solvers' caller (_kernels.arnoldi) checks only the matrix's type; the op checks the rest.
    A, matrix, basis, C, r = _cycle_inputs(generator, n=100, kc=2)
    beta = float(r.norm())
    with pytest.raises(TypeError, match="arnoldi: matrix must be a CSRMatrix; got csr_matrix"):
        _kernels.arnoldi(A, basis, 2, r, beta, 5, 0.0, 1.0)
    pattern = (matrix.row_ptr, matrix.col_idx, matrix.values)

    def cycle(*args, basis=basis, r=r, pattern=pattern):
        return torch.ops.lowrank_ops.krylov_arnoldi_(*pattern, basis, r, *args)

    with pytest.raises(ValueError, match=r"krylov_arnoldi_: row_ptr has shape \(1,\); expected \(n \+ 1,\) with n >= 1"):
        cycle(2, 5, beta, 0.0, 1.0, pattern=(matrix.row_ptr[:1], matrix.col_idx[:0], matrix.values[:0]))
    with pytest.raises(ValueError, match=r"krylov_arnoldi_: values has shape \(3,\); expected \(nnz,\)"):
        cycle(2, 5, beta, 0.0, 1.0, pattern=(matrix.row_ptr, matrix.col_idx, matrix.values[:3]))
    with pytest.raises(ValueError, match=r"krylov_arnoldi_: basis has shape \(43, 100\); expected \(>= kc \+ steps \+ 1, n\) = \(>= 48, 100\)"):
        cycle(2, 45, beta, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"krylov_arnoldi_: basis has dtype torch.float32 on cpu; expected torch.float64 on cpu \(as values\)"):
        cycle(2, 5, beta, 0.0, 1.0, basis=basis.float())
    with pytest.raises(ValueError, match=r"krylov_arnoldi_: basis has strides \(.*\); expected unit column stride and rows that do not overlap"):
        cycle(2, 5, beta, 0.0, 1.0, basis=basis.T.contiguous().T)
    with pytest.raises(ValueError, match=r"krylov_arnoldi_: r has shape \(50,\)"):
        cycle(2, 5, beta, 0.0, 1.0, r=r[::2])
    with pytest.raises(ValueError, match="krylov_arnoldi_: r must be a 1-D tensor; got \\(1, 100\\)"):
        cycle(2, 5, beta, 0.0, 1.0, r=r[None])
    with pytest.raises(ValueError, match="krylov_arnoldi_: r must not share memory with basis"):
        cycle(2, 5, beta, 0.0, 1.0, r=basis[3])
    with pytest.raises(ValueError, match="krylov_arnoldi_: beta must be a positive finite number; got 0.0"):
        cycle(2, 5, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="krylov_arnoldi_: bnorm must be a positive finite number; got nan"):
        cycle(2, 5, beta, 0.0, float("nan"))
    with pytest.raises(ValueError, match="krylov_arnoldi_: target must be a non-negative finite number; got -1.0"):
        cycle(2, 5, beta, -1.0, 1.0)
    with pytest.raises(ValueError, match="krylov_arnoldi_: steps must be an integer >= 1; got 0"):
        cycle(2, 0, beta, 0.0, 1.0)
    with pytest.raises(ValueError, match="krylov_arnoldi_: kc must be an integer >= 0; got -1"):
        cycle(-1, 5, beta, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"krylov_arnoldi_: n_chunks must be in \[1, n\] = \[1, 100\]; got 101"):
        cycle(2, 5, beta, 0.0, 1.0, 101)
    from lowrank_ops import _extension
    with pytest.raises(ValueError, match="krylov_arnoldi: q_stride must be >= n = 100; got 50"):
        _extension.extension().krylov_arnoldi_cpu(  # the C++ check behind the wrapper
            row_ptr=matrix.row_ptr.data_ptr(), col_idx=matrix.col_idx.data_ptr(), values=matrix.values.data_ptr(),
            basis=basis.data_ptr(), r=r.data_ptr(), hessenberg=1, rotated=1, g=1, givens=1, history=1, workspace=1,
            n=100, nnz=matrix.nnz, q_stride=50, kc=2, steps=5, n_chunks=1, beta=beta, target=0.0, bnorm=1.0, dtype=1, index_type=0,
            num_threads=1)


def test_cuda_gmres_matches_cpu(cuda_device, generator):
    problem = pde.darcy(24, index=5)
    x_cpu, info_cpu = GCRODR(30, 6).solve(problem.matrix, problem.rhs, tol=1e-9)
    matrix = problem.matrix.to(cuda_device)
    x_gpu, info_gpu = GCRODR(30, 6).solve(matrix, problem.rhs.to(cuda_device), tol=1e-9)
    assert info_gpu.converged and x_gpu.is_cuda
    assert abs(info_gpu.iterations - info_cpu.iterations) <= 2
    assert _relative_residual(problem.matrix.to_scipy(), problem.rhs.numpy(), x_gpu) <= 1e-9 * (1 + 1e-6)
    x_cg, info_cg = cg(matrix, problem.rhs.to(cuda_device), tol=1e-9, M="jacobi")
    assert info_cg.converged and _relative_residual(problem.matrix.to_scipy(), problem.rhs.numpy(), x_cg) <= 1e-9 * (1 + 1e-6)


def test_cuda_defcg_matches_cpu(cuda_device):
    problems = pde.generate("darcy", 24, 3, seed=6)
    solvers = {device: DeflatedCG(6, M="jacobi") for device in ("cpu", cuda_device)}
    for problem in problems:
        _, on_cpu = solvers["cpu"].solve(problem.matrix, problem.rhs, tol=1e-9)
        x, on_gpu = solvers[cuda_device].solve(problem.matrix.to(cuda_device), problem.rhs.to(cuda_device), tol=1e-9)
        assert on_gpu.converged and x.is_cuda and solvers[cuda_device].W.is_cuda
        assert abs(on_gpu.iterations - on_cpu.iterations) <= 2
        assert _relative_residual(problem.matrix.to_scipy(), problem.rhs.numpy(), x) <= 1e-9 * (1 + 1e-6)


def test_csr_from_dense_and_torch_hold_plain_tensors():
    """Built from a dense or torch sparse tensor, the matrix owns plain tensors (no views
    into a sparse tensor, which opcheck and torch.compile reject) and prints no warning."""
    dense = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [4.0, 0.0, 5.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matrices = [CSRMatrix.from_dense(dense), CSRMatrix.from_torch(dense.to_sparse()),
                    CSRMatrix.from_torch(dense.to_sparse_csr())]
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for matrix in matrices:
        assert all(t._base is None and t.layout == torch.strided for t in (matrix.row_ptr, matrix.col_idx, matrix.values))
        torch.testing.assert_close(matrix.matvec(x), dense @ x)



def test_default_tolerance_follows_the_dtype(generator):
    """tol=None: 1e-8 in float64, 1e-5 in float32 (DEFAULT_TOL).  Under the former fixed
    1e-8, float32 CG ran to maxiter and GMRES stopped on stagnation, both unconverged."""
    from lowrank_ops.krylov._common import DEFAULT_TOL

    n = 200
    G = torch.randn(n, n, generator=generator, dtype=torch.float64)
    A = G @ G.T / n + 0.1 * torch.eye(n, dtype=torch.float64)  # SPD, condition ~40
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        for solve in (cg, gmres, lambda A, b: GCRODR(20, 5).solve(A, b), lambda A, b: DeflatedCG(5).solve(A, b)):
            x, info = solve(A.to(dtype), b.to(dtype))
            assert info.converged and info.status == "converged", (dtype, info)
            residual = (b - A @ x.double()).norm() / b.norm()
            assert residual <= 2 * DEFAULT_TOL[dtype], (dtype, float(residual))
        result = solve_sequence([(A.to(dtype), b.to(dtype)), (A.to(dtype), 2 * b.to(dtype))])
        assert all(info.converged for info in result.infos), dtype


def test_spmv_op_names_an_empty_x():
    with pytest.raises(ValueError, match=r"krylov_spmv_: x is empty, but the matrix has 2 entries"):
        torch.ops.lowrank_ops.krylov_spmv_(torch.tensor([0, 1, 2]), torch.tensor([0, 1]),
                                           torch.ones(2, dtype=torch.float64), torch.empty(0, dtype=torch.float64),
                                           torch.empty(2, dtype=torch.float64))


def test_huge_iteration_budgets_allocate_per_call_not_per_budget(monkeypatch, generator):
    """The CG kernels allocate a history entry per step asked for, and GMRES a [restart + 1,
    n] basis: maxiter=2**40 (cg, DeflatedCG) and restart=2**40 (gmres) asked for terabytes
    and failed with the allocator's message, naming no argument.  Now the CG kernels run at
    most max(10 n, 65536) steps per call (cg restarts from the true residual between calls,
    DeflatedCG resumes), and gmres's restart is at most n, as in scipy's."""
    from lowrank_ops.krylov import _common

    cg_module, defcg_module = sys.modules["lowrank_ops.krylov.cg"], sys.modules["lowrank_ops.krylov.defcg"]

    A, b = _system("spd", generator)
    matrix = CSRMatrix.from_scipy(A)
    x, info = cg(matrix, b, maxiter=2**40, tol=1e-10)
    assert info.converged and _relative_residual(A, b, x) <= 1e-9
    x, info = gmres(matrix, b, restart=2**40, tol=1e-10)
    assert info.converged and _relative_residual(A, b, x) <= 1e-9
    full, _ = gmres(matrix, b, restart=A.shape[0], tol=1e-10)
    assert torch.equal(x, full)  # restart clamped to n: the same solve
    x, info = DeflatedCG(k=4, maxiter=2**40).solve(matrix, b, tol=1e-10)
    assert info.converged and _relative_residual(A, b, x) <= 1e-9
    # Calls of 7 steps: the same answers (cg: restarted CG still converges; the budget and
    # the history stay exact), and a budget that ends inside a call stops exactly there.
    for module in (cg_module, defcg_module):
        monkeypatch.setattr(module, "steps_per_call", lambda n: 7)
    x, info = cg(matrix, b, tol=1e-10)
    assert info.converged and _relative_residual(A, b, x) <= 1e-9 and len(info.residuals) == info.iterations + 1
    _, info = cg(matrix, b, tol=1e-14, maxiter=17)
    assert (info.converged, info.iterations, info.status, len(info.residuals)) == (False, 17, "maxiter", 18)
    x, info = DeflatedCG(k=4).solve(matrix, b, tol=1e-10)
    assert info.converged and _relative_residual(A, b, x) <= 1e-9 and info.iterations > 7
    assert _common.steps_per_call(5) == 65536 and _common.steps_per_call(10**5) == 10**6


@pytest.mark.parametrize("solver", ["gmres", "cg", "gcrodr", "defcg"])
def test_callable_preconditioner_of_the_wrong_length_is_named(solver, generator):
    """M(y) returning another length met torch's size-mismatch RuntimeError, naming nothing."""
    A, b = _system("spd", generator)
    run = {"gmres": gmres, "cg": cg, "gcrodr": lambda A, b, M: GCRODR(10, 2, M=M).solve(A, b),
           "defcg": lambda A, b, M: DeflatedCG(0, M=M).solve(A, b)}[solver]
    with pytest.raises(ValueError, match=rf"M\(y\) returned {b.shape[0] - 1} entries; expected n = {b.shape[0]}"):
        run(A, b, M=lambda y: y[1:])


def test_gcrodr_reused_on_one_ill_conditioned_matrix_keeps_c_orthonormal():
    """C = [C; V] Q was only as orthonormal as the cycle's rows: the loss grew from cycle to
    cycle, and five right-hand sides on one matrix of condition ~1e6 went 68, 155, 210
    iterations, then stagnated at residuals 2.5 and 24 (x0 = 0 gives 1).  C is
    re-orthonormalized after a cycle that left it off by more than 1e-8 now: every solve
    converges, each faster."""
    rng = np.random.default_rng(8)
    m = 20
    T = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(m, m))
    laplacian = (sp.kron(sp.eye(m), T) + sp.kron(T, sp.eye(m))).tocsr()
    D = sp.diags(np.exp(rng.standard_normal(m * m)))
    A = (D @ laplacian @ D).tocsr()  # SPD variable-coefficient diffusion, n = 400
    solver = GCRODR(40, 10, M="jacobi")
    iterations = []
    for _ in range(5):
        b = rng.standard_normal(m * m)
        x, info = solver.solve(A, b)
        assert info.converged and _relative_residual(A, b, x) <= 1e-8
        C = solver.C
        assert float((C @ C.T - torch.eye(C.shape[0], dtype=C.dtype)).abs().max()) <= 1e-8  # (re-done above 1e-8)
        iterations.append(info.iterations)
    assert iterations[-1] < iterations[0], iterations


def test_deflated_cg_float32_deflates_with_accurate_products():
    """Float32, condition 1e4: W's rows have A-norm 1 (norms up to 100), and float32 products
    A w cancel down to lambda w with 1 % errors; the second solve of a system ended 33x
    worse than x0 = 0.  A W is formed in float64 now: as plain CG (neither converges in
    float32 here), never diverging."""
    rng = np.random.default_rng(4)
    n = 80
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = torch.tensor((Q * np.logspace(0, -4, n)) @ Q.T, dtype=torch.float32)
    b = torch.tensor(np.random.default_rng(3).standard_normal(n), dtype=torch.float32)
    _, plain = cg(A, b)
    solver = DeflatedCG(k=5)
    for _ in range(3):
        _, info = solver.solve(A, b)
        assert info.true_residual <= 3 * plain.true_residual, (info.true_residual, plain.true_residual)


@pytest.mark.parametrize("solver", ["gmres", "gcrodr"])
def test_gmres_on_a_singular_inconsistent_system_keeps_the_least_squares_progress(solver):
    """A 1-D Neumann Laplacian (null space: the constants) and a generic b: a cycle's back
    substitution through a ~0 pivot added a null-space component of norm 1e28 and took the
    residual from 0.15 (the least-squares minimum) back to 1.  A cycle that makes no
    progress is undone now: the residual stays near the minimum, x stays bounded."""
    for n in (10, 30):
        A = np.diag(2.0 * np.ones(n)) - np.diag(np.ones(n - 1), 1) - np.diag(np.ones(n - 1), -1)
        A[0, 0] = A[-1, -1] = 1.0
        b = np.random.default_rng(n).standard_normal(n)
        least = np.linalg.norm(b - A @ np.linalg.lstsq(A, b, rcond=None)[0]) / np.linalg.norm(b)
        x, info = (gmres(A, b, restart=30) if solver == "gmres" else GCRODR(20, 5).solve(A, b))
        assert not info.converged and info.status == "stagnation"
        residual = _relative_residual(A, b, x)
        assert residual <= 1.5 * least and info.true_residual == pytest.approx(residual, rel=1e-6)
        assert float(torch.linalg.vector_norm(x)) <= 1e3


@pytest.mark.parametrize("make", [lambda: GCRODR(10, 3), lambda: DeflatedCG(3)], ids=["gcrodr", "defcg"])
def test_recycling_solvers_pickle_after_a_solve(make, generator):
    """After a solve the solvers kept weak references to the matrix (the key of their recycled
    products): pickle and torch.save raised "cannot pickle 'weakref.ReferenceType' object".
    A copy keeps the recycled space and recomputes its products at its next solve."""
    A, b = _system("spd", generator)
    matrix = CSRMatrix.from_scipy(A)
    solver = make()
    solver.solve(matrix, b, tol=1e-10)
    buffer = io.BytesIO()
    torch.save(solver, buffer)
    restored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    space = "U" if isinstance(solver, GCRODR) else "W"
    assert torch.equal(getattr(restored, space), getattr(solver, space))
    b2 = b + 0.1 * torch.randn(b.shape[0], generator=generator, dtype=torch.float64).numpy()
    x, info = restored.solve(matrix, b2, tol=1e-10)
    expected, expected_info = solver.solve(matrix, b2, tol=1e-10)
    assert info.converged and abs(info.iterations - expected_info.iterations) <= 1
    assert _relative_residual(A, b2, x) <= 1e-9


def test_recycling_solvers_use_at_most_n_directions(generator):
    """GCRODR(m=2**40) asked for a [m + 1, n] basis (44 TB), DeflatedCG(m=10**6) and
    DeflatedCG(k=10**5) for an m x m Lanczos T (7 TB and 1 TB): the allocators' errors,
    naming no argument.  A system of size n now uses at most min(m, n) directions per
    GCRODR cycle (k at most one fewer) and a DeflatedCG record of at most max(n, 2 k + 1)
    rows with at most n deflation vectors: the same solves as the solvers of those sizes."""
    n = 30
    M = torch.randn(n, n, generator=generator, dtype=torch.float64)
    A = M @ M.T + n * torch.eye(n, dtype=torch.float64)
    rhs = [torch.randn(n, generator=generator, dtype=torch.float64) for _ in range(2)]
    pairs = [(GCRODR(2**40, 5), GCRODR(n, 5)), (GCRODR(2**40, 2**40 - 1), GCRODR(n, n - 1)),
             (DeflatedCG(10, m=10**6), DeflatedCG(10, m=n)), (DeflatedCG(10**5), DeflatedCG(n, m=2 * n + 1))]
    for huge, sized in pairs:
        for b in rhs:  # the second solve recycles (or deflates with) the first one's space
            x, info = huge.solve(A, b, tol=1e-12)
            expected, expected_info = sized.solve(A, b, tol=1e-12)
            assert info.converged and torch.equal(x, expected) and info.iterations == expected_info.iterations
    assert pairs[0][0]._basis.shape == (n + 1, n) and pairs[2][0]._buffer.shape == (n, n)
    assert pairs[3][0]._buffer.shape == (2 * n + 1, n)

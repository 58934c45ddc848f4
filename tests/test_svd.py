"""Batched exact SVD (one-sided Jacobi): lowrank_ops.ops.svd.batched_svd and its op.

Every numerical check compares with torch.linalg.svd in float64 on fresh random data,
with a priori error bounds for rotation-based algorithms (no tolerance fitted to the
observed errors):

* A plane rotation applied in floating point perturbs the columns it mixes by at most
  c u times their norms (Higham, Accuracy and Stability of Numerical Algorithms, 2nd
  ed., Lemma 19.8 and section 19.6: c is a small constant, 6 for computing and applying
  a rotation; we use c = 10 for the scaled rotations of the CPU kernel, whose two
  multiply-adds and the cosine folded into the column scale add two roundings).  Each
  column takes part in at most (n - 1) rotations per sweep, so after `sweeps` sweeps
  the backward error and the loss of orthogonality of V are bounded by
  ``rotation_bound = c * sweeps * (n - 1) * u`` (relative to ||A||_F, and absolute for
  V^T V - I).  This worst-case bound grows linearly where observed errors grow like its
  square root: it is never tight, and it is not a tolerance chosen to pass.
* The kernel rotates the columns of A (m >= n) or of A^T (m < n); the factor on that
  side (V, or U for a wide A) is the product of the rotations.  The other factor's
  columns are the final columns normalized; a converged sweep guarantees
  |w_i . w_j| <= tol ||w_i|| ||w_j|| for the computed dot products, whose own error is
  at most gamma_m ||w_i|| ||w_j|| (helpers.summation_bound's gamma).  Hence
  |U^T U - I| <= tol + gamma_(m + 4) (4 more roundings: the norm, its square root, the
  division, the product).  Rank-deficient inputs: the completed columns (zero singular
  values) are orthonormalized explicitly, to the same bound.
* QR preconditioning (CPU, min(m, n) >= PRECONDITION_MIN_COLS): the kernel first
  factors the (transposed if wide) matrix X P = Q R by Householder QR and rotates the
  columns of R^T (k x k); then X = (Q V1) S (P U1)^T.  The roles of the factors swap:
  the left one (Q V1) is the product of the k reflectors and the rotations, the right
  one holds the normalized final columns of R^T (k entries: gamma_(k + 4)).  A computed
  reflector applied to a vector perturbs it by at most gamma_(c m) times its norm
  (Higham Lemma 19.2, same c), so the k reflectors add ``k gamma_(c m)`` to the bound of
  the rotated factor and to the backward error.
* Singular values: Weyl's inequality, |sigma_i(U S V^T) - sigma_i(A)| <= ||U S V^T - A||_2,
  plus the distance of sigma(U S V^T) from S due to the measured loss of orthogonality
  of U and V (and the float64 reference's own error).

u is the unit roundoff of the compute dtype (float32 for float32, float16 and bfloat16
inputs, which return float32 factors; float64 for float64).  torch has no float16 or
bfloat16 SVD on CPU, so the half types are held to the float32 bounds on their already
rounded inputs (the rounding of the inputs is not an error of the SVD).
"""
from __future__ import annotations

import math

import pytest
import torch

import lowrank_ops
from lowrank_ops.ops.svd import (
    CPU_MAX_JACOBI_SIZE, MAX_JACOBI_SIZE, BatchedSVDResult, batched_svd, default_max_sweeps, default_tol, jacobi_size_limit,
)

from helpers import FLOAT_DTYPES, assert_backward_ignores_autocast, randn

UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}
ROTATION_CONSTANT = 10
# csrc/cpu/svd_cpu.cpp's kPreconditionMinCols: the CPU kernel sweeps R^T of a pivoted QR
# from this min(m, n) on.
PRECONDITION_MIN_COLS = 40


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def preconditioned(A: torch.Tensor, result: BatchedSVDResult) -> bool:
    """Whether the CPU kernel ran on R^T of a pivoted QR of A (module docstring)."""
    jacobi = bool((result.sweeps > 0).all())  # delegated matrices report 0 sweeps
    return A.device.type == "cpu" and min(A.shape[-2:]) >= PRECONDITION_MIN_COLS and jacobi


def check_svd(A: torch.Tensor, result: BatchedSVDResult, *, tol=None, converged=True, what=""):
    """Shapes, dtypes, order, signs, and the a priori bounds of the module docstring."""
    m, n = A.shape[-2:]
    k = min(m, n)
    lead = A.shape[:-2]
    dtype = compute_dtype(A.dtype)
    u = UNIT[dtype]
    U, S, Vh = result.U, result.S, result.Vh
    assert U.shape == (*lead, m, k) and S.shape == (*lead, k) and Vh.shape == (*lead, k, n), what
    assert U.dtype == S.dtype == Vh.dtype == result.off_diagonal.dtype == dtype, what
    assert result.converged.dtype == torch.bool and result.sweeps.dtype == torch.int32, what
    assert result.converged.shape == result.sweeps.shape == result.off_diagonal.shape == lead, what
    for name, tensor in (("U", U), ("S", S), ("Vh", Vh)):
        assert torch.isfinite(tensor).all(), f"{what}: {name} has non-finite entries"
    if converged:
        assert bool(result.converged.all()), f"{what}: not converged, sweeps {result.sweeps.tolist()}"
    if k == 0 or A.numel() == 0:
        return
    A64 = A.double()
    U64, S64, Vh64 = U.double(), S.double(), Vh.double()
    sweeps = result.sweeps.double().clamp_min(1).unsqueeze(-1).unsqueeze(-1)
    rotation_bound = ROTATION_CONSTANT * sweeps * max(k - 1, 1) * u
    if preconditioned(A, result):  # the k reflectors of the QR
        rotation_bound = rotation_bound + k * gamma(ROTATION_CONSTANT * max(m, n), u)
    norm_A = torch.linalg.matrix_norm(A64).unsqueeze(-1).unsqueeze(-1)

    # Backward error.
    residual = torch.linalg.matrix_norm((U64 * S64.unsqueeze(-2)) @ Vh64 - A64).unsqueeze(-1).unsqueeze(-1)
    assert bool((residual <= rotation_bound * norm_A).all()), (
        f"{what}: ||U S Vh - A|| / ||A|| = {(residual / norm_A.clamp_min(1e-300)).max().item():.3e} exceeds "
        f"{(rotation_bound).max().item():.3e}"
    )
    # The kernel works on A (tall) or A^T (wide): the factor on the side of the columns
    # it rotates is a product of rotations, the other one the normalized final columns.
    eye_k = torch.eye(k, dtype=torch.float64, device=A.device)
    rotated, normalized = (Vh64.mT, U64) if m >= n else (U64, Vh64.mT)
    normalized_length = max(m, n)  # entries of the normalized columns
    if preconditioned(A, result):
        rotated, normalized, normalized_length = normalized, rotated, k
    rotated_error = (rotated.mT @ rotated - eye_k).abs().amax((-2, -1), keepdim=True)
    assert bool((rotated_error <= rotation_bound).all()), f"{what}: rotated factor |Q^T Q - I| = {rotated_error.max():.3e}"
    if converged:
        tol_value = default_tol(m, n, A.dtype) if tol is None else tol
        normalized_error = (normalized.mT @ normalized - eye_k).abs().amax()
        assert normalized_error <= tol_value + gamma(normalized_length + 4, u), (
            f"{what}: normalized factor |Q^T Q - I| = {normalized_error.item():.3e}"
        )
        assert bool((result.off_diagonal <= tol_value).all()), what
    # Singular values: sorted, non-negative, and Weyl's inequality against float64 LAPACK.
    assert bool((S64[..., :-1] >= S64[..., 1:]).all()) and bool((S64 >= 0).all()), f"{what}: S not sorted"
    # Weyl: |sigma_i(U S Vh) - sigma_i(A)| <= ||U S Vh - A||_2, and with U^T U = I + F_U,
    # V^T V = I + F_V: |sigma_i(U S Vh) - s_i| <= s_i (|F_U| + |F_V| + |F_U| |F_V|) (2-norms,
    # bounded here by Frobenius norms).
    reference = torch.linalg.svdvals(A64)
    f_u = torch.linalg.matrix_norm(U64.mT @ U64 - eye_k).unsqueeze(-1)
    f_v = torch.linalg.matrix_norm(Vh64 @ Vh64.mT - eye_k).unsqueeze(-1)
    reference_error = gamma(4 * max(m, n), UNIT[torch.float64]) * norm_A.squeeze(-1)
    weyl = residual.squeeze(-1) + S64 * (f_u + f_v + f_u * f_v) + reference_error
    assert bool(((S64 - reference).abs() <= weyl).all()), f"{what}: S error {(S64 - reference).abs().max().item():.3e}"
    check_signs(U, what)


def check_signs(U: torch.Tensor, what=""):
    """The largest-magnitude entry (first on ties) of every column of U is positive."""
    index = U.abs().argmax(dim=-2, keepdim=True)
    assert bool((torch.gather(U, -2, index) > 0).all()), f"{what}: sign rule broken"


# --------------------------------------------------------------------------- accuracy
SHAPES = [(1, 1), (5, 3), (3, 5), (16, 16), (17, 9), (9, 17), (40, 64), (64, 64), (100, 6)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_matches_float64_reference(device, dtype, generator):
    for m, n in SHAPES:
        batch = 3 if m * n > 1000 else 9  # 9: one full group of lanes plus a partial one
        A = randn(batch, m, n, dtype=dtype, device=device, generator=generator)
        result = batched_svd(A)
        assert isinstance(result, BatchedSVDResult)
        check_svd(A, result, what=f"{dtype} {(m, n)}")
        assert bool((result.sweeps >= 1).all()) and bool((result.sweeps <= default_max_sweeps(dtype)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_jacobi_kernel_at_256_columns(device, dtype, generator):
    # The op itself (batched_svd delegates these sizes on CPU): the kernels stay exact there.
    for shape in [(256, 256), (300, 256), (256, 300)]:
        A = randn(1, *shape, dtype=dtype, device=device, generator=generator)
        U, S, Vh, sweeps, converged, off_diagonal = torch.ops.lowrank_ops.jacobi_svd(
            A, default_tol(*shape, dtype), default_max_sweeps(dtype), True
        )
        result = BatchedSVDResult(U, S, Vh, converged, sweeps, off_diagonal)
        check_svd(A, result, what=f"{dtype} {shape}")
        assert bool((result.sweeps >= 2).all()), "the Jacobi kernel ran"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_delegation_at_the_crossover(device, dtype, generator):
    limit = jacobi_size_limit(dtype, device)
    assert limit == (CPU_MAX_JACOBI_SIZE[dtype] if device == "cpu" else MAX_JACOBI_SIZE)
    for k, jacobi in ((limit, True), (limit + 1, False)):
        for shape in [(k, k), (k + 3, k), (k, k + 3)]:
            A = randn(2, *shape, dtype=dtype, device=device, generator=generator)
            result = batched_svd(A)
            # The same accuracy bounds on either side of the limit.
            check_svd(A, result, what=f"{dtype} {shape}")
            assert bool((result.sweeps > 0).all()) == jacobi, (shape, result.sweeps.tolist())
            assert bool((result.sweeps == 0).all()) != jacobi, (shape, result.sweeps.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_qr_preconditioned_sizes(device, dtype, generator):
    # Around PRECONDITION_MIN_COLS (both paths), odd sizes, tall, wide, vectors of odd
    # length, batches, non-contiguous views, compute_uv=False.
    for shape in [(39, 39), (40, 40), (41, 40), (47, 131), (131, 47), (89, 89), (64, 64)]:
        A = randn(3, *shape, dtype=dtype, device=device, generator=generator)
        result = batched_svd(A)
        check_svd(A, result, what=f"{dtype} {shape}")
        values = batched_svd(A, compute_uv=False)
        # Both are singular values of A + E with ||E||_F within the backward error bound
        # of check_svd (Weyl): they differ by at most twice that bound.
        m, n = shape
        k, u = min(m, n), UNIT[compute_dtype(dtype)]
        sweeps = float(torch.maximum(values.sweeps, result.sweeps).max())
        bound = ROTATION_CONSTANT * sweeps * (k - 1) * u + k * gamma(ROTATION_CONSTANT * max(m, n), u)
        norm_A = float(torch.linalg.matrix_norm(A.double()).max())
        assert float((values.S.double() - result.S.double()).abs().max()) <= 2 * bound * norm_A, shape
    base = randn(2, 90, 120, dtype=dtype, device=device, generator=generator)
    for name, view in {"transposed": base.mT, "strided": base[:, ::2, 1::2], "batch stride": base[::2]}.items():
        result = batched_svd(view)
        check_svd(view, result, what=f"{dtype} {name}")
        contiguous = batched_svd(view.contiguous())
        for field in ("U", "S", "Vh"):
            assert torch.equal(getattr(result, field), getattr(contiguous, field)), f"{name} {field}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [48, 64])
def test_threshold_sweeps_keep_the_convergence_test(device, dtype, n, generator):
    # Up to 64 columns the CPU kernel's first sweeps skip pairs below 10^-k (threshold
    # Jacobi).  Columns already orthogonal: converged in the first sweep, as without
    # thresholds.  Columns 1e-3 from orthogonal: the first sweep (threshold 0.1) rotates
    # nothing, yet the kernel must not stop there: it sweeps on at tol and converges.
    # Exactly orthogonal columns on any device: signed permutations, scaled.
    Q = torch.stack([torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=generator)] for _ in range(2)])
    Q = (Q * torch.randn(2, 1, n, dtype=torch.float64, generator=generator).sign()).to(device)
    scales = torch.logspace(0, -2, n, dtype=torch.float64, device=device)
    orthogonal = (Q * scales).to(dtype)
    result = batched_svd(orthogonal)
    check_svd(orthogonal, result, what="orthogonal columns")
    assert result.sweeps.tolist() == [1, 1]
    nearly = (Q * scales + 1e-3 * randn(2, n, n, dtype=torch.float64, device=device, generator=generator) / n).to(dtype)
    result = batched_svd(nearly)
    check_svd(nearly, result, what="nearly orthogonal columns")
    if device == "cpu":  # the CUDA kernel has no threshold sweeps (it may need only 2)
        assert bool((result.sweeps >= 3).all()), result.sweeps.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_qr_preconditioned_rank_deficient(device, dtype, generator):
    # Exactly zero (or tiny) singular values on the preconditioned path: zero rows of R,
    # zero columns of R^T; the right factor (normalized side there) is completed, the left
    # one (Q V1) stays orthonormal.
    kwargs = dict(dtype=torch.float64, device=device, generator=generator)
    few_columns = torch.zeros(2, 60, 45, **{k: v for k, v in kwargs.items() if k != "generator"})
    few_columns[..., [3, 17, 40]] = randn(2, 60, 3, **kwargs)
    cases = {
        "zero": torch.zeros(2, 50, 45, dtype=dtype, device=device),
        "three nonzero columns": few_columns.to(dtype),
        "three nonzero columns, wide": few_columns.mT.to(dtype),
        "rank 5": (randn(2, 70, 5, **kwargs) @ randn(2, 5, 48, **kwargs)).to(dtype),
    }
    # Exactly structured rank 1 (the QR's trailing columns shrink geometrically, towards
    # and below sqrt(min normal): its reflectors must rescale them), tall, square, wide.
    ramp = torch.arange(1.0, 101.0, dtype=torch.float64, device=device)
    for rows, cols in [(40, 40), (64, 64), (100, 51), (51, 100), (90, 90)]:
        cases[f"outer {rows} x {cols}"] = torch.outer(ramp[:rows], ramp[:cols]).to(dtype).expand(2, rows, cols)
    cases["ones 64 x 64"] = torch.ones(2, 64, 64, dtype=dtype, device=device)
    for name, A in cases.items():
        check_svd(A, batched_svd(A), what=name)  # both factors orthonormal, completed columns included
    assert torch.equal(batched_svd(cases["zero"]).S, torch.zeros(2, 45, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rank_deficient_zero_and_degenerate(device, dtype, generator):
    kwargs = dict(dtype=torch.float64, device=device, generator=generator)
    low_rank = (randn(4, 20, 3, **kwargs) @ randn(4, 3, 12, **kwargs)).to(dtype)
    cases = {
        "rank 3 tall": low_rank,
        "rank 3 wide": low_rank.mT,
        "zero": torch.zeros(3, 8, 5, dtype=dtype, device=device),
        "zero wide": torch.zeros(2, 4, 9, dtype=dtype, device=device),
        "one nonzero column": torch.zeros(2, 6, 4, dtype=dtype, device=device).index_copy(
            -1, torch.tensor([1], device=device), randn(2, 6, 1, **kwargs).to(dtype)
        ),
        "identity": torch.eye(7, dtype=dtype, device=device).expand(2, 7, 7),
    }
    # Repeated singular values: Q1 diag(3, 3, 3, 1, 1, 0.5) Q2^T.
    Q1 = torch.linalg.qr(randn(3, 9, 6, **kwargs)).Q
    Q2 = torch.linalg.qr(randn(3, 6, 6, **kwargs)).Q
    values = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.5], dtype=torch.float64, device=device)
    cases["repeated"] = ((Q1 * values) @ Q2.mT).to(dtype)
    for name, A in cases.items():
        result = batched_svd(A)
        check_svd(A, result, what=name)
        k = min(A.shape[-2:])
        eye = torch.eye(k, dtype=dtype, device=device)
        # Columns for zero singular values are completed: U stays orthonormal.
        torch.testing.assert_close(result.U.mT @ result.U, eye.expand_as(result.U.mT @ result.U), rtol=0,
                                   atol=default_tol(*A.shape[-2:], dtype) + gamma(max(A.shape[-2:]) + 4, UNIT[compute_dtype(dtype)]))
    zero = batched_svd(cases["zero"])
    assert torch.equal(zero.S, torch.zeros_like(zero.S)) and bool(zero.converged.all())
    assert torch.equal(zero.sweeps, torch.ones_like(zero.sweeps))
    rank = (batched_svd(cases["rank 3 tall"]).S > 1e-3 * batched_svd(cases["rank 3 tall"]).S[..., :1]).sum(-1)
    assert rank.tolist() == [3, 3, 3, 3]


def test_leading_dimensions_empty_and_two_dimensional(device, generator):
    A = randn(2, 3, 4, 6, 5, dtype=torch.float64, device=device, generator=generator)
    result = batched_svd(A)
    check_svd(A, result, what="leading dims")
    single = batched_svd(A[1, 2, 3])
    assert single.U.shape == (6, 5) and single.sweeps.shape == ()
    # Each matrix's result is independent of the other matrices of the batch (bitwise).
    for name in ("U", "S", "Vh", "sweeps", "converged", "off_diagonal"):
        assert torch.equal(getattr(single, name), getattr(result, name)[1, 2, 3]), name
    for shape in [(0, 5, 3), (4, 0, 3), (4, 5, 0), (2, 0, 0)]:
        empty = batched_svd(torch.zeros(shape, device=device))
        m, n = shape[-2:]
        k = min(m, n)
        assert empty.U.shape == (shape[0], m, k) and empty.S.shape == (shape[0], k) and empty.Vh.shape == (shape[0], k, n)
        assert empty.converged.shape == (shape[0],) and bool(empty.converged.all())


def test_non_contiguous_inputs(device, generator):
    base = randn(6, 30, 40, dtype=torch.float64, device=device, generator=generator)
    views = {
        "transposed": base.mT,
        "strided": base[:, ::2, 1::3],
        "batch stride": base[::2],
        "expanded": base[0].expand(3, 30, 40),
    }
    for name, A in views.items():
        assert not A.is_contiguous()
        result = batched_svd(A)
        check_svd(A, result, what=name)
        contiguous = batched_svd(A.contiguous())
        for field in ("U", "S", "Vh"):
            assert torch.equal(getattr(result, field), getattr(contiguous, field)), f"{name} {field}"


def test_power_of_two_scaling_is_exact(device, generator):
    # The kernels scale every matrix by a power of two first: scaled inputs give the same
    # factors bit for bit and exactly scaled singular values, far into the range where
    # the squared column norms of the unscaled matrix would overflow or underflow.
    for dtype, exponents in ((torch.float32, (100, -100)), (torch.float64, (1000, -1000))):
        A = randn(3, 9, 7, dtype=dtype, device=device, generator=generator)
        base = batched_svd(A)
        for exponent in exponents:
            scaled = batched_svd(A * 2.0**exponent)
            assert torch.equal(scaled.U, base.U) and torch.equal(scaled.Vh, base.Vh), (dtype, exponent)
            assert torch.equal(scaled.S, base.S * 2.0**exponent) and torch.equal(scaled.sweeps, base.sweeps)


def test_sign_normalization_wide_tall_and_delegated(device, generator):
    for shape in [(7, 4), (4, 7), (1, 5), (5, 1), (260, 300)]:
        A = randn(2, *shape, dtype=torch.float64, device=device, generator=generator)
        result = batched_svd(A)
        check_signs(result.U, str(shape))
        # Flipping A's sign flips V, not U.
        flipped = batched_svd(-A)
        torch.testing.assert_close(flipped.U, result.U, rtol=0, atol=1e-10)
        torch.testing.assert_close(flipped.Vh, -result.Vh, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- convergence report
def test_non_convergence_is_reported_not_hidden(device, generator):
    A = randn(4, 32, 32, dtype=torch.float64, device=device, generator=generator)
    result = batched_svd(A, max_sweeps=1)
    assert not bool(result.converged.any()) and torch.equal(result.sweeps, torch.ones_like(result.sweeps))
    assert bool((result.off_diagonal > default_tol(32, 32, torch.float64)).all())
    # The factors are still an exact decomposition A = (U S) V^T with an orthogonal V.
    check_svd(A, result, converged=False, what="max_sweeps=1")
    # tol = 0 asks for exact orthogonality: rounding never gets there within 3 sweeps.
    strict = batched_svd(A, tol=0.0, max_sweeps=3)
    assert not bool(strict.converged.any()) and bool((strict.sweeps == 3).all())


def test_tolerance_controls_the_work(device, generator):
    A = randn(3, 24, 24, dtype=torch.float64, device=device, generator=generator)
    tight = batched_svd(A)
    loose = batched_svd(A, tol=1e-4)
    assert bool(loose.converged.all()) and bool((loose.off_diagonal <= 1e-4).all())
    assert bool((loose.sweeps <= tight.sweeps).all()) and bool((loose.sweeps < tight.sweeps).any())
    check_svd(A, loose, tol=1e-4, what="tol=1e-4")


def test_defaults():
    assert default_tol(64, 32, torch.float32) == 32 * torch.finfo(torch.float32).eps
    assert default_tol(3, 5, torch.bfloat16) == 3 * torch.finfo(torch.float32).eps
    assert default_tol(10, 10, torch.float64) == 10 * torch.finfo(torch.float64).eps
    assert default_tol(2500, 16, torch.float32) == 50 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("shape", [(2000, 64), (200, 32), (2500, 16), (16, 600)])
def test_tall_inputs_keep_the_default_accuracy(device, shape, generator):
    """The default tolerance does not grow with the long side: singular values within
    tol (relative to the largest) and orthonormal factors within 4 tol of float64."""
    A = randn(4, *shape, device=device, generator=generator)
    result = batched_svd(A)
    tol = default_tol(*shape, torch.float32)
    exact = torch.linalg.svdvals(A.double())
    assert bool(result.converged.all())
    assert ((result.S.double() - exact).abs() / exact[..., :1]).max() <= tol
    k = min(shape)
    eye = torch.eye(k, dtype=torch.float64, device=device)
    for factor in (result.U.double().mT @ result.U.double(), result.Vh.double() @ result.Vh.double().mT):
        assert (factor - eye).abs().max() <= 4 * tol
    assert default_max_sweeps(torch.float64) == 30 and default_max_sweeps(torch.float16) == 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [16, 64, 96])
def test_rotations_do_not_drift_the_column_norms(device, dtype, n, generator):
    """Singular values within 16 eps of sigma_1; the factor read off the swept columns
    orthonormal to tol (the convergence test's bound), the accumulated one to 32 eps
    (measured 11-21 eps), on square matrices with decaying spectra.  The rotations'
    cosines used to come out of rsqrt(fl(1 + t^2)), biased for small t (rounding drops
    t^2): every rotation scaled its columns by up to an ulp, and through the ~n rotations
    per column per sweep the norms drifted (float32 96 x 96: 63 eps on sigma, 126 eps on
    the accumulated factor)."""
    eps = torch.finfo(dtype).eps
    index = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    spectra = torch.stack([1 / index, torch.exp(-(index - 1) / 8)])
    Q = torch.linalg.qr(randn(4, n, n, dtype=torch.float64, device=device, generator=generator)).Q
    A = (Q[:2] * spectra[:, None, :]) @ Q[2:].mT
    result = batched_svd(A.to(dtype))
    exact = torch.linalg.svdvals(A.to(dtype).double())
    assert bool(result.converged.all())
    assert ((result.S.double() - exact).abs() / exact[..., :1]).max() <= 16 * eps
    eye = torch.eye(n, dtype=torch.float64, device=device)
    errors = sorted(float((factor - eye).abs().max()) for factor in (result.U.double().mT @ result.U.double(),
                                                                    result.Vh.double() @ result.Vh.double().mT))
    assert errors[0] <= 32 * eps and errors[1] <= default_tol(n, n, dtype) + 8 * eps


# --------------------------------------------------------------------------- options
def test_compute_uv_false_and_full_matrices(device, generator):
    A = randn(3, 9, 5, dtype=torch.float64, device=device, generator=generator)
    values = batched_svd(A, compute_uv=False)
    assert values.U is None and values.Vh is None and bool(values.converged.all())
    full_result = batched_svd(A)
    torch.testing.assert_close(values.S, full_result.S, rtol=0, atol=1e-13)
    for shape in [(9, 5), (5, 9), (6, 6)]:
        A = randn(2, *shape, dtype=torch.float64, device=device, generator=generator)
        thin, full = batched_svd(A), batched_svd(A, full_matrices=True)
        m, n = shape
        k = min(m, n)
        assert full.U.shape == (2, m, m) and full.Vh.shape == (2, n, n)
        torch.testing.assert_close(full.U[..., :k], thin.U, rtol=0, atol=0)
        torch.testing.assert_close(full.Vh[..., :k, :], thin.Vh, rtol=0, atol=0)
        for Q in (full.U, full.Vh.mT):
            eye = torch.eye(Q.shape[-1], dtype=torch.float64, device=device)
            torch.testing.assert_close(Q.mT @ Q, eye.expand_as(Q), rtol=0, atol=1e-13)
        check_signs(full.U)


def test_half_inputs_compute_and_return_float32(device, generator):
    for dtype in (torch.float16, torch.bfloat16):
        A = randn(5, 12, 7, dtype=dtype, device=device, generator=generator)
        result = batched_svd(A)
        assert result.U.dtype == result.S.dtype == torch.float32
        # The same as the float32 computation on the rounded input, bit for bit.
        as_float = batched_svd(A.float())
        for field in ("U", "S", "Vh", "sweeps"):
            assert torch.equal(getattr(result, field), getattr(as_float, field)), f"{dtype} {field}"


def test_delegated_gradient_and_signs(device, generator):
    # Beyond the limit with autograd recording: the sign flips must not modify
    # torch.linalg.svd's saved outputs in place (backward would raise), and the gradient
    # of a sign-invariant loss is torch's.
    k = jacobi_size_limit(torch.float64, device) + 4
    A = randn(2, k + 2, k, dtype=torch.float64, device=device, generator=generator).requires_grad_()

    def loss(U, S, Vh):  # the rank-3 truncation and the singular values: no sign gauge
        return ((U[..., :3] * S[..., None, :3]) @ Vh[..., :3, :]).square().sum() + S.sum()

    result = batched_svd(A)
    assert bool((result.sweeps == 0).all())
    check_signs(result.U)
    (ours,) = torch.autograd.grad(loss(result.U, result.S, result.Vh), A)
    (reference,) = torch.autograd.grad(loss(*torch.linalg.svd(A, full_matrices=False)), A)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)  # the same LAPACK call: rounding only
    no_grad = batched_svd(A.detach())  # the in-place path: the same factors
    assert torch.equal(no_grad.U, result.U.detach()) and torch.equal(no_grad.Vh, result.Vh.detach())


def test_delegation_above_256_columns(device, generator):
    A = randn(2, 300, 260, dtype=torch.float64, device=device, generator=generator)
    result = batched_svd(A)
    assert min(A.shape[-2:]) > MAX_JACOBI_SIZE
    assert bool(result.converged.all()) and torch.equal(result.sweeps, torch.zeros_like(result.sweeps))
    assert torch.equal(result.off_diagonal, torch.zeros_like(result.off_diagonal))
    torch.testing.assert_close(result.S, torch.linalg.svdvals(A), rtol=1e-12, atol=1e-12)
    reconstruction = (result.U * result.S.unsqueeze(-2)) @ result.Vh
    torch.testing.assert_close(reconstruction, A, rtol=0, atol=1e-11)
    check_signs(result.U)
    half = batched_svd(A.to(torch.bfloat16), compute_uv=False)
    assert half.U is None and half.S.dtype == torch.float32


def test_results_do_not_depend_on_the_thread_count(generator):
    A = randn(20, 24, 20, dtype=torch.float32, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = batched_svd(A)
    finally:
        torch.set_num_threads(threads)
    parallel = batched_svd(A)
    for field in ("U", "S", "Vh", "sweeps", "off_diagonal"):
        assert torch.equal(getattr(serial, field), getattr(parallel, field)), field


# --------------------------------------------------------------------------- autograd
def test_gradcheck(device, generator):
    def factors(A):
        result = batched_svd(A)
        return result.U, result.S, result.Vh

    for shape in [(5, 4), (3, 6), (4, 4)]:
        A = randn(2, *shape, dtype=torch.float64, device=device, generator=generator).requires_grad_()
        assert torch.autograd.gradcheck(factors, (A,))
        assert torch.autograd.gradcheck(lambda A: batched_svd(A, compute_uv=False).S, (A,))


def test_gradcheck_exactly_low_rank(device, generator):
    # Rank 2 in a 6 x 5 matrix: the top-2 factors are smooth (a gap separates them from the
    # zero singular values); the losses are invariant to the gauge of the zero ones.
    kwargs = dict(dtype=torch.float64, device=device, generator=generator)
    A = (randn(6, 2, **kwargs) @ randn(2, 5, **kwargs)).requires_grad_()

    def top_two(A):
        result = batched_svd(A)
        U, S, Vh = result.U[..., :2], result.S[..., :2], result.Vh[..., :2, :]
        return (U * S.unsqueeze(-2)) @ Vh, S, U @ U.mT, Vh.mT @ Vh

    assert torch.autograd.gradcheck(top_two, (A,))
    # The singular-values-only backward U diag(gS) Vh has no division: finite at rank 2.
    grad = torch.autograd.grad(batched_svd(A, compute_uv=False).S.sum(), A)[0]
    assert torch.isfinite(grad).all()


def test_gradient_matches_torch(device, generator):
    A = randn(3, 7, 5, dtype=torch.float64, device=device, generator=generator)
    weights = [randn(3, 7, 5, dtype=torch.float64, device=device, generator=generator),
               randn(3, 5, dtype=torch.float64, device=device, generator=generator),
               randn(3, 5, 5, dtype=torch.float64, device=device, generator=generator)]

    def loss(U, S, Vh):  # sign-invariant in U and V
        return ((U * S.unsqueeze(-2)) @ Vh * weights[0]).sum() + (S * weights[1]).sum() + ((Vh.mT @ Vh) * weights[2]).sum()

    ours_input = A.clone().requires_grad_()
    result = batched_svd(ours_input)
    loss(result.U, result.S, result.Vh).backward()
    torch_input = A.clone().requires_grad_()
    loss(*torch.linalg.svd(torch_input, full_matrices=False)).backward()
    torch.testing.assert_close(ours_input.grad, torch_input.grad, rtol=1e-9, atol=1e-10)


def test_half_input_gradient_has_the_input_dtype(device, generator):
    A = randn(2, 6, 4, dtype=torch.bfloat16, device=device, generator=generator).requires_grad_()
    batched_svd(A).S.sum().backward()
    assert A.grad.dtype == torch.bfloat16 and A.grad.shape == A.shape


def test_full_matrices_gradient_only_when_unique(device, generator):
    A = randn(5, 3, dtype=torch.float64, device=device, generator=generator).requires_grad_()
    with pytest.raises(ValueError, match="full_matrices=True is not differentiable for a non-square A"):
        batched_svd(A, full_matrices=True)
    with torch.no_grad():
        assert batched_svd(A, full_matrices=True).U.shape == (5, 5)
    square = randn(4, 4, dtype=torch.float64, device=device, generator=generator).requires_grad_()
    batched_svd(square, full_matrices=True).S.sum().backward()
    assert square.grad is not None


# --------------------------------------------------------------------------- op contracts
def test_opcheck(device, generator):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shape in [(3, 6, 4), (2, 4, 6), (1, 1, 1)]:
            A = randn(*shape, dtype=dtype, device=device, generator=generator)
            for compute_uv in (True, False):
                tol = default_tol(*shape[1:], dtype)
                torch.library.opcheck(torch.ops.lowrank_ops.jacobi_svd.default, (A, tol, 20, compute_uv))


def test_raw_op_rejects_bad_arguments(generator):
    A = randn(2, 4, 3, generator=generator)
    with pytest.raises(ValueError, match=r"jacobi_svd: A has shape \(4, 3\); expected 3-D"):
        torch.ops.lowrank_ops.jacobi_svd(A[0], 1e-6, 10, True)
    with pytest.raises(ValueError, match="tol must be finite and >= 0; got -1.0"):
        torch.ops.lowrank_ops.jacobi_svd(A, -1.0, 10, True)
    with pytest.raises(ValueError, match="max_sweeps must be >= 1; got 0"):
        torch.ops.lowrank_ops.jacobi_svd(A, 1e-6, 0, True)
    with pytest.raises(TypeError, match="A has dtype torch.int64"):
        torch.ops.lowrank_ops.jacobi_svd(A.long(), 1e-6, 10, True)


class SpectralModel(torch.nn.Module):
    """A small model using the op: a learned linear map, then a spectral penalty."""

    def __init__(self, generator):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 8, generator=generator))

    def forward(self, x):
        result = batched_svd(x @ self.weight)
        reconstruction = (result.U * result.S.unsqueeze(-2)) @ result.Vh
        return reconstruction.square().sum() + result.S.sum(), result.converged


def test_torch_compile_fullgraph(device, generator):
    model = SpectralModel(generator).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = randn(4, 5, 6, device=device, generator=generator)
    eager_loss, eager_converged = model(x)
    eager_loss.backward()
    eager_grad = model.weight.grad.clone()
    model.zero_grad()
    compiled_loss, compiled_converged = compiled(x)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(model.weight.grad, eager_grad)
    assert torch.equal(compiled_converged, eager_converged)


def test_torch_compile_inductor(device, generator):
    def spectrum(A):
        return batched_svd(A, compute_uv=False).S.sum(-1)

    A = randn(6, 10, 7, device=device, generator=generator)
    torch.testing.assert_close(torch.compile(spectrum, fullgraph=True)(A), spectrum(A))


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors(device, generator):
    A = randn(2, 4, 3, device=device, generator=generator)
    with pytest.raises(TypeError, match="batched_svd: A must be a tensor; got list"):
        batched_svd([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"batched_svd: A has shape \(3,\); expected at least 2-D"):
        batched_svd(A[0, 0])
    with pytest.raises(TypeError, match="batched_svd: A has dtype torch.int32; expected one of float32"):
        batched_svd(A.int())
    with pytest.raises(ValueError, match="tol must be a finite number >= 0; got -0.1"):
        batched_svd(A, tol=-0.1)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0; got inf"):
        batched_svd(A, tol=math.inf)
    with pytest.raises(ValueError, match="max_sweeps must be an integer >= 1; got 0"):
        batched_svd(A, max_sweeps=0)
    with pytest.raises(ValueError, match="max_sweeps must be an integer >= 1; got 2.5"):
        batched_svd(A, max_sweeps=2.5)
    for huge in (1001, 2**31 - 1, 2**40):  # (tol=0 with 2^31 - 1 sweeps ran for hours)
        with pytest.raises(ValueError, match=rf"max_sweeps must be at most 1000 \(Jacobi converges in 20-30 "
                                             rf"sweeps\); got {huge}"):
            batched_svd(A, max_sweeps=huge)
    with pytest.raises(ValueError, match="batched_svd: A is on meta; expected a cpu or cuda tensor"):
        batched_svd(A.to("meta"))
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = A.clone()
        poisoned[1, 2, 0] = bad
        with pytest.raises(ValueError, match=r"batched_svd: A\[1\] has a non-finite entry"):
            batched_svd(poisoned)
    big = randn(1, 300, 270, device=device, generator=generator)
    big[0, 5, 5] = math.nan
    with pytest.raises(ValueError, match="batched_svd: A has a non-finite entry"):
        batched_svd(big)


@pytest.mark.parametrize("size", [8, 300])
def test_overflowing_singular_value_is_reported(device, generator, size):
    """A finite float32 matrix whose largest singular value exceeds float32's range (all
    entries 3e38: sigma_1 = 3e38 size): S holds inf and that matrix reports
    converged = False, its neighbours are unaffected.  8 x 8 runs the kernel (its factors
    stay finite: it sweeps a scaled copy), 300 x 300 the delegated torch.linalg.svd."""
    A = randn(3, size, size, device=device, generator=generator)
    A[1] = 3e38
    result = batched_svd(A)
    assert result.converged.tolist() == [True, False, True]
    assert math.isinf(result.S[1, 0].item())
    assert torch.isfinite(result.S[[0, 2]]).all()
    if size <= jacobi_size_limit(torch.float32, device):
        eye = torch.eye(size, device=device)
        torch.testing.assert_close(result.U[1].T @ result.U[1], eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.Vh[1] @ result.Vh[1].T, eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.S[1, 1:], torch.zeros(size - 1, device=device), rtol=0, atol=0)


def test_cuda_tensor_on_cpu_only_build_names_the_fix(cpu_only_build):
    from lowrank_ops.ops import svd as svd_ops

    with pytest.raises(RuntimeError, match=r"batched_svd: got CUDA tensors, but lowrank_ops was built without CUDA"):
        svd_ops._jacobi_svd_cuda(torch.ones(2, 3, 3), 1e-6, 10, True)


def test_public_names():
    assert lowrank_ops.ops.batched_svd is batched_svd
    assert lowrank_ops.linalg.batched_svd is batched_svd and lowrank_ops.linalg.BatchedSVDResult is BatchedSVDResult


# --------------------------------------------------------------------------- CUDA specifics
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_in_shared_and_global_memory(dtype, generator):
    if not lowrank_ops.info()["cuda_available"]:
        pytest.skip("needs a usable CUDA GPU and a CUDA build of lowrank_ops")
    # 64 x 64 fits in shared memory; 256 x 256 (512 KB in fp32) needs the global workspace.
    # Both back ends meet the same bounds (so they agree to the sum of their bounds).
    for shape, batch in [((64, 64), 40), ((256, 256), 3), ((130, 7), 5), ((7, 130), 5)]:
        A = randn(batch, *shape, dtype=dtype, generator=generator)
        check_svd(A.cuda(), batched_svd(A.cuda()), what=f"cuda {shape}")
        check_svd(A, batched_svd(A), what=f"cpu {shape}")


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream(generator):
    if not lowrank_ops.info()["cuda_available"]:
        pytest.skip("needs a usable CUDA GPU and a CUDA build of lowrank_ops")
    A = randn(64, 32, 32, device="cuda", generator=generator)
    expected = batched_svd(A)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # a kernel on the wrong stream would race ahead
        result = batched_svd(A)
    torch.cuda.current_stream().wait_stream(stream)
    for field in ("U", "S", "Vh", "sweeps"):
        assert torch.equal(getattr(result, field), getattr(expected, field)), field


def test_sign_rule_fast_path_matches_the_general_rule(generator):
    """normalize_signs' CPU path (column max and min) against the rule itself: the first
    entry of largest magnitude made positive, including exact +a / -a ties and zero columns."""
    from lowrank_ops._signs import normalize_signs

    U = randn(3, 7, 5, generator=generator)
    U[0, :, 1] = 0.0                                  # zero column: keeps +1
    U[1, 2, 2], U[1, 5, 2] = -4.0, 4.0                # tie, the negative first: flipped
    U[2, 1, 3], U[2, 6, 3] = 4.0, -4.0                # tie, the positive first: kept
    Vh = randn(3, 5, 5, generator=generator)
    index = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(U, -2, index) < 0, -1.0, 1.0)
    for tensors in ((U, Vh), (U[:, :, [0, 4]].contiguous(), Vh[:, [0, 4]].contiguous())):
        got_U, got_Vh = normalize_signs(*tensors)
        s = sign if tensors[0].shape == U.shape else sign[..., [0, 4]]
        assert torch.equal(got_U, tensors[0] * s) and torch.equal(got_Vh, tensors[1] * s.transpose(-2, -1))


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (3, 5, 12), (0, 4), (4, 0), (2, 0, 3)])
def test_thin_svd_through_the_transpose_matches_torch(shape, generator):
    """The private wide-matrix helpers (rsvd's Rayleigh-Ritz step, batched_svd beyond the
    Jacobi limit, effective_rank, compression): torch's singular values to rounding and
    factors that reconstruct A with orthonormal columns, wide or tall, batched, empty;
    gradients as torch's (gradcheck in float64)."""
    from lowrank_ops._thin_svd import singular_values, thin_svd

    A = torch.randn(*shape, generator=generator, dtype=torch.float64)
    U, S, Vh = thin_svd(A)
    k = min(shape[-2:])
    assert U.shape == (*shape[:-1], k) and S.shape == (*shape[:-2], k) and Vh.shape == (*shape[:-2], k, shape[-1])
    torch.testing.assert_close(S, torch.linalg.svdvals(A), rtol=0, atol=1e-12)
    torch.testing.assert_close(singular_values(A), torch.linalg.svdvals(A), rtol=0, atol=1e-12)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ Vh, A, rtol=0, atol=1e-12)
    eye = torch.eye(k, dtype=A.dtype)
    torch.testing.assert_close(U.transpose(-2, -1) @ U, eye.expand(*shape[:-2], k, k), rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.transpose(-2, -1), eye.expand(*shape[:-2], k, k), rtol=0, atol=1e-12)
    if k:
        small = A[..., :3, :5].clone().requires_grad_()
        torch.autograd.gradcheck(lambda X: singular_values(X), (small,))
        torch.autograd.gradcheck(lambda X: (lambda u, s, v: (u @ v, s))(*thin_svd(X)), (small,))


def test_torch_func_transforms_see_torch_svd():
    """Inside torch.func transforms batched_svd delegates to torch's SVD, whose derivatives
    the transforms see: jvp through the Jacobi Function returned a zero tangent silently."""
    from torch.func import jacrev, jvp, vmap

    generator = torch.Generator().manual_seed(0)
    A = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    T = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    values = lambda a: batched_svd(a).S  # noqa: E731
    torch.testing.assert_close(jvp(values, (A,), (T,))[1], jvp(torch.linalg.svdvals, (A,), (T,))[1])
    torch.testing.assert_close(jacrev(values)(A), jacrev(torch.linalg.svdvals)(A))
    batch = torch.randn(3, 5, 4, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(vmap(values)(batch), batched_svd(batch).S)


def test_backward_inside_autocast(generator):
    """The thin-SVD backward ran its products under the caller's autocast region (bfloat16
    gradients for a float32 SVD); now as outside it."""
    A = randn(3, 8, 6, generator=generator).requires_grad_()

    def forward(A):  # a loss of U, S and Vh: every term of the backward
        U, S, Vh = batched_svd(A)[:3]
        return U.sum(-1) + (S.square().sum(-1, keepdim=True) + Vh.sum((-2, -1)).unsqueeze(-1))

    assert_backward_ignores_autocast(forward, [A])

"""CholeskyQR's tall-skinny ops (lowrank_ops.ops.qr): the Gram matrix and the triangular solve.

Bounds are rigorous (Higham, Accuracy and Stability of Numerical Algorithms): each Gram
entry is a dot product of m terms (helpers.summation_bound), and forward substitution is
row-wise backward stable, ``q_i (R + dR_i) = y_i`` with ``|dR_i| <= gamma_n |R|``
(Theorem 8.5), so the residual obeys ``|Y - Q R| <= gamma_n |Q| |R|`` elementwise.
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.linalg import cholesky_qr2
from lowrank_ops.ops.qr import (cholesky_qr_, cholesky_qr_torch, power_of_two_scale, shifted_cholesky, tall_cholesky,
                                tall_gram, tall_scale_, tall_solve_upper, tall_solve_upper_)

from helpers import ACCUMULATE_UNIT, assert_within, randn, summation_bound

REAL = [torch.float32, torch.float64]
# (batch, m, n): vector-sized and ragged rows and columns, batches, empty dimensions, m < n.
SHAPES = [((), 4096, 74), ((), 300, 130), ((3,), 1000, 37), ((2, 2), 65, 1), ((), 17, 5), ((), 64, 16),
          ((), 0, 4), ((), 5, 0), ((0,), 8, 3), ((), 3, 7)]


def _layout(Y: torch.Tensor, layout: str) -> torch.Tensor:
    """Y with the same values in a row-major, column-major or strided (neither stride unit) layout."""
    if layout == "col":
        return Y.mT.contiguous().mT
    if layout == "strided":
        wide = torch.zeros(*Y.shape[:-1], 2 * Y.shape[-1], dtype=Y.dtype, device=Y.device)
        wide[..., ::2] = Y
        return wide[..., ::2]
    return Y.contiguous()


def _upper_factor(n: int, batch, dtype, device, generator) -> torch.Tensor:
    """A well-scaled upper-triangular R: unit-sized diagonal of both signs, random strict upper part."""
    R = torch.triu(randn(*batch, n, n, dtype=torch.float64, generator=generator)) / max(n, 1) ** 0.5
    signs = torch.where(randn(*batch, n, dtype=torch.float64, generator=generator) > 0, 1.0, -1.0)
    diagonal = signs * (1 + torch.rand(*batch, n, dtype=torch.float64, generator=generator))
    R = R - torch.diag_embed(R.diagonal(dim1=-2, dim2=-1)) + torch.diag_embed(diagonal)
    return R.to(device=device, dtype=dtype)


def _gamma(n: int, dtype: torch.dtype) -> float:
    u = ACCUMULATE_UNIT[dtype]
    return (n + 1) * u / (1 - (n + 1) * u)


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("layout", ["row", "col", "strided"])
@pytest.mark.parametrize("batch, m, n", SHAPES)
def test_gram_within_the_dot_product_bound(device, dtype, layout, batch, m, n, generator):
    Y = _layout(randn(*batch, m, n, dtype=dtype, device=device, generator=generator), layout)
    G = tall_gram(Y)
    assert G.shape == (*batch, n, n) and G.dtype == dtype and G.is_contiguous()
    Y64 = Y.double()
    reference = Y64.mT @ Y64
    bound = summation_bound(Y64.abs().mT @ Y64.abs(), reference, m, dtype)
    assert_within(G, reference, bound, f"tall_gram {layout} {tuple(Y.shape)}")
    assert torch.equal(G, G.mT), "the Gram matrix is exactly symmetric"


def test_gram_of_a_wide_row_major_block(generator):
    """A row-major block so wide that its packed chunk exceeds the scratch each thread keeps
    (4 MB): the kernel then packs into a buffer of the call's own."""
    Y = randn(40, 1100, generator=generator)
    G = tall_gram(Y)
    Y64 = Y.double()
    reference = Y64.mT @ Y64
    assert_within(G, reference, summation_bound(Y64.abs().mT @ Y64.abs(), reference, 40, torch.float32), "wide gram")


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("layout", ["row", "col", "strided"])
@pytest.mark.parametrize("batch, m, n", SHAPES)
def test_solve_is_backward_stable(device, dtype, layout, batch, m, n, generator):
    Y = _layout(randn(*batch, m, n, dtype=dtype, device=device, generator=generator), layout)
    R = _upper_factor(n, batch, dtype, device, generator)
    R_lower_garbage = R + torch.tril(randn(*R.shape, dtype=dtype, device=device, generator=generator), -1)
    Q = tall_solve_upper(Y, R_lower_garbage)  # only the upper triangle is read
    assert Q.shape == Y.shape and Q.dtype == dtype
    assert Q.mT.is_contiguous(), "Q comes out column-major"
    Q64, R64 = Q.double(), R.double()
    residual = Y.double() - Q64 @ R64
    # Theorem 8.5's gamma_n |Q| |R|, plus (float64) the evaluation of Q R itself, a dot
    # product of n terms rounded as finely as the solve: at most gamma_n |Q| |R| more.
    evaluation = 1.0 if dtype == torch.float32 else 2.0
    bound = evaluation * _gamma(n, dtype) * (Q64.abs() @ R64.abs()) + torch.finfo(dtype).tiny
    assert_within(residual, torch.zeros_like(residual), bound, f"tall_solve_upper {layout} {tuple(Y.shape)}")


@pytest.mark.parametrize("layout", ["row", "col", "strided", "unmergeable_batch"])
def test_in_place_solve_keeps_the_layout_and_the_values(device, layout, generator):
    Y = randn(3, 2, 150, 11, device=device, generator=generator)
    R = _upper_factor(11, (3, 2), torch.float32, device, generator)
    if layout == "unmergeable_batch":  # batch dimensions with strides that no single stride covers
        Y, R = Y.permute(1, 0, 2, 3), R.permute(1, 0, 2, 3)
    else:
        Y = _layout(Y, layout)
    expected = tall_solve_upper(Y, R)
    strides, pointer = Y.stride(), Y.data_ptr()
    out = tall_solve_upper_(Y, R)
    assert out is Y and Y.stride() == strides and Y.data_ptr() == pointer
    torch.testing.assert_close(Y, expected, rtol=0, atol=0)


def _shift(gram: torch.Tensor, rows: int, shift: bool, fallback: bool = False) -> torch.Tensor:
    """The sigma of qr.h for each matrix of a batch of Gram matrices, in float64, [..., 1, 1]."""
    n = gram.shape[-1]
    unit, tiny = torch.finfo(gram.dtype).eps / 2, torch.finfo(gram.dtype).tiny
    trace = gram.double().diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    if fallback:
        return n * unit * trace + tiny
    return 11 * (rows * n + n * (n + 1)) * unit * trace + 2 * tiny if shift else torch.full_like(trace, tiny)


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("batch, n", [((), 74), ((3,), 20), ((), 1), ((), 0), ((0,), 5), ((2, 2), 7)])
def test_cholesky_is_backward_stable_with_the_pass_shift(device, dtype, shift, batch, n, generator):
    rows = 3 * n + 5
    Y = randn(*batch, rows, n, dtype=dtype, device=device, generator=generator)
    gram = tall_gram(Y)
    R = tall_cholesky(gram, rows, shift)
    assert R.shape == gram.shape and R.dtype == dtype and R.is_contiguous()
    assert torch.equal(torch.tril(R, -1), torch.zeros_like(R)), "zeros below the diagonal"
    assert (R.diagonal(dim1=-2, dim2=-1) > 0).all()
    # Higham Theorem 10.3: R^T R = G + sigma I + dG, |dG| <= gamma_(n+1) |R^T| |R|; sigma
    # itself is computed in the dtype (its rounding is far below that bound).
    R64 = R.double()
    target = gram.double() + _shift(gram, rows, shift) * torch.eye(n, dtype=torch.float64, device=device)
    bound = _gamma(n + 1, dtype) * (R64.abs().mT @ R64.abs()) + torch.finfo(dtype).tiny
    assert_within(R64.mT @ R64, target, bound, f"tall_cholesky shift={shift}")
    # The torch composition of the same shifts (the CUDA impl and the gradient path): both
    # factors are backward stable, so they differ by the perturbation of a Cholesky factor,
    # ||dR|| <= kappa(G) ||dG|| / ||G|| ||R|| (Sun 1991, to first order), with ||dG|| up to
    # (n + 1) n u ||G|| from each side.
    if n > 0 and gram.numel() > 0:
        shifted = gram.double() + _shift(gram, rows, shift) * torch.eye(n, dtype=torch.float64, device=device)
        kappa = torch.linalg.cond(shifted).max().item()
        scale = R64.abs().amax().item()
        difference = (R64 - shifted_cholesky(gram, rows, shift).double()).abs().max().item()
        assert difference <= 2 * (n + 1) * n * ACCUMULATE_UNIT[dtype] * kappa * scale, (difference, kappa, scale)


@pytest.mark.parametrize("shift", [False, True])
def test_torch_cholesky_and_gram_read_the_upper_triangle_as_the_kernels(shift, generator):
    """The CUDA impls (shifted_cholesky, the Gram's), run here on the CPU: the factor reads
    only G's upper triangle, as the CPU kernel (it read the lower one: a Gram matrix with
    one triangle filled gave a wrong R on CUDA only), and the Gram matrix is exactly
    symmetric (mirrored: cuBLAS promises no bitwise symmetry)."""
    from lowrank_ops.ops.qr import _tall_gram_cuda

    Y = randn(200, 12, dtype=torch.float64, generator=generator)
    gram = Y.T @ Y
    upper_only = gram.triu()
    expected = tall_cholesky(gram, 200, shift)  # the CPU kernel
    assert torch.allclose(shifted_cholesky(upper_only, 200, shift), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(shifted_cholesky(gram, 200, shift), expected, rtol=1e-12, atol=1e-12)
    mirrored = _tall_gram_cuda(Y.float())
    assert torch.equal(mirrored, mirrored.mT)
    assert (mirrored.double() - gram).abs().max() <= 1e-5 * gram.abs().max()  # float32 sums of 200 terms


@pytest.mark.parametrize("dtype", REAL)
def test_cholesky_of_a_singular_gram_takes_the_fallback_shift(device, dtype, generator):
    """A rank-deficient block (two equal columns): its Gram matrix is singular, the plain
    pass falls back to the roundoff-sized shift and stays finite."""
    Y = randn(50, 6, dtype=dtype, device=device, generator=generator)
    Y[:, 3] = Y[:, 1]
    gram = tall_gram(Y)
    R = tall_cholesky(gram, 50, False)
    assert torch.isfinite(R).all()
    R64 = R.double()
    target = gram.double() + _shift(gram, 50, False, fallback=True) * torch.eye(6, dtype=torch.float64, device=device)
    bound = _gamma(7, dtype) * (R64.abs().mT @ R64.abs()) + torch.finfo(dtype).tiny
    assert_within(R64.mT @ R64, target, bound, "tall_cholesky fallback")


def test_cholesky_of_a_non_finite_gram_is_nan(generator):
    gram = tall_gram(randn(2, 30, 4, generator=generator))
    gram[1, 2, 2] = float("nan")
    R = tall_cholesky(gram, 30, False)
    assert torch.isfinite(R[0]).all() and torch.isnan(R[1]).all()


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("layout", ["row", "col"])
def test_scale_is_the_exact_power_of_two_of_the_largest_entry(device, dtype, layout, generator):
    Y = randn(5, 40, 9, dtype=dtype, device=device, generator=generator)
    exponents = torch.tensor([0, 70, -70, 3, 0], dtype=dtype, device=device)[:, None, None]
    Y = Y * 2.0**exponents
    Y[4] = 0  # a zero block: scale 1
    Y = _layout(Y, layout)
    expected_scale = power_of_two_scale(Y)
    expected = Y / expected_scale
    strides = Y.stride()
    scale = tall_scale_(Y)
    assert scale.shape == (5, 1, 1) and Y.stride() == strides
    assert torch.equal(scale, expected_scale) and torch.equal(Y, expected)
    assert scale[4].item() == 1.0
    largest = Y.abs().amax(dim=(-2, -1))[:4]
    assert ((largest >= 1) & (largest < 2)).all()


def test_scale_of_a_non_finite_block_is_nan(generator):
    Y = randn(3, 20, 4, generator=generator)
    Y[1, 3, 2], Y[2, 0, 0] = float("nan"), float("inf")
    scale = tall_scale_(Y)
    assert torch.isfinite(scale[0]).all() and torch.isnan(scale[1:]).all() and torch.isnan(Y[1:]).all()


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("shift, plain_passes", [(True, 2), (True, 1), (False, 1), (True, 0)])
def test_whole_cholesky_qr_is_the_steps_in_one_call(device, dtype, layout, shift, plain_passes, generator):
    """cholesky_qr_ runs tall_scale_, then per pass tall_gram, tall_cholesky and
    tall_solve_upper_: the same Q bit for bit; R is the passes' factors multiplied (its own
    triangular product instead of torch's matmul: within rounding) times the scale."""
    Y = _layout(randn(3, 300, 20, dtype=dtype, device=device, generator=generator) * 1e3, layout)
    steps = Y.clone()
    scale = tall_scale_(steps)
    R_total = None
    for shifted in (True,) * shift + (False,) * plain_passes:
        R = tall_cholesky(tall_gram(steps), 300, shifted)
        tall_solve_upper_(steps, R)
        R_total = R if R_total is None else R @ R_total
    R_total = R_total * scale
    whole = Y.clone()
    R_whole = cholesky_qr_(whole, shift, plain_passes)
    assert R_whole.shape == (3, 20, 20) and whole.stride() == Y.stride()
    assert torch.equal(whole, steps)
    torch.testing.assert_close(R_whole, R_total, rtol=0, atol=20 * ACCUMULATE_UNIT[dtype] * R_total.abs().amax().item())
    assert torch.equal(torch.tril(R_whole, -1), torch.zeros_like(R_whole))
    if plain_passes >= 1:  # Y = Q R, Q orthonormal (the torch composition agrees)
        torch.testing.assert_close(whole @ R_whole, Y, rtol=0, atol=1e3 * ACCUMULATE_UNIT[dtype] * Y.abs().amax().item())
        Q_torch, R_torch = cholesky_qr_torch(Y, shift, plain_passes)
        torch.testing.assert_close(whole, Q_torch, rtol=0, atol=1e3 * ACCUMULATE_UNIT[dtype])


def test_solve_reads_a_transposed_factor_in_place(device, generator):
    Y = randn(200, 30, device=device, generator=generator)
    L = _upper_factor(30, (), torch.float32, device, generator).mT.contiguous()
    torch.testing.assert_close(tall_solve_upper(Y, L.mT), tall_solve_upper(Y, L.mT.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["gram", "solve"])
def test_results_do_not_depend_on_the_thread_count(op, generator):
    Y = randn(2, 3000, 45, generator=generator)
    R = _upper_factor(45, (2,), torch.float32, "cpu", generator)
    run = (lambda: tall_gram(Y)) if op == "gram" else (lambda: tall_solve_upper(Y, R))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(threads, 2))
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_batch_entries_are_computed_alike(generator):
    """Each matrix of a batch gets the arithmetic it gets alone (cholesky_qr2's batched
    scaling tests compare batch entries bitwise)."""
    Y = randn(500, 21, generator=generator)
    R = _upper_factor(21, (), torch.float32, "cpu", generator)
    both = torch.stack([Y, Y])
    assert torch.equal(tall_gram(both)[1], tall_gram(Y))
    assert torch.equal(tall_solve_upper(both, torch.stack([R, R]))[1], tall_solve_upper(Y, R))


def test_opcheck(device, generator):
    Y = randn(3, 70, 9, device=device, generator=generator)
    R = _upper_factor(9, (3,), torch.float32, device, generator)
    torch.library.opcheck(torch.ops.lowrank_ops.tall_gram.default, (Y,))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_gram.default, (Y.mT.contiguous().mT,))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_solve_upper.default, (Y, R))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_solve_upper.default, (Y.mT.contiguous().mT, R.mT.contiguous().mT))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_solve_upper_.default, (Y.clone(), R))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_cholesky.default, (tall_gram(Y), 70, True))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_scale_.default, (Y.clone(),))
    torch.library.opcheck(torch.ops.lowrank_ops.cholesky_qr_.default, (Y.clone(), True, 1))
    torch.library.opcheck(torch.ops.lowrank_ops.cholesky_qr_.default, (Y.mT.contiguous().mT, False, 2))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_cholesky.default, (tall_gram(Y), 70, False))
    torch.library.opcheck(torch.ops.lowrank_ops.tall_solve_upper_.default, (Y.mT.contiguous().mT, R))


def test_cholesky_qr2_compiles_fullgraph(device, generator):
    Y = randn(2, 300, 12, device=device, generator=generator)
    compiled = torch.compile(lambda y: cholesky_qr2(y), fullgraph=True, backend="aot_eager")
    Q, R = compiled(Y)
    Q_eager, R_eager = cholesky_qr2(Y)
    torch.testing.assert_close(Q, Q_eager)
    torch.testing.assert_close(R, R_eager)


def test_cholesky_qr2_stays_differentiable(generator):
    """A Y that needs a gradient goes through torch's ops (the kernels have no backward)."""
    Y = randn(40, 6, dtype=torch.float64, generator=generator).requires_grad_()
    assert torch.autograd.gradcheck(lambda y: cholesky_qr2(y), (Y,))
    Q, R = cholesky_qr2(Y.detach())
    Q_grad, R_grad = cholesky_qr2(Y)
    torch.testing.assert_close(Q_grad.detach(), Q, rtol=0, atol=1e-13)
    torch.testing.assert_close(R_grad.detach(), R, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape, step", [((1, 1), (2, 3)), ((5, 1), (1, 3)), ((4, 1), (2, 2))])
def test_single_row_or_column_views_with_odd_strides(shape, step, generator):
    """A size-1 dimension's stride means nothing (a 1 x 1 slice of a larger matrix is
    'contiguous' with strides (6, 3)); the kernels rejected such views ("y must have a unit
    row or column stride"), although any strides are documented to work."""
    rows, cols = shape
    big = randn(rows * step[0] + 1, cols * step[1] + 1, dtype=torch.float64, generator=generator)
    Y = big[::step[0], ::step[1]][:rows, :cols]
    assert Y.shape == shape and Y.stride(-1) != 1 and (rows > 1 or Y.stride(-2) != 1)
    Q, R = cholesky_qr2(Y)
    torch.testing.assert_close(Q @ R, Y, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(cols, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(tall_gram(Y), Y.mT @ Y, rtol=1e-14, atol=0)
    R = torch.linalg.cholesky(Y.mT @ Y).mT
    torch.testing.assert_close(tall_solve_upper(Y, R), torch.linalg.solve_triangular(R, Y, upper=True, left=False),
                               rtol=1e-13, atol=1e-15)
    if Y.is_contiguous():  # the in-place steps want a contiguous block (or its transpose)
        expected = Y / power_of_two_scale(Y)
        tall_scale_(Y)
        torch.testing.assert_close(Y, expected, rtol=0, atol=0)


def test_registered_ops_check_their_arguments(generator):
    """torch.ops.lowrank_ops.* ran the kernels unchecked: a float32 R with a float64 Y was
    read as doubles (a segfault at 1 x 2048), and the in-place ops wrote expanded blocks
    (elements shared across the batch) from parallel tasks.  Each registered op now runs the
    public function's checks; the public in-place solve refuses shared elements too."""
    ops = torch.ops.lowrank_ops
    Y = randn(6, 4, dtype=torch.float64, generator=generator)
    R = torch.eye(4)
    with pytest.raises(ValueError, match="tall_solve_upper: R is torch.float32 on cpu; expected Y's torch.float64"):
        ops.tall_solve_upper(Y, R)
    with pytest.raises(ValueError, match="tall_solve_upper_: R is torch.float32"):
        ops.tall_solve_upper_(Y.clone(), R)
    with pytest.raises(TypeError, match="tall_gram: Y has dtype torch.float16"):
        ops.tall_gram(Y.half())
    with pytest.raises(ValueError, match="tall_cholesky: rows must be an int >= 0; got -1"):
        ops.tall_cholesky(torch.eye(4), -1, True)
    with pytest.raises(ValueError, match=r"cholesky_qr_: plain_passes must be an int in \[1, 16\] with shift=False; got 0"):
        ops.cholesky_qr_(Y.clone(), False, 0)
    shared = randn(1, 64, 4, dtype=torch.float64, generator=generator).expand(3, 64, 4)
    R3 = (torch.eye(4, dtype=torch.float64) * 2).expand(3, 4, 4)
    for run in (lambda: ops.tall_scale_(shared), lambda: ops.cholesky_qr_(shared, True, 1)):
        with pytest.raises(ValueError, match="expected a contiguous block or the transpose of one"):
            run()
    for run in (lambda: tall_solve_upper_(shared, R3), lambda: ops.tall_solve_upper_(shared, R3)):
        with pytest.raises(ValueError, match="elements share memory"):
            run()


def test_bad_input_errors():
    Y = torch.randn(10, 4)
    R = torch.eye(4)
    with pytest.raises(ValueError, match="tall_gram: Y must be a tensor"):
        tall_gram(torch.randn(5))
    with pytest.raises(TypeError, match="tall_gram: Y has dtype torch.float16; expected float32 or float64"):
        tall_gram(Y.half())
    with pytest.raises(TypeError, match="tall_solve_upper: Y has dtype torch.int64"):
        tall_solve_upper(Y.long(), R)
    with pytest.raises(ValueError, match=r"tall_solve_upper: R has shape \(3, 3\); expected \(\.\.\., n, n\) = \(4, 4\)"):
        tall_solve_upper(Y, torch.eye(3))
    with pytest.raises(ValueError, match="tall_solve_upper: R is torch.float64 on cpu; expected Y's torch.float32"):
        tall_solve_upper(Y, R.double())
    with pytest.raises(ValueError, match="tall_solve_upper: R has shape"):
        tall_solve_upper(torch.randn(2, 10, 4), R)
    with pytest.raises(ValueError, match=r"tall_cholesky: gram has shape \(4, 3\); expected \(\.\.\., n, n\)"):
        tall_cholesky(torch.randn(4, 3), 10, True)
    with pytest.raises(ValueError, match="tall_cholesky: rows must be an int >= 0; got -1"):
        tall_cholesky(R, -1, True)
    with pytest.raises(ValueError, match="cholesky_qr_: plain_passes must be an int in \\[1, 16\\] with shift=False; got 0"):
        cholesky_qr_(Y.clone(), False, 0)
    with pytest.raises(ValueError, match="cholesky_qr_: Y has strides"):
        cholesky_qr_(torch.randn(10, 8)[:, ::2], True, 1)
    with pytest.raises(ValueError, match="tall_scale_: Y requires grad"):
        tall_scale_(Y.clone().requires_grad_())
    with pytest.raises(ValueError, match="tall_scale_: Y has strides"):
        tall_scale_(torch.randn(10, 8)[:, ::2])
    with pytest.raises(ValueError, match="tall_solve_upper_: Y requires grad"):
        tall_solve_upper_(Y.clone().requires_grad_(), R)



def test_numpy_integers_are_integers(generator):
    """np.int64 rows (tall_cholesky) and plain_passes (cholesky_qr_, cholesky_qr2) were refused
    ("must be an int"); the ops' schemas take Python ints, so the wrappers convert: the same
    factors as Python ints.  Bools stay refused."""
    np = pytest.importorskip("numpy")
    Y = randn(12, 4, dtype=torch.float64, generator=generator)
    gram = Y.T @ Y
    assert torch.equal(tall_cholesky(gram, np.int64(12), True), tall_cholesky(gram, 12, True))
    Q = Y.clone()
    R = cholesky_qr_(Q, True, np.int64(1))
    Q_int = Y.clone()
    assert torch.equal(R, cholesky_qr_(Q_int, True, 1)) and torch.equal(Q, Q_int)
    for expected, got in zip(cholesky_qr2(Y, plain_passes=1), cholesky_qr2(Y, plain_passes=np.int32(1))):
        assert torch.equal(expected, got)
    with pytest.raises(ValueError, match="tall_cholesky: rows must be an int >= 0; got True"):
        tall_cholesky(gram, True, True)
    with pytest.raises(ValueError, match="cholesky_qr_: plain_passes must be an int"):
        cholesky_qr_(Y.clone(), True, np.bool_(True))
    with pytest.raises(ValueError, match="cholesky_qr2: plain_passes must be an int"):
        cholesky_qr2(Y, plain_passes=True)

def test_raw_ops_refuse_hangs_overlaps_and_overflow():
    """Found by calling the registered ops with adversarial arguments: plain_passes = 2^40
    hung (now capped at 16, as every pass after the third changes nothing); an as_strided Y
    with overlapping rows passed tall_solve_upper_'s check (torch calls it "too hard") and
    came back wrong, while a column slice of a wider block (also "too hard") is fine; a huge
    rows overflowed the shift's int64 product (NaN R; the torch composition stayed finite)."""
    ops = torch.ops.lowrank_ops
    with pytest.raises(ValueError, match=r"plain_passes must be an int in \[0, 16\] with shift=True; got 1099511627776"):
        ops.cholesky_qr_(torch.randn(10, 3), True, 2**40)
    R = torch.triu(torch.rand(3, 3, dtype=torch.float64)) + torch.eye(3, dtype=torch.float64)
    overlapping = torch.randn(20, dtype=torch.float64).as_strided((6, 3), (2, 1))
    with pytest.raises(ValueError, match="elements share memory"):
        ops.tall_solve_upper_(overlapping, R)
    # An R inside Y (the triangle left in Y's top block) was read while Y was overwritten:
    # Q 21.8 off at 300 x 32, silently.
    Y = torch.randn(300, 32, dtype=torch.float64)
    Y[:32] = 3 * torch.eye(32, dtype=torch.float64) + torch.randn(32, 32, dtype=torch.float64).triu()
    with pytest.raises(ValueError, match="tall_solve_upper_: Y must not share memory with R"):
        ops.tall_solve_upper_(Y, Y[:32])
    columns = torch.randn(6, 5, dtype=torch.float64)[:, :3]
    expected = torch.linalg.solve_triangular(R, columns, upper=True, left=False)
    ops.tall_solve_upper_(columns, R)
    torch.testing.assert_close(columns, expected)
    Y = torch.randn(10, 3, dtype=torch.float64)
    gram = Y.T @ Y
    huge = ops.tall_cholesky(gram, 2**62, True)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, shifted_cholesky(gram, 2**62, True), rtol=1e-12, atol=0)


def test_vmap_runs_the_torch_composition():
    """Under torch.func.vmap the in-place CPU op (no batching rule) is replaced by the torch
    composition: one batched call gives the per-matrix factors."""
    generator = torch.Generator().manual_seed(0)
    Y = randn(3, 20, 5, dtype=torch.float64, generator=generator)
    Q, R = torch.func.vmap(cholesky_qr2)(Y)
    torch.testing.assert_close(Q @ R, Y)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(5, dtype=torch.float64).expand(3, 5, 5))
    torch.testing.assert_close(Q, cholesky_qr2(Y)[0])


def test_float32_gram_stays_full_precision_under_tf32_settings():
    """The CUDA path's Gram matrices (tall_gram's CUDA impl and cholesky_qr_torch) ran as
    float32 matmuls, which torch.set_float32_matmul_precision("high") sends to TF32 (a
    10-bit mantissa): CholeskyQR's Q then orthonormal to ~1e-3 only.  Under such settings
    the float32 Gram is computed in float64 now.  (The functions run here on CPU tensors:
    the precision switch, not the device, decides.)"""
    from lowrank_ops.ops.qr import _tall_gram_cuda, gram_full_precision

    Y = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    exact = (Y.double().T @ Y.double()).float()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert torch.equal(gram_full_precision(Y), exact)
        assert torch.equal(_tall_gram_cuda(Y).triu(), exact.triu())
    finally:
        torch.set_float32_matmul_precision(before)

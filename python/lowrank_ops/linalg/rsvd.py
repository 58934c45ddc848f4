"""Randomized SVD (Halko, Martinsson & Tropp 2011; block Krylov: Musco & Musco 2015), its
first stage alone (:func:`range_finder`, the projector-only mode) and a cheap estimate of
the approximation error (:func:`lowrank_error`, or ``error_probes`` of :func:`rsvd` and
:func:`range_finder`, nearly free: the probes ride along in the last product with A).

Algorithm, on the tall orientation ``M`` of ``A`` (``A`` itself
when ``m >= n``, else ``A^T``), with ``l = rank + oversample`` columns:

* subspace iteration: ``Q = orth(M Omega)``; ``n_iter`` times ``Z = orth(M^T Q)``,
  ``Q = orth(M Z)``; then ``B = Q^T M``, ``(Ub, S, Vh) = svd(B)``, ``U = Q Ub``.
* block Krylov: ``Q = orth([Y_0, Y_1, ..., Y_q])`` with ``Y_0 = orth(M Omega)``,
  ``Y_i = orth(M (M^T Y_(i-1)))``, then the same Rayleigh-Ritz step; more accurate per
  pass, ``(q + 1) l`` columns.

Orthonormalization inside the iterations is CholeskyQR (``"cholqr2"``, GEMM-only: one
pass in float64 for float32 blocks, a shifted and a plain pass for float64 ones; see
``_orthonormalize``),
Householder QR (``"qr"``) or LU with partial pivoting (``"lu"``, as scikit-learn:
cheapest, not orthonormal but well conditioned); ``"auto"`` (default) picks Householder
QR for small single blocks on the CPU, where CholeskyQR2's dozen small torch calls cost
more than LAPACK's whole QR, and CholeskyQR2 elsewhere (see ``_QR_MAX_WORK``); the final
basis always uses Householder QR so that ``U`` is orthonormal even for rank-deficient
``A``.  Flops: ``2 m n l (2 n_iter + 2)`` for the products with A (the dominant term) plus
``O((m + n) l^2)`` for orthonormalization and the small SVD.

PCA (``center=True``, and :func:`pca_lowrank`): the same algorithm on the column-centered
matrix ``C = A - 1 mu^T`` (``mu``: the mean over the rows), formed for dense ``A`` (as
torch.pca_lowrank); for sparse ``A`` never formed: every product with it is the product
with ``A`` plus a rank-one correction (:class:`_Centering`), so a sparse ``A`` stays sparse.

Host synchronization on CUDA: rsvd's SVD of the small ``B`` synchronizes (as
``torch.linalg.svd`` does there, to check convergence), and so does its check of a
``sketch_dtype="auto"`` sketch (``_range_basis``); :func:`range_finder` reads nothing back
unless asked (``check_finite``): sizes are static and every other decision is made from
shapes.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import _extension
from .._args import is_integer, require_generator, require_tensors
from .._autocast import without_autocast
from .._csr import check_sparse_invariants
from .._finite import all_finite
from .._first_order import second_order_refusal
from .._signs import normalize_signs
from .._thin_svd import graded_thin_svd
from .qr import _cholesky_qr
from .svd_backward import thin_svd_backward, thin_svd_jvp
from ..ops._library import forward_mode_active, values_readable

__all__ = ["rsvd", "pca_lowrank", "range_finder", "lowrank_error", "RSVDResult", "RSVDResultWithError"]

_METHODS = ("subspace", "block_krylov")
_ORTHONORMALIZERS = ("auto", "cholqr2", "qr", "lu")

# orthonormalize="auto" on the CPU: a single (unbatched) block [m, l] with m l^2 at most
# this (the flops of its Householder QR, over 2) goes to LAPACK's QR, larger blocks and
# batches to CholeskyQR2.  Why: on small blocks CholeskyQR2's cost is its calls, not
# flops.  Measured with CholeskyQR2 on the CPU kernels of ops/qr.py (stop 22, 2-core AMD
# EPYC, float32, 2 threads; _orthonormalize's CholeskyQR2 / torch.linalg.qr, ms,
# medians): 256 x 26 0.13 / 0.08, 512 x 26 0.15 / 0.08, 1024 x 26 0.17 / 0.13, 512 x 42
# 0.19 / 0.16, 768 x 42 0.21 / 0.19 (m l^2 <= 1.5 Mi: QR); 1024 x 42 0.25 / 0.29,
# 4096 x 26 0.32 / 0.45, 2048 x 42 0.33 / 0.48, 1024 x 74 0.46 / 0.68, 1024 x 138
# 1.2 / 1.6 (CholeskyQR2; 256 x 74, 1.4 Mi, 0.24 / 0.37, is the exception).  With the
# earlier CholeskyQR2 of torch ops the crossover was at 3 Mi on the Xeon.  Batches go to
# CholeskyQR2 at any size: its calls serve the whole batch while LAPACK's QR loops over
# the matrices (8 x 256 x 26: 0.53 / 0.65 ms).  CUDA: CholeskyQR2 always.
_QR_MAX_WORK = 3 << 19


class RSVDResult(NamedTuple):
    """``A ~= U diag(S) Vh`` with ``U [..., m, k]``, ``S [..., k]`` (descending), ``Vh [..., k, n]``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class RSVDResultWithError(NamedTuple):
    """:class:`RSVDResult` plus ``error [...]``, an estimate of ``||A - U diag(S) Vh||_F``
    (``rsvd(..., error_probes=p)`` with ``p > 0``)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    error: torch.Tensor


def _scaled_norm(X: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``||X||_F`` per matrix of ``X [..., rows, cols]``, each divided by its largest
    ``|entry|`` before squaring: the squares neither overflow nor underflow (float32
    entries of 1e20 gave inf, of 1e-20 zeros or digits lost to subnormals).  A zero
    matrix gives 0, an infinite entry inf, a NaN NaN."""
    largest = X.abs().amax((-2, -1), keepdim=True)
    finite = (largest > 0) & (largest < float("inf"))
    scale = torch.where(finite, largest, 1.0)
    return torch.linalg.vector_norm(X / scale, dim=(-2, -1), keepdim=keepdim) * (scale if keepdim else scale[..., 0, 0])


def _probe_norm(EW: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate of ``||E||_F`` per matrix from ``EW = E W [..., rows, p]``.

    ``W`` holds ``p`` standard Gaussian probes: ``E ||E w||^2 = ||E||_F^2``, so the mean
    over probes is unbiased for the squared norm; its relative standard deviation is
    ``sqrt(2 sum sigma_i^4 / p) / sum sigma_i^2 <= sqrt(2 / p)`` over E's singular values.
    """
    return _scaled_norm(EW) / math.sqrt(EW.shape[-1])


class _Centering(NamedTuple):
    """``C = M - left right``, the column-centered matrix of PCA in the orientation ``M
    [..., p, q]`` the algorithm works on, known only through products (the one place that
    knows about the centering).

    ``A = M`` (tall): ``left = 1 [p, 1]``, ``right = mu^T [..., 1, q]``; ``A = M^T`` (wide):
    ``left = mu [..., p, 1]``, ``right = 1^T [1, q]``.  A correction costs ``O((p + q) l)``
    flops for ``l`` columns, against ``O(p q l)`` (or ``O(nnz l)``) for the product itself.
    """

    left: torch.Tensor
    right: torch.Tensor

    @staticmethod
    def of(A: torch.Tensor, transposed: bool) -> "_Centering":
        """The centering of ``A [..., m, n]`` (strided or 2-D sparse; ``m >= 1``)."""
        m = A.shape[-2]
        ones = torch.ones(m, 1, dtype=A.dtype, device=A.device)
        if A.layout == torch.strided:
            mu = A.mean(-2, keepdim=True)  # [..., 1, n]
        else:  # a product, as every other access to a sparse A
            mu = (A.transpose(-2, -1) @ ones).transpose(-2, -1) / m
        if transposed:
            return _Centering(mu.transpose(-2, -1), ones.transpose(-2, -1))
        return _Centering(ones, mu)

    def times(self, MX: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``C X`` from ``M X``."""
        return MX - self.left @ (self.right @ X)

    def transposed_times(self, MtY: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``C^T Y`` from ``M^T Y``."""
        return MtY - self.right.transpose(-2, -1) @ (self.left.transpose(-2, -1) @ Y)

    def formed(self, M: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``C`` itself, rounded to ``dtype`` (the low-precision sketch copy, dense ``M``
        only): the centering happens in M's precision before the rounding, so the rounding
        is relative to C's entries, not A's.  Rounding A and correcting afterwards would
        perturb C by about ``u ||A||_F``: measured in bfloat16 on 2048 x 512 Gaussian
        data, 0.14 ||C||_F when the mean is 100 times the spread (0.018 at 10 times),
        against 0.0017 ||C||_F for the rounded C.

        In blocks of about ``2^18`` entries, each centered in M's dtype and then rounded
        into the copy: the peak stays that of ``M.to(dtype)`` plus 1 MB (a mixed-dtype
        ``torch.addcmul(..., out=bfloat16)`` of the whole matrix went through a temporary
        of M's size: 25 MB peak against 8.4 MB for a 4096 x 1024 float32 M), and the time
        1.9 ms against 0.6 ms for ``M.to(bfloat16)`` in either orientation (the mixed-dtype
        ``out=`` took 2 and 43 ms).  The copy keeps M's memory layout (as ``M.to``: ``A^T``
        stays a transposed view); the blocks are cut across M's contiguous dimension, so
        each is read and written in whole lines."""
        out = torch.empty_like(M, dtype=dtype)
        dim = -2 if M.stride(-1) <= M.stride(-2) else -1
        size = M.shape[dim]
        step = max(1, (1 << 18) // max(1, M.select(dim, 0).numel()))

        def block(t: torch.Tensor, start: int) -> torch.Tensor:
            return t.narrow(dim, start, min(step, size - start)) if t.shape[dim] == size else t

        for start in range(0, size, step):
            centered = torch.addcmul(block(M, start), block(self.left, start), block(self.right, start), value=-1)
            block(out, start).copy_(centered)
        return out


def _orthonormalize(Y: torch.Tensor, how: str) -> torch.Tensor:
    """A well-conditioned basis of ``range(Y)`` between two products with the matrix; Y is a
    temporary, which ``"cholqr2"`` overwrites (on the CPU its passes run in place).

    The power iterations only need the basis to stay well conditioned (scikit-learn's
    LU is not even orthonormal); the final basis is always Householder QR.  What they
    cannot afford is a basis whose weak directions are shorter than its strong ones: the
    next product's rounding (``u ||M||``) then drowns them.

    ``"cholqr2"``: a float32 block gets one CholeskyQR pass in float64 (its Gram matrix,
    Cholesky factor and solve; Q rounded back into Y): orthonormal to about
    ``u_64 cond(Y)^2 + u_32`` (measured at 2048 x 70: 1e-7 at cond 1e5, 1e-5 at 1e6, 1e-3
    at 1e7, where float32's own rounding of Y starts to hide its weakest direction), and
    about as fast as the two float32 passes it replaces (2-core AMD EPYC, 4096 x 138:
    2.6 against 2.9 ms; 4096 x 74: 1.0 against 1.1).  Those passes, a shifted one and a
    plain one, left the basis non-orthonormal from ``cond(Y) ~ 1e3`` (||Q^T Q - I||
    0.02 at 1e3, 6 at 1e4): in float32 the shifted pass's shift, ``11 (m n + n (n + 1))
    u ||Y||^2``, is as large as ``||Y||^2`` itself at these sizes (0.37 of it at 4096 x
    138), so it barely lowers the condition number, and a plain float32 pass needs
    ``cond(Y) << u_32^-1/2 ~ 4e3``.  On steep spectra (``sigma_i = i^-2``, 2048 x 2048,
    rank 200, no low-precision sketch) that made rsvd's error 10.8x the optimal rank-k
    error; now 1.0007x, as Householder QR's.  A float64 block keeps the shifted pass
    (its shift is ``~1e-9 ||Y||^2`` there) and one plain pass.
    """
    if how == "auto":
        m, l = Y.shape[-2:]
        single = Y.shape[:-2].numel() == 1
        how = "qr" if Y.device.type == "cpu" and single and m * l * l <= _QR_MAX_WORK else "cholqr2"
    if how == "cholqr2":
        return _cholesky_qr(Y, shift=True, plain_passes=1, overwrite=True)[0]
    if how == "lu":
        P, L, _ = torch.linalg.lu(Y)
        return P @ L
    return torch.linalg.qr(Y).Q


# Below this many entries of A the copy to the sketch dtype costs more than the faster
# products save (measured on an AMX Xeon: 1024 x 1024 k=32 gains 20 %, 512 x 512 breaks even).
_LOW_PRECISION_MIN_ENTRIES = 1 << 20


@functools.lru_cache(maxsize=None)
def _has_fast_bfloat16(device_type: str, device_index: Optional[int]) -> bool:
    """Whether bfloat16 matmuls run at least about twice the float32 rate on this device."""
    if device_type == "cuda":
        return torch.cuda.get_device_capability(device_index) >= (8, 0)  # tensor cores with bf16
    if device_type == "cpu":
        try:
            features = _extension.extension().cpu_features()
        except RuntimeError:
            return False
        return bool(features["amx_bf16"] or features["avx512_bf16"])
    return False


def _resolve_sketch_dtype(sketch_dtype, A: torch.Tensor, method: str, orthonormalize: str,
                          n_iter: int) -> Optional[torch.dtype]:
    if sketch_dtype != "auto":
        return sketch_dtype
    m, n = A.shape[-2:]
    if (
        A.dtype == torch.float64  # asked for double precision: keep it everywhere
        # Sparse A: m n says nothing about the cost of a product, and torch's sparse
        # bfloat16 products either raise (CSR: torch 2.13 has no bfloat16 sparse addmm) or are slower (COO).
        or A.layout != torch.strided
        or method != "subspace"
        # LU bases are not orthonormal: their condition number amplifies the low
        # precision's rounding past what the last full-precision product damps (error
        # ratio 1.185 against 1.0000 at 1024 x 1024, sigma_i = i^-2, k = 64).
        or orthonormalize == "lu"
        or n_iter < 1
        or m * n < _LOW_PRECISION_MIN_ENTRIES
        or not _has_fast_bfloat16(A.device.type, A.device.index)
    ):
        return None
    return torch.bfloat16


#: Power iterations beyond which a count is a typo: each pass's gain is the spectrum's
#: gap ratio, so past a few dozen nothing changes; 2**40 ran for hours, silently.
MAX_N_ITER = 1000


def check_n_iter(op: str, name: str, n_iter, auto: bool = True) -> None:
    """``n_iter`` (``"auto"`` where ``auto``) or an int in [0, MAX_N_ITER]; ValueError naming it."""
    if auto and isinstance(n_iter, str) and n_iter == "auto":
        return
    if not is_integer(n_iter) or not 0 <= n_iter <= MAX_N_ITER:
        wanted = "'auto' or " if auto else ""
        raise ValueError(f"{op}: {name} must be {wanted}an int in [0, {MAX_N_ITER}]; got {n_iter!r}")


# sketch_dtype="auto": the relative tail ||M - Q Q^T M||_F / ||M||_F below which a
# low-precision sketch's basis is refined in full precision (see _range_basis), and the
# probes that estimate it when the caller asked for none (from their own generator).
_SKETCH_MIN_TAIL = 2.0 ** -7
_SKETCH_CHECK_PROBES = 4


def _range_basis(M, l, n_iter, method, how, init, generator, transposed, sketch_dtype, probes=0, centering=None,
                 verify_sketch=False):
    """:func:`_sketched_basis`, and with ``verify_sketch`` (``sketch_dtype="auto"``) the check
    that the low-precision sketch could resolve M's range: where it could not, the basis is
    refined in full precision.

    A bfloat16 copy of M carries a perturbation of about ``2^-9 / sqrt(3) ||M||_F``; where
    M's tail beyond the basis, ``||M - Q Q^T M||_F``, is not well above it (steep spectra,
    large ranks), the sketch's subspace is perturbed at the tail's own scale and the last
    full-precision product cannot repair it.  Measured (2048 x 2048, float32, rank k, excess
    error over the optimal, bfloat16 sketch / float32 throughout): ``sigma_i = i^-2`` k =
    128: 7.5e-2 / 8.7e-5, k = 200: 0.26 / 6.1e-4; ``i^-3`` k = 32: 0.14 / 1.1e-5; while at
    ``1 / i`` (tail 7e-2 of ``||M||_F`` at k = 128) both are 4.3e-4.  So the relative tail is
    estimated from probes riding along in the last full-precision product (the caller's
    ``probes``, else :data:`_SKETCH_CHECK_PROBES` of a fixed seed, so the caller's generator
    draws what it draws without the check), and where it is below :data:`_SKETCH_MIN_TAIL`
    (about 7x the copy's perturbation) for any matrix of the batch, the basis is refined by
    ``n_iter`` full-precision iterations started from it: as accurate as ``sketch_dtype=
    None``, at 1.5x its time for such matrices only.  The check costs the probes' columns
    in one product (about 1 % at 4096 x 4096 rank 128).  Reading the estimate synchronizes
    a CUDA device with the host: rsvd checks there too (its SVD of B synchronizes anyway,
    as torch.linalg.svd does on CUDA), range_finder, otherwise free of host reads, only on
    the CPU.  Not while torch.compile traces (a data-dependent branch).
    """
    check = verify_sketch and sketch_dtype is not None and n_iter > 0 and values_readable(M)
    if not check:
        return _sketched_basis(M, l, n_iter, method, how, init, generator, transposed, sketch_dtype, probes, centering)
    own = probes == 0
    probe_generator = torch.Generator(device=M.device).manual_seed(0) if own else generator
    Q, probe = _sketched_basis(M, l, n_iter, method, how, init, generator, transposed, sketch_dtype,
                               probes or _SKETCH_CHECK_PROBES, centering, probe_generator)
    _, MW = probe
    tail = _scaled_norm(MW - Q @ (Q.transpose(-2, -1) @ MW))
    if bool((tail >= _SKETCH_MIN_TAIL * _scaled_norm(MW)).all()):
        return Q, (None if own else probe)
    return _sketched_basis(M, l, n_iter, method, how, Q, generator, False, None, probes, centering)


def _sketched_basis(M, l, n_iter, method, how, init, generator, transposed, sketch_dtype, probes=0, centering=None,
                    probe_generator=None):
    """``(Q, probe)``: an orthonormal basis ``Q [..., p, l']`` approximating the range of
    ``M [..., p, q]``, and ``probe = (W, M W)`` for ``probes > 0`` (else None).

    With a :class:`_Centering` every product is with the centered ``C`` instead of ``M``
    (``M`` above reads ``C``): ``M`` is read only through the product helpers below.

    ``W [..., q, probes]`` are standard Gaussian probes in M's dtype, drawn (from
    ``probe_generator``, default ``generator``) after every random number of the sketch
    (the basis is the one drawn without them) and independent of it.  ``M W`` is computed
    with the last full-precision product with M, by appending W to its right-hand block:
    no extra pass over M.  Measured (2-core AMX Xeon, float32,
    8 probes, paired medians): rsvd +1.2 % at 2048 x 2048 rank 64 and +0.9 % at 1024 x 2730
    rank 32, against +3.0 % and +3.7 % for a separate ``lowrank_error`` (one more pass).
    """
    p, q = M.shape[-2:]
    batch = M.shape[:-2]
    probe = None
    # Products of the power iterations may run in a lower precision (sketch_dtype): the
    # subspace they find is then refined by one last full-precision product M Z, whose
    # damping of the trailing directions (by sigma_(l+1) / sigma_i) removes the low
    # precision's perturbation from the dominant ones.
    if sketch_dtype is None or n_iter == 0:
        low = M
    else:  # the low-precision copy is of C itself when centering: no correction needed for it
        low = M.to(sketch_dtype) if centering is None else centering.formed(M, sketch_dtype)

    def exact(matrix):
        """Whether products with ``matrix`` need the centering correction (M, not a copy of C)."""
        return centering is not None and matrix is M

    def times(matrix, block):
        """``matrix block``; for a dense matrix as ``(block^T matrix^T)^T``, a column-major
        result: the layout in which the orthonormalizers' CPU kernels read a block without
        transposing it, and the GEMM is no slower (2-core AMD EPYC, 4096 x 4096 times
        4096 x 74: bfloat16 7.0-7.5 against 7.9-8.0 ms, float32 18.2-18.7 against 19.6-20.1)."""
        if matrix.layout != torch.strided:
            return matrix @ block
        return (block.transpose(-2, -1) @ matrix.transpose(-2, -1)).transpose(-2, -1)

    buffers = {}

    def low_times(block, right):
        """``(block^T right)^T`` in M's dtype, for ``right`` the low-precision copy (or its
        transpose): the block's low-precision copy, the product and its conversion back go
        to buffers reused from one iteration to the next (a fresh 1.2 MB buffer costs
        ~0.4 ms of first-touch page faults on the 2-core AMD EPYC: ~6 ms of a 4096 x 4096
        rank-64 rsvd).  The result is a view of a buffer that the next call with the same
        shapes overwrites, after it has read its own block: callers hand it on at once
        (the orthonormalizer overwrites it in place, the next product reads it)."""
        rows, l, cols = block.shape[-2], block.shape[-1], right.shape[-1]
        if (rows, l, cols) not in buffers:  # l varies: a warm start's fresh columns, then the whole basis
            buffers[rows, l, cols] = (torch.empty(*batch, l, rows, dtype=low.dtype, device=M.device),
                                      torch.empty(*batch, l, cols, dtype=low.dtype, device=M.device),
                                      torch.empty(*batch, l, cols, dtype=M.dtype, device=M.device))
        block_low, out_low, out = buffers[rows, l, cols]
        block_low.copy_(block.transpose(-2, -1))
        torch.matmul(block_low, right, out=out_low)
        return out.copy_(out_low).transpose(-2, -1)

    # (product must not call last_product, which calls it: two closures referring to each
    # other are a reference cycle that kept M, its low-precision copy and the buffers alive
    # until the cyclic collector ran: +500 MB peak over 40 GaLore refreshes of 2048 x 2048.)
    def product(matrix, block):
        if matrix.dtype == M.dtype:
            block = block.to(M.dtype)
            return centering.times(times(matrix, block), block) if exact(matrix) else times(matrix, block)
        if matrix.layout == torch.strided:
            return low_times(block, matrix.transpose(-2, -1))
        return times(matrix, block.to(matrix.dtype)).to(M.dtype)

    def transposed_product(matrix, block):
        """``matrix^T block``, for a dense matrix as ``(block^T matrix)^T``: the same sums, but
        BLAS then reads the matrix along its rows.  Measured (2-core Xeon, [m, n] times
        [m, 42]): float32 MKL 0.45 against 0.82-0.92 ms at 1024 x 1024 and 8.5-8.7 against
        17.4-18.9 ms at 4096 x 4096; bfloat16 oneDNN 0.23 against 0.29 and 3.8-4.1 against
        4.8 ms.  The result is a transposed view; the orthonormalizers take any layout."""
        if matrix.layout != torch.strided:
            block = block.to(M.dtype)
            MtY = matrix.transpose(-2, -1) @ block
        elif matrix.dtype != M.dtype:
            MtY = low_times(block, matrix)
        else:
            MtY = (block.to(matrix.dtype).transpose(-2, -1) @ matrix).transpose(-2, -1)
        return centering.transposed_times(MtY, block.to(M.dtype)) if exact(matrix) else MtY

    def last_product(block):
        """``M @ block``, the last full-precision product with M: the probes ride along."""
        nonlocal probe
        block = block.to(M.dtype)
        if probes == 0:
            return product(M, block)
        W = _randn(*batch, q, probes, generator=generator if probe_generator is None else probe_generator,
                   device=M.device, dtype=M.dtype)
        # [block, W] in block's memory layout (the orthonormalizers return column-major
        # blocks): the GEMM then takes the same path, and block's columns of the product
        # keep the bits they have without probes (seen with CPU BLAS; not promised).
        if block.transpose(-2, -1).is_contiguous() and not block.is_contiguous():
            both = product(M, torch.cat([block.transpose(-2, -1), W.transpose(-2, -1)], dim=-2).transpose(-2, -1))
        else:
            both = product(M, torch.cat([block, W], dim=-1))
        probe = (W, both[..., block.shape[-1]:])
        return both[..., : block.shape[-1]]

    def next_product(matrix, block, final: bool):
        return last_product(block) if final else product(matrix, block)

    if init is not None and not transposed:
        # init approximates range(A) = range(M): start from it, plus fresh directions.
        start = init.to(M.dtype)
        extra = l - start.shape[-1]
        blocks = [start]
        if extra > 0:
            omega = _randn(*batch, q, extra, generator=generator, device=M.device, dtype=M.dtype)
            blocks.append(next_product(low, omega, n_iter == 0))
        Y = torch.cat(blocks, dim=-1)[..., :l]
    else:
        if init is not None:  # range(A) is M's row space here: use it as the test matrix
            omega = init.to(M.dtype)
            extra = l - omega.shape[-1]
            if extra > 0:
                fresh = _randn(*batch, q, extra, generator=generator, device=M.device, dtype=M.dtype)
                omega = torch.cat([omega, fresh], dim=-1)
            omega = omega[..., :l]
        else:
            omega = _randn(*batch, q, l, generator=generator, device=M.device, dtype=M.dtype)
        Y = next_product(low, omega, n_iter == 0)
    if probes and n_iter == 0 and probe is None:
        last_product(Y.new_empty(*batch, q, 0))  # init filled the whole basis: no product with M to share
    if method == "block_krylov":
        blocks = [_orthonormalize(Y, how)]
        for i in range(n_iter):
            blocks.append(_orthonormalize(next_product(M, transposed_product(M, blocks[-1]), i == n_iter - 1), how))
        return torch.linalg.qr(torch.cat(blocks, dim=-1)).Q, probe
    Q = Y
    for i in range(n_iter):
        Q = _orthonormalize(Q, how)
        Z = _orthonormalize(transposed_product(low, Q), how)
        Q = next_product(low, Z, i == n_iter - 1)
    return torch.linalg.qr(Q).Q, probe


_FactorsSecondOrderRefused = second_order_refusal(
    "_FactorsSecondOrderRefused",
    "rsvd: second derivatives through U or Vh are not implemented (the factors' gradient is the truncated SVD's "
    "to first order only); those through S alone are, for the full thin SVD (rank = min(m, n))")


_ValuesSecondOrderRefused = second_order_refusal(
    "_ValuesSecondOrderRefused",
    "rsvd: second derivatives through S need the full thin SVD (rank = min(m, n)) with compute_uv=True; a truncated "
    "rank's are those of the truncated SVD at A only (silently wrong unless rank A <= rank), and with "
    "compute_uv=False U and Vh were constants of the gradient (second derivatives silently 0)")


class _RSVDFunction(torch.autograd.Function):
    """Differentiable factors: the thin-SVD backward on the returned (U, S, Vh).

    Written in torch.func's style (``setup_context``, a ``vmap`` rule), so that
    ``torch.func.grad`` / ``vjp`` / ``jacrev`` run it as autograd does, and ``vmap`` hands
    the whole batch to one batched factorization (``[..., m, n]`` is native).
    """

    @staticmethod
    def forward(A, rank, oversample, n_iter, method, how, init, generator, compute_uv, sketch, error_probes,
                center):
        with without_autocast(A.device):
            factors = _rsvd_factors(A.detach(), rank, oversample, n_iter, method, how, init, generator, sketch,
                                    error_probes, compute_uv, center)
        # Outputs that are views of the work buffers (slices left as they were without the
        # sign rule) broke forward mode ("tangent ... same layout as primal"): own storage.
        return tuple(t if t is None or t._base is None else t.clone() for t in factors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, compute_uv, center = inputs[0], inputs[8], inputs[11]
        U, S, Vh, error = output
        ctx.save_for_backward(U, S, Vh)
        ctx.save_for_forward(U, S, Vh)
        ctx.set_materialize_grads(False)  # unused factors: None, not zeros (see backward's refusal)
        ctx.input_dtype = A.dtype
        ctx.center = center
        ctx.compute_uv = compute_uv
        # S's gradient U diag(dS) Vh differentiates through U and Vh exactly only when they are
        # differentiable outputs of the full thin SVD.
        ctx.values_second_order = compute_uv and S.shape[-1] == min(A.shape[-2:])
        ctx.mark_non_differentiable(*(() if compute_uv else (U, Vh)), *(() if error is None else (error,)))

    @staticmethod
    def backward(ctx, grad_U, grad_S, grad_Vh, grad_error):
        U, S, Vh = ctx.saved_tensors
        with without_autocast(U.device):
            grad_A = thin_svd_backward(U, S, Vh, grad_U, grad_S, grad_Vh)
            if ctx.center:
                # C = P A with the symmetric P = I - 1 1^T / m: grad_A = P grad_C, i.e. the
                # gradient with its column means removed.
                grad_A = grad_A - grad_A.mean(-2, keepdim=True)
            if (grad_U is not None or grad_Vh is not None) and (torch.is_grad_enabled() or forward_mode_active()):
                # The factors' formula is the truncated SVD's gradient at A only (exact where
                # rank A <= rank), not a function whose derivative is the truncated SVD's
                # second derivative: differentiated again it was silently wrong (0.50 off at a
                # scale of 1.3 on an exactly rank-k A).  The singular values' U diag(dS) Vh is.
                grad_A = grad_A + _FactorsSecondOrderRefused.apply(U)
            elif (grad_S is not None and not ctx.values_second_order
                  and (torch.is_grad_enabled() or forward_mode_active())):
                grad_A = grad_A + _ValuesSecondOrderRefused.apply(S)
        return grad_A.to(ctx.input_dtype), *([None] * 11)

    @staticmethod
    def jvp(ctx, grad_A, *_):
        # Forward mode (jvp, forward_ad): the thin SVD's tangents on the returned factors,
        # the twin of the backward (exact when A has rank <= rank).
        U, S, Vh = ctx.saved_tensors
        with without_autocast(U.device):
            dA = grad_A.to(S.dtype)
            if ctx.center:  # C = P A: dC = P dA
                dA = dA - dA.mean(-2, keepdim=True)
            dU, dS, dVh = thin_svd_jvp(U, S, Vh, dA)
            if ctx.compute_uv:  # the factors' tangents, first order only, as in backward
                refusal = _FactorsSecondOrderRefused.apply(U)
                dU, dVh = dU + refusal, dVh + refusal
            if not ctx.values_second_order:
                dS = dS + _ValuesSecondOrderRefused.apply(S)
        return (dU, dS, dVh, None) if ctx.compute_uv else (None, dS, None, None)

    @staticmethod
    def vmap(info, in_dims, A, rank, oversample, n_iter, method, how, init, generator, compute_uv, sketch,
             error_probes, center):
        # One batched call: the vmapped dimension becomes A's (and init's) leading batch
        # dimension; an unbatched init is shared by every matrix of the batch.
        A = A.movedim(in_dims[0], 0) if in_dims[0] is not None else A.expand(info.batch_size, *A.shape)
        if init is not None:
            init = init.movedim(in_dims[6], 0) if in_dims[6] is not None else init.expand(info.batch_size,
                                                                                          *init.shape)
        output = _RSVDFunction.apply(A, rank, oversample, n_iter, method, how, init, generator, compute_uv,
                                     sketch, error_probes, center)
        return output, tuple(None if tensor is None else 0 for tensor in output)


def _rsvd_factors(A, rank, oversample, n_iter, method, how, init, generator, sketch, error_probes,
                  signs=True, center=False):
    """``(U, S, Vh, error)``; ``error`` (None when ``error_probes == 0``) estimates ``||A - U S Vh||_F``.

    ``sketch``: ``(sketch_dtype, verify)``, the resolved sketch dtype and whether it was
    chosen by ``"auto"`` (then checked, see :func:`_range_basis`).
    ``signs``: apply the library's sign rule (:func:`lowrank_ops._signs.normalize_signs`).
    ``center``: factor the column-centered ``A - 1 mu^T`` instead (``error`` then of it).
    """
    work = A.float() if A.dtype in (torch.float16, torch.bfloat16) else A
    if center and work.layout == torch.strided:
        # Dense A: C formed, as torch.pca_lowrank does.  Products with A and a rank-one
        # correction each lost the digits of the mean over the spread (float32 4096 x 256,
        # means 1e4 x the spread: top singular values 1.9e-3 off against torch's 1.1e-4);
        # C's entries are exact differences of nearby numbers.  Sparse A stays implicit.
        work, center = work - work.mean(-2, keepdim=True), False
    m, n = work.shape[-2:]
    transposed = m < n
    M = work.transpose(-2, -1) if transposed else work
    l = min(rank + oversample, min(m, n))
    centering = _Centering.of(work, transposed) if center else None
    sketch_dtype, verify_sketch = sketch
    Q, probe = _range_basis(M, l, n_iter, method, how, init, generator, transposed, sketch_dtype, error_probes,
                            centering, verify_sketch)
    B = Q.transpose(-2, -1) @ M
    if centering is not None:  # Q^T C = (C^T Q)^T
        B = centering.transposed_times(B.transpose(-2, -1), Q).transpose(-2, -1)
    try:
        Ub, S, Vh = graded_thin_svd(B)  # B is wide (l < n), its rows graded as the singular values
    except torch.linalg.LinAlgError:
        if all_finite(B):
            raise
        raise _overflow_error("rsvd", work, init=init) from None
    U = Q @ Ub[..., :, :rank]
    S, Vh = S[..., :rank], Vh[..., :rank, :]
    error = None
    if probe is not None:
        # Probed in M's orientation: ||E||_F is the same for E = A - U S Vh and for E^T
        # (C for A when centering: MW is then C W).
        W, MW = probe
        error = _probe_norm(MW - U @ (S.unsqueeze(-1) * (Vh @ W)))
    if transposed:
        U, Vh = Vh.transpose(-2, -1), U.transpose(-2, -1)
    if signs:
        U, Vh = normalize_signs(U, Vh)
    return U.contiguous(), S.contiguous(), Vh.contiguous(), error


def rsvd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: Union[int, str] = "auto",
    method: str = "subspace",
    orthonormalize: str = "auto",
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    compute_uv: bool = True,
    check_finite: Optional[bool] = None,
    sketch_dtype: Union[str, torch.dtype, None] = "auto",
    error_probes: int = 0,
    center: bool = False,
):
    """Randomized truncated SVD: the top ``rank`` singular triplets of ``A`` (of the
    column-centered ``A`` with ``center=True``: PCA).

    Parameters
    ----------
    A : Tensor[..., m, n]
        float32, float64, float16 or bfloat16 (half types are computed in float32 and
        the factors returned in float32).  Leading dimensions are a batch.  A 2-D
        torch sparse matrix (COO, CSR or CSC) is read only through products with dense
        blocks (see Notes).
    rank : int
        Number of singular triplets, ``1 <= rank <= min(m, n)``.
    oversample : int
        Extra random directions ``p`` (Halko et al.: 5-10); the sketch has
        ``min(rank + oversample, min(m, n))`` columns.
    n_iter : int or "auto"
        Power (subspace) iterations or Krylov blocks beyond the first; ``"auto"`` is
        scikit-learn's rule: 7 when ``rank < 0.1 min(m, n)``, else 4; 1 with ``init``.
    method : {"subspace", "block_krylov"}
    orthonormalize : {"auto", "cholqr2", "qr", "lu"}
        Orthonormalization inside the iterations (see the module docstring); ``"auto"``:
        Householder QR for small unbatched blocks on the CPU, CholeskyQR2 otherwise.
    init : Tensor[..., m, j], optional
        A previous basis of A's column space (e.g. the ``U`` of the last call): the
        iteration starts from it (warm start, as GaLore's projector refreshes), padded
        with random directions when ``j < rank + oversample``.
    generator : torch.Generator, optional
        Source of the random test matrix, on A's device: same generator state, same
        result.
    compute_uv : bool
        False returns ``S`` alone (its gradient is ``U diag(gS) Vh``, stable for
        repeated and zero singular values).
    check_finite : bool, optional
        Raise ``ValueError`` on NaN/inf in A (or ``init``).  Default: True on CPU, False on
        CUDA (the check synchronizes with the host).
    sketch_dtype : "auto", torch.bfloat16, torch.float16 or None
        Run the power iterations' products in this precision (``method="subspace"``,
        ``n_iter >= 1``): a copy of A in that dtype, tensor-core / AMX speed; the last
        product and the Rayleigh-Ritz step stay in full precision, which keeps the
        accuracy where A's tail beyond the basis is well above the copy's rounding (the
        excess error over the optimal rank-k error is unchanged to two digits on
        bench/bench_rsvd.py's ``1 / i`` spectra).  Under ``"auto"`` on the CPU the sketch is
        checked, and refined in full precision where the tail is below ``2^-7 ||A||_F``
        (steep spectra: see ``_range_basis``), on CUDA too (one host read; rsvd's SVD
        reads one anyway; :func:`range_finder` checks on the CPU only).  Costs one extra copy of
        A in the sketch dtype for the call's duration (half of A's bytes from float32;
        measured peak beyond the inputs at 1024 x 1024, rank 32: 4.2 MB against 1.2 MB with
        ``None`` and 0.6-0.8 MB for ``torch.svd_lowrank``; pass ``None`` where memory is
        tighter than time).  ``"auto"`` (default): bfloat16 for float32 and half
        inputs of at least 2^20 entries on devices whose bfloat16 matmuls are fast (CUDA
        sm_80+, CPUs with AMX or AVX512-BF16: ``lowrank_ops.info()["cpu_features"]``),
        with orthonormal bases ("auto", "cholqr2", "qr"), else None.  float64 and sparse inputs
        are never sketched in low precision under "auto"; ``None`` keeps every product in
        A's precision.
    error_probes : int
        ``p > 0`` also returns ``error``, an estimate of ``||A - U diag(S) Vh||_F`` from
        ``p`` Gaussian probes (the estimator of :func:`lowrank_error` with ``norm="fro"``:
        unbiased for the squared norm, relative standard deviation at most ``sqrt(2 / p)``
        for it and about half that for the norm, much less when the error spreads over
        many singular values).  Nearly free: the probes ride along in the last
        full-precision product with A (``p`` more columns in one of ``2 n_iter + 2``
        products of ``rank + oversample`` columns) plus ``O((m + n) rank p)`` flops.  They
        are drawn from ``generator`` after the test matrix, so the factors are those of
        ``error_probes=0`` (up to the rounding of the wider product on some BLAS).  Default
        0: no estimate, and the result type is unchanged.
    center : bool
        True factors the column-centered ``C = A - 1 mu^T`` instead of ``A`` (``mu [...,
        n]``: the mean of A's rows, per matrix of the batch): principal component
        analysis, as ``torch.pca_lowrank`` and scikit-learn's ``PCA(svd_solver=
        "randomized")``.  Dense ``A``: ``C`` is formed (one copy of A, as torch.pca_lowrank):
        its entries are exact differences of nearby numbers, where products with ``A``
        and a rank-one correction each rounded at ``u ||A||``, which the correction does
        not remove (until stop 30: float32 4096 x 256 with column means 1e4 x the spread,
        top singular values 1.9e-3 off and the subspace 4e-2, against torch's 1.1e-4 and
        4e-3, now ours too).  Sparse ``A`` is never formed or densified: every product
        with ``C`` is the product with ``A`` plus a rank-one correction (``C X = A X - 1
        (mu^T X)``, ``C^T Y = A^T Y - mu (1^T Y)``, ``O((m + n) l)`` flops), at the
        accuracy above (``u ||A||_F / s_k`` off: pass float64 where the mean dominates).
        ``error`` then estimates ``||C - U diag(S) Vh||_F``, and the gradient is that of
        the factors of ``C`` carried back to ``A`` (``grad_A = grad_C`` minus its column
        means).
        Default False.

    Returns
    -------
    RSVDResult (U, S, Vh), or RSVDResultWithError (U, S, Vh, error) when ``error_probes > 0``
        Factors with ``U [..., m, rank]`` and ``Vh [..., rank, n]`` orthonormal, ``S``
        descending, float32 for half inputs, else A's dtype (also inside
        ``torch.autocast``, see Notes).  Signs as :func:`batched_svd`'s: the
        largest-magnitude entry (first on ties) of every column of ``U`` is positive and
        the matching row of ``Vh`` follows (``U diag(S) Vh`` is unchanged), so two
        generators give the same signs wherever they find the same singular vectors
        (well-separated singular values).  Differentiable: the thin-SVD backward on the
        returned factors (exact when A has rank <= ``rank``), and its forward-mode twin
        (``jvp``, ``forward_ad``); second derivatives through S alone for ``rank = min(m,
        n)``, RuntimeError otherwise (they would be silently wrong).  ``error
        [...]`` (one per matrix of the batch, the factors' dtype) is detached and computed
        without a host synchronization.
    Tensor[..., rank], or the pair (S, error) when ``error_probes > 0``
        With ``compute_uv=False``.

    Notes
    -----
    Nearly flat spectra (reported, not hidden): at ``sigma_i = i^-0.1``, 512 x 512,
    ``k = 32``, the defaults keep the approximation within 0.11 % of the optimal rank-k
    error, but the top ``k / 2`` singular values are about 1e-2 off (ALGORITHMS.md's bar
    is 1e-3); ``n_iter=20`` brings them to about 2e-5, ``method="block_krylov"`` at its
    defaults to 1e-11 (tests/test_rsvd.py).  Where the values themselves matter on such
    spectra, use block Krylov or raise ``n_iter``.

    Autocast: the factorization runs with autocast turned off for A's device, in A's
    precision (float32 for half types) and the ``sketch_dtype`` chosen above.  Under an
    enclosing ``torch.autocast("cpu", torch.bfloat16)`` its products used to run in
    bfloat16: bfloat16 factors, and the top 16 singular values of a 1024 x 1024
    ``sigma_i = 1 / i`` matrix 1.7e-3 off at ``rank = 32`` (1e-6 without autocast; the
    bar is 1e-3).

    Sparse A (``torch.sparse_coo``, ``sparse_csr``, ``sparse_csc``; 2-D only): the
    forward needs only products ``A X`` and ``A^T X`` with dense blocks, so it costs
    ``O(nnz l)`` per product and never densifies A; the factors are dense and equal to
    those of the dense matrix up to rounding (same generator).  ``"auto"`` never picks
    a low-precision sketch for them (torch has no bfloat16 sparse CSR product, and its
    COO one is slower than float32).  ``check_finite`` tests the stored values.
    Gradients: with ``A.requires_grad`` the gradient is the dense ``[m, n]`` tensor of
    the thin-SVD backward (with respect to every entry, implicit zeros included, not
    masked to A's pattern), which autograd accumulates into ``A.grad`` as a strided
    tensor: ``m n`` memory.
    """
    rank, oversample, n_iter, error_probes = _validate(A, rank, oversample, n_iter, method, orthonormalize, init,
                                                       check_finite, error_probes=error_probes, center=center,
                                                       generator=generator)
    _check_sketch_dtype("rsvd", sketch_dtype, method)
    n_iter = _auto_iterations(n_iter, rank, A, init)
    sketch = (_resolve_sketch_dtype(sketch_dtype, A, method, orthonormalize, n_iter), sketch_dtype == "auto")
    U, S, Vh, error = _RSVDFunction.apply(
        A, rank, oversample, n_iter, method, orthonormalize, init, generator, compute_uv, sketch, error_probes, center,
    )
    # A separate result type, not a fourth field on RSVDResult: existing callers unpack
    # exactly three values, and a caller who asks for the estimate unpacks four.
    if error is None:
        return RSVDResult(U, S, Vh) if compute_uv else S
    return RSVDResultWithError(U, S, Vh, error) if compute_uv else (S, error)


def pca_lowrank(
    A: torch.Tensor,
    q: Optional[int] = None,
    center: bool = True,
    niter: int = 2,
    *,
    oversample: int = 0,
    method: str = "subspace",
    generator: Optional[torch.Generator] = None,
    check_finite: Optional[bool] = None,
    sketch_dtype: Union[str, torch.dtype, None] = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal component analysis of ``A`` by randomized SVD: ``torch.pca_lowrank``'s
    signature and result, computed by :func:`rsvd` (``center=True``: the column-centered
    matrix, formed for dense A as torch's, implicit for sparse A; a drop-in for
    ``torch.pca_lowrank``).

    Parameters
    ----------
    A : Tensor[..., m, n]
        Rows are samples, columns features; dtypes, batches and 2-D sparse (COO, CSR,
        CSC) matrices as :func:`rsvd`.
    q : int, optional
        Number of components, a slight overestimate of the rank of interest, ``1 <= q <=
        min(m, n)``; default ``min(6, m, n)`` (as torch).
    center : bool
        Subtract the column means (the mean over the rows) first; default True.
    niter : int
        Power iterations, ``>= 0``; default 2 (as torch; :func:`rsvd`'s ``"auto"`` would
        use 7 or 4).
    oversample : int
        Extra sketch columns beyond ``q`` (keyword only); default 0: ``q`` columns, as
        torch, which makes ``q`` itself the oversampled size.  ``oversample=10`` is
        :func:`rsvd`'s default.
    method, generator, check_finite, sketch_dtype
        As :func:`rsvd` (keyword only).

    Returns
    -------
    (U, S, V)
        ``U [..., m, q]``, ``S [..., q]`` descending, ``V [..., n, q]`` (not ``Vh``: torch's
        convention) with ``C ~= U diag(S) V^T`` for the centered (or, with
        ``center=False``, the original) matrix ``C``; the principal directions are the
        columns of ``V``, the explained variances ``S^2 / (m - 1)``.  Dtypes, signs and
        gradients as :func:`rsvd`'s.
    """
    if isinstance(A, torch.Tensor) and A.dim() >= 2 and q is None:
        q = min(6, *A.shape[-2:])
    if not is_integer(niter) or niter < 0:  # torch's niter: no "auto"
        raise ValueError(f"pca_lowrank: niter must be an int >= 0; got {niter!r}")
    q, oversample, niter, _ = _validate(A, q, oversample, niter, method, "auto", None, check_finite, op="pca_lowrank",
                                        rank_name="q", center=center, generator=generator)
    U, S, Vh = rsvd(A, q, oversample=oversample, n_iter=niter, method=method, generator=generator,
                    check_finite=False, sketch_dtype=sketch_dtype, center=center)
    return U, S, Vh.transpose(-2, -1)


def range_finder(
    A: torch.Tensor,
    size: int,
    *,
    n_iter: Union[int, str] = "auto",
    method: str = "subspace",
    orthonormalize: str = "auto",
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    check_finite: Optional[bool] = None,
    sketch_dtype: Union[str, torch.dtype, None] = "auto",
    error_probes: int = 0,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Orthonormal basis ``Q`` of the approximate dominant column space of ``A`` (projector-only mode).

    The first stage of :func:`rsvd` alone (Halko et al.'s randomized range finder): the
    sketch ``A Omega`` refined by ``n_iter`` power (or block Krylov) iterations, without
    the Rayleigh-Ritz step (``Q^T A`` and its SVD).  ``Q Q^T A`` approximates ``A`` as
    well as the rank-``size`` factors of ``rsvd(A, size, oversample=0)`` do, for one pass
    over ``A`` fewer; use it where a subspace is enough (a projector, a preconditioner, a
    warm start), not individual singular vectors.

    Parameters
    ----------
    A : Tensor[..., m, n]
        float32, float64, float16 or bfloat16 (half types computed in float32); or a
        2-D sparse matrix, as :func:`rsvd`.
    size : int
        Columns of the basis, ``1 <= size <= min(m, n)`` (include any oversampling).
    n_iter, method, orthonormalize, init, generator, check_finite, sketch_dtype
        As :func:`rsvd` (``"auto"`` iterations from ``size``); ``init [..., m, j]``
        starts the iteration from a previous basis.
    error_probes : int
        ``p > 0`` also returns an estimate of ``||A - Q Q^T A||_F`` from ``p`` Gaussian
        probes ``W [..., n, p]`` (as :func:`rsvd`'s ``error_probes``: ``A W`` rides along
        in the last full-precision product with A, then ``O(m size p)`` flops).

    Returns
    -------
    Tensor[..., m, size] (``min(m, (n_iter + 1) size)`` columns with ``method="block_krylov"``)
        Orthonormal columns, float32 for half inputs, else A's dtype (also inside
        ``torch.autocast``, turned off here as in :func:`rsvd`); differentiable
        through the iteration (the random test matrix is a constant).  No sign rule:
        the columns are not singular vectors, and the bases drawn by two generators
        differ by a rotation within (nearly) the same subspace, not by column signs, so
        normalizing signs would not make ``Q`` seed-stable; ``Q Q^T`` is what is.
    (Q, error) when ``error_probes > 0``
        ``error [...]``: one estimate per matrix of the batch, in Q's dtype, detached, no
        host synchronization.
    """
    size, _, n_iter, error_probes = _validate(A, size, 0, n_iter, method, orthonormalize, init, check_finite,
                                              op="range_finder", rank_name="size", error_probes=error_probes,
                                              generator=generator)
    _check_sketch_dtype("range_finder", sketch_dtype, method)
    n_iter = _auto_iterations(n_iter, size, A, init)
    verify_sketch = sketch_dtype == "auto" and A.device.type == "cpu"  # no host read on CUDA (see _range_basis)
    sketch_dtype = _resolve_sketch_dtype(sketch_dtype, A, method, orthonormalize, n_iter)
    work = A.float() if A.dtype in (torch.float16, torch.bfloat16) else A
    with without_autocast(A.device):
        Q, probe = _range_basis(work, size, n_iter, method, orthonormalize, init, generator, False, sketch_dtype,
                                error_probes, None, verify_sketch)
        # (Not while torch.compile traces: a data-dependent branch, as _validate's check.)
        if (A.device.type == "cpu" and values_readable(A) if check_finite is None else check_finite) \
                and not all_finite(Q):
            raise _overflow_error("range_finder", work, "Q does not change", init=init)
        if probe is None:
            return Q
        _, AW = probe
        with torch.no_grad():  # an estimate, not part of the differentiable result
            return Q, _probe_norm(AW - Q @ (Q.transpose(-2, -1) @ AW))


def _randn(*size: int, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    """``torch.randn``, passing ``generator`` only when one is given: torch 2.13 cannot trace
    ``randn(..., generator=None)`` with symbolic sizes (torch.compile's recompile for a
    second shape raised "SymIntArrayRef expected to contain only concrete integers")."""
    if generator is None:
        return torch.randn(*size, device=device, dtype=dtype)
    return torch.randn(*size, generator=generator, device=device, dtype=dtype)


def _overflow_error(op: str, work: torch.Tensor, invariant: str = "U and Vh do not change, S scales with A",
                    init: Optional[torch.Tensor] = None) -> ValueError:
    """The error for products with A that came out non-finite: a NaN or inf in A or ``init``
    (when ``check_finite=False`` skipped the checks), otherwise a finite A whose products
    overflowed its dtype (entries near the dtype's largest value / sqrt(min(m, n)), e.g.
    float32 entries of 1e37).  Only called once the products failed: the checks here cost
    nothing on the normal path."""
    if not all_finite(work):
        return ValueError(f"{op}: A contains NaN or infinite values (check_finite=False skipped the check)")
    if init is not None and not all_finite(init):
        return ValueError(f"{op}: init contains NaN or infinite values (check_finite=False skipped the check)")
    largest = float(work.detach().abs().amax()) if work.layout == torch.strided else float("nan")
    return ValueError(
        f"{op}: the products with A overflowed {work.dtype} (A is finite, but with entries as large as "
        f"{largest:.3g} its row and column sums exceed the dtype's range); scale A down ({invariant}) or pass float64"
    )


def _check_sketch_dtype(op: str, sketch_dtype, method: str) -> None:
    if sketch_dtype not in ("auto", None) and (
        sketch_dtype not in (torch.bfloat16, torch.float16) or method != "subspace"
    ):
        raise ValueError(
            f"{op}: sketch_dtype must be 'auto', None, torch.bfloat16 or torch.float16 (the last two with "
            f"method='subspace'); got {sketch_dtype} with method={method!r}"
        )


def _auto_iterations(n_iter, columns: int, A: torch.Tensor, init) -> int:
    """``n_iter``, or for ``"auto"`` scikit-learn's rule (1 with a warm start)."""
    if n_iter != "auto":
        return n_iter
    m, n = A.shape[-2:]
    return 1 if init is not None else (7 if columns < 0.1 * min(m, n) else 4)


def _validate(A, rank, oversample, n_iter, method, orthonormalize, init, check_finite, op: str = "rsvd",
              rank_name: str = "rank", error_probes: int = 0, center: bool = False, generator=None):
    """Checks the arguments; returns ``(rank, oversample, n_iter, error_probes)`` as Python ints
    (NumPy integers accepted; ``n_iter`` may stay ``"auto"``)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A must be a tensor; got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"{op}: A has shape {tuple(A.shape)}; expected [..., m, n] with at least 2 dimensions")
    if A.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: A has dtype {A.dtype}; expected float32, float64, float16 or bfloat16")
    if A.layout != torch.strided and A.dim() != 2:  # torch's sparse @ dense needs a 2-D sparse operand
        raise ValueError(f"{op}: A is a {A.layout} tensor of shape {tuple(A.shape)}; expected a 2-D matrix "
                         "(batches of sparse matrices are not supported)")
    check_sparse_invariants(op, "A", A)
    m, n = A.shape[-2:]
    if not is_integer(rank) or not 1 <= rank <= min(m, n):
        raise ValueError(f"{op}: {rank_name} must be an int in [1, min(m, n)] = [1, {min(m, n)}]; got {rank!r}")
    if not is_integer(oversample) or oversample < 0:
        raise ValueError(f"{op}: oversample must be an int >= 0; got {oversample!r}")
    check_n_iter(op, "n_iter", n_iter)
    if not isinstance(center, bool):
        raise TypeError(f"{op}: center must be a bool; got {center!r} of type {type(center).__name__}")
    if not is_integer(error_probes) or error_probes < 0:
        raise ValueError(f"{op}: error_probes must be an int >= 0; got {error_probes!r}")
    if method not in _METHODS:
        raise ValueError(f"{op}: method must be one of {_METHODS}; got {method!r}")
    if orthonormalize not in _ORTHONORMALIZERS:
        raise ValueError(f"{op}: orthonormalize must be one of {_ORTHONORMALIZERS}; got {orthonormalize!r}")
    if init is not None:
        expected = A.shape[:-1]
        if not isinstance(init, torch.Tensor) or init.dim() != A.dim() or init.shape[:-1] != expected:
            got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
            raise ValueError(f"{op}: init has shape {got}; expected [..., m, j] = {tuple(expected)} + (j,)")
        if init.device != A.device:
            raise ValueError(f"{op}: init is on {init.device}; expected the device of A, {A.device}")
    require_generator(op, "generator", generator, A.device, "A")
    if check_finite is None:  # (not while torch.compile traces: a data-dependent branch, as effective_rank)
        check_finite = A.device.type == "cpu" and values_readable(A)
    if check_finite and not all_finite(A):
        raise ValueError(f"{op}: A contains NaN or infinite values")
    if check_finite and init is not None and not all_finite(init):
        raise ValueError(f"{op}: init contains NaN or infinite values")
    return int(rank), int(oversample), n_iter if n_iter == "auto" else int(n_iter), int(error_probes)


def lowrank_error(
    A: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    *,
    n_probes: int = 8,
    norm: str = "fro",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Estimate of ``||A - U diag(S) Vh||`` from a few random probes, without forming it.

    Parameters
    ----------
    A : Tensor[..., m, n]
        The matrices, any leading batch shape; float32 or float64 (float16 and bfloat16
        are computed in float32).
    U : Tensor[..., m, k]
        Left factor (e.g. ``rsvd(A, k).U``).
    S : Tensor[..., k]
        The diagonal of the middle factor (singular values).
    Vh : Tensor[..., k, n]
        Right factor (right singular vectors as rows).  U, S and Vh are cast to A's
        compute dtype; they must be on A's device, with batch shapes that broadcast
        against A's.
    n_probes : int
        ``norm="fro"``: the number of Gaussian probe vectors ``w``; the estimate is the
        Hutchinson mean ``||E||_F^2 ~ mean ||E w||^2`` with ``E = A - U diag(S) Vh``, of
        relative standard deviation about ``sqrt(2 / n_probes)`` at worst (much less when
        many singular values of E matter); about ``2 m n n_probes`` flops.
        ``norm="2"``: the number of power iterations on ``E^T E`` from one Gaussian start
        vector (a lower bound that converges to ``||E||_2``); about ``4 m n n_probes`` flops.
    norm : {"fro", "2"}
        Frobenius or spectral norm of E.
    generator : torch.Generator, optional
        Draws the Gaussian probes (a generator of A's device); fixes the estimate.

    Returns
    -------
    Tensor[...]
        The estimate per matrix of the batch, in A's dtype (float32 for half types, also
        inside ``torch.autocast``, which is turned off here); no host synchronization.  Cost: at most ``4 m n n_probes`` flops (see ``n_probes``).

    Raises
    ------
    TypeError
        A non-tensor argument, or A not floating point.
    ValueError
        A of fewer than 2 dims, ``norm`` or ``n_probes`` out of range, or factor shapes
        that do not match A.
    """
    require_tensors("lowrank_error", A=A, U=U, S=S, Vh=Vh)
    if not A.dtype.is_floating_point:
        raise TypeError(f"lowrank_error: A has dtype {A.dtype}; expected a floating dtype")
    if A.dim() < 2:
        raise ValueError(f"lowrank_error: A has shape {tuple(A.shape)}; expected [..., m, n]")
    if norm not in ("fro", "2"):
        raise ValueError(f"lowrank_error: norm must be 'fro' or '2'; got {norm!r}")
    if not is_integer(n_probes) or n_probes < 1:
        raise ValueError(f"lowrank_error: n_probes must be an int >= 1; got {n_probes!r}")
    require_generator("lowrank_error", "generator", generator, A.device, "A")
    check_sparse_invariants("lowrank_error", "A", A)
    n_probes = int(n_probes)
    work = A.float() if A.dtype in (torch.float16, torch.bfloat16) else A
    U, S, Vh = (t.to(work.dtype) for t in (U, S, Vh))
    m, n = work.shape[-2:]
    if U.shape[-2] != m or Vh.shape[-1] != n or U.shape[-1] != S.shape[-1] or Vh.shape[-2] != S.shape[-1]:
        raise ValueError(
            f"lowrank_error: U {tuple(U.shape)}, S {tuple(S.shape)}, Vh {tuple(Vh.shape)} do not factor "
            f"A of shape {tuple(A.shape)}"
        )

    def apply_error(w):  # E w = A w - U (S * (Vh w))
        return work @ w - U @ (S.unsqueeze(-1) * (Vh @ w))

    def apply_error_t(w):  # E^T w; A^T w as (w^T A)^T, as rsvd's power iterations (BLAS reads A by rows)
        At_w = (w.transpose(-2, -1) @ work).transpose(-2, -1) if work.layout == torch.strided else work.mT @ w
        return At_w - Vh.transpose(-2, -1) @ (S.unsqueeze(-1) * (U.transpose(-2, -1) @ w))

    probes = _randn(*work.shape[:-2], n, n_probes, generator=generator, device=work.device, dtype=work.dtype)
    with without_autocast(work.device):
        if norm == "fro":
            return _probe_norm(apply_error(probes))
        def normalized(v):  # scaled, and after each product: E^T E w squares E's scale (1e19: inf)
            norm = _scaled_norm(v, keepdim=True)
            return v / torch.where(norm > 0, norm, 1.0)

        w = normalized(probes[..., :1])
        for _ in range(n_probes):
            w = normalized(apply_error_t(normalized(apply_error(w))))
        return _scaled_norm(apply_error(w))

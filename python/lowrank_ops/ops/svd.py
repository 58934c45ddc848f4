"""Batched exact SVD of many small matrices by one-sided Jacobi (Hestenes).

Layers:

* ``torch.ops.lowrank_ops.jacobi_svd``: the kernel, declared once with ``torch.library``
  (CPU impl, CUDA impl, fake impl), on a 3-D batch ``A [batch, m, n]``.
* ``_JacobiSVD``: the autograd Function; its backward is
  :func:`lowrank_ops.linalg.svd_backward.thin_svd_backward`, shared by every SVD of the
  library.
* :func:`batched_svd`: the public, validated entry point (also exported as
  ``lowrank_ops.linalg.batched_svd``).

Algorithm and kernel contract: csrc/include/lowrank_ops/svd.h.  Column pairs are rotated
until ``|a_i . a_j| <= tol ||a_i|| ||a_j||`` for every pair; singular values are the final
column norms, sorted descending; the largest-magnitude entry of every column of U is
positive (V follows); columns of U for zero singular values are completed to an
orthonormal set, so rank-deficient and zero matrices give orthonormal, finite factors.
A wide matrix (m < n) is processed as its transpose, read in place through strides.

CPU implementation: hand-written C++ (csrc/cpu/svd_cpu.cpp), matrices in parallel over
the batch (several small matrices per SIMD vector, larger ones one per thread, SIMD over
rows; from ``min(m, n) = 40`` on, the sweeps run on ``R^T`` of a pivoted QR, which needs
fewer sweeps; up to 64 columns, sweeps 1 to 3 skip the pairs whose relative off-diagonal
is below 10^-k in sweep k, which saves rotations without changing the convergence test).
CUDA implementation: csrc/cuda/svd_cuda.cu, one thread block per matrix, the matrix in
shared memory when it fits, else in a global workspace allocated here.

Delegation to ``torch.linalg.svd`` (Jacobi's ``O(n^3)`` work per sweep, over several
sweeps, loses to LAPACK's bidiagonalization as n grows): on CPU above the measured
crossover :data:`CPU_MAX_JACOBI_SIZE` (192 columns in float32 and the half types, 96 in
float64), on CUDA above :data:`MAX_JACOBI_SIZE` = 256.  CPU crossover, measured on a
2-core AVX-512 Xeon against ``torch.linalg.svd`` (LAPACK ``gesdd`` matrix by matrix),
N(0, 1) square matrices, one thread each (CPU time), speed-up of Jacobi: float32 32: 2.30,
48: 1.61, 64: 1.47, 96: 1.01, 128: 0.96, 160: 0.74, 192: 0.57, 224: 0.50, 256: 0.48;
float64 16: 2.26, 32: 1.54, 48: 1.08, 64: 0.95, 80: 0.75, 96: 0.58, 128: 0.51, 160: 0.37.
Jacobi parallelizes over the batch and LAPACK does not gain from threads at these sizes
(measured 8 % with 2 threads at 256), so with 2 threads and a batch the speed-up about
doubles; the limits keep it >= 1.1 there (float32 192: ~1.14, float64 96: ~1.16).  A
single matrix between about 96 and 192 columns (float32; 48 and 96 in float64) runs on
one thread and is up to 2x slower than torch: the limit does not depend on the batch
size or the thread count, so that a matrix's result never depends on them either.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._args import is_real_number, require_int
from .._autocast import autocast_off_backward
from .._dtypes import accumulate_dtype, float_code
from .._extension import cuda_extension, extension
from .._finite import all_finite
from .._signs import normalize_signs
from .._thin_svd import singular_values, thin_svd
from ._library import LIBRARY, composed_path, current_stream, register_fake, values_readable

__all__ = [
    "batched_svd", "BatchedSVDResult", "MAX_JACOBI_SIZE", "CPU_MAX_JACOBI_SIZE", "jacobi_size_limit", "default_tol",
    "default_max_sweeps",
]

#: Largest ``min(m, n)`` solved by the Jacobi kernels on CUDA; larger matrices go to torch.linalg.svd.
MAX_JACOBI_SIZE = 256
#: The same on CPU, per compute dtype: the measured crossover with LAPACK (module docstring).
CPU_MAX_JACOBI_SIZE = {torch.float32: 192, torch.float64: 96}
# The kernels' own bound (csrc/include/lowrank_ops/svd.h: kJacobiMaxCols).
_KERNEL_MAX_COLS = 1024
# Quadratic convergence: fp32 needs fewer sweeps than fp64 (measured means on N(0, 1)
# matrices: 6.7 / 7.7 at 16 x 16, 8.7 / 10.1 at 64 x 64, 12 / 13 at 256 x 256).
_DEFAULT_MAX_SWEEPS = {torch.float32: 20, torch.float64: 30}

LIBRARY.define(
    "jacobi_svd(Tensor A, float tol, int max_sweeps, bool compute_uv) -> "
    "(Tensor U, Tensor S, Tensor Vh, Tensor sweeps, Tensor converged, Tensor off_diagonal)"
)


class BatchedSVDResult(NamedTuple):
    """Result of :func:`batched_svd`; ``A = U diag(S) Vh`` for every matrix of the batch.

    Attributes
    ----------
    U : Tensor[..., m, k] or None
        Left singular vectors (orthonormal columns); ``[..., m, m]`` with
        ``full_matrices=True``; None when ``compute_uv=False``.
    S : Tensor[..., k]
        Singular values, descending, ``k = min(m, n)``.
    Vh : Tensor[..., k, n] or None
        Right singular vectors as rows; ``[..., n, n]`` with ``full_matrices=True``.
    converged : Tensor[...] bool
        Whether each matrix met the tolerance within ``max_sweeps`` sweeps with finite
        singular values (False where one overflows the dtype's range, e.g. float32
        ``full((8, 8), 3e38)``: its S holds inf).
    sweeps : Tensor[...] int32
        Sweeps each matrix used, the final rotation-free (checking) sweep included;
        0 for matrices delegated to ``torch.linalg.svd``.
    off_diagonal : Tensor[...]
        Largest ``|a_i . a_j| / (||a_i|| ||a_j||)`` measured during each matrix's last
        sweep: ``<= tol`` when converged; 0 for delegated matrices.

    Reading ``converged`` (``bool(result.converged.all())``) synchronizes with the device;
    nothing else in :func:`batched_svd` does (on CPU; see its notes for CUDA).
    """

    U: Optional[torch.Tensor]
    S: torch.Tensor
    Vh: Optional[torch.Tensor]
    converged: torch.Tensor
    sweeps: torch.Tensor
    off_diagonal: torch.Tensor


def default_tol(m: int, n: int, dtype: torch.dtype) -> float:
    """Default orthogonality tolerance: ``max(min(m, n), sqrt(max(m, n))) * eps`` of the compute dtype.

    The converged columns are orthogonal to about ``tol``, and that is the accuracy of the
    side of the SVD read from them (and, through it, of small singular values), so the
    tolerance should not grow with the length of tall columns.  It must stay above the
    rounding noise of the computed cosines, about ``sqrt(L) eps`` for columns of length L
    (LAPACK's xGESVJ uses ``sqrt(L) eps``): L is ``max(m, n)`` for matrices swept as they
    are and ``min(m, n)`` for those the CPU preconditions by QR (40 columns or more).
    ``min(m, n) eps`` keeps square matrices at their previous tolerance; the ``sqrt``
    term guards very tall ones.  Measured, float32, against float64 (relative to the
    largest singular value): 2000 x 64 singular values 3.0e-6 (was 1.6e-5 with the
    former ``max(m, n) eps``; LAPACK 1.8e-6), 200 x 32 orthogonality of U 3.8e-6 (was
    2.4e-5), for 0.25 more sweeps.  Since the rotations' cosines are rounded once
    (csrc/include/lowrank_ops/svd.h, jacobi_rotation) the 2000 x 64 singular values are
    within 5.2e-7 (LAPACK 2.2e-7 on that matrix).
    """
    return max(min(m, n), math.sqrt(max(m, n)), 1) * torch.finfo(accumulate_dtype(dtype)).eps


def jacobi_size_limit(dtype: torch.dtype, device: torch.device) -> int:
    """Largest ``min(m, n)`` that :func:`batched_svd` solves by Jacobi on this device type
    (beyond it: ``torch.linalg.svd``): :data:`CPU_MAX_JACOBI_SIZE` on CPU, else
    :data:`MAX_JACOBI_SIZE`."""
    if torch.device(device).type == "cpu":
        return CPU_MAX_JACOBI_SIZE[accumulate_dtype(dtype)]
    return MAX_JACOBI_SIZE


#: The largest max_sweeps accepted.  One-sided Jacobi converges quadratically (20-30 sweeps
#: cover every input in float32 / float64); a tolerance that is never met (tol=0 can
#: rotate forever: every sweep finds a nonzero product) with max_sweeps=2^31 - 1 ran for
#: hours (~11 us per 40 x 40 sweep).  1000 bounds a call to a few seconds per small matrix.
MAX_SWEEPS_LIMIT = 1000


def default_max_sweeps(dtype: torch.dtype) -> int:
    """Default sweep limit: 30 for float64, 20 for float32 and the half types."""
    return _DEFAULT_MAX_SWEEPS[accumulate_dtype(dtype)]


# ---------------------------------------------------------------------------- the op
def _check_op_args(A: torch.Tensor, tol: float, max_sweeps: int) -> None:
    op = "jacobi_svd"
    if A.dim() != 3:
        raise ValueError(f"{op}: A has shape {tuple(A.shape)}; expected 3-D (batch, m, n)")
    float_code(A.dtype, op, "A")
    if min(A.shape[1], A.shape[2]) > _KERNEL_MAX_COLS:
        raise ValueError(f"{op}: A has shape {tuple(A.shape)}; expected min(m, n) <= {_KERNEL_MAX_COLS}")
    if not (tol >= 0 and tol != float("inf")):
        raise ValueError(f"{op}: tol must be finite and >= 0; got {tol}")
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise ValueError(f"{op}: max_sweeps must be >= 1; got {max_sweeps!r}")
    if max_sweeps > MAX_SWEEPS_LIMIT:
        raise ValueError(f"{op}: max_sweeps must be at most {MAX_SWEEPS_LIMIT} (Jacobi converges in 20-30 sweeps); "
                         f"got {max_sweeps}")


def _outputs(A: torch.Tensor, compute_uv: bool):
    batch, m, n = A.shape
    k = min(m, n)
    dtype = accumulate_dtype(A.dtype)
    if compute_uv:
        U = A.new_empty((batch, m, k), dtype=dtype)
        Vh = A.new_empty((batch, k, n), dtype=dtype)
    else:  # as torch.linalg.svd's compute_uv=False: empty factors
        U = A.new_empty((0,), dtype=dtype)
        Vh = A.new_empty((0,), dtype=dtype)
    S = A.new_empty((batch, k), dtype=dtype)
    sweeps = A.new_zeros((batch,), dtype=torch.int32)
    converged = A.new_ones((batch,), dtype=torch.bool)
    off_diagonal = A.new_zeros((batch,), dtype=dtype)
    return U, S, Vh, sweeps, converged, off_diagonal


def _kernel_args(A, U, S, Vh, sweeps, converged, off_diagonal, compute_uv: bool, tol: float, max_sweeps: int) -> dict:
    """Keyword arguments of jacobi_svd_cpu/cuda.  The kernels need rows >= cols: a wide A
    is passed as its transpose (strides swapped), whose U is our Vh^T and V our U."""
    batch, m, n = A.shape
    transposed = m < n
    args = dict(
        a=A.data_ptr(), s=S.data_ptr(), sweeps=sweeps.data_ptr(), converged=converged.data_ptr(),
        off_diagonal=off_diagonal.data_ptr(), batch=batch,
        rows=n if transposed else m, cols=m if transposed else n, a_stride_b=A.stride(0),
        a_stride_r=A.stride(2) if transposed else A.stride(1), a_stride_c=A.stride(1) if transposed else A.stride(2),
        s_stride_b=S.stride(0), s_stride_k=S.stride(1),
        dtype=float_code(A.dtype, "jacobi_svd", "A"), tol=float(tol), max_sweeps=int(max_sweeps),
        sign_from_v=transposed,
    )
    if compute_uv:
        u_strides = (U.stride(0), U.stride(1), U.stride(2))  # U [b, m, k]
        vh_as_v = (Vh.stride(0), Vh.stride(2), Vh.stride(1))  # Vh^T [b, n, k]
        kernel_u, kernel_v = (Vh, U) if transposed else (U, Vh)
        ku, kv = (vh_as_v, u_strides) if transposed else (u_strides, vh_as_v)
        args.update(u=kernel_u.data_ptr(), v=kernel_v.data_ptr(),
                    u_stride_b=ku[0], u_stride_r=ku[1], u_stride_c=ku[2],
                    v_stride_b=kv[0], v_stride_r=kv[1], v_stride_c=kv[2])
    else:
        args.update(u=0, v=0, u_stride_b=0, u_stride_r=0, u_stride_c=0, v_stride_b=0, v_stride_r=0, v_stride_c=0)
    return args


def _jacobi_svd_cpu(A, tol, max_sweeps, compute_uv):
    _check_op_args(A, tol, max_sweeps)
    outputs = _outputs(A, compute_uv)
    if A.shape[0] > 0 and min(A.shape[1], A.shape[2]) > 0:
        # Non-finite entries are detected by the kernel while it copies A (ValueError naming A[b]).
        extension().jacobi_svd_cpu(**_kernel_args(A, *outputs, compute_uv, tol, max_sweeps),
                                   num_threads=torch.get_num_threads())
    return outputs


def _jacobi_svd_cuda(A, tol, max_sweeps, compute_uv):
    module = cuda_extension("batched_svd")
    _check_op_args(A, tol, max_sweeps)
    outputs = _outputs(A, compute_uv)
    batch, m, n = A.shape
    if batch == 0 or min(m, n) == 0:
        return outputs
    finite = torch.isfinite(A).flatten(1).all(1)
    if not bool(finite.all()):  # one host synchronization: a NaN would poison the solver
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(f"batched_svd: A[{first}] has a non-finite entry (inf or nan); expected finite values")
    workspace_bytes = module.jacobi_svd_cuda_workspace_bytes(
        batch=batch, rows=max(m, n), cols=min(m, n), dtype=float_code(A.dtype, "jacobi_svd", "A"),
        compute_uv=compute_uv, device=A.device.index,
    )
    workspace = A.new_empty((workspace_bytes,), dtype=torch.uint8) if workspace_bytes else None
    module.jacobi_svd_cuda(
        **_kernel_args(A, *outputs, compute_uv, tol, max_sweeps),
        workspace=0 if workspace is None else workspace.data_ptr(), workspace_bytes=workspace_bytes,
        device=A.device.index, stream=current_stream(A),
    )
    return outputs


def _jacobi_svd_fake(A, tol, max_sweeps, compute_uv):
    torch._check(A.dim() == 3, lambda: f"jacobi_svd: A must be 3-D (batch, m, n); got {A.dim()}-D")
    batch, m, n = A.shape
    k = torch.sym_min(m, n)
    dtype = accumulate_dtype(A.dtype)
    if compute_uv:
        U = A.new_empty((batch, m, k), dtype=dtype)
        Vh = A.new_empty((batch, k, n), dtype=dtype)
    else:
        U = A.new_empty((0,), dtype=dtype)
        Vh = A.new_empty((0,), dtype=dtype)
    return (U, A.new_empty((batch, k), dtype=dtype), Vh, A.new_empty((batch,), dtype=torch.int32),
            A.new_empty((batch,), dtype=torch.bool), A.new_empty((batch,), dtype=dtype))


LIBRARY.impl("jacobi_svd", _jacobi_svd_cpu, "CPU")
LIBRARY.impl("jacobi_svd", _jacobi_svd_cuda, "CUDA")
register_fake("jacobi_svd", _jacobi_svd_fake)


# ---------------------------------------------------------------------------- autograd
class _JacobiSVD(torch.autograd.Function):
    """Thin SVD of A [batch, m, n] with the shared thin-SVD backward.

    Only the factors that receive a gradient enter the backward: a loss of S alone
    gives ``U diag(gS) Vh`` (no division, stable for repeated and zero values).
    """

    @staticmethod
    def forward(ctx, A, tol, max_sweeps):
        U, S, Vh, sweeps, converged, off_diagonal = torch.ops.lowrank_ops.jacobi_svd(A, tol, max_sweeps, True)
        ctx.mark_non_differentiable(sweeps, converged, off_diagonal)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(U, S, Vh)
        ctx.input_dtype = A.dtype
        return U, S, Vh, sweeps, converged, off_diagonal

    @staticmethod
    @autocast_off_backward
    def backward(ctx, grad_U, grad_S, grad_Vh, _sweeps, _converged, _off_diagonal):
        if grad_U is None and grad_S is None and grad_Vh is None:
            return None, None, None
        # Imported here: lowrank_ops.linalg imports this module, so a module-level import
        # would fail whenever the ops are imported first (lowrank_ops.krylov does).
        from ..linalg.svd_backward import thin_svd_backward

        U, S, Vh = ctx.saved_tensors
        grad_A = thin_svd_backward(U, S, Vh, grad_U, grad_S, grad_Vh)
        return grad_A.to(ctx.input_dtype), None, None


# ---------------------------------------------------------------------------- delegation and completion
def _complete_columns(Q: torch.Tensor) -> torch.Tensor:
    """``[Q, Q_perp]``: Q [..., p, k] with orthonormal columns completed to [..., p, p]."""
    p, k = Q.shape[-2], Q.shape[-1]
    if p == k:
        return Q
    # Householder QR of Q: its last p - k columns are an orthonormal basis of range(Q)^perp.
    extra = torch.linalg.qr(Q, mode="complete").Q[..., k:]
    extra, _ = normalize_signs(extra, extra.new_zeros(extra.shape[:-2] + (p - k, 0)))
    return torch.cat([Q, extra], dim=-1)


def _delegate(A3: torch.Tensor, compute_uv: bool, needs_grad: bool):
    """torch.linalg.svd for matrices beyond jacobi_size_limit, with our dtypes, signs and report."""
    X = A3 if A3.dtype in (torch.float32, torch.float64) else A3.float()
    # Checked first (all_finite: 0.1 % of the call at 256 x 256): LAPACK (MKL) would print errors
    # to stderr on non-finite input.
    if values_readable(X) and not all_finite(X):
        raise ValueError("batched_svd: A has a non-finite entry (inf or nan); expected finite values")
    if compute_uv:
        U, S, Vh = thin_svd(X)
        # torch.linalg.svd's fresh outputs: flipped in place unless autograd records them.
        U, Vh = normalize_signs(U, Vh, inplace=not needs_grad)
    else:
        U = Vh = None
        S = singular_values(X)
    batch = A3.shape[0]
    sweeps = A3.new_zeros((batch,), dtype=torch.int32)
    converged = torch.isfinite(S).all(-1)  # finite input, but a singular value may overflow
    off_diagonal = A3.new_zeros((batch,), dtype=X.dtype)
    return U, S, Vh, sweeps, converged, off_diagonal


# ---------------------------------------------------------------------------- public API
def batched_svd(
    A: torch.Tensor,
    *,
    full_matrices: bool = False,
    tol: Optional[float] = None,
    max_sweeps: Optional[int] = None,
    compute_uv: bool = True,
) -> BatchedSVDResult:
    """Exact SVD of every matrix of a batch, ``A = U diag(S) Vh``, by one-sided Jacobi.

    Parameters
    ----------
    A : Tensor[..., m, n]
        Any number of leading batch dimensions (including none, or an empty batch);
        any strides; CPU or CUDA.  float32 and float64 are computed in their own
        precision; float16 and bfloat16 are computed in float32 and **return float32**
        factors (rounding singular vectors to 8 or 11 bits would destroy their
        orthogonality).  Entries must be finite.
    full_matrices : bool
        Return U ``[..., m, m]`` and Vh ``[..., n, n]`` (the extra columns complete the
        bases; not differentiable when m != n, as they are not unique).
    tol : float, optional
        Relative orthogonality tolerance; default :func:`default_tol`,
        ``max(min(m, n), sqrt(max(m, n))) * eps`` of the compute dtype.
    max_sweeps : int, optional
        Sweep limit, at most :data:`MAX_SWEEPS_LIMIT` (1000); default :func:`default_max_sweeps`
        (30 for float64, 20 otherwise).
    compute_uv : bool
        False returns only S (``U`` and ``Vh`` are None) and skips accumulating V unless
        a gradient is needed; the backward is then ``U diag(gS) Vh``.

    Returns
    -------
    BatchedSVDResult
        ``(U, S, Vh, converged, sweeps, off_diagonal)``; S descending; the
        largest-magnitude entry of each column of U is positive (V follows).
        Non-convergence within ``max_sweeps`` is reported in ``converged`` (the factors
        are still returned: a valid orthogonal V and ``U S = A V`` up to rounding, but
        U's columns are orthogonal only to ``off_diagonal``), never hidden.

    Notes
    -----
    Matrices with ``min(m, n)`` above :func:`jacobi_size_limit` (CPU: 192 in float32 and
    the half types, 96 in float64, the measured crossover; CUDA: 256) are delegated to
    ``torch.linalg.svd`` (same sign rule and dtypes; ``sweeps = 0``, ``converged = True``).  Backward:
    :func:`lowrank_ops.linalg.svd_backward.thin_svd_backward` (ill-posed for repeated
    singular values when the loss depends on U or V; stable through S alone).  On CUDA
    the finiteness check of ``A`` synchronizes with the device once per call.
    """
    op = "batched_svd"
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A must be a tensor; got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"{op}: A has shape {tuple(A.shape)}; expected at least 2-D (..., m, n)")
    float_code(A.dtype, op, "A")
    if A.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: A is on {A.device}; expected a cpu or cuda tensor")
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    if tol is None:
        tol = default_tol(m, n, A.dtype)
    elif not (is_real_number(tol) and 0 <= tol < float("inf")):
        raise ValueError(f"{op}: tol must be a finite number >= 0; got {tol!r}")
    if max_sweeps is None:
        max_sweeps = default_max_sweeps(A.dtype)
    elif require_int(op, "max_sweeps", max_sweeps) > MAX_SWEEPS_LIMIT:
        raise ValueError(f"{op}: max_sweeps must be at most {MAX_SWEEPS_LIMIT} (Jacobi converges in 20-30 sweeps); "
                         f"got {max_sweeps}")
    needs_grad = A.requires_grad and torch.is_grad_enabled()
    if full_matrices and compute_uv and needs_grad and m != n:
        raise ValueError(
            f"{op}: full_matrices=True is not differentiable for a non-square A (shape {tuple(A.shape)}): "
            "the completed columns are not unique; use full_matrices=False"
        )

    lead = A.shape[:-2]
    A3 = A.reshape(math.prod(lead), m, n)
    if k > jacobi_size_limit(A.dtype, A.device) or composed_path():
        # (Inside torch.func transforms, torch's SVD: its derivatives, jvp included, are
        # what the transforms see; the Jacobi Function's would be opaque to them.)
        U, S, Vh, sweeps, converged, off_diagonal = _delegate(A3, compute_uv, needs_grad)
    elif needs_grad:
        U, S, Vh, sweeps, converged, off_diagonal = _JacobiSVD.apply(A3, float(tol), int(max_sweeps))
    else:
        U, S, Vh, sweeps, converged, off_diagonal = torch.ops.lowrank_ops.jacobi_svd(
            A3, float(tol), int(max_sweeps), compute_uv
        )

    S = S.reshape(*lead, k)
    report = (converged.reshape(lead), sweeps.reshape(lead), off_diagonal.reshape(lead))
    if not compute_uv:
        return BatchedSVDResult(None, S, None, *report)
    U = U.reshape(*lead, m, k)
    Vh = Vh.reshape(*lead, k, n)
    if full_matrices:
        U = _complete_columns(U)
        Vh = _complete_columns(Vh.transpose(-2, -1)).transpose(-2, -1)
    return BatchedSVDResult(U, S, Vh, *report)

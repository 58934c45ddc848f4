"""M-FAC passes over a gradient buffer: ``G x`` (optionally fused with the ring-buffer
write) and ``alpha x + beta G^T c``.

Layers:

* ``torch.ops.lowrank_ops.mfac_dots`` / ``mfac_combine``: the two read passes, pure
  functions, differentiable (``torch.library.register_autograd``) in every input;
* ``torch.ops.lowrank_ops.mfac_dots_write_``: ``mfac_dots`` fused with writing ``x[0]``
  into row ``write_slot`` of the buffer (mutates ``grads``; not differentiable); its
  dots are float64 whatever the storage (the new Gram row, unrounded);
* ``torch.ops.lowrank_ops.mfac_apply``: ``alpha x + beta ((U^T U)^-1 G_n x)^T G_n``, the
  whole ``F^-1 x`` of :class:`~lowrank_ops.second_order.MFACInverse` from its Cholesky
  factor ``U`` (on the CPU one extension call: both passes and the float64 solve), the
  dots and coefficients in float64 between the passes; not differentiable;
* ``torch.ops.lowrank_ops.mfac_cholesky_factor_`` / ``mfac_cholesky_replace_``: the
  factor of ``K = n lambda I + G_n G_n^T`` in place, and its rank update when one row
  and column of ``K`` change (a ring-buffer slot overwritten); each returns a status
  tensor, on the factor's device (read it to synchronize);
* :func:`mfac_dots`, :func:`mfac_combine`: validated Python entry points.

The buffer ``grads`` is ``[capacity, dim]`` in a storage dtype (float32, float64,
float16 or bfloat16); only its first ``n_rows`` rows are used.  Vectors and results
are in the *compute dtype* of the storage, :func:`compute_dtype`: float64 for float64
storage, float32 otherwise (bf16 storage halves the bytes read).  Every sum of both
passes runs in float64 and is rounded once to the result's dtype: M-FAC's ``x - G^T c``
cancels for ``x`` in the gradients' span, and float32 sums lost up to ``||G||^2 /
(n lambda)`` times their rounding there (csrc/include/lowrank_ops/mfac.h).

CPU and CUDA implementations are hand-written (csrc/cpu/mfac_cpu.cpp,
csrc/cuda/mfac_cuda.cu): each pass reads the buffer exactly once (torch needs a GEMV
plus an AXPY for ``x - G^T c`` and a separate copy for the write); bench/bench_mfac.py
measures them against torch's GEMV on the same buffers.
"""
from __future__ import annotations

import math

import torch

from .._args import require_finite_number, require_tensors
from .._dtypes import accumulate_dtype, float_code
from .._extension import cuda_extension, extension
from ._layout import require_apart, require_rows_apart, row_stride, rows_view
from ._library import LIBRARY, composed_path, current_stream, eager_or_op, register_fake

__all__ = ["mfac_dots", "mfac_combine", "compute_dtype"]

LIBRARY.define("mfac_dots(Tensor grads, Tensor x, int n_rows) -> Tensor")
LIBRARY.define("mfac_dots_write_(Tensor(a!) grads, Tensor x, int n_rows, int write_slot) -> Tensor")
LIBRARY.define("mfac_combine(Tensor grads, Tensor coef, Tensor x, int n_rows, float alpha, float beta) -> Tensor")
LIBRARY.define("mfac_apply(Tensor grads, Tensor x, int n_rows, Tensor factor, float alpha, float beta, "
               "Tensor? products) -> Tensor")
LIBRARY.define("mfac_cholesky_factor_(Tensor(a!) K) -> Tensor")
LIBRARY.define("mfac_cholesky_replace_(Tensor(a!) factor, int slot, Tensor row, Tensor(b!) work) -> Tensor")


#: The dtype of vectors and sums for a buffer stored in a given storage dtype.
compute_dtype = accumulate_dtype


# ---------------------------------------------------------------------------- argument checks
def _check_buffer(op: str, grads: torch.Tensor, n_rows: int) -> None:
    if grads.dim() != 2:
        raise ValueError(f"{op}: grads has shape {tuple(grads.shape)}; expected 2-D (capacity, dim)")
    float_code(grads.dtype, op, "grads")
    if not 0 <= n_rows <= grads.shape[0]:
        raise ValueError(f"{op}: n_rows must be in [0, capacity] = [0, {grads.shape[0]}]; got {n_rows}")


def _check_vectors(op: str, name: str, grads: torch.Tensor, x: torch.Tensor) -> None:
    want = compute_dtype(grads.dtype)
    if x.dim() != 2 or x.shape[1] != grads.shape[1]:
        raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}; expected (k, dim) = (k, {grads.shape[1]})")
    if x.dtype != want:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; expected {want} (the compute dtype of {grads.dtype} storage)")
    if x.device != grads.device:
        raise ValueError(f"{op}: {name} is on {x.device}; expected {grads.device} (the device of grads)")


# ---------------------------------------------------------------------------- mfac_dots
def _dots_impl(op: str, grads, x, n_rows: int, write_slot: int, wide: bool = False):
    """The pass; ``wide``: the result in float64 (the sums unrounded), else in x's dtype."""
    _check_buffer(op, grads, n_rows)
    _check_vectors(op, "x", grads, x)
    if write_slot != -1 and not (0 <= write_slot < n_rows and x.shape[0] >= 1):  # (-1: mfac_dots, no write)
        raise ValueError(f"{op}: write_slot must be in [0, n_rows) = [0, {n_rows}) with k >= 1; got {write_slot}")
    x = rows_view(x)
    k, dim = x.shape
    out = x.new_empty((k, n_rows), dtype=torch.float64 if wide else x.dtype)
    args = dict(
        grads=grads.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), n_rows=n_rows, dim=dim, k=k,
        grads_ld=row_stride(grads), x_ld=row_stride(x), write_slot=write_slot, dtype=float_code(grads.dtype, op, "grads"),
        wide=wide,
    )
    if grads.device.type == "cuda":
        module = cuda_extension(op)
        segments = module.mfac_dots_cuda_segments(n_rows=n_rows, dim=dim, k=k)
        workspace = x.new_empty((segments * min(k, 4) * n_rows,), dtype=torch.float64)  # the fp64 partial sums
        module.mfac_dots_cuda(**args, workspace=workspace.data_ptr(), workspace_elems=workspace.numel(),
                              device=grads.device.index, stream=current_stream(grads))
    else:
        extension().mfac_dots_cpu(**args, num_threads=torch.get_num_threads())
    return out


def _mfac_dots(grads, x, n_rows):
    return _dots_impl("mfac_dots", rows_view(grads), x, n_rows, -1)


def _check_write_source(grads, x, write_slot: int) -> None:
    """x must not overlap the row it overwrites (the kernel would read what it wrote),
    except as that very row: writing the slot's own gradient back is a no-op (what a step
    that keeps the window does, e.g. ``update_ihvp(grads[slot])``)."""
    if (grads.dim() != 2 or x.dim() != 2 or not 0 <= write_slot < grads.shape[0] or x.numel() == 0
            or x.untyped_storage().data_ptr() != grads.untyped_storage().data_ptr()):
        return
    row = grads[write_slot]
    low, high = row.data_ptr(), row.data_ptr() + row.numel() * row.element_size()
    for j in range(x.shape[0]):
        vector = x[j]
        if j == 0 and vector.data_ptr() == low and vector.dtype == row.dtype and vector.stride(0) == 1:
            continue
        start = vector.data_ptr()
        end = start + ((vector.numel() - 1) * abs(vector.stride(0)) + 1) * vector.element_size()
        if start < high and low < end:
            raise ValueError(f"mfac_dots_write_: x[{j}] overlaps row {write_slot} of grads, which the call overwrites "
                             f"while reading x (pass a copy)")


def _mfac_dots_write(grads, x, n_rows, write_slot):
    if grads.dim() == 2:
        require_rows_apart("mfac_dots_write_", "grads", grads)
    _check_write_source(grads, x, write_slot)
    return _dots_impl("mfac_dots_write_", grads, x, n_rows, write_slot, wide=True)


def _mfac_dots_fake(grads, x, n_rows):
    return x.new_empty((x.shape[0], n_rows))


def _mfac_dots_write_fake(grads, x, n_rows, write_slot):
    return x.new_empty((x.shape[0], n_rows), dtype=torch.float64)


# ---------------------------------------------------------------------------- mfac_combine
def _check_coefficients(op: str, alpha: float, beta: float) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not -math.inf < value < math.inf:
            raise ValueError(f"{op}: {name} must be finite; got {value}")


def _mfac_combine(grads, coef, x, n_rows, alpha, beta):
    return _combine_impl(grads, coef, x, n_rows, alpha, beta, wide=False)


def _combine_impl(grads, coef, x, n_rows, alpha, beta, wide: bool):
    """The pass; ``wide``: ``coef`` in float64 (mfac_apply's solve output), else in x's dtype."""
    op = "mfac_combine"
    _check_coefficients(op, alpha, beta)
    _check_buffer(op, grads, n_rows)
    _check_vectors(op, "x", grads, x)
    if coef.dim() != 2 or tuple(coef.shape) != (x.shape[0], n_rows):
        raise ValueError(f"{op}: coef has shape {tuple(coef.shape)}; expected (k, n_rows) = ({x.shape[0]}, {n_rows})")
    want = torch.float64 if wide else x.dtype
    if coef.dtype != want or coef.device != x.device:
        raise TypeError(f"{op}: coef is {coef.dtype} on {coef.device}; expected {want} on {x.device}")
    grads, x, coef = rows_view(grads), rows_view(x), coef.contiguous()
    k, dim = x.shape
    out = x.new_empty((k, dim))
    args = dict(
        grads=grads.data_ptr(), coef=coef.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), n_rows=n_rows, dim=dim,
        k=k, grads_ld=row_stride(grads), x_ld=row_stride(x), out_ld=row_stride(out), alpha=float(alpha), beta=float(beta),
        dtype=float_code(grads.dtype, op, "grads"), wide=wide,
    )
    if grads.device.type == "cuda":
        cuda_extension(op).mfac_combine_cuda(**args, device=grads.device.index, stream=current_stream(grads))
    else:
        extension().mfac_combine_cpu(**args, num_threads=torch.get_num_threads())
    return out


# ---------------------------------------------------------------------------- mfac_apply
def _check_apply(grads, x, n_rows, factor, products, alpha, beta) -> None:
    op = "mfac_apply"
    _check_coefficients(op, alpha, beta)
    _check_buffer(op, grads, n_rows)
    _check_vectors(op, "x", grads, x)
    if factor.dtype != torch.float64 or tuple(factor.shape) != (n_rows, n_rows) or factor.device != grads.device:
        raise ValueError(f"{op}: factor is {factor.dtype} {tuple(factor.shape)} on {factor.device}; expected "
                         f"float64 (n_rows, n_rows) = ({n_rows}, {n_rows}) on {grads.device}")
    if products is not None and (products.dtype not in (x.dtype, torch.float64)
                                 or tuple(products.shape) != (x.shape[0], n_rows) or products.device != x.device):
        raise ValueError(f"{op}: products is {products.dtype} {tuple(products.shape)} on {products.device}; "
                         f"expected {x.dtype} or float64 (k, n_rows) = ({x.shape[0]}, {n_rows}) on {x.device}")


def _mfac_apply_cpu(grads, x, n_rows, factor, alpha, beta, products=None):
    """CPU impl of ``mfac_apply``: one extension call (``_C.mfac_apply_cpu``: mfac_dots,
    a single-threaded float64 substitution and mfac_combine, with no Python work or
    tensors between them; products, when given, in float64)."""
    _check_apply(grads, x, n_rows, factor, products, alpha, beta)
    x, grads = rows_view(x), rows_view(grads)
    factor = factor.contiguous()
    products = None if products is None else products.to(torch.float64).contiguous()
    k, dim = x.shape
    out = x.new_empty((k, dim))
    extension().mfac_apply_cpu(
        grads=grads.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), U=factor.data_ptr(), u_ld=factor.stride(0),
        products=0 if products is None else products.data_ptr(), n_rows=n_rows, dim=dim, k=k, grads_ld=row_stride(grads),
        x_ld=row_stride(x), out_ld=dim, alpha=alpha, beta=beta, dtype=float_code(grads.dtype, "mfac_apply", "grads"),
        num_threads=torch.get_num_threads(),
    )
    return out


def _mfac_apply_cuda(grads, x, n_rows, factor, alpha, beta, products=None):
    """CUDA impl of ``mfac_apply``: the two pass kernels around torch's ``cholesky_solve``."""
    _check_apply(grads, x, n_rows, factor, products, alpha, beta)
    if products is None:
        products = _dots_impl("mfac_apply", rows_view(grads), x, n_rows, -1, wide=True)
    coef = torch.cholesky_solve(products.T.to(torch.float64), factor, upper=True).T
    return _combine_impl(grads, coef.contiguous(), x, n_rows, alpha, beta, wide=True)


def _mfac_apply_fake(grads, x, n_rows, factor, alpha, beta, products=None):
    return x.new_empty(x.shape)


def mfac_apply_op(device_type: str):
    """``mfac_apply``'s implementation for eager calls on ``device_type``, the op itself under
    torch.compile (see :func:`~lowrank_ops.ops._library.eager_or_op`)."""
    return eager_or_op("mfac_apply", _mfac_apply_cpu if device_type == "cpu" else _mfac_apply_cuda)


# ---------------------------------------------------------------------------- the factor of K
def _check_square(op: str, name: str, tensor: torch.Tensor) -> int:
    if tensor.dtype != torch.float64 or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
        raise ValueError(f"{op}: {name} is {tensor.dtype} {tuple(tensor.shape)}; expected float64 (n, n)")
    require_rows_apart(op, name, tensor)
    return tensor.shape[0]


def _cholesky_factor_cpu(K):
    """``K = U^T U`` in place (U upper, single-threaded); returns int32 ``[1]``: 0, or the
    1-based column where K was not numerically positive definite (or overflowed)."""
    n = _check_square("mfac_cholesky_factor_", "K", K)
    info = extension().mfac_cholesky_factor_cpu(A=K.data_ptr(), a_ld=K.stride(0), n=n)
    return torch.tensor([info], dtype=torch.int32)


def first_noise_pivot(factor: torch.Tensor, diagonal: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """LAPACK's ``info``, or where it accepted every pivot, the 1-based first column whose
    squared pivot fails the serial factorization's test (``mfac_valid_pivot`` in mfac.h:
    above ``n eps K_kk``, the rounding of the subtraction that formed it, and finite), 0
    if none; ``diagonal``: K's.  dpotrf refuses only pivots <= 0, so whether a singular K
    got through as rounding noise was luck (a repeated gradient at damp 1e-17 did about
    once in three).  On the device: no host read."""
    n = diagonal.shape[-1]
    if n == 0:
        return info
    pivots = factor.diagonal().square()
    valid = (pivots > n * torch.finfo(torch.float64).eps * diagonal) & (pivots <= torch.finfo(torch.float64).max)
    first_invalid = (~valid).to(torch.int32).argmax() + 1
    return torch.where((info != 0) | valid.all(), info, first_invalid.to(info.dtype))


def _cholesky_factor_cuda(K):
    """The same through torch (cuSOLVER), with the CPU kernel's pivot test (dpotrf's info
    alone reported a numerically singular K as factored); the status stays on the device."""
    _check_square("mfac_cholesky_factor_", "K", K)
    diagonal = K.diagonal().clone()
    factor, info = torch.linalg.cholesky_ex(K, upper=True)
    K.copy_(factor)
    return first_noise_pivot(factor, diagonal, info).reshape(1).to(torch.int32)


def _cholesky_factor_fake(K):
    return K.new_empty((1,), dtype=torch.int32)


def _cholesky_replace(factor, slot, row, work):
    """The factor of ``K'``, K with row and column ``slot`` replaced by ``row`` (float64
    ``[n]``, diagonal included), in place of ``U``; ``work`` is float64 scratch of ``2 n``.
    Returns int32 ``[1]`` on the factor's device: 1 on success, 0 when ``K'`` is not
    numerically positive definite (``U`` is then garbage: refactor)."""
    op = "mfac_cholesky_replace_"
    n = _check_square(op, "factor", factor)
    if not 0 <= slot < n:
        raise ValueError(f"{op}: slot must be in [0, n) = [0, {n}); got {slot}")
    for name, tensor, size in (("row", row, n), ("work", work, 2 * n)):
        if tensor.dtype != torch.float64 or tensor.shape != (size,) or not tensor.is_contiguous() \
                or tensor.device != factor.device:
            raise ValueError(f"{op}: {name} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}; expected "
                             f"contiguous float64 ({size},) on {factor.device}")
    require_apart(op, "work", work, factor=factor, row=row)
    require_apart(op, "factor", factor, row=row)
    args = dict(U=factor.data_ptr(), u_ld=factor.stride(0), n=n, s=slot, row=row.data_ptr(), work=work.data_ptr())
    if factor.device.type == "cuda":
        ok = torch.empty(1, dtype=torch.int32, device=factor.device)
        cuda_extension(op).mfac_cholesky_replace_cuda(**args, ok=ok.data_ptr(), device=factor.device.index,
                                                      stream=current_stream(factor))
        return ok
    return torch.tensor([int(extension().mfac_cholesky_replace_cpu(**args))], dtype=torch.int32)


def _cholesky_replace_fake(factor, slot, row, work):
    return factor.new_empty((1,), dtype=torch.int32)


def cholesky_factor_op():
    return eager_or_op("mfac_cholesky_factor_", lambda K: (_cholesky_factor_cpu if K.device.type == "cpu"
                                                           else _cholesky_factor_cuda)(K))


def cholesky_replace_op():
    return eager_or_op("mfac_cholesky_replace_", _cholesky_replace)


def _mfac_combine_fake(grads, coef, x, n_rows, alpha, beta):
    return x.new_empty(x.shape)


for _device in ("CPU", "CUDA"):
    LIBRARY.impl("mfac_dots", _mfac_dots, _device)
    LIBRARY.impl("mfac_dots_write_", _mfac_dots_write, _device)
    LIBRARY.impl("mfac_combine", _mfac_combine, _device)
    LIBRARY.impl("mfac_cholesky_replace_", _cholesky_replace, _device)
LIBRARY.impl("mfac_apply", _mfac_apply_cpu, "CPU")
LIBRARY.impl("mfac_apply", _mfac_apply_cuda, "CUDA")
LIBRARY.impl("mfac_cholesky_factor_", _cholesky_factor_cpu, "CPU")
LIBRARY.impl("mfac_cholesky_factor_", _cholesky_factor_cuda, "CUDA")
register_fake("mfac_dots", _mfac_dots_fake)
register_fake("mfac_dots_write_", _mfac_dots_write_fake)
register_fake("mfac_combine", _mfac_combine_fake)
register_fake("mfac_apply", _mfac_apply_fake)
register_fake("mfac_cholesky_factor_", _cholesky_factor_fake)
register_fake("mfac_cholesky_replace_", _cholesky_replace_fake)


# ---------------------------------------------------------------------------- autograd
def _grads_gradient(grads: torch.Tensor, n_rows: int, rows_grad: torch.Tensor) -> torch.Tensor:
    """Gradient for the buffer: ``rows_grad`` ``[n_rows, dim]`` in the used rows, 0 below."""
    full = grads.new_zeros(grads.shape)
    full[:n_rows] = rows_grad.to(grads.dtype)
    return full


def _dots_setup(ctx, inputs, output):
    grads, x, n_rows = inputs
    ctx.n_rows = n_rows
    ctx.save_for_backward(grads, x)


def _dots_backward(ctx, grad_out):
    # out = x G_n^T:  dx = grad_out G_n (a combine with alpha = 0), dG_n = grad_out^T x.
    grads, x = ctx.saved_tensors
    grad_grads = grad_x = None
    if ctx.needs_input_grad[1]:
        grad_x = torch.ops.lowrank_ops.mfac_combine(grads, grad_out.contiguous(), x, ctx.n_rows, 0.0, 1.0)
    if ctx.needs_input_grad[0]:
        grad_grads = _grads_gradient(grads, ctx.n_rows, grad_out.T @ x)
    return grad_grads, grad_x, None


def _combine_setup(ctx, inputs, output):
    grads, coef, x, n_rows, alpha, beta = inputs
    ctx.n_rows, ctx.alpha, ctx.beta = n_rows, alpha, beta
    ctx.save_for_backward(grads, coef)


def _combine_backward(ctx, grad_out):
    # out = alpha x + beta coef G_n:  dx = alpha grad_out, dcoef = beta grad_out G_n^T, dG_n = beta coef^T grad_out.
    grads, coef = ctx.saved_tensors
    grad_grads = grad_coef = grad_x = None
    if ctx.needs_input_grad[2]:
        grad_x = ctx.alpha * grad_out
    if ctx.needs_input_grad[1]:
        grad_coef = ctx.beta * torch.ops.lowrank_ops.mfac_dots(grads, grad_out.contiguous(), ctx.n_rows)
    if ctx.needs_input_grad[0]:
        grad_grads = _grads_gradient(grads, ctx.n_rows, ctx.beta * (coef.T @ grad_out))
    return grad_grads, grad_coef, grad_x, None, None, None


torch.library.register_autograd("lowrank_ops::mfac_dots", _dots_backward, setup_context=_dots_setup, lib=LIBRARY)
torch.library.register_autograd(
    "lowrank_ops::mfac_combine", _combine_backward, setup_context=_combine_setup, lib=LIBRARY
)


# ---------------------------------------------------------------------------- differentiable passes
def dots_op(grads: torch.Tensor, x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The ``mfac_dots`` op on validated rows ``x [k, dim]``; inside a torch.func transform
    (grad, vjp, jacrev, vmap, jvp), a :func:`~lowrank_ops.ops.composite` block or for
    forward-mode duals, the same float64 sums composed of torch ops: torch.func cannot run a
    ``torch.library`` autograd formula ("must override setup_context"), and the op has no
    forward-mode formula."""
    if not composed_path():
        return torch.ops.lowrank_ops.mfac_dots(grads, x, n_rows)
    _check_buffer("mfac_dots", grads, n_rows)
    _check_vectors("mfac_dots", "x", grads, x)
    return (x.to(torch.float64) @ grads[:n_rows].to(torch.float64).T).to(x.dtype)


def combine_op(grads: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, n_rows: int, alpha: float,
               beta: float) -> torch.Tensor:
    """The ``mfac_combine`` op, or torch ops where :func:`dots_op` composes them."""
    if not composed_path():
        return torch.ops.lowrank_ops.mfac_combine(grads, coef, x, n_rows, alpha, beta)
    _check_buffer("mfac_combine", grads, n_rows)
    _check_vectors("mfac_combine", "x", grads, x)
    if coef.dim() != 2 or tuple(coef.shape) != (x.shape[0], n_rows) or coef.dtype != x.dtype:
        raise ValueError(f"mfac_combine: coef is {coef.dtype} of shape {tuple(coef.shape)}; expected {x.dtype} of "
                         f"shape (k, n_rows) = ({x.shape[0]}, {n_rows})")
    wide = torch.float64
    return (alpha * x.to(wide) + beta * (coef.to(wide) @ grads[:n_rows].to(wide))).to(x.dtype)


# ---------------------------------------------------------------------------- public API
def mfac_dots(grads: torch.Tensor, x: torch.Tensor, n_rows: int | None = None) -> torch.Tensor:
    """``x G_n^T`` ``[k, n]``: the dot products of each vector with the first ``n_rows`` buffer rows.

    Parameters
    ----------
    grads : Tensor[capacity, dim]
        The gradient buffer (float32, float64, float16 or bfloat16).
    x : Tensor[dim] or Tensor[k, dim]
        In :func:`compute_dtype` of ``grads`` (float64 for float64 storage, else float32).
    n_rows : int, optional
        Rows taken part (default: all).

    Returns
    -------
    Tensor[n_rows] or Tensor[k, n_rows]
        In the compute dtype; summed in float64 and rounded once.
    """
    require_tensors("mfac_dots", grads=grads, x=x)
    n = grads.shape[0] if n_rows is None else n_rows
    squeeze = x.dim() == 1
    out = dots_op(grads, x.unsqueeze(0) if squeeze else x, n)
    return out.squeeze(0) if squeeze else out


def mfac_combine(grads: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, alpha: float = 1.0, beta: float = -1.0,
                 n_rows: int | None = None) -> torch.Tensor:
    """``alpha x + beta coef G_n``: for M-FAC, ``(x - G^T c) / lambda``.

    Parameters
    ----------
    grads : Tensor[capacity, dim]
    coef : Tensor[n_rows] or Tensor[k, n_rows]
        In the compute dtype of ``grads``.
    x : Tensor[dim] or Tensor[k, dim]
        In the compute dtype of ``grads``; same number of vectors as ``coef``.
    alpha, beta : float
    n_rows : int, optional
        Rows taken part (default: all).

    Returns
    -------
    Tensor[dim] or Tensor[k, dim]
        In the compute dtype; ``alpha x + beta coef G_n`` formed in float64 and rounded once.
    """
    require_tensors("mfac_combine", grads=grads, coef=coef, x=x)
    alpha = require_finite_number("mfac_combine", "alpha", alpha)
    beta = require_finite_number("mfac_combine", "beta", beta)
    n = grads.shape[0] if n_rows is None else n_rows
    squeeze = x.dim() == 1
    if squeeze:
        x, coef = x.unsqueeze(0), coef.unsqueeze(0)
    out = combine_op(grads, coef, x, n, alpha, beta)
    return out.squeeze(0) if squeeze else out

"""DoRA (weight-decomposed low-rank adaptation) linear and its row norms.

``y = (m / ||W + s B A||_row) * (D(x) (W + s B A)^T) + x W^T - D(x) W^T + b``

(without dropout the last two terms cancel: ``y = (m / n) * (x (W + s B A)^T) + b``).
This is PEFT's DoRA (``peft.tuners.lora.dora.DoraLinearLayer``) term for term, including
its dropout convention: the base path sees x, the rescaled path D(x).

Layers:

* ``torch.ops.lowrank_ops.dora_row_norm``: ``n_o = ||W_o + s B_o A||`` by the low-rank
  identity ``||W_o||^2 + 2 s B_o (W A^T)_o + s^2 B_o (A A^T) B_o^T = ||W_o||^2 + B_o . C_o``
  (expand the squared norm of ``W_o + s B_o A``).  The GEMMs building ``C = 2 s W A^T + s^2 B (A A^T)``
  (``[out, r]``) run in torch (BLAS); a hand-written kernel (csrc/cpu/dora_cpu.cpp,
  csrc/cuda/dora_cuda.cu) streams W once for ``||W_o||^2`` and adds ``B_o . C_o``, clamp
  and square root in the same pass.  ``B A`` (``[out, in]``) is never formed; PEFT forms
  it through ``lora_B(lora_A(eye(in)))`` on every forward.  Measured (CPU, 1 thread,
  float32, shared machine): the kernel's pass runs at ``vector_norm(W, dim=1)``'s speed
  (0.22 vs 0.23 ms at 1024 x 1024; 23 vs 20-25 ms at 4096 x 4096), and the whole op ties
  the same identity composed of torch ops (bench/bench_dora.py ``torch_identity``: 1.06 vs
  0.98 ms at 1024 x 1024, r = 16; 67 vs 76 ms and 148 vs 143 ms at 4096 x 4096, r = 16
  and 64), because the ``W A^T`` GEMM and the pass over W dominate; against PEFT's dense
  norm it is ~30x faster (33.7 ms at 1024 x 1024).
  On AVX-512 CPUs with float32 and r = 4-32 (:data:`~lowrank_ops.ops.base_linear.SMALL_BATCH_ROWS`)
  W is read once: the small-batch kernel computes ``A W^T`` and ``||W_o||^2`` in the same
  pass (``_fused_row_norm``).  2 threads, quiet, against ``torch_identity``: 4096 x 4096
  r = 8 / 16: 1.94-2.12x / 1.26-1.47x; 11008 x 4096: 2.15-2.29x / 1.69-1.76x; r = 64
  (the GEMM and the kernel's pass) 1.00-1.05x.
* ``torch.ops.lowrank_ops.dora_linear_fwd``: the forward (composed GEMMs, the base products
  through :mod:`~lowrank_ops.ops.base_linear`, as lora_linear).
* ``_DoRALinear``: the autograd Function; :func:`dora_linear`: the validated entry point.

The norm is detached, as the DoRA paper (section 4.3) and PEFT do: it receives no gradient,
so ``dm = sum_n dy * z / n``, ``dx``, ``dA``, ``dB`` treat ``c = m / n`` as a constant.
Zero-norm rows: a zero n is replaced by ``eps`` (default ``DEFAULT_EPS`` = 1e-6), so a row with
``W_o + s B_o A = 0`` gives ``y_o = b_o`` and finite gradients instead of PEFT 0.21.2's
inf/NaN.  Accuracy: the identity cancels for rows whose norm is far below ``||W_o||``
(relative error of ``n_o^2`` about ``u ||W_o||^2 / n_o^2``), and its squares leave the
type's range for extreme weights; such rows (``n_o^2 < ||W_o||^2 / 4``, squares below
``min_normal / u`` or near overflow, NaN) are recomputed from the dense row, scaled by its
largest entry (``dora_identity_unreliable`` in the kernels, :func:`_identity_norms` on the
CPU's torch paths).  For the trained adapters DoRA meets, ``s B A`` is a small correction
of W and no row is recomputed.  ``c = m / n`` stays in the accumulation type and ``c z``
is rounded once (a half ``c`` overflows for norms below ``m / 65504``).

Saved for backward: x, W, A, B, m, ``u = D(x) A^T`` ``[N, r]``, ``1 / n`` ``[out]`` and
``z = D(x) (W + s B A)^T``, the one ``[N, out]`` tensor, needed for ``dm`` (PEFT keeps
several: the base result, the LoRA result and their products).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._args import require_tensors
from .._autocast import autocast_entry, autocast_off_backward
from .._dtypes import MM_OUT_DTYPE, accumulate_dtype, float_code
from .._extension import cuda_extension, extension
from .._first_order import first_order_only
from ._layout import flatten_rows
from ._library import LIBRARY, checked_impl, composed_path, current_stream, eager_or_op, register_fake
from .base_linear import SMALL_BATCH_MIN_WEIGHT, _base_linear, grad_input_op, small_batch, small_batch_kernel
from .lora import (_adapter_input, _check_number, _check_tensor, _widened_products, check_adapter, check_dropout,
                   check_scale_range, check_seed, composed_dropout, draw_seed)

__all__ = ["dora_linear", "dora_row_norm", "DEFAULT_EPS", "floor_zero_norms"]

#: What a zero row norm is replaced by: zero-norm rows (511 in Llama-3.1-8B's o_proj,
#: peft#2049) give finite outputs and gradients (PEFT divides by zero there).  Only zero
#: norms (:func:`floor_zero_norms`): a floor on every norm rescaled a row of norm 6e-8 to
#: 6 % of its base output, where PEFT keeps it.
DEFAULT_EPS = 1e-6


def floor_zero_norms(norm: torch.Tensor, eps: float, inplace: bool = False) -> torch.Tensor:
    """``norm`` with its exact zeros replaced by ``eps`` (other norms, however small, as they are)."""
    zero = norm == 0
    return norm.masked_fill_(zero, eps) if inplace else norm.masked_fill(zero, eps)

LIBRARY.define("dora_row_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor")
LIBRARY.define(
    "dora_linear_fwd(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor? bias, "
    "Tensor? seed, float scale, float dropout_p, float eps, Tensor? norm=None) -> (Tensor, Tensor, Tensor, Tensor)"
)


# ---------------------------------------------------------------------------- row norms
#: Rows of a half W upcast at a time for ``W A^T`` with wider adapters (a bounded float32
#: temporary: 16 MB at in = 4096).
_NORM_ROWS = 1024


def wider(adapter_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether adapters of ``adapter_dtype`` are wider than ``dtype`` (float32 on a half base;
    not float32 on a float64 base, which is narrower): then the adapter terms are formed in
    the adapters' dtype and rounded to ``dtype`` once."""
    return adapter_dtype.itemsize > dtype.itemsize


def _norm_operands(weight, lora_A, lora_B, scale: float):
    """The kernel's small operands ``C = 2 s W A^T + s^2 B (A A^T)``, B (``[out, r]``) and A
    (``[r, in]``, for the rows recomputed directly), contiguous in the accumulation type.

    ``W A^T`` is accumulated and kept in float32 / float64: for a half W by one product
    with a float32 output on CUDA (``torch.mm(..., out_dtype=)``), from float32 copies of
    W's rows, ``_NORM_ROWS`` at a time, on the CPU (4x the time of a bfloat16 product at
    4096 x 4096, r = 16: 31 against 7.6 ms; a bfloat16 W on AVX-512 CPUs takes the one-pass
    kernel instead, see :func:`_fused_row_norm`).  Rounded to the half type it overflowed in
    float16 (entries of 1.1e5 for weights of 100: inf - inf = NaN norms), lost digits to
    subnormals (4.5 % norm errors at W of 1e-6), and in bfloat16 put 5e-3 relative errors
    in the norms of rows an adapter had changed by half their norm (PEFT's bfloat16 dense
    norm: ~1e-4).  With wider adapters (float32 on a half W, PEFT's default) always the
    row copies: A rounded to the half type put 3e-4 relative errors in the norms, and
    10-70x PEFT's error in the adapters' gradients.
    """
    accumulate = accumulate_dtype(weight.dtype)
    factor_A, factor_B = lora_A.to(accumulate).contiguous(), lora_B.to(accumulate).contiguous()
    if weight.dtype == accumulate:
        proj = weight @ factor_A.T
    elif weight.is_cuda and MM_OUT_DTYPE and not wider(lora_A.dtype, weight.dtype):
        proj = torch.mm(weight, lora_A.to(weight.dtype).T, out_dtype=accumulate)
    else:
        proj = torch.cat([weight[row:row + _NORM_ROWS].to(accumulate) @ factor_A.T
                          for row in range(0, weight.shape[0], _NORM_ROWS)])
    coef = _coefficients(proj, factor_B, factor_A, scale)
    return coef, factor_B, factor_A


def _coefficients(proj, B, A, scale: float) -> torch.Tensor:
    """``C = 2 s W A^T + s^2 B (A A^T)`` from ``proj = W A^T``: s applied to each factor, not
    as ``alpha = s^2`` (a float32 scalar: a scale above 1.8e19 raised "value cannot be
    converted to type float without overflow"; an overflowing C now makes its rows'
    totals inf, which the direct rows handle)."""
    return torch.addmm(proj, B * scale, (A @ A.T) * scale, beta=2 * scale)


#: Safe range of the identity's total (see ``dora_identity_unreliable`` in
#: csrc/include/lowrank_ops/dora.h): ``min_normal / u`` and ``max / 4`` as powers of two.
_SAFE_RANGE = {torch.float32: (2.0 ** -103, 2.0 ** 125), torch.float64: (2.0 ** -970, 2.0 ** 1021)}


def direct_row_norms(weight, lora_A, lora_B, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``||W_o + s B_o A||`` from the dense rows, in ``dtype``, each row divided by its
    largest ``|entry|`` before squaring (no overflow or underflow; a zero row gives 0,
    infinite entries inf, NaN NaN).  One ``[k, in]`` temporary (divided in place): for
    the few rows the identity cannot be trusted with, and for the composed path."""
    dense = torch.addmm(weight.to(dtype), lora_B.to(dtype), lora_A.to(dtype), alpha=scale)
    if dense.shape[1] == 0:  # in_features = 0: empty rows (torch's inf norm of nothing raises)
        return dense.new_zeros(dense.shape[0])
    largest = torch.linalg.vector_norm(dense, ord=float("inf"), dim=1, keepdim=True)  # NaN if the row has one
    finite = (largest > 0) & (largest < float("inf"))
    norm = torch.linalg.vector_norm(dense.div_(torch.where(finite, largest, 1.0)), dim=1)
    largest = largest.squeeze(1)
    return torch.where(finite.squeeze(1), norm * largest, largest)


def _identity_norms(squares, total, weight, lora_A, lora_B, scale: float) -> torch.Tensor:
    """``sqrt(total)`` (``total = ||W_o||^2 + B_o . C_o``), with the rows the identity cannot
    be trusted with (as the kernels' ``dora_identity_unreliable``: cancellation, squares
    out of range, NaN) recomputed by :func:`direct_row_norms`.  CPU paths (a host sync)."""
    low, high = _SAFE_RANGE[total.dtype]
    unreliable = ~((total >= 0.25 * squares) & (total >= low) & (total <= high))
    norm = total.clamp_min(0).sqrt_()
    if unreliable.any():
        rows = unreliable.nonzero().squeeze(1)
        # Exactly zero rows (W_o and B_o zero: DoRA's zero rows) keep their 0 without the
        # dense recomputation; only the others, whose squares underflowed, cancelled or
        # overflowed, are recomputed.
        nonzero = (weight[rows] != 0).any(1) | (lora_B[rows] != 0).any(1)
        norm[rows[~nonzero]] = 0  # their total may be 0 * inf = NaN (A A^T overflowing), as the kernels' zero_row
        rows = rows[nonzero]
        if rows.numel():
            norm[rows] = direct_row_norms(weight[rows], lora_A, lora_B[rows], scale, norm.dtype)
    return norm


def _check_norm_args(weight, lora_A, lora_B, scale) -> None:
    check_adapter("dora_row_norm", None, weight, lora_A, lora_B)
    # (float64 W: the norm runs in float64 whatever the adapters' dtype)
    check_scale_range("dora_row_norm", _check_number("dora_row_norm", "scale", scale), weight.dtype, "a weight")


def _kernel_args(weight, lora_A, lora_B, scale):
    coef, factor_B, factor_A = _norm_operands(weight, lora_A, lora_B, scale)
    out = torch.empty(weight.shape[0], dtype=coef.dtype, device=weight.device)
    args = dict(
        weight=weight.data_ptr(), coef=coef.data_ptr(), lora_B=factor_B.data_ptr(), lora_A=factor_A.data_ptr(),
        out=out.data_ptr(), out_features=weight.shape[0], in_features=weight.shape[1], rank=lora_A.shape[0],
        weight_stride_o=weight.stride(0), weight_stride_i=weight.stride(1),
        dtype=float_code(weight.dtype, "dora_row_norm", "weight"), scale=float(scale),
    )
    return out, (coef, factor_B, factor_A), args


def _fused_row_norm(weight, lora_A, lora_B, scale):
    """The row norms from one pass over W (float32 or bfloat16, AVX-512 CPUs, the kernel's
    row counts; float32 factors): the small-batch kernel computes ``A W^T`` and
    ``||W_o||^2`` together, and the identity's remaining ``[out, r]`` terms are torch ops.
    The other path reads W twice (MKL's ``W A^T``, then _C's norm kernel).  4096 x 4096
    float32, 2-core Xeon, one run: r = 8 2.4 against 4.8 ms (MKL's GEMM alone 3.2 ms, the
    small-batch product 2.0), r = 16 3.4-3.9 against 4.8 ms.  A bfloat16 W is widened
    exactly as it is read: ``W A^T`` in float32 at bfloat16's bytes, where the other path
    copies W's rows to float32 first."""
    squares = torch.empty(weight.shape[0], dtype=torch.float32)
    proj = small_batch_kernel(lora_A, weight, weight_sumsq=squares).T  # W A^T
    B = lora_B.contiguous()
    coef = _coefficients(proj, B, lora_A, scale)
    return _identity_norms(squares, squares + (B * coef).sum(1), weight, lora_A, lora_B, scale)


def _dora_row_norm_cpu(weight, lora_A, lora_B, scale):
    _check_norm_args(weight, lora_A, lora_B, scale)
    if weight.dtype == torch.float32 and weight.numel() < SMALL_BATCH_MIN_WEIGHT:
        # W in cache: MKL's product and torch's row norms beat one pass of our kernel
        # (1024 x 1024, r = 16: 0.38-0.42 against 0.46 ms; from 2048 x 2048 and 1024 x 4096
        # on the one pass wins, 1.15 against 1.31 and 1.09 against 1.19 ms; 2-core Xeon).
        coef, factor_B, _ = _norm_operands(weight, lora_A, lora_B, scale)
        squares = torch.linalg.vector_norm(weight, dim=1).square_()
        return _identity_norms(squares, squares + (factor_B * coef).sum(1), weight, lora_A, lora_B, scale)
    # One pass over W beats MKL's product plus the norm pass even where MKL's product
    # alone is faster (1024 x 1024, r = 16: 0.44 against 0.47 ms, 2-core Xeon, interleaved).
    if lora_A.dtype == lora_B.dtype == torch.float32 and small_batch(lora_A, weight, "forward", min_weight=0):
        return _fused_row_norm(weight, lora_A, lora_B, scale)
    if weight.dtype == torch.bfloat16:
        # Half adapters widen exactly (float64 ones are refused on a half W: check_adapter).
        factor_A, factor_B = lora_A.to(torch.float32), lora_B.to(torch.float32)
        if small_batch(factor_A, weight, "forward", min_weight=0, weight_dtypes=(torch.bfloat16,)):
            return _fused_row_norm(weight, factor_A, factor_B, scale)
    out, keep_alive, args = _kernel_args(weight, lora_A, lora_B, scale)
    extension().dora_row_norm_cpu(**args, num_threads=torch.get_num_threads())
    del keep_alive
    return out


def _dora_row_norm_cuda(weight, lora_A, lora_B, scale):
    module = cuda_extension("dora_row_norm")
    _check_norm_args(weight, lora_A, lora_B, scale)
    out, keep_alive, args = _kernel_args(weight, lora_A, lora_B, scale)
    module.dora_row_norm_cuda(**args, device=weight.device.index, stream=current_stream(weight))
    # The kernel runs asynchronously: the temporaries must outlive it.  Recording them on
    # the stream makes the caching allocator wait for the stream before reusing them.
    for tensor in keep_alive:
        tensor.record_stream(torch.cuda.current_stream(weight.device))
    return out


def _dora_row_norm_fake(weight, lora_A, lora_B, scale):
    return weight.new_empty((weight.shape[0],), dtype=accumulate_dtype(weight.dtype))


def _row_norm_op(weight: torch.Tensor):
    """dora_row_norm for ``weight``'s device: the registered op under torch.compile, else its
    implementation called directly (eager_or_op)."""
    return eager_or_op("dora_row_norm", _dora_row_norm_cpu if weight.device.type == "cpu" else _dora_row_norm_cuda)


LIBRARY.impl("dora_row_norm", _dora_row_norm_cpu, "CPU")
LIBRARY.impl("dora_row_norm", _dora_row_norm_cuda, "CUDA")
register_fake("dora_row_norm", _dora_row_norm_fake)


@autocast_entry()
def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Row norms ``||W_o + scale * B_o A||`` without forming ``B A`` (not differentiable).

    Parameters
    ----------
    weight : Tensor[out_features, in_features]
        float32, float64, float16 or bfloat16, any strides.
    lora_A : Tensor[r, in_features]
    lora_B : Tensor[out_features, r]
        W's dtype or float32.
    scale : float

    Returns
    -------
    Tensor[out_features]
        float32 (float64 for a float64 weight); exact zeros for zero rows.  Under
        ``torch.autocast`` computed as without it (autocast runs norms in float32 too).
    """
    require_tensors("dora_row_norm", weight=weight, lora_A=lora_A, lora_B=lora_B)
    scale = _check_number("dora_row_norm", "scale", scale)
    return _row_norm_op(weight)(weight.detach(), lora_A.detach(), lora_B.detach(), scale)  # not differentiable


def _composed(x, weight, lora_A, lora_B, magnitude, bias, scale: float, p: float, eps: float, norm, generator):
    """:func:`dora_linear` composed of torch ops, for torch.func transforms (see
    ``lora._composed``): the detached row norm (the dense ``W + s B A``, formed once),
    ``c = m / n`` and ``y = x W^T + b + (c - 1) D(x) W^T + c s D(x) A^T B^T``."""
    if norm is None:
        with torch.no_grad():
            norm = direct_row_norms(weight, lora_A, lora_B, scale, accumulate_dtype(weight.dtype))
    norm = norm.to(accumulate_dtype(weight.dtype))
    # z in the adapters' dtype where it is wider, c z in the accumulation type (a half c
    # overflows), rounded once (as the fused path).
    work = lora_A.dtype if wider(lora_A.dtype, x.dtype) else x.dtype
    factor = magnitude.to(norm.dtype) / floor_zero_norms(norm.detach(), eps)
    adapter_input = composed_dropout(x, p, generator)
    shrunk = adapter_input.to(lora_A.dtype) @ lora_A.T
    product = (adapter_input @ weight.T).to(work) + ((shrunk * scale) @ lora_B.T).to(work)  # z = D(x) (W + s B A)^T
    if adapter_input is x:  # y = c z + b
        y = factor * product if bias is None else factor * product + bias.to(factor.dtype)
    else:
        y = (torch.nn.functional.linear(x, weight, bias) - adapter_input @ weight.T).to(factor.dtype) + factor * product
    return y.to(x.dtype)


# ---------------------------------------------------------------------------- forward
def _dora_linear_fwd(x, weight, lora_A, lora_B, magnitude, bias, seed, scale, dropout_p, eps, norm=None):
    dtype = x.dtype
    if norm is None:
        norm = _row_norm_op(weight)(weight, lora_A, lora_B, scale)
    else:  # given (a cache): not modified in place
        norm = norm.to(accumulate_dtype(weight.dtype), copy=True)
    inv_norm = floor_zero_norms(norm, eps, inplace=True).reciprocal_()
    # c = m / n in the accumulation type, multiplied into z there and rounded once: a half
    # c overflowed (m / n of 2.7e5 for norms of 3.6e-6: inf outputs, finite in PEFT's units).
    factor = magnitude.to(inv_norm.dtype) * inv_norm
    adapter_input = _adapter_input(x, seed, dropout_p)
    shrunk = adapter_input.to(lora_A.dtype) @ lora_A.T  # u = D(x) A^T
    product = _base_linear(adapter_input, weight)
    if adapter_input is x:
        y = None
    else:  # PEFT: the base path sees x, the rescaled one D(x): y = x W^T + b - D(x) W^T + c z
        y = _base_linear(x, weight, bias)
        y.sub_(product)
    if wider(lora_A.dtype, dtype):
        # Wider adapters (float32 on a half base, PEFT's default): z, c z and the sum in the
        # adapters' dtype, rounded once, as PEFT keeps its adapter term (rounding z to half
        # first, then c z, gave 1.3-1.5x PEFT's error); z is saved in that dtype too.
        wide = lora_A.dtype
        product = product.to(wide).addmm_(shrunk * scale, lora_B.T)
        scaled = product * factor.to(wide)
        if y is None:
            y = (scaled if bias is None else scaled.add_(bias.to(wide))).to(dtype)
        else:
            y = scaled.add_(y.to(wide)).to(dtype)
        return y, product, shrunk, inv_norm
    product.addmm_((shrunk * scale).to(dtype), lora_B.T.to(dtype))  # z = D(x) (W + s B A)^T, in place
    if y is None:  # out=: computed in the factor's type, written in x's
        y = torch.empty_like(product)
        if bias is None:
            torch.mul(product, factor, out=y)
        else:
            torch.addcmul(bias, product, factor, out=y)
    else:
        y.addcmul_(product, factor)
    return y, product, shrunk, inv_norm


def _dora_linear_fwd_fake(x, weight, lora_A, lora_B, magnitude, bias, seed, scale, dropout_p, eps, norm=None):
    _check_fwd_tensors(x, weight, lora_A, lora_B, magnitude, bias, norm)  # at trace time, as the op's own check
    n, out_features = x.shape[0], weight.shape[0]
    return (
        x.new_empty((n, out_features)),
        x.new_empty((n, out_features), dtype=lora_A.dtype if wider(lora_A.dtype, x.dtype) else x.dtype),  # z
        x.new_empty((n, lora_A.shape[0]), dtype=lora_A.dtype),
        x.new_empty((out_features,), dtype=accumulate_dtype(weight.dtype)),
    )


def _check_tensors(op: str, x, weight, lora_A, lora_B, magnitude, bias, norm) -> None:
    """:func:`dora_linear`'s tensors (the adapter's, the magnitude's and the given norm's)."""
    check_adapter(op, x, weight, lora_A, lora_B, bias)
    _check_tensor(op, "magnitude", magnitude, (lora_A.dtype, torch.float32), x.device)
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(
            f"{op}: magnitude has shape {tuple(magnitude.shape)}; expected (out_features,) = ({weight.shape[0]},)"
        )
    if norm is not None:
        _check_tensor(op, "norm", norm, (accumulate_dtype(weight.dtype),), x.device)
        if tuple(norm.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: norm has shape {tuple(norm.shape)}; expected (out_features,) = ({weight.shape[0]},)")


def _check_fwd_tensors(x, weight, lora_A, lora_B, magnitude, bias, norm) -> None:
    op = "dora_linear_fwd"
    _check_tensors(op, x, weight, lora_A, lora_B, magnitude, bias, norm)
    if x.dim() != 2:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected 2-D (N, in_features)")


def _check_fwd_scalars(x, weight, lora_A, lora_B, magnitude, bias, seed, scale, dropout_p, eps, norm=None) -> None:
    """:func:`dora_linear`'s checks, for direct callers of the op (torch's own errors, or an
    int64 or [1, out] magnitude and a float64 norm accepted, silently, before)."""
    op = "dora_linear_fwd"
    _check_number(op, "scale", scale)
    check_dropout(op, dropout_p)
    if not _check_number(op, "eps", eps) > 0.0:
        raise ValueError(f"{op}: eps must be > 0; got {eps}")
    _check_fwd_tensors(x, weight, lora_A, lora_B, magnitude, bias, norm)
    check_scale_range(op, scale, lora_A.dtype, "adapters")
    check_seed(op, seed, dropout_p)


for _device in ("CPU", "CUDA"):
    LIBRARY.impl("dora_linear_fwd", checked_impl(_check_fwd_scalars, _dora_linear_fwd), _device)
register_fake("dora_linear_fwd", _dora_linear_fwd_fake)


# ---------------------------------------------------------------------------- autograd
class _DoRALinear(torch.autograd.Function):
    """Autograd of DoRA with the row norm n detached (``c = m / n`` constant for x, A, B).

    With ``g = dy * c`` (``[N, out]``), ``h = g B``: ``dm = (sum_n dy z) / n``,
    ``dB = s g^T u``, ``dA = s h^T D(x)``, ``dx = g W + s h A`` without dropout and
    ``dy W + D'((g - dy) W + s h A)`` with it; ``dW`` (if asked) ``g^T x`` or
    ``dy^T x + (g - dy)^T D(x)``; ``db = sum_n dy``.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, seed, scale, dropout_p, eps, norm):
        y, product, shrunk, inv_norm = eager_or_op("dora_linear_fwd", _dora_linear_fwd)(
            x, weight, lora_A, lora_B, magnitude, bias, seed, scale, dropout_p, eps, norm
        )
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, seed, product, shrunk, inv_norm)
        return y

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, magnitude, seed, product, shrunk, inv_norm = ctx.saved_tensors
        need_x, need_W, need_A, need_B, need_m, need_bias = ctx.needs_input_grad[:6]
        scale, p = ctx.scale, ctx.dropout_p
        dtype, adapter_dtype = x.dtype, lora_A.dtype
        dropout = seed is not None and p > 0.0
        grad_x = grad_W = grad_A = grad_B = grad_m = grad_bias = None
        if need_m:  # dy z summed over rows, the products too in the accumulation type (half ones overflow)
            grad_m = (_widened_products(grad_y, product, inv_norm.dtype).sum(0) * inv_norm).to(magnitude.dtype)
        factor = magnitude.to(inv_norm.dtype) * inv_norm  # c, in the accumulation type (a half c overflows)
        scaled_grad = torch.mul(grad_y, factor, out=torch.empty_like(grad_y, dtype=dtype))  # g = dy c, rounded once
        adapter_input = _adapter_input(x, seed, p) if (need_A or need_W) and dropout else x
        mixed = wider(adapter_dtype, dtype)  # their gradients from dy c unrounded
        scaled_grad_adapter = (grad_y.to(adapter_dtype) * factor.to(adapter_dtype)
                               if mixed else scaled_grad.to(adapter_dtype))
        if need_B:
            grad_B = scaled_grad_adapter.T @ (shrunk * scale)
        if need_x or need_A:
            expanded = (scaled_grad_adapter @ lora_B).mul_(scale)  # s h
            if need_A:
                grad_A = expanded.T @ adapter_input.to(adapter_dtype)
            if need_x:
                if dropout:
                    inner = grad_input_op()(scaled_grad - grad_y, weight)
                    if mixed:  # the adapter term added in its dtype, rounded once
                        inner = inner.to(adapter_dtype).addmm_(expanded, lora_A).to(dtype)
                    else:
                        inner.addmm_(expanded.to(dtype), lora_A.to(dtype))
                    grad_x = grad_input_op()(grad_y, weight).add_(_adapter_input(inner, seed, p))
                elif mixed:
                    grad_x = grad_input_op()(scaled_grad, weight).to(adapter_dtype).addmm_(expanded, lora_A).to(dtype)
                else:
                    grad_x = grad_input_op()(scaled_grad, weight).addmm_(expanded.to(dtype), lora_A.to(dtype))
        if need_W:
            if dropout:
                grad_W = (grad_y.T @ x).addmm_((scaled_grad - grad_y).T, adapter_input)
            else:
                grad_W = scaled_grad.T @ x
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_W, grad_A, grad_B, grad_m, grad_bias, None, None, None, None, None


# ---------------------------------------------------------------------------- public API
@autocast_entry("x", "weight", "lora_A", "lora_B", "bias")
def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    eps: float = DEFAULT_EPS,
    norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA linear, PEFT's numerics: ``y = (m / ||W + s B A||_row) * (x (W + s B A)^T) + b``.

    Parameters
    ----------
    x : Tensor[..., in_features]
        float32, float64, float16 or bfloat16; leading batch dims allowed.
    weight : Tensor[out_features, in_features]
        The frozen base weight (x's dtype); its gradient is computed only if it requires grad.
    lora_A : Tensor[r, in_features]
    lora_B : Tensor[out_features, r]
    magnitude : Tensor[out_features]
        DoRA's trainable magnitude m (PEFT's ``lora_magnitude_vector``); the adapters' dtype
        or float32.  Not cast under autocast: it scales the output elementwise (PEFT's
        ``magnitude / weight_norm``, which autocast leaves in float32), so its gradient is
        not rounded to the autocast dtype.
    bias : Tensor[out_features], optional
    scale : float
        ``alpha / r`` or ``alpha / sqrt(r)``.
    dropout_p : float
        Dropout on the adapter path, PEFT's convention (see the module docstring).
    generator : torch.Generator, optional
        Source of the dropout seed, as :func:`~lowrank_ops.ops.lora_linear`'s (any device;
        a CUDA one costs one device-to-host read).
    eps : float
        What a zero row norm is replaced by (zero-norm rows give finite outputs and
        gradients); nonzero norms are used as they are, as PEFT does.
    norm : Tensor[out_features], optional
        The row norms ``||W + s B A||_row`` when already known (:func:`dora_row_norm` of
        these factors, e.g. cached while W, A and B do not change:
        :class:`~lowrank_ops.nn.LoRALinear` in eval mode); skips their computation, the
        op's largest cost at small batch.  Used as given (it is detached anyway), zeros
        replaced by ``eps``.

    Returns
    -------
    Tensor[..., out_features]
        x's dtype; under ``torch.autocast`` the autocast dtype: x, weight, bias and the
        factors are cast to it (as ``F.linear``'s operands) and the op runs with autocast
        disabled.
    """
    op = "dora_linear"
    _check_tensors(op, x, weight, lora_A, lora_B, magnitude, bias, norm)
    scale = _check_number(op, "scale", scale)
    check_scale_range(op, scale, lora_A.dtype, "adapters")  # (the adapter term runs in theirs)
    eps = _check_number(op, "eps", eps)
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be > 0; got {eps}")
    p = check_dropout(op, dropout_p)
    if norm is not None:
        norm = norm.detach()
    if composed_path():
        return _composed(x, weight, lora_A, lora_B, magnitude, bias, scale, p, eps, norm, generator)
    seed = draw_seed(generator, "dora_linear") if p > 0.0 else None  # stays on the CPU: reading it never syncs a GPU
    batch_shape = x.shape[:-1]
    y = _DoRALinear.apply(flatten_rows(x), weight, lora_A, lora_B, magnitude, bias, seed,
                          scale, p, eps, norm)
    return y.reshape(*batch_shape, weight.shape[0])

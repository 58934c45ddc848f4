"""Products with a frozen base weight, shared by the adapter layers (LoRA, DoRA, multi-adapter).

* :func:`base_linear`: ``y = x W^T + b`` ``[N, out]``;
* :func:`base_linear_grad_input`: ``dx = dy W`` ``[N, in]``.

Both are also registered ops (``torch.ops.lowrank_ops.base_linear``,
``base_linear_grad_input``), which is what torch.compile traces when they are called from
an autograd Function (see :func:`forward_op`, :func:`grad_input_op`); callers that are
themselves op implementations call the functions directly.

Both use BLAS except for small float32 CPU batches on CPUs with AVX-512
(:data:`SMALL_BATCH_ROWS`), where ``_C.small_batch_linear_cpu`` and
``_C.small_batch_linear_grad_input_cpu`` (csrc/cpu/base_linear_cpu.cpp) stream W once
with every element used for all rows from registers.  At such batch sizes MKL's sgemm is
neither flop- nor bandwidth-bound: 5.1 ms for 16 x 4096 x 4096 where reading W takes
1.5 ms (2-core AVX-512 Xeon, 2 threads); ours 2.8 ms forward, 2.9 ms (MKL 3.4) for the
input gradient.  On an AMD EPYC MKL is slower still at these sizes (4 x 4096 x 4096: 8.2
ms against our 2.6), so there the kernels take every batch up to 64 rows.  Ratios for every
size: the comments above :data:`SMALL_BATCH_ROWS`, bench/bench_base_linear.py.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._dtypes import float_code
from .._extension import extension
from ._library import LIBRARY, checked_impl, composed_path, eager_or_op, register_fake

__all__ = ["SMALL_BATCH_ROWS", "base_linear", "base_linear_grad_input", "forward_op", "grad_input_op"]

LIBRARY.define("base_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
LIBRARY.define("base_linear_grad_input(Tensor grad_y, Tensor weight) -> Tensor")

# Batch sizes (rows) for which the CPU products use _C's small-batch kernels (float32,
# AVX-512) instead of BLAS, per product, and the smallest weight (elements) for which they
# do: the measured crossovers, which depend on the CPU's vendor because MKL's small GEMMs
# take their fast paths on Intel CPUs only.
#
# Intel (2-core AVX-512 Xeon, bench/results/cpu-intel-xeon-2core/base_linear-full, the
# ``kernel`` rows against ``torch`` at 4096 x 4096, 11008 x 4096 and 4096 x 11008).
# Forward: 0.90-0.98x MKL at 2 rows (its GEMV-like path), 1.56-2.22x at 4-16, 1.13-1.31x
# at 32, 0.89-1.05x at 48.  Grad input: 1.14-1.82x at 2 rows, 1.06-1.57x at 4-16,
# 0.98-1.22x at 32, 0.93-1.08x at 48.  At one row MKL's GEMV is as fast for both.  Below
# 4 M elements W (16 MB) sits in the caches and MKL's GEMM is as fast or faster: kernel /
# MKL time at 1024 x 1024 (quiet) 0.85-1.07x forward and 0.82-0.91x grad input at 4-32
# rows, against 1.3-1.8x forward and 1.1-1.6x grad input at 4-16 rows for W of 4-16 M
# elements (2048 x 2048, 1024 x 4096, 4096 x 1024, 2048 x 5504, 4096 x 4096).
#
# Others (2-core AVX-512 AMD EPYC, bench/results/cpu-amd-epyc-2core/base_linear-full and
# interleaved medians at smaller W): the kernels win at every batch size they take.
# Forward: 1.7-2.0x at 1 row, 3.6-3.9x at 2, 1.09-1.85x at 48, 1.15-1.5x at 64 (LLaMA
# shapes); grad input 0.96-1.14x at 1 row, 1.26-1.64x at 48-64.  W of 1 M elements (1024 x
# 1024) still 1.3-5.1x forward and 1.5-5.1x grad input at 1-64 rows; at 256 K (512 x 512)
# 0.93-1.95x, at 64 K (256 x 256) 0.6-1.3x: below 1 M elements, BLAS.  Beyond 64 rows
# (stop 22, interleaved medians, kernel / MKL): the forward kernel loses (0.88-0.97x at
# 128 rows, 0.75-0.80x at 256, 1024 x 1024), the grad-input kernel keeps winning: 1024 x
# 1024 1.44x at 96 rows, 1.18-1.41x at 128, 1.37x at 192, 1.07-1.16x at 256 (1.20x at
# 384); 2048 x 2048 1.31x at 256; 4096 x 4096 1.34-1.41x at 128, 1.13-1.18x at 256,
# 0.95x at 512; 11008 x 4096 and 4096 x 11008 1.27-1.29x at 128.
_INTEL_POLICY = ({"forward": (4, 32), "grad_input": (2, 32)}, 1 << 22)
_OTHER_POLICY = ({"forward": (1, 64), "grad_input": (1, 256)}, 1 << 20)


def _small_batch_policy() -> tuple:
    """``(rows, min_weight)`` for this CPU (the Intel policy without a loadable extension:
    the kernels are unavailable then, and so is the choice)."""
    try:
        intel = extension().cpu_features()["genuine_intel"]
    except RuntimeError:
        intel = True
    rows, min_weight = _INTEL_POLICY if intel else _OTHER_POLICY
    return dict(rows), min_weight


#: Batch sizes (rows) per product (``"forward"``, ``"grad_input"``) for which the CPU
#: products use the small-batch kernels, on this CPU (see the measurements above).
#: Smallest weight (elements) for which they do: below it W sits in the caches and BLAS
#: is as fast.
SMALL_BATCH_ROWS, SMALL_BATCH_MIN_WEIGHT = _small_batch_policy()


@functools.lru_cache(maxsize=None)
def _cpu_has_avx512() -> bool:
    return bool(extension().cpu_features()["avx512f"])


def small_batch(rows: torch.Tensor, weight: torch.Tensor, product: str, min_weight: Optional[int] = None,
                weight_dtypes: tuple = (torch.float32,)) -> bool:
    """Whether ``product`` (a key of SMALL_BATCH_ROWS) of ``rows`` [N, *] with ``weight``
    [out, in] runs on the small-batch kernels: 2-D operands of matching sizes (``rows``
    [N, in] forward, [N, out] for the input gradient), row-major only (an expanded
    operand, e.g. the gradient of a ``sum(0)``, has row stride 0 and goes to BLAS), and a
    weight of at least ``min_weight`` elements (default :data:`SMALL_BATCH_MIN_WEIGHT`).
    ``rows`` is float32; ``weight`` one of ``weight_dtypes`` (the forward kernel also
    reads a bfloat16 W, widened exactly)."""
    low, high = SMALL_BATCH_ROWS[product]
    min_weight = max(SMALL_BATCH_MIN_WEIGHT if min_weight is None else min_weight, 1)
    # The kernels take their sizes from both operands, so mismatched ones (which BLAS
    # rejects) must not reach them: they computed garbage and read past grad_y's rows.
    matched = weight.shape[1] if product == "forward" else weight.shape[0]
    return (  # cheapest tests first: most calls fail on the row count or the size
        low <= rows.shape[0] <= high and weight.numel() >= min_weight
        and rows.dim() == 2 and weight.dim() == 2 and rows.shape[1] == matched
        and rows.dtype == torch.float32 and weight.dtype in weight_dtypes
        and rows.device.type == "cpu" and weight.device.type == "cpu"
        and rows.stride(-1) == 1 and rows.stride(0) >= rows.shape[1]
        and weight.stride(-1) == 1 and weight.stride(0) >= weight.shape[1] and _cpu_has_avx512()
    )


def small_batch_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       weight_sumsq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` on ``_C.small_batch_linear_cpu`` whatever the size (up to its 64 rows):
    float32 CPU tensors with unit column stride; what :func:`base_linear` runs inside
    :data:`SMALL_BATCH_ROWS` (and the benchmark's ``kernel`` rows everywhere).

    ``weight_sumsq`` (a contiguous float32 ``[out]`` tensor, optional) receives the squared
    row norms ``sum_i W[o, i]^2``, computed in the same pass over W.  A bfloat16 ``weight``
    is widened exactly: y (float32) and the norms are those of ``weight.float()``."""
    y = x.new_empty((x.shape[0], weight.shape[0]))
    extension().small_batch_linear_cpu(
        x=x.data_ptr(), weight=weight.data_ptr(), bias=0 if bias is None else bias.data_ptr(), y=y.data_ptr(),
        rows=x.shape[0], in_features=x.shape[1], out_features=weight.shape[0], x_ld=x.stride(0),
        w_ld=weight.stride(0), y_ld=y.stride(0), num_threads=torch.get_num_threads(),
        weight_sumsq=0 if weight_sumsq is None else weight_sumsq.data_ptr(),
        weight_dtype=float_code(weight.dtype, "small_batch_linear", "weight"),
    )
    return y


def small_batch_grad_input_kernel(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy W`` on ``_C.small_batch_linear_grad_input_cpu`` whatever the size (up to its 256
    rows; see small_batch_kernel)."""
    grad_x = grad_y.new_empty((grad_y.shape[0], weight.shape[1]))
    extension().small_batch_linear_grad_input_cpu(
        grad_y=grad_y.data_ptr(), weight=weight.data_ptr(), grad_x=grad_x.data_ptr(), rows=grad_y.shape[0],
        in_features=weight.shape[1], out_features=weight.shape[0], gy_ld=grad_y.stride(0), w_ld=weight.stride(0),
        gx_ld=grad_x.stride(0), num_threads=torch.get_num_threads(),
    )
    return grad_x


def _kernel_bias(bias: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can read ``bias`` as a dense ``[out]`` vector of W's dtype and
    device; anything else (a broadcast bias, another dtype) goes to ``addmm``, which
    broadcasts it or raises."""
    return (bias.shape == weight.shape[:1] and bias.stride(0) == 1 and bias.dtype == weight.dtype
            and bias.device == weight.device)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b``.

    Parameters
    ----------
    x : Tensor[N, in]
    weight : Tensor[out, in]
        x's dtype and device.
    bias : Tensor[out], optional

    Returns
    -------
    Tensor[N, out]
        The small-batch kernel's result (see :data:`SMALL_BATCH_ROWS`) or ``addmm``'s.
        Where derivatives are asked for (an input requiring grad, torch.func, forward
        mode, ``ops.composite()``), ``F.linear``'s, with its derivatives: the kernel has
        none, and the result was differentiable at some sizes (addmm) and not at others
        (the kernel), and zero under ``torch.func.jvp``.
    """
    _check_linear_args("base_linear", x, weight, bias, batched=True)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if wants_grad or composed_path():
        return torch.nn.functional.linear(x, weight, bias)
    return forward_op()(x, weight, bias)


def _check_linear_args(op: str, rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       rows_name: str = "x", batched: bool = False) -> None:
    """Floating operands of one dtype and device, ``rows [N, in]`` or ``[N, out]`` as the op
    needs (``[..., N, *]`` with ``batched``: the public functions), and a bias ``[out]`` (or
    ``[1]``, broadcast): the public functions' and the registered ops' checks."""
    side = "in" if rows_name == "x" else "out"
    matched = (weight.shape[1] if side == "in" else weight.shape[0]) if weight.dim() == 2 else None
    if not (rows.dim() >= 2 if batched else rows.dim() == 2) or weight.dim() != 2 or rows.shape[-1] != matched:
        raise ValueError(f"{op}: {rows_name} has shape {tuple(rows.shape)} and weight {tuple(weight.shape)}; expected "
                         f"{rows_name} [{'..., ' if batched else ''}N, {side}] and weight [out, in]")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dtype != rows.dtype or tensor.device != rows.device):
            raise ValueError(f"{op}: {name} is {tensor.dtype} on {tensor.device}; expected {rows_name}'s "
                             f"{rows.dtype} on {rows.device}")
    if not rows.is_floating_point():
        raise TypeError(f"{op}: {rows_name} has dtype {rows.dtype}; expected a floating dtype")
    if bias is not None and (bias.dim() > 1 or bias.numel() not in (1, weight.shape[0])):  # [1] broadcasts
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected (out,) = ({weight.shape[0]},)")


def _base_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`base_linear`'s implementation (the registered op's CPU and CUDA impl)."""
    if small_batch(x, weight, "forward") and (bias is None or _kernel_bias(bias, weight)):
        return small_batch_kernel(x, weight, bias)
    return torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T


def base_linear_grad_input(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy W``: the input gradient of ``x W^T + b`` (small-batch kernel or GEMM).

    Parameters
    ----------
    grad_y : Tensor[N, out]
        The output gradient; any floating dtype.
    weight : Tensor[out, in]
        grad_y's dtype and device.

    Returns
    -------
    Tensor[N, in]
        In grad_y's dtype, on its device: ``_C.small_batch_linear_grad_input_cpu``'s
        result for float32 CPU batches within :data:`SMALL_BATCH_ROWS` ``["grad_input"]``
        (row-major operands, a weight of at least :data:`SMALL_BATCH_MIN_WEIGHT`
        elements, AVX-512), else ``grad_y @ weight``.  Not differentiable by itself: the
        callers are backward implementations.
    """
    _check_linear_args("base_linear_grad_input", grad_y, weight, rows_name="grad_y", batched=True)
    return grad_input_op()(grad_y, weight)


def _base_linear_grad_input(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`base_linear_grad_input`'s implementation (the registered op's impl)."""
    if small_batch(grad_y, weight, "grad_input"):
        return small_batch_grad_input_kernel(grad_y, weight)
    return grad_y @ weight


def _base_linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _base_linear_grad_input_fake(grad_y, weight):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))


# The registered ops check their arguments (direct callers); the ops' own autograd code
# calls the implementations through forward_op / grad_input_op, unchecked.
for _name, _impl, _fake in [
    ("base_linear", checked_impl(lambda x, weight, bias: _check_linear_args("base_linear", x, weight, bias),
                                 _base_linear), _base_linear_fake),
    ("base_linear_grad_input", checked_impl(lambda grad_y, weight: _check_linear_args(
        "base_linear_grad_input", grad_y, weight, rows_name="grad_y"), _base_linear_grad_input),
     _base_linear_grad_input_fake),
]:
    LIBRARY.impl(_name, _impl, "CPU")
    LIBRARY.impl(_name, _impl, "CUDA")
    register_fake(_name, _fake)


def forward_op():
    """:func:`base_linear` for an autograd Function: the registered op under torch.compile (eager_or_op)."""
    return eager_or_op("base_linear", _base_linear)


def grad_input_op():
    """:func:`base_linear_grad_input` for an autograd backward: the registered op under torch.compile."""
    return eager_or_op("base_linear_grad_input", _base_linear_grad_input)

"""Multi-adapter LoRA linear (punica/S-LoRA SGMV, trainable): :func:`lora_linear_multi`.

Rows are grouped into segments; segment ``s`` (rows ``segment_offsets[s]:segment_offsets[s+1]``)
uses adapter ``adapter_ids[s]`` (``-1``: none), with that adapter's rank and scale::

    y = x W^T + b + sum_s scales[a_s] * (x_s A[a_s, :r]^T) B[a_s, :, :r]^T,   r = ranks[a_s]

Layers:

* ``torch.ops.lowrank_ops.lora_multi_shrink`` (``h = x A^T`` gathered per segment, or
  ``g = s dy B`` in the backward), ``lora_multi_expand_`` (``y += s h B^T``, or
  ``dx += g A``; in place, so no second ``[N, out]`` buffer) and
  ``lora_multi_segment_outer`` (per-adapter ``g^T x`` and ``s h^T dy``): the kernels,
  declared once with ``torch.library`` (CPU impl, CUDA impl, fake impl).
* ``_LoRALinearMulti``: the autograd Function.  It saves ``x`` and ``h = x A^T``
  (``[N, r_max]``), never an ``[N, out]`` intermediate.
* :func:`lora_linear_multi`: the public, validated entry point.

The frozen base ``x W^T + b`` (and ``dy W``) is :mod:`~lowrank_ops.ops.base_linear`'s: one
dense GEMM through BLAS / cuBLAS, or on CPUs with AVX-512 the small-batch kernels for a
few to 32 rows and weights of 4M+ elements, where MKL's GEMM is neither flop- nor
bandwidth-bound.  It dominates the flops (``in * out`` against ``r * (in + out)`` per
row).  The gathered low-rank parts are hand-written kernels
(csrc/cpu/lora_multi_cpu.cpp, csrc/cuda/lora_multi_cuda.cu); see
:func:`lora_linear_multi`'s notes for the CPU measurements.
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .._autocast import autocast_entry, autocast_off_backward
from .._dtypes import float_code
from .._extension import cuda_extension, extension
from .._first_order import first_order_only
from ._layout import flatten_rows, require_apart
from ._library import (LIBRARY, composed_path, current_stream, dispatch_needed, register_fake, routing_readable,
                       unwrapped)
from .base_linear import forward_op, grad_input_op

__all__ = ["lora_linear_multi"]

_ROUTING = "Tensor offsets, Tensor ids, Tensor ranks, Tensor? scales"
LIBRARY.define(f"lora_multi_shrink(Tensor input, Tensor weight, {_ROUTING}, bool rank_last) -> Tensor")
LIBRARY.define(f"lora_multi_expand_(Tensor(a!) out, Tensor h, Tensor weight, {_ROUTING}, bool rank_last) -> ()")
LIBRARY.define(
    f"lora_multi_segment_outer(Tensor left, Tensor right, {_ROUTING}, int n_adapters, bool rank_last) -> Tensor"
)

IntsLike = Union[torch.Tensor, Sequence[int]]
FloatsLike = Union[torch.Tensor, Sequence[float]]


# ---------------------------------------------------------------------------- routing checks
def check_routing(op: str, offsets: torch.Tensor, ids: torch.Tensor, ranks: torch.Tensor,
                  scales: Optional[torch.Tensor], n_rows: int, n_adapters: int, r_max: int,
                  contents: bool = True) -> None:
    """Shapes and dtypes of the routing tensors; on CUDA also their contents (a host copy).

    On CPU the contents are checked by the C++ entry points, with the same messages,
    before any kernel reads them; checking them here too would double the overhead of
    small calls (about 0.1 ms of torch ops per call).
    """
    for name, tensor, dtype in (("segment_offsets", offsets, torch.int64), ("adapter_ids", ids, torch.int64),
                                ("ranks", ranks, torch.int64), ("scales", scales, torch.float64)):
        if tensor is not None and tensor.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; expected {dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{op}: segment_offsets has shape {tuple(offsets.shape)}; expected (n_segments + 1,)")
    n_segments = offsets.numel() - 1
    if tuple(ids.shape) != (n_segments,):
        raise ValueError(f"{op}: adapter_ids has shape {tuple(ids.shape)}; expected (n_segments,) = ({n_segments},)")
    for name, tensor in (("ranks", ranks), ("scales", scales)):
        if tensor is not None and tuple(tensor.shape) != (n_adapters,):
            raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}; expected (n_adapters,) = ({n_adapters},)")
    if not contents or offsets.device.type == "cpu":
        return  # the C++ kernels check the contents (csrc/cpu/lora_multi_cpu.cpp, check_segment_routing)
    check_routing_contents(op, offsets, ids, ranks, scales, n_rows, n_adapters, r_max)


def _on_host(tensors: Sequence[Optional[torch.Tensor]]) -> list:
    """CPU copies of contiguous routing tensors (int64 or float64), with at most one
    device-to-host copy for all of them (each copy waits for the device: one sync, not four)."""
    remote = [t for t in tensors if t is not None and t.device.type != "cpu"]
    if not remote:
        return list(tensors)
    pieces = iter(torch.cat([t.view(torch.int64) for t in remote]).cpu().split([t.numel() for t in remote]))
    return [t if t is None or t.device.type == "cpu" else next(pieces).view(t.dtype) for t in tensors]


def check_routing_contents(op: str, offsets: torch.Tensor, ids: torch.Tensor, ranks: torch.Tensor,
                           scales: Optional[torch.Tensor], n_rows: int, n_adapters: int, r_max: int) -> None:
    """The routing's contents (offsets cover the rows, ids and ranks in range, finite scales),
    checked on the host by the CPU kernels' checker, so messages are the same on every device.

    The tensors are contiguous, int64 (float64 scales), with the sizes check_routing
    verified; those on a GPU are read back with one copy."""
    offsets, ids, ranks, scales = _on_host((offsets, ids, ranks, scales))
    extension().check_segment_routing_cpu(
        **_routing_args(offsets, ids, ranks, scales, n_rows, n_adapters, r_max), op=op)


def _contiguous_routing(offsets, ids, ranks, scales):
    """The routing tensors with unit stride: the kernels read them through raw pointers."""
    return tuple(None if t is None else t.contiguous() for t in (offsets, ids, ranks, scales))


def _routing_args(offsets, ids, ranks, scales, n_rows: int, n_adapters: int, r_max: int) -> dict:
    return dict(
        offsets=offsets.data_ptr(), ids=ids.data_ptr(), ranks=ranks.data_ptr(),
        scales=0 if scales is None else scales.data_ptr(),
        n_rows=n_rows, n_segments=offsets.numel() - 1, n_adapters=n_adapters, r_max=r_max,
    )


def _device_args(tensor: torch.Tensor) -> dict:
    if tensor.device.type == "cuda":
        return dict(device=tensor.device.index, stream=current_stream(tensor))
    return dict(num_threads=torch.get_num_threads())


def _kernels(tensor: torch.Tensor, op: str):
    return cuda_extension(op) if tensor.device.type == "cuda" else extension()


def _unit_columns(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D view with unit column stride (what the kernels read rows from)."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] <= 1 else tensor.contiguous()


def _check_operands(op: str, reference_name: str, reference: torch.Tensor, operands: dict, routing: tuple) -> None:
    """Float operands share the reference's dtype and device; routing tensors its device."""
    float_code(reference.dtype, op, reference_name)
    for name, tensor in operands.items():
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; expected {reference.dtype}")
    named_routing = zip(("segment_offsets", "adapter_ids", "ranks", "scales"), routing)
    for name, tensor in list(operands.items()) + [(n, t) for n, t in named_routing if t is not None]:
        if tensor.device != reference.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}; expected {reference.device}")


def _weight_layout(weight: torch.Tensor, rank_last: bool):
    """(n_adapters, r_max, features, stride_a, stride_rank, stride_feature) of an A- or B-like stack."""
    if rank_last:  # [n_adapters, features, r_max]
        return weight.shape[0], weight.shape[2], weight.shape[1], weight.stride(0), weight.stride(2), weight.stride(1)
    return weight.shape[0], weight.shape[1], weight.shape[2], weight.stride(0), weight.stride(1), weight.stride(2)


# CPU: a segment of at least this many rows runs each of its products as one torch GEMM
# (MKL); the rest go to the C++ kernels in one call per product.  Why rows: the kernels
# beat a loop of per-segment MKL calls while segments are short (they save a 10-20 us
# torch call per segment and product, and MKL's packing is not amortized over few
# rows), and lose once a segment is long enough for MKL's blocking.  Measured on the
# 2-core AVX-512 Xeon (float32, 2 threads; kernels / per-segment MKL, each op alone):
#   256 x 256, N = 256, 8 adapters of 32 rows (ranks 8-64): shrink 52 / 118 us, expand
#     85 / 110 us, dA or dB 65 / 130 us;
#   4096 x 4096, N = 512, 8 adapters of 64 rows: shrink 0.94 / 1.13 ms, expand 1.18 / 0.97 ms
#     (0.77 ms with a rank-major B_stack, as MultiLoRALinear stores it), dA or dB 1.29 / 1.43 ms;
#   256 x 256, one adapter of 256 rows, rank 8: shrink 25 / 15 us, expand 17 / 10 us, dB 28 / 18 us.
# Whole layer, 256 x 256, N = 256 (forward / forward+backward, us), every segment to MKL,
# this threshold, every segment to the kernels: 8 adapters skewed (136 ... 5 rows)
# 422 / 1576, 314 / 1042, 320 / 1015; one adapter of 256 rows 216 / 804, 210 / 808, 259 / 862.
_CPU_GEMM_MIN_ROWS = 256


class _CpuSegment(NamedTuple):
    lo: int
    hi: int
    adapter: int
    rank: int


class _CpuPlan:
    """The routing's contents on the host, validated once (C++), split into the long
    segments (``large``: one torch GEMM per product each) and the kernels' adapter ids
    (``kernel_ids``: the original ones with the long segments set to -1; None when no
    short segment has work, and the kernel calls are skipped).  One plan serves every
    kernel call of a forward and its backward (eager CPU calls), so the routing is read
    and checked once.
    """

    def __init__(self, op, offsets, ids, ranks, scales, n_rows, n_adapters, r_max):
        extension().check_segment_routing_cpu(
            **_routing_args(offsets, ids, ranks, scales, n_rows, n_adapters, r_max), op=op)
        bounds, id_list, rank_list = offsets.tolist(), ids.tolist(), ranks.tolist()
        self.scales = scales.tolist() if scales is not None else None
        self.large, kernel_ids, kernel_work = [], list(id_list), False
        for s, adapter in enumerate(id_list):
            rows = bounds[s + 1] - bounds[s]
            if adapter < 0 or rows == 0 or rank_list[adapter] == 0:
                continue
            if rows >= _CPU_GEMM_MIN_ROWS:
                self.large.append(_CpuSegment(bounds[s], bounds[s + 1], adapter, rank_list[adapter]))
                kernel_ids[s] = -1
            else:
                kernel_work = True
        if not kernel_work:
            self.kernel_ids = None
        elif not self.large:
            self.kernel_ids = ids  # the caller's tensor: no list-to-tensor copy (~10 us)
        else:
            self.kernel_ids = torch.tensor(kernel_ids, dtype=torch.int64)

    def scale(self, adapter: int, scaled: bool) -> float:
        return self.scales[adapter] if scaled and self.scales is not None else 1.0


def _cpu_plan(op, input, offsets, ids, ranks, scales, n_adapters, r_max) -> Optional[_CpuPlan]:
    """A plan for a CPU call (its rows are ``input``'s), None on CUDA (the kernels take every segment)."""
    if input.device.type != "cpu":
        return None
    return _CpuPlan(op, offsets, ids, ranks, scales, input.shape[0], n_adapters, r_max)


def _rank_columns(weight: torch.Tensor, adapter: int, rank: int, rank_last: bool) -> torch.Tensor:
    """Adapter ``adapter``'s first ``rank`` ranks as a ``[features, rank]`` view."""
    return weight[adapter, :, :rank] if rank_last else weight[adapter, :rank].T


# ---------------------------------------------------------------------------- lora_multi_shrink
def _check_shrink(input, weight, offsets, ids, ranks, scales, rank_last) -> None:
    op = "lora_multi_shrink"
    _check_operands(op, "input", input, {"weight": weight}, (offsets, ids, ranks, scales))
    if input.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"{op}: input must be 2-D and weight 3-D; got {input.dim()}-D and {weight.dim()}-D")
    n_adapters, r_max, features = _weight_layout(weight, rank_last)[:3]
    if input.shape[1] != features:
        raise ValueError(f"{op}: input has shape {tuple(input.shape)}; expected (N, {features})")
    check_routing(op, offsets, ids, ranks, scales, input.shape[0], n_adapters, r_max)


def _shrink(input, weight, offsets, ids, ranks, scales, rank_last, plan: Optional[_CpuPlan]):
    """``h = x A^T`` per segment (scaled when ``scales`` is given); arguments already checked."""
    op = "lora_multi_shrink"
    n_adapters, r_max, features, stride_a, stride_rank, stride_feature = _weight_layout(weight, rank_last)
    input = _unit_columns(input)
    out = input.new_zeros((input.shape[0], r_max))  # entries no segment owns stay 0
    if plan is not None:
        large, ids = plan.large, plan.kernel_ids
        for seg in large:
            block = torch.mm(input[seg.lo:seg.hi], _rank_columns(weight, seg.adapter, seg.rank, rank_last))
            out[seg.lo:seg.hi, :seg.rank] = block if scales is None else block.mul_(plan.scale(seg.adapter, True))
        if ids is None:
            return out
    getattr(_kernels(input, op), f"segment_matmul_{input.device.type}")(
        **_routing_args(offsets, ids, ranks, scales, input.shape[0], n_adapters, r_max),
        in_=input.data_ptr(), w=weight.data_ptr(), out=out.data_ptr(), J=features, C=r_max,
        in_stride_n=input.stride(0), out_stride_n=out.stride(0),
        w_stride_a=stride_a, w_stride_j=stride_feature, w_stride_c=stride_rank,
        rank_on_c=True, accumulate=False, dtype=float_code(input.dtype, op, "input"), **_device_args(input),
    )
    return out


def _shrink_impl(input, weight, offsets, ids, ranks, scales, rank_last):
    offsets, ids, ranks, scales = _contiguous_routing(offsets, ids, ranks, scales)
    _check_shrink(input, weight, offsets, ids, ranks, scales, rank_last)
    plan = _cpu_plan("lora_multi_shrink", input, offsets, ids, ranks, scales, *_weight_layout(weight, rank_last)[:2])
    return _shrink(input, weight, offsets, ids, ranks, scales, rank_last, plan)


def _shrink_fake(input, weight, offsets, ids, ranks, scales, rank_last):
    r_max = weight.shape[2] if rank_last else weight.shape[1]
    return input.new_empty((input.shape[0], r_max))


# ---------------------------------------------------------------------------- lora_multi_expand_
def _check_expand(out, h, weight, offsets, ids, ranks, scales, rank_last) -> None:
    op = "lora_multi_expand_"
    _check_operands(op, "out", out, {"h": h, "weight": weight}, (offsets, ids, ranks, scales))
    if out.dim() != 2 or h.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"{op}: out and h must be 2-D and weight 3-D")
    n_adapters, r_max, features = _weight_layout(weight, rank_last)[:3]
    if tuple(h.shape) != (out.shape[0], r_max) or out.shape[1] != features:
        raise ValueError(
            f"{op}: out has shape {tuple(out.shape)} and h {tuple(h.shape)}; expected (N, {features}) and (N, {r_max})"
        )
    if out.stride(-1) != 1 and out.shape[1] > 1:
        raise ValueError(f"{op}: out must have unit column stride (it is written in place); got strides {out.stride()}")
    if out.shape[0] > 1 and out.stride(0) < out.shape[1]:
        raise ValueError(f"{op}: out has overlapping rows (strides {out.stride()}, shape {tuple(out.shape)}); "
                         "it is written in place, so every element needs its own memory")
    # The kernel reads h and weight while it writes out: an h inside out gave wrong sums
    # silently (9.3 off).  (Only the op's implementation runs this check: real storage.)
    require_apart(op, "out", out, h=h, weight=weight)
    check_routing(op, offsets, ids, ranks, scales, out.shape[0], n_adapters, r_max)


def _expand_(out, h, weight, offsets, ids, ranks, scales, rank_last, plan: Optional[_CpuPlan]) -> None:
    """``out += s h B^T`` per segment, in place; arguments already checked."""
    op = "lora_multi_expand_"
    n_adapters, r_max, features, stride_a, stride_rank, stride_feature = _weight_layout(weight, rank_last)
    h = _unit_columns(h)
    if plan is not None:
        large, ids = plan.large, plan.kernel_ids
        for seg in large:
            out[seg.lo:seg.hi].addmm_(h[seg.lo:seg.hi, :seg.rank],
                                      _rank_columns(weight, seg.adapter, seg.rank, rank_last).T,
                                      alpha=plan.scale(seg.adapter, scales is not None))
        if ids is None:
            return
    getattr(_kernels(out, op), f"segment_matmul_{out.device.type}")(
        **_routing_args(offsets, ids, ranks, scales, out.shape[0], n_adapters, r_max),
        in_=h.data_ptr(), w=weight.data_ptr(), out=out.data_ptr(), J=r_max, C=features,
        in_stride_n=h.stride(0), out_stride_n=out.stride(0),
        w_stride_a=stride_a, w_stride_j=stride_rank, w_stride_c=stride_feature,
        rank_on_c=False, accumulate=True, dtype=float_code(out.dtype, op, "out"), **_device_args(out),
    )


def _expand_impl(out, h, weight, offsets, ids, ranks, scales, rank_last):
    offsets, ids, ranks, scales = _contiguous_routing(offsets, ids, ranks, scales)
    _check_expand(out, h, weight, offsets, ids, ranks, scales, rank_last)
    plan = _cpu_plan("lora_multi_expand_", out, offsets, ids, ranks, scales, *_weight_layout(weight, rank_last)[:2])
    _expand_(out, h, weight, offsets, ids, ranks, scales, rank_last, plan)


def _expand_fake(out, h, weight, offsets, ids, ranks, scales, rank_last):
    return None


# ---------------------------------------------------------------------------- lora_multi_segment_outer
def _check_outer(left, right, offsets, ids, ranks, scales, n_adapters, rank_last) -> None:
    op = "lora_multi_segment_outer"
    _check_operands(op, "left", left, {"right": right}, (offsets, ids, ranks, scales))
    if left.dim() != 2 or right.dim() != 2 or left.shape[0] != right.shape[0]:
        raise ValueError(
            f"{op}: left has shape {tuple(left.shape)} and right {tuple(right.shape)}; expected (N, r_max) and (N, J)"
        )
    check_routing(op, offsets, ids, ranks, scales, left.shape[0], n_adapters, left.shape[1])


def _outer(left, right, offsets, ids, ranks, scales, n_adapters, rank_last, plan: Optional[_CpuPlan]):
    """Per-adapter ``s left_a^T right_a`` stacked like A (or B with ``rank_last``); arguments already checked."""
    op = "lora_multi_segment_outer"
    n_rows, r_max = left.shape
    features = right.shape[1]
    left, right = _unit_columns(left), _unit_columns(right)
    shape = (n_adapters, features, r_max) if rank_last else (n_adapters, r_max, features)
    out = left.new_zeros(shape)  # ranks beyond an adapter's rank, and unused adapters, get 0
    stride_k, stride_j = (out.stride(2), out.stride(1)) if rank_last else (out.stride(1), out.stride(2))
    large = []
    if plan is not None:
        large, ids = plan.large, plan.kernel_ids
    if ids is not None:  # first: the kernel overwrites the blocks of the adapters it handles
        getattr(_kernels(left, op), f"segment_outer_{left.device.type}")(
            **_routing_args(offsets, ids, ranks, scales, n_rows, n_adapters, r_max),
            left=left.data_ptr(), right=right.data_ptr(), out=out.data_ptr(), J=features,
            left_stride_n=left.stride(0), right_stride_n=right.stride(0),
            out_stride_a=out.stride(0), out_stride_k=stride_k, out_stride_j=stride_j,
            dtype=float_code(left.dtype, op, "left"), **_device_args(left),
        )
    for seg in large:
        rows = slice(seg.lo, seg.hi)
        alpha = plan.scale(seg.adapter, scales is not None)
        if rank_last:
            out[seg.adapter, :, :seg.rank].addmm_(right[rows].T, left[rows, :seg.rank], alpha=alpha)
        else:
            out[seg.adapter, :seg.rank].addmm_(left[rows, :seg.rank].T, right[rows], alpha=alpha)
    return out


def _outer_impl(left, right, offsets, ids, ranks, scales, n_adapters, rank_last):
    offsets, ids, ranks, scales = _contiguous_routing(offsets, ids, ranks, scales)
    _check_outer(left, right, offsets, ids, ranks, scales, n_adapters, rank_last)
    plan = _cpu_plan("lora_multi_segment_outer", left, offsets, ids, ranks, scales, n_adapters, left.shape[1])
    return _outer(left, right, offsets, ids, ranks, scales, n_adapters, rank_last, plan)


def _outer_fake(left, right, offsets, ids, ranks, scales, n_adapters, rank_last):
    r_max, features = left.shape[1], right.shape[1]
    return left.new_empty((n_adapters, features, r_max) if rank_last else (n_adapters, r_max, features))


for _name, _impl, _fake in (("lora_multi_shrink", _shrink_impl, _shrink_fake),
                            ("lora_multi_expand_", _expand_impl, _expand_fake),
                            ("lora_multi_segment_outer", _outer_impl, _outer_fake)):
    LIBRARY.impl(_name, _impl, "CPU")
    LIBRARY.impl(_name, _impl, "CUDA")
    register_fake(_name, _fake)


# ---------------------------------------------------------------------------- autograd
class _Kernels(NamedTuple):
    """The three kernels as called by one forward and its backward (and the CPU plan they share)."""
    shrink: Callable
    expand_: Callable
    outer: Callable
    plan: Optional["_CpuPlan"] = None


def _kernels_for(x: torch.Tensor, offsets, ids, ranks, scales, n_adapters: int, r_max: int,
                 checked: bool) -> _Kernels:
    """The registered ops while torch.compile traces (their fake impls are what it sees);
    for eager calls the implementations with the routing validated once (on the CPU one
    plan, split once per feature size, serves every kernel call: about 0.1 ms less per
    forward+backward than validating in each op).  ``checked``: the routing's contents
    were checked on the host already (:func:`_place_routing`)."""
    if dispatch_needed(x):  # traced, fake or meta: the registered ops (fake impls)
        ops = torch.ops.lowrank_ops
        return _Kernels(ops.lora_multi_shrink, ops.lora_multi_expand_, ops.lora_multi_segment_outer)
    plan = _cpu_plan("lora_linear_multi", x, offsets, ids, ranks, scales, n_adapters, r_max)
    if plan is None and not checked:  # CUDA: the kernels cannot raise; check the contents on the host
        check_routing("lora_linear_multi", offsets, ids, ranks, scales, x.shape[0], n_adapters, r_max)
    return _Kernels(functools.partial(_shrink, plan=plan), functools.partial(_expand_, plan=plan),
                    functools.partial(_outer, plan=plan), plan)


def _in_adapter_dtype(rows: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``rows`` in the adapters' dtype: a float32 copy for float32 adapters on a half base
    (PEFT casts the adapter input so too); the rows themselves otherwise."""
    return rows if rows.dtype == stack.dtype else rows.to(stack.dtype)


def _expand_into_(kernels: _Kernels, out, h, stack, offsets, ids, ranks, scales, rank_last) -> None:
    """``out += s h W^T`` per segment.  When ``h`` (the adapters' dtype, float32) is wider
    than ``out`` (half), the product goes to a float32 buffer first and is added with one
    rounding of ``out``: what PEFT's float32 adapters on a half base compute, and what
    :func:`~lowrank_ops.ops.lora_linear` does in that case."""
    if out.dtype == h.dtype:
        kernels.expand_(out, h, stack, offsets, ids, ranks, scales, rank_last)
        return
    wide = torch.zeros(out.shape, dtype=h.dtype, device=out.device)  # rows without an adapter stay 0
    kernels.expand_(wide, h, stack, offsets, ids, ranks, scales, rank_last)
    out.add_(wide)


def _forward(kernels: _Kernels, x, weight, bias, A_stack, B_stack, offsets, ids, ranks, scales):
    """``(y, h)`` with ``h = x A^T`` per segment (what the backward needs), h in the adapters' dtype."""
    y = forward_op()(x, weight, bias)
    h = kernels.shrink(_in_adapter_dtype(x, A_stack), A_stack, offsets, ids, ranks, None, False)
    _expand_into_(kernels, y, h, B_stack, offsets, ids, ranks, scales, True)
    return y, h


def _infer(kernels: _Kernels, x, weight, bias, A_stack, B_stack, offsets, ids, ranks, scales):
    """``y`` alone (inference).  On the CPU, when the plan gives every segment's two products
    to MKL (long segments, see _CPU_GEMM_MIN_ROWS), each segment's ``s (x A^T) B^T`` goes
    straight into its rows of y: no ``[N, r_max]`` h buffer and no copies into it, the same
    products in the same order as ``_forward`` (so the same result).  Measured when 8
    segments of 32 rows still went to MKL (256 x 256, 2-core Xeon): 0.52-0.54 against
    0.59-0.65 ms through h."""
    plan = kernels.plan
    if plan is None:
        return _forward(kernels, x, weight, bias, A_stack, B_stack, offsets, ids, ranks, scales)[0]
    if plan.kernel_ids is not None:
        return _forward(kernels, x, weight, bias, A_stack, B_stack, offsets, ids, ranks, scales)[0]
    y = forward_op()(x, weight, bias)
    rows = _in_adapter_dtype(x, A_stack)
    for seg in plan.large:
        shrunk = torch.mm(rows[seg.lo:seg.hi], _rank_columns(A_stack, seg.adapter, seg.rank, False))
        B_columns = _rank_columns(B_stack, seg.adapter, seg.rank, True).T
        alpha = plan.scale(seg.adapter, scales is not None)
        if y.dtype == shrunk.dtype:
            y[seg.lo:seg.hi].addmm_(shrunk, B_columns, alpha=alpha)
        else:  # float32 adapters on a half base: one rounding of y, as _expand_into_
            y[seg.lo:seg.hi].add_(shrunk @ B_columns, alpha=alpha)
    return y


class _LoRALinearMulti(torch.autograd.Function):
    """``y = x W^T + b + s_a (x A_a^T) B_a^T`` per segment; x ``[N, in]``.  Backward with
    ``h = x A^T`` (saved) and ``g = s dy B`` (per segment):
    ``dx = dy W + g A``, ``dA_a = g_a^T x_a``, ``dB_a = s_a dy_a^T h_a``."""

    @staticmethod
    def forward(ctx, x, weight, bias, A_stack, B_stack, offsets, ids, ranks, scales, checked):
        kernels = _kernels_for(x, offsets, ids, ranks, scales, *A_stack.shape[:2], checked)
        y, h = _forward(kernels, x, weight, bias, A_stack, B_stack, offsets, ids, ranks, scales)
        ctx.has_bias, ctx.kernels = bias is not None, kernels
        ctx.save_for_backward(x, weight, A_stack, B_stack, h, offsets, ids, ranks, scales)
        return y

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, grad_y):
        kernels = ctx.kernels
        x, weight, A_stack, B_stack, h, offsets, ids, ranks, scales = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        grad_y = grad_y.contiguous()
        grad_y_adapter = _in_adapter_dtype(grad_y, B_stack)
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if need_x or need_A:
            g = kernels.shrink(grad_y_adapter, B_stack, offsets, ids, ranks, scales, True)  # s dy B, [N, r_max]
        if need_x:
            grad_x = grad_input_op()(grad_y, weight)
            _expand_into_(kernels, grad_x, g, A_stack, offsets, ids, ranks, None, False)
        if need_A:
            grad_A = kernels.outer(g, _in_adapter_dtype(x, A_stack), offsets, ids, ranks, None, A_stack.shape[0],
                                   False)
        if need_B:
            grad_B = kernels.outer(h, grad_y_adapter, offsets, ids, ranks, scales, B_stack.shape[0], True)
        if need_w:
            grad_w = grad_y.T @ x
        if need_b and ctx.has_bias:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None, None


# ---------------------------------------------------------------------------- public API
def as_routing_tensor(op: str, value, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """``value`` (a tensor or a sequence) as a contiguous ``dtype`` tensor on ``device``.

    Integer routing (offsets, ids, ranks) must hold integers: a float is an error, not
    truncated.  Routing is not differentiable, so a tensor that requires grad is an error
    rather than a gradient silently dropped.
    """
    integral = not dtype.is_floating_point
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point == integral or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{op}: {name} has dtype {value.dtype}; expected "
                            f"{'an integer' if integral else 'a floating-point'} tensor")
        if value.requires_grad:
            raise ValueError(f"{op}: {name} requires grad; expected a constant ({name} is not differentiable)")
        return value.to(device=device, dtype=dtype).contiguous()  # read through raw pointers
    values = list(value)
    if integral:
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):  # (SymInt: export)
                raise TypeError(f"{op}: {name}[{i}] = {v!r}; expected an integer")
    return torch.tensor(values, dtype=dtype, device=device)


def _place_routing(device: torch.device, n_rows: int, n_adapters: int, r_max: int,
                   segment_offsets, adapter_ids, ranks, scales) -> tuple:
    """``([offsets, ids, ranks, scales], checked)``: the routing as contiguous int64
    (float64 scales) tensors on ``device``, their shapes checked.

    On a GPU (eager) the contents are checked here, on the host, and ``checked`` is True.
    Routing given as sequences or CPU tensors (a serving scheduler's) is checked before one
    non-blocking host-to-device copy of all of it, so the call never waits for the device;
    routing already on the GPU is read back with one copy (one wait).  On the CPU the
    kernels check the contents; under torch.compile the registered ops do.
    """
    op = "lora_linear_multi"
    staged = device.type not in ("cpu", "meta") and not dispatch_needed()
    host = torch.device("cpu")

    def place(value, dtype, name):
        on_device = isinstance(value, torch.Tensor) and value.device == device
        return as_routing_tensor(op, value, dtype, host if staged and not on_device else device, name)

    routing = [place(segment_offsets, torch.int64, "segment_offsets"), place(adapter_ids, torch.int64, "adapter_ids"),
               (torch.full((n_adapters,), r_max, dtype=torch.int64, device=host if staged else device)
                if ranks is None else place(ranks, torch.int64, "ranks")),
               None if scales is None else place(scales, torch.float64, "scales")]
    check_routing(op, *routing, n_rows, n_adapters, r_max, contents=False)
    if not staged:
        return routing, False
    check_routing_contents(op, *routing, n_rows, n_adapters, r_max)
    staged_here = [t for t in routing if t is not None and t.device.type == "cpu"]
    if staged_here:
        packed = torch.cat([t.view(torch.int64) for t in staged_here]).to(device, non_blocking=True)
        pieces = iter(packed.split([t.numel() for t in staged_here]))
        routing = [t if t is None or t.device.type != "cpu" else next(pieces).view(t.dtype) for t in routing]
    return routing, True


def _composed(rows, weight, bias, A_stack, B_stack, offsets, ids, ranks, scales) -> torch.Tensor:
    """The op as torch ops (:func:`~lowrank_ops.ops._library.composed_path`: torch.func
    transforms, :func:`~lowrank_ops.ops.composite`), differentiable to any order: each row
    gathers its adapter (``[N, r_max, in + out]`` of gathered factors: for derivatives, not
    speed), ranks as masks, rows of adapter -1 the base alone.  The same roundings as the
    kernels: the low-rank part in the adapters' dtype, added to the base result once."""
    n_adapters, r_max = A_stack.shape[:2]
    # Each row's segment by a search of the offsets (memory-safe on any contents: unchecked
    # routing under a transform gives wrong rows, never a write out of bounds, which
    # repeat_interleave(output_size=) made for repeats not summing as promised).
    rows_index = torch.arange(rows.shape[0], device=rows.device)
    segment = torch.searchsorted(offsets[1:].contiguous(), rows_index, right=True).clamp(max=max(ids.numel() - 1, 0))
    row_ids = ids[segment] if ids.numel() else rows_index.new_full((rows.shape[0],), -1)
    safe = row_ids.clamp(min=0, max=n_adapters - 1)
    factor_dtype = A_stack.dtype
    scale = torch.ones(n_adapters, dtype=torch.float64, device=rows.device) if scales is None else scales
    # Selected with where, not multiplied by masks: entries beyond an adapter's rank (and
    # adapter 0's, gathered for rows of id -1) are never read, as by the kernels (a NaN
    # there poisoned every row).
    kept = ((torch.arange(r_max, device=rows.device) < ranks[:, None])[safe]
            & (row_ids >= 0)[:, None])  # [N, r_max]
    zero = A_stack.new_zeros(())
    A_rows = torch.where(kept[:, :, None], A_stack[safe], zero)  # [N, r_max, in]
    B_rows = torch.where(kept[:, None, :], B_stack[safe], zero)  # [N, out, r_max]
    h = torch.einsum("ni,nri->nr", rows.to(factor_dtype), A_rows) * scale.to(factor_dtype)[safe][:, None]
    low_rank = torch.einsum("nr,nor->no", h, B_rows)
    base = torch.nn.functional.linear(rows, weight, bias)
    return base + low_rank if base.dtype == factor_dtype else (base.to(factor_dtype) + low_rank).to(base.dtype)


def _validate(x, weight, A_stack, B_stack, bias) -> None:
    op = "lora_linear_multi"
    for name, tensor in (("x", x), ("weight", weight), ("A_stack", A_stack), ("B_stack", B_stack), ("bias", bias)):
        if tensor is None and name == "bias":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(tensor).__name__}")
        float_code(tensor.dtype, op, name)
        if name == "A_stack" and tensor.dtype not in (x.dtype, torch.float32):
            wanted = " or ".join(str(d) for d in dict.fromkeys((x.dtype, torch.float32)))
            raise TypeError(f"{op}: A_stack has dtype {tensor.dtype}; expected {wanted} (the dtype of x, or float32)")
        if name == "B_stack" and tensor.dtype != A_stack.dtype:
            raise TypeError(f"{op}: B_stack has dtype {tensor.dtype}; expected the dtype of A_stack, {A_stack.dtype}")
        if name not in ("A_stack", "B_stack") and tensor.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; expected the dtype of x, {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}; expected the device of x, {x.device}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; expected (out_features, in_features)")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected (..., in_features) = (..., {in_features})")
    if A_stack.dim() != 3 or A_stack.shape[2] != in_features:
        raise ValueError(
            f"{op}: A_stack has shape {tuple(A_stack.shape)}; expected (n_adapters, r_max, in_features) = "
            f"(n_adapters, r_max, {in_features})"
        )
    n_adapters, r_max = A_stack.shape[:2]
    if tuple(B_stack.shape) != (n_adapters, out_features, r_max):
        raise ValueError(
            f"{op}: B_stack has shape {tuple(B_stack.shape)}; expected (n_adapters, out_features, r_max) = "
            f"({n_adapters}, {out_features}, {r_max})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected (out_features,) = ({out_features},)")


@autocast_entry("x", "weight", "A_stack", "B_stack", "bias")
def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    segment_offsets: IntsLike,
    adapter_ids: IntsLike,
    *,
    ranks: Optional[IntsLike] = None,
    scales: Optional[FloatsLike] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linear layer with a different LoRA adapter per segment of rows (mixed-adapter batch).

    ``y = x W^T + b``, plus, for every segment ``s`` with adapter ``a = adapter_ids[s] >= 0``
    and rank ``r = ranks[a]``: ``y_s += scales[a] * (x_s A[a, :r]^T) B[a, :, :r]^T``.
    Differentiable in x, A_stack and B_stack (and in weight and bias if they require grad),
    so mixed-adapter batches can be trained, not only served.

    Parameters
    ----------
    x : Tensor[..., in_features]
        float32, float64, float16 or bfloat16; any strides.  Rows are the flattened
        leading dimensions, in order.
    weight : Tensor[out_features, in_features]
        The frozen base weight; same dtype and device as x.
    A_stack : Tensor[n_adapters, r_max, in_features]
    B_stack : Tensor[n_adapters, out_features, r_max]
        Adapter factors; adapter ``a`` uses ``A_stack[a, :ranks[a]]`` and
        ``B_stack[a, :, :ranks[a]]`` (read in place, no copies; any strides).  On the CPU a
        rank-major B_stack (a contiguous ``[n_adapters, r_max, out]`` buffer, transposed,
        as :class:`~lowrank_ops.nn.MultiLoRALinear` stores it) is read without packing:
        the forward expand measured 1.6-1.7x faster than with a contiguous B_stack.
        Both in x's dtype, or both float32 (float32 adapters on a half base, PEFT's
        default ``autocast_adapter_dtype=True``): the adapters' products then run in
        float32 on a float32 copy of x (and of dy in the backward), as PEFT's, and their
        sum is added to the base output with one rounding through an ``[N, out]`` float32
        buffer; the stacks' gradients are float32.
    segment_offsets : Tensor[n_segments + 1] or sequence of int
        Non-decreasing, from 0 to the number of rows; empty segments are allowed.
    adapter_ids : Tensor[n_segments] or sequence of int
        Adapter of each segment, in ``[0, n_adapters)``, or -1 for no adapter.
        Several segments may use the same adapter.
    ranks : Tensor[n_adapters] or sequence of int, optional
        Rank of each adapter, ``0 <= ranks[a] <= r_max``; default ``r_max`` for all.
    scales : Tensor[n_adapters] or sequence of float, optional
        Scale of each adapter (LoRA ``alpha / r``, rsLoRA ``alpha / sqrt(r)``); default 1.
    bias : Tensor[out_features], optional

    Returns
    -------
    Tensor[..., out_features]
        Same dtype as x (under ``torch.autocast``: x, weight, the stacks and bias are cast
        to the autocast dtype, as ``F.linear``'s operands, and the op runs with autocast
        disabled; ``scales`` is not cast).  The low-rank parts accumulate in float32
        (float64 for float64) and are added to the base result with one rounding.

    Notes
    -----
    Cost per row: ``2 in out`` flops (the base GEMM, through torch) plus
    ``2 r (in + out)`` (the gathered shrink and expand, hand-written kernels); backward
    twice that.  Memory saved for backward: ``h = x A^T`` (``[N, r_max]``) besides x.

    The routing's contents are validated on every call: in C++ by the CPU kernels; on
    CUDA by the same checker on the host before the kernels launch (the CUDA kernels are
    memory-safe on any contents, but cannot raise).  Routing given as sequences or CPU
    tensors is checked there and copied to the GPU with one non-blocking copy, so the
    call never waits for the device; routing already on the GPU costs one device-to-host
    copy (one wait for the queued work).

    CPU: the C++ kernels take every segment of fewer than 256 rows (decode-like and
    mixed-adapter batches) in one call per product, with no per-segment torch call;
    longer segments run their shrink, expand and gradient products as one torch GEMM
    each, where MKL's blocking wins (``_CPU_GEMM_MIN_ROWS``).  CUDA: the hand-written
    kernels at every size.
    """
    _validate(x, weight, A_stack, B_stack, bias)
    n_adapters, r_max = A_stack.shape[:2]
    rows = flatten_rows(x)
    routing, checked = _place_routing(x.device, rows.shape[0], n_adapters, r_max,
                                      segment_offsets, adapter_ids, ranks, scales)
    if composed_path():
        # Under vmap too when the routing itself is not batched (given as sequences): the
        # data's values are not readable there, the routing's are (unchecked, bad offsets
        # reached repeat_interleave, which wrote past its buffer before it raised).
        if not checked and routing_readable(*routing):
            check_routing_contents("lora_linear_multi", *(unwrapped(t) for t in routing), rows.shape[0], n_adapters,
                                   r_max)
        return _composed(rows, weight, bias, A_stack, B_stack, *routing).reshape(*x.shape[:-1], weight.shape[0])
    args = (rows, weight, bias, A_stack, B_stack, *routing)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        y = _LoRALinearMulti.apply(*args, checked)
    else:  # inference: no autograd Function, nothing saved
        y = _infer(_kernels_for(rows, *routing, n_adapters, r_max, checked), *args)
    return y.reshape(*x.shape[:-1], weight.shape[0])


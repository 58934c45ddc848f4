"""Sparse-plus-low-rank linear (SLTrain): ``y = x (scale * B A + S)^T + b``.

Two backward strategies:

* ``"sparse"``: never forms a dense ``[out, in]`` matrix.  Forward
  ``y = SpMM(x, S) + scale * (x A^T) B^T + b``; backward with ``u = x A^T`` (saved,
  ``[N, r]``) and ``h = dy B``: ``dB = scale dy^T u``, ``dA = scale h^T x``,
  ``dvalues = SDDMM(dy, x)`` at the support, ``dx = scale h A + dy S``.
  Flops per step: ``6 N nnz`` (sparse) ``+ 6 N r (in + out)`` (low rank); memory beyond the
  parameters: ``N r`` saved.  The low-rank part (and the bias) is computed in the
  accumulation dtype (float32 for half inputs, ``u`` included) and handed to the SpMM
  kernel as its addend, so a half-precision ``y`` (or ``dx``) is rounded once, as a dense
  GEMM's output is; rounding ``u`` and then ``y`` twice measured up to 2.6x the dense
  layer's error in bfloat16.
* ``"dense"``: the paper's approach: materialize ``W = scale B A + S`` in forward and again
  in backward, ``dx = dy W``, a dense ``dW = dy^T x``, then ``dB = scale dW A^T``,
  ``dA = scale B^T dW``, ``dvalues = dW`` at the support.  Flops: ``6 N in out`` (dense
  GEMMs) ``+ 6 r in out`` (rebuilding W twice and projecting dW); memory: two or three
  ``[out, in]`` temporaries.

``strategy="auto"`` picks per call with :func:`choose_strategy`; the rule and the
measurements behind it are in that function's docstring.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._args import require_finite_number
from .._autocast import autocast_entry, autocast_off_backward
from .._dtypes import MM_OUT_DTYPE, accumulate_dtype, float_code
from .._first_order import first_order_only
from ..sparse import FixedSupport
from ._layout import flatten_rows
from ._library import composed_path
from .sparse import _validate as _validate_sparse

__all__ = ["sparse_lowrank_linear", "choose_strategy", "STRATEGIES"]

STRATEGIES = ("auto", "sparse", "dense")

# Crossover constant k of choose_strategy's rule, per device type; None: always sparse.
# CPU: measured (see choose_strategy).  CUDA: not measured yet (the first GPU lease,
# bench/results/nvidia-h100-80gb/, ran the tests but its benchmark runs did not finish),
# so the memory-saving sparse strategy is used until bench/gpu_check.sh's sweep sets it.
_CROSSOVER_K = {"cpu": 0.2, "cuda": None}


def choose_strategy(support: FixedSupport, rank: int, n_rows: int, device) -> str:
    """The faster backward strategy for one call: ``"sparse"`` or ``"dense"``.

    Rule: ``"dense"`` (materialize, as the paper) when

        density >= k * (1 + r / N - r / in - r / out)

    with k per device type, else ``"sparse"``.  Why this shape: both strategies do the
    low-rank GEMMs; the sparse one adds ``6 N nnz`` flops of gather-bound kernels, the
    dense one ``6 N in out`` flops of fast GEMMs plus about ``r in out`` flops for
    rebuilding ``W`` and projecting ``dW``, a cost that does not shrink with N.  Dividing
    by ``N in out`` gives ``density * s >= g * (1 + r / N ...)`` with s, g the two
    per-flop costs, i.e. a density threshold that rises for small batches and large
    ranks.

    CPU, k = 0.2: fitted to fwd+bwd sweeps (bench/bench_sparse_lowrank.py,
    op ``strategy_sweep``; float32, 2-core Xeon with AVX-512) at (out, in) = (1024, 2730),
    r = 256, N = 256 / 512 / 1024 / 4096 (measured crossovers 0.45, 0.24, 0.15-0.2, 0.10),
    r = 64, N = 256 (0.28), and (2048, 5461), r = 512, N = 1024 (0.24); every point lies
    within the run-to-run noise (about 10 %) of the rule.  At SLTrain's densities
    (0.03-0.05) the sparse strategy is chosen at every N measured; it also never
    allocates ``[out, in]`` temporaries.

    Other device types always get ``"sparse"`` (CUDA: no crossover measured yet).

    Parameters
    ----------
    support : FixedSupport
        The pattern of S, ``[out_features, in_features]``; its density enters the rule.
    rank : int
        ``r``, the rank of the low-rank part.
    n_rows : int
        ``N``, the rows of the call (x's leading dimensions flattened); 0 gives ``"sparse"``.
        A symbolic N (torch.export with a dynamic batch), and any N under torch.compile,
        takes the rule's large-N limit, ``density >= k (1 - r / in - r / out)``: no guard on N.
    device : torch.device or str
        The device the call runs on; picks ``k``.

    Returns
    -------
    str
        ``"dense"`` or ``"sparse"``, for ``sparse_lowrank_linear(..., strategy=...)``.
    """
    k = _CROSSOVER_K.get(torch.device(device).type)
    if k is None:
        return "sparse"
    out_features, in_features = support.shape
    if isinstance(n_rows, torch.SymInt) or torch.compiler.is_compiling():
        # A symbolic batch (torch.export with a dynamic batch; under torch.compile, which
        # shows N as an int, always): the rule's large-N limit, which does not depend on N,
        # so no guard on it (the comparison guarded N, and export with a dynamic batch
        # failed: "Constraints violated").  Both strategies compute the same function; only
        # the speed may differ at small N (not at SLTrain's densities: sparse either way).
        return "dense" if support.density >= k * (1 - rank / in_features - rank / out_features) else "sparse"
    if n_rows == 0:
        return "sparse"
    threshold = k * (1 + rank / n_rows - rank / in_features - rank / out_features)
    return "dense" if support.density >= threshold else "sparse"


def _matmul_accumulate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the accumulation dtype (float32 for half inputs): rounded once, to float32."""
    acc = accumulate_dtype(a.dtype)
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def _flat_index(support: FixedSupport) -> torch.Tensor:
    """Row-major position ``row * in + col`` of every stored entry, ``[nnz]`` int64."""
    return support.rows() * support.in_features + support.col_idx.to(torch.int64)


def _materialize(lora_A, lora_B, values, flat_index, scale: float) -> torch.Tensor:
    """``W = scale B A + S`` as a dense ``[out, in]`` tensor (scaling the small A, not W)."""
    weight = torch.mm(lora_B, lora_A if scale == 1.0 else lora_A * scale)
    weight.view(-1).index_add_(0, flat_index, values)
    return weight


class _SparseLowRankLinear(torch.autograd.Function):
    """Autograd for ``y = x (scale B A + S)^T + b`` with x ``[N, in]``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, values, bias, scale, dense, row_ptr, col_idx, row_order, col_ptr, row_idx,
                csc_to_csr, col_order, flat_index, n_rows, n_cols):
        ctx.scale, ctx.dense, ctx.n_cols = scale, dense, n_cols
        ctx.has_bias = bias is not None
        if dense:
            weight = _materialize(lora_A, lora_B, values, flat_index, scale)
            y = torch.nn.functional.linear(x, weight, bias)
            ctx.save_for_backward(x, lora_A, lora_B, values, flat_index)
            return y
        acc = accumulate_dtype(x.dtype)
        shrunk = _matmul_accumulate(x, lora_A.T)  # u = x A^T, [N, r]: saved, so backward does not recompute it
        # b + scale u B^T, in the accumulation dtype: the kernel adds S x and rounds y once.
        low_rank = (torch.addmm(bias.to(acc), shrunk, lora_B.T.to(acc), alpha=scale) if bias is not None
                    else torch.mm(shrunk, lora_B.T.to(acc)).mul_(scale))
        y = torch.ops.lowrank_ops.csr_spmm(row_ptr, col_idx, values, row_order, x, n_rows, low_rank)
        ctx.save_for_backward(x, lora_A, lora_B, values, shrunk, row_ptr, col_idx, row_order, col_ptr, row_idx,
                              csc_to_csr, col_order)
        return y

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, grad_y):
        need_x, need_A, need_B, need_values, need_bias = ctx.needs_input_grad[:5]
        scale = ctx.scale
        grad_x = grad_A = grad_B = grad_values = grad_bias = None
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        if ctx.dense:
            x, lora_A, lora_B, values, flat_index = ctx.saved_tensors
            if need_x:
                weight = _materialize(lora_A, lora_B, values, flat_index, scale)
                grad_x = grad_y @ weight
                del weight
            if need_A or need_B or need_values:
                grad_weight = grad_y.T @ x  # the dense [out, in] weight gradient of the paper's code
                if need_B:
                    grad_B = torch.mm(grad_weight, lora_A.T).mul_(scale)
                if need_A:
                    grad_A = torch.mm(lora_B.T, grad_weight).mul_(scale)
                if need_values:
                    grad_values = grad_weight.view(-1).index_select(0, flat_index)
            return grad_x, grad_A, grad_B, grad_values, grad_bias, *([None] * 12)

        (x, lora_A, lora_B, values, shrunk, row_ptr, col_idx, row_order, col_ptr, row_idx, csc_to_csr,
         col_order) = ctx.saved_tensors
        dtype = grad_y.dtype
        expanded_grad = _matmul_accumulate(grad_y, lora_B) if (need_x or need_A) else None  # h = dy B, [N, r]
        if need_B:
            grad_B = torch.mm(grad_y.T, shrunk.to(dtype)).mul_(scale)
        if need_A:
            grad_A = torch.mm(expanded_grad.to(dtype).T, x).mul_(scale)
        if need_values:
            grad_values = torch.ops.lowrank_ops.csr_sddmm(row_ptr, col_idx, row_order, grad_y, x)
        if need_x:
            values_csc = values.index_select(0, csc_to_csr)
            low_rank = torch.mm(expanded_grad, lora_A.to(expanded_grad.dtype)).mul_(scale)  # scale h A
            grad_x = torch.ops.lowrank_ops.csr_spmm(col_ptr, row_idx, values_csc, col_order, grad_y, ctx.n_cols,
                                                    low_rank)
        return grad_x, grad_A, grad_B, grad_values, grad_bias, *([None] * 12)


def _validate(x, lora_A, lora_B, values, support, bias, scale, strategy) -> None:
    op = "sparse_lowrank_linear"
    _validate_sparse(op, x, values, support)
    out_features, in_features = support.shape
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(tensor).__name__}")
        float_code(tensor.dtype, op, name)
        if tensor.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; expected the dtype of x, {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}; expected the device of x, {x.device}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"{op}: lora_A has shape {tuple(lora_A.shape)}; expected (r, in_features) = (r, {in_features})")
    rank = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"{op}: lora_B has shape {tuple(lora_B.shape)}; expected (out_features, r) = ({out_features}, {rank})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected (out_features,) = ({out_features},)")
    require_finite_number(op, "scale", scale)
    if strategy not in STRATEGIES:
        raise ValueError(f"{op}: strategy must be one of {STRATEGIES}; got {strategy!r}")


@autocast_entry("x", "lora_A", "lora_B", "values", "bias")
def sparse_lowrank_linear(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    values: torch.Tensor,
    support: FixedSupport,
    bias: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
    strategy: str = "auto",
) -> torch.Tensor:
    """``y = x (scale * B A + S)^T + b``, differentiable in x, A, B, values and bias.

    Parameters
    ----------
    x : Tensor[..., in_features]
        float32, float64, float16 or bfloat16.
    lora_A : Tensor[r, in_features]
    lora_B : Tensor[out_features, r]
    values : Tensor[nnz]
        Entries of the sparse part S, in ``support``'s CSR order.
    support : FixedSupport
        Pattern of S, ``[out_features, in_features]``, on x's device.
    bias : Tensor[out_features], optional
    scale : float
        Multiplies the low-rank part (SLTrain: ``lora_alpha / r``).
    strategy : {"auto", "sparse", "dense"}
        ``"sparse"`` never forms a dense ``[out, in]`` matrix; ``"dense"`` materializes
        ``W`` as the SLTrain paper's code; ``"auto"`` picks by :func:`choose_strategy`.

    Returns
    -------
    Tensor[..., out_features]
        Same dtype as x (all parameters must share it); under ``torch.autocast`` the
        autocast dtype (x, A, B, values and bias cast to it, as ``F.linear``'s operands,
        and the op run with autocast disabled).
    """
    _validate(x, lora_A, lora_B, values, support, bias, scale, strategy)
    if composed_path():  # torch.func sees through torch ops only: the dense form
        weight = float(scale) * (lora_B @ lora_A) + support.to_dense(values)
        return torch.nn.functional.linear(x, weight, bias)
    if strategy == "auto":
        strategy = choose_strategy(support, lora_A.shape[0], x.numel() // max(support.in_features, 1), x.device)
    dense = strategy == "dense"
    batch_shape = x.shape[:-1]
    y = _SparseLowRankLinear.apply(
        flatten_rows(x), lora_A, lora_B, values, bias, float(scale), dense,
        support.row_ptr, support.col_idx, support.row_order,
        support.col_ptr, support.row_idx, support.csc_to_csr, support.col_order,
        _flat_index(support) if dense else None,
        support.out_features, support.in_features,
    )
    return y.reshape(*batch_shape, support.out_features)

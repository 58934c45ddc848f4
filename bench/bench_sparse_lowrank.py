"""Benchmarks of sparse plus low-rank linear, SLTrain (ALGORITHMS.md section 3).

Op: ``y = x (scale * B A + S)^T + b`` with x ``[N, in]``, ``A = lora_A [r, in]``,
``B = lora_B [out, r]``, S ``[out, in]`` on a fixed random support (values ``[nnz]``).
Timed as ``sparse_lowrank_linear.fwd`` (no autograd) and ``sparse_lowrank_linear.fwd+bwd``
(forward plus the gradients of x, A, B, values and bias).  Implementations on the same inputs:

* ``ours``: :func:`lowrank_ops.ops.sparse_lowrank_linear` with ``strategy="auto"``;
* ``ours_sparse`` / ``ours_dense``: the same op with the strategy forced (never forming
  an ``[out, in]`` matrix / materializing W as the paper's code);
* ``paper``: the SLTrain paper's approach in plain torch (:class:`PaperSparseLowRankLinear`):
  build the dense W in forward and again in backward, a dense ``dW = dy^T x``, gather dvalues;
* ``dense_linear``: ``F.linear(x, W, b)`` with a dense trainable W of the same shape, the
  dense-training reference (its W is built once outside the timing, as a parameter).

A third op, ``sparse_lowrank_linear.strategy_sweep`` (full runs only), times the two forced
strategies and ``auto`` over densities at (1024, 2730), r = 256, for two batch sizes N
(CPU 256 and 1024, CUDA 256 and 2048), to place the density above which the dense
strategy wins (``lowrank_ops.ops.sparse_lowrank._DENSE_FROM_DENSITY``).  In the CLI
table, ``ours`` (auto) is the baseline of each row, so a ratio below 1 means auto picked
the slower strategy at that density.

Sizes: quick default (1024, 2730), r = 256, density 0.03, N = 128, float32.
``LOWRANK_OPS_BENCH_FULL=1``: SLTrain's (2048, 5461), r = 512, density 0.03 and
(4096, 11008), r = 1024, density 0.05; CUDA with N = 2048; CPU with N = 256 and the
second shape halved ((2048, 5504), r = 512), so the 2-core CPU suite stays near three
minutes.  float32 for every impl, plus bfloat16 for ours vs paper.

Recorded in ``benchmark.extra_info`` beyond the harness's keys:

``peak_mem_MB``
    Peak memory (MB, 10^6 bytes) allocated during one call on top of what was allocated
    before it (:func:`_harness.peak_memory_mb`: outputs, gradients, saved and temporary
    tensors; the inputs and parameters are excluded, see ``param_MB``).  Not counted: the
    sparse kernels' per-thread scratch (tile buffers, under 1 MB per thread at these
    shapes) and BLAS's internal packing buffers.  Process RSS was rejected: glibc reuses
    freed heap pages, so its delta over one call is not the call's peak.  (Cross-check at
    2048x5461, N = 256, fwd+bwd, each impl alone in a fresh process warmed on a smaller
    shape, with ``MALLOC_MMAP_THRESHOLD_=65536``: RSS grew 8 MB (ours) to 18 MB (paper)
    more than the profiler's peak, that is the BLAS buffers and code paged in on first
    use; for dense_linear RSS grew less, as building its W had already raised the mark.)
``param_MB``
    Memory of the trainable parameters the impl holds (A, B, values, bias; dense W, bias
    for ``dense_linear``), the other half of the memory comparison with dense training.
``strategy``
    For ``ours*``: the strategy that ran (what ``auto`` chose).
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Tuple

import pytest
import torch
import torch.nn.functional as F

import lowrank_ops
from lowrank_ops.ops.sparse_lowrank import choose_strategy
from lowrank_ops.sparse import FixedSupport

from _harness import (DEVICES, FULL, MB, Case, grid_cases, measure, params, peak_memory_mb, rel_error, require_device,
                      seeded_support)

FAMILY = "sparse_lowrank"
SEED = 0
#: Multiplies the low-rank part; not 1, so the timed code takes the scaling path real
#: training takes (SLTrain uses ``lora_alpha / r``, e.g. 16 / 256 for its 130M model).
SCALE = 0.0625

_STRATEGY = {"ours": "auto", "ours_sparse": "sparse", "ours_dense": "dense"}
_ALL_IMPLS = ("ours", "ours_sparse", "ours_dense", "paper", "dense_linear")

# (out_features, in_features, r, density, N)
if FULL:
    _MAIN = {
        # CPU: N = 256 and the 4096 x 11008 layer halved in every dimension (r too).
        "cpu": [(2048, 5461, 512, 0.03, 256), (2048, 5504, 512, 0.05, 256)],
        "cuda": [(2048, 5461, 512, 0.03, 2048), (4096, 11008, 1024, 0.05, 2048)],
    }
    _MAIN_IMPLS = {"float32": _ALL_IMPLS, "bfloat16": ("ours", "paper")}
    _SWEEP_DENSITIES = {
        "cpu": (0.01, 0.03, 0.1, 0.2, 0.3, 0.5),
        "cuda": (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5),
    }
    # Two batch sizes: the dense strategy's extra work (rebuilding W, projecting dW) is
    # ~ r in out whatever N, so its relative cost, and the crossover, falls as N grows.
    _SWEEP_ROWS = {"cpu": (256, 1024), "cuda": (256, 2048)}
    _SWEEP = {
        device: [(1024, 2730, 256, density, n) for n in _SWEEP_ROWS[device] for density in _SWEEP_DENSITIES[device]]
        for device in DEVICES
    }
else:
    _MAIN = {device: [(1024, 2730, 256, 0.03, 128)] for device in DEVICES}
    _MAIN_IMPLS = {"float32": _ALL_IMPLS}
    _SWEEP = {device: [] for device in DEVICES}
_SWEEP_IMPLS = {"float32": ("ours", "ours_sparse", "ours_dense")}


def _label(problem: Tuple[int, int, int, float, int]) -> str:
    out_features, in_features, rank, density, n = problem
    return f"{out_features}x{in_features} r={rank} d={density:g} N={n}"


def _cases(op: str, problems, impls) -> List[Case]:
    return grid_cases(FAMILY, op, problems, impls, _label)


# ---------------------------------------------------------------------------- inputs
class Inputs(NamedTuple):
    support: FixedSupport
    flat_index: torch.Tensor  # [nnz] int64: row * in + col of each stored entry, CSR order
    x: torch.Tensor  # [N, in]
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    values: torch.Tensor  # [nnz]
    bias: torch.Tensor  # [out]
    dy: torch.Tensor  # [N, out]: the upstream gradient of the backward

    @property
    def parameters(self) -> Tuple[torch.Tensor, ...]:
        return (self.lora_A, self.lora_B, self.values, self.bias)


@functools.lru_cache(maxsize=2)
def _inputs(problem: tuple, dtype: torch.dtype, device: str) -> Inputs:
    out_features, in_features, rank, density, n = problem
    support = seeded_support(out_features, in_features, density, device, SEED)
    # Drawn on CPU in float32 from fixed seeds, so every device, dtype and impl sees the same
    # numbers; scaled so that both parts of W and y are O(1) (bfloat16 neither over- nor underflows).
    generator = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(n, in_features, generator=generator)
    lora_A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    lora_B = torch.randn(out_features, rank, generator=generator) / (SCALE * rank**0.5)
    values = torch.randn(support.nnz, generator=generator) / (density * in_features) ** 0.5
    bias = torch.randn(out_features, generator=generator)
    dy = torch.randn(n, out_features, generator=generator)
    flat_index = support.rows() * in_features + support.col_idx.to(torch.int64)
    tensors = (t.to(device=device, dtype=dtype) for t in (x, lora_A, lora_B, values, bias, dy))
    return Inputs(support, flat_index, *tensors)


@functools.lru_cache(maxsize=2)
def _reference(problem: tuple, dtype: torch.dtype, device: str, backward: bool) -> Tuple[torch.Tensor, ...]:
    """float64 ``(y,)`` or ``(y, dx, dA, dB, dvalues, dbias)`` on the very inputs the impls see.

    Plain autograd through the dense W (independent of every timed impl, the paper
    re-implementation's hand-written backward included).
    """
    inp = _inputs(problem, dtype, device)
    x, lora_A, lora_B, values, bias = (
        t.to(torch.float64).requires_grad_(backward) for t in (inp.x, inp.lora_A, inp.lora_B, inp.values, inp.bias)
    )
    weight = SCALE * (lora_B @ lora_A) + inp.support.to_dense(values)
    y = F.linear(x, weight, bias)
    if not backward:
        return (y,)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B, values, bias), inp.dy.to(torch.float64))
    return (y.detach(), *grads)


# ---------------------------------------------------------------------------- the paper's approach
class PaperSparseLowRankLinear(torch.autograd.Function):
    """SLTrain's reference approach, ``y = x W^T + b`` with ``W = B (scale A) + S`` built densely.

    Forward materializes W (``B.mm(scale A)``, then ``scatter_add_`` of the values at
    their flat positions) and saves only x, A, B, values and the index.  Backward
    rebuilds W, then ``dx = dy W``, the dense ``dW = dy^T x`` (W stays alive meanwhile),
    ``dB = dW (scale A)^T``, ``dA = scale B^T dW``, ``dvalues = dW`` gathered at the
    index, ``db = dy.sum(0)``.  The scale multiplies the small ``[r, in]`` factor, as the
    paper's module does (the Python side passes ``lora_A * scaling``), not the
    ``[out, in]`` product: one full-size pass and temporary fewer, the stronger peer.

    Inputs: x ``[N, in]``, lora_A ``[r, in]``, lora_B ``[out, r]``, values ``[nnz]``,
    bias ``[out]`` or None, flat_index ``[nnz]`` int64, scale (float).
    """

    @staticmethod
    def _weight(lora_A, lora_B, values, flat_index, scale: float) -> torch.Tensor:
        weight = lora_B.mm(lora_A * scale)
        weight.view(-1).scatter_add_(0, flat_index, values)
        return weight

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, values, bias, flat_index, scale):
        ctx.save_for_backward(x, lora_A, lora_B, values, flat_index)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return F.linear(x, PaperSparseLowRankLinear._weight(lora_A, lora_B, values, flat_index, scale), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, lora_A, lora_B, values, flat_index = ctx.saved_tensors
        need_x, need_A, need_B, need_values, need_bias = ctx.needs_input_grad[:5]
        scale = ctx.scale
        grad_x = grad_A = grad_B = grad_values = grad_bias = None
        weight = PaperSparseLowRankLinear._weight(lora_A, lora_B, values, flat_index, scale)
        if need_x:
            grad_x = grad_y.mm(weight)
        grad_weight = grad_y.t().mm(x)
        if need_B:
            grad_B = grad_weight.mm((lora_A * scale).t())
        if need_A:
            grad_A = lora_B.t().mm(grad_weight).mul_(scale)
        if need_values:
            grad_values = grad_weight.view(-1).gather(0, flat_index)
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_A, grad_B, grad_values, grad_bias, None, None


# ---------------------------------------------------------------------------- roofline
def _roofline(inp: Inputs, backward: bool) -> Tuple[float, float]:
    """Useful flops and compulsory bytes of one call, the same for every impl.

    Flops: the sparse-plus-low-rank formulation's, ``2 N nnz + 2 N r (in + out) + N out``
    forward (SpMM, ``u = x A^T``, ``u B^T``, bias); with backward ``6 N nnz`` (SpMM with
    S^T, SDDMM) ``+ 6 N r (in + out)`` (``h = dy B``, dB, dA, ``h A``) ``+ 2 N out``.
    Bytes: every tensor the op must read or write once: x, the parameters and the CSR
    pattern, y; with backward also dy, the CSC map, every gradient and ``u [N, r]``
    (written in forward, read in backward).
    """
    support = inp.support
    n, in_features = inp.x.shape
    out_features, rank = inp.lora_B.shape
    nnz = support.nnz
    element, index = inp.x.element_size(), support.col_idx.element_size()
    parameters = rank * (in_features + out_features) + nnz + out_features
    csr = index * (nnz + out_features + 1)
    flops = 2.0 * n * nnz + 2.0 * n * rank * (in_features + out_features) + n * out_features
    moved = element * (n * (in_features + out_features) + parameters) + csr
    if backward:
        flops *= 3  # per term: forward, plus two more of the same size in backward
        flops -= n * out_features  # the bias costs one pass each way, not three
        csc = index * (2 * nnz + in_features + 1)  # row_idx, csc_to_csr, col_ptr
        moved += element * (n * (out_features + in_features) + parameters + 2 * n * rank) + csc
    return flops, moved


def _measure(benchmark, case: Case, inp: Inputs, build: Callable[[], Callable], check, *, backward: bool) -> None:
    """:func:`_harness.measure` plus this suite's extra_info (peak memory, parameters, strategy)."""
    built: List[Callable] = []

    def keep(fn: Callable) -> Callable:
        built.append(fn)
        return fn

    flops, moved = _roofline(inp, backward)
    measure(benchmark, case, lambda: keep(build()), check, flops=flops, bytes=moved)
    # After the timing, so the call is warm (lazy initialisation is not a per-call cost).
    benchmark.extra_info["peak_mem_MB"] = peak_memory_mb(built[-1], case.device)
    if case.impl == "dense_linear":
        out_features, in_features = inp.support.shape
        param_bytes = (out_features * in_features + out_features) * inp.x.element_size()
    else:
        param_bytes = sum(t.numel() * t.element_size() for t in inp.parameters)
    benchmark.extra_info["param_MB"] = param_bytes / MB
    if case.impl in _STRATEGY:
        strategy = _STRATEGY[case.impl]
        if strategy == "auto":
            strategy = choose_strategy(inp.support, inp.lora_A.shape[0], inp.x.shape[0], inp.x.device)
        benchmark.extra_info["strategy"] = strategy


# ---------------------------------------------------------------------------- implementations
def _dense_weight(inp: Inputs) -> torch.Tensor:
    """``W = scale B A + S`` for the dense_linear peer (same function as the others compute)."""
    return (SCALE * (inp.lora_B @ inp.lora_A)).view(-1).index_add(0, inp.flat_index, inp.values).view(inp.support.shape)


def _call(impl: str, inp: Inputs, x, lora_A, lora_B, values, bias) -> torch.Tensor:
    """One forward of ``impl`` (not dense_linear) on the given leaves."""
    if impl in _STRATEGY:
        return lowrank_ops.ops.sparse_lowrank_linear(
            x, lora_A, lora_B, values, inp.support, bias, scale=SCALE, strategy=_STRATEGY[impl]
        )
    if impl == "paper":
        return PaperSparseLowRankLinear.apply(x, lora_A, lora_B, values, bias, inp.flat_index, SCALE)
    raise ValueError(f"unknown impl {impl!r}")


def _forward(case: Case, inp: Inputs) -> Callable[[], Callable]:
    """``build()`` returning the timed forward of ``case.impl`` (nothing requires grad)."""

    def build():
        if case.impl == "dense_linear":
            weight = _dense_weight(inp)
            return lambda: F.linear(inp.x, weight, inp.bias)
        leaves = (inp.x, inp.lora_A, inp.lora_B, inp.values, inp.bias)
        return lambda: _call(case.impl, inp, *leaves)

    return build


def _forward_backward(case: Case, inp: Inputs) -> Callable[[], Callable]:
    """``build()`` returning the timed forward+backward of ``case.impl``.

    ``fn()`` returns ``(y, dx, dA, dB, dvalues, dbias)``; for dense_linear
    ``(y, dx, dW, dbias)``.
    """

    def build():
        x = inp.x.detach().clone().requires_grad_()
        bias = inp.bias.detach().clone().requires_grad_()
        if case.impl == "dense_linear":
            weight = _dense_weight(inp).requires_grad_()

            def run():
                y = F.linear(x, weight, bias)
                return (y,) + torch.autograd.grad(y, (x, weight, bias), inp.dy)

            return run
        lora_A, lora_B, values = (t.detach().clone().requires_grad_() for t in (inp.lora_A, inp.lora_B, inp.values))
        leaves = (x, lora_A, lora_B, values, bias)

        def run():
            y = _call(case.impl, inp, *leaves)
            return (y,) + torch.autograd.grad(y, leaves, inp.dy)

        return run

    return build


# ---------------------------------------------------------------------------- benchmarks
def _run_fwd(benchmark, case: Case) -> None:
    require_device(case.device)
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    (reference,) = _reference(case.problem, case.torch_dtype, case.device, False)
    _measure(benchmark, case, inp, _forward(case, inp), lambda y: rel_error([y], [reference]), backward=False)


def _run_fwd_bwd(benchmark, case: Case) -> None:
    require_device(case.device)
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    references = _reference(case.problem, case.torch_dtype, case.device, True)

    def check(result) -> float:
        if case.impl == "dense_linear":
            # No A or B: compare what it shares with the others (dvalues = dW at the support).
            y, dx, grad_weight, dbias = result
            benchmark.extra_info["note"] = "error over y, dx, db and dW at the support (dense W: no dA, dB)"
            dvalues = grad_weight.view(-1).index_select(0, inp.flat_index)
            y_ref, dx_ref, _, _, dvalues_ref, dbias_ref = references
            return rel_error([y, dx, dvalues, dbias], [y_ref, dx_ref, dvalues_ref, dbias_ref])
        return rel_error(result, references)

    _measure(benchmark, case, inp, _forward_backward(case, inp), check, backward=True)


@pytest.mark.parametrize("case", params(_cases("sparse_lowrank_linear.fwd", _MAIN, _MAIN_IMPLS)))
def test_sparse_lowrank_linear_fwd(benchmark, case: Case):
    _run_fwd(benchmark, case)


@pytest.mark.parametrize("case", params(_cases("sparse_lowrank_linear.fwd+bwd", _MAIN, _MAIN_IMPLS)))
def test_sparse_lowrank_linear_fwd_bwd(benchmark, case: Case):
    _run_fwd_bwd(benchmark, case)


@pytest.mark.skipif(not FULL, reason="the strategy sweep runs on full runs only (LOWRANK_OPS_BENCH_FULL=1)")
@pytest.mark.parametrize("case", params(_cases("sparse_lowrank_linear.strategy_sweep", _SWEEP, _SWEEP_IMPLS)))
def test_sparse_lowrank_linear_strategy_sweep(benchmark, case: Case):
    _run_fwd_bwd(benchmark, case)

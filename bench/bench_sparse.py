"""Benchmarks of the fixed-support sparse family (ALGORITHMS.md section 1).

Ops: ``fixed_sparse_matmul`` forward (``y = x S^T``), forward+backward (plus ``dx`` and
``dvalues``) and ``spmv`` (``S v``).  Peers on the same inputs:

* ``torch_csr``: torch's sparse CSR tensor (same index arrays), ``(S @ x.T).T``; for the backward S is a
  CSR leaf that requires grad (torch returns its grad as a dense ``[out, in]`` tensor on
  CPU, recorded as a note);
* ``dense``: ``x @ W.T`` with ``W = support.to_dense(values)`` built once, outside the
  timing (W and x require grad for the backward).

Sizes: a quick default; ``LOWRANK_OPS_BENCH_FULL=1`` gives SLTrain's shapes
(2048 x 5461 at density 0.03, 4096 x 11008 at 0.05) with N in {512, 2048} (N = 512 only
for the larger shape on CPU), float32 plus bfloat16 (ours vs dense; torch's CSR matmul
has no bfloat16 CPU kernel).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, List, NamedTuple, Tuple

import pytest
import torch

import lowrank_ops
from lowrank_ops.sparse import FixedSupport

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, rel_error, require_device, seeded_support

FAMILY = "sparse"
SEED = 0

# (out_features, in_features, density, N); N = 0 marks an SpMV problem (one vector).
if FULL:
    _MATMUL = {
        "cpu": [(2048, 5461, 0.03, 512), (2048, 5461, 0.03, 2048), (4096, 11008, 0.05, 512)],
        "cuda": [(2048, 5461, 0.03, 512), (2048, 5461, 0.03, 2048), (4096, 11008, 0.05, 512), (4096, 11008, 0.05, 2048)],
    }
    _SPMV = {device: [(2048, 5461, 0.03, 0), (4096, 11008, 0.05, 0)] for device in DEVICES}
    _MATMUL_IMPLS = {"float32": ("ours", "torch_csr", "dense"), "bfloat16": ("ours", "dense")}
else:
    _MATMUL = {device: [(1024, 2730, 0.03, 256)] for device in DEVICES}
    _SPMV = {device: [(2048, 5461, 0.03, 0)] for device in DEVICES}
    _MATMUL_IMPLS = {"float32": ("ours", "torch_csr", "dense")}
_SPMV_IMPLS = {"float32": ("ours", "torch_csr", "dense")}


def _label(problem: Tuple[int, int, float, int]) -> str:
    out_features, in_features, density, n = problem
    return f"{out_features}x{in_features} d={density:g}" + (f" N={n}" if n else "")


def _cases(op: str, problems, impls) -> List[Case]:
    return grid_cases(FAMILY, op, problems, impls, _label)


# ---------------------------------------------------------------------------- inputs
class Inputs(NamedTuple):
    support: FixedSupport
    values: torch.Tensor  # [nnz]
    x: torch.Tensor  # [N, in], or [in] for SpMV
    dy: torch.Tensor  # [N, out], or [out]: the upstream gradient of the backward


@functools.lru_cache(maxsize=2)
def _inputs(problem: tuple, dtype: torch.dtype, device: str) -> Inputs:
    out_features, in_features, density, n = problem
    support = seeded_support(out_features, in_features, density, device, SEED)
    # Drawn on CPU in float32 from fixed seeds, so every device, dtype and impl sees the same numbers.
    generator = torch.Generator().manual_seed(SEED + 1)
    lead = (n,) if n else ()
    values = torch.randn(support.nnz, generator=generator)
    x = torch.randn(*lead, in_features, generator=generator)
    dy = torch.randn(*lead, out_features, generator=generator)
    return Inputs(support, *(t.to(device=device, dtype=dtype) for t in (values, x, dy)))


@functools.lru_cache(maxsize=2)
def _reference(problem: tuple, dtype: torch.dtype, device: str, backward: bool) -> Tuple[torch.Tensor, ...]:
    """float64 reference on the very inputs the impls see (already rounded to ``dtype``)."""
    inp = _inputs(problem, dtype, device)
    x = inp.x.to(torch.float64).requires_grad_(backward)
    values = inp.values.to(torch.float64).requires_grad_(backward)
    y = lowrank_ops.reference.fixed_sparse_matmul(x, values, inp.support)
    if not backward:
        return (y,)
    dx, dvalues = torch.autograd.grad(y, (x, values), inp.dy.to(torch.float64))
    return (y.detach(), dx, dvalues)


def _torch_csr(inp: Inputs, values: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    support = inp.support
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta", invariant checks
        # The support's own index dtype (int32 when it fits): torch's int32 CSR kernels are the
        # faster ones (SpMV about 2.5x faster than with int64 indices on a 2-core Xeon), so the peer is its best.
        return torch.sparse_csr_tensor(
            support.row_ptr, support.col_idx, values, support.shape, requires_grad=requires_grad
        )


def _at_support(grad: torch.Tensor, support: FixedSupport) -> torch.Tensor:
    """A gradient of the whole matrix S (dense or sparse) read at the support, in CSR order."""
    if grad.layout != torch.strided:
        grad = grad.to_dense()
    return grad[support.rows(), support.col_idx.long()]


# ---------------------------------------------------------------------------- roofline
def _pass_bytes(inp: Inputs, n_index_arrays: int, n_rows: int) -> float:
    """Compulsory traffic of one sparse pass: read x-like and values, write y-like, read the pattern."""
    element, index = inp.x.element_size(), inp.support.col_idx.element_size()
    n = inp.x.shape[0] if inp.x.dim() == 2 else 1
    out_features, in_features = inp.support.shape
    nnz = inp.support.nnz
    return element * (n * (in_features + out_features) + nnz) + index * (n_index_arrays * nnz + n_rows + 1)


def _roofline(inp: Inputs, backward: bool) -> Tuple[float, float]:
    n = inp.x.shape[0] if inp.x.dim() == 2 else 1
    out_features, in_features = inp.support.shape
    flops = 2.0 * n * inp.support.nnz
    moved = _pass_bytes(inp, 1, out_features)  # SpMM over CSR: col_idx, row_ptr
    if backward:
        flops *= 3  # dx (SpMM with S^T) and dvalues (SDDMM) cost one forward each
        moved += _pass_bytes(inp, 2, in_features)  # CSC: row_idx, csc_to_csr, col_ptr
        moved += _pass_bytes(inp, 1, out_features)  # SDDMM reads dy and x, writes dvalues
    return flops, moved


# ---------------------------------------------------------------------------- implementations
def _forward(case: Case, inp: Inputs) -> Callable[[], Callable]:
    """``build()`` returning the timed forward of ``case.impl``."""

    def build():
        x, values, support = inp.x, inp.values, inp.support
        if case.impl == "ours":
            if x.dim() == 1:
                return lambda: lowrank_ops.ops.spmv(support, values, x)
            return lambda: lowrank_ops.ops.fixed_sparse_matmul(x, values, support)
        if case.impl == "torch_csr":
            matrix = _torch_csr(inp, values)
            if x.dim() == 1:
                return lambda: matrix @ x
            return lambda: (matrix @ x.T).T
        if case.impl == "dense":
            weight = support.to_dense(values)
            if x.dim() == 1:
                return lambda: weight @ x
            return lambda: x @ weight.T
        raise ValueError(f"unknown impl {case.impl!r}")

    return build


def _forward_backward(case: Case, inp: Inputs) -> Callable[[], Callable]:
    """``build()`` returning the timed forward+backward of ``case.impl``: ``(y, dx, dvalues-like)``."""

    def build():
        support, dy = inp.support, inp.dy
        x = inp.x.detach().clone().requires_grad_()
        if case.impl == "ours":
            values = inp.values.detach().clone().requires_grad_()

            def run():
                y = lowrank_ops.ops.fixed_sparse_matmul(x, values, support)
                return (y,) + torch.autograd.grad(y, (x, values), dy)

            return run
        if case.impl == "torch_csr":
            matrix = _torch_csr(inp, inp.values.detach().clone(), requires_grad=True)

            def run():
                y = (matrix @ x.T).T
                return (y,) + torch.autograd.grad(y, (x, matrix), dy)

            return run
        if case.impl == "dense":
            weight = support.to_dense(inp.values).detach().requires_grad_()

            def run():
                y = x @ weight.T
                return (y,) + torch.autograd.grad(y, (x, weight), dy)

            return run
        raise ValueError(f"unknown impl {case.impl!r}")

    return build


# ---------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("case", params(_cases("fixed_sparse_matmul.fwd", _MATMUL, _MATMUL_IMPLS)))
def test_fixed_sparse_matmul_fwd(benchmark, case: Case):
    require_device(case.device)
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    (reference,) = _reference(case.problem, case.torch_dtype, case.device, False)
    flops, moved = _roofline(inp, backward=False)
    measure(benchmark, case, _forward(case, inp), lambda y: rel_error([y], [reference]), flops=flops, bytes=moved)


@pytest.mark.parametrize("case", params(_cases("fixed_sparse_matmul.fwd+bwd", _MATMUL, _MATMUL_IMPLS)))
def test_fixed_sparse_matmul_fwd_bwd(benchmark, case: Case):
    require_device(case.device)
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    references = _reference(case.problem, case.torch_dtype, case.device, True)
    flops, moved = _roofline(inp, backward=True)

    def check(result) -> float:
        y, dx, dvalues = result
        if dvalues.shape != references[2].shape:  # a peer's gradient of the whole matrix S
            if case.impl == "torch_csr":
                layout = str(dvalues.layout).replace("torch.", "")
                benchmark.extra_info["note"] = f"torch returns the grad of S as a {layout} {list(dvalues.shape)} tensor" + (
                    " (the full dy^T x, not only the support)" if dvalues.layout == torch.strided else ""
                )
            dvalues = _at_support(dvalues, inp.support)
        return rel_error([y, dx, dvalues], references)

    measure(benchmark, case, _forward_backward(case, inp), check, flops=flops, bytes=moved)


@pytest.mark.parametrize("case", params(_cases("spmv", _SPMV, _SPMV_IMPLS)))
def test_spmv(benchmark, case: Case):
    require_device(case.device)
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    (reference,) = _reference(case.problem, case.torch_dtype, case.device, False)
    flops, moved = _roofline(inp, backward=False)
    measure(benchmark, case, _forward(case, inp), lambda y: rel_error([y], [reference]), flops=flops, bytes=moved)

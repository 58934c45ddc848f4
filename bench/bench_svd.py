"""Benchmarks of the batched exact SVD (one-sided Jacobi, ALGORITHMS.md section 4).

Op ``batched_svd``: the thin SVD ``U [B, m, k], S [B, k], Vh [B, k, n]`` of a batch of B
small matrices.  Implementations on the same inputs:

* ``ours``: :func:`lowrank_ops.ops.svd.batched_svd` (default tolerance ``max(m, n) eps``);
* ``torch``: ``torch.linalg.svd(A, full_matrices=False)`` (CPU: LAPACK ``gesdd`` matrix by
  matrix; CUDA: cuSOLVER, batched Jacobi for small sizes).

Sizes: quick: B = 512 matrices of 16 x 16 and 64 x 64, B = 64 of 128 x 128 (CPU only) and
of 256 x 256 (CPU; 512 on CUDA), float32; ``LOWRANK_OPS_BENCH_FULL=1`` adds float64.  On
CPU, ``batched_svd`` delegates matrices beyond its measured crossover with LAPACK (192
columns in float32, 96 in float64: ``jacobi_size_limit``) to ``torch.linalg.svd``: the
256 x 256 case (and 128 x 128 in float64) then times that delegation, ratio about 1.  Inputs are N(0, 1), drawn
once per problem from a fixed seed.  The issue's bar on CPU: ours at least 3x faster
than torch at 64 x 64, B = 512.

Error column: the worse of the relative reconstruction error
``max_b ||U S Vh - A||_F / ||A||_F`` and the singular-value error
``max |S - S_ref| / max S_ref`` against torch's float64 SVD of the same (rounded) inputs.

Roofline numbers (the same for both impls): ``flops`` is the work of one-sided Jacobi
at the sweep count ours measured on these inputs (mean over the batch), counting every
pair as rotated: ``B * sweeps * n(n-1)/2 * (6m + 4n)`` (a dot product, 2m, and a
scaled rotation of the two columns of W and V, 4(m + n)); it is an upper estimate, as
the last sweeps rotate few pairs (the sweeps of the Jacobi kernel, also for delegated
sizes).  ``bytes``: read A, write U, S, Vh.  Also recorded: ``sweeps`` (the kernel's
mean) in ``benchmark.extra_info``.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Tuple

import pytest
import torch

from lowrank_ops.ops.svd import batched_svd, default_max_sweeps, default_tol

from _harness import DEVICES, FULL, Case, measure, params, require_device

FAMILY = "svd"
SEED = 0

# (m, n, B) per device; 256 x 64: tall (per-head projections), where the CPU kernel
# sweeps R^T and V1 (64 rows each) and forms Q V1 once.
_PROBLEMS = {
    "cpu": [(16, 16, 512), (64, 64, 512), (256, 64, 128), (128, 128, 64), (256, 256, 64)],
    "cuda": [(16, 16, 512), (64, 64, 512), (256, 64, 512), (256, 256, 512)],
}
_DTYPES = ("float32", "float64") if FULL else ("float32",)
_IMPLS = ("ours", "torch")


def _label(problem: Tuple[int, int, int]) -> str:
    m, n, batch = problem
    return f"{m}x{n} B={batch}"


def _cases() -> List[Case]:
    return [
        Case(FAMILY, "batched_svd", impl, device, dtype, _label(problem), problem)
        for device in DEVICES
        for problem in _PROBLEMS[device]
        for dtype in _DTYPES
        for impl in _IMPLS
    ]


@functools.lru_cache(maxsize=2)
def _inputs(problem: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    m, n, batch = problem
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(batch, m, n, generator=generator).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=2)
def _reference(problem: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Singular values in float64 of the very inputs the impls see (on CPU)."""
    return torch.linalg.svdvals(_inputs(problem, dtype, device).cpu().double())


@functools.lru_cache(maxsize=2)
def _sweeps(problem: tuple, dtype: torch.dtype, device: str) -> float:
    """Mean sweeps of the Jacobi kernel itself (run even where batched_svd delegates)."""
    m, n, _ = problem
    sweeps = torch.ops.lowrank_ops.jacobi_svd(
        _inputs(problem, dtype, device), default_tol(m, n, dtype), default_max_sweeps(dtype), False
    )[3]
    return float(sweeps.double().mean())


def _roofline(problem: tuple, dtype: torch.dtype, device: str) -> Tuple[float, float]:
    m, n, batch = problem
    k = min(m, n)
    flops = batch * _sweeps(problem, dtype, device) * k * (k - 1) / 2 * (6 * max(m, n) + 4 * k)
    element = torch.empty((), dtype=dtype).element_size()
    out_element = 8 if dtype == torch.float64 else 4
    moved = batch * (element * m * n + out_element * (m * k + k + k * n))
    return flops, moved


def _build(case: Case, A: torch.Tensor) -> Callable[[], Callable]:
    def build():
        if case.impl == "ours":
            return lambda: batched_svd(A)[:3]
        if case.impl == "torch":
            return lambda: torch.linalg.svd(A, full_matrices=False)
        raise ValueError(f"unknown impl {case.impl!r}")

    return build


def _error(result, A: torch.Tensor, reference: torch.Tensor) -> float:
    U, S, Vh = (t.detach().cpu().double() for t in result)
    A64 = A.cpu().double()
    reconstruction = torch.linalg.matrix_norm((U * S.unsqueeze(-2)) @ Vh - A64) / torch.linalg.matrix_norm(A64)
    values = (S - reference).abs().max() / reference.max()
    return max(float(reconstruction.max()), float(values))


@pytest.mark.parametrize("case", params(_cases()))
def test_batched_svd(benchmark, case: Case):
    require_device(case.device)
    A = _inputs(case.problem, case.torch_dtype, case.device)
    reference = _reference(case.problem, case.torch_dtype, case.device)
    flops, moved = _roofline(case.problem, case.torch_dtype, case.device)
    benchmark.extra_info["sweeps"] = _sweeps(case.problem, case.torch_dtype, case.device)
    measure(benchmark, case, _build(case, A), lambda result: _error(result, A, reference), flops=flops, bytes=moved)

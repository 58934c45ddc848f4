"""Benchmarks of M-FAC inverse-Fisher-vector products (ALGORITHMS.md section 6).

Ops, on a full window of m gradients of length d (float32):

* ``mfac.step``: one optimizer step, ``update_ihvp(g)``: write g into the oldest slot, the
  new Gram row ``G g``, the factor of the new ``K`` (ours: an ``O(m^2)`` rank update of
  the Cholesky factor; the peers refactor, ``O(m^3)``), and ``F^-1 g = (g - G^T c) / lambda``;
* ``mfac.update``: the window change alone: write g, the Gram row ``G g`` and the
  factor of the new ``K`` (ours updates it in ``update``; ``_cholesky()`` is still called,
  as a no-op, so that a lazy refactorization would be timed); one pass over G;
* ``mfac.ihvp``: ``F^-1 x`` for a fixed window (``G x``, solves, ``x - G^T c``).

Implementations on the same window (the same buffer tensor is shared, see below):

* ``ours``: :class:`lowrank_ops.second_order.MFACInverse` (fused C++/CUDA passes, every
  sum in float64, the result rounded to float32 once: within about one float32 rounding
  of the float64 solve on the same window, whatever the damping);
* ``ours_bf16``: the same with the window stored in bfloat16 (sums in float64): half the
  bytes.  Its window is the bf16 rounding of the shared one, with its own exact Gram
  matrix (``O(m^2 d)`` to set up, so skipped above ``m^2 d = 2e11``), and its error is
  measured against that rounded window: the kernels' error, not the storage's;
* ``torch``: :class:`lowrank_ops.reference.MFACInverseTorch`, the same formulas in torch
  ops (GEMV ``G g``, a row copy for the write, ``addmv`` for ``x - G^T c``, the same float64
  Cholesky): the dense-torch peer;
* ``sherman_morrison``: :class:`lowrank_ops.reference.MFACShermanMorrison`, the paper's
  recursion (official ``HInvFastBatch``): two passes per IHVP after an ``O(m^2 d)`` build,
  and a full rebuild whenever the window changes (its ``mfac.step``).  Only run where the
  build takes seconds (``m^2 d <= 1e10`` for ``ihvp``, ``<= 2e9`` for ``step`` and ``update``,
  ``2e8`` in the quick default run); elsewhere
  recorded as unsupported.

Window: ``G = R Q`` with ``R [m, r]``, ``Q [r, d]`` Gaussian, ``r = min(m, 64)`` (gradients
in a window are strongly correlated), so that ``G G^T = R (Q Q^T) R^T`` costs
``O(r^2 d)`` instead of ``O(m^2 d)`` (minutes at m = 2048, d = 1e6 on two cores).  The
passes' speed does not depend on the values.  The timed step re-adds the gradient already
in the slot it replaces (a copy of that row), so the window, and the shared buffer,
never change between rounds or impls.

Error column: the relative residual ``max|F y - x| / max|x|`` with ``F y = lambda y + G^T
(G y) / m`` evaluated in float64 (blocked over d): a backward error, cheap at any d (a
dense float64 ``F`` is ``d x d``).  ``lambda = 1e-3`` times the mean squared row norm / m.

Roofline: ``bytes`` = the floor ``2 m d * 4`` (two passes over the float32 window; the
``O(d)`` vectors and ``O(m^2)`` matrices are below 2 % at m >= 32; ``m d * 4`` for
``mfac.update``), the same for every impl (so ``ours_bf16`` can exceed it); ``flops`` =
``4 m d`` (step, ihvp) or ``2 m d`` (update): the passes' multiply-adds; the ``O(m^2)``
rank update and solves are not counted (a peer's ``O(m^3)`` refactorization is its own
overhead).  The error of
``mfac.update`` is that of the IHVP computed right after it.  ``cholesky_ms`` (step cases, ours) records a
float64 torch Cholesky of ``K`` alone (what the rank update avoids).
"""
from __future__ import annotations

import functools
import gc
import time
from typing import List, Tuple

import pytest
import torch

from lowrank_ops.reference import MFACInverseTorch, MFACShermanMorrison
from lowrank_ops.second_order import MFACInverse

from _harness import FULL, Case, grid_cases, measure, params, require_device

FAMILY = "mfac"
SEED = 0
_RANK = 64
_BF16_GRAM_LIMIT = 2e11
# Sherman-Morrison rebuilds (its step and update) above this many multiply-adds are
# skipped: seconds per call in FULL mode, and kept out of the quick default run.
_SM_REBUILD_LIMIT = 2e9 if FULL else 2e8

# (m, d) per device.
if FULL:
    _PROBLEMS = {
        "cpu": [(32, 10**5), (256, 10**5), (2048, 10**5), (32, 10**6), (256, 10**6), (1024, 10**6), (2048, 10**6),
                (32, 10**7), (128, 10**7)],
        "cuda": [(32, 10**6), (256, 10**6), (2048, 10**6), (32, 10**7), (256, 10**7), (1024, 10**7)],
    }
else:
    _PROBLEMS = {"cpu": [(32, 10**5), (256, 10**5), (32, 10**6)], "cuda": [(256, 10**6), (1024, 10**6)]}
_IMPLS = {"float32": ("ours", "ours_bf16", "torch", "sherman_morrison")}


def _label(problem: Tuple[int, int]) -> str:
    m, d = problem
    return f"m={m} d={d:.0e}".replace("e+0", "e")


def _cases(op: str) -> List[Case]:
    return grid_cases(FAMILY, op, _PROBLEMS, _IMPLS, _label)


class _Window:
    """The shared float32 window ``G [m, d]``, its float64 Gram matrix and the damping."""

    def __init__(self, m: int, d: int, device: str):
        generator = torch.Generator().manual_seed(SEED)
        r = min(m, _RANK)
        R = torch.randn(m, r, generator=generator, dtype=torch.float64) / r**0.5
        Q = torch.randn(r, d, generator=generator).to(device)
        self.grads = (R.float().to(device) @ Q).contiguous()
        QQ = _blocked_gram(Q)
        del Q
        self.gram = (R.to(device) @ QQ @ R.T.to(device)).contiguous()
        self.damp = 1e-3 * float(self.gram.diagonal().mean()) / m
        self.x = torch.randn(d, generator=generator).to(device)
        self.m, self.d = m, d


def _blocked_gram(Q: torch.Tensor) -> torch.Tensor:
    """``Q Q^T`` in float64 over column blocks (bounded memory)."""
    out = torch.zeros(Q.shape[0], Q.shape[0], dtype=torch.float64, device=Q.device)
    for c0 in range(0, Q.shape[1], 1 << 16):
        block = Q[:, c0:c0 + (1 << 16)].double()
        out += block @ block.T
    return out


@functools.lru_cache(maxsize=1)
def _window(m: int, d: int, device: str) -> _Window:
    gc.collect()
    return _Window(m, d, device)


def _residual(window: _Window, grads: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> float:
    """``max|F y - x| / max|x|`` in float64, F from ``grads`` (blocked over d)."""
    m, d = grads.shape
    chunk = max(1024, (1 << 25) // m)
    Gy = torch.zeros(m, dtype=torch.float64, device=grads.device)
    for c0 in range(0, d, chunk):
        Gy += grads[:, c0:c0 + chunk].double() @ y[c0:c0 + chunk].double()
    worst = 0.0
    for c0 in range(0, d, chunk):
        Fy = window.damp * y[c0:c0 + chunk].double() + grads[:, c0:c0 + chunk].double().T @ Gy / m
        worst = max(worst, float((Fy - x[c0:c0 + chunk].double()).abs().max()))
    return worst / float(x.abs().max())


def _ours(window: _Window, storage: torch.dtype) -> MFACInverse:
    # Adopt the shared buffer and Gram matrix instead of load_state_dict (which copies):
    # at m = 2048, d = 1e6 one more float32 window is 8 GB.
    inverse = MFACInverse(1, 1, window.damp, device=window.grads.device, storage_dtype=storage)
    inverse.dim, inverse.ngrads = window.d, window.m
    if storage == torch.float32:
        inverse.grads, inverse.gram = window.grads, window.gram.clone()
    else:
        # The rounded rows have their own Gram matrix: O(m^2 d), so only where it takes seconds.
        work = float(window.m) ** 2 * window.d
        if work > _BF16_GRAM_LIMIT:
            raise RuntimeError(f"the bf16 window's exact Gram matrix costs m^2 d = {work:.1e}; skipped above {_BF16_GRAM_LIMIT:.0e}")
        inverse.grads = window.grads.to(storage)
        inverse.gram = _blocked_gram(inverse.grads)
    inverse.count = window.m
    return inverse


def _rows(case: Case, window: _Window) -> torch.Tensor:
    """The window the impl works on (the bf16-rounded one for ours_bf16)."""
    return window.grads.to(torch.bfloat16) if case.impl == "ours_bf16" else window.grads


def _torch_peer(window: _Window) -> MFACInverseTorch:
    peer = MFACInverseTorch(1, 1, window.damp, device=window.grads.device)
    peer.ngrads, peer.grads, peer.gram, peer.count = window.m, window.grads, window.gram.clone(), window.m
    peer.update(window.grads[0].clone())  # same values: builds the factor, leaves the window as it was
    return peer


def _sherman_morrison(window: _Window, limit: float) -> MFACShermanMorrison:
    work = float(window.m) ** 2 * window.d
    if work > limit:
        raise RuntimeError(f"O(m^2 d) = {work:.1e} multiply-adds per (re)build; skipped above {limit:.0e}")
    return MFACShermanMorrison(window.grads, window.damp)


def _impl(case: Case, window: _Window, sm_limit: float):
    """The object ``case.impl`` works with on ``window``; the Sherman-Morrison build is
    skipped (recorded as unsupported) above ``sm_limit`` multiply-adds."""
    if case.impl in ("ours", "ours_bf16"):
        return _ours(window, torch.bfloat16 if case.impl == "ours_bf16" else torch.float32)
    if case.impl == "torch":
        return _torch_peer(window)
    return _sherman_morrison(window, sm_limit)


def _measure_op(benchmark, case: Case, timed_call, solution, *, sm_limit: float, passes: int) -> None:
    """The scaffolding of every op: the shared window, the impl built on it (:func:`_impl`),
    the timed callable ``timed_call(impl, window)``, and the residual of the solution
    ``(y, x) = solution(window, result)`` of one call's result, recorded by :func:`measure`.

    ``passes`` over the float32 window per call give the roofline: ``flops = 2 passes m d``,
    ``bytes = 4 passes m d``.
    """
    require_device(case.device)
    m, d = case.problem
    window = _window(m, d, case.device)

    def build():
        return timed_call(_impl(case, window, sm_limit), window)

    def check(result) -> float:
        return _residual(window, _rows(case, window), *solution(window, result))

    measure(benchmark, case, build, check, flops=2.0 * passes * m * d, bytes=4.0 * passes * m * d)


@pytest.mark.parametrize("case", params(_cases("mfac.step")))
def test_mfac_step(benchmark, case: Case):
    def timed_call(impl, window: _Window):
        m = window.m
        if case.impl in ("ours", "ours_bf16"):
            grads = impl.grads

            def step():
                g = grads[impl.count % m].float()  # the row it replaces: the window stays the same
                return impl.update_ihvp(g), g
            return step
        if case.impl == "torch":
            def step():
                g = window.grads[impl.count % m].clone()
                return impl.update_ihvp(g), g
            return step

        def step():  # Sherman-Morrison: the window changed, so the recursion is rebuilt
            g = window.grads[0].clone()
            return MFACShermanMorrison(window.grads, window.damp).ihvp(g), g
        return step

    def solution(window: _Window, result):
        if case.impl == "ours":  # what the rank update avoids: a float64 Cholesky of K alone
            K = _ours(window, torch.float32).gram.clone()
            K.diagonal().add_(window.m * window.damp)
            torch.linalg.cholesky_ex(K)
            start = time.perf_counter()
            torch.linalg.cholesky_ex(K)
            benchmark.extra_info["cholesky_ms"] = 1e3 * (time.perf_counter() - start)
        return result  # (F^-1 g, g)

    _measure_op(benchmark, case, timed_call, solution, sm_limit=_SM_REBUILD_LIMIT, passes=2)


@pytest.mark.parametrize("case", params(_cases("mfac.ihvp")))
def test_mfac_ihvp(benchmark, case: Case):
    def timed_call(impl, window: _Window):
        return lambda: impl.ihvp(window.x)  # the same call for every impl

    _measure_op(benchmark, case, timed_call, lambda window, y: (y, window.x), sm_limit=1e10, passes=2)


@pytest.mark.parametrize("case", params(_cases("mfac.update")))
def test_mfac_update(benchmark, case: Case):
    def timed_call(impl, window: _Window):
        m = window.m
        if case.impl in ("ours", "ours_bf16"):
            grads = impl.grads

            def update():
                impl.update(grads[impl.count % m].float())
                impl._cholesky()  # a no-op after the rank update; times a lazy refactorization if one is due
                return impl.ihvp
            return update
        if case.impl == "torch":
            def update():
                impl.update(window.grads[impl.count % m].clone())
                return impl.ihvp
            return update
        return lambda: MFACShermanMorrison(window.grads, window.damp).ihvp  # a full rebuild

    # The error of an update is that of the IHVP computed right after it.
    _measure_op(benchmark, case, timed_call, lambda window, ihvp: (ihvp(window.x), window.x),
                sm_limit=_SM_REBUILD_LIMIT, passes=1)

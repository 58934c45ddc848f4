"""Shared helpers of the benchmark suites (``bench/bench_<family>.py``).

Every suite follows the same conventions, so that ``lowrank-ops bench`` can read any of
them without knowing the family:

* one benchmark case times ONE implementation (``impl="ours"`` or a peer name) of one
  op on one device, dtype and shape; the case is a :class:`Case` passed as the pytest
  parameter named ``case``;
* :func:`measure` checks the accuracy of that implementation against a float64
  reference, times it, and records ``benchmark.extra_info`` with the keys listed in
  :data:`EXTRA_INFO_KEYS`;
* a peer that cannot run the case (an op torch does not implement for that dtype or
  device, ...) raises in its build or first call; :func:`measure` then skips the case and
  records why (:func:`unsupported`); the conftest adds those records to the
  pytest-benchmark JSON under ``"lowrank_ops"``, where the CLI shows them.

Nothing here touches CUDA at import or collection time: device checks happen inside
the test body (:func:`require_device`).
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import time
from typing import Any, Callable, Dict, List, Sequence

import pytest
import torch

#: ``LOWRANK_OPS_BENCH_FULL=1`` selects the full sizes (the papers' shapes).
FULL: bool = os.environ.get("LOWRANK_OPS_BENCH_FULL", "0") == "1"

#: Devices every suite parametrizes over; unusable ones skip at run time.
DEVICES = ("cpu", "cuda")

#: Keys of ``benchmark.extra_info`` that every case records.
EXTRA_INFO_KEYS = ("family", "op", "shape", "dtype", "impl", "device", "max_error", "flops", "bytes")

#: Time each case for about this long (seconds), within [MIN_ROUNDS, MAX_ROUNDS] rounds;
#: ``LOWRANK_OPS_BENCH_TIME_BUDGET`` overrides it (bench/gpu_check.sh shortens it to fit
#: its time limit).
TIME_BUDGET_S = float(os.environ.get("LOWRANK_OPS_BENCH_TIME_BUDGET", 2.0 if FULL else 0.4))
MIN_ROUNDS = 5
MAX_ROUNDS = 1000

#: Peers that could not run a case, as dicts (family, op, shape, dtype, device, impl, reason).
UNSUPPORTED: List[Dict[str, Any]] = []

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: one implementation of one op on one problem.

    Attributes
    ----------
    family, op : str
        Op family (the suite's stem) and op name, e.g. ``"sparse"``,
        ``"fixed_sparse_matmul.fwd+bwd"``.
    impl : str
        ``"ours"`` or the peer's name (``"torch_csr"``, ``"dense"``, ...).
    device, dtype : str
        ``"cpu"`` / ``"cuda"`` and a key of the dtype table (``"float32"``, ``"bfloat16"``).
    shape : str
        Human-readable problem label, e.g. ``"2048x5461 d=0.03 N=512"``; cases with the
        same (family, op, shape, dtype, device) are compared with each other.
    problem : tuple
        Hashable problem parameters the suite uses to build inputs (and cache them).
    """

    family: str
    op: str
    impl: str
    device: str
    dtype: str
    shape: str
    problem: tuple

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def id(self) -> str:
        """pytest id: short, unique, shell-friendly."""
        return "-".join([self.device, self.dtype, self.shape.replace(" ", "_"), self.impl])

    @property
    def group(self) -> str:
        """pytest-benchmark group: the cases compared with each other."""
        return f"{self.op} {self.shape} {self.dtype} {self.device}"


def grid_cases(family: str, op: str, problems: Dict[str, list], impls: Dict[str, Sequence[str]],
               label: Callable[[tuple], str]) -> List[Case]:
    """Every device x problem (``problems[device]``) x dtype x impl (``impls[dtype]``).

    Ordered device -> problem -> dtype -> impl, so that a suite caching the last few
    problems' inputs and float64 references builds each of them once.
    """
    return [
        Case(family, op, impl, device, dtype, label(problem), problem)
        for device in DEVICES
        for problem in problems[device]
        for dtype, names in impls.items()
        for impl in names
    ]


@functools.lru_cache(maxsize=2)
def seeded_support(out_features: int, in_features: int, density: float, device: str, seed: int):
    """A random FixedSupport from a fixed seed (cached: every impl of a case shares it)."""
    from lowrank_ops.sparse import FixedSupport

    generator = torch.Generator().manual_seed(seed)
    return FixedSupport.random(out_features, in_features, density, generator=generator).to(device)


@functools.lru_cache(maxsize=1)
def spectral_matrix(batch: int, m: int, n: int, device: str):
    """``(A, spectrum)``: A ``[batch?, m, n]`` float32 with singular values ``1 / i``
    (random orthonormal factors, fixed seed; cached: every impl of a case shares it) and
    that spectrum ``[min(m, n)]`` float64, so the optimal rank-k error is known exactly."""
    generator = torch.Generator().manual_seed(0)
    k = min(m, n)
    spectrum = torch.arange(1, k + 1, dtype=torch.float64).reciprocal()
    shape = (batch,) if batch else ()
    U = torch.linalg.qr(torch.randn(*shape, m, k, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(*shape, n, k, generator=generator)).Q
    A = (U * spectrum.float()) @ V.transpose(-2, -1)
    return A.contiguous().to(device), spectrum


def rsvd_auto_passes(m: int, n: int, k: int) -> int:
    """The power iterations of rsvd's ``n_iter="auto"`` (scikit-learn's rule), for peers run
    with the same pass count."""
    return 7 if k < 0.1 * min(m, n) else 4


def linear_with_weight(weight: torch.Tensor) -> torch.nn.Linear:
    """A fresh bias-free ``nn.Linear`` holding a copy of ``weight [out, in]`` (on its device)."""
    out_features, in_features = weight.shape
    layer = torch.nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def params(cases: Sequence[Case]) -> List[Any]:
    """``pytest.param`` objects for ``@pytest.mark.parametrize("case", params(cases))``."""
    return [pytest.param(case, id=case.id) for case in cases]


@functools.lru_cache(maxsize=None)
def device_usable(device: str) -> bool:
    """Whether the benchmarks can run on ``device`` (needs a CUDA build for ``"cuda"``)."""
    if device == "cpu":
        return True
    if device == "cuda":
        import lowrank_ops

        return bool(torch.cuda.is_available() and lowrank_ops.info()["cuda_compiled"])
    return False


def require_device(device: str) -> None:
    """Skip the current case when ``device`` is not usable here."""
    if not device_usable(device):
        pytest.skip(f"device {device!r} not usable (needs a GPU visible to torch and a CUDA build of lowrank_ops)")


def synchronize(device: str) -> None:
    """Wait for queued kernels, so that a CUDA timing covers the work and not the launch."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed_pass(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], grad_output: torch.Tensor,
               backward: bool) -> Callable[[], tuple]:
    """The callable a suite times: ``forward()`` alone without an autograd graph, or
    forward plus the gradients of ``leaves`` for ``grad_output``; returns a tuple of
    tensors (the output, then the gradients) for the accuracy check."""
    if not backward:
        def run_forward():
            with torch.no_grad():
                return (forward(),)
        return run_forward

    def run_backward():
        y = forward()
        return (y,) + torch.autograd.grad(y, leaves, grad_output)

    return run_backward


def rel_error(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """Largest of ``max|out - ref| / max|ref|`` over the tensors (each compared in float64).

    One number per case: for a forward op, the output; for forward+backward, the
    output and every gradient, each scaled by its own reference's magnitude.
    """
    if len(outputs) != len(references):
        raise ValueError(f"rel_error: {len(outputs)} outputs but {len(references)} references")
    worst = 0.0
    for out, ref in zip(outputs, references):
        ref = ref.detach().to(torch.float64)
        diff = (out.detach().to(device=ref.device, dtype=torch.float64) - ref).abs().max()
        scale = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        worst = max(worst, float(diff / scale))
    return worst


def unsupported(case: Case, error: BaseException) -> None:
    """Record that ``case.impl`` cannot run this case, then skip it.

    Use it for peers only: an error in our own op must fail the benchmark.
    """
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    record = {key: getattr(case, key) for key in ("family", "op", "shape", "dtype", "device", "impl")}
    record["reason"] = reason
    UNSUPPORTED.append(record)
    _append_to_log({"unsupported": record})
    pytest.skip(f"{case.impl} unsupported for {case.group}: {reason}")


def measure(
    benchmark,
    case: Case,
    build: Callable[[], Callable[[], Any]],
    check: Callable[[Any], float],
    *,
    flops: float,
    bytes: float,  # noqa: A002 - the extra_info key's name
    peak_memory: bool = False,
) -> None:
    """Check an implementation's accuracy, time it, and record ``benchmark.extra_info``.

    Parameters
    ----------
    benchmark
        The pytest-benchmark fixture.
    case : Case
        The case being timed (fills family/op/shape/dtype/impl/device).
    build : callable
        ``build()`` prepares what the impl holds between calls (a torch CSR tensor, a
        dense weight, leaves that require grad) and returns ``fn``; ``fn()`` runs the
        implementation once and returns its result (output or output and gradients).
    check : callable
        ``check(fn())`` -> relative max error against the float64 reference
        (see :func:`rel_error`); it may add a ``note`` to ``benchmark.extra_info``.
    flops, bytes : float
        Useful floating-point operations and compulsory memory traffic of one call,
        the same for every impl of a case, so that GFLOP/s and GB/s compare impls on
        the work the op must do, not on the work an impl chooses to do.
    peak_memory : bool
        Also record ``extra_info["peak_mem_MB"]``: :func:`peak_memory_mb` of one more
        (warm) call after the timing.

    Notes
    -----
    For a peer (``case.impl != "ours"``), a ``RuntimeError``/``NotImplementedError``/
    ``TypeError`` from ``build`` or the first call means "torch cannot do this here":
    the case is skipped and recorded by :func:`unsupported`.  For ours it fails the case.
    """
    benchmark.group = case.group
    benchmark.extra_info.update({key: getattr(case, key) for key in ("family", "op", "shape", "dtype", "impl", "device")})
    benchmark.extra_info.update({"flops": float(flops), "bytes": float(bytes)})

    def first_call():
        fn = build()

        def timed():
            result = fn()
            synchronize(case.device)
            return result

        start = time.perf_counter()
        result = timed()
        return timed, result, time.perf_counter() - start

    # The accuracy call doubles as the first warm-up (lazy init, allocator, CUDA context).
    if case.impl == "ours":
        timed, result, seconds = first_call()
    else:
        try:
            timed, result, seconds = first_call()
        except (RuntimeError, NotImplementedError, TypeError) as error:
            unsupported(case, error)
    benchmark.extra_info["max_error"] = float(check(result))
    del result
    if seconds < 1.0:  # the first call may include one-time costs: size rounds on a warm call
        start = time.perf_counter()
        timed()
        seconds = time.perf_counter() - start

    # A round budget instead of pytest-benchmark's calibration: slow cases (seconds per call
    # on a 2-core CPU) still get MIN_ROUNDS rounds, fast ones enough for a stable median.
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TIME_BUDGET_S / max(seconds, 1e-6))))
    warmup = 1 if seconds < 0.1 else 0
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if peak_memory:  # after the timing: lazy initialisation is not a per-call cost
        benchmark.extra_info["peak_mem_MB"] = peak_memory_mb(timed, case.device)


MB = 1e6


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory (MB, 10^6 bytes) allocated during one call ``fn()`` beyond what was live before it.

    Outputs, gradients, saved and temporary tensors count; the inputs and parameters
    (live before the call) do not.  The result of ``fn`` is dropped inside the window,
    after it has counted towards the peak.

    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
    ``memory_allocated()`` before the call (the caching allocator's accounting of live
    tensors, not its cached reserve).  CPU: torch keeps no allocator statistics on CPU, so
    the call runs once under ``torch.profiler.profile(profile_memory=True)``, which records
    every allocation and free of torch's CPU allocator with its size and a nanosecond
    timestamp; the peak is the largest running sum of those events in time order.  That
    counts every tensor, ours and torch's, including those our C++ ops allocate through
    torch; not memory that is not a tensor (our kernels' per-thread scratch, BLAS's
    packing buffers, numpy arrays).  Process RSS (``ru_maxrss``) was rejected: a
    high-water mark over the whole process, and glibc reuses freed heap pages, so its
    delta over one call is not the call's peak (bench_sparse_lowrank.py's docstring has
    the cross-check).
    """
    gc.collect()  # garbage from earlier cases must not be freed inside the window
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return peak / MB
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    # The kineto records keep each allocation's signed size and a ns timestamp; the
    # aggregated prof.events() folds most of them into the ops' totals, losing the order.
    events = [
        event for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):  # stable: ties keep record order
        live += event.nbytes()
        peak = max(peak, live)
    return peak / MB


def log_case(benchmark) -> None:
    """Append the case to ``LOWRANK_OPS_BENCH_LOG`` (JSON lines; set by ``lowrank-ops bench``),
    from bench/conftest.py once the case's test has returned.

    pytest-benchmark writes its JSON only when the whole session ends; this log keeps
    every finished case of a run that is killed at a time limit (a GPU lease), and
    ``lowrank-ops bench --from-log`` renders it.
    """
    stats = benchmark.stats.stats
    keys = ("min", "max", "mean", "stddev", "median", "iqr", "rounds")
    _append_to_log({"name": benchmark.name, "extra_info": dict(benchmark.extra_info),
                    "stats": {key: getattr(stats, key) for key in keys}})


def _append_to_log(line: dict) -> None:
    """One JSON line in ``LOWRANK_OPS_BENCH_LOG`` (nothing when the suites run without it)."""
    path = os.environ.get("LOWRANK_OPS_BENCH_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(line) + "\n")

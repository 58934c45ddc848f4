"""Interleaved timing of a few implementations of one benchmark case: a check of a ratio.

``lowrank-ops bench`` times each implementation in its own pytest case, one after the
other.  On a virtual machine whose speed drifts by 10-20 % over seconds (a neighbour's
load, the host's frequency), a case timed in a slow stretch shifts its ratio by as much.
This script builds the chosen implementations of one case exactly as the suite does
(each suite's ``measure`` call hands over its ``build``), then times them in turns,
``ours, peer, ours, peer, ...``, so that a drift hits every implementation alike.

    python bench/interleaved.py SUITE TEST SHAPE IMPLS [--op OP] [--dtype DTYPE] [--reps N] [--device cpu|cuda]

SUITE is a file stem without ``bench_`` (``lora``), TEST one of its test functions
(``test_lora_linear_fwd``), SHAPE a substring of the case's shape label (``"N=1024"``; the
first matching case per implementation is taken, and printed), IMPLS comma-separated, the
first one the baseline of the ratios (``ours,peft,linear``).  ``--op`` and ``--dtype``
pick among the cases of one test that share a shape label (``bench_qr``'s three ops,
float64 rows under ``LOWRANK_OPS_BENCH_FULL=1``).  Suites that time through
``benchmark.pedantic`` rather than ``measure`` (krylov) are not supported.  ``LOWRANK_OPS_BENCH_FULL=1`` selects the
full sizes as for the suites.  Prints each implementation's median and minimum and
``its median / the baseline's median`` (as the table's ``peer / ours``: > 1, the baseline is
faster).

Example (2-core AMD EPYC VM, where the sequential run gave 0.92x):
``python bench/interleaved.py lora test_lora_linear_fwd "N=1024" ours,peft`` -> peft 1.12x.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List

import torch


def _cases(test) -> list:
    """The ``case`` values of a suite test's ``parametrize`` marks."""
    cases = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            cases += [p.values[0] if hasattr(p, "values") else p for p in mark.args[1]]
    return cases


class _Unsupported(types.SimpleNamespace):
    """The stand-in for pytest-benchmark's fixture: a suite that times through it directly
    instead of through ``measure`` gets a clear error instead of an AttributeError."""

    def pedantic(self, *args, **kwargs):
        raise SystemExit("interleaved: this suite times through benchmark.pedantic, not measure(); not supported")


def built_impls(suite: str, test_name: str, shape: str, impls: List[str], device: str, op: str = None,
                dtype: str = None) -> Dict[str, Callable]:
    """``{impl: fn}``: the timed functions the suite builds for the first case of each impl
    whose shape label contains ``shape`` (and whose op and dtype are ``op`` and ``dtype``
    when given); the chosen cases are printed."""
    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = importlib.import_module(f"bench_{suite}")
    functions: Dict[str, Callable] = {}

    def capture(benchmark, case, build, check, **_):
        functions[case.impl] = build()

    module.measure = capture  # the suite's own inputs and builders; nothing timed there
    test = getattr(module, test_name, None)
    if test is None:
        raise SystemExit(f"interleaved: bench_{suite} has no test {test_name!r}")
    for case in _cases(test):
        if (shape in case.shape and case.impl in impls and case.device == device and case.impl not in functions
                and (op is None or case.op == op) and (dtype is None or case.dtype == dtype)):
            try:
                test(_Unsupported(extra_info={}), case)
            except pytest.skip.Exception as skipped:  # e.g. --device cuda without a usable GPU
                raise SystemExit(f"interleaved: {case.impl} skipped: {skipped}") from None
            print(f"{case.impl}: {case.op} {case.shape} {case.dtype} {case.device}")
    missing = [impl for impl in impls if impl not in functions]
    if missing:
        raise SystemExit(f"interleaved: no {test_name} case with shape containing {shape!r} on {device}"
                         f"{'' if op is None else f', op {op}'}{'' if dtype is None else f', dtype {dtype}'} "
                         f"for {', '.join(missing)}")
    return functions


def interleaved_times(functions: Dict[str, Callable], reps: int, device: str) -> Dict[str, List[float]]:
    """Seconds per call of each function, timed in turns (two warm-up calls each first)."""
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for function in functions.values():
        function(), function()
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(reps):
        for name, function in functions.items():
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite")
    parser.add_argument("test")
    parser.add_argument("shape")
    parser.add_argument("impls", help="comma-separated; the first is the baseline")
    parser.add_argument("--op", help="the case's op, where a test has several (bench_qr: tall_gram, ...)")
    parser.add_argument("--dtype", help="the case's dtype (float32, float64, bfloat16)")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1; got {args.reps}")
    impls = args.impls.split(",")
    times = interleaved_times(built_impls(args.suite, args.test, args.shape, impls, args.device, args.op, args.dtype),
                              args.reps, args.device)
    baseline = statistics.median(times[impls[0]])
    for name in impls:
        median = statistics.median(times[name])
        print(f"{name:>24}: median {median * 1e3:9.3f} ms  min {min(times[name]) * 1e3:9.3f} ms  "
              f"ratio {median / baseline:6.3f}")


if __name__ == "__main__":
    main()

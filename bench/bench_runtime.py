"""Benchmark of the CUDA runtime queries behind ``lowrank_ops.info()`` (csrc/cuda/runtime_cuda.cu).

Op ``device_query``: the number of usable CUDA devices and the name of each, the facts
``info()`` (and ``lowrank-ops bench``'s machine record) reads.  Implementations:

* ``ours``: ``_C.cuda_device_count()`` and ``_C.cuda_device_name(i)``, through the CUDA
  runtime linked statically into ``_C`` (no torch involved);
* ``torch``: ``torch.cuda.device_count()`` and ``torch.cuda.get_device_name(i)``.

Host-side calls, timed on the CPU case whatever GPUs exist (on a machine without a driver
both report 0 devices).  Error column: 0 when both report the same number of devices, 1
otherwise.  No flops or compulsory bytes: the figure of merit is the time per query.
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import _C

from _harness import Case, grid_cases, measure, params

FAMILY = "runtime"
_CASES = grid_cases(FAMILY, "device_query", {"cpu": [("all devices",)], "cuda": []},
                    {"float32": ("ours", "torch")}, lambda problem: problem[0])


def _ours() -> tuple:
    return tuple(_C.cuda_device_name(i) for i in range(_C.cuda_device_count()))


def _torch() -> tuple:
    return tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


@pytest.mark.parametrize("case", params(_CASES))
def test_device_query(benchmark, case: Case):
    fn = _ours if case.impl == "ours" else _torch
    expected = len(_torch())
    measure(benchmark, case, lambda: fn, lambda names: float(len(names) != expected), flops=0.0, bytes=0.0)

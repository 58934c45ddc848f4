"""Shared test fixtures: the device list, a seeded generator per test, the build switches.

Tolerances and random-data helpers live in ``tests/helpers.py``.

Devices: ``cpu`` always, plus ``cuda`` when torch sees a GPU *and* the CUDA kernels
were compiled; CUDA parameters carry the ``cuda`` marker so ``-m cuda`` selects them.
No CUDA call happens at import or collection time (``torch.cuda.is_available()`` is
only asked inside the fixture that needs it).
"""
from __future__ import annotations

import zlib

import pytest
import torch

import lowrank_ops

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def cuda_usable() -> bool:
    return lowrank_ops.info()["cuda_available"]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param == "cuda" and not cuda_usable():
        pytest.skip("needs a usable CUDA GPU and a CUDA build of lowrank_ops")
    return request.param


# torch.autocast's (device type, dtype) pairs: CPU bfloat16, CUDA float16 and bfloat16.
AUTOCAST_CASES = [pytest.param(("cpu", torch.bfloat16), id="cpu-bfloat16"),
                  pytest.param(("cuda", torch.float16), id="cuda-float16", marks=pytest.mark.cuda),
                  pytest.param(("cuda", torch.bfloat16), id="cuda-bfloat16", marks=pytest.mark.cuda)]


@pytest.fixture(params=AUTOCAST_CASES)
def autocast_case(request) -> tuple:
    """``(device, dtype)`` for a ``torch.autocast(device, dtype=dtype)`` test."""
    if request.param[0] == "cuda" and not cuda_usable():
        pytest.skip("needs a usable CUDA GPU and a CUDA build of lowrank_ops")
    return request.param


def pytest_collection_modifyitems(config, items):
    """Tests taking the ``cuda_device`` fixture get the ``cuda`` marker too, so that ``-m
    cuda`` (bench/gpu_check.sh's selection) runs them: before, it selected only the ``cuda``
    parameters of ``device``, and the 18 GPU-only tests never ran in a GPU session."""
    for item in items:
        if "cuda_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def cuda_device() -> str:
    """``"cuda"`` for tests that only make sense on a GPU; skips elsewhere."""
    if not cuda_usable():
        pytest.skip("needs a usable CUDA GPU and a CUDA build of lowrank_ops")
    return "cuda"


@pytest.fixture
def generator(request) -> torch.Generator:
    # A per-test seed derived from the test id: different data per test, reproducible.
    seed = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cross_device_generator(request) -> torch.Generator:
    """As ``generator``, but seeded from the test id without its ``device`` parameter: the
    cpu and cuda cases of a test draw the same data (build it on the CPU, then move it)."""
    callspec = getattr(request.node, "callspec", None)
    params = {} if callspec is None else {k: v for k, v in callspec.params.items() if k != "device"}
    key = request.node.nodeid.split("[")[0] + repr(sorted((k, repr(v)) for k, v in params.items()))
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


@pytest.fixture(autouse=True)
def small_batch_kernels_at_every_size(monkeypatch):
    """The tests' layers are small: below SMALL_BATCH_MIN_WEIGHT (a speed policy, tested
    on its own in test_base_linear.py) the ops would use BLAS, and the small-batch kernels
    would never run through them.  Here they run at every size."""
    from lowrank_ops.ops import base_linear

    monkeypatch.setattr(base_linear, "SMALL_BATCH_MIN_WEIGHT", 0)


@pytest.fixture
def cpu_only_build(monkeypatch):
    """Makes lowrank_ops behave as a build without CUDA kernels (for the error paths)."""
    from lowrank_ops import _extension

    class CpuOnlyBuild:
        @staticmethod
        def build_info():
            return {"cuda_compiled": False}

    monkeypatch.setattr(_extension, "_compiled", CpuOnlyBuild)

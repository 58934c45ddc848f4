"""The CUDA runtime queries behind lowrank_ops.info() (csrc/cuda/runtime_cuda.cu).

They go through our statically linked CUDA runtime, not torch's, so they must agree with
torch on what is usable and never fail on a machine without a driver or a GPU.
"""
from __future__ import annotations

import pytest
import torch

import lowrank_ops
from lowrank_ops import _C


def _usable() -> bool:
    return lowrank_ops.info()["cuda_compiled"] and torch.cuda.is_available()


def test_device_count_agrees_with_torch():
    count = _C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if _usable():
        assert count == torch.cuda.device_count()
    elif not lowrank_ops.info()["cuda_compiled"]:
        assert count == 0


@pytest.mark.parametrize("device", [-1, 10_000])
def test_name_of_a_missing_device_is_empty(device):
    # An invalid ordinal is reported, not raised, and leaves no sticky CUDA error behind.
    assert _C.cuda_device_name(device) == ""
    assert _C.cuda_device_count() >= 0


def test_versions():
    runtime, driver = _C.cuda_versions()
    assert isinstance(runtime, int) and isinstance(driver, int) and driver >= 0
    if lowrank_ops.info()["cuda_compiled"]:
        assert runtime >= 11000  # CUDA 11.0 or newer: the oldest toolkit the build accepts
    else:
        assert (runtime, driver) == (0, 0)


@pytest.mark.cuda
def test_names_match_torch(cuda_device):
    for index in range(torch.cuda.device_count()):
        name = _C.cuda_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        assert name == f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    runtime, driver = _C.cuda_versions()
    assert driver >= runtime > 0


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the guard restores nothing on one)")
def test_ops_leave_torchs_current_device_alone(cuda_device):
    """Every CUDA entry point makes its tensors' device current and restores the caller's
    context after (cuda_utils.cuh, DeviceGuard): a bare cudaSetDevice moved
    torch.cuda.current_device() to the device of the last op's tensors.  An op on the last
    GPU must leave cuda:0 current."""
    from lowrank_ops.ops import dora_row_norm

    last = torch.cuda.device_count() - 1
    torch.cuda.set_device(0)
    try:
        W = torch.randn(64, 48, device=f"cuda:{last}")
        A = torch.randn(4, 48, device=f"cuda:{last}")
        B = torch.randn(64, 4, device=f"cuda:{last}")
        norms = dora_row_norm(W, A, B)
        torch.cuda.synchronize(last)
        assert torch.cuda.current_device() == 0
        assert torch.empty(1, device="cuda").device == torch.device("cuda:0")
        torch.testing.assert_close(norms, torch.linalg.vector_norm(W + B @ A, dim=1))
    finally:
        torch.cuda.set_device(0)

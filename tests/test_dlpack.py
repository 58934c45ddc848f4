"""lowrank_ops from NumPy (and CuPy on a GPU) through DLPack (integrations/dlpack.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowrank_ops
from lowrank_ops.integrations.dlpack import from_torch, to_torch, wrap
from lowrank_ops.sparse import FixedSupport


def numpy_random(*shape, seed=0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_to_torch_shares_memory_and_keeps_strides():
    A = numpy_random(4, 6, 5)
    for array in (A, A.transpose(0, 2, 1), A[:, ::2]):
        tensor = to_torch(array)
        assert tensor.data_ptr() == array.ctypes.data and tensor.shape == array.shape
        assert tensor.stride() == tuple(s // array.itemsize for s in array.strides)
    tensor = torch.ones(3)
    assert to_torch(tensor) is tensor
    with pytest.raises(TypeError, match="to_torch: expected a torch tensor or an array with __dlpack__; got list"):
        to_torch([1.0, 2.0])


def test_read_only_arrays_are_copied_not_aliased():
    read_only = np.frombuffer(np.arange(6, dtype=np.float32).tobytes(), dtype=np.float32)
    assert not read_only.flags.writeable
    tensor = to_torch(read_only)
    assert tensor.data_ptr() != read_only.ctypes.data and tensor.tolist() == [0, 1, 2, 3, 4, 5]


def test_negative_strides_are_copied_not_a_crash():
    """torch 2.13's from_dlpack aborts the process (c10::Error, "Storage size calculation
    overflowed") on a reversed NumPy view; run in a child process so that a regression fails
    this test instead of killing the run."""
    import subprocess
    import sys
    script = ("import numpy as np; from lowrank_ops.integrations.dlpack import to_torch, wrap; "
              "from lowrank_ops import krylov; b = np.arange(1.0, 5.0); t = to_torch(b[::-1]); "
              "assert t.tolist() == [4.0, 3.0, 2.0, 1.0] and t.stride() == (1,); "
              "x = wrap(krylov.gmres)(np.eye(4) * 2.0, b[::-1])[0]; "
              "assert np.allclose(x, [2.0, 1.5, 1.0, 0.5]); "
              "m = np.arange(12.0).reshape(3, 4)[::-1, ::2]; assert to_torch(m).tolist() == m.tolist(); print('ok')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_batched_svd_numpy_in_numpy_out():
    A = numpy_random(16, 12, 12, seed=1)
    result = wrap(lowrank_ops.linalg.batched_svd)(A)
    expected = lowrank_ops.linalg.batched_svd(torch.from_numpy(A))
    assert type(result) is type(expected)  # the NamedTuple survives, with numpy fields
    for ours, theirs in zip(result, expected):
        assert isinstance(ours, np.ndarray)
        np.testing.assert_array_equal(ours, theirs.numpy())


def test_rsvd_strided_input_and_keywords():
    A = numpy_random(60, 80, seed=2).T  # a transposed (Fortran-order) view
    U, S, Vh = wrap(lowrank_ops.linalg.rsvd)(A, 6, generator=torch.Generator().manual_seed(0))
    expected = lowrank_ops.linalg.rsvd(torch.from_numpy(A), 6, generator=torch.Generator().manual_seed(0))
    assert isinstance(U, np.ndarray) and U.shape == (80, 6)
    np.testing.assert_array_equal(S, expected.S.numpy())
    with_error = wrap(lowrank_ops.linalg.rsvd)(A, 6, error_probes=4, generator=torch.Generator().manual_seed(0))
    assert type(with_error).__name__ == "RSVDResultWithError" and isinstance(with_error.error, np.ndarray)


def test_ops_with_torch_objects_and_numpy_arrays():
    support = FixedSupport.random(30, 40, 0.2, generator=torch.Generator().manual_seed(3))
    values, x = numpy_random(support.nnz, seed=4), numpy_random(7, 40, seed=5)
    y = wrap(lowrank_ops.ops.fixed_sparse_matmul)(x, values, support)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, x @ support.to_dense(torch.from_numpy(values)).numpy().T, rtol=1e-5, atol=1e-5)
    # The raw torch.library op, and a result object that is not an array container.
    lora = wrap(lowrank_ops.ops.lora_linear)(x, numpy_random(9, 40), numpy_random(4, 40), numpy_random(9, 4),
                                             scale=0.5)
    assert isinstance(lora, np.ndarray) and lora.shape == (7, 9)
    a = np.full(5, 0.2)
    plan = wrap(lowrank_ops.ot.sinkhorn)(a, a.copy(), np.random.default_rng(6).random((5, 5)), reg=0.1)
    assert isinstance(plan, lowrank_ops.ot.OTResult) and isinstance(plan.f, torch.Tensor)


def test_in_place_ops_write_through_to_the_array():
    weight = numpy_random(8, 6, seed=7)
    original = weight.copy()
    A, B = numpy_random(2, 6, seed=8), numpy_random(8, 2, seed=9)
    wrap(lowrank_ops.ops.lora_merge)(weight, A, B, 0.5, inplace=True)
    np.testing.assert_allclose(weight, original + 0.5 * B @ A, rtol=1e-6, atol=1e-6)


def test_torch_arguments_pass_through_and_containers_convert():
    tensor = torch.randn(5, 4)
    assert isinstance(wrap(torch.linalg.norm)(tensor), torch.Tensor)  # no foreign array: torch out
    out = from_torch({"a": torch.ones(2), "b": [torch.zeros(1), 3]}, like=np.zeros(1))
    assert isinstance(out["a"], np.ndarray) and isinstance(out["b"][0], np.ndarray) and out["b"][1] == 3
    with pytest.raises(TypeError, match="wrap: fn must be callable; got int"):
        wrap(3)


@pytest.mark.cuda
def test_cupy_in_cupy_out(cuda_device):
    cupy = pytest.importorskip("cupy")
    A = cupy.asarray(numpy_random(32, 24, 24, seed=10))
    result = wrap(lowrank_ops.linalg.batched_svd)(A)
    assert isinstance(result.S, cupy.ndarray)
    expected = lowrank_ops.linalg.batched_svd(torch.from_numpy(cupy.asnumpy(A)).to(cuda_device))
    np.testing.assert_allclose(cupy.asnumpy(result.S), expected.S.cpu().numpy(), rtol=1e-5, atol=1e-6)
    assert to_torch(A).data_ptr() == A.data.ptr

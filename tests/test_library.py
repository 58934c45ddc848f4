"""The shared torch.library plumbing of the ops (lowrank_ops/ops/_library.py)."""
from __future__ import annotations

import pytest
import torch

import lowrank_ops.ops  # noqa: F401  (registers the ops)

ops = torch.ops.lowrank_ops


def _calls(device_of):
    """Calls of ops from three families; ``device_of(name)`` places each tensor argument."""
    def tensor(name, *shape):
        return torch.randn(*shape, device=device_of(name))

    return {
        "mfac_dots": lambda: ops.mfac_dots(tensor("grads", 5, 16), tensor("x", 3, 16), 5),
        "base_linear": lambda: ops.base_linear(tensor("x", 4, 8), tensor("weight", 6, 8), tensor("bias", 6)),
        "dora_row_norm": lambda: ops.dora_row_norm(tensor("weight", 6, 8), tensor("lora_A", 2, 8),
                                                   tensor("lora_B", 6, 2), 0.5),
    }


@pytest.mark.parametrize("op", ["mfac_dots", "base_linear", "dora_row_norm"])
def test_meta_tensor_among_real_ones_is_rejected(op):
    """One meta argument sends a call to the fake impl, which must raise instead of
    returning uninitialized memory on the other arguments' device."""
    meta_arg = {"mfac_dots": "grads", "base_linear": "x", "dora_row_norm": "lora_A"}[op]
    call = _calls(lambda name: "meta" if name == meta_arg else "cpu")[op]
    with pytest.raises(ValueError, match=f"{meta_arg} is on meta; expected cpu"):
        call()
    out = _calls(lambda name: "meta")[op]()  # all on meta: shape inference works
    assert all(t.device.type == "meta" for t in (out if isinstance(out, (tuple, list)) else (out,)))


def test_cpu_scalar_tensors_go_with_meta_ones():
    """A 0-d CPU tensor (lora_linear's dropout seed) may accompany meta tensors, as CPU
    scalars accompany any device in torch: shape inference on meta still works."""
    from lowrank_ops.ops import lora_linear

    meta = {"device": "meta"}
    y = lora_linear(torch.randn(4, 8, **meta), torch.randn(6, 8, **meta), torch.randn(2, 8, **meta),
                    torch.randn(6, 2, **meta), dropout_p=0.1)
    assert y.device.type == "meta" and y.shape == (4, 6)



def test_every_op_has_an_autograd_formula_or_mutates():
    """The ops without their own gradient mark their outputs non-differentiable (they are the
    building blocks of the autograd Functions).  Under torch's autograd fallback, gradients
    went through whichever torch ops an implementation used: base_linear gave x a gradient
    at 100 rows (addmm) and None at 8 rows (the small-batch kernel), None when traced."""
    names = [name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("lowrank_ops::")]
    assert len(names) >= 39
    for name in names:
        op = getattr(ops, name).default
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)
        assert mutates or torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd"), name
    weight = torch.randn(1024, 1024)
    for rows in (8, 100):
        x = torch.randn(rows, 1024, requires_grad=True)
        assert not ops.base_linear(x, weight, None).requires_grad
    x = torch.randn(8, 64, requires_grad=True)
    torch.library.opcheck(ops.base_linear.default, (x, torch.randn(32, 64), None))  # test_autograd_registration runs
    grads = torch.randn(5, 16, requires_grad=True)  # mfac_dots keeps its own formula
    assert ops.mfac_dots(grads, torch.randn(3, 16), 5).requires_grad


def test_numpy_scalars_are_numbers():
    """Wherever a number is expected, a NumPy scalar is one (np.float32 from a config or a
    NumPy computation was refused by most entry points, with messages showing a valid
    value); a NumPy bool is not."""
    np = pytest.importorskip("numpy")
    import lowrank_ops
    from lowrank_ops.linalg import adaptive_rsvd, cur
    from lowrank_ops.methods import lowrank_compress, trp

    generator = torch.Generator().manual_seed(0)
    A = torch.randn(3, 8, 8, generator=generator)
    assert torch.equal(lowrank_ops.linalg.batched_svd(A, tol=np.float32(1e-5)).S,
                       lowrank_ops.linalg.batched_svd(A, tol=float(np.float32(1e-5))).S)
    x, W = torch.randn(4, 8, generator=generator), torch.randn(6, 8, generator=generator)
    lora_A, lora_B = torch.randn(2, 8, generator=generator), torch.randn(6, 2, generator=generator)
    assert torch.equal(lowrank_ops.ops.lora_linear(x, W, lora_A, lora_B, scale=np.float32(0.5)),
                       lowrank_ops.ops.lora_linear(x, W, lora_A, lora_B, scale=0.5))
    lowrank_ops.nn.LoRALinear(torch.nn.Linear(8, 6), 2, lora_dropout=np.float32(0.1))
    M = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    assert adaptive_rsvd(M, np.float32(0.5)).converged
    cur(M, 4, rcond=np.float64(1e-12), generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    assert lowrank_compress.compress(model, rank=np.float32(0.25)).layers["0"].rank == 4
    assert trp._check_energy("trp", np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match="tol must be a finite number >= 0; got np.True_"):
        lowrank_ops.linalg.batched_svd(A, tol=np.bool_(True))

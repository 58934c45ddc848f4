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


def _public_calls(device: str, support=None):
    """Public entry points (not the raw ops) on small inputs of ``device`` (``support``: the
    sparse pattern to use, made on the CPU by default)."""
    import lowrank_ops
    from lowrank_ops import ops
    from lowrank_ops.sparse import FixedSupport

    def t(*shape):
        return torch.randn(*shape, device=device)

    W, A, B, x = t(12, 16), t(4, 16), t(12, 4), t(5, 16)
    if support is None:
        support = FixedSupport.random(12, 16, 0.25, generator=torch.Generator().manual_seed(0)).to(device)
    return {
        "base_linear": (lambda: ops.base_linear.base_linear(x, W), (5, 12)),
        "lora_linear": (lambda: ops.lora_linear(x, W, A, B), (5, 12)),
        "dora_row_norm": (lambda: ops.dora_row_norm(W, A, B), (12,)),
        "dora_linear": (lambda: ops.dora_linear(x, W, A, B, t(12)), (5, 12)),
        "lora_linear_multi": (lambda: ops.lora_linear_multi(x, W, A[None], B[None], [0, 5], [0]), (5, 12)),
        "fixed_sparse_matmul": (lambda: ops.fixed_sparse_matmul(x, t(support.nnz), support), (5, 12)),
        "spmv": (lambda: ops.spmv(support, t(support.nnz), t(16)), (12,)),
        "cholesky_qr2": (lambda: lowrank_ops.linalg.cholesky_qr2(t(64, 4))[0], (64, 4)),
        "LoRALinear(use_dora)": (lambda: lowrank_ops.nn.LoRALinear(torch.nn.Linear(16, 12, device=device), 4,
                                                                    use_dora=True)(x), (5, 12)),
    }


@pytest.mark.parametrize("name", sorted(_public_calls("cpu")))
def test_public_functions_infer_shapes_on_meta_and_fake_tensors(name):
    """Meta tensors and FakeTensorMode go through the registered ops' fake impls (the eager
    shortcut sent meta tensors to the CUDA implementation, "Torch not compiled with CUDA",
    and handed fake tensors' null pointers to the kernels); large enough for the CPU
    small-batch kernel path too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, shape = _public_calls("meta")[name]
    out = call()
    assert out.device.type == "meta" and tuple(out.shape) == shape
    from lowrank_ops.sparse import FixedSupport

    support = FixedSupport.random(12, 16, 0.25, generator=torch.Generator().manual_seed(0))  # a real pattern
    with FakeTensorMode(allow_non_fake_inputs=True):
        call, shape = _public_calls("cpu", support)[name]
        assert tuple(call().shape) == shape


def test_base_linear_traces_and_exports():
    """The public base_linear (the CPU small-batch kernel's entry) compiles with fullgraph
    (it called the pybind feature test while tracing) and exports with a dynamic batch
    (no guard on the small-batch row window)."""
    from lowrank_ops.ops.base_linear import base_linear

    W, x = torch.randn(2048, 2048), torch.randn(8, 2048)
    expected = x @ W.T
    assert torch.allclose(torch.compile(base_linear, fullgraph=True)(x, W), expected, rtol=1e-4, atol=1e-3)

    class Module(torch.nn.Module):
        def forward(self, x):
            return base_linear(x, W)

    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(Module(), (x,), dynamic_shapes={"x": {0: batch}})
    for rows in (8, 300):
        rows_x = torch.randn(rows, 2048)
        assert torch.allclose(program.module()(rows_x), rows_x @ W.T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("layer", ["lora", "dora", "sparse_lowrank", "randlora", "multi_lora"])
def test_adapter_layers_export_with_a_dynamic_batch(layer):
    """torch.export's default (non-strict) tracing kept a dynamic batch symbolic only once the
    rows were flattened with reshape(-1, n): x.shape[:-1].numel() specialized it."""
    import lowrank_ops

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    module = {
        "lora": lambda: lowrank_ops.nn.LoRALinear(base, 4, init_lora_weights=False),
        "dora": lambda: lowrank_ops.nn.LoRALinear(base, 4, use_dora=True, init_lora_weights=False),
        "sparse_lowrank": lambda: lowrank_ops.nn.SparseLowRankLinear(16, 12, 4, 0.25, strategy="dense"),
        "randlora": lambda: lowrank_ops.nn.RandLoRALinear(base, 4, seed=1),
        "multi_lora": lambda: lowrank_ops.nn.MultiLoRALinear(base, max_rank=4),
    }[layer]().eval()
    if layer == "multi_lora":
        module.add_adapter("a", 4)
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(module, (torch.randn(5, 16),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(7, 16)
    assert torch.allclose(program.module()(x), module(x), rtol=1e-5, atol=1e-5)


def test_spectral_linear_ignores_autocast():
    """SpectralLinear has no autocast path (half-precision products would return float32
    results 4e-3 off): under torch.autocast it computes in its parameters' precision."""
    import lowrank_ops

    torch.manual_seed(0)
    layer = lowrank_ops.nn.SpectralLinear(256, 256)
    x = torch.randn(8, 256)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, expected)


_FUNC_LAYERS = {
    "lora": lambda base: __import__("lowrank_ops").nn.LoRALinear(base, 4, init_lora_weights=False),
    "dora": lambda base: __import__("lowrank_ops").nn.LoRALinear(base, 4, use_dora=True, init_lora_weights=False),
    "nola": lambda base: __import__("lowrank_ops").nn.NOLALinear(base, 3, 4, 5, seed=1),
    "randlora": lambda base: __import__("lowrank_ops").nn.RandLoRALinear(base, 4, seed=1),
    "sparse_lowrank": lambda base: __import__("lowrank_ops").nn.SparseLowRankLinear(8, 6, 4, 0.25,
                                                                                     dtype=torch.float64),
    "spectral_sampled": lambda base: __import__("lowrank_ops").nn.SpectralLinear(8, 6, sample_rank=3,
                                                                                 dtype=torch.float64),
    "multi_lora": lambda base: __import__("lowrank_ops").nn.MultiLoRALinear(base, max_rank=4),
}


@pytest.mark.parametrize("name", sorted(_FUNC_LAYERS))
def test_adapter_layers_under_torch_func(name):
    """Per-sample gradients with vmap(grad(...)) over functional_call (Opacus-style DP-SGD,
    influence functions): inside torch.func transforms the layers compose torch ops (the
    fused ops' autograd Functions raised "must override the setup_context staticmethod"),
    with the same gradients as the fused path (SpectralLinear's sampled-pair masking
    included)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = _FUNC_LAYERS[name](torch.nn.Linear(8, 6).double())
    if name == "multi_lora":
        layer.add_adapter("a", 4)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), torch.nn.Linear(6, 2).double())
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def loss(p, xi, yi):
        return ((functional_call(model, p, (xi[None],)) - yi[None]) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        model.zero_grad()
        ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).sum().backward()
        for key, value in model.named_parameters():
            if value.requires_grad:
                expected = value.grad if value.grad is not None else torch.zeros_like(value)
                torch.testing.assert_close(per_sample[key][i], expected, rtol=1e-10, atol=1e-12)

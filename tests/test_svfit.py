"""SVFitLinear: train only shifts of the top-r singular values of a frozen linear layer."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lowrank_ops.nn import SVFitLinear

from helpers import (
    assert_compiled_matches_eager, assert_is_base_product, assert_meta_build_loads, assert_within, randn, summation_bound,
    with_spectrum,
)


def make_layer(out_features, in_features, r, base_dtype, generator, device="cpu", **kwargs):
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(randn(out_features, in_features, generator=generator))
        base.bias.copy_(randn(out_features, generator=generator))
    base = base.to(device=device, dtype=base_dtype)
    return SVFitLinear(base, r, generator=generator, **kwargs)


def reference_forward(layer, x, delta):
    """``x W^T + b + ((x V_r) * delta) U_r^T`` in float64 from the layer's (rounded) tensors."""
    weight, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    return x @ weight.T + bias + ((x @ layer.lora_A.double().T) * delta) @ layer.lora_B.double().T


def test_starts_as_base_and_trains_only_r_numbers(generator):
    layer = make_layer(20, 30, 5, torch.float32, generator)
    trainable = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == {"svfit_delta"}
    assert sum(p.numel() for p in trainable.values()) == 5
    assert torch.equal(layer.svfit_delta, torch.zeros(5))
    assert {name for name, _ in layer.named_buffers()} == {"lora_A", "lora_B", "singular_values"}
    assert "svfit_delta" in layer.state_dict() and "lora_A" in layer.state_dict()
    x = randn(7, 30, generator=generator)
    assert_is_base_product(layer(x), x, layer.base_layer, "delta = 0")  # the adapter adds exact zeros
    assert layer.extra_repr() == "r=5, svd='rsvd'"


@pytest.mark.parametrize("svd", ["rsvd", "full"])
def test_delta_acts_on_the_true_top_singular_directions(svd, generator):
    # Distinct, geometrically decaying singular values: the top-4 subspaces are well
    # separated (gap 0.7), so rsvd (oversample 10, 7 power iterations) recovers them to
    # float64 roundoff: (s_14 / s_4)^15 = 0.7^150 ~ 1e-23.
    m, n, r = 40, 32, 4
    s = 0.7 ** torch.arange(32, dtype=torch.float64)
    weight = with_spectrum(m, n, s, generator)
    base = torch.nn.Linear(n, m, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(weight)
    layer = SVFitLinear(base, r, svd=svd, generator=generator)
    torch.testing.assert_close(layer.singular_values, s[:r], rtol=1e-12, atol=0)
    # U_r, V_r orthonormal and spanning the exact top-r subspaces (signs are free).
    U_true, _, Vh_true = torch.linalg.svd(weight, full_matrices=False)
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close((U_true[:, :r].T @ layer.lora_B).abs(), eye, rtol=0, atol=1e-10)
    torch.testing.assert_close((Vh_true[:r] @ layer.lora_A.T).abs(), eye, rtol=0, atol=1e-10)
    # A shift of the singular values: W + U_r diag(delta) V_r^T has singular values
    # s_i + delta_i on the top r and s_i unchanged on the rest.
    delta = torch.tensor([0.5, -0.2, 0.3, 0.1], dtype=torch.float64)
    with torch.no_grad():
        layer.svfit_delta.copy_(delta)
    effective = weight + layer.delta_weight()
    expected = torch.cat([s[:r] + delta, s[r:]]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(effective), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.adapted_singular_values, s[:r] + delta, rtol=1e-12, atol=0)


def test_forward_and_gradients_match_float64_reference(device, generator):
    layer = make_layer(24, 36, 6, torch.float32, generator, device=device)
    assert layer.lora_A.device.type == layer.svfit_delta.device.type == device
    with torch.no_grad():
        layer.svfit_delta.copy_(randn(6, generator=generator))
    x = randn(2, 5, 36, generator=generator, device=device).requires_grad_()
    y = layer(x)
    grad_y = randn(*y.shape, generator=generator, device=device)
    y.backward(grad_y)
    assert layer.base_layer.weight.grad is None and layer.lora_A.grad is None
    x64 = x.detach().double().requires_grad_()
    delta64 = layer.svfit_delta.detach().double().requires_grad_()
    expected = reference_forward(layer, x64, delta64)
    expected.backward(grad_y.double())
    # Bounds from the float64 absolute sums of each result's terms: the base dot product
    # (36 terms), the shrink (36), gate and expand (6), the bias: at most 36 + 6 + 3 chained
    # roundings per entry in float32.
    A, B = layer.lora_A.double(), layer.lora_B.double()
    W, d = layer.base_layer.weight.double(), delta64.detach()
    ax = x64.detach().abs()
    abs_y = ax @ W.abs().T + layer.base_layer.bias.double().abs() + ((ax @ A.abs().T) * d.abs()) @ B.abs().T
    assert_within(y, expected.detach(), summation_bound(abs_y, expected.detach(), 45, torch.float32), "y")
    ag = grad_y.double().abs().reshape(-1, 24)
    abs_dd = ((ag @ B.abs()) * (ax.reshape(-1, 36) @ A.abs().T)).sum(0)
    assert_within(layer.svfit_delta.grad, delta64.grad, summation_bound(abs_dd, delta64.grad, 36 + 24 + 10, torch.float32),
                  "d delta")
    abs_dx = ag @ W.abs() + ((ag @ B.abs()) * d.abs()) @ A.abs()
    assert_within(x.grad.reshape(-1, 36), x64.grad.reshape(-1, 36),
                  summation_bound(abs_dx, x64.grad.reshape(-1, 36), 24 + 6 + 3, torch.float32), "dx")


def test_empty_non_contiguous_inputs_and_state_dict(generator):
    layer = make_layer(12, 16, 3, torch.float32, generator)
    with torch.no_grad():
        layer.svfit_delta.copy_(randn(3, generator=generator))
    empty = torch.zeros(0, 16, requires_grad=True)
    y = layer(empty)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(layer.svfit_delta.grad, torch.zeros(3))
    x = randn(16, 5, generator=generator).T  # non-contiguous [5, 16]
    assert not x.is_contiguous()
    # Against float64 (BLAS may sum a transposed operand in another order than a
    # contiguous one, so not bit-equal): 16-term base and shrink sums, 3-term expand, bias.
    delta = layer.svfit_delta.detach().double()
    expected = reference_forward(layer, x.double(), delta)
    A, B, W = layer.lora_A.double().abs(), layer.lora_B.double().abs(), layer.base_layer.weight.double().abs()
    ax = x.double().abs()
    abs_y = ax @ W.T + layer.base_layer.bias.double().abs() + ((ax @ A.T) * delta.abs()) @ B.T
    assert_within(layer(x), expected, summation_bound(abs_y, expected, 16 + 3 + 3, torch.float32), "x.T")
    # The subspaces travel in the state dict: a layer on a fresh base (another random SVD)
    # loaded from it computes the same function.
    other = SVFitLinear(torch.nn.Linear(16, 12), 3)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_gradcheck(generator):
    layer = make_layer(7, 9, 3, torch.float64, generator, svd="full")
    x = randn(4, 9, dtype=torch.float64, generator=generator).requires_grad_()
    delta = randn(3, dtype=torch.float64, generator=generator).requires_grad_()

    def through_layer(x, delta):
        return functional_call(layer, {"svfit_delta": delta}, (x,))

    assert torch.autograd.gradcheck(through_layer, (x, delta))
    torch.testing.assert_close(through_layer(x, delta), reference_forward(layer, x, delta), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["bf16_buffers", "fp32_buffers"])
def test_bfloat16_base_error_at_most_twice_torch(adapter_dtype, generator):
    layer = make_layer(48, 64, 8, torch.bfloat16, generator, dtype=adapter_dtype)
    ad = layer.lora_A.dtype
    assert layer.svfit_delta.dtype == ad == (adapter_dtype or torch.bfloat16)
    with torch.no_grad():
        layer.svfit_delta.copy_(randn(8, generator=generator).to(ad))
    x = randn(16, 64, dtype=torch.bfloat16, generator=generator)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    delta = layer.svfit_delta.detach()
    expected = reference_forward(layer, x.double(), delta.double())
    # The torch composition (PEFT's order: base output plus the adapter's in its dtype,
    # then one cast back), on the same rounded operands.
    adapter = ((x.to(ad) @ layer.lora_A.T) * delta) @ layer.lora_B.T
    theirs = (torch.nn.functional.linear(x, W, b).to(ad) + adapter).to(torch.bfloat16)
    ours = layer(x)
    assert ours.dtype == torch.bfloat16
    ours_error = (ours.double() - expected).abs().max().item()
    torch_error = (theirs.double() - expected).abs().max().item()
    assert ours_error <= 2 * torch_error, (ours_error, torch_error)


@pytest.mark.parametrize("base_dtype, adapter_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)], ids=str)
def test_torch_compile_fullgraph(base_dtype, adapter_dtype, generator):
    layer = make_layer(16, 24, 5, base_dtype, generator, dtype=adapter_dtype)
    with torch.no_grad():
        layer.svfit_delta.copy_(randn(5, generator=generator))
    x = randn(3, 4, 24, generator=generator, dtype=base_dtype).requires_grad_()
    assert_compiled_matches_eager(layer, [x], generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype, generator):
    layer = make_layer(40, 32, 5, dtype, generator)
    with torch.no_grad():
        layer.svfit_delta.copy_(randn(5, generator=generator).to(dtype))
    x = randn(6, 32, dtype=dtype, generator=generator)
    y = layer(x)
    before = layer.base_layer.weight.detach().clone()
    merged_expected = (before.double() + layer.delta_weight().double())
    layer.merge()
    assert layer.merged
    weight = layer.base_layer.weight
    # One rounding of W + U_r diag(delta) V_r^T (float32 accumulation of 5 terms).
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-22
    torch.testing.assert_close(weight.double(), merged_expected, rtol=unit, atol=unit * merged_expected.abs().max().item())
    # bf16: y rounds the base and the adapter separately, the merged layer once: 2^-7 |y|.
    tol = 2.0**-7 * y.abs().max().item() if dtype == torch.bfloat16 else 1e-5 * y.abs().max().item()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=tol)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_parameters()
    layer.unmerge()
    assert not layer.merged
    # One rounding each way (bf16: 2^-8 |W|, merged and restored) plus, float32, the
    # float32 sums of the 5-term product B diag(delta) A, computed twice.
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    abs_product = ((layer.lora_B.double().abs() * layer.svfit_delta.double().abs()) @ layer.lora_A.double().abs())
    atol = u * (weight.abs().max().item() + before.abs().max().item()) + 2 * 7 * 2.0**-24 * abs_product.max().item()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=atol)
    layer.reset_parameters()
    assert torch.equal(layer.svfit_delta, torch.zeros(5, dtype=dtype))


def test_sgd_fits_a_singular_value_shift(generator):
    layer = make_layer(24, 32, 4, torch.float32, generator, svd="full")
    target_shift = torch.tensor([1.0, -0.5, 0.25, 0.75])
    target_weight = (layer.base_layer.weight.detach().double()
                     + (layer.lora_B.double() * target_shift.double()) @ layer.lora_A.double())
    x = randn(64, 32, generator=generator)
    target = (x.double() @ target_weight.T + layer.base_layer.bias.double()).float()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.2)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = ((layer(x) - target) ** 2).sum(-1).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The loss is a quadratic in delta with Hessian 2 (V_r^T x x^T V_r / N) (U_r^T U_r = I),
    # eigenvalues near 2: lr 0.2 contracts the error by ~0.6 per step.
    assert losses[-1] < 1e-3 * losses[0], losses
    torch.testing.assert_close(layer.svfit_delta.detach(), target_shift, rtol=0, atol=0.02)
    assert layer.base_layer.weight.grad is None



def test_numpy_integer_rank(generator):
    """An np.int64 r was refused ("r must be an int in [1, min(in_features, out_features)]"):
    the same layer as a Python int; a bool stays refused."""
    np = pytest.importorskip("numpy")
    base = torch.nn.Linear(12, 8)
    layer = SVFitLinear(base, np.int64(3), svd="full")
    assert type(layer.r) is int and layer.svfit_delta.shape == (3,)
    assert torch.equal(layer.lora_A, SVFitLinear(base, 3, svd="full").lora_A)
    with pytest.raises(ValueError, match="r must be an int .*; got True"):
        SVFitLinear(base, True)

def test_bad_input_errors(generator):
    base = torch.nn.Linear(30, 20)
    with pytest.raises(ValueError, match=r"SVFitLinear: r must be an int in \[1, min\(in_features, "
                                         r"out_features\)\] = \[1, 20\]; got 21"):
        SVFitLinear(base, 21)
    with pytest.raises(ValueError, match=r"r must be .*; got 0"):
        SVFitLinear(base, 0)
    with pytest.raises(ValueError, match=r"r must be .*; got 2.0"):
        SVFitLinear(base, 2.0)
    with pytest.raises(TypeError, match="SVFitLinear: base_layer must be a torch.nn.Linear; got Conv1d"):
        SVFitLinear(torch.nn.Conv1d(3, 4, 2), 2)
    with pytest.raises(ValueError, match=r"svd must be one of \('rsvd', 'full'\); got 'lanczos'"):
        SVFitLinear(base, 2, svd="lanczos")
    with pytest.raises(TypeError, match=r"dtype is torch.float16; expected the base weight's \(torch.float32\) or float32"):
        SVFitLinear(base, 2, dtype=torch.float16)
    with torch.no_grad():
        base.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="base weight holds 1 non-finite entries"):
        SVFitLinear(base, 2)


@pytest.mark.parametrize("svd", ["rsvd", "full"])
def test_built_on_meta_then_loaded_or_reset(svd):
    """Built on meta the constructor's finiteness check raised ("Tensor.item() cannot be
    called on meta tensors"); now it makes the shapes only: loaded after to_empty() (or
    with assign=True) it is the saved layer, and reset_parameters() after to_empty()
    computes the subspaces from the (initialized) base weight, as the constructor does."""
    torch.manual_seed(0)
    saved = SVFitLinear(torch.nn.Linear(16, 12), 4, svd=svd, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        saved.svfit_delta.normal_()
    x = torch.randn(5, 16)
    assert_meta_build_loads(lambda: SVFitLinear(torch.nn.Linear(16, 12), 4, svd=svd), saved, x)
    with torch.device("meta"):
        layer = SVFitLinear(torch.nn.Linear(16, 12), 4, svd=svd)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.base_layer.load_state_dict(saved.base_layer.state_dict())
    layer.reset_parameters(generator=torch.Generator().manual_seed(2))
    fresh = SVFitLinear(saved.base_layer, 4, svd=svd, generator=torch.Generator().manual_seed(2))
    for name in ("lora_A", "lora_B", "singular_values"):
        assert torch.equal(getattr(layer, name), getattr(fresh, name)), name
    assert torch.equal(layer(x), fresh(x))

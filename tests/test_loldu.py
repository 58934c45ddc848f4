"""LoLDULinear: a frozen pivoted-LDU basis of the weight, only its diagonal and a scale trained."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lowrank_ops.nn import LoLDULinear

from helpers import assert_compiled_matches_eager, assert_within, randn, summation_bound


def make_base(out_features, in_features, dtype, generator):
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(randn(out_features, in_features, generator=generator))
        base.bias.copy_(randn(out_features, generator=generator))
    return base.to(dtype)


def reference_forward(layer, x, diag, scale):
    """``x W_res^T + b + scale ((x U_r^T) * diag) (P L_r)^T`` in float64 from the layer's tensors."""
    weight, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    return x @ weight.T + bias + scale * ((x @ layer.lora_A.double().T) * diag) @ layer.lora_B.double().T


@pytest.mark.parametrize("shape", [(20, 30), (30, 20)], ids=["wide", "tall"])
def test_factors_are_the_truncated_pivoted_ldu(shape, generator):
    base = make_base(*shape, torch.float64, generator)
    W0 = base.weight.detach().clone()
    r = 6
    layer = LoLDULinear(base, r, lora_alpha=3.0)
    # Independent float64 LDU: W0 = P L diag(D) U' with U' = U / D row-wise.
    P, L, U = torch.linalg.lu(W0)
    D = U.diagonal()
    torch.testing.assert_close(layer.lora_B, (P @ L)[:, :r], rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_A, (U / D[:, None])[:r], rtol=1e-15, atol=0)
    torch.testing.assert_close(layer.loldu_diag.detach(), D[:r], rtol=0, atol=0)
    assert layer.loldu_scale.item() == 3.0 / r and layer.loldu_scale.dim() == 0
    # lora_A unit upper trapezoidal; lora_B a row permutation of a unit lower trapezoid.
    assert torch.equal(layer.lora_A[:, :r].tril(-1), torch.zeros(r, r, dtype=torch.float64))
    assert torch.equal(layer.lora_A.diagonal(), torch.ones(r, dtype=torch.float64))
    unpermuted = P.T @ layer.lora_B
    assert torch.equal(unpermuted[:r].triu(1), torch.zeros(r, r, dtype=torch.float64))
    assert torch.equal(unpermuted.diagonal(), torch.ones(r, dtype=torch.float64))
    # The residual plus the adapter is W0: within the float64 rounding of the r-term sums
    # (the residual's and delta_weight's) and of the residual itself.
    effective = base.weight + layer.delta_weight()
    abs_terms = (layer.lora_B.abs() * (layer.loldu_scale * layer.loldu_diag).abs().detach()) @ layer.lora_A.abs()
    assert_within(effective, W0, summation_bound(W0.abs() + 2 * abs_terms, W0, r + 3, torch.float64), "W_res + dW")


def test_full_rank_truncation_leaves_a_zero_residual(generator):
    base = make_base(12, 12, torch.float64, generator)
    W0 = base.weight.detach().clone()
    layer = LoLDULinear(base, 12, lora_alpha=12.0)  # sigma_0 = 1: W_res = W0 - P L D U
    abs_terms = (layer.lora_B.abs() * (layer.loldu_scale * layer.loldu_diag).abs().detach()) @ layer.lora_A.abs()
    # r = min(in, out): P L D U reproduces W0, so the residual is rounding only.
    bound = summation_bound(W0.abs() + abs_terms, torch.zeros_like(W0), 14, torch.float64)
    assert_within(base.weight, torch.zeros_like(W0), bound, "residual at full rank")


def test_starts_as_base_and_trains_r_plus_one_numbers(generator):
    base = make_base(20, 30, torch.float32, generator)
    W0 = base.weight.detach().double().clone()
    layer = LoLDULinear(base, 5)
    trainable = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == {"loldu_diag", "loldu_scale"}
    assert sum(p.numel() for p in trainable.values()) == 6
    assert {name for name, _ in layer.named_buffers()} == {"lora_A", "lora_B"}
    assert layer.extra_repr() == "r=5, lora_alpha=1"
    x = randn(7, 30, generator=generator)
    y = layer(x)
    # Against the original layer in float64: the residual's one rounding (and the float32
    # 5-term product it subtracted) plus the forward's roundings, all bounded through the
    # absolute sums of |W_res|, |sigma B diag(d) A| and |W0|.
    abs_terms = (layer.lora_B.double().abs() * layer._gate().detach().double().abs()) @ layer.lora_A.double().abs()
    abs_weight = W0.abs() + base.weight.double().abs() + 2 * abs_terms
    expected = x.double() @ W0.T + base.bias.double()
    abs_y = x.double().abs() @ abs_weight.T + base.bias.double().abs()
    assert_within(y, expected, summation_bound(abs_y, expected, 30 + 5 + 10, torch.float32), "initial layer")


def test_forward_and_gradients_match_float64_reference(device, generator):
    layer = LoLDULinear(make_base(24, 36, torch.float32, generator).to(device), 6, lora_alpha=2.0)
    assert layer.lora_B.device.type == layer.loldu_scale.device.type == device
    with torch.no_grad():
        layer.loldu_diag.mul_(1.5)
        layer.loldu_scale.fill_(0.7)
    x = randn(2, 5, 36, generator=generator, device=device).requires_grad_()
    y = layer(x)
    grad_y = randn(*y.shape, generator=generator, device=device)
    y.backward(grad_y)
    assert layer.base_layer.weight.grad is None and layer.lora_A.grad is None
    x64 = x.detach().double().requires_grad_()
    d64 = layer.loldu_diag.detach().double().requires_grad_()
    s64 = layer.loldu_scale.detach().double().requires_grad_()
    expected = reference_forward(layer, x64, d64, s64)
    expected.backward(grad_y.double())
    A, B, W = layer.lora_A.double(), layer.lora_B.double(), layer.base_layer.weight.double()
    g = (d64 * s64).detach().abs()
    ax, ag = x64.detach().abs().reshape(-1, 36), grad_y.double().abs().reshape(-1, 24)
    # Chained roundings per entry (float32): base 36 terms, shrink 36, gate 2, expand 6, bias.
    abs_y = ax @ W.abs().T + layer.base_layer.bias.double().abs() + ((ax @ A.abs().T) * g) @ B.abs().T
    assert_within(y.reshape(-1, 24), expected.detach().reshape(-1, 24),
                  summation_bound(abs_y, expected.detach().reshape(-1, 24), 46, torch.float32), "y")
    # d(gate) = sum_n (dy B) * (x A^T): 24 + 36 terms, 10 rows; then the product rule.
    per_rank = ((ag @ B.abs()) * (ax @ A.abs().T)).sum(0)
    bound_dd = summation_bound(per_rank * s64.detach().abs(), d64.grad, 24 + 36 + 10 + 2, torch.float32)
    assert_within(layer.loldu_diag.grad, d64.grad, bound_dd, "d diag")
    bound_ds = summation_bound((per_rank * d64.detach().abs()).sum(), s64.grad, 24 + 36 + 10 + 6 + 2, torch.float32)
    assert_within(layer.loldu_scale.grad, s64.grad, bound_ds, "d scale")
    abs_dx = ag @ W.abs() + ((ag @ B.abs()) * g) @ A.abs()
    assert_within(x.grad.reshape(-1, 36), x64.grad.reshape(-1, 36),
                  summation_bound(abs_dx, x64.grad.reshape(-1, 36), 24 + 6 + 4, torch.float32), "dx")


def test_empty_and_non_contiguous_inputs(generator):
    layer = LoLDULinear(make_base(12, 16, torch.float32, generator), 3)
    y = layer(torch.zeros(0, 16, requires_grad=True))
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(layer.loldu_diag.grad, torch.zeros(3)) and layer.loldu_scale.grad.item() == 0
    x = randn(16, 5, generator=generator).T  # non-contiguous [5, 16]
    assert not x.is_contiguous()
    # Against float64 (BLAS may sum a transposed operand in another order than a
    # contiguous one, so not bit-equal): 16-term base and shrink sums, gate, 3-term expand, bias.
    d, s = layer.loldu_diag.detach().double(), layer.loldu_scale.detach().double()
    expected = reference_forward(layer, x.double(), d, s)
    A, B, W = layer.lora_A.double().abs(), layer.lora_B.double().abs(), layer.base_layer.weight.double().abs()
    ax = x.double().abs()
    abs_y = ax @ W.T + layer.base_layer.bias.double().abs() + ((ax @ A.T) * (d * s).abs()) @ B.T
    assert_within(layer(x), expected, summation_bound(abs_y, expected, 16 + 3 + 4, torch.float32), "x.T")


def test_gradcheck(generator):
    layer = LoLDULinear(make_base(7, 9, torch.float64, generator), 3)
    x = randn(4, 9, dtype=torch.float64, generator=generator).requires_grad_()
    diag = randn(3, dtype=torch.float64, generator=generator).requires_grad_()
    scale = randn((), dtype=torch.float64, generator=generator).requires_grad_()

    def through_layer(x, diag, scale):
        return functional_call(layer, {"loldu_diag": diag, "loldu_scale": scale}, (x,))

    assert torch.autograd.gradcheck(through_layer, (x, diag, scale))
    torch.testing.assert_close(through_layer(x, diag, scale), reference_forward(layer, x, diag, scale),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["bf16_factors", "fp32_factors"])
def test_bfloat16_base(adapter_dtype, generator):
    base = make_base(48, 64, torch.float32, generator)
    W0 = base.weight.detach().double().clone()
    layer = LoLDULinear(base.to(torch.bfloat16), 8, dtype=adapter_dtype)
    ad = layer.lora_A.dtype
    assert layer.loldu_diag.dtype == layer.loldu_scale.dtype == ad == (adapter_dtype or torch.bfloat16)
    x = randn(16, 64, dtype=torch.bfloat16, generator=generator)
    ours = layer(x)
    assert ours.dtype == torch.bfloat16
    # Against the torch composition on the same rounded operands (PEFT's order), at most
    # twice its error from the float64 value of the layer's own tensors.
    gate = layer._gate().detach()
    expected = reference_forward(layer, x.double(), layer.loldu_diag.detach().double(),
                                 layer.loldu_scale.detach().double())
    adapter = ((x.to(ad) @ layer.lora_A.T) * gate) @ layer.lora_B.T
    theirs = (torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias).to(ad)
              + adapter).to(torch.bfloat16)
    ours_error = (ours.double() - expected).abs().max().item()
    torch_error = (theirs.double() - expected).abs().max().item()
    assert ours_error <= 2 * torch_error, (ours_error, torch_error)
    # The starting layer is the bf16 base up to the residual's bf16 rounding (2^-9 |W_res|
    # per entry) and the adapter's bf16 factors: compare the effective weight.
    effective = layer.base_layer.weight.double() + layer.delta_weight().double()
    W0_bf16 = W0.to(torch.bfloat16).double()
    residual_max = layer.base_layer.weight.double().abs().max().item()
    torch.testing.assert_close(effective, W0_bf16, rtol=0, atol=2.0**-8 * residual_max)


@pytest.mark.parametrize("base_dtype, adapter_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)], ids=str)
def test_torch_compile_fullgraph(base_dtype, adapter_dtype, generator):
    layer = LoLDULinear(make_base(16, 24, base_dtype, generator), 5, lora_alpha=3.0, dtype=adapter_dtype)
    with torch.no_grad():  # away from the initial diagonal and scale: every term counts
        layer.loldu_diag.mul_(1 + randn(5, generator=generator).abs().to(layer.loldu_diag.dtype))
        layer.loldu_scale.fill_(0.7)
    x = randn(3, 4, 24, generator=generator, dtype=base_dtype).requires_grad_()
    assert_compiled_matches_eager(layer, [x], generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype, generator):
    layer = LoLDULinear(make_base(40, 32, dtype, generator), 5)
    with torch.no_grad():
        layer.loldu_diag.mul_(1.3)
        layer.loldu_scale.fill_(0.4)
    x = randn(6, 32, dtype=dtype, generator=generator)
    y = layer(x)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    weight = layer.base_layer.weight
    tol = 2.0**-7 * y.abs().max().item() if dtype == torch.bfloat16 else 1e-5 * y.abs().max().item()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=tol)
    layer.unmerge()
    assert not layer.merged
    # One rounding each way plus, float32, the 5-term product computed twice.
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    abs_product = (layer.lora_B.double().abs() * layer._gate().detach().double().abs()) @ layer.lora_A.double().abs()
    atol = u * (weight.abs().max().item() + before.abs().max().item()) + 2 * 8 * 2.0**-24 * abs_product.max().item()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=atol)


def test_sgd_reduces_the_loss(generator):
    layer = LoLDULinear(make_base(24, 32, torch.float32, generator), 4)
    # A target inside the layer's family: the diagonal scaled by 1.5 (sigma, d free to share it).
    with torch.no_grad():
        target_weight = layer.base_layer.weight.double() + 1.5 * layer.delta_weight().double()
    x = randn(64, 32, generator=generator)
    target = (x.double() @ target_weight.T + layer.base_layer.bias.double()).float()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = ((layer(x) - target) ** 2).sum(-1).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    assert layer.base_layer.weight.grad is None and layer.lora_A.grad is None


def test_zero_pivot_keeps_the_base_layer(generator):
    base = make_base(10, 8, torch.float64, generator)
    with torch.no_grad():
        base.weight[:, 0] = 0  # the first column of W0 is zero: the first pivot is 0
    W0 = base.weight.detach().clone()
    layer = LoLDULinear(base, 3)
    assert layer.loldu_diag[0].item() == 0
    assert torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.lora_B).all()
    torch.testing.assert_close(base.weight + layer.delta_weight(), W0, rtol=0, atol=1e-13)



def test_numpy_integer_rank(generator):
    """An np.int64 r was refused ("r must be an int in [1, min(in_features, out_features)]"):
    the same layer as a Python int; a bool stays refused."""
    np = pytest.importorskip("numpy")
    layer = LoLDULinear(make_base(8, 12, torch.float64, generator), np.int64(3))
    twin = LoLDULinear(make_base(8, 12, torch.float64, torch.Generator().manual_seed(0)), 3)
    assert type(layer.r) is int and layer.loldu_diag.shape == (3,)
    assert float(layer.loldu_scale) == float(twin.loldu_scale)
    with pytest.raises(ValueError, match="r must be an int .*; got True"):
        LoLDULinear(make_base(8, 12, torch.float64, generator), True)

def test_bad_input_errors(generator):
    base = torch.nn.Linear(30, 20)
    with pytest.raises(ValueError, match=r"LoLDULinear: r must be an int in \[1, min\(in_features, "
                                         r"out_features\)\] = \[1, 20\]; got 21"):
        LoLDULinear(base, 21)
    with pytest.raises(ValueError, match=r"r must be .*; got -1"):
        LoLDULinear(base, -1)
    with pytest.raises(TypeError, match="LoLDULinear: base_layer must be a torch.nn.Linear; got Embedding"):
        LoLDULinear(torch.nn.Embedding(5, 4), 2)
    with pytest.raises(ValueError, match="lora_alpha must be nonzero"):
        LoLDULinear(base, 2, lora_alpha=0.0)
    with pytest.raises(ValueError, match="lora_alpha must be finite; got inf"):
        LoLDULinear(base, 2, lora_alpha=float("inf"))
    with pytest.raises(TypeError, match=r"dtype is torch.bfloat16; expected the base weight's \(torch.float32\)"):
        LoLDULinear(base, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        base.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="base weight holds 1 non-finite entries"):
        LoLDULinear(base, 2)
    # A failed construction leaves the base weight untouched (the checks come first).
    assert base.weight[0, 0].item() == float("inf") and base.weight.requires_grad


@pytest.mark.parametrize("assign", [False, True])
def test_built_on_meta_then_loaded(assign):
    """Built on meta the constructor's finiteness check raised ("Tensor.item() cannot be
    called on meta tensors"); now it makes the shapes only (no LDU, no residual written)
    and the loaded checkpoint (residual base weight and factors) is the saved layer."""
    torch.manual_seed(0)
    saved = LoLDULinear(torch.nn.Linear(16, 12), 4, lora_alpha=2.0)
    with torch.no_grad():
        saved.loldu_diag.mul_(1.5)
    with torch.device("meta"):
        layer = LoLDULinear(torch.nn.Linear(16, 12), 4, lora_alpha=2.0)
    assert layer(torch.randn(5, 16, device="meta")).shape == (5, 12)
    if not assign:
        layer.to_empty(device="cpu")
    layer.load_state_dict(saved.state_dict(), assign=assign)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), saved(x))

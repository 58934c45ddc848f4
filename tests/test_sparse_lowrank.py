"""Sparse-plus-low-rank linear (SLTrain): the op, both backward strategies, the module,
from_linear, the state dict and model conversion."""
from __future__ import annotations

import io
import math

import pytest
import torch

from lowrank_ops import reference as lowrank_reference
from lowrank_ops.methods import sltrain
from lowrank_ops.nn import SparseLowRankLinear
from lowrank_ops.ops import sparse_lowrank_linear
from lowrank_ops.ops.sparse_lowrank import choose_strategy
from lowrank_ops.sparse import FixedSupport

from helpers import assert_within, check_autocast_against_torch, randn, summation_bound

STRATEGIES = ["sparse", "dense"]


def make_problem(out_features, in_features, rank, density, batch_shape, dtype, device, generator, bias=True):
    support = FixedSupport.random(out_features, in_features, density, generator=generator).to(device)
    tensors = dict(
        x=randn(*batch_shape, in_features, dtype=dtype, device=device, generator=generator),
        lora_A=randn(rank, in_features, dtype=dtype, device=device, generator=generator),
        lora_B=randn(out_features, rank, dtype=dtype, device=device, generator=generator),
        values=randn(support.nnz, dtype=dtype, device=device, generator=generator),
        bias=randn(out_features, dtype=dtype, device=device, generator=generator) if bias else None,
    )
    return support, tensors


reference = lowrank_reference.sparse_lowrank_linear  # float64, through a dense weight


def magnitudes(t, support, scale, grad_y=None):
    """The reference evaluated on absolute values: elementwise sums of |terms| of y
    (and, given ``grad_y``, of every gradient), the scale of the rounding errors.
    Exact because y is multilinear in (x, A, B, values, bias)."""
    inputs = tuple(t[k].detach().abs().double().requires_grad_() for k in ("x", "lora_A", "lora_B", "values", "bias"))
    y = reference(*inputs, support, abs(scale))
    if grad_y is None:
        return y.detach()
    return torch.autograd.grad(y, inputs, grad_y.abs().double())


def n_terms(support, rank, in_features, extra=0):
    """Longest sum behind one output: the sparse row, the two low-rank products, the
    scale, the bias add (and ``extra`` more, e.g. the batch for weight gradients)."""
    row_nnz = int((support.row_ptr[1:] - support.row_ptr[:-1]).max()) if support.nnz else 0
    col_nnz = int((support.col_ptr[1:] - support.col_ptr[:-1]).max()) if support.nnz else 0
    return max(row_nnz, col_nnz) + rank + in_features + support.out_features + 3 + extra


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_and_backward_match_float64_reference(device, strategy, dtype, generator):
    scale = 0.37
    for out_features, in_features, rank, density, batch_shape in [
        (40, 56, 6, 0.1, (9,)), (33, 20, 20, 0.3, (2, 17)), (16, 24, 3, 1.0, (1,)), (24, 16, 4, 0.05, (0,)),
    ]:
        support, t = make_problem(out_features, in_features, rank, density, batch_shape, dtype, device, generator)
        leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
        y = sparse_lowrank_linear(leaves["x"], leaves["lora_A"], leaves["lora_B"], leaves["values"], support,
                                  leaves["bias"], scale=scale, strategy=strategy)
        expected = reference(t["x"], t["lora_A"], t["lora_B"], t["values"], t["bias"], support, scale)
        terms = n_terms(support, rank, in_features)
        bound = summation_bound(magnitudes(t, support, scale), expected, terms, dtype)
        assert_within(y, expected, bound, f"y {batch_shape}")

        grad_y = randn(*y.shape, dtype=dtype, device=device, generator=generator)
        y.backward(grad_y)
        doubles = {k: v.detach().double().requires_grad_() for k, v in t.items()}
        reference(*doubles.values(), support, scale).backward(grad_y.double())
        batch = grad_y.numel() // out_features
        for name, magnitude in zip(t, magnitudes(t, support, scale, grad_y)):
            want = doubles[name].grad
            bound = summation_bound(magnitude, want, n_terms(support, rank, in_features, batch), dtype)
            assert_within(leaves[name].grad, want, bound, f"d{name} {strategy} {batch_shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_half_precision_error_at_most_twice_torch(device, strategy, dtype, generator):
    support, t = make_problem(64, 96, 8, 0.1, (32,), dtype, device, generator)
    scale = 0.5
    expected = reference(t["x"], t["lora_A"], t["lora_B"], t["values"], t["bias"], support, scale)
    ours = sparse_lowrank_linear(t["x"], t["lora_A"], t["lora_B"], t["values"], support, t["bias"], scale=scale,
                                 strategy=strategy)
    weight = scale * t["lora_B"] @ t["lora_A"] + support.to_dense(t["values"])
    theirs = torch.nn.functional.linear(t["x"], weight, t["bias"])
    ours_error = (ours.double() - expected).abs().max()
    torch_error = (theirs.double() - expected).abs().max()
    assert ours_error <= 2 * torch_error, (ours_error.item(), torch_error.item())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autocast_matches_torch_composition(autocast_case, strategy, generator):
    device, dtype = autocast_case
    support, t = make_problem(96, 128, 16, 0.1, (4, 16), torch.float32, device, generator)

    def ours(x, lora_A, lora_B, values, bias):
        return sparse_lowrank_linear(x, lora_A, lora_B, values, support, bias, scale=0.5, strategy=strategy)

    def theirs(x, lora_A, lora_B, values, bias):
        """SLTrain's layer: the dense weight ``scale B A + S``, then F.linear."""
        return torch.nn.functional.linear(x, 0.5 * lora_B @ lora_A + support.to_dense(values), bias)

    check_autocast_against_torch(ours, theirs, t, device, dtype, generator, f"sparse_lowrank_linear {strategy}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck(device, strategy, generator):
    support, t = make_problem(11, 13, 3, 0.3, (5,), torch.float64, device, generator)
    inputs = tuple(t[k].requires_grad_() for k in ("x", "lora_A", "lora_B", "values", "bias"))

    def fn(x, a, b, v, bias):
        return sparse_lowrank_linear(x, a, b, v, support, bias, scale=0.8, strategy=strategy)

    assert torch.autograd.gradcheck(fn, inputs)


def test_strategies_agree_and_auto_follows_the_rule(device, generator):
    support, t = make_problem(48, 40, 5, 0.2, (7,), torch.float64, device, generator)
    outputs = [
        sparse_lowrank_linear(t["x"], t["lora_A"], t["lora_B"], t["values"], support, t["bias"], scale=0.3, strategy=s)
        for s in ("sparse", "dense", "auto")
    ]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-12, atol=1e-12)
    # The measured CPU rule: dense from density 0.2 * (1 + r/N - r/in - r/out).
    sltrain_support = FixedSupport.random(100, 300, 0.03)
    dense_support = FixedSupport.random(100, 300, 0.6)
    assert choose_strategy(sltrain_support, 25, 256, torch.device("cpu")) == "sparse"
    assert choose_strategy(dense_support, 25, 256, torch.device("cpu")) == "dense"
    assert choose_strategy(FixedSupport.random(100, 300, 0.3), 25, 4096, torch.device("cpu")) == "dense"
    assert choose_strategy(FixedSupport.random(100, 300, 0.3), 100, 10, torch.device("cpu")) == "sparse"
    assert choose_strategy(dense_support, 25, 0, torch.device("cpu")) == "sparse"


def test_opcheck_at_sltrain_shapes(device, generator):
    support, t = make_problem(96, 256, 16, 0.03, (20,), torch.float32, device, generator)
    grad_y = randn(20, 96, device=device, generator=generator)
    torch.library.opcheck(
        torch.ops.lowrank_ops.csr_spmm.default, (support.row_ptr, support.col_idx, t["values"], support.row_order, t["x"], 96)
    )
    torch.library.opcheck(
        torch.ops.lowrank_ops.csr_sddmm.default, (support.row_ptr, support.col_idx, support.row_order, grad_y, t["x"])
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torch_compile_fullgraph(device, strategy, generator):
    layer = SparseLowRankLinear(32, 24, 4, 0.2, strategy=strategy, generator=generator).to(device)
    with torch.no_grad():
        layer.lora_B.copy_(randn(*layer.lora_B.shape, generator=generator))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = randn(3, 5, 32, device=device, generator=generator)
    eager = layer(x)
    eager.square().sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    now = compiled(x)
    now.square().sum().backward()
    torch.testing.assert_close(now, eager)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_with_a_dynamic_batch(strict, generator):
    """strategy="auto" compared the density with a threshold in 1 / N: a guard on the batch,
    and export with a dynamic batch failed ("Constraints violated").  A symbolic N (and
    any N under torch.compile) takes the rule's large-N limit: no guard; the program
    matches the layer at every batch size (both strategies compute the same function)."""
    layer = SparseLowRankLinear(64, 48, 4, 0.3, generator=generator)  # a density where the rule depends on N
    with torch.no_grad():
        layer.lora_B.copy_(randn(*layer.lora_B.shape, generator=generator))
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (randn(6, 64, generator=generator),), strict=strict,
                                  dynamic_shapes={"input": {0: batch}}).module()
    for n in (2, 6, 64):
        x = randn(n, 64, generator=generator)
        torch.testing.assert_close(program(x), model(x))

# --------------------------------------------------------------------------- module
def test_module_initialization_follows_sltrain(generator):
    layer = SparseLowRankLinear(400, 300, 16, 0.05, generator=generator)
    bound = 1 / math.sqrt(400)
    assert layer.scale == pytest.approx(8.0 / 16)
    assert torch.equal(layer.lora_B, torch.zeros(300, 16))
    assert layer.lora_A.abs().max() <= bound and layer.values.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert layer.bias.abs().max() <= 1 / math.sqrt(300)
    assert sum(p.numel() for p in layer.parameters()) == 16 * (400 + 300) + layer.support.nnz + 300
    x = torch.randn(5, 400)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


def test_same_generator_same_layer():
    first = SparseLowRankLinear(20, 30, 4, 0.2, generator=torch.Generator().manual_seed(4))
    second = SparseLowRankLinear(20, 30, 4, 0.2, generator=torch.Generator().manual_seed(4))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_from_linear_keeps_the_function(generator):
    linear = torch.nn.Linear(40, 30)
    full = SparseLowRankLinear.from_linear(linear, 30, 0.1, generator=generator)
    torch.testing.assert_close(full.to_dense(), linear.weight.detach(), rtol=0, atol=1e-5)
    # Lower rank: the low-rank part is the best rank-k approximation, S fixes the support.
    partial = SparseLowRankLinear.from_linear(linear, 8, 0.2, scale=0.25, generator=generator)
    weight = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    low_rank = partial.scale * (partial.lora_B.double() @ partial.lora_A.double())
    torch.testing.assert_close(low_rank, best, rtol=0, atol=1e-5)
    residual = (weight - partial.to_dense().double()).abs()
    on_support = partial.support.values_from_dense(residual)
    assert on_support.max() <= 1e-5
    assert residual.sum() < (weight - best).abs().sum()


def test_state_dict_round_trip_restores_support_and_config(generator):
    source = SparseLowRankLinear(24, 18, 3, 0.25, scale=0.7, strategy="dense", generator=generator)
    target = SparseLowRankLinear(24, 18, 3, 0.25, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(source.support.col_idx, target.support.col_idx)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    assert torch.equal(source.support.col_idx, target.support.col_idx)
    assert target.scale == 0.7 and target.strategy == "dense"
    x = torch.randn(4, 24)
    torch.testing.assert_close(target(x), source(x))


def test_meta_build_then_reset_parameters_draws_the_support():
    # to_empty() left the support's index buffers uninitialized: the forward ran on garbage.
    with torch.device("meta"):
        layer = SparseLowRankLinear(24, 18, 3, 0.25, generator=torch.Generator().manual_seed(3))
    assert layer.support.device.type == "meta"
    assert layer(torch.randn(4, 24, device="meta")).shape == (4, 18)  # shape inference still works
    layer.to_empty(device="cpu")
    x = torch.randn(4, 24)
    for strategy in ("sparse", "dense"):
        layer.strategy = strategy
        with pytest.raises(ValueError, match="support holds no sparsity pattern .*reset_parameters"):
            layer(x)
    with pytest.raises(ValueError, match="holds no sparsity pattern"):
        layer.to_dense()
    layer.reset_parameters(torch.Generator().manual_seed(3))
    # The same generator gives the layer the constructor builds off meta.
    built = SparseLowRankLinear(24, 18, 3, 0.25, generator=torch.Generator().manual_seed(3))
    for (name, a), (_, b) in zip(built.state_dict().items(), layer.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    layer.strategy = built.strategy = "sparse"
    torch.testing.assert_close(layer(x), built(x))


@pytest.mark.parametrize("assign", [False, True])
def test_meta_build_then_load_state_dict(assign, generator):
    source = SparseLowRankLinear(24, 18, 3, 0.25, generator=generator)
    with torch.device("meta"):
        layer = SparseLowRankLinear(24, 18, 3, 0.25)
    if not assign:
        layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict(), assign=assign)
    assert layer.support.device.type == "cpu"
    assert torch.equal(layer.support.col_idx, source.support.col_idx)
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), source(x))
    layer.reset_parameters()  # a loaded support is kept
    assert torch.equal(layer.support.col_idx, source.support.col_idx)


def test_convert_replaces_targets_and_reports_parameters(generator):
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    before = sum(p.numel() for p in model.parameters())
    report = sltrain.convert(model, 16, 0.03, target_modules=["0"], generator=generator)
    assert report.replaced == ["0"] and isinstance(model[0], SparseLowRankLinear)
    assert isinstance(model[2], torch.nn.Linear) and not isinstance(model[2], SparseLowRankLinear)
    assert report.parameters_before == before
    assert report.parameters_after == sum(p.numel() for p in model.parameters()) < before
    assert "replaced 1 linear layer" in str(report)
    every = sltrain.convert(model, 0.25, 0.03, init="svd", generator=generator)
    assert every.replaced == ["2"] and model[2].rank == 16
    assert model(torch.randn(2, 64)).shape == (2, 64)


def test_convert_refuses_a_bare_linear():
    # A model that is itself the nn.Linear has no parent to put the new layer in: convert
    # used to report it as replaced while the caller kept computing with the original.
    with pytest.raises(TypeError, match=r"convert: model is itself an nn.Linear, which cannot be replaced in place"):
        sltrain.convert(torch.nn.Linear(32, 16), 4, 0.05)


def test_convert_svd_init_preserves_outputs(generator):
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24))
    x = torch.randn(10, 32)
    before = model(x)
    sltrain.convert(model, 24, 0.05, target_modules="2", init="svd", generator=generator)
    sltrain.convert(model, 32, 0.05, target_modules="0", init="svd", generator=generator)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_convert_keeps_shared_layers_shared_and_skips_linear_subclasses(generator):
    """A layer registered under two names was converted under the first only (the tie
    broken: one name kept the plain Linear); MultiheadAttention's out_proj (an nn.Linear
    subclass its parent reads through .weight) was replaced, and the forward then failed."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            shared = torch.nn.Linear(8, 8)
            self.a, self.b = shared, shared

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    tied = Tied()
    report = sltrain.convert(tied, 2, 0.5, generator=generator)
    assert report.replaced == ["a", "b"] and isinstance(tied.a, SparseLowRankLinear) and tied.a is tied.b
    attention = torch.nn.MultiheadAttention(8, 2)
    model = torch.nn.ModuleDict({"attn": attention, "head": torch.nn.Linear(8, 4)})
    assert sltrain.convert(model, 2, 0.5, generator=generator).replaced == ["head"]
    x = torch.randn(3, 1, 8)
    assert attention(x, x, x)[0].shape == (3, 1, 8)


def test_svd_split_needs_a_positive_scale(generator):
    # scale <= 0 (or alpha <= 0 with init="svd") took square roots of s / scale: NaN or inf
    # parameters and outputs, no error.
    linear = torch.nn.Linear(16, 12)
    for scale in (-1.0, 0.0):
        with pytest.raises(ValueError, match=rf"from_linear: scale must be > 0 .*got {scale}"):
            SparseLowRankLinear.from_linear(linear, rank=4, density=0.2, scale=scale)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    with pytest.raises(ValueError, match=r"convert: init='svd' needs alpha > 0 .*got alpha=-8.0"):
        sltrain.convert(model, 4, 0.2, init="svd", alpha=-8.0)
    assert type(model[0]) is torch.nn.Linear


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors(generator):
    support, t = make_problem(10, 12, 3, 0.3, (4,), torch.float32, "cpu", generator)
    x, a, b, v, bias = t["x"], t["lora_A"], t["lora_B"], t["values"], t["bias"]
    with pytest.raises(ValueError, match=r"lora_A has shape \(3, 11\); expected \(r, in_features\) = \(r, 12\)"):
        sparse_lowrank_linear(x, a[:, :11], b, v, support)
    with pytest.raises(ValueError, match=r"lora_B has shape \(10, 2\); expected \(out_features, r\) = \(10, 3\)"):
        sparse_lowrank_linear(x, a, b[:, :2], v, support)
    with pytest.raises(ValueError, match=r"bias has shape \(9,\); expected \(out_features,\) = \(10,\)"):
        sparse_lowrank_linear(x, a, b, v, support, bias[:9])
    with pytest.raises(TypeError, match="lora_B has dtype torch.float64; expected the dtype of x"):
        sparse_lowrank_linear(x, a, b.double(), v, support)
    with pytest.raises(ValueError, match="lora_A is on meta"):
        sparse_lowrank_linear(x, a.to("meta"), b, v, support)
    with pytest.raises(ValueError, match=r"values has shape"):
        sparse_lowrank_linear(x, a, b, v[:-1], support)
    with pytest.raises(ValueError, match="strategy must be one of"):
        sparse_lowrank_linear(x, a, b, v, support, strategy="fast")
    with pytest.raises(ValueError, match="scale must be finite; got inf"):
        sparse_lowrank_linear(x, a, b, v, support, scale=math.inf)
    with pytest.raises(TypeError, match="SparseLowRankLinear: rank must be an integer; got 2.5"):
        SparseLowRankLinear(8, 20, 2.5, 0.1)
    with pytest.raises(TypeError, match="convert: model must be a torch.nn.Module; got int"):
        sltrain.convert(5, 2, 0.5)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in_features, out_features\)\] = \[1, 8\]; got 9"):
        SparseLowRankLinear(8, 20, 9, 0.1)
    with pytest.raises(ValueError, match=r"rank must be in \[1, .*got 0"):
        SparseLowRankLinear(8, 20, 0, 0.1)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]; got 0.0"):
        SparseLowRankLinear(8, 20, 2, 0.0)
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        sltrain.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2, 0.5, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"rank for layer '0' must be in \[1, 4\]"):
        sltrain.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), 7, 0.5)


def test_failed_load_leaves_the_layer_usable():
    """A checkpoint of another density fails on ``values`` (torch reports it after loading the
    rest): the support was replaced all the same (48 positions, 120 values) and every later
    forward raised.  The layer is left as it was."""
    source = SparseLowRankLinear(20, 12, 3, 0.2, generator=torch.Generator().manual_seed(1))
    target = SparseLowRankLinear(20, 12, 3, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(4, 20)
    with pytest.raises(RuntimeError, match="size mismatch for values"):
        target.load_state_dict(source.state_dict())
    assert target.support.nnz == target.values.numel() == 120
    assert torch.isfinite(target(x)).all()
    wider = SparseLowRankLinear(20, 12, 5, 0.5, generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match="size mismatch for lora_A"):
        target.load_state_dict(wider.state_dict())
    assert target.rank == 3
    target(x)
    target.load_state_dict(SparseLowRankLinear(20, 12, 3, 0.5, generator=torch.Generator().manual_seed(5)).state_dict())

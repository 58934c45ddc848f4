"""nn.SpectralLinear and methods.sst: Sparse Spectral Training (W = U diag(s) Vh, all s and a
sampled subset of singular vector pairs trained, periodic re-SVD)."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import (assert_backward_ignores_autocast, assert_compiled_matches_eager, assert_training_compiles, randn,
                     with_spectrum)
from lowrank_ops.methods import sst
from lowrank_ops.nn import SpectralLinear
from lowrank_ops.nn.spectral import spectral_linear

# float64 tolerance of the factored forward/backward against the composed float64 reference:
# both are sums of <= 64 products of O(1) numbers, ~64 eps = 1.4e-14 apart; 1e-12 leaves 70x.
# The same bound holds for CUDA's float64 GEMMs and SVDs.  Device tests build their inputs
# on the CPU (cross_device_generator: the same numbers for every device), move them, and
# compare with references computed on the CPU.  float32 tolerances on CUDA assume full
# float32 GEMMs: TF32 is used only when torch.backends.cuda.matmul.allow_tf32 is on (off
# by default).
TOL64 = 1e-12


def reference(x, U, s, Vh, bias, index):
    """The torch composition with autograd, U / Vh gradients masked to ``index`` afterwards."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, U, s, Vh, bias)]
    x_, U_, s_, Vh_, b_ = leaves
    y = ((x_ @ Vh_.T) * s_) @ U_.T + b_
    return y, leaves


@pytest.mark.parametrize("sampled", [None, [1, 4, 5]])
@pytest.mark.parametrize("x_shape", [(7, 10), (2, 3, 10), (0, 10)])
def test_spectral_linear_matches_reference(sampled, x_shape, device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    out_features, K, in_features = 9, 6, 10
    U = randn(out_features, K, generator=generator, dtype=torch.float64)
    s = randn(K, generator=generator, dtype=torch.float64)
    Vh = randn(K, in_features, generator=generator, dtype=torch.float64)
    bias = randn(out_features, generator=generator, dtype=torch.float64)
    x = randn(*x_shape, generator=generator, dtype=torch.float64)
    index = None if sampled is None else torch.tensor(sampled)
    y_ref, ref_leaves = reference(x, U, s, Vh, bias, index)
    g = randn(*y_ref.shape, generator=generator, dtype=torch.float64)
    y_ref.backward(g)
    leaves = [t.to(device, copy=True).requires_grad_() for t in (x, U, s, Vh, bias)]
    y = spectral_linear(*leaves, index=None if index is None else index.to(device))
    y.backward(g.to(device))
    assert y.device.type == device
    grads = [leaf.grad.cpu() for leaf in leaves]
    torch.testing.assert_close(y.detach().cpu(), y_ref, rtol=0, atol=TOL64)
    mask_U = torch.zeros(1, K, dtype=torch.float64)
    mask_U[:, index if index is not None else slice(None)] = 1
    expected = [ref_leaves[0].grad, ref_leaves[1].grad * mask_U, ref_leaves[2].grad,
                ref_leaves[3].grad * mask_U.T, ref_leaves[4].grad]
    for name, grad, want in zip(("x", "U", "s", "Vh", "bias"), grads, expected):
        torch.testing.assert_close(grad, want, rtol=0, atol=TOL64, msg=name)
    if index is not None:  # unsampled vectors get exactly zero, not a tiny number
        unsampled = [i for i in range(K) if i not in sampled]
        assert torch.all(leaves[1].grad[:, unsampled] == 0) and torch.all(leaves[3].grad[unsampled] == 0)


def test_spectral_linear_noncontiguous_and_gradcheck(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    U = randn(5, 4, generator=generator, dtype=torch.float64)
    s = randn(4, generator=generator, dtype=torch.float64)
    Vh = randn(4, 6, generator=generator, dtype=torch.float64)
    bias = randn(5, generator=generator, dtype=torch.float64)
    x = randn(6, 3, generator=generator, dtype=torch.float64).T  # non-contiguous [3, 6]
    expected = ((x @ Vh.T) * s) @ U.T + bias
    U, s, Vh, bias, x = (t.to(device) for t in (U, s, Vh, bias, x))
    assert not x.is_contiguous()
    y = spectral_linear(x, U.T.contiguous().T, s, Vh, bias)
    torch.testing.assert_close(y.cpu(), expected, rtol=0, atol=TOL64)
    leaves = [t.clone().requires_grad_() for t in (x, U, s, Vh, bias)]
    assert torch.autograd.gradcheck(lambda *a: spectral_linear(*a), leaves)
    # With a sample, x, s and the bias get their exact gradients.
    index = torch.tensor([0, 2], device=device)
    frozen_U, frozen_Vh = U.clone(), Vh.clone()
    assert torch.autograd.gradcheck(lambda x_, s_, b_: spectral_linear(x_, frozen_U, s_, frozen_Vh, b_, index),
                                    (leaves[0], leaves[2], leaves[4]))


def test_spectral_linear_errors():
    U, s, Vh = torch.randn(5, 4), torch.randn(4), torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"x has shape \(3, 7\); expected \(..., in_features\) = \(..., 6\)"):
        spectral_linear(torch.randn(3, 7), U, s, Vh)
    with pytest.raises(ValueError, match=r"x has shape \(\); expected"):  # IndexError before
        spectral_linear(torch.tensor(1.0), U, s, Vh)
    with pytest.raises(ValueError, match=r"U has shape \(5, 3\)"):
        spectral_linear(torch.randn(3, 6), torch.randn(5, 3), s, Vh)
    with pytest.raises(TypeError, match="x has dtype torch.float64; expected the parameters' dtype torch.float32"):
        spectral_linear(torch.randn(3, 6, dtype=torch.float64), U, s, Vh)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_from_linear_full_rank_is_the_same_layer(shape, device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    in_features, out_features = shape
    linear = torch.nn.Linear(in_features, out_features, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(randn(out_features, in_features, generator=generator, dtype=torch.float64))
        linear.bias.copy_(randn(out_features, generator=generator, dtype=torch.float64))
    x = randn(4, in_features, generator=generator, dtype=torch.float64)
    expected = linear(x).detach()
    layer = SpectralLinear.from_linear(linear.to(device), generator=generator)
    assert layer.rank == layer.sample_rank == min(shape)
    assert all(t.device.type == device for t in (layer.U, layer.s, layer.Vh, layer.bias, layer.sampled))
    torch.testing.assert_close(layer(x.to(device)).cpu(), expected, rtol=0, atol=TOL64)
    U = layer.U.detach().cpu()
    torch.testing.assert_close(U.T @ U, torch.eye(layer.rank, dtype=torch.float64), rtol=0, atol=TOL64)
    assert torch.all(layer.s[:-1] >= layer.s[1:])


def test_from_linear_truncates_and_float32(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    W = with_spectrum(10, 8, s, generator)
    linear = torch.nn.Linear(8, 10)
    with torch.no_grad():
        linear.weight.copy_(W)
    U, S, Vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    layer = SpectralLinear.from_linear(linear.to(device), rank=3, sample_rank=2, generator=generator)
    assert layer.U.dtype == torch.float32 and layer.sampled.shape == (2,) and layer.sampled.device.type == device
    # float32 SVD of a matrix with gap 1 at k = 3 and ||W|| = 4: ~4 * 16 eps32 ~ 4e-6; 1e-5 margin 2.5x
    # (a full float32 product on CUDA: TF32 is off by default).
    torch.testing.assert_close(layer.dense_weight().double().cpu(), (U[:, :3] * S[:3]) @ Vh[:3], rtol=0, atol=1e-5)


def test_from_linear_errors():
    linear = torch.nn.Linear(8, 10)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in_features, out_features\)\] = \[1, 8\]; got 9"):
        SpectralLinear.from_linear(linear, rank=9)
    with pytest.raises(ValueError, match=r"sample_rank must be in \[1, rank\] = \[1, 3\]; got 4"):
        SpectralLinear.from_linear(linear, rank=3, sample_rank=4)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SpectralLinear.from_linear(torch.nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constructor_deterministic(device, dtype):
    a = SpectralLinear(16, 12, sample_rank=4, generator=torch.Generator().manual_seed(5), device=device, dtype=dtype)
    b = SpectralLinear(16, 12, sample_rank=4, generator=torch.Generator().manual_seed(5), device=device, dtype=dtype)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert p.device.type == device and torch.equal(p, q)
    bound = 1 / 16**0.5
    assert a.dense_weight().abs().max().item() <= bound * (1 + 1e-5) and a.bias.abs().max().item() <= bound
    # A CPU generator draws the weight on the CPU: every device builds the same layer to the
    # SVDs' rounding (each backward stable: U diag(s) Vh within ~16 eps ||W||_2 of W, and
    # ||W||_2 <= ||W||_F <= sqrt(12 * 16) / 4 < 3.5, so the two layers are within ~112 eps;
    # 1e3 eps leaves 9x) and, from the same s, draws the same first sample (float64: a
    # near-tie that rounding could flip has probability ~1e-13 here).
    cpu = SpectralLinear(16, 12, sample_rank=4, generator=torch.Generator().manual_seed(5), dtype=dtype)
    tol = 1e3 * torch.finfo(dtype).eps
    torch.testing.assert_close(a.dense_weight().detach().cpu(), cpu.dense_weight().detach(), rtol=0, atol=tol)
    torch.testing.assert_close(a.bias.detach().cpu(), cpu.bias.detach(), rtol=0, atol=0)
    if dtype == torch.float64:
        assert torch.equal(a.sampled.cpu(), cpu.sampled)


def test_constructor_errors():
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64; got torch.float16"):
        SpectralLinear(4, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="in_features must be an integer >= 1; got 0"):
        SpectralLinear(0, 4)


def test_resample_is_proportional_to_singular_values(device):
    layer = SpectralLinear(8, 8, sample_rank=1, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                           device=device)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([4.0, -2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    generator = torch.Generator().manual_seed(1)  # a CPU generator, also for CUDA parameters
    draws = 4000
    counts = torch.zeros(8)
    for _ in range(draws):
        sample = layer.resample_(generator)
        assert sample.device == layer.s.device
        counts[sample.cpu()] += 1
    p = torch.tensor([0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0])
    sigma = (draws * p * (1 - p)).sqrt()
    # Binomial counts: 5 standard deviations (a false failure about once in 1.7 million runs).
    assert torch.all((counts - draws * p).abs() <= 5 * sigma + 1e-9), counts
    # Without replacement, sorted, deterministic with the generator (a CPU one and one of
    # the parameters' device).
    layer.sample_rank = 3
    for generator_device in ("cpu", device):
        first = layer.resample_(torch.Generator(device=generator_device).manual_seed(7)).clone()
        assert torch.equal(first, layer.resample_(torch.Generator(device=generator_device).manual_seed(7)))
        assert first.unique().numel() == 3 and torch.equal(first, first.sort().values)
        assert set(first.tolist()) <= {0, 1, 2, 3}  # zero singular values are never drawn while others are left
    # All zero: uniform over every pair.
    with torch.no_grad():
        layer.s.zero_()
    assert layer.resample_(torch.Generator().manual_seed(8)).unique().numel() == 3
    with torch.no_grad():
        layer.s[0] = float("nan")
    with pytest.raises(ValueError, match="resample_: the singular values s hold NaN or infinite values"):
        layer.resample_()


def test_resvd_keeps_the_weight_and_reorthogonalizes(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    layer = SpectralLinear(10, 14, generator=generator, dtype=torch.float64, device=device)
    with torch.no_grad():
        layer.U.add_(0.1 * randn(*layer.U.shape, generator=generator, dtype=torch.float64, device=device))
        layer.s.neg_()
    W = layer.dense_weight().detach().clone()
    layer.resvd_()
    torch.testing.assert_close(layer.dense_weight(), W, rtol=0, atol=TOL64)
    eye = torch.eye(10, dtype=torch.float64, device=device)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, rtol=0, atol=TOL64)
    torch.testing.assert_close(layer.Vh @ layer.Vh.T, eye, rtol=0, atol=TOL64)
    assert torch.all(layer.s >= 0) and torch.all(layer.s[:-1] >= layer.s[1:])


@pytest.mark.parametrize("cast", [torch.nn.Module.half, torch.nn.Module.bfloat16])
def test_half_cast_keeps_float32_parameters(cast):
    """model.half() keeps SpectralLinear's parameters float32 (its contract: no half
    parameters): they became half, the forward accepted them and the first resvd_ (an
    SSTScheduler's periodic re-SVD) raised torch's "not implemented for 'Half'"."""
    layer = SpectralLinear(8, 6, sample_rank=2, generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    model = cast(torch.nn.Sequential(layer, torch.nn.Linear(6, 3)))
    assert model[1].weight.dtype != torch.float32
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(model[1].weight.dtype)
    model(x).float().sum().backward()
    assert layer.U.grad.dtype == torch.float32
    weight = layer.dense_weight().detach()
    layer.resvd_()
    torch.testing.assert_close(layer.dense_weight(), weight)
    assert layer.double().U.dtype == torch.float64  # other casts as nn.Module's


def test_sgd_step_moves_only_sampled_vectors(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    layer = SpectralLinear(12, 10, sample_rank=3, generator=generator, dtype=torch.float64, device=device)
    U0, Vh0, s0 = layer.U.detach().clone(), layer.Vh.detach().clone(), layer.s.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(randn(5, 12, generator=generator, dtype=torch.float64, device=device)).square().sum().backward()
    optimizer.step()
    moved_U = (layer.U != U0).any(0).nonzero().flatten()
    moved_Vh = (layer.Vh != Vh0).any(1).nonzero().flatten()
    assert torch.equal(moved_U, layer.sampled) and torch.equal(moved_Vh, layer.sampled)
    assert torch.all(layer.s != s0)  # every singular value is trained


def test_convert_and_scheduler(generator):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False)).double()
    x = randn(6, 8, generator=generator, dtype=torch.float64)
    expected = model(x)
    layers = sst.convert(model, sample_rank=0.5, generator=generator)
    assert list(layers) == ["0", "2"] and isinstance(model[0], SpectralLinear)
    assert [layer.sample_rank for layer in layers.values()] == [4, 2]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=TOL64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = sst.SSTScheduler(model, resvd_every=2, optimizer=optimizer, generator=generator)
    model(x).sum().backward()
    optimizer.step()
    assert scheduler.step() is False and model[0].U in optimizer.state
    assert scheduler.step() is True and model[0].U not in optimizer.state  # states of the old basis dropped
    with pytest.raises(ValueError, match="model holds no SpectralLinear layer"):
        sst.SSTScheduler(torch.nn.Sequential(torch.nn.Linear(2, 2)), resvd_every=1)
    with pytest.raises(ValueError, match="resvd_every must be an integer >= 1; got 0"):
        sst.SSTScheduler(model, resvd_every=0)
    with pytest.raises(ValueError, match=r"sample_rank must be an int >= 1 or a fraction in \(0, 1\]; got 1.5"):
        sst.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), sample_rank=1.5)
    with pytest.raises(ValueError, match=r"no nn.Linear module matches target_modules=\['q'\]"):
        sst.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), target_modules="q")


def test_sst_trains_a_regression_to_low_loss(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    # A full-rank linear target; SST updates 4 of 16 vector pairs per step (all 16 values)
    # and still fits it: the sampling visits every direction over time.
    n = 16
    target = randn(n, n, generator=generator) / n**0.5
    x = randn(512, n, generator=generator)
    y = x @ target.T
    x, y = x.to(device), y.to(device)
    model = torch.nn.Sequential(SpectralLinear(n, n, sample_rank=4, bias=False, generator=generator, device=device))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    steps = 600
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    scheduler = sst.SSTScheduler(model, resvd_every=25, optimizer=optimizer, generator=generator)
    start = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        decay.step()
    final = torch.nn.functional.mse_loss(model(x), y).item()
    assert final < 1e-3 * start, (start, final)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x))


def test_scheduler_resume_draws_the_uninterrupted_samples():
    """SSTScheduler.state_dict held only the step count: a run resumed from a checkpoint drew
    other samples than the uninterrupted one (U 0.68 off after 4 more steps).  It now holds
    the generator's state, and a wrong state is refused before anything changes."""
    def build():
        generator = torch.Generator().manual_seed(5)
        model = torch.nn.Sequential(SpectralLinear(10, 8, sample_rank=3, generator=generator))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, optimizer, sst.SSTScheduler(model, resvd_every=3, optimizer=optimizer, generator=generator)

    def train(model, optimizer, scheduler, steps):
        data = torch.Generator().manual_seed(6 + scheduler.steps)
        for _ in range(steps):
            x, y = randn(16, 10, generator=data), randn(16, 8, generator=data)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 4)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    train(model, optimizer, scheduler, 4)
    resumed, resumed_optimizer, resumed_scheduler = build()
    resumed.load_state_dict(checkpoint[0])
    resumed_optimizer.load_state_dict(checkpoint[1])
    resumed_scheduler.load_state_dict(checkpoint[2])
    train(resumed, resumed_optimizer, resumed_scheduler, 4)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    for bad, error, message in (({}, ValueError, r"state lacks \['steps'\]"), ([], TypeError, "state must be a dict"),
                                ({"steps": 1, "generator_state": 3}, TypeError, r"state\['generator_state'\] must be")):
        with pytest.raises(error, match="SSTScheduler.load_state_dict: " + message):
            resumed_scheduler.load_state_dict(bad)
    assert resumed_scheduler.steps == 8


@pytest.mark.parametrize("sample_rank", [3, None], ids=["sampled", "all"])
def test_torch_compile_fullgraph(sample_rank, generator):
    # The sampled path's backward scatters into zero gradients (index a graph input).
    layer = SpectralLinear(12, 10, sample_rank=sample_rank, generator=generator)
    assert_compiled_matches_eager(layer, [randn(4, 3, 12, generator=generator).requires_grad_()], generator)


def test_torch_compile_training_with_scheduler():
    # The scheduler replaces the `sampled` buffer every step and rewrites U, s, Vh in place at
    # each re-SVD (every 2 steps): the compiled model must train exactly as the eager one.
    def run(wrap):
        generator = torch.Generator().manual_seed(7)
        model = torch.nn.Sequential(SpectralLinear(10, 8, sample_rank=3, generator=generator), torch.nn.Tanh(),
                                    SpectralLinear(8, 6, rank=5, sample_rank=2, generator=generator))
        x, y = randn(16, 10, generator=generator), randn(16, 6, generator=generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        scheduler = sst.SSTScheduler(model, resvd_every=2, optimizer=optimizer, generator=generator)
        forward, losses = wrap(model), []
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses.append(loss.detach())
        return {"losses": torch.stack(losses), **{name: p.detach().clone() for name, p in model.named_parameters()},
                "sampled": torch.cat([model[0].sampled, model[2].sampled])}
    assert_training_compiles(run)


@pytest.mark.parametrize("sample_rank", [None, 3])
def test_built_on_meta_then_reset_or_loaded(sample_rank):
    """Built under torch.device("meta") the constructor read values (the finiteness check of
    the first sample: "Tensor.item() cannot be called on meta tensors").  Now it makes the
    shapes only; after to_empty(), reset_parameters(generator) is the constructor's init
    and load_state_dict the saved layer."""
    built = SpectralLinear(12, 10, 6, sample_rank, generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        layer = SpectralLinear(12, 10, 6, sample_rank, generator=torch.Generator().manual_seed(1))
    assert layer(torch.randn(3, 12, device="meta")).shape == (3, 10)
    layer.to_empty(device="cpu")
    layer.reset_parameters(torch.Generator().manual_seed(1))
    for (name, a), (_, b) in zip(built.state_dict().items(), layer.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.device("meta"):
        loaded = SpectralLinear(12, 10, 6, sample_rank)
    loaded.to_empty(device="cpu")
    loaded.load_state_dict(built.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(loaded(x), built(x))


@pytest.mark.parametrize("sample_rank", [4, 8])
def test_backward_inside_autocast(sample_rank):
    """The fused backward ran its products under the caller's autocast region: bfloat16
    gradients (4e-3 relative, where the forward is float32) with every rank sampled, and a
    dtype mismatch in index_put (RuntimeError) with a subset.  Now as outside the region."""
    layer = SpectralLinear(16, 12, rank=8, sample_rank=sample_rank, generator=torch.Generator().manual_seed(5))
    x = torch.randn(6, 16, requires_grad=True)
    def forward(x, U, s, Vh):
        torch.manual_seed(0)  # the same sampled ranks in both passes
        return layer(x)
    assert_backward_ignores_autocast(forward, [x, layer.U, layer.s, layer.Vh])

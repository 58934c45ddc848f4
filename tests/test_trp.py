"""methods.trp: Trained Rank Pruning (nuclear-norm subgradient, energy truncation, scheduler).

Weights are built with prescribed spectra (helpers.with_spectrum), so the subgradient
``U V^T``, the smallest rank keeping an energy and the truncated weight are known exactly
(float64 references from torch.linalg.svd).
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_compiled_matches_eager, assert_training_compiles, randn, with_spectrum
from lowrank_ops.methods import trp
from lowrank_ops.methods.lowrank_compress import CompressionReport

# float64 tolerance of U V^T and of a truncated weight: a backward-stable SVD perturbs the
# singular subspaces by about eps ||W|| / gap (Wedin); the planted spectra below keep
# ||W|| / gap <= 1e3, so 1e-10 is ~1e3 times the expected error and far below any real
# mistake (a wrong sign or column is O(1)).  The same holds for cuSOLVER's SVDs on CUDA.
# Device tests build their inputs on the CPU from the seeded generator and move them, so
# both devices see the same numbers; the float64 references are computed on the CPU.
# float32 tolerances on CUDA assume full float32 GEMMs: TF32 is only used when
# torch.backends.cuda.matmul.allow_tf32 is on, which is off by default (TF32's 10-bit
# mantissa would need ~1e3 times looser bounds).
TOL64 = 1e-10


def device_generator(device: str, seed: int) -> torch.Generator:
    """rsvd's random source must be a generator of the weights' device."""
    return torch.Generator(device=device).manual_seed(seed)


def reference_polar(W: torch.Tensor, k=None) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    k = S.numel() if k is None else k
    return U[:, :k] @ Vh[:k]


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest k with sum_{i<=k} s_i^2 >= energy * sum s_i^2 (float64)."""
    captured = s.double().square().cumsum(0)
    return int((captured < energy * captured[-1]).sum()) + 1


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
def test_nuclear_subgradient_matches_reference_and_autograd(shape, device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    m, n = shape
    s = torch.linspace(2.0, 1.0, min(m, n), dtype=torch.float64)  # distinct, well separated from 0
    W = with_spectrum(m, n, s, generator)
    G, norm = trp.nuclear_subgradient(W.to(device))
    assert G.dtype == torch.float64 and G.shape == (m, n) and G.device.type == norm.device.type == device
    G, norm = G.cpu(), norm.cpu()
    torch.testing.assert_close(G, reference_polar(W), rtol=0, atol=TOL64)
    torch.testing.assert_close(norm, s.sum(), rtol=1e-13, atol=0)
    # Gradient check: for a full-rank W with distinct singular values ||W||_* is differentiable
    # and its gradient is U V^T.
    leaf = W.clone().requires_grad_()
    (grad,) = torch.autograd.grad(torch.linalg.svdvals(leaf).sum(), leaf)
    torch.testing.assert_close(G, grad, rtol=0, atol=TOL64)
    # Non-contiguous input: the same result.
    G_t, _ = trp.nuclear_subgradient(W.T.contiguous().T.to(device))
    torch.testing.assert_close(G_t.cpu(), G, rtol=0, atol=TOL64)


def test_nuclear_subgradient_rank_deficient_is_a_subgradient(generator):
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    W = with_spectrum(30, 20, s, generator)  # rank 3
    G, norm = trp.nuclear_subgradient(W)
    # The subdifferential's conditions: <G, W> = ||W||_* and ||G||_2 <= 1.
    torch.testing.assert_close((G * W).sum(), s.sum(), rtol=1e-12, atol=0)
    assert torch.linalg.matrix_norm(G, ord=2).item() <= 1 + 1e-12
    torch.testing.assert_close(norm, s.sum(), rtol=1e-12, atol=0)
    # On the range of W it is U_3 V_3^T exactly.
    U3, _, Vh3 = torch.linalg.svd(W)
    P = U3[:, :3] @ U3[:, :3].T
    torch.testing.assert_close(P @ G, reference_polar(W, 3), rtol=0, atol=TOL64)


def test_nuclear_subgradient_top_rank_rsvd(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    s = torch.cat([torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=torch.float64), 1e-3 * torch.rand(46, dtype=torch.float64,
                                                                                             generator=generator)])
    W = with_spectrum(60, 50, s.sort(descending=True).values, generator)
    G, norm = trp.nuclear_subgradient(W.to(device), rank=4, generator=device_generator(device, 1))
    # Gap 2 / 1e-3 at k = 4: rsvd's top-4 subspaces are the exact ones to rounding.
    torch.testing.assert_close(G.cpu(), reference_polar(W, 4), rtol=0, atol=TOL64)
    torch.testing.assert_close(norm.cpu(), torch.tensor(14.0, dtype=torch.float64), rtol=1e-12, atol=0)
    G2, _ = trp.nuclear_subgradient(W.to(device), rank=4, generator=device_generator(device, 1))
    assert torch.equal(G, G2)


def test_nuclear_subgradient_empty():
    G, norm = trp.nuclear_subgradient(torch.empty(0, 3))
    assert G.shape == (0, 3) and norm.item() == 0.0


def test_nuclear_subgradient_errors():
    with pytest.raises(ValueError, match=r"W has shape \(2, 3, 4\)"):
        trp.nuclear_subgradient(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\)\] = \[1, 3\]; got 4"):
        trp.nuclear_subgradient(torch.randn(3, 5), rank=4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        trp.nuclear_subgradient(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="W must be a tensor"):
        trp.nuclear_subgradient([[1.0]])


def two_layer_model(generator, dtype=torch.float64):
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(*p.shape, generator=generator, dtype=dtype))
    return model


def test_add_nuclear_subgradient(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    model = two_layer_model(generator).to(device)
    first, second = model[0].weight, model[2].weight
    first.grad = randn(*first.shape, generator=generator, dtype=torch.float64, device=device)
    old = first.grad.cpu().clone()  # .cpu() of a CPU tensor is the tensor itself
    # second.grad is None: it becomes lam U V^T.
    value = trp.add_nuclear_subgradient_(model, 0.25)
    assert first.grad.device == second.grad.device == first.device
    torch.testing.assert_close(first.grad.cpu(), old + 0.25 * reference_polar(first.cpu()), rtol=0, atol=TOL64)
    torch.testing.assert_close(second.grad.cpu(), 0.25 * reference_polar(second.cpu()), rtol=0, atol=TOL64)
    expected = 0.25 * sum(torch.linalg.svdvals(w.detach().cpu()).sum().item() for w in (first, second))
    assert value == pytest.approx(expected, rel=1e-12)
    # Biases are untouched (only 2-D weights of nn.Linear modules are targeted).
    assert model[0].bias.grad is None
    # A list of tensors; frozen ones skipped; lam = 0 is a no-op.
    second.requires_grad_(False)
    before = second.grad.clone()
    trp.add_nuclear_subgradient_([first, second], 1.0)
    assert torch.equal(second.grad, before)
    after = first.grad.clone()
    assert trp.add_nuclear_subgradient_(first, 0.0) == 0.0
    assert torch.equal(first.grad, after)


def test_add_nuclear_subgradient_float32_grad(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    layer = torch.nn.Linear(20, 10)
    with torch.no_grad():
        layer.weight.copy_(randn(10, 20, generator=generator) / 20**0.5)
    W = layer.weight.detach().double()
    layer.to(device)
    layer.weight.grad = torch.zeros_like(layer.weight)
    trp.add_nuclear_subgradient_(layer, 0.5)
    # float32 SVD: backward stable, U V^T within ~n eps / (relative gap) of the exact one;
    # a 10 x 20 Gaussian's spectrum has s_min / s_1 >= ~0.1, so 1e-4 absolute is a margin of
    # ~100 (full float32 U V^T product on CUDA: TF32 is off by default).
    torch.testing.assert_close(layer.weight.grad.double().cpu(), 0.5 * reference_polar(W), rtol=0, atol=1e-4)


def test_add_nuclear_subgradient_errors():
    conv = torch.nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"modules_or_params\[0\] has shape \(4, 3, 3, 3\).*expected a 2-D"):
        trp.add_nuclear_subgradient_([conv.weight], 0.1)
    with pytest.raises(ValueError, match="weight must be .*>= 0"):
        trp.add_nuclear_subgradient_(torch.nn.Linear(3, 3), -1.0)
    with pytest.raises(TypeError, match=r"modules_or_params\[0\] must be a tensor or an nn.Module; got str"):
        trp.add_nuclear_subgradient_(["weight"], 0.1)
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    first.weight.grad = torch.zeros(3, 4)
    with torch.no_grad():
        second.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight 1 \(shape \(3, 4\)\) holds NaN or infinite values; no gradient"):
        trp.add_nuclear_subgradient_([first, second], 0.1)
    assert not first.weight.grad.any()  # the first weight's gradient was changed before the second's check


def planted_model(generator, spectra, dtype=torch.float32):
    """nn.Sequential of bias-free Linear layers ``[out, in]`` with the given spectra."""
    layers = []
    for (m, n), s in spectra:
        layer = torch.nn.Linear(n, m, bias=False, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(with_spectrum(m, n, s, generator))
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def test_truncate_matches_exact_truncated_svd(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    i = torch.arange(96, dtype=torch.float64)
    # Energy 0.9 needs a small rank (the rsvd search path); the gap after the top 6 values
    # (0.5 / 1e-3) makes rsvd's factors the exact ones to rounding.
    decay = torch.where(i < 6, 3.0 - 0.5 * i, 1e-3 * 0.95**i)
    flat = torch.linspace(1.0, 0.5, 48, dtype=torch.float64)  # energy 0.9 needs > half: the exact path
    model = planted_model(generator, [((128, 96), decay), ((48, 64), flat)], dtype=torch.float64)
    weights = [layer.weight.detach().clone() for layer in model]
    model.to(device)
    ranks = trp.truncate_(model, 0.9, generator=device_generator(device, 0))
    expected = {"0": energy_rank(decay, 0.9), "1": energy_rank(flat, 0.9)}
    assert ranks == expected
    assert expected["0"] < 48 and expected["1"] > 24  # both paths were taken
    for layer, W, k in zip(model, weights, expected.values()):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        assert layer.weight.device.type == device
        truncated = layer.weight.detach().cpu()
        torch.testing.assert_close(truncated, (U[:, :k] * S[:k]) @ Vh[:k], rtol=0, atol=TOL64)
        assert torch.linalg.matrix_rank(truncated).item() == k


def test_truncate_float32_deterministic_and_keeps_energy(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    s = 0.9 ** torch.arange(64, dtype=torch.float64)
    model = planted_model(generator, [((80, 64), s), ((64, 80), s)]).to(device)
    twin = copy.deepcopy(model)
    ranks = trp.truncate_(model, 0.99, generator=device_generator(device, 3))
    ranks2 = trp.truncate_(twin, 0.99, generator=device_generator(device, 3))
    assert ranks == ranks2 == {"0": energy_rank(s, 0.99), "1": energy_rank(s, 0.99)}
    for a, b in zip(model, twin):
        assert torch.equal(a.weight, b.weight)
    for layer in model:
        kept = torch.linalg.vector_norm(layer.weight.double().cpu()).square()
        assert kept.item() >= 0.99 * s.square().sum().item() * (1 - 1e-5)  # float32 rounding of the weight


def test_truncate_targets_and_errors(generator):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 5))
    # Default: nn.Linear only; the convolution is not touched.
    conv = model[0].weight.detach().clone()
    assert set(trp.truncate_(model, 0.95)) == {"2"}
    assert torch.equal(model[0].weight, conv)
    with pytest.raises(ValueError, match=r"matches 0 \(Conv2d\), whose weight has shape \(3, 2, 3, 3\)"):
        trp.truncate_(model, 0.95, target_modules=["0"])
    with pytest.raises(ValueError, match=r"no module with a weight matches target_modules=\['nothing'\]"):
        trp.truncate_(model, 0.95, target_modules="nothing")
    for energy in (0.0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]; got"):
            trp.truncate_(model, energy)
    bad = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        bad[1].weight[0, 0] = float("inf")
    before = bad[0].weight.detach().clone()
    with pytest.raises(ValueError, match="the weight of 1 holds NaN or infinite values"):
        trp.truncate_(bad, 0.9)
    assert torch.equal(bad[0].weight, before)  # checked before any change


def test_scheduler_period_and_errors(generator):
    model = two_layer_model(generator, torch.float32)
    scheduler = trp.TRPScheduler(model, lam=0.0, energy=0.8, period=3)
    results = []
    for _ in range(6):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        results.append(scheduler.step())
    assert [r is None for r in results] == [True, True, False, True, True, False]
    assert scheduler.steps == 6 and set(scheduler.ranks) == {"0", "2"}
    state = scheduler.state_dict()
    fresh = trp.TRPScheduler(model, lam=0.0, energy=0.8, period=3)
    fresh.load_state_dict(state)
    assert fresh.steps == 6 and fresh.ranks == scheduler.ranks
    # A wrong state raised KeyError 'steps' (or loaded a string as the ranks); now it names
    # what is wrong and changes nothing.
    for bad, error, message in (({}, ValueError, r"state lacks \['steps', 'ranks'\]"),
                                ([], TypeError, "state must be a dict"),
                                ({"steps": -1, "ranks": {}}, ValueError, r"state\['steps'\] must be an integer >= 0"),
                                ({"steps": 2, "ranks": "0"}, TypeError, r"state\['ranks'\] must be a dict"),
                                ({"steps": 2, "ranks": {}, "generator_state": 3}, TypeError,
                                 r"state\['generator_state'\] must be")):
        with pytest.raises(error, match="TRPScheduler.load_state_dict: " + message):
            fresh.load_state_dict(bad)
        assert fresh.steps == 6 and fresh.ranks == scheduler.ranks
    with pytest.raises(ValueError, match="period must be an integer >= 1; got 0"):
        trp.TRPScheduler(model, lam=0.1, energy=0.9, period=0)
    with pytest.raises(ValueError, match="lam must be"):
        trp.TRPScheduler(model, lam=-0.1, energy=0.9, period=1)
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]; got 0"):
        trp.TRPScheduler(model, lam=0.1, energy=0, period=1)


def test_scheduler_resume_is_the_uninterrupted_run(generator):
    """The generator's state is saved: a run resumed at step 3 of 8 ended 2.5e-2 off the
    uninterrupted one (rsvd's sketches differed)."""
    x = randn(32, 160, generator=generator)
    y = randn(32, 160, generator=generator)
    start = torch.nn.Linear(160, 160)

    def run(steps, state=None):
        model = copy.deepcopy(start) if state is None else state[0]
        scheduler = trp.TRPScheduler(model, lam=1e-2, energy=0.9, period=2, rank=8,
                                     generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if state is not None:
            scheduler.load_state_dict(state[1])
            optimizer.load_state_dict(state[2])
        for _ in range(steps):
            torch.nn.functional.mse_loss(model(x), y).backward()
            scheduler.step()
            optimizer.step()
            optimizer.zero_grad()
        return model, copy.deepcopy(scheduler.state_dict()), copy.deepcopy(optimizer.state_dict())

    uninterrupted = run(8)[0]
    model, scheduler_state, optimizer_state = run(3)
    resumed = run(5, (copy.deepcopy(model), scheduler_state, optimizer_state))[0]
    assert torch.equal(resumed.weight, uninterrupted.weight)


def numerical_rank(W: torch.Tensor, energy: float = 0.999) -> int:
    return energy_rank(torch.linalg.svdvals(W.detach().double()), energy)


def fit(model, x, y, steps, scheduler=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if scheduler is not None:
            scheduler.step()
        optimizer.step()
        optimizer.zero_grad()
    return torch.nn.functional.mse_loss(model(x), y).item()


def test_scheduler_with_the_optimizer_truncates_after_its_update(generator):
    """The paper's step is W_{t+1} = T(W_t) - alpha grad f(T(W_t)): the gradient at the
    truncated weights.  step() truncates before the optimizer's update, whose gradient was
    taken at W_t (T(W_t) - alpha grad f(W_t)); given the optimizer, the truncation runs in
    its post-step hook, so the next forward and gradient see T(W): here against a loop
    that truncates after every second SGD update (the reference order)."""
    x = randn(32, 12, generator=generator)
    y = randn(32, 10, generator=generator)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = trp.TRPScheduler(model, lam=0.0, energy=0.8, period=2, optimizer=optimizer)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(1, 7):
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            torch.nn.functional.mse_loss(net(x), y).backward()
            if net is model:
                assert scheduler.step() is None
            opt.step()
            opt.zero_grad()
        if step % 2 == 0:
            ranks = trp.truncate_(reference, 0.8)
            assert scheduler.ranks == ranks and ranks["0"] < 10
            assert numerical_rank(model[0].weight, 1 - 1e-6) == ranks["0"]  # truncated before the next forward
        torch.testing.assert_close(model[0].weight, reference[0].weight, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="TRPScheduler: optimizer must be a torch.optim.Optimizer or None"):
        trp.TRPScheduler(model, lam=0.0, energy=0.8, period=2, optimizer=model)
    # A truncation due when a checkpoint is taken (between step() and the optimizer's step)
    # is saved and runs after the resumed optimizer's next step; hook.remove() detaches.
    scheduler.hook.remove()
    fresh_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    resumed = trp.TRPScheduler(model, lam=0.0, energy=0.8, period=2, optimizer=fresh_optimizer)
    torch.nn.functional.mse_loss(model(x), y).backward()
    scheduler.step()
    scheduler.step()  # steps 7 and 8: a truncation due
    state = scheduler.state_dict()
    assert state["truncation_due"] is True
    resumed.load_state_dict(state)
    fresh_optimizer.step()
    assert numerical_rank(model[0].weight, 1 - 1e-6) == resumed.ranks["0"]


def test_trp_training_lowers_the_rank(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    # An underdetermined regression (24 samples, 32 inputs) onto a rank-3 map, from a
    # full-rank random init: plain gradient descent fits the data but never touches the
    # init's component in the data's null space (the weight stays of high rank); TRP's
    # regularizer and truncations remove it while fitting the data as well.
    n_in, n_out, samples = 32, 20, 24
    target = with_spectrum(n_out, n_in, torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64), generator).float()
    x = randn(samples, n_in, generator=generator)
    y = x @ target.T
    x, y = x.to(device), y.to(device)
    base = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(0.3 * randn(n_out, n_in, generator=generator))
    base.to(device)
    plain, regularized = copy.deepcopy(base), copy.deepcopy(base)
    # 200 steps: over seeds 0-19 the relative losses after 200 steps are at most 0.004 (plain)
    # and 0.008 (TRP); after 100 steps, 6 of the 20 seeds left one of them above 1e-2.
    loss_plain = fit(plain, x, y, 200)
    scheduler = trp.TRPScheduler(regularized, lam=1e-2, energy=0.95, period=5,
                                 generator=device_generator(device, 0))
    loss_trp = fit(regularized, x, y, 200, scheduler)
    scale = y.square().mean().item()
    assert max(loss_plain, loss_trp) < 1e-2 * scale, (loss_plain, loss_trp, scale)  # both fit the data
    rank_plain, rank_trp = numerical_rank(plain[0].weight, 0.99), numerical_rank(regularized[0].weight, 0.99)
    assert rank_trp <= 5 and rank_plain >= 10, (rank_trp, rank_plain)
    # ... and TRP's weight compresses to rank-k factors with little loss.
    report = trp.compress(regularized, energy=0.99, generator=device_generator(device, 1))
    assert isinstance(report, CompressionReport) and report.replaced == ["0"]
    assert regularized[0][0].weight.device.type == device
    assert report.layers["0"].rank <= 5
    loss_compressed = torch.nn.functional.mse_loss(regularized(x), y).item()
    assert loss_compressed < 1e-2 * scale, (loss_compressed, scale)


def test_generator_of_another_device_is_rejected_before_any_change(cuda_device, generator):
    # A CPU generator for CUDA weights: rsvd would fail at the first weight it draws for
    # (here the second: the first is small enough for the exact SVD), after truncating the first.
    model = planted_model(generator, [((8, 8), torch.linspace(2.0, 1.0, 8, dtype=torch.float64)),
                                      ((128, 96), 0.9 ** torch.arange(96, dtype=torch.float64))]).to(cuda_device)
    before = [layer.weight.detach().clone() for layer in model]
    cpu_generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"truncate_: generator is a cpu generator; expected a cuda generator "
                                         r"for the weight of 1 on cuda"):
        trp.truncate_(model, 0.9, generator=cpu_generator)
    for layer, W in zip(model, before):
        assert torch.equal(layer.weight, W)
    with pytest.raises(ValueError, match="nuclear_subgradient: generator is a cpu generator"):
        trp.nuclear_subgradient(model[1].weight, rank=2, generator=cpu_generator)
    with pytest.raises(ValueError, match="TRPScheduler: generator is a cpu generator"):
        trp.TRPScheduler(model, lam=0.1, energy=0.9, period=1, generator=cpu_generator)


def test_generator_type_and_device_are_checked():
    with pytest.raises(TypeError, match="nuclear_subgradient: generator must be a torch.Generator or None; got int"):
        trp.nuclear_subgradient(torch.randn(3, 3), rank=1, generator=0)
    # The device rule, without a GPU: the check itself, for a CUDA device.  (Meta tensors take
    # any generator, as torch's samplers do: a meta generator cannot even be made.)
    from lowrank_ops._args import require_generator

    with pytest.raises(ValueError, match=r"nuclear_subgradient: generator is a cpu generator; expected a cuda "
                                         r"generator for W on cuda \(e.g. torch.Generator\(device='cuda'\)\)"):
        require_generator("nuclear_subgradient", "generator", torch.Generator(), torch.device("cuda"), "W")
    require_generator("rsvd", "generator", torch.Generator(), torch.device("meta"), "A")


def test_torch_compile_training_and_compressed_model(generator):
    # TRP's loop with the model compiled: the scheduler adds lam U V^T to the weight
    # gradients and truncates the weights in place every 2 steps (graph inputs, read anew at
    # each call); the compressed model (Linear layers replaced by factor pairs) compiles too.
    def run(wrap):
        local = torch.Generator().manual_seed(13)
        model = two_layer_model(local, torch.float32)
        x, y = randn(32, 12, generator=local), randn(32, 8, generator=local)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scheduler = trp.TRPScheduler(model, lam=0.05, energy=0.9, period=2)
        forward, losses = wrap(model), []
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            scheduler.step()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        return {"losses": torch.stack(losses), **{name: p.detach().clone() for name, p in model.named_parameters()}}

    assert_training_compiles(run)
    model = two_layer_model(generator, torch.float32)
    report = trp.compress(model, energy=0.5)
    assert report.replaced  # factor pairs, not the original layers
    assert_compiled_matches_eager(model, [randn(5, 12, generator=generator).requires_grad_()], generator)

"""methods.lowrank_compress: low-rank weight compression of nn.Linear layers.

Weights are built with prescribed spectra (helpers.with_spectrum), so the optimal rank-k
factors, the smallest rank capturing an energy and the optimal errors are known exactly.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import ACCUMULATE_UNIT, with_spectrum
from lowrank_ops.methods import lowrank_compress
from lowrank_ops.methods.lowrank_compress import CompressionReport, compress

# Shapes (in, out): tall, wide and square-ish, with and without bias.
SHAPES = {"encoder.q_proj": (192, 256, True), "encoder.k_proj": (256, 128, False), "head": (128, 96, True)}


def gapped(n: int, k: int = 8) -> torch.Tensor:
    """``0.8^i`` for the top ``k`` values, then a tail ``1e-3 * 0.9^i``: a gap of 200 at
    ``k``, so rsvd's rank-k factors are the exact truncated SVD up to rounding."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.where(i < k, 0.8**i, 1e-3 * 0.9 ** (i - k))


def decaying(n: int) -> torch.Tensor:
    return 0.93 ** torch.arange(n, dtype=torch.float64)


def build(spectrum, generator, dtype=torch.float32, shapes=SHAPES) -> torch.nn.Module:
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    with torch.no_grad():
        for name, (fan_in, fan_out, bias) in shapes.items():
            linear = torch.nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype)
            linear.weight.copy_(with_spectrum(fan_out, fan_in, spectrum(min(fan_in, fan_out)), generator))
            if bias:
                linear.bias.copy_(torch.randn(fan_out, generator=generator, dtype=torch.float64))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def truncated(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The exact rank-k truncated SVD of ``weight``, in float64."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def factors(module: torch.nn.Module):
    assert isinstance(module, torch.nn.Sequential) and len(module) == 2
    down, up = module
    assert down.bias is None
    return down.weight, up.weight, up.bias


def factorization_bound(weight: torch.Tensor, k: int, dtype: torch.dtype) -> float:
    """A bound on ``||B A - W_k||_2`` for factors computed in ``dtype``'s accumulator.

    The SVD stages are backward stable: the factors are the exact truncation of
    ``W + dW`` with ``||dW||_2 <= gamma_n ||W||_F`` (n the larger dimension, Higham's
    gamma for the products and Householder QR), plus one rounding of each stored factor
    (``u ||W||_2`` each).  Truncation moves by at most ``||dW|| (1 + 2 s_1 / (s_k -
    s_(k+1)))`` (Wedin's sin-theta theorem for the two subspaces, Weyl for the values).
    """
    s = torch.linalg.svdvals(weight.double())
    u = ACCUMULATE_UNIT[dtype]
    n = max(weight.shape)
    gamma = n * u / (1 - n * u)
    dW = gamma * s.square().sum().sqrt().item()
    return dW * (1 + 2 * s[0].item() / (s[k - 1] - s[k]).item()) + 2 * u * s[0].item()


def assert_output_matches(module, weight, bias, k, dtype, generator):
    """``module(x)`` against ``x W_k^T + b`` in float64: the factorization bound times
    ``||x_i||`` plus the rounding of the two products (``gamma`` of their lengths on
    ``|x| |A|^T |B|^T + |b|``, Higham eq. 3.5 for each)."""
    x = torch.randn(16, weight.shape[1], generator=generator, dtype=torch.float64)
    reference = x @ truncated(weight, k).T + (0 if bias is None else bias.double())
    A, B, _ = factors(module)
    y = module(x.to(dtype)).double()
    u = ACCUMULATE_UNIT[dtype]
    gamma = (weight.shape[1] + k + 2) * u
    rounding = gamma * ((x.abs() @ A.double().abs().T) @ B.double().abs().T + (0 if bias is None else bias.double().abs()))
    bound = x.norm(dim=1, keepdim=True) * factorization_bound(weight, k, dtype) + rounding
    assert ((y - reference).abs() <= bound).all(), f"max error {(y - reference).abs().max():.3e}"


def relative_error(weight, module) -> float:
    A, B, _ = factors(module)
    W = weight.double()
    return ((W - B.double() @ A.double()).norm() / W.norm()).item()


def assert_error_reported(layer, weight, module, dtype):
    """Exact path: the report equals ``||W - B A||_F / ||W||_F`` up to the factorization's
    rounding (``2 ||dW||_F``, see factorization_bound).  Estimate path: within four
    standard deviations of the probe estimator, ``sqrt(2 sum sigma_i^4 / p)`` for the
    squared error over the residual's singular values (the residual of the search rank r
    is dominated by the final one's, so its values bound it)."""
    actual = relative_error(weight, module)
    W = weight.double()
    n = max(weight.shape)
    rounding = 4 * n * ACCUMULATE_UNIT[dtype]
    if not layer.error_is_estimate:
        assert abs(layer.error - actual) <= rounding, (layer.error, actual)
        return
    A, B, _ = factors(module)
    sigma = torch.linalg.svdvals(W - B.double() @ A.double()) / W.norm()
    spread = 4 * math.sqrt(2 * sigma.pow(4).sum().item() / lowrank_compress._ERROR_PROBES)
    assert abs(layer.error**2 - actual**2) <= spread + 2 * actual * rounding, (layer.error, actual, spread)


# --------------------------------------------------------------------------- rank
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_gives_truncated_svd_factors(dtype, generator):
    model = build(gapped, generator, dtype)
    original = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = compress(model, rank=8, generator=torch.Generator().manual_seed(0))
    assert isinstance(report, CompressionReport) and report.replaced == list(SHAPES)
    for name, (fan_in, fan_out, has_bias) in SHAPES.items():
        module, layer = model.get_submodule(name), report.layers[name]
        weight, bias = original[name]
        A, B, b = factors(module)
        assert A.shape == (8, fan_in) and B.shape == (fan_out, 8) and A.dtype == B.dtype == dtype
        assert (layer.in_features, layer.out_features, layer.rank) == (fan_in, fan_out, 8)
        assert layer.parameters_before == fan_in * fan_out + has_bias * fan_out
        assert layer.parameters_after == 8 * (fan_in + fan_out) + has_bias * fan_out
        assert (b is None) == (bias is None) and (bias is None or torch.equal(b, bias))  # bias kept bit for bit
        # First factor orthonormal rows (the split's point: ||x A^T|| <= ||x||).
        eye = torch.eye(8, dtype=torch.float64)
        assert (A.double() @ A.double().T - eye).abs().max() <= 64 * max(SHAPES[name][:2]) * ACCUMULATE_UNIT[dtype]
        assert_output_matches(module, weight, bias, 8, dtype, generator)
        assert layer.error_is_estimate  # 8 <= min(in, out) / 2: rsvd
        assert_error_reported(layer, weight, module, dtype)
    assert report.parameters_before - report.parameters_after == sum(
        layer.parameters_before - layer.parameters_after for layer in report.layers.values())
    assert report.ratio == report.parameters_after / report.parameters_before


def test_rank_fraction_of_the_smaller_dimension(generator):
    report = compress(build(decaying, generator), rank=0.1, generator=torch.Generator().manual_seed(1))
    assert {name: layer.rank for name, layer in report.layers.items()} == {
        name: max(1, round(0.1 * min(fan_in, fan_out))) for name, (fan_in, fan_out, _) in SHAPES.items()}


def test_float_rank_is_a_fraction():
    """rank=1.0 (a float) meant rank 1, silently; a float is a fraction in (0, 1)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    for rank in (1.0, 2.0):
        with pytest.raises(ValueError, match=rf"rank for layer '0' is a float, so a fraction of min\(in, out\) in \(0, 1\); "
                                             rf"got {rank} \(pass an int for a rank in \[1, 6\]\)"):
            compress(model, rank=rank)


def test_rank_above_half_takes_the_exact_svd(generator):
    # 512 -> 64: min / 2 = 32 < 40 <= 56 = in out / (in + out), the largest saving rank.
    shapes = {"wide": (512, 64, True)}
    model = build(decaying, generator, shapes=shapes)
    weight = model.wide.weight.detach().clone()
    report = compress(model, rank=40)
    layer = report.layers["wide"]
    assert layer.rank == 40 and not layer.error_is_estimate
    assert_error_reported(layer, weight, model.wide, torch.float32)
    s = decaying(64)
    optimal = (s[40:].square().sum() / s.square().sum()).sqrt().item()
    assert abs(layer.error - optimal) <= 4 * 512 * ACCUMULATE_UNIT[torch.float32]


# --------------------------------------------------------------------------- energy
def smallest_rank(s: torch.Tensor, energy: float) -> int:
    captured = s.square().cumsum(0) / s.square().sum()
    return int((captured < energy).sum()) + 1


def search_rank(fan_in: int, fan_out: int, k: int) -> int:
    """The last rank compress's search tries: 32, 64, ... capped at the largest saving rank."""
    cap = fan_in * fan_out // (fan_in + fan_out)
    r = min(32, cap)
    while r < k and r <= min(fan_in, fan_out) / 2:
        r = min(2 * r, cap)
    return r


@pytest.mark.parametrize("k", [3, 20, 45, 70])
def test_energy_gives_the_smallest_rank(k, generator):
    """The energy is set halfway between the captured energies at ranks k - 1 and k of the
    head layer (min dim 96), so the expected rank is unambiguous; the other layers'
    expected ranks come from their own (longer) spectra.  k = 45 and 70 pass the search
    past min / 2 for some layers: the exact path."""
    s = decaying(96)
    captured = s.square().cumsum(0) / s.square().sum()
    energy = ((captured[k - 2] + captured[k - 1]) / 2).item()
    model = build(decaying, generator)
    original = {name: model.get_submodule(name).weight.detach().clone() for name in SHAPES}
    report = compress(model, energy=energy, generator=torch.Generator().manual_seed(2))
    for name, (fan_in, fan_out, _) in SHAPES.items():
        layer = report.layers[name]
        expected = smallest_rank(decaying(min(fan_in, fan_out)), energy)
        if expected > fan_in * fan_out / (fan_in + fan_out):
            assert layer.rank is None and "min_saving" in layer.skipped
            continue
        assert layer.rank == expected, name
        assert layer.error_is_estimate == (search_rank(fan_in, fan_out, expected) <= min(fan_in, fan_out) / 2)
        assert_error_reported(layer, original[name], model.get_submodule(name), torch.float32)
        assert relative_error(original[name], model.get_submodule(name)) ** 2 <= 1 - energy + 1e-6


def test_energy_one_keeps_the_numerical_rank(generator):
    spectrum = lambda n: torch.where(torch.arange(n) < 5, 1.0, 0.0).double()  # noqa: E731
    model = build(spectrum, generator)
    report = compress(model, energy=1.0, generator=torch.Generator().manual_seed(3))
    assert {layer.rank for layer in report.layers.values()} == {5}


# --------------------------------------------------------------------------- selection
def test_min_saving_skips_layers(generator):
    model = build(decaying, generator)
    kept = {name: model.get_submodule(name) for name in SHAPES}
    # Rank 40 saves 1 - 40 (in + out) / (in out): q_proj 63.5 %, k_proj 53.1 %, head 27.1 %.
    report = compress(model, rank=40, min_saving=0.5, generator=torch.Generator().manual_seed(4))
    assert report.replaced == ["encoder.q_proj", "encoder.k_proj"]
    assert list(report.skipped) == ["head"] and "min_saving=0.5" in report.skipped["head"]
    assert model.head is kept["head"] and report.layers["head"].rank is None
    assert report.layers["head"].parameters_after == report.layers["head"].parameters_before
    # Energy: 0.99999 needs rank 79 (0.93^(2 k) <= 1e-5), more than a 30 % saving allows on
    # every layer (76, 59 and 38).
    report = compress(build(decaying, generator), energy=0.99999, min_saving=0.3)
    assert report.replaced == [] and report.parameters_after == report.parameters_before
    assert all("min_saving" in reason for reason in report.skipped.values())


def test_target_modules_selects_layers(generator):
    model = build(decaying, generator)
    head = model.head
    report = compress(model, rank=4, target_modules="*_proj", generator=torch.Generator().manual_seed(5))
    assert list(report.layers) == ["encoder.q_proj", "encoder.k_proj"] and model.head is head
    report = compress(model, rank=4, target_modules=["head"])
    assert list(report.layers) == ["head"] and isinstance(model.head, torch.nn.Sequential)
    with pytest.raises(ValueError, match="no nn.Linear module matches target_modules"):
        compress(model, rank=4, target_modules=["v_proj"])


def test_shared_modules_and_linear_subclasses(generator):
    model = torch.nn.Module()
    model.a = torch.nn.Linear(64, 64)
    model.b = model.a  # registered twice: replaced at both names, still shared
    model.attention = torch.nn.MultiheadAttention(64, 4)  # reads out_proj.weight itself
    report = compress(model, rank=4, generator=torch.Generator().manual_seed(6))
    assert list(report.layers) == ["a"] and model.b is model.a and isinstance(model.a, torch.nn.Sequential)
    assert type(model.attention.out_proj) is not torch.nn.Sequential
    model.attention(torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64))


# --------------------------------------------------------------------------- dtypes, determinism
def test_bfloat16_error_at_most_twice_torchs_own(generator):
    """DESIGN.md section 6: against the float64 reference, the compressed bfloat16 layer
    errs at most twice as much as the exact truncated-SVD factors rounded to bfloat16 and
    run through the same two bfloat16 linears."""
    model = build(gapped, generator, torch.bfloat16)
    original = {name: model.get_submodule(name) for name in SHAPES}
    compress(model, rank=8, generator=torch.Generator().manual_seed(7))
    for name in SHAPES:
        linear, module = original[name], model.get_submodule(name)
        A, B, _ = factors(module)
        assert A.dtype == B.dtype == torch.bfloat16
        U, S, Vh = torch.linalg.svd(linear.weight.double(), full_matrices=False)
        exact = copy.deepcopy(module)
        with torch.no_grad():
            exact[0].weight.copy_(Vh[:8])
            exact[1].weight.copy_(U[:, :8] * S[:8])
        x = torch.randn(64, linear.in_features, generator=generator, dtype=torch.float64).bfloat16()
        bias = 0 if linear.bias is None else linear.bias.double()
        reference = x.double() @ truncated(linear.weight, 8).T + bias
        ours = (module(x).double() - reference).norm()
        torch_own = (exact(x).double() - reference).norm()
        assert ours <= 2 * torch_own, (ours, torch_own)


def test_same_generator_same_result(generator):
    model = build(decaying, generator)
    twin = copy.deepcopy(model)
    state = torch.get_rng_state()
    first = compress(model, energy=0.9, generator=torch.Generator().manual_seed(8))
    second = compress(twin, energy=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert first == second
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), name


def test_report_table(generator):
    report = compress(build(decaying, generator), rank=40, min_saving=0.5)
    text = str(report)
    for name in SHAPES:
        assert name in text
    assert "~" in text and report.skipped["head"] in text
    assert f"{report.parameters_before:,} -> {report.parameters_after:,}" in text


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "exactly one of rank and energy"),
    ({"rank": 4, "energy": 0.9}, ValueError, "exactly one of rank and energy"),
    ({"energy": 0.0}, ValueError, r"energy must be a number in \(0, 1\]"),
    ({"energy": 1.5}, ValueError, r"energy must be a number in \(0, 1\]"),
    ({"energy": float("nan")}, ValueError, "energy must be"),
    ({"rank": 97}, ValueError, r"rank for layer 'head' must be in \[1, 96\]"),
    ({"rank": 0}, ValueError, "rank for layer 'encoder.q_proj' must be"),
    ({"rank": True}, TypeError, "rank must be an int"),
    ({"rank": "8"}, TypeError, "rank must be an int"),
    ({"rank": 4, "min_saving": 1.0}, ValueError, r"min_saving must be a number in \[0, 1\)"),
    ({"rank": 4, "n_iter": -1}, ValueError, r"n_iter must be 'auto' or an int in \[0, 1000\]; got -1"),
    ({"rank": 4, "n_iter": 2**40}, ValueError, r"n_iter must be 'auto' or an int in \[0, 1000\]; got 1099511627776"),
])
def test_bad_arguments_name_themselves(kwargs, error, match, generator):
    model = build(decaying, generator)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        compress(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)



def test_numpy_integer_rank_and_n_iter(generator):
    """An np.int64 n_iter was refused ("n_iter must be 'auto' or an int >= 0"): the same
    compression as Python ints (np.int64 ranks were already taken); a bool n_iter stays refused."""
    np = pytest.importorskip("numpy")
    models = [build(decaying, generator), None]
    models[1] = copy.deepcopy(models[0])
    compress(models[0], rank=4, n_iter=1, generator=torch.Generator().manual_seed(1))
    compress(models[1], rank=np.int64(4), n_iter=np.int64(1), generator=torch.Generator().manual_seed(1))
    ours, theirs = models[1].state_dict(), models[0].state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ValueError, match=r"n_iter must be 'auto' or an int in \[0, 1000\]; got True"):
        compress(build(decaying, generator), rank=4, n_iter=True)

def test_bad_models(generator):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got Tensor"):
        compress(torch.zeros(3, 3), rank=1)
    with pytest.raises(TypeError, match="model is itself an nn.Linear"):
        compress(torch.nn.Linear(8, 8), rank=1)
    model = build(decaying, generator)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the weight of head holds NaN"):
        compress(model, rank=4)


@pytest.mark.parametrize("exponent", [600, -600])
def test_float64_weights_at_the_edges_of_the_range(exponent):
    """Float64 weights of about 2^600 (4e180) and 2^-600: the squared norms and errors
    of compress, maestro.convert, WeLore and TRP overflowed (Python's OverflowError from
    ``float(error) ** 2``; inf / inf = NaN errors) or underflowed (rank 0 for a nonzero
    weight, zero errors).  The weights are now divided by a power of two at their largest
    entry, an exact division, so every result is the unit-scale weight's, times the
    power of two, bit for bit."""
    from lowrank_ops.methods import maestro, trp, welore

    factor = math.ldexp(1.0, exponent)

    def model_pair(seed):
        unit = build(decaying, torch.Generator().manual_seed(seed), dtype=torch.float64)
        scaled = copy.deepcopy(unit)
        with torch.no_grad():
            for linear in scaled.modules():
                if isinstance(linear, torch.nn.Linear):
                    linear.weight.mul_(factor)
        return unit, scaled

    def weights(model):
        return {n: p.detach() for n, p in model.named_parameters() if not n.endswith("bias")}

    for kwargs in ({"rank": 8}, {"rank": 60}, {"energy": 0.99}):  # rsvd, exact SVD, energy search
        unit, scaled = model_pair(0)
        reports = [compress(m, generator=torch.Generator().manual_seed(1), **kwargs) for m in (unit, scaled)]
        for name in SHAPES:
            ours, expected = reports[1].layers[name], reports[0].layers[name]
            assert (ours.rank, ours.error, ours.error_is_estimate) == (expected.rank, expected.error,
                                                                      expected.error_is_estimate), (kwargs, name)
        for (name, w), w_unit in zip(weights(scaled).items(), weights(unit).values()):
            # Replaced layers: Sequential(Linear <- Vh, Linear <- U S), only U S scales.
            assert torch.equal(w, w_unit * (1.0 if name.endswith(".0.weight") else factor)), (kwargs, name)

    unit, scaled = model_pair(2)
    for model in (unit, scaled):
        maestro.convert(model, 8, target_modules=list(SHAPES), generator=torch.Generator().manual_seed(3))
    converted = [(name, layer) for name, layer in scaled.named_modules()
                 if isinstance(layer, maestro.OrderedLowRankLinear)]
    assert len(converted) == len(SHAPES)
    for name, layer in converted:
        reference = unit.get_submodule(name)
        torch.testing.assert_close(layer.U_t, reference.U_t * math.sqrt(factor), rtol=1e-15, atol=0)
        torch.testing.assert_close(layer.V, reference.V * math.sqrt(factor), rtol=1e-15, atol=0)

    unit, scaled = model_pair(4)
    reports = [welore.compress(m, threshold=0.5, generator=torch.Generator().manual_seed(5)) for m in (unit, scaled)]
    assert reports[1].ranks == reports[0].ranks
    for name, layer in reports[0].layers.items():
        assert math.isfinite(reports[1].layers[name].error)
        assert reports[1].layers[name].error == layer.error, name

    unit, scaled = model_pair(6)
    ranks = [trp.truncate_(m, 0.9, generator=torch.Generator().manual_seed(7)) for m in (unit, scaled)]
    assert ranks[1] == ranks[0] and all(k > 0 for k in ranks[0].values())
    for w, w_unit in zip(weights(scaled).values(), weights(unit).values()):
        assert torch.equal(w, w_unit * factor)


@pytest.mark.parametrize("dtype, largest", [(torch.float64, 1.5e308), (torch.float32, 2.0**127)], ids=str)
def test_weights_at_the_top_of_the_dtype_range(dtype, largest):
    """A largest entry at the top of the range: the scale was the power of two above it
    (2^1024 in float64: OverflowError from math.ldexp; 2^128 in float32: inf, so W / c was
    0 and the factors NaN with a reported error of 0).  Now W / c lies in [1, 2)."""
    weight = torch.zeros(64, 48, dtype=torch.float64)
    weight[0, 0], weight[1, 1], weight[2, 2] = largest, 1.0, 0.5
    model = torch.nn.Sequential(torch.nn.Linear(48, 64, bias=False, dtype=dtype))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    report = compress(model, rank=2, generator=torch.Generator().manual_seed(0))
    down, up = model[0]
    merged = up.weight.double() @ down.weight.double()
    assert torch.isfinite(merged).all()
    assert abs(merged[0, 0].item() - largest) <= 1e-6 * largest
    assert report.layers["0"].error <= 1e-6

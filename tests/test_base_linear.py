"""Small-batch base products (ops/base_linear.py, csrc/cpu/base_linear_cpu.cpp)."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import reference
from lowrank_ops._dtypes import float_code
from lowrank_ops._extension import extension
from lowrank_ops.ops.base_linear import SMALL_BATCH_ROWS, small_batch

from helpers import assert_within, randn, summation_bound


def _small_batch_case(rows, in_features, out_features, generator, pad=0):
    """x, W, bias, dy as row-strided views (row stride = columns + pad) into larger buffers."""
    def strided(n_rows, n_cols):
        buffer = randn(n_rows, n_cols + pad, generator=generator)
        return buffer[:, :n_cols]
    return strided(rows, in_features), strided(out_features, in_features), randn(out_features, generator=generator), \
        strided(rows, out_features)


def _check_grad_input_kernel(grad_y, weight, pad):
    """``_C``'s grad-input kernel into a NaN-filled ``dx`` (row stride ``in + pad``): within the
    float64-derived bound of an ``out``-term dot product, nothing written past ``in``."""
    rows, out_features = grad_y.shape
    in_features = weight.shape[1]
    grad_x = torch.full((rows, in_features + pad), float("nan"))
    extension().small_batch_linear_grad_input_cpu(
        grad_y=grad_y.data_ptr(), weight=weight.data_ptr(), grad_x=grad_x.data_ptr(), rows=rows,
        in_features=in_features, out_features=out_features, gy_ld=grad_y.stride(0), w_ld=weight.stride(0),
        gx_ld=grad_x.stride(0), num_threads=2)
    want = grad_y.double() @ weight.double()
    magnitude = grad_y.double().abs() @ weight.double().abs()
    assert_within(grad_x[:, :in_features], want, summation_bound(magnitude, want, out_features, torch.float32),
                  f"dx {rows}x{in_features}x{out_features}")
    assert torch.isnan(grad_x[:, in_features:]).all(), "wrote past in_features"


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pad", [0, 3])
def test_small_batch_kernels_match_float64(pad, weight_dtype, generator):
    """_C's small-batch kernels on every tail: rows 1-5 (row tiles of 4), in not a multiple
    of 16 (scalar columns), out not a multiple of 4 (a partial tile of W's rows), strided
    rows; the forward with a bfloat16 W too (widened exactly: float32 sums of its values;
    the grad-input kernel takes float32 only)."""
    kernels = extension()
    for rows, in_features, out_features in [(1, 16, 4), (3, 33, 5), (5, 300, 37), (16, 64, 130), (64, 17, 1),
                                            (2, 1, 9), (4, 0, 3), (7, 12, 0), (0, 8, 8), (3, 700, 6)]:
        x, weight, bias, grad_y = _small_batch_case(rows, in_features, out_features, generator, pad)
        if weight_dtype == torch.bfloat16:  # strided rows too: a bfloat16 copy with the same padding
            padded = torch.full((out_features, in_features + pad), float("nan"), dtype=torch.bfloat16)
            padded[:, :in_features] = weight
            weight = padded[:, :in_features]
        for with_bias in (True, False):
            y = torch.full((rows, out_features + pad), float("nan"))
            squares = torch.full((out_features + 1,), float("nan"))  # only with the bias (both paths run)
            kernels.small_batch_linear_cpu(
                x=x.data_ptr(), weight=weight.data_ptr(), bias=bias.data_ptr() if with_bias else 0, y=y.data_ptr(),
                rows=rows, in_features=in_features, out_features=out_features, x_ld=x.stride(0),
                w_ld=weight.stride(0), y_ld=y.stride(0), num_threads=2,
                weight_sumsq=squares.data_ptr() if with_bias else 0, weight_dtype=float_code(weight.dtype, "", ""))
            if with_bias:  # the squared row norms of W, from the same pass (rows = 0 included)
                want_squares = (weight.double() ** 2).sum(1)
                assert_within(squares[:out_features], want_squares,
                              summation_bound(want_squares, want_squares, in_features, torch.float32),
                              f"sumsq {rows}x{in_features}x{out_features}")
                assert torch.isnan(squares[out_features]), "wrote past out_features"
            b = bias.double() if with_bias else torch.zeros(out_features, dtype=torch.float64)
            want = x.double() @ weight.double().T + b
            magnitude = x.double().abs() @ weight.double().abs().T + b.abs()
            assert_within(y[:, :out_features], want, summation_bound(magnitude, want, in_features + 1, torch.float32),
                          f"y {rows}x{in_features}x{out_features}")
            assert torch.isnan(y[:, out_features:]).all(), "wrote past out_features"
        if weight_dtype == torch.float32:
            _check_grad_input_kernel(grad_y, weight, pad)


@pytest.mark.parametrize("rows, in_features, out_features", [(65, 33, 130), (129, 70, 9), (256, 48, 300)])
def test_grad_input_kernel_beyond_the_forward_rows(rows, in_features, out_features, generator):
    """The grad-input kernel takes up to SMALL_BATCH_GRAD_MAX_ROWS (256) rows, the forward 64."""
    kernels = extension()
    assert kernels.SMALL_BATCH_GRAD_MAX_ROWS == 256
    _, weight, _, grad_y = _small_batch_case(rows, in_features, out_features, generator, pad=3)
    _check_grad_input_kernel(grad_y, weight, pad=2)


def test_small_batch_kernels_reject_bad_sizes(generator):
    kernels = extension()
    x, weight, _, _ = _small_batch_case(4, 8, 8, generator)
    y = torch.empty(65, 8)
    common = dict(x=x.data_ptr(), weight=weight.data_ptr(), bias=0, y=y.data_ptr(), in_features=8, out_features=8,
                  w_ld=8, y_ld=8, num_threads=1)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 64\]; got 65"):
        kernels.small_batch_linear_cpu(rows=65, x_ld=8, **common)
    with pytest.raises(ValueError, match="x row stride must be >= its 8 columns; got 4"):
        kernels.small_batch_linear_cpu(rows=4, x_ld=4, **common)
    big = torch.empty(257, 8)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 256\]; got 257"):
        kernels.small_batch_linear_grad_input_cpu(grad_y=big.data_ptr(), weight=weight.data_ptr(), grad_x=big.data_ptr(),
                                                  rows=257, in_features=8, out_features=8, gy_ld=8, w_ld=8, gx_ld=8,
                                                  num_threads=1)
    with pytest.raises(ValueError, match="weight must not be null"):
        kernels.small_batch_linear_grad_input_cpu(grad_y=y.data_ptr(), weight=0, grad_x=x.data_ptr(), rows=4,
                                                  in_features=8, out_features=8, gy_ld=8, w_ld=8, gx_ld=8,
                                                  num_threads=1)


def test_small_batch_kernels_run_one_thread_for_num_threads_below_one(generator):
    """num_threads <= 0 runs one thread: the forward kernel used to split its work into no
    tasks and leave y unwritten.  1024 x 1024: above the size that runs serially anyway."""
    kernels = extension()
    x, weight, _, grad_y = _small_batch_case(8, 1024, 1024, generator)
    want_y, want_dx = x.double() @ weight.double().T, grad_y.double() @ weight.double()
    for num_threads in (0, -1):
        y = torch.full((8, 1024), float("nan"))
        kernels.small_batch_linear_cpu(x=x.data_ptr(), weight=weight.data_ptr(), bias=0, y=y.data_ptr(), rows=8,
                                       in_features=1024, out_features=1024, x_ld=1024, w_ld=1024, y_ld=1024,
                                       num_threads=num_threads)
        assert_within(y, want_y, summation_bound(x.double().abs() @ weight.double().abs().T, want_y, 1024,
                                                 torch.float32), f"y, num_threads={num_threads}")
        grad_x = torch.full((8, 1024), float("nan"))
        kernels.small_batch_linear_grad_input_cpu(grad_y=grad_y.data_ptr(), weight=weight.data_ptr(),
                                                  grad_x=grad_x.data_ptr(), rows=8, in_features=1024,
                                                  out_features=1024, gy_ld=1024, w_ld=1024, gx_ld=1024,
                                                  num_threads=num_threads)
        assert_within(grad_x, want_dx, summation_bound(grad_y.double().abs() @ weight.double().abs(), want_dx, 1024,
                                                       torch.float32), f"dx, num_threads={num_threads}")


@pytest.mark.parametrize("rows", [1, 2, 16, 32, 40])
@pytest.mark.parametrize("with_bias", [True, False])
def test_ops_match_float64_and_pass_opcheck(device, rows, with_bias, generator):
    """Both registered ops, below, inside and above SMALL_BATCH_ROWS (kernel or BLAS by size)."""
    x, weight = randn(rows, 40, device=device, generator=generator), randn(24, 40, device=device, generator=generator)
    bias = randn(24, device=device, generator=generator) if with_bias else None
    grad_y = randn(rows, 24, device=device, generator=generator)
    forward, grad_input = torch.ops.lowrank_ops.base_linear.default, torch.ops.lowrank_ops.base_linear_grad_input.default
    torch.library.opcheck(forward, (x, weight, bias))
    torch.library.opcheck(grad_input, (grad_y, weight))
    b = torch.zeros(24, dtype=torch.float64, device=device) if bias is None else bias.double()
    want = reference.base_linear(x.double(), weight.double(), b)
    bound = summation_bound(x.double().abs() @ weight.double().abs().T + b.abs(), want, 41, torch.float32)
    assert_within(forward(x, weight, bias), want, bound, "base_linear")
    want = reference.base_linear_grad_input(grad_y.double(), weight.double())
    bound = summation_bound(grad_y.double().abs() @ weight.double().abs(), want, 24, torch.float32)
    assert_within(grad_input(grad_y, weight), want, bound, "base_linear_grad_input")


@pytest.mark.parametrize("rows", [4, 40])
def test_torch_compile_fullgraph(device, rows, generator):
    """Both ops traced by torch.compile(fullgraph=True) (their fake impls), the kernel's
    batch size and BLAS's: the same values as eager."""
    x, weight = randn(rows, 64, device=device, generator=generator), randn(48, 64, device=device, generator=generator)
    bias, grad_y = randn(48, device=device, generator=generator), randn(rows, 48, device=device, generator=generator)

    def products(x, weight, bias, grad_y):
        return (torch.ops.lowrank_ops.base_linear(x, weight, bias),
                torch.ops.lowrank_ops.base_linear_grad_input(grad_y, weight))

    compiled = torch.compile(products, fullgraph=True, backend="aot_eager")
    for ours, eager in zip(compiled(x, weight, bias, grad_y), products(x, weight, bias, grad_y)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


@pytest.mark.parametrize("product", sorted(SMALL_BATCH_ROWS))
def test_dispatch_follows_small_batch_rows(product, generator):
    """The kernels serve exactly SMALL_BATCH_ROWS[product] (float32, CPU, unit column
    stride, AVX-512); everything else goes to BLAS."""
    low, high = SMALL_BATCH_ROWS[product]
    weight = randn(8, 16, generator=generator)
    k = 16 if product == "forward" else 8  # rows [N, in] forward, [N, out] for the input gradient
    expected = extension().cpu_features()["avx512f"]
    assert small_batch(randn(low, k, generator=generator), weight, product) == expected
    assert small_batch(randn(high, k, generator=generator), weight, product) == expected
    assert not small_batch(randn(low - 1, k, generator=generator), weight, product)
    assert not small_batch(randn(high + 1, k, generator=generator), weight, product)
    assert not small_batch(randn(4, k, dtype=torch.float64, generator=generator), weight.double(), product)
    assert not small_batch(randn(32, 4, generator=generator).T[:4], weight, product)  # column stride 4
    assert not small_batch(randn(4, k, generator=generator), randn(16, 8, generator=generator).T, product)
    assert not small_batch(randn(k, generator=generator).expand(4, k), weight, product)  # row stride 0
    # Mismatched or non-2-D operands go to BLAS, which rejects them (the kernels computed
    # garbage and read past grad_y's rows).
    assert not small_batch(randn(4, 24 - k, generator=generator), weight, product)
    assert not small_batch(randn(2, 4, k, generator=generator), weight, product)


def test_mismatched_operands_raise_instead_of_reading_out_of_bounds(monkeypatch, generator):
    import lowrank_ops.ops.base_linear as module

    monkeypatch.setattr(module, "SMALL_BATCH_MIN_WEIGHT", 1)
    weight = randn(64, 128, generator=generator)
    with pytest.raises(ValueError, match=r"base_linear: x has shape \(8, 64\) and weight \(64, 128\); expected x "
                                         r"\[N, in\] and weight \[out, in\]"):
        torch.ops.lowrank_ops.base_linear(randn(8, 64, generator=generator), weight, None)
    with pytest.raises(ValueError, match=r"base_linear_grad_input: grad_y has shape \(1, 32\)"):
        torch.ops.lowrank_ops.base_linear_grad_input(randn(1, 32, generator=generator), weight)
    with pytest.raises(ValueError, match="base_linear: weight is torch.float64 on cpu; expected x's torch.float32"):
        torch.ops.lowrank_ops.base_linear(randn(8, 128, generator=generator), weight.double(), None)
    with pytest.raises(ValueError, match=r"bias has shape \(2, 64\); expected \(out,\) = \(64,\)"):
        module.base_linear(randn(8, 128, generator=generator), weight, randn(2, 64, generator=generator))
    x3 = randn(2, 8, 128, generator=generator)
    torch.testing.assert_close(module.base_linear(x3, weight), x3 @ weight.T)


@pytest.mark.parametrize("intel", [True, False])
def test_small_batch_policy_follows_the_cpu_vendor(monkeypatch, intel):
    """Intel CPUs keep MKL's fast small GEMMs for 1 row and from 33 (forward) rows on, and
    for W under 4 M elements; elsewhere (MKL's generic paths) the kernels take 1-64 rows
    from 1 M elements (the measurements in base_linear.py); without the extension, the
    Intel policy."""
    import lowrank_ops.ops.base_linear as module

    class Extension:
        @staticmethod
        def cpu_features():
            return {"avx512f": True, "genuine_intel": intel}

    monkeypatch.setattr(module, "extension", lambda: Extension)
    rows, min_weight = module._small_batch_policy()
    assert (rows, min_weight) == (({"forward": (4, 32), "grad_input": (2, 32)}, 1 << 22) if intel
                                  else ({"forward": (1, 64), "grad_input": (1, 256)}, 1 << 20))

    def missing():
        raise RuntimeError("no extension")

    monkeypatch.setattr(module, "extension", missing)
    assert module._small_batch_policy() == module._INTEL_POLICY


def test_dispatch_needs_a_large_enough_weight(monkeypatch, generator):
    """Below SMALL_BATCH_MIN_WEIGHT elements of W the products go to BLAS (W in cache)."""
    import lowrank_ops.ops.base_linear as module

    monkeypatch.setattr(module, "SMALL_BATCH_MIN_WEIGHT", 128)
    x = randn(8, 16, generator=generator)
    expected = extension().cpu_features()["avx512f"]
    assert small_batch(x, randn(8, 16, generator=generator), "forward") == expected  # 128 elements
    assert not small_batch(x, randn(7, 16, generator=generator), "forward")  # 112
    assert small_batch(x, randn(7, 16, generator=generator), "forward", min_weight=0) == expected


def test_expanded_operands(generator):
    """Row-stride-0 operands (an expanded x; the gradient of y.sum(0)) take the BLAS path."""
    weight = randn(24, 40, generator=generator)
    x = randn(40, generator=generator).expand(8, 40).requires_grad_()
    y = torch.ops.lowrank_ops.base_linear(x, weight, None)
    torch.testing.assert_close(y, x.detach() @ weight.T)
    grad_y = randn(24, generator=generator).expand(8, 24)
    torch.testing.assert_close(torch.ops.lowrank_ops.base_linear_grad_input(grad_y, weight), grad_y @ weight)


def test_kernel_reads_only_a_dense_out_bias(monkeypatch, generator):
    """Inside SMALL_BATCH_ROWS, a bias the kernel cannot read as a dense ``[out]`` vector
    of W's dtype (a broadcast ``[1]`` bias, another dtype) goes to ``addmm``, which
    broadcasts it or raises, instead of the kernel reading past it or misreading it."""
    import lowrank_ops.ops.base_linear as module

    monkeypatch.setattr(module, "SMALL_BATCH_MIN_WEIGHT", 1)
    x, weight = randn(8, 16, generator=generator), randn(24, 16, generator=generator)
    forward = torch.ops.lowrank_ops.base_linear
    broadcast = randn(1, generator=generator)
    torch.testing.assert_close(forward(x, weight, broadcast), torch.addmm(broadcast, x, weight.T))
    with pytest.raises(ValueError, match="bias is torch.float64 on cpu; expected x's torch.float32"):
        forward(x, weight, randn(24, dtype=torch.float64, generator=generator))
    bias = randn(24, generator=generator)  # the kernel's case: same result as addmm
    torch.testing.assert_close(forward(x, weight, bias), torch.addmm(bias, x, weight.T))


@pytest.mark.parametrize("rows", [8, 100])
def test_public_base_linear_is_differentiable_at_every_size(rows, generator):
    """The small-batch kernel has no derivatives: at 8 rows the result had no grad_fn (at
    100, addmm's), and torch.func.jvp returned a zero tangent.  Where derivatives are asked
    for, base_linear is F.linear."""
    from lowrank_ops.ops.base_linear import base_linear

    x = randn(rows, 64, generator=generator)
    weight = randn(48, 64, generator=generator)
    leaf = x.clone().requires_grad_()
    base_linear(leaf, weight).sum().backward()
    torch.testing.assert_close(leaf.grad, weight.sum(0).expand(rows, 64))
    v = randn(rows, 64, generator=generator)
    torch.testing.assert_close(torch.func.jvp(lambda x: base_linear(x, weight), (x,), (v,))[1], v @ weight.T)
    torch.testing.assert_close(base_linear(x, weight), x @ weight.T)

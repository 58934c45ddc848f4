"""Blockwise 8-bit quantization of optimizer states (lowrank_ops.optim._quantized_state):
the code maps, the round trip against float64 within the map's resolution, the table
lookup against a binary search, edge cases (zeros, tiny and huge magnitudes, short last
blocks, empty and non-contiguous tensors)."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops.optim._quantized_state import (
    BLOCK_SIZE, _midpoints, dequantize_blockwise, dynamic_map, quantize_blockwise,
)

# Slack for float32 arithmetic on top of the map's half gap, in units of the block's
# absmax: x / absmax and map[code] * absmax each round once (2^-24 relative), and a value
# within that rounding of a midpoint may take the farther code; 16 ulp covers both.
F32_SLACK = 16 * 2.0 ** -24


@pytest.mark.parametrize("signed", [True, False])
def test_code_maps(signed):
    values = dynamic_map(signed).double()
    assert values.shape == ((255,) if signed else (256,)) and values.dtype == torch.float64
    assert (values[1:] > values[:-1]).all()  # sorted and distinct: a code is one value
    assert values[-1] == 1.0 and (values == 0).sum() == 1 and (values[0] == -1.0 if signed else values[0] == 0.0)
    if signed:
        torch.testing.assert_close(values, -values.flip(0), rtol=0, atol=0)  # symmetric
    # Widest gap: the top decade's (64 or 128 codes over (0.1, 1]); smallest nonzero: 10^-6 / 10^-7.
    # The entries are float32: a gap of ~0.01 is exact to ~1e-7 absolute (rel_tol 1e-5).
    top = 64 if signed else 128
    assert math.isclose(float((values[1:] - values[:-1]).max()), 0.9 / top, rel_tol=1e-5)
    assert math.isclose(float(values[values > 0].min()), 1e-6 if signed else 1e-7, rel_tol=1e-6)


def _log_uniform(shape, generator, decades: float, signed: bool) -> torch.Tensor:
    """Random values whose magnitudes spread over ``decades`` orders of magnitude (Adam's
    moments do), float64, never zero."""
    magnitude = 10.0 ** (-decades * torch.rand(shape, generator=generator, dtype=torch.float64))
    if not signed:
        return magnitude
    return magnitude * torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).double()


def _check_round_trip(x64: torch.Tensor, signed: bool, device: str) -> None:
    """Quantize the float32 copy of ``x64``; every value comes back within half the gap of
    the map entries around it (times its block's absmax), plus float32 rounding."""
    x = x64.float().to(device)
    codes, absmax = quantize_blockwise(x, signed)
    n_blocks = -(-x.numel() // BLOCK_SIZE)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and codes.device == x.device
    assert absmax.shape == (n_blocks,) and absmax.dtype == torch.float32
    restored = dequantize_blockwise(codes, absmax, signed)
    assert restored.shape == x.shape and restored.dtype == torch.float32
    if x.numel() == 0:
        return
    flat = x.double().cpu().reshape(-1)  # the float32 values that were quantized, exactly
    pad = -flat.numel() % BLOCK_SIZE
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(n_blocks, BLOCK_SIZE)
    block_max = blocks.abs().amax(dim=1)
    torch.testing.assert_close(absmax.cpu().double(), block_max, rtol=0, atol=0)
    scale = block_max.repeat_interleave(BLOCK_SIZE)[: flat.numel()]
    values = dynamic_map(signed).double()
    y = torch.where(scale > 0, flat / scale.clamp_min(1e-300), 0.0).clamp(values[0], 1.0)
    upper = torch.searchsorted(values, y).clamp(1, len(values) - 1)
    half_gap = (values[upper] - values[upper - 1]) / 2
    error = (restored.cpu().double().reshape(-1) - flat).abs()
    bound = scale * (half_gap + F32_SLACK)
    assert (error <= bound).all(), float((error / bound.clamp_min(1e-300)).max())
    # Per block, relative to the absmax: within the widest half gap (0.9 / 64 or 0.9 / 128, halved).
    widest = (0.9 / 64 if signed else 0.9 / 128) / 2
    per_block = torch.nn.functional.pad(error, (0, pad)).view(n_blocks, BLOCK_SIZE).amax(dim=1)
    assert (per_block <= block_max * (widest + F32_SLACK)).all()
    # The largest value of a block is a code (+-1) and comes back exactly.
    largest = blocks.abs().argmax(dim=1) + torch.arange(n_blocks) * BLOCK_SIZE
    largest = largest[largest < flat.numel()]
    torch.testing.assert_close(restored.cpu().double().reshape(-1)[largest], flat[largest], rtol=0, atol=0)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(4096,), (1000,), (3, 700), (257,), (7,), (64, 48), (0,), (0, 5)])
def test_round_trip_within_the_map_resolution(device, generator, signed, shape):
    _check_round_trip(_log_uniform(shape, generator, 9.0, signed), signed, device)


@pytest.mark.parametrize("signed", [True, False])
def test_zero_blocks_tiny_and_huge_magnitudes(device, generator, signed):
    # Block 0: zeros; 1: ~1e-30; 2: ~1e30; 3: near float32's smallest normal; 4: near
    # its largest; 5: 1e30 and 1e-30 in one block (the tiny ones round to 0, within the
    # bound); 6: a short block of 100 values.
    parts = [
        torch.zeros(BLOCK_SIZE, dtype=torch.float64),
        1e-30 * _log_uniform(BLOCK_SIZE, generator, 3.0, signed),
        1e30 * _log_uniform(BLOCK_SIZE, generator, 3.0, signed),
        1e-37 * (1 + _log_uniform(BLOCK_SIZE, generator, 1.0, signed).abs()),
        3e38 * _log_uniform(BLOCK_SIZE, generator, 3.0, signed),
        torch.cat([1e30 * _log_uniform(BLOCK_SIZE // 2, generator, 1.0, signed),
                   1e-30 * _log_uniform(BLOCK_SIZE // 2, generator, 1.0, signed)]),
        _log_uniform(100, generator, 9.0, signed),
    ]
    x64 = torch.cat(parts)
    _check_round_trip(x64, signed, device)
    codes, absmax = quantize_blockwise(x64.float().to(device), signed)
    assert absmax[0] == 0 and (dequantize_blockwise(codes, absmax, signed)[:BLOCK_SIZE] == 0).all()
    assert torch.isfinite(dequantize_blockwise(codes, absmax, signed)).all()


@pytest.mark.parametrize("signed", [True, False])
def test_table_lookup_is_the_nearest_code(device, signed):
    """quantize_blockwise finds codes with a table over float32's top 16 bits; it must pick
    what a binary search over the midpoints (torch.bucketize) picks, for every value,
    including the midpoints themselves and their float32 neighbours (ties: lower code)."""
    midpoints = _midpoints(signed)
    probes = [midpoints, midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0)),
              torch.linspace(-1 if signed else 0, 1, 200_001), dynamic_map(signed),
              torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.0])]
    if not signed:
        probes = [p[p >= 0] for p in probes]
    y = torch.cat(probes)
    # A 1 leads every block: each block's absmax is 1, so y itself is what gets rounded.
    y = torch.cat([y, torch.zeros(-y.numel() % (BLOCK_SIZE - 1))]).view(-1, BLOCK_SIZE - 1)
    y = torch.cat([torch.ones(y.shape[0], 1), y], dim=1).view(-1)
    codes, absmax = quantize_blockwise(y.to(device), signed)
    assert (absmax == 1).all()
    expected = torch.bucketize(y, midpoints).to(torch.uint8)
    torch.testing.assert_close(codes.cpu(), expected, rtol=0, atol=0)


def test_unsigned_map_clamps_negatives_and_non_contiguous_input(device, generator):
    x = torch.randn(300, 40, generator=generator).to(device)
    codes, absmax = quantize_blockwise(x, signed=False)
    restored = dequantize_blockwise(codes, absmax, signed=False)
    assert (restored[x <= 0] == 0).all() and (restored[x > 0] > 0).any()
    # A transposed (non-contiguous) tensor is read in its own row-major order.
    codes_t, absmax_t = quantize_blockwise(x.T, signed=True)
    codes_c, absmax_c = quantize_blockwise(x.T.contiguous(), signed=True)
    assert torch.equal(codes_t, codes_c) and torch.equal(absmax_t, absmax_c)


def test_non_finite_values_poison_their_block_only():
    x = torch.randn(3 * BLOCK_SIZE, generator=torch.Generator().manual_seed(0))
    x[BLOCK_SIZE + 5] = math.nan
    restored = dequantize_blockwise(*quantize_blockwise(x, signed=True), signed=True)
    assert torch.isnan(restored[BLOCK_SIZE:2 * BLOCK_SIZE]).all()
    assert torch.isfinite(restored[:BLOCK_SIZE]).all() and torch.isfinite(restored[2 * BLOCK_SIZE:]).all()


def test_bad_input():
    codes, absmax = quantize_blockwise(torch.randn(600), signed=True)
    with pytest.raises(ValueError, match=r"absmax of shape \(3,\); got torch.uint8 codes and absmax of shape \(2,\)"):
        dequantize_blockwise(codes, absmax[:2], signed=True)
    with pytest.raises(ValueError, match="expected uint8 codes"):
        dequantize_blockwise(codes.long(), absmax, signed=True)
    with pytest.raises(ValueError, match="block_size must be >= 1; got 0"):
        quantize_blockwise(torch.randn(4), signed=True, block_size=0)

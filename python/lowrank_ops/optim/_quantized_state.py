"""Blockwise 8-bit quantization of optimizer states (Dettmers et al., 2021), in torch ops.

A float tensor is cut into blocks of :data:`BLOCK_SIZE` consecutive values (in its
row-major order; the last block may be short).  Each block keeps its absolute maximum
``absmax`` (float32) and, per value, the uint8 index of the entry of a fixed sorted
code map nearest to ``value / absmax`` (a number in [-1, 1]).  Dequantization is
``map[code] * absmax``.  Storage: 1 byte per value plus 4 bytes per block, 1.016 bytes
per value at 256 instead of 4 (3.94x smaller than float32).

The code maps are "dynamic" (dynamic tree quantization): the interval (0, 1] is split
into decades ``(10^-(d+1), 10^-d]``, each holding equally spaced codes ending at
``10^-d``, with half as many codes per decade at each step down.  Adam's moments span
several orders of magnitude inside a block; a linear 8-bit map would round everything
below ``absmax / 255`` to zero, this one keeps a few codes down to ``10^-7 absmax``.

* :func:`dynamic_map` ``(signed=False)`` (second moment, >= 0; GaLoreAdamW codes its
  square root, see there): decades d = 0..7 with 128, 64, ..., 1 codes, plus 0: 256 entries.
* :func:`dynamic_map` ``(signed=True)`` (first moment): decades d = 0..6 with 64, 32, ...,
  1 codes on each side, plus 0: 255 entries (one sign bit leaves 7 bits of magnitude;
  code 255 is not used).

Error bound.  A value ``x`` of a block with absmax ``a`` between map entries ``c_i <=
x / a <= c_{i+1}`` is restored with ``|x - q(x)| <= a (c_{i+1} - c_i) / 2`` (nearest
entry), plus float32 rounding (a few ulp of ``a``).  The widest gap is the top decade's:
``0.9 / 64`` for the signed map, ``0.9 / 128`` for the unsigned one, so every value is
within ``0.0071 a`` (signed) or ``0.0036 a`` (unsigned) of its original; values below
``5e-7 a`` (signed) / ``5e-8 a`` (unsigned) round to 0.  Relative to the value itself the
error is at most ``4.5 * 2^d / L_0`` in decade d (``L_0`` = 64 or 128 codes in the top
decade): 3.5 % (unsigned) / 7 % (signed) in the top decade, doubling per decade down.

Block size 256: the smallest block size bitsandbytes ships for its optimizers.  A
smaller block isolates an outlier to fewer neighbours (the block's other values lose
resolution relative to its absmax), at 4 bytes of absmax per block: 1.6 % overhead at 256,
6 % at 64; 2048 would save 1.4 % of the state but let one large value coarsen 2048
others.  GaLore's projected moments (``m x rank`` or ``rank x n``) have rows of very
different scale, and a 256 block spans at most one or two of their rows at rank >= 128.

Non-finite values: a NaN or inf makes its whole block's absmax non-finite, so the block
dequantizes to NaN (a float32 state would keep the poisoning to that element; Adam's
state is poisoned either way).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

__all__ = ["BLOCK_SIZE", "dynamic_map", "quantize_blockwise", "dequantize_blockwise"]

#: Values per block (one float32 absmax each); see the module docstring for the choice.
BLOCK_SIZE = 256


@functools.lru_cache(maxsize=None)
def _map_cpu(signed: bool) -> torch.Tensor:
    # Decade d covers (10^-(d+1), 10^-d] with `levels` codes at 10^-d (0.1 + 0.9 j / levels),
    # j = 1..levels: the top code of every decade is exactly 10^-d and the bottom of one
    # decade meets the top of the next, so the map has no hole between 10^-decades and 1.
    top_levels, decades = (64, 7) if signed else (128, 8)
    magnitudes = []
    for d in range(decades):
        levels = top_levels >> d
        j = torch.arange(1, levels + 1, dtype=torch.float64)
        magnitudes.append(10.0 ** -d * (0.1 + 0.9 * j / levels))
    positive = torch.cat(magnitudes)
    parts = [-positive, torch.zeros(1, dtype=torch.float64), positive] if signed else [torch.zeros(1, dtype=torch.float64), positive]
    return torch.cat(parts).sort().values.float()


def dynamic_map(signed: bool, device="cpu") -> torch.Tensor:
    """The sorted code map, float32 on ``device``: ``[255]`` (signed) or ``[256]`` (unsigned).

    Entries lie in [-1, 1] (signed) or [0, 1] (unsigned), include 0 and 1 (and -1), and
    are distinct, so a code's value is ``map[code]``.
    """
    return _map_on(signed, torch.device(device))


@functools.lru_cache(maxsize=None)
def _map_on(signed: bool, device: torch.device) -> torch.Tensor:
    return _map_cpu(signed).to(device)


def _midpoints(signed: bool) -> torch.Tensor:
    """Decision boundaries of nearest-entry rounding (float32, computed in float64, rounded once)."""
    values = _map_cpu(signed).double()
    return ((values[:-1] + values[1:]) / 2).float()


@functools.lru_cache(maxsize=None)
def _cell_tables(signed: bool, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables over the 2^16 "cells" of float32 values sharing their top 16 bits.

    ``torch.bucketize`` on the midpoints (a binary search per value) measured 22-27 ms per
    10^6 values on 2 cores, 30x an axpy; one table gather and one compare measured 7 ms.
    A cell (fixed sign, exponent and top 7 mantissa bits) spans a relative width of at most
    2^-7 of its values; the narrowest gap between midpoints is 0.9 / 128 of the top of
    its decade, wider than any cell inside that decade, so a cell holds at most one
    midpoint (checked below).  The nearest code of ``y`` is then ``base[cell] + (y >
    cut[cell])``: ``base`` the code of the cell's smallest value, ``cut`` the midpoint
    inside the cell (+inf if none).  Ties go to the lower code, as bucketize's.
    """
    midpoints = _midpoints(signed)
    top_bits = torch.arange(1 << 16, dtype=torch.int64).to(torch.int32) << 16
    ends = torch.stack([top_bits.view(torch.float32), (top_bits | 0xFFFF).view(torch.float32)])
    ends = torch.where(torch.isfinite(ends), ends, 0.0)  # NaN / inf cells: code of 0 (a poisoned block is NaN anyway)
    low, high = ends.min(dim=0).values, ends.max(dim=0).values
    base = torch.bucketize(low, midpoints)
    if (torch.bucketize(high, midpoints) - base).max() > 1:
        raise AssertionError("_cell_tables: a float32 cell holds two midpoints of the map")  # a map edit broke the premise
    cut = torch.where(base < len(midpoints), midpoints[base.clamp(max=len(midpoints) - 1)], torch.inf)
    return base.to(torch.uint8).to(device), cut.to(device)


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flat [n]`` zero-padded to a multiple of ``block_size``, as ``[n_blocks, block_size]``."""
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int = BLOCK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes of ``x``.

    Parameters
    ----------
    x : Tensor[...]
        Floating point, any shape (read in row-major order), any device.  With
        ``signed=False`` negative values are clamped to 0 (the unsigned map has no
        negative entries; meant for Adam's second moment).
    signed : bool
        Use the signed map (first moment) or the unsigned one (second moment).
    block_size : int
        Values per block (default :data:`BLOCK_SIZE`).

    Returns
    -------
    codes : Tensor[...] uint8
        Shaped as ``x``: the index of the map entry nearest to ``value / absmax``.
    absmax : Tensor[ceil(x.numel() / block_size)] float32
        Each block's largest absolute value (0 for an all-zero block, whose codes are
        then the map's 0; an infinite value is stored as float32's largest).
    """
    if block_size < 1:
        raise ValueError(f"quantize_blockwise: block_size must be >= 1; got {block_size}")
    blocks = _blocks(x.detach().reshape(-1).float(), block_size)
    if blocks.numel():  # one read, no |x| temporary
        low, high = torch.aminmax(blocks, dim=1)
        absmax = torch.maximum(high, low.neg())
    else:
        absmax = blocks.new_zeros(blocks.shape[0])
    # An infinite value (a float32 second moment overflowing: gradients above ~1e19) is
    # stored as float32's largest: an infinite absmax decoded the whole block to NaN (NaN
    # parameters at the next step), where the 32-bit state's inf only zeroes the update.
    absmax = absmax.clamp_max(torch.finfo(torch.float32).max)
    # An all-zero block divides by 1 instead of 0: its values stay 0 and take code "0".
    normalized = (blocks / torch.where(absmax > 0, absmax, 1.0).unsqueeze(1)).clamp_(-1.0, 1.0)
    base, cut = _cell_tables(signed, normalized.device)
    flat = normalized.view(-1)
    cells = (flat.view(torch.int32) >> 16) & 0xFFFF
    codes = base.index_select(0, cells).add_((flat > cut.index_select(0, cells)).view(torch.uint8))
    codes = codes[: x.numel()].view(x.shape)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The float32 tensor that :func:`quantize_blockwise` codes stand for: ``map[codes] * absmax``.

    Parameters
    ----------
    codes : Tensor[...] uint8
    absmax : Tensor[ceil(codes.numel() / block_size)] float32
    signed, block_size
        As given to :func:`quantize_blockwise`.

    Returns
    -------
    Tensor[...] float32
        Shaped as ``codes``, on its device.
    """
    n_blocks = -(-codes.numel() // block_size)
    if codes.dtype != torch.uint8 or absmax.shape != (n_blocks,):
        raise ValueError(f"dequantize_blockwise: expected uint8 codes and absmax of shape ({n_blocks},); got "
                         f"{codes.dtype} codes and absmax of shape {tuple(absmax.shape)}")
    values = _map_on(signed, codes.device).index_select(0, codes.reshape(-1).to(torch.int32))
    blocks = _blocks(values, block_size).mul_(absmax.unsqueeze(1))
    return blocks.view(-1)[: codes.numel()].view(codes.shape)


"""Frozen random bases regenerated from an integer seed (NOLA, RandLoRA).

The random-basis adapters save only their trainable coefficients and one integer seed;
the bases are redrawn from the seed whenever a layer is built or loaded.  So that the same
seed gives the same bases on every device and every torch build that keeps its CPU
generator, the bases are always drawn by torch's CPU generator (mt19937) in float32 and
then moved (and cast) to the layer's device and dtype: a CUDA generator would draw other
numbers from the same seed, and an adapter trained on a GPU would load wrong on a CPU.

Each kind of basis of a layer draws from its own stream (:func:`stream_seed`), and a
stream draws its ``count`` bases in blocks of :func:`block_size` bases, one ``uniform_``
call per block: the block boundaries are part of the format (a ``uniform_`` of a whole
tensor need not equal the same numbers drawn in pieces), and they let a layer redraw its
bases one block at a time without holding all of them.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

from .._args import is_integer
from ..ops._library import values_readable

__all__ = ["BLOCK_ELEMENTS", "SeededBases", "block_size", "check_seed", "draw_bases", "iter_bases", "kaiming_bound",
           "new_seed", "rounded_by_cast", "stream_seed"]

#: Numbers drawn per ``uniform_`` call (4 MB in float32): the unit of regeneration.
BLOCK_ELEMENTS = 1 << 20

_SEED_LIMIT = 2**63
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: decorrelates the streams of one seed


def check_seed(where: str, seed) -> int:
    """``seed`` as an int in ``[0, 2^63)`` (a ValueError naming it otherwise)."""
    if not is_integer(seed) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"{where}: seed must be an int in [0, 2^63); got {seed!r}")
    return int(seed)


def new_seed() -> int:
    """A fresh seed from torch's default CPU generator (reproducible with ``torch.manual_seed``)."""
    # device="cpu": under `with torch.device("meta")` the draw was a meta tensor (".item() cannot be called").
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))


def stream_seed(seed: int, stream: int) -> int:
    """The generator seed of basis kind ``stream`` (0, 1, ...) of a layer seeded ``seed``.

    One splitmix64 round of ``seed + stream * golden``: nearby layer seeds (0, 1, 2, ...)
    and the kinds of one layer get unrelated mt19937 seeds (``seed + stream`` would give
    layer 0's second kind the same numbers as layer 1's first).
    """
    z = (seed + (stream + 1) * _GOLDEN) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % _SEED_LIMIT


def block_size(rows: int, cols: int) -> int:
    """Bases per draw block: as many ``[rows, cols]`` bases as fit :data:`BLOCK_ELEMENTS` (at least one)."""
    return max(1, BLOCK_ELEMENTS // max(1, rows * cols))


def iter_bases(seed: int, stream: int, count: int, rows: int, cols: int, bound: float,
               device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
               ) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(start, block)`` for consecutive blocks of the ``count`` bases ``[rows, cols]`` with
    entries U(-bound, bound): ``block`` is ``[b, rows, cols]`` on ``device`` in ``dtype``,
    holding bases ``start .. start + b - 1``."""
    generator = torch.Generator().manual_seed(stream_seed(seed, stream))
    step = block_size(rows, cols)
    for start in range(0, count, step):
        # float32 on the CPU whatever torch's defaults: the bases are a function of the seed only
        # (a float64 default dtype drew other numbers, so a checkpoint loaded another function).
        block = torch.empty(min(step, count - start), rows, cols, dtype=torch.float32, device="cpu")
        block.uniform_(-bound, bound, generator=generator)
        yield start, block.to(device=device, dtype=dtype)


def draw_bases(seed: int, stream: int, count: int, rows: int, cols: int, bound: float,
               device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All ``count`` bases of :func:`iter_bases`, stacked: ``[count, rows, cols]``."""
    out = torch.empty(count, rows, cols, device=device, dtype=dtype)
    for start, block in iter_bases(seed, stream, count, rows, cols, bound, device, dtype):
        out[start:start + block.shape[0]] = block
    return out


def kaiming_bound(fan_in: int) -> float:
    """``1 / sqrt(fan_in)``: ``kaiming_uniform_(a = sqrt(5))``'s bound, nn.Linear's init (0 for
    ``fan_in = 0``, whose bases are empty: a layer without inputs, as nn.Linear(0, k))."""
    return 1.0 / math.sqrt(fan_in) if fan_in else 0.0


def rounded_by_cast(before: torch.dtype, after: torch.dtype) -> bool:
    """Whether cached bases cast from ``before`` to ``after`` differ from bases drawn in
    ``after``.  Drawn values are float32 numbers: a cast from float32 or float64 rounds them
    once, as a draw in the new dtype does; a cast from float16 / bfloat16 keeps the half
    precision rounding (cast back to float32, the layer would compute another function
    than the same state dict loaded into a fresh layer)."""
    return before != after and before in (torch.float16, torch.bfloat16)


class SeededBases:
    """Mixin of the modules whose frozen bases are drawn from a seed buffer (NOLA, RandLoRA):
    the bases follow the seed through loads, moves, casts and meta builds.

    The class names its seed buffer (``_seed_buffer``), a basis buffer whose dtype casts
    are watched (``_basis_buffer``; None when the bases are not kept) and a parameter that
    tells a meta module apart (``_coefficient``); it keeps ``_bases_seed`` (the seed the
    bases were drawn from; None: not drawn, as after a meta build) and implements
    ``_draw_bases()`` (draws them from the seed buffer and sets ``_bases_seed``).
    """

    _seed_buffer: str
    _basis_buffer: str
    _coefficient: str
    # The constructor's seed, kept off the buffers (to_empty() from meta leaves the seed
    # buffer uninitialized).  None on a layer pickled before it existed: _apply takes it
    # from the buffer before a move can lose it (_take_seed).
    _seed: Optional[int] = None

    def _take_seed(self) -> None:
        """Sets ``_seed`` from the seed buffer when unknown (a layer pickled before it existed)."""
        seed = self._buffers.get(self._seed_buffer)
        if self._seed is None and seed is not None and not seed.is_meta and values_readable(seed):
            self._seed = int(seed)

    def _restore_seed(self) -> None:
        """Writes the layer's seed back into the seed buffer and draws the bases when they were
        never drawn (built on meta): ``to_empty()`` left both uninitialized memory."""
        seed = getattr(self, self._seed_buffer)
        if self._bases_seed is None and not seed.is_meta:
            seed.fill_(self._seed)
            self._draw_bases()

    def _require_bases(self) -> None:
        """Raises RuntimeError on uninitialized bases (an attribute check: cheap per call)."""
        if self._bases_seed is None and not getattr(self, self._coefficient).is_meta:
            raise RuntimeError(
                f"{type(self).__name__}: the bases and {self._seed_buffer} hold uninitialized memory (the layer was "
                f"built on the meta device, then to_empty()); call reset_parameters() or load_state_dict() first"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + self._seed_buffer not in state_dict:  # strict=False without the seed: keep the layer's own
            self._restore_seed()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        seed = getattr(self, self._seed_buffer)
        if seed.is_meta or int(seed) != self._bases_seed:  # a new seed: the bases go with it
            self._draw_bases()

    def _apply(self, fn, recurse=True):
        self._take_seed()
        basis = getattr(self, self._basis_buffer)
        before = None if basis is None else basis.dtype
        module = super()._apply(fn, recurse)
        if getattr(self, self._seed_buffer).is_meta:  # moved to meta: the values are gone (to_empty() leaves garbage)
            self._bases_seed = None
        elif before is not None and rounded_by_cast(before, getattr(self, self._basis_buffer).dtype):  # .half().float()
            self._draw_bases()
        return module

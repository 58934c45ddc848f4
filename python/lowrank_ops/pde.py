"""Seeded generators of the PDE problem families of SKR (Wang et al., ICLR 2024).

Every family is discretized with 5-point finite differences on the ``n x n`` interior
nodes of the unit square (mesh width ``h = 1 / (n + 1)``, homogeneous Dirichlet
boundary), unknowns numbered row by row (``p = i n + j``, ``i`` the row).  For
``-div(a grad u)`` the coefficient on the face between two nodes is the harmonic mean
of their values (the usual choice for piecewise-constant coefficients: it is exact
for a 1-D interface between the nodes); a face on the boundary takes the interior
node's value.

Families (each returns a :class:`PDEProblem`):

* :func:`darcy`: ``-div(a grad u) = 1``, ``a`` piecewise constant (``high`` where a
  Gaussian random field is >= 0, ``low`` elsewhere; 12 and 3 as in the FNO data).
* :func:`poisson`: ``-lap u = f`` with ``f`` a Gaussian random field (one matrix, many
  right-hand sides; the paper's control case).
* :func:`helmholtz`: ``-lap u - k(x)^2 u = f``, ``k = k0 (1 + c tanh(g))`` for a random
  field ``g`` and a fixed Gaussian source: indefinite once ``k0^2`` exceeds the
  smallest Dirichlet eigenvalue ``2 pi^2``.
* :func:`thermal`: ``-div(kappa grad T) = q``, log-normal conductivity
  ``kappa = exp(g)`` and a Gaussian heat source at a random position.

Randomness: sample ``index`` of a run with ``seed`` is drawn from its own generator,
seeded from ``(seed, index)``, so any subset of a data set can be regenerated (and a
resumed generation job reproduces exactly the samples it had not written yet).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List

import torch

from ._args import require_finite_number, require_fits_in_memory, require_int
from .krylov.operators import CSRMatrix

__all__ = [
    "FAMILIES", "PDEProblem", "darcy", "diffusion_matrix", "gaussian_random_field", "generate", "helmholtz",
    "poisson", "sample_generator", "thermal",
]


@dataclasses.dataclass
class PDEProblem:
    """One discretized problem ``matrix @ u = rhs``.

    Attributes
    ----------
    family : str
    grid : int
        ``n``: interior nodes per side; ``n * n`` unknowns.
    index, seed : int
        Which sample of which run (the sample's randomness depends on these only).
    matrix : CSRMatrix
        ``[n * n, n * n]`` float64.
    rhs : Tensor[n * n]
        float64.
    coefficient : Tensor[n, n]
        The field that varies between samples (``a``, ``f``, ``k`` or ``kappa``): the
        input of a neural operator and the sorting feature of SKR.
    """

    family: str
    grid: int
    index: int
    seed: int
    matrix: CSRMatrix
    rhs: torch.Tensor
    coefficient: torch.Tensor


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` in run ``seed`` (a fixed mix of the two)."""
    # Python ints (a NumPy integer's products overflow int64; a float or str has no place here).
    seed, index = require_int("sample_generator", "seed", seed, 0), require_int("sample_generator", "index", index, 0)
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _check_grid(where: str, grid: int) -> int:
    return require_int(where, "grid", grid)


def _positive_number(where: str, name: str, value) -> float:
    value = require_finite_number(where, name, value)
    if not value > 0:
        raise ValueError(f"{where}: {name} must be a finite number > 0; got {value!r}")
    return value


def gaussian_random_field(grid: int, generator: torch.Generator, *, alpha: float = 2.0, tau: float = 3.0) -> torch.Tensor:
    """A ``[grid, grid]`` float64 sample of a periodic Gaussian random field, normalized to unit variance.

    Covariance ``(-lap + tau^2)^(-alpha)`` (the FNO Darcy generator's): white noise
    filtered by ``(4 pi^2 |k|^2 + tau^2)^(-alpha/2)`` in Fourier space, constant mode removed.
    """
    grid = _check_grid("gaussian_random_field", grid)
    noise = torch.randn(grid, grid, generator=generator, dtype=torch.float64)
    ky = torch.fft.fftfreq(grid, d=1.0 / grid, dtype=torch.float64)
    kx = torch.fft.rfftfreq(grid, d=1.0 / grid, dtype=torch.float64)
    filter_ = (4 * math.pi**2 * (ky[:, None] ** 2 + kx[None, :] ** 2) + tau**2) ** (-alpha / 2)
    filter_[0, 0] = 0.0  # zero mean, as in the FNO generator (else the constant mode decides most thresholds)
    field = torch.fft.irfft2(torch.fft.rfft2(noise) * filter_, s=(grid, grid))
    if grid == 1:  # one node: the zero-mean field is 0 (std() of one value warned and gave NaN)
        return field
    std = field.std()
    return field / std if float(std) > 0 else field


def diffusion_matrix(coefficient: torch.Tensor, shift=None) -> CSRMatrix:
    """5-point ``-div(a grad u) + shift u`` on the interior nodes, Dirichlet boundary.

    Parameters
    ----------
    coefficient : Tensor[n, n]
        ``a`` at the nodes (> 0).
    shift : Tensor[n, n] or float, optional
        Zeroth-order term added to the diagonal (``-k^2`` for Helmholtz).

    Returns
    -------
    CSRMatrix
        ``[n^2, n^2]`` float64, columns sorted within rows.
    """
    if coefficient.dim() != 2 or coefficient.shape[0] != coefficient.shape[1]:
        raise ValueError(f"diffusion_matrix: coefficient has shape {tuple(coefficient.shape)}; expected (n, n)")
    a = coefficient.to(torch.float64)
    if not bool((a > 0).all()):
        raise ValueError("diffusion_matrix: coefficient must be positive everywhere")
    n = a.shape[0]
    h2 = 1.0 / (n + 1) ** 2
    padded = torch.nn.functional.pad(a[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]

    def face(neighbour: torch.Tensor) -> torch.Tensor:
        return 2 * a * neighbour / (a + neighbour) / h2  # harmonic mean (a itself on the boundary)

    north, south = face(padded[:-2, 1:-1]), face(padded[2:, 1:-1])
    west, east = face(padded[1:-1, :-2]), face(padded[1:-1, 2:])
    diagonal = north + south + west + east
    if shift is not None:
        diagonal = diagonal + torch.as_tensor(shift, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    p = rows * n + cols
    # Entries of each row in column order: north (p - n), west (p - 1), centre, east (p + 1), south (p + n).
    values = torch.stack([-north, -west, diagonal, -east, -south], dim=-1).reshape(n * n, 5)
    columns = torch.stack([p - n, p - 1, p, p + 1, p + n], dim=-1).reshape(n * n, 5)
    present = torch.stack([rows > 0, cols > 0, torch.ones_like(rows, dtype=torch.bool), cols < n - 1, rows < n - 1],
                          dim=-1).reshape(n * n, 5)
    row_ptr = torch.zeros(n * n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(present.sum(dim=1), dim=0)
    return CSRMatrix(row_ptr, columns[present], values[present], (n * n, n * n))


def _grid_points(n: int):
    coordinates = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
    return torch.meshgrid(coordinates, coordinates, indexing="ij")  # y (rows), x (columns)


def darcy(grid: int, *, seed: int = 0, index: int = 0, low: float = 3.0, high: float = 12.0) -> PDEProblem:
    """Darcy flow ``-div(a grad u) = 1`` with ``a`` in {low, high} from a thresholded random field.

    Parameters
    ----------
    grid : int
        ``n``, the interior nodes per side (``n * n`` unknowns), >= 1.
    seed, index : int
        The run and the sample in it, both >= 0: the sample's randomness depends on
        these only (:func:`sample_generator`).
    low, high : float
        The permeability where the unit-variance Gaussian random field
        (:func:`gaussian_random_field`) is negative, resp. non-negative; both > 0.

    Returns
    -------
    PDEProblem
        ``matrix`` ``[n^2, n^2]`` (float64 CSR, symmetric positive definite), ``rhs`` all
        ones ``[n^2]`` float64, ``coefficient`` ``a`` ``[n, n]`` float64; on the CPU.

    Raises
    ------
    ValueError
        ``grid`` not an integer >= 1, a negative ``seed`` or ``index``, or a ``low`` or
        ``high`` that is not a finite number > 0 (TypeError: not a number).
    """
    grid = _check_grid("darcy", grid)
    low, high = (_positive_number("darcy", name, value) for name, value in (("low", low), ("high", high)))
    field = gaussian_random_field(grid, sample_generator(seed, index))
    a = torch.where(field >= 0, torch.tensor(high, dtype=torch.float64), torch.tensor(low, dtype=torch.float64))
    return PDEProblem("darcy", grid, index, seed, diffusion_matrix(a), torch.ones(grid * grid, dtype=torch.float64), a)


def poisson(grid: int, *, seed: int = 0, index: int = 0) -> PDEProblem:
    """Poisson ``-lap u = f`` with a random-field right-hand side ``f`` (same matrix for every sample).

    Parameters
    ----------
    grid, seed, index : int
        As in :func:`darcy`.

    Returns
    -------
    PDEProblem
        ``matrix`` the 5-point Laplacian ``[n^2, n^2]`` (float64 CSR, symmetric positive
        definite), ``rhs`` ``f`` flattened ``[n^2]`` float64, ``coefficient`` ``f`` ``[n, n]``
        float64 (a unit-variance Gaussian random field); on the CPU.

    Raises
    ------
    ValueError
        ``grid`` not an integer >= 1, or a negative ``seed`` or ``index``.
    """
    grid = _check_grid("poisson", grid)
    f = gaussian_random_field(grid, sample_generator(seed, index))
    return PDEProblem("poisson", grid, index, seed, diffusion_matrix(torch.ones(grid, grid, dtype=torch.float64)),
                      f.reshape(-1).clone(), f)


def helmholtz(grid: int, *, seed: int = 0, index: int = 0, wavenumber: float = 10.0,
              contrast: float = 0.3) -> PDEProblem:
    """Helmholtz ``-lap u - k^2 u = f``, ``k = wavenumber (1 + contrast tanh(g))``, Gaussian source at the centre.

    Indefinite for ``wavenumber^2 > 2 pi^2`` (about 19.7).

    Parameters
    ----------
    grid, seed, index : int
        As in :func:`darcy`.
    wavenumber : float
        The mean wavenumber ``k_0``.
    contrast : float
        Relative variation of ``k``: ``k`` lies in ``k_0 (1 +/- contrast)``, modulated by
        ``tanh`` of a unit-variance Gaussian random field ``g``.

    Returns
    -------
    PDEProblem
        ``matrix`` ``[n^2, n^2]`` (float64 CSR, symmetric, indefinite for large ``k``),
        ``rhs`` a Gaussian bump of height 1 and standard deviation 0.05 at the centre
        ``[n^2]`` float64, ``coefficient`` ``k`` ``[n, n]`` float64; on the CPU.

    Raises
    ------
    ValueError
        As in :func:`darcy`; a ``wavenumber`` that is not a finite number > 0, a
        ``contrast`` outside ``[0, 1)``.
    """
    grid = _check_grid("helmholtz", grid)
    wavenumber = _positive_number("helmholtz", "wavenumber", wavenumber)
    contrast = require_finite_number("helmholtz", "contrast", contrast)
    if not 0 <= contrast < 1:  # k stays positive
        raise ValueError(f"helmholtz: contrast must be in [0, 1); got {contrast!r}")
    k = wavenumber * (1 + contrast * torch.tanh(gaussian_random_field(grid, sample_generator(seed, index))))
    y, x = _grid_points(grid)
    source = torch.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / (2 * 0.05**2))
    matrix = diffusion_matrix(torch.ones(grid, grid, dtype=torch.float64), shift=-(k**2))
    return PDEProblem("helmholtz", grid, index, seed, matrix, source.reshape(-1).clone(), k)


def thermal(grid: int, *, seed: int = 0, index: int = 0) -> PDEProblem:
    """Steady heat conduction ``-div(kappa grad T) = q``, ``kappa = exp(g)``, Gaussian source at a random point.

    Parameters
    ----------
    grid, seed, index : int
        As in :func:`darcy`.

    Returns
    -------
    PDEProblem
        ``matrix`` ``[n^2, n^2]`` (float64 CSR, symmetric positive definite), ``rhs`` a
        Gaussian source of height 10 and standard deviation 0.1 centred at a random point of
        ``[0.2, 0.8]^2`` ``[n^2]`` float64, ``coefficient`` ``kappa = exp(g)`` ``[n, n]``
        float64 (``g`` a unit-variance Gaussian random field); on the CPU.

    Raises
    ------
    ValueError
        As in :func:`darcy`.
    """
    grid = _check_grid("thermal", grid)
    generator = sample_generator(seed, index)
    kappa = torch.exp(gaussian_random_field(grid, generator))
    centre = 0.2 + 0.6 * torch.rand(2, generator=generator, dtype=torch.float64)
    y, x = _grid_points(grid)
    q = 10.0 * torch.exp(-((x - centre[1]) ** 2 + (y - centre[0]) ** 2) / (2 * 0.1**2))
    return PDEProblem("thermal", grid, index, seed, diffusion_matrix(kappa), q.reshape(-1).clone(), kappa)


#: Family name -> generator ``(grid, seed=, index=) -> PDEProblem``.
FAMILIES: Dict[str, Callable[..., PDEProblem]] = {
    "darcy": darcy, "poisson": poisson, "helmholtz": helmholtz, "thermal": thermal,
}


def generate(family: str, grid: int, num: int, *, seed: int = 0, start: int = 0, **options) -> List[PDEProblem]:
    """Samples ``start, ..., start + num - 1`` of ``family`` on a ``grid x grid`` mesh.

    Parameters
    ----------
    family : {"darcy", "poisson", "helmholtz", "thermal"}
        The generator (:data:`FAMILIES`).
    grid : int
        Interior nodes per side, >= 1.
    num : int
        Number of samples, >= 0.
    seed : int
        The run seed, >= 0.
    start : int
        Index of the first sample, >= 0.
    **options
        Passed to the family's generator (``low``, ``high`` for Darcy; ``wavenumber``,
        ``contrast`` for Helmholtz).

    Returns
    -------
    list of PDEProblem
        ``num`` problems (see :func:`darcy`, :func:`poisson`, :func:`helmholtz`,
        :func:`thermal`), in index order; float64 on the CPU.

    Raises
    ------
    ValueError
        An unknown family, ``num`` not an integer >= 0, or what the generator raises.
    TypeError
        An option the family's generator does not take.
    """
    if family not in FAMILIES:
        raise ValueError(f"generate: family must be one of {sorted(FAMILIES)}; got {family!r}")
    num = require_int("generate", "num", num, 0)
    problems = []
    for i in range(num):
        problems.append(FAMILIES[family](grid, seed=seed, index=start + i, **options))
        if i == 0:
            _check_fits(num, grid, problems[0])
    return problems


def _check_fits(num: int, grid: int, problem: PDEProblem) -> None:
    """Refuse a ``num`` whose problems cannot all be held in memory, from the first one's size
    (``num=10**12`` filled memory for hours before failing)."""
    tensors = (problem.matrix.row_ptr, problem.matrix.col_idx, problem.matrix.values, problem.rhs,
               problem.coefficient)
    require_fits_in_memory("generate", "num", num, sum(t.numel() * t.element_size() for t in tensors),
                           f"problems of grid {grid}",
                           "; generate them in parts (start=...), or with lowrank-ops generate, which writes shards")

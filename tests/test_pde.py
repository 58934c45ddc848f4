"""PDE problem generators (ALGORITHMS.md section 7): matrices against a dense finite-difference build."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowrank_ops import pde


def _dense_fd(a: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """-div(a grad u) + shift u, node by node: harmonic-mean faces, boundary faces take the node's a."""
    n = a.shape[0]
    h2 = 1.0 / (n + 1) ** 2
    A = np.zeros((n * n, n * n))
    for i in range(n):
        for j in range(n):
            p = i * n + j
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ii, jj = i + di, j + dj
                inside = 0 <= ii < n and 0 <= jj < n
                neighbour = a[ii, jj] if inside else a[i, j]
                weight = 2 * a[i, j] * neighbour / (a[i, j] + neighbour) / h2
                A[p, p] += weight
                if inside:
                    A[p, ii * n + jj] -= weight
            A[p, p] += shift[i, j]
    return A


@pytest.mark.parametrize("family", sorted(pde.FAMILIES))
def test_matrix_matches_dense_finite_differences(family):
    problem = pde.FAMILIES[family](6, seed=4, index=3)
    field = problem.coefficient.numpy()
    ones = np.ones((6, 6))
    a = field if family in ("darcy", "thermal") else ones
    shift = -field**2 if family == "helmholtz" else 0 * ones
    expected = _dense_fd(a, shift)
    actual = problem.matrix.to_dense().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-14, atol=0)
    assert problem.matrix.nnz == np.count_nonzero(expected)
    assert problem.rhs.shape == (36,) and problem.coefficient.shape == (6, 6)


def test_right_hand_sides():
    n = 8
    y, x = np.meshgrid(np.arange(1, n + 1) / (n + 1), np.arange(1, n + 1) / (n + 1), indexing="ij")
    np.testing.assert_array_equal(pde.darcy(n).rhs.numpy(), np.ones(n * n))
    poisson = pde.poisson(n, seed=1, index=2)
    np.testing.assert_array_equal(poisson.rhs.numpy(), poisson.coefficient.numpy().reshape(-1))
    source = np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / (2 * 0.05**2))
    np.testing.assert_allclose(pde.helmholtz(n).rhs.numpy(), source.reshape(-1), rtol=1e-14)


def test_families_have_the_documented_structure():
    darcy = pde.darcy(32, seed=0, index=1)
    assert set(torch.unique(darcy.coefficient).tolist()) == {3.0, 12.0}
    for family in ("darcy", "poisson", "thermal"):  # SPD
        dense = pde.FAMILIES[family](12, index=5).matrix.to_dense()
        torch.testing.assert_close(dense, dense.T, rtol=0, atol=0)
        assert float(torch.linalg.eigvalsh(dense).min()) > 0
    helmholtz = pde.helmholtz(16, index=5).matrix.to_dense()
    eigenvalues = torch.linalg.eigvalsh(helmholtz)
    assert float(eigenvalues.min()) < 0 < float(eigenvalues.max())  # indefinite
    thermal = pde.thermal(16, index=2)
    assert bool((thermal.coefficient > 0).all()) and float(thermal.rhs.max()) > 0


def test_seeded_and_independent_per_index():
    first = pde.generate("thermal", 10, 3, seed=7)
    again = pde.generate("thermal", 10, 2, seed=7, start=1)
    for left, right in zip(first[1:], again):
        assert torch.equal(left.coefficient, right.coefficient) and torch.equal(left.rhs, right.rhs)
        assert torch.equal(left.matrix.values, right.matrix.values)
    assert not torch.equal(first[0].coefficient, first[1].coefficient)
    assert not torch.equal(pde.darcy(10, seed=1).coefficient, pde.darcy(10, seed=2).coefficient)


def test_numpy_integer_seeds_and_indices():
    # A NumPy int64 seed or index (an np.arange loop) overflowed the seed mixing (OverflowError).
    for i in np.arange(2):
        assert torch.equal(pde.darcy(8, index=i).coefficient, pde.darcy(8, index=int(i)).coefficient)
    problems = pde.generate("poisson", 8, 2, seed=np.int64(1))
    assert [p.index for p in problems] == [0, 1]
    for bad in (1.5, "1", -1, True):
        with pytest.raises(ValueError, match=rf"seed must be an integer >= 0; got {bad!r}"):
            pde.darcy(8, seed=bad)


def test_random_field_statistics():
    # Unit variance by construction; neighbouring nodes strongly correlated (smooth field).
    fields = torch.stack([pde.gaussian_random_field(64, pde.sample_generator(0, i)) for i in range(20)])
    assert fields.std().item() == pytest.approx(1.0, rel=1e-2)
    correlation = (fields[:, :, 1:] * fields[:, :, :-1]).mean() / fields.var()
    assert correlation.item() > 0.9
    assert math.isfinite(fields.sum().item())


def test_bad_input():
    with pytest.raises(ValueError, match="grid must be an integer >= 1; got 0"):
        pde.darcy(0)
    with pytest.raises(ValueError, match="family must be one of"):
        pde.generate("navier-stokes", 8, 2)
    with pytest.raises(ValueError, match="num must be an integer >= 0"):
        pde.generate("darcy", 8, -1)
    # num=10**12 built problems until memory ran out; the first one's size refuses it at once.
    with pytest.raises(MemoryError, match=r"generate: num = 1000000000000 problems of grid 8 need .* GiB, more than"):
        pde.generate("darcy", 8, 10**12)
    with pytest.raises(ValueError, match="coefficient must be positive"):
        pde.diffusion_matrix(-torch.ones(4, 4))
    with pytest.raises(ValueError, match="seed must be an integer >= 0; got -1"):
        pde.sample_generator(-1, 0)
    with pytest.raises(ValueError, match="index must be an integer >= 0; got -2"):
        pde.sample_generator(0, -2)


def test_bad_settings_are_named():
    """low / high / wavenumber / contrast errors name the argument (they came from
    diffusion_matrix or CSRMatrix: "coefficient must be positive", "values holds ... non-finite")."""
    for kwargs, message in ((dict(low=0.0), "darcy: low must be a finite number > 0; got 0.0"),
                            (dict(high=float("nan")), "darcy: high must be finite; got nan"),
                            (dict(low=float("inf")), "darcy: low must be finite; got inf")):
        with pytest.raises(ValueError, match=message):
            pde.darcy(4, **kwargs)
    with pytest.raises(ValueError, match="helmholtz: wavenumber must be finite; got nan"):
        pde.helmholtz(4, wavenumber=float("nan"))
    with pytest.raises(ValueError, match=r"helmholtz: contrast must be in \[0, 1\); got 1.5"):
        pde.helmholtz(4, contrast=1.5)


def test_one_node_grid_is_quiet():
    """grid = 1: one unknown; the zero-mean random field there is 0 (std() of one value
    warned "degrees of freedom <= 0")."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for family in ("darcy", "poisson", "helmholtz", "thermal"):
            problem = getattr(pde, family)(1)
            assert problem.matrix.shape == (1, 1) and torch.isfinite(problem.coefficient).all()

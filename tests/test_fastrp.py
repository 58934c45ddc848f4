"""FastRP node embeddings (lowrank_ops.methods.fastrp) against a float64 dense reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import torch

from lowrank_ops.methods.fastrp import DEFAULT_WEIGHTS, fastrp, sparse_random_projection


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _random_graph(n: int, density: float, seed: int, *, symmetric=True, isolated=(), weighted=True) -> torch.Tensor:
    """Dense float64 ``[n, n]`` adjacency with random positive weights in [0.5, 1.5) (never
    zeros on the stored pattern), no self-loops, the nodes of ``isolated`` without edges."""
    g = _gen(seed)
    mask = torch.rand(n, n, generator=g, dtype=torch.float64) < density
    if symmetric:
        mask = torch.triu(mask, 1)
        mask = mask | mask.t()
    mask.fill_diagonal_(False)
    for i in isolated:
        mask[i, :] = False
        mask[:, i] = False
    weights = 0.5 + torch.rand(n, n, generator=g, dtype=torch.float64) if weighted else torch.ones(n, n, dtype=torch.float64)
    if symmetric:
        weights = (weights + weights.t()) / 2
    return torch.where(mask, weights, torch.zeros_like(weights))


def _reference(S: torch.Tensor, R: torch.Tensor, weights, beta: float, normalize: bool) -> torch.Tensor:
    """Algorithm 1 of the paper in dense float64: N_1 = A L R, N_i = A N_{i-1}, A = D^-1 S,
    L = diag((d_j / 2m)^beta) (0 for degree-0 nodes), each N_i row-normalized if asked."""
    S, R = S.double().cpu(), R.double().cpu()
    d = S.sum(1)
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    A = inv[:, None] * S
    L = torch.where(d > 0, (d / d.sum()) ** beta, torch.zeros_like(d))
    N = A @ (L[:, None] * R)
    out = torch.zeros_like(N)
    for i, alpha in enumerate(weights):
        if i > 0:
            N = A @ N
        term = N
        if normalize:
            norms = N.norm(dim=1, keepdim=True)
            term = torch.where(norms > 0, N / norms, torch.zeros_like(N))
        out += alpha * term
    return out


# Tolerances (max |ours - ref| / max |ref|).  Every product A X is a convex combination of
# at most deg_max + 1 (16 here) rows per output row (A row-stochastic), so one product adds
# at most ~16 u relative to max |X|; 5 products and the row normalization (a row norm is a
# sum of dim = 24 squares: ~24 u relative) stay below ~110 u: 1e-13 for float64 (u = 1.1e-16;
# measured 7.5e-16) and 1e-5 for float32 (u = 6e-8: 110 u = 6.6e-6; measured 2.3e-7).  The
# row normalization divides by a row norm; the graphs here have no row of N_i near zero
# other than exact zeros (degree-0 nodes), so no cancellation amplifies these bounds.
TOL = {torch.float64: 1e-13, torch.float32: 1e-5}


def _rel(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double().cpu() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, -0.7, 0.5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_dense_reference(device, dtype, beta, normalize, symmetric):
    n, dim = 120, 24
    S = _random_graph(n, 0.08, seed=1, symmetric=symmetric, isolated=(3, 77))
    R = sparse_random_projection(n, dim, s=3, generator=_gen(2), dtype=torch.float64).to_dense()
    weights = (0.5, -0.25, 1.0, 6.0, 2.0)
    expected = _reference(S, R, weights, beta, normalize)
    adjacency = S.to(dtype).to_sparse_csr().to(device)
    out = fastrp(adjacency, dim, weights=weights, beta=beta, normalize=normalize, projection=R.to(dtype).to(device))
    assert out.shape == (n, dim) and out.dtype == dtype and out.device.type == device and out.is_contiguous()
    assert _rel(out, expected) <= TOL[dtype]


def test_matches_reference_with_drawn_projection():
    """The default path (R drawn inside) equals the reference with the R that
    sparse_random_projection draws from the same generator state."""
    n, dim = 90, 16
    S = _random_graph(n, 0.1, seed=3)
    out = fastrp(S, dim, beta=-0.5, generator=_gen(11))
    R = sparse_random_projection(n, dim, generator=_gen(11), dtype=torch.float64).to_dense()
    assert _rel(out, _reference(S, R, DEFAULT_WEIGHTS, -0.5, True)) <= TOL[torch.float64]


def test_sparse_projection_statistics():
    """R's entries are 0 or +-sqrt(s), with P(nonzero) = 1/s, symmetric signs, E[R R^T] = dim I.

    Tolerances: 5 standard deviations of each statistic (two-sided: a false failure has
    probability < 1e-6 per check; the seed is fixed anyway).
    """
    n, dim, s = 600, 400, 7.0
    R = sparse_random_projection(n, dim, s=s, generator=_gen(5), dtype=torch.float64)
    assert R.is_sparse and R.is_coalesced() and R.shape == (n, dim)
    values = R.values()
    assert torch.equal(values.abs(), torch.full_like(values, math.sqrt(s)))
    total, p = n * dim, 1 / s
    nnz = values.numel()
    assert abs(nnz - total * p) <= 5 * math.sqrt(total * p * (1 - p))  # Binomial(total, 1/s)
    assert abs(int((values > 0).sum()) - nnz / 2) <= 5 * math.sqrt(nnz / 4)  # signs: Binomial(nnz, 1/2)
    # Positions: every column's count is Binomial(n, 1/s); their chi-square statistic has
    # mean ~ dim - 1 and sd ~ sqrt(2 (dim - 1)) (uniform placement, no drift along the draw).
    counts = torch.bincount(R.indices()[1], minlength=dim).double()
    expected = n * p
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - p))).sum())
    assert abs(chi2 - (dim - 1)) <= 5 * math.sqrt(2 * (dim - 1))
    # Rows likewise (the geometric gaps run row-major across the whole matrix).
    row_counts = torch.bincount(R.indices()[0], minlength=n).double()
    chi2_rows = float(((row_counts - dim * p) ** 2 / (dim * p * (1 - p))).sum())
    assert abs(chi2_rows - (n - 1)) <= 5 * math.sqrt(2 * (n - 1))
    # Gram: diag(R R^T)_i = s * Binomial(dim, 1/s): mean dim, variance dim (s - 1); the
    # mean over n rows has sd sqrt(dim (s - 1) / n).  Off-diagonals: mean 0, variance dim,
    # pairwise uncorrelated, so their mean over P pairs has sd sqrt(dim / P).
    dense = R.to_dense()
    gram = dense @ dense.t()
    diag = gram.diagonal()
    assert abs(float(diag.mean()) - dim) <= 5 * math.sqrt(dim * (s - 1) / n)
    off = gram[~torch.eye(n, dtype=torch.bool)]
    assert abs(float(off.mean())) <= 5 * math.sqrt(dim / off.numel()) * math.sqrt(2)  # each pair counted twice


def test_sparse_projection_defaults_and_limits():
    n, dim = 400, 50
    R = sparse_random_projection(n, dim, generator=_gen(0))
    assert R.dtype == torch.float32
    assert torch.equal(R.values().abs(), torch.full_like(R.values(), math.sqrt(math.sqrt(n))))  # s = sqrt(n) = 20
    dense = sparse_random_projection(30, 7, s=1, generator=_gen(0))
    assert dense._nnz() == 30 * 7 and torch.equal(dense.values().abs(), torch.ones(30 * 7))
    assert sparse_random_projection(0, 5)._nnz() == 0
    a = sparse_random_projection(50, 9, s=3, generator=_gen(4)).to_dense()
    b = sparse_random_projection(50, 9, s=3, generator=_gen(4)).to_dense()
    assert torch.equal(a, b)


@pytest.mark.parametrize("beta", [0.0, -0.9])
def test_isolated_nodes_give_zero_rows(device, beta):
    n = 40
    isolated = (0, 17, 39)
    S = _random_graph(n, 0.15, seed=8, isolated=isolated).to(device)
    out = fastrp(S, 12, beta=beta, generator=_gen(1, device))
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[list(isolated)], torch.zeros(len(isolated), 12, dtype=out.dtype, device=device))
    others = [i for i in range(n) if i not in isolated]
    assert bool((out[others].norm(dim=1) > 0).all())
    # No edges at all: every row is zero, still no NaN (2m = 0).
    empty = fastrp(torch.zeros(5, 5, device=device), 3, beta=beta, generator=_gen(1, device))
    assert torch.equal(empty, torch.zeros(5, 3, device=device))
    assert fastrp(torch.zeros(0, 0, device=device), 4).shape == (0, 4)


def test_determinism_with_generator():
    S = _random_graph(60, 0.1, seed=2).float()
    a = fastrp(S, 16, generator=_gen(7))
    b = fastrp(S, 16, generator=_gen(7))
    c = fastrp(S, 16, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # All weights 0: the zero embedding (the products still run; nothing is accumulated).
    assert torch.equal(fastrp(S, 16, weights=(0.0, 0.0), generator=_gen(7)), torch.zeros(60, 16))


def test_input_formats_agree():
    """scipy (CSR, COO with duplicates), torch sparse (COO uncoalesced, CSR) and dense inputs
    of one matrix give bit-identical embeddings (same R: same generator state)."""
    n, dim = 70, 10
    S = _random_graph(n, 0.1, seed=4)
    rows, cols = S.nonzero(as_tuple=True)
    vals = S[rows, cols]
    # The COO inputs store each entry as two halves (duplicates to be summed).
    dup_rows, dup_cols = torch.cat([rows, rows]), torch.cat([cols, cols])
    dup_vals = torch.cat([vals / 2, vals / 2])
    inputs = {
        "dense": S,
        "torch_csr": S.to_sparse_csr(),
        "torch_coo_dup": torch.sparse_coo_tensor(torch.stack([dup_rows, dup_cols]), dup_vals, (n, n), check_invariants=False),
        "scipy_csr": scipy.sparse.csr_matrix(S.numpy()),
        "scipy_coo_dup": scipy.sparse.coo_matrix((dup_vals.numpy(), (dup_rows.numpy(), dup_cols.numpy())), shape=(n, n)),
        "scipy_csr_array": scipy.sparse.csr_array(S.numpy()),
    }
    outs = {name: fastrp(a, dim, beta=-0.3, generator=_gen(3)) for name, a in inputs.items()}
    reference = outs["dense"]
    assert reference.dtype == torch.float64
    for name, out in outs.items():
        # The halves sum exactly (v/2 + v/2 = v in binary floating point): identical inputs.
        assert torch.equal(out, reference), name
    # The caller's scipy COO matrix is not modified (duplicates summed in a copy).
    assert inputs["scipy_coo_dup"].nnz == 2 * rows.numel()
    # dtype: float32 inputs give float32, explicit dtype wins, integer adjacency -> float32.
    assert fastrp(S.float(), dim, generator=_gen(3)).dtype == torch.float32
    assert fastrp(scipy.sparse.csr_matrix(S.numpy()), dim, dtype=torch.float32, generator=_gen(3)).dtype == torch.float32
    assert fastrp((S > 0).to(torch.int64), dim, generator=_gen(3)).dtype == torch.float32


def test_planted_communities_separate():
    """Two dense blocks (p_in = 0.15) with few cross edges (p_out = 0.005): the embeddings'
    nearest class centroid (cosine) recovers the blocks (a functional check of FastRP)."""
    sizes, p_in, p_out = (150, 150), 0.15, 0.005
    n = sum(sizes)
    labels = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    same = labels[:, None] == labels[None, :]
    g = _gen(21)
    prob = torch.where(same, torch.tensor(p_in), torch.tensor(p_out))
    upper = torch.triu(torch.rand(n, n, generator=g) < prob, 1)
    S = (upper | upper.t()).float()
    emb = fastrp(S.to_sparse(), 64, beta=-0.5, generator=_gen(22))
    emb = emb / emb.norm(dim=1, keepdim=True)
    centroids = torch.stack([emb[labels == c].mean(0) for c in range(2)])
    predicted = (emb @ centroids.t()).argmax(1)
    accuracy = float((predicted == labels).double().mean())
    assert accuracy >= 0.98, accuracy
    # Control: the same check on a graph without communities (one block, same degree) is
    # at chance level, so the test can fail.
    flat = torch.triu(torch.rand(n, n, generator=g) < (p_in * 150 + p_out * 150) / n, 1)
    S_flat = (flat | flat.t()).float()
    emb_flat = fastrp(S_flat, 64, beta=-0.5, generator=_gen(22))
    emb_flat = emb_flat / emb_flat.norm(dim=1, keepdim=True)
    centroids_flat = torch.stack([emb_flat[labels == c].mean(0) for c in range(2)])
    accuracy_flat = float(((emb_flat @ centroids_flat.t()).argmax(1) == labels).double().mean())
    assert accuracy_flat < 0.8, accuracy_flat


def test_bad_input():
    S = _random_graph(10, 0.3, seed=0)
    # torch's "geometric_(): argument 'generator' must be torch.Generator, not int" before.
    with pytest.raises(TypeError, match="sparse_random_projection: generator must be a torch.Generator or None"):
        fastrp(S, 4, generator=5)
    with pytest.raises(ValueError, match="adjacency must be square"):
        fastrp(torch.ones(3, 4), 2)
    with pytest.raises(ValueError, match="adjacency must be square"):
        fastrp(scipy.sparse.csr_matrix(np.ones((3, 4))), 2)
    with pytest.raises(ValueError, match="adjacency must be 2-D"):
        fastrp(torch.ones(2, 3, 3), 2)
    with pytest.raises(ValueError, match="non-negative weights.*-1"):
        fastrp(S - torch.eye(10, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="non-finite"):
        fastrp(torch.where(S > 0, torch.tensor(float("nan"), dtype=torch.float64), S), 2)
    with pytest.raises(TypeError, match="adjacency must be a torch tensor"):
        fastrp(S.tolist(), 2)
    with pytest.raises(TypeError, match="adjacency must be real"):
        fastrp(S.to(torch.complex128), 2)
    with pytest.raises(ValueError, match="dim must be an integer >= 1; got 0"):
        fastrp(S, 0)
    with pytest.raises(ValueError, match="weights must hold at least one"):
        fastrp(S, 2, weights=())
    with pytest.raises(TypeError, match="weights must be a sequence"):
        fastrp(S, 2, weights=1.0)
    with pytest.raises(ValueError, match=r"weights\[1\] must be finite; got inf"):
        fastrp(S, 2, weights=(1.0, float("inf")))
    with pytest.raises(ValueError, match="beta must be finite; got nan"):
        fastrp(S, 2, beta=float("nan"))
    with pytest.raises(TypeError, match="weights\\[0\\] must be a number; got str"):
        fastrp(S, 2, weights=("1",))
    # NumPy scalars are numbers too.
    assert fastrp(S, 2, weights=(np.float32(1.0),), beta=np.float64(-0.5), generator=_gen(0)).shape == (10, 2)
    with pytest.raises(ValueError, match="s must be >= 1"):
        fastrp(S, 2, s=0.5)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        fastrp(S, 2, normalize=1)
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        fastrp(S, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"projection has shape \(10, 3\); expected \(n, dim\) = \(10, 2\)"):
        fastrp(S, 2, projection=torch.ones(10, 3))
    with pytest.raises(TypeError, match="projection must be a tensor"):
        fastrp(S, 2, projection=np.ones((10, 2)))
    with pytest.raises(ValueError, match="projection has non-finite"):
        fastrp(S, 2, projection=torch.full((10, 2), float("inf")))
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        sparse_random_projection(-1, 3)
    with pytest.raises(ValueError, match="s must be >= 1"):
        sparse_random_projection(5, 3, s=float("inf"))


@pytest.mark.parametrize("dtype, scales", [(torch.float32, (1e38, 1e-40)), (torch.float64, (1e300, 1e-310))], ids=str)
@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_embeddings_do_not_depend_on_the_weights_scale(dtype, scales, beta):
    """A = D^-1 S and L = (d / 2m)^beta do not change when S is scaled; the degrees were
    summed in S's dtype: float32 weights of 1e38 gave all-zero embeddings (overflowing
    degrees), with beta < 0 or subnormal weights NaN.  Now equal to the unscaled graph's."""
    generator = torch.Generator().manual_seed(4)
    S = torch.rand(30, 30, generator=generator, dtype=torch.float64)
    S = ((S + S.T) * (S + S.T > 1.2)).to(dtype)  # a sparse symmetric weighted graph
    for scale in scales:
        scaled = S * scale
        got = fastrp(scaled, 8, beta=beta, generator=torch.Generator().manual_seed(0))
        # The reference: the same rounded weights, unscaled in float64 (exact for powers of
        # two and within an ulp otherwise), embedded in float64.
        expected = fastrp(scaled.double() / scale, 8, beta=beta, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12)

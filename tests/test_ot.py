"""Tests of the entropic OT family: kernels (lowrank_ops.ops.ot) and solvers (lowrank_ops.ot).

References: float64 torch compositions (lowrank_ops.reference) for the kernels, POT
(``ot.sinkhorn(..., method="sinkhorn_log")`` and ``ot.emd2``) for the solvers.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from lowrank_ops import reference
from lowrank_ops._extension import extension
from lowrank_ops.ops import ot as ot_ops
from lowrank_ops.ot import OTResult, sinkhorn, sinkhorn_newton_sparse

from helpers import assert_backward_ignores_autocast


@pytest.fixture
def pot():
    """POT, the peer: only the tests that compare with it need it (the GPU machine has none)."""
    return pytest.importorskip("ot")


F64 = torch.float64
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def _masses(batch, n, generator, dtype=F64):
    w = torch.rand(*batch, n, generator=generator, dtype=F64) + 0.5
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def _lse_bound(s: torch.Tensor, dim: int, dtype) -> torch.Tensor:
    # Each entry s_ij = (f + g - C) / reg is rounded from terms of size |f| + |g| + |C|
    # (three roundings, relative u each, divided by reg: 4 u (|f| + |g| + |C|) / reg),
    # the exponentials and the sum add (m + 8) u relative to the sum: an absolute error
    # of (m + 8) u on the log (the polynomial exp is within 2 u).
    u = EPS[dtype]
    return 4 * u * s.abs().amax(dim) + (s.shape[dim] + 8) * u


def _problem(batch, n, m, d, generator, dtype=F64, device="cpu"):
    C = torch.rand(batch, n, m, generator=generator, dtype=F64).to(device=device, dtype=dtype)
    x = torch.randn(batch, n, d, generator=generator, dtype=F64).to(device=device, dtype=dtype)
    y = torch.randn(batch, m, d, generator=generator, dtype=F64).to(device=device, dtype=dtype)
    f = (0.1 * torch.randn(batch, n, generator=generator, dtype=F64)).to(device=device, dtype=dtype)
    g = (0.1 * torch.randn(batch, m, generator=generator, dtype=F64)).to(device=device, dtype=dtype)
    return C, x, y, f, g


# ---------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("source", ["matrix", "matrix_transposed", "sqeuclidean", "l1"])
@pytest.mark.parametrize("columns", [False, True])
def test_row_lse_matches_reference(device, generator, dtype, source, columns):
    C, x, y, f, g = _problem(2, 37, 300, 3, generator, dtype, device)  # 300 > one column block
    reg = 0.01
    if source == "matrix_transposed":  # non-contiguous: C stored as [B, m, n]
        C = C.transpose(1, 2).contiguous().transpose(1, 2)
    if source.startswith("matrix"):
        lse, mean_cost = ot_ops.row_lse(C, None, None, f, g, reg, 0, columns=columns, with_cost=True)
        dense = C
    else:
        code = ot_ops.COST_CODES[source]
        lse, mean_cost = ot_ops.row_lse(None, x, y, f, g, reg, code, columns=columns, with_cost=True)
        dense = reference.ot_point_cost(x.double(), y.double(), source)
    ref_lse, ref_cost = reference.ot_row_lse(dense.double(), f.double(), g.double(), reg, columns)
    s = reference.ot_log_plan(dense.double(), f.double(), g.double(), reg)
    dim = 1 if columns else 2
    bound = _lse_bound(s, dim, dtype)
    if source != "matrix" and source != "matrix_transposed" and dtype == torch.float32:
        # The point cost itself is rounded in float32 (d terms): relative (d + 2) u of C.
        bound = bound + 5 * EPS[dtype] * (dense.double().abs() / reg).amax(dim)
    assert torch.isfinite(lse).all()
    assert ((lse.double().cpu() - ref_lse.cpu()).abs() <= bound.cpu()).all()
    # mean cost: a convex combination of costs, each weight relative error <= exp(bound) - 1
    weight_error = torch.expm1(2 * bound) * dense.double().abs().amax(dim)
    assert ((mean_cost.double() - ref_cost).abs() <= weight_error + 8 * EPS[dtype] * ref_cost.abs()).all()


@pytest.mark.parametrize("columns", [False, True])
def test_row_lse_skips_entries_that_underflow_to_zero(device, generator, columns):
    """Log-plan entries (f + g - C) / reg that overflow to -inf in float32 (finite costs
    of 3e38 at reg = 0.01) add exp(-inf) = 0, also when they fill the first column block
    of a row or column or the first entries of a warp's lanes (the online maximum is then
    still -inf: exp(-inf - (-inf)) must not be taken).  Every row and column keeps a
    finite entry.  The float64 reference sees them as finite (about -3e40) and equally
    negligible."""
    C, _, _, f, g = _problem(1, 300, 300, 1, generator, torch.float32, device)
    C[:, :, :260] = 3e38  # more than the CPU kernel's 256-column block
    C[:, 290, :260] = 0.5
    C[:, :260, :] = 3e38
    C[:, :260, 295] = 0.5
    lse, mean_cost = ot_ops.row_lse(C, None, None, f, g, 0.01, 0, columns=columns, with_cost=True)
    s = reference.ot_log_plan(C.double(), f.double(), g.double(), 0.01)
    ref_lse, ref_cost = reference.ot_row_lse(C.double(), f.double(), g.double(), 0.01, columns)
    dim = 1 if columns else 2
    bound = _lse_bound(s.where(C.cpu() < 1e38, 0), dim, torch.float32)  # the huge entries add exactly 0
    assert torch.isfinite(lse).all() and torch.isfinite(mean_cost).all()
    assert ((lse.double().cpu() - ref_lse.cpu()).abs() <= bound.cpu()).all()
    finite_cost = C.double().cpu().where(C.cpu() < 1e38, 0).abs().amax(dim)  # the huge costs' weights are 0
    assert ((mean_cost.double().cpu() - ref_cost.cpu()).abs()
            <= (torch.expm1(2 * bound) * finite_cost + 8 * EPS[torch.float32] * ref_cost.abs()).cpu()).all()


@pytest.mark.parametrize("columns", [False, True])
def test_row_lse_infinite_costs_have_no_weight(device, generator, columns):
    """A cost of +inf (a forbidden pair) is an entry of mass exp(-inf) = 0: it adds
    nothing to the marginal and nothing to the mean cost, on every device (0 * inf
    used to make the CPU's mean cost NaN while CUDA skipped the entry).  Every row and
    column keeps finite entries; the reference drops the forbidden ones."""
    C, _, _, f, g = _problem(2, 37, 300, 1, generator, F64, device)
    forbidden = torch.rand(C.shape, generator=generator, dtype=F64) < 0.3
    forbidden[:, :, 0] = False
    forbidden[:, 0, :] = False
    forbidden = forbidden.to(device)
    lse, mean_cost = ot_ops.row_lse(C.masked_fill(forbidden, math.inf), None, None, f, g, 0.1, 0,
                                    columns=columns, with_cost=True)
    s = reference.ot_log_plan(C, f, g, 0.1).masked_fill(forbidden, -math.inf)
    dim = 1 if columns else 2
    weights = torch.softmax(s, dim)
    assert torch.isfinite(lse).all() and torch.isfinite(mean_cost).all()
    assert torch.allclose(lse, s.logsumexp(dim), rtol=0, atol=1e-12)
    assert torch.allclose(mean_cost, (weights * C).sum(dim), rtol=1e-12, atol=0)


def test_row_lse_active_mask_and_empty(generator):
    C, _, _, f, g = _problem(3, 5, 4, 1, generator)
    active = torch.tensor([True, False, True])
    lse, _ = ot_ops.row_lse(C, None, None, f, g, 0.1, 0, active)
    ref, _ = reference.ot_row_lse(C, f, g, 0.1)
    assert torch.equal(lse[1], torch.zeros(5, dtype=F64))
    assert torch.allclose(lse[[0, 2]], ref[[0, 2]], rtol=0, atol=1e-13)
    empty = torch.empty(0, 5, 4, dtype=F64)
    lse, _ = ot_ops.row_lse(empty, None, None, f[:0], g[:0], 0.1, 0)
    assert lse.shape == (0, 5)


def test_entries_on_a_threshold_are_kept_alike_on_every_device(device):
    """Log-plan entries are (f + g - C) * (1 / reg) on every device: CUDA divided by reg, and
    an entry on the threshold (-3.0 or -2.9999999999999996 by the two roundings) was kept on one device
    and dropped on the other (counts, fills and histograms)."""
    C = torch.tensor([[[0.3]]], dtype=F64, device=device)
    f = torch.zeros(1, 1, dtype=F64, device=device)
    threshold = torch.tensor([-2.9999999999999996], dtype=F64, device=device)
    assert (-0.3) * (1 / 0.1) < threshold.item() == -0.3 / 0.1  # kept (s >= threshold) only when divided
    row_ptr, _, _ = ot_ops.sparsify(C, None, None, f, f, 0.1, 0, None, threshold)
    assert int(row_ptr[-1]) == 0
    lo = threshold.clone()
    counts = ot_ops.log_histogram(C, None, None, f, f, 0.1, 0, None, lo, lo + 1.0, 4)
    assert int(counts.sum()) == 0


@pytest.mark.parametrize("source", ["matrix", "sqeuclidean"])
def test_histogram_and_sparsify(device, generator, source):
    C, x, y, f, g = _problem(2, 40, 70, 2, generator, F64, device)
    reg = 0.02
    args = (C, None, None) if source == "matrix" else (None, x, y)
    code = ot_ops.COST_CODES[source]
    dense = C if source == "matrix" else reference.ot_point_cost(x, y, source)
    s = reference.ot_log_plan(dense, f, g, reg)
    hi = s.amax((1, 2)) + 1.0
    lo = hi - 30.0
    counts = ot_ops.log_histogram(*args, f, g, reg, code, None, lo, hi, 16)
    width = (hi - lo) / 16
    position = ((s - lo[:, None, None]) / width[:, None, None]).floor().clamp(max=15)
    for b in range(2):
        inside = position[b][s[b] >= lo[b]].long()
        assert torch.equal(counts[b].cpu(), torch.bincount(inside.flatten().cpu(), minlength=16))
    threshold = torch.quantile(s.flatten(1), 0.9, dim=1)
    row_ptr, col_idx, values = ot_ops.sparsify(*args, f, g, reg, code, None, threshold)
    kept = s >= threshold[:, None, None]
    assert int(row_ptr[-1]) == int(kept.sum())
    rows = torch.repeat_interleave(torch.arange(2 * 40, device=device), row_ptr[1:] - row_ptr[:-1])
    dense_kept = torch.zeros(2 * 40, 70, dtype=F64, device=device)
    dense_kept[rows, col_idx] = values
    ref = torch.where(kept, s.exp(), torch.zeros_like(s)).reshape(2 * 40, 70)
    assert torch.allclose(dense_kept, ref, rtol=1e-13, atol=0)


def test_histogram_of_more_problems_than_a_grid_dimension(device, generator):
    """70,000 problems: the CUDA kernel had one grid row per problem and refused batches
    beyond gridDim.y's 65535 ("batch must be <= 65535 on CUDA") where the CPU took any."""
    batch = 70_000
    C = torch.rand(batch, 2, 3, dtype=F64, generator=generator).to(device)
    f, g = torch.zeros(batch, 2, dtype=F64, device=device), torch.zeros(batch, 3, dtype=F64, device=device)
    lo, hi = torch.full((batch,), -1.0, dtype=F64, device=device), torch.zeros(batch, dtype=F64, device=device)
    counts = ot_ops.log_histogram(C, None, None, f, g, 1.0, 0, None, lo, hi, 4)
    position = ((-C.cpu() + 1.0) * 4).floor().clamp(max=3).long().flatten(1)  # s = -C in [-1, 0]: every entry counted
    expected = torch.zeros(batch, 4, dtype=torch.int64).scatter_add_(1, position, torch.ones_like(position))
    assert torch.equal(counts.cpu(), expected)


@pytest.mark.parametrize("lo, hi", [(0.0, 0.0), (1.0, 0.0), (-math.inf, 0.0)], ids=["equal", "reversed", "infinite"])
def test_histogram_degenerate_range_stays_in_bounds(device, lo, hi):
    """hi <= lo (hi == lo happens in SNS's fine level when the bin width rounds away) or an
    infinite lo: the bin position is NaN or negative, which used to be converted to an
    index outside the histogram (out-of-bounds writes).  Every counted entry goes to bin 0."""
    C = torch.zeros(2, 5, 7, dtype=F64, device=device)
    f = torch.full((2, 5), 2.0 if lo == 1.0 else 0.0, dtype=F64, device=device)  # s = f: 2 >= lo, else 0 >= lo
    g = torch.zeros(2, 7, dtype=F64, device=device)
    bound = torch.full((2,), lo, dtype=F64, device=device), torch.full((2,), hi, dtype=F64, device=device)
    counts = ot_ops.log_histogram(C, None, None, f, g, 1.0, 0, None, *bound, 16)
    expected = torch.zeros(2, 16, dtype=torch.int64)
    expected[:, 0] = 5 * 7
    assert torch.equal(counts.cpu(), expected)


def test_hessian_matvec(device, generator):
    C, _, _, f, g = _problem(2, 30, 20, 1, generator, F64, device)
    s = reference.ot_log_plan(C, f, g, 0.05)
    threshold = torch.quantile(s.flatten(1), 0.8, dim=1)
    row_ptr, col_idx, values = ot_ops.sparsify(C, None, None, f, g, 0.05, 0, None, threshold)
    P_s = torch.where(s >= threshold[:, None, None], s.exp(), torch.zeros_like(s))
    r, c = torch.rand(2, 30, dtype=F64, device=device), torch.rand(2, 20, dtype=F64, device=device)
    vx, vy = torch.randn(2, 30, dtype=F64, device=device), torch.randn(2, 20, dtype=F64, device=device)
    out_x, out_y = ot_ops.hessian_matvec(row_ptr, col_idx, values, r, c, vx, vy)
    ref_x, ref_y = reference.ot_hessian_matvec(P_s, r, c, vx, vy)
    assert torch.allclose(out_x, ref_x, rtol=1e-13, atol=1e-13 * float(P_s.abs().max()))
    assert torch.allclose(out_y, ref_y, rtol=1e-13, atol=1e-13 * float(P_s.abs().max()))


def _random_pattern(batch, n, m, generator, device):
    """A random CSR pattern [batch * n, m] (some rows empty), its values and the dense matrix [batch, n, m]."""
    kept = torch.rand(batch, n, m, generator=generator) < 0.3
    dense = torch.where(kept, torch.rand(batch, n, m, generator=generator, dtype=F64) + 0.1, torch.zeros((), dtype=F64))
    rows = dense.reshape(batch * n, m)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum((rows != 0).sum(1), 0)])
    col_idx = torch.nonzero(rows)[:, 1].contiguous()
    return row_ptr.to(device), col_idx.to(device), rows[rows != 0].to(device), dense.to(device)


def test_hessian_matvec_rejects_malformed_patterns(generator):
    row_ptr, col_idx, values, _ = _random_pattern(2, 6, 5, generator, "cpu")
    r, vx = torch.rand(2, 6, generator=generator, dtype=F64), torch.randn(2, 6, generator=generator, dtype=F64)
    c, vy = torch.rand(2, 5, generator=generator, dtype=F64), torch.randn(2, 5, generator=generator, dtype=F64)
    nnz = col_idx.numel()

    def call(row_ptr=row_ptr, col_idx=col_idx):
        return ot_ops.hessian_matvec(row_ptr, col_idx, values[: col_idx.numel()], r, c, vx, vy)

    bad = row_ptr.clone()
    bad[0] = -10**12  # the start sent the kernel 10^12 entries before the arrays
    with pytest.raises(ValueError, match=rf"ot_hessian_matvec: row_ptr must start at 0 and end at nnz = {nnz}; "
                                         rf"got -1000000000000 \.\.\. {nnz}"):
        call(bad)
    bad = row_ptr.clone()
    bad[1] = 10**7  # read 10^7 entries past the end of col_idx
    with pytest.raises(ValueError, match=rf"row_ptr must be non-decreasing; row_ptr\[2\] = {int(row_ptr[2])} < "
                                         r"row_ptr\[1\] = 10000000"):
        call(bad)
    with pytest.raises(ValueError, match=f"must start at 0 and end at nnz = {nnz - 1}"):
        call(col_idx=col_idx[:-1])  # row_ptr ends past the entries
    bad = col_idx.clone()
    bad[nnz // 2] = 5
    with pytest.raises(ValueError, match=r"ot_hessian_matvec: col_idx must lie in \[0, n_cols\) = \[0, 5\); "
                                         r"got \[0, 5\]"):
        call(col_idx=bad)
    bad[nnz // 2] = -3
    with pytest.raises(ValueError, match=r"got \[-3, "):
        call(col_idx=bad)
    with pytest.raises(ValueError, match=r"row_ptr has shape \(12,\), dtype torch.int64; expected \(13,\) int64"):
        call(row_ptr[:-1])


def test_hessian_matvec_cpp_checks_name_the_values():
    """The C++ checks both back ends share (check_ot_hessian_params in ot_cpu.cpp) give the
    actual value; they run before any pointer is read."""
    def call(batch=1, rows=2, cols=3, nnz=0, dtype=1):
        extension().ot_hessian_matvec_cpu(row_ptr=0, col_idx=0, values=0, r=0, c=0, vx=0, vy=0, out_x=0, out_y=0,
                                          batch=batch, rows=rows, cols=cols, nnz=nnz, dtype=dtype, num_threads=1)

    with pytest.raises(ValueError, match=r"^ot_hessian_matvec: sizes must be >= 0; got batch=1 rows=-2 cols=3$"):
        call(rows=-2)
    with pytest.raises(ValueError, match=r"^ot_hessian_matvec: dtype must be float32 or float64; got code 2$"):
        call(dtype=2)
    with pytest.raises(ValueError, match=r"^ot_hessian_matvec: nnz must be >= 0; got -4$"):
        call(nnz=-4)


def test_sparsify_cpp_checks_nnz(generator):
    # check_ot_sparsify_params, shared with CUDA: nnz is checked in both passes (the counting
    # pass is given nnz = 0 by the op).
    C, _, _, f, g = _problem(1, 2, 16, 1, generator)
    src, _keep = ot_ops._source("test", C, None, None, f, g, 0.1, 0, None, False)
    threshold = torch.zeros(1, dtype=F64)
    row_counts, row_ptr = torch.zeros(2, dtype=torch.int64), torch.tensor([0, 16, 32])
    col_idx, values = torch.full((32,), -7, dtype=torch.int64), torch.full((32,), -7.0, dtype=F64)
    for filling in (False, True):
        with pytest.raises(ValueError, match=r"^ot_sparsify: nnz must be >= 0; got -3$"):
            extension().ot_sparsify_cpu(src=src, threshold=threshold.data_ptr(), row_counts=row_counts.data_ptr(),
                                        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr() if filling else 0,
                                        values=values.data_ptr(), nnz=-3, num_threads=1)
    assert (col_idx == -7).all() and (values == -7.0).all() and (row_counts == 0).all()


def test_row_grad_cpp_check_names_the_cost(generator):
    # check_ot_row_grad_params, shared with CUDA; runs before any pointer but the source's is read.
    C, _, _, f, g = _problem(1, 2, 3, 1, generator)
    src, _keep = ot_ops._source("test", C, None, None, f, g, 0.1, 0, None, False)
    with pytest.raises(ValueError, match=r"^ot_row_grad: needs a point cost \(code 1 or 2\); got cost code 0$"):
        extension().ot_row_grad_cpu(src=src, lse=0, grad=0, num_threads=1)


def test_hessian_matvec_kernel_memory_safe_on_any_row_ptr(device, generator):
    # The unchecked entry (SNS's patterns come from sparsify) runs the kernels on any
    # row_ptr: each row's range is clamped to [0, nnz], never read outside the arrays.
    row_ptr, col_idx, values, _ = _random_pattern(1, 4, 6, generator, "cpu")
    nnz = col_idx.numel()
    assert nnz > 2
    r, vx = torch.rand(1, 4, generator=generator, dtype=F64), torch.randn(1, 4, generator=generator, dtype=F64)
    c, vy = torch.rand(1, 6, generator=generator, dtype=F64), torch.randn(1, 6, generator=generator, dtype=F64)
    for bad in ([-10**12, 10**12, 0, nnz, 10**7], [nnz, 2, -5, 10**15, 1]):
        clamped = torch.zeros(1, 4, 6, dtype=F64)  # the pattern the clamped ranges describe
        for i in range(4):
            begin = min(max(bad[i], 0), nnz)
            for k in range(begin, min(max(bad[i + 1], begin), nnz)):
                clamped[0, i, col_idx[k]] += values[k]
        ref_x, ref_y = reference.ot_hessian_matvec(clamped, r, c, vx, vy)
        args = [t.to(device) for t in (torch.tensor(bad), col_idx, values, r, c, vx, vy)]
        out_x, out_y = ot_ops.hessian_matvec_sparsified(*args)
        assert torch.allclose(out_x.cpu(), ref_x, rtol=1e-14, atol=1e-14)
        assert torch.allclose(out_y.cpu(), ref_y, rtol=1e-14, atol=1e-14)
        with pytest.raises(ValueError, match="ot_hessian_matvec: row_ptr must"):
            ot_ops.hessian_matvec(*args)


def test_sparsify_fill_rejects_malformed_row_ptr(generator):
    C, _, _, f, g = _problem(1, 2, 16, 1, generator)
    threshold = torch.full((1,), -1e30, dtype=F64)  # every entry kept: 16 per row
    fill = torch.ops.lowrank_ops.ot_sparsify_fill
    with pytest.raises(ValueError, match=r"ot_sparsify_fill: row_ptr must be non-decreasing; row_ptr\[2\] = 1 < "
                                         r"row_ptr\[1\] = 16"):
        fill(C, None, None, f, g, 0.1, 0, None, False, threshold, torch.tensor([0, 16, 1]))
    with pytest.raises(ValueError, match=r"ot_sparsify_fill: row_ptr must start at 0 and end at nnz = 1; "
                                         r"got -1000000000 \.\.\. 1"):
        fill(C, None, None, f, g, 0.1, 0, None, False, threshold, torch.tensor([-10**9, -10**9 + 16, 1]))
    # The C++ kernel checks the ranges before its first write (the op allocates nnz = row_ptr[-1] entries).
    src, _keep = ot_ops._source("test", C, None, None, f, g, 0.1, 0, None, False)
    col_idx = torch.full((20,), -7, dtype=torch.int64)
    values = torch.full((20,), -7.0, dtype=F64)
    for row_ptr, nnz in (([0, 16, 1], 1), ([-10**9, -10**9 + 16, 1], 1), ([0, 16, 32], 20)):
        row_ptr = torch.tensor(row_ptr)
        with pytest.raises(ValueError, match=rf"ot_sparsify: row_ptr must be non-decreasing in \[0, nnz = {nnz}\]"):
            extension().ot_sparsify_cpu(src=src, threshold=threshold.data_ptr(), row_counts=0,
                                        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(),
                                        values=values.data_ptr(), nnz=nnz, num_threads=1)
        assert (col_idx == -7).all() and (values == -7.0).all()
    # A well-formed row_ptr that promises rows more entries than pass the threshold left
    # the rest of their ranges unwritten: heap garbage in col_idx and values.
    with pytest.raises(ValueError, match=r"ot_sparsify: row_ptr gives row 0 20 entries; 16 pass the threshold"):
        fill(C, None, None, f, g, 0.1, 0, None, False, threshold, torch.tensor([0, 20, 36]))


@pytest.mark.parametrize("cost", ["sqeuclidean", "l1"])
def test_row_grad(device, generator, cost):
    _, x, y, f, g = _problem(2, 15, 25, 3, generator, F64, device)
    code = ot_ops.COST_CODES[cost]
    for columns in (False, True):
        lse, _ = ot_ops.row_lse(None, x, y, f, g, 0.3, code, columns=columns)
        grad = ot_ops.row_grad(x, y, f, g, 0.3, code, lse, columns=columns)
        xx, yy = (y, x) if columns else (x, y)
        ff, gg = (g, f) if columns else (f, g)
        C = reference.ot_point_cost(xx, yy, cost)
        weights = torch.softmax(reference.ot_log_plan(C, ff, gg, 0.3), 2)
        diff = xx.unsqueeze(2) - yy.unsqueeze(1)
        dcost = 2 * diff if cost == "sqeuclidean" else diff.sign()
        ref = (weights.unsqueeze(-1) * dcost).sum(2)
        assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-12)


def test_opcheck(generator):
    C, x, y, f, g = _problem(2, 6, 5, 2, generator)
    ops = torch.ops.lowrank_ops
    torch.library.opcheck(ops.ot_row_lse, (C, None, None, f, g, 0.1, 0, None, False, True))
    torch.library.opcheck(ops.ot_row_lse, (None, x, y, f, g, 0.1, 1, torch.tensor([True, False]), True, False))
    lo = torch.full((2,), -50.0, dtype=F64)
    torch.library.opcheck(ops.ot_log_histogram, (C, None, None, f, g, 0.1, 0, None, False, lo, lo + 60, 8))
    threshold = torch.full((2,), -3.0, dtype=F64)
    torch.library.opcheck(ops.ot_sparsify_count, (C, None, None, f, g, 0.1, 0, None, False, threshold))
    row_ptr, col_idx, values = ot_ops.sparsify(C, None, None, f, g, 0.1, 0, None, threshold)
    torch.library.opcheck(ops.ot_sparsify_fill, (C, None, None, f, g, 0.1, 0, None, False, threshold, row_ptr))
    r, c = f.exp(), g.exp()
    torch.library.opcheck(ops.ot_hessian_matvec, (row_ptr, col_idx, values, r, c, f, g))
    lse, _ = ot_ops.row_lse(None, x, y, f, g, 0.1, 2)
    torch.library.opcheck(ops.ot_row_grad, (None, x, y, f, g, 0.1, 2, None, False, lse))


def test_hessian_matvec_fake_matches_strided_inputs(generator):
    # The fake impl kept a column-major r's layout, the real one returns contiguous outputs:
    # opcheck's test_faketensor failed, and inductor asserted on the strides.
    B, n, m = 2, 6, 5
    f, g = torch.randn(B, n, dtype=F64, generator=generator), torch.randn(B, m, dtype=F64, generator=generator)
    row_ptr, col_idx, values = ot_ops.sparsify(torch.rand(B, n, m, dtype=F64, generator=generator), None, None, f, g,
                                               0.1, 0, None, torch.full((B,), -3.0, dtype=F64))
    r = torch.rand(n, B, dtype=F64, generator=generator).T  # column-major [B, n]
    torch.library.opcheck(torch.ops.lowrank_ops.ot_hessian_matvec.default,
                          (row_ptr, col_idx, values, r, torch.rand(B, m, dtype=F64, generator=generator), f, g))


def test_compile_fullgraph(generator):
    # A fixed number of log-domain Sinkhorn updates: the solvers' data-dependent loops
    # are plain Python, the kernels must trace.
    C, _, _, f, g = _problem(1, 12, 9, 1, generator)
    a, b = _masses((1,), 12, generator), _masses((1,), 9, generator)

    def iterate(C, f, g):
        for _ in range(3):
            col, _ = ot_ops.row_lse(C, None, None, f, g, 0.1, 0, columns=True)
            g = g + 0.1 * (b.log() - col)
            row, _ = ot_ops.row_lse(C, None, None, f, g, 0.1, 0)
            f = f + 0.1 * (a.log() - row)
        return f, g

    compiled = torch.compile(iterate, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(C, f, g), iterate(C, f, g)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------- solvers vs POT
def _pot_log(pot, a, b, C, reg):
    P = pot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), reg, method="sinkhorn_log", stopThr=1e-14,
                     numItermax=100_000)
    return float((P * C.numpy()).sum())


@pytest.mark.parametrize("source", ["matrix", "sqeuclidean", "l1"])
def test_sinkhorn_matches_pot(pot, generator, source):
    n, m = 50, 35
    a, b = _masses((), n, generator), _masses((), m, generator)
    reg = 0.05
    if source == "matrix":
        C = torch.rand(n, m, generator=generator, dtype=F64)
        result = sinkhorn(a, b, C, reg, tol=1e-12)
    else:
        x = torch.randn(n, 2, generator=generator, dtype=F64)
        y = torch.randn(m, 2, generator=generator, dtype=F64)
        C = reference.ot_point_cost(x[None], y[None], source)[0]
        C = C / C.max()
        x, y = x / math.sqrt(C.max()), y / math.sqrt(C.max())
        scale = float(reference.ot_point_cost(x[None], y[None], source).max())
        result = sinkhorn(a, b, reg=reg * scale, x=x, y=y, cost=source, tol=1e-12)
        C = reference.ot_point_cost(x[None], y[None], source)[0]
        reg = reg * scale
    assert isinstance(result, OTResult)
    assert bool(result.converged) and float(result.marginal_error) <= 1e-9
    want = _pot_log(pot, a, b, C, reg)
    assert abs(float(result.cost) - want) <= 1e-8 * abs(want)
    plan = result.plan()
    assert torch.allclose(plan.sum(1), a, rtol=0, atol=1e-9)
    assert torch.allclose(plan.sum(0), b, rtol=0, atol=1e-9)
    assert abs(float((plan * C).sum()) - float(result.cost)) <= 1e-12


@pytest.mark.parametrize("source", ["matrix", "sqeuclidean"])
def test_sns_agrees_with_sinkhorn(generator, source):
    n, m = 120, 100
    a, b = _masses((), n, generator), _masses((), m, generator)
    reg = 2e-3
    if source == "matrix":
        kwargs = dict(C=torch.rand(n, m, generator=generator, dtype=F64))
    else:
        kwargs = dict(x=torch.rand(n, 2, generator=generator, dtype=F64),
                      y=torch.rand(m, 2, generator=generator, dtype=F64), cost="sqeuclidean")
    newton = sinkhorn_newton_sparse(a, b, reg=reg, tol=1e-10, **kwargs)
    plain = sinkhorn(a, b, reg=reg, tol=1e-10, max_iter=50_000, **kwargs)
    assert bool(newton.converged) and bool(plain.converged)
    assert int(newton.newton_steps) >= 1 and int(newton.iterations) < int(plain.iterations)
    assert abs(float(newton.cost) - float(plain.cost)) <= 1e-8 * float(plain.cost)
    assert len(newton.cg_iterations[0]) == len(newton.step_sizes[0]) >= 1


def test_emd_limit(pot, generator):
    # <C, P_reg> - OT <= reg log(n m): the entropy of any plan lies in [-log(nm), 0].
    n = 40
    a, b = _masses((), n, generator), _masses((), n, generator)
    C = torch.rand(n, n, generator=generator, dtype=F64)
    exact = float(pot.emd2(a.numpy(), b.numpy(), C.numpy()))
    previous = math.inf
    for reg in (1e-2, 3e-3, 1e-3):
        result = sinkhorn_newton_sparse(a, b, C, reg, tol=1e-10, rho=10 / n)
        assert bool(result.converged)
        gap = float(result.cost) - exact
        assert -1e-12 <= gap <= reg * math.log(n * n)
        assert gap <= previous
        previous = gap


@pytest.mark.parametrize("solver", ["sinkhorn", "sns"])
def test_batched_matches_one_by_one(generator, solver):
    batch, n, m = 3, 30, 25
    C = torch.rand(batch, n, m, generator=generator, dtype=F64)
    C[1] *= 3.0  # different difficulty: different iteration counts per problem
    a, b = _masses((batch,), n, generator), _masses((batch,), m, generator)
    C_strided = C.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    # Epsilon scaling off: its stages follow the batch's largest cost spread, so a batch
    # and its problems one by one would take different (equally valid) paths.
    solve = sinkhorn if solver == "sinkhorn" else functools.partial(sinkhorn_newton_sparse, epsilon_scaling=False)
    together = solve(a, b, C_strided, 0.01, tol=1e-10)
    assert together.cost.shape == (batch,) and together.f.shape == (batch, n)
    for i in range(batch):
        alone = solve(a[i], b[i], C[i], 0.01, tol=1e-10)
        assert int(alone.iterations) == int(together.iterations[i])
        assert bool(alone.converged) and bool(together.converged[i])
        assert abs(float(alone.cost) - float(together.cost[i])) <= 1e-13 * float(alone.cost)
        assert torch.equal(alone.history[0], together.history[i])
    assert len(set(together.iterations.tolist())) > 1


def test_empty_batch():
    C = torch.rand(0, 4, 3, dtype=F64)
    result = sinkhorn(torch.full((0, 4), 0.25, dtype=F64), torch.full((0, 3), 1 / 3, dtype=F64), C, 0.1)
    assert result.cost.shape == (0,) and result.f.shape == (0, 4) and result.converged.shape == (0,)
    # SNS and epsilon scaling read the cost spread, whose reshape(0, -1) raised.
    for solve in (lambda: sinkhorn_newton_sparse(None, None, C, 0.1),
                  lambda: sinkhorn(None, None, C, 0.1, epsilon_scaling=True)):
        assert solve().converged.shape == (0,)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
def test_any_batch_shape(solve, generator):
    """C [..., n, m] and x, y [..., n, d] with any batch shape, as documented (more than one
    batch dimension raised 'expected 2-D to 3-D')."""
    C = torch.rand(2, 3, 5, 4, generator=generator, dtype=F64)
    a = _masses((2, 3), 5, generator)
    result = solve(a, None, C, 0.1)
    assert result.converged.shape == (2, 3) and result.f.shape == (2, 3, 5) and result.plan().shape == (2, 3, 5, 4)
    single = solve(a[1, 2], None, C[1, 2], 0.1)
    torch.testing.assert_close(result.plan()[1, 2], single.plan(), rtol=0, atol=1e-12)
    x, y = torch.randn(2, 1, 3, 5, 2, generator=generator, dtype=F64), torch.randn(2, 1, 3, 4, 2, generator=generator,
                                                                                      dtype=F64)
    points = solve(None, None, x=x, y=y, reg=0.5)
    assert points.converged.shape == (2, 1, 3) and points.plan().shape == (2, 1, 3, 5, 4)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
def test_converged_means_the_full_marginal_error_met_tol(solve):
    """The Sinkhorn step tested the row error alone (the column marginals are exact only
    up to rounding): in float32 with |g| / reg in the thousands the result's
    marginal_error was up to 2x tol with converged = True.  converged and marginal_error
    now agree on every solve of a float32 scan."""
    generator = torch.Generator().manual_seed(1)
    for trial in range(12):
        C = torch.rand(60, 50, generator=generator) * 30
        a = _masses((), 60, generator, torch.float32)
        result = solve(a, None, C, 0.03 if trial % 2 else 0.1, max_iter=3000)
        assert bool(result.converged) == bool(result.marginal_error <= 1e-5), (trial, float(result.marginal_error))


def test_masses_are_renormalized_and_checked_at_their_own_precision(generator):
    """Masses pass the sum check within sqrt(eps) of 1 (3.5e-4 in float32), but the marginal
    error cannot fall below |sum a - sum b|: such masses ran to max_iter against tol = 1e-5.
    They are renormalized now (values only).  float32 masses normalized in float32 (1e-8
    off 1) were rejected with a float64 cost."""
    C = torch.rand(7, 5, generator=generator)
    a = torch.full((7,), 0.1429)  # sums to 1.0003
    for solve in (sinkhorn, sinkhorn_newton_sparse):
        result = solve(a, None, C, 0.1)
        assert bool(result.converged) and int(result.iterations) < 100
    a32 = _masses((), 50, generator, torch.float32)
    result = sinkhorn(a32, None, torch.rand(50, 40, generator=generator, dtype=F64), 0.1)
    assert bool(result.converged) and result.f.dtype == F64
    with pytest.raises(ValueError, match=r"a sums to 1.0003.* \(within 1.5e-08\)"):
        sinkhorn(a.double(), None, C.double(), 0.1)


# ---------------------------------------------------------------------------- warm start
@pytest.mark.parametrize("solver", ["sinkhorn", "sns"])
def test_warm_start_from_the_solution_stops_at_once(generator, solver):
    batch, n, m = 3, 30, 25
    C = torch.rand(batch, n, m, generator=generator, dtype=F64)
    a, b = _masses((batch,), n, generator), _masses((batch,), m, generator)
    solve = sinkhorn if solver == "sinkhorn" else sinkhorn_newton_sparse
    cold = solve(a, b, C, 0.01, tol=1e-10)
    assert bool(cold.converged.all())
    for init in ((cold.f, cold.g), cold):  # a pair or the OTResult itself
        warm = solve(a, b, C, 0.01, tol=1e-10, init=init)
        # The start is within tol: 0 iterations, the same potentials (copies, not aliases).
        assert bool(warm.converged.all()) and warm.iterations.tolist() == [0] * batch
        assert torch.equal(warm.f, cold.f) and torch.equal(warm.g, cold.g) and warm.f is not cold.f
        assert torch.equal(warm.cost, cold.cost)
    # A tighter tol continues from there.  Sinkhorn resumes exactly where the cold solve
    # stopped (the f update first, from both given potentials): iteration counts add up.
    warm = solve(a, b, C, 0.01, tol=1e-12, init=cold)
    tight = solve(a, b, C, 0.01, tol=1e-12)
    assert bool(warm.converged.all()) and bool(tight.converged.all())
    if solver == "sinkhorn":
        assert torch.equal(warm.iterations, tight.iterations - cold.iterations)
        assert torch.equal(warm.f, tight.f) and torch.equal(warm.g, tight.g)
    else:
        assert bool((warm.iterations < tight.iterations).all()), (warm.iterations, tight.iterations)
    assert torch.allclose(warm.cost, tight.cost, rtol=1e-11, atol=0)
    # One start shared by the batch: (n,) / (m,).
    shared = solve(a[:1].expand(batch, n), b[:1].expand(batch, m), C[:1].expand(batch, n, m), 0.01, tol=1e-10,
                   init=(cold.f[0], cold.g[0]))
    assert shared.iterations.tolist() == [0] * batch


@pytest.mark.parametrize("solver", ["sinkhorn", "sns"])
def test_warm_start_epsilon_scaling_saves_iterations(solver):
    """The potentials at reg = 0.02 start the solve at reg = 0.005 closer than zeros: fewer
    iterations on this fixed-seed pair of problems (measured: Sinkhorn 1166 and 882
    against 1259 and 976 from zeros, its linear rate dominating; SNS without its own
    scaling 25 and 25 against 29 and 27), the same answer."""
    gen = torch.Generator().manual_seed(3)
    n = 60
    x = torch.rand(2, n, 2, generator=gen, dtype=F64)
    y = torch.rand(2, n, 2, generator=gen, dtype=F64)
    solve = sinkhorn if solver == "sinkhorn" else functools.partial(sinkhorn_newton_sparse, epsilon_scaling=False)
    coarse = solve(None, None, x=x, y=y, reg=0.02, tol=1e-8)
    cold = solve(None, None, x=x, y=y, reg=0.005, tol=1e-8)
    warm = solve(None, None, x=x, y=y, reg=0.005, tol=1e-8, init=coarse)
    assert bool(cold.converged.all()) and bool(warm.converged.all())
    assert bool((warm.iterations < cold.iterations).all()), (warm.iterations, cold.iterations)
    # Both within 1e-8 of the marginals: costs within about 1e-8 x the cost spread (2 here).
    assert torch.allclose(warm.cost, cold.cost, rtol=0, atol=1e-7)


def test_sinkhorn_epsilon_scaling_option():
    """``epsilon_scaling=True``: regs 4x apart from the cost spread down to reg, each stage
    warm-started; on the assignment-like problem it needs far fewer iterations than the
    plain iterations from zeros, to the same plan."""
    gen = torch.Generator().manual_seed(4)
    C = torch.rand(2, 80, 70, generator=gen, dtype=F64)
    plain = sinkhorn(None, None, C, 2e-3, tol=1e-8, max_iter=50_000)
    scaled = sinkhorn(None, None, C, 2e-3, tol=1e-8, max_iter=50_000, epsilon_scaling=True)
    assert bool(plain.converged.all()) and bool(scaled.converged.all())
    assert bool((scaled.iterations < plain.iterations).all()), (scaled.iterations, plain.iterations)
    assert len(scaled.history[0]) == int(scaled.iterations[0])
    assert torch.allclose(scaled.cost, plain.cost, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="epsilon_scaling must be True, False or a factor > 1; got 1.0"):
        sinkhorn(None, None, C, 2e-3, epsilon_scaling=1.0)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
def test_warm_start_bad_inputs(solve):
    C = torch.rand(2, 4, 3, dtype=F64)
    f, g = torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"init f0 has shape \(2, 3\); expected \(2, 4\)"):
        solve(None, None, C, 0.1, init=(torch.zeros(2, 3, dtype=F64), g))
    with pytest.raises(ValueError, match=r"init g0 has shape \(3, 3\); expected \(2, 3\)"):
        solve(None, None, C, 0.1, init=(f, torch.zeros(3, 3, dtype=F64)))
    with pytest.raises(TypeError, match="init g0 has dtype torch.float32; expected torch.float64"):
        solve(None, None, C, 0.1, init=(f, g.float()))
    bad = f.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="init f0 has a non-finite entry"):
        solve(None, None, C, 0.1, init=(bad, g))
    with pytest.raises(TypeError, match="init must be a pair"):
        solve(None, None, C, 0.1, init=f)
    with pytest.raises(TypeError, match="init f0 must be a tensor"):
        solve(None, None, C, 0.1, init=([0.0] * 4, g))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="init f0 is on cuda"):
            solve(None, None, C, 0.1, init=(f.cuda(), g))


# ---------------------------------------------------------------------------- gradients
def test_gradcheck_cost_matrix(generator):
    n, m = 5, 4
    C = torch.rand(n, m, generator=generator, dtype=F64, requires_grad=True)
    a = _masses((), n, generator).requires_grad_()
    b = _masses((), m, generator).requires_grad_()

    def value(C, a, b):  # masses normalized inside: the gradient lives on the simplex
        return sinkhorn(a / a.sum(), b / b.sum(), C, 0.3, tol=1e-14, max_iter=100_000).value

    # Finite differences of a solve converged to 1e-14 in the marginals: error O(1e-14 / eps).
    assert torch.autograd.gradcheck(value, (C, a, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("cost", ["sqeuclidean", "l1"])
def test_gradcheck_points(generator, cost):
    x = torch.randn(5, 2, generator=generator, dtype=F64, requires_grad=True)
    y = torch.randn(4, 2, generator=generator, dtype=F64, requires_grad=True)

    def value(x, y):
        return sinkhorn(None, None, reg=0.5, x=x, y=y, cost=cost, tol=1e-14, max_iter=100_000).value

    assert torch.autograd.gradcheck(value, (x, y), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_value_gradient_is_the_plan(generator):
    C = torch.rand(2, 6, 7, generator=generator, dtype=F64, requires_grad=True)
    result = sinkhorn_newton_sparse(None, None, C, 0.05, tol=1e-12)
    result.value.sum().backward()
    assert torch.allclose(C.grad, result.plan(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
def test_torch_func_gradients_match_autograd(generator, solve):
    """torch.func.grad / jacrev through a solve give autograd's gradients (they raised "must
    override setup_context"); vmap over a solver is refused with a message naming the
    native batch, not torch's "data-dependent control flow"."""
    from torch.func import grad, jacrev, vmap

    C = torch.rand(2, 5, 4, generator=generator, dtype=F64)
    a, b = _masses((), 5, generator), _masses((), 4, generator)
    x = torch.randn(5, 2, generator=generator, dtype=F64)
    y = torch.randn(4, 2, generator=generator, dtype=F64)
    by_matrix = lambda C, a, b: solve(a, b, C[0], 0.3, tol=1e-13).value  # noqa: E731
    by_points = lambda x, y: solve(None, None, reg=0.5, x=x, y=y, tol=1e-13).value  # noqa: E731
    for function, inputs in ((by_matrix, (C, a, b)), (by_points, (x, y))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        function(*leaves).backward()
        transformed = grad(function, argnums=tuple(range(len(inputs))))(*inputs)
        for got, leaf in zip(transformed, leaves):
            torch.testing.assert_close(got, leaf.grad, rtol=0, atol=0)
    values = lambda C: solve(None, None, C, 0.3, tol=1e-13).value  # noqa: E731
    jacobian = jacrev(values)(C)  # [2, 2, 5, 4]: problem i's value depends on C[i] only, as its plan
    torch.testing.assert_close(jacobian[0, 0], solve(None, None, C[0], 0.3, tol=1e-13).plan())
    assert (jacobian[0, 1] == 0).all() and (jacobian[1, 0] == 0).all()
    with pytest.raises(RuntimeError, match=r"torch.func vmap is not supported: each problem.*batch \[\.\.\., n, m\]"):
        vmap(values)(C)
    # Forward mode: the value came out of no_grad with a zero tangent (torch.func.jvp,
    # forward_ad); torch.autograd.functional.jvp (double vjp) stays exact.
    V = torch.randn(2, 5, 4, generator=generator, dtype=F64)
    eps = 1e-6
    expected = (values(C + eps * V) - values(C - eps * V)) / (2 * eps)  # O(eps^2 + tol / eps)
    torch.testing.assert_close(torch.func.jvp(values, (C,), (V,))[1], expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.autograd.functional.jvp(values, C, V)[1], expected, rtol=1e-6, atol=1e-9)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(C, V)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(values(dual)).tangent, expected, rtol=1e-6,
                                   atol=1e-9)
    dx = torch.randn_like(x)
    by_x = lambda x: by_points(x, y)  # noqa: E731
    expected = (by_x(x + eps * dx) - by_x(x - eps * dx)) / (2 * eps)
    torch.testing.assert_close(torch.func.jvp(by_x, (x,), (dx,))[1], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
def test_second_derivatives_are_refused(generator, solve):
    """The value's gradients are the envelope theorem's, first order: differentiated again
    (create_graph=True, torch.autograd.functional.hessian, torch.func's jacrev(grad)) they
    gave Hessian-vector products 0.15 off at a scale of 0.17, silently; now they raise.
    First derivatives, also with create_graph=True and under torch.func, are unchanged."""
    from torch.func import grad, jacrev

    C = torch.rand(4, 3, generator=generator, dtype=F64)
    x = torch.randn(4, 2, generator=generator, dtype=F64)
    y = torch.randn(3, 2, generator=generator, dtype=F64)
    value = lambda C: solve(None, None, C, 0.5, tol=1e-13).value  # noqa: E731
    leaf = C.clone().requires_grad_()
    (first,) = torch.autograd.grad(value(leaf), leaf, create_graph=True)
    torch.testing.assert_close(first, solve(None, None, C, 0.5, tol=1e-13).plan())
    torch.testing.assert_close(grad(value)(C), first.detach())
    message = "OTResult.value: second derivatives are not implemented"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(first.square().sum(), leaf)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.functional.hessian(value, C)
    with pytest.raises(RuntimeError, match=message):
        jacrev(grad(value))(C)
    V = torch.randn(4, 3, generator=generator, dtype=F64)
    forward_first = lambda c: torch.func.jvp(value, (c,), (V,))[1]  # noqa: E731
    with pytest.raises(RuntimeError, match=message):  # forward over forward (was 0.0, silently)
        torch.func.jvp(forward_first, (C,), (V,))
    with pytest.raises(RuntimeError, match=message):  # reverse over forward (was -3.88 against -3.14)
        grad(forward_first)(C)
    with pytest.raises(RuntimeError, match=message):  # forward over reverse
        torch.func.jvp(grad(value), (C,), (V,))
    with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match=message):
        dual = torch.autograd.forward_ad.make_dual(leaf.detach().clone().requires_grad_(), V)
        torch.autograd.grad(value(dual), dual)
    points = [t.clone().requires_grad_() for t in (x, y)]
    gx, gy = torch.autograd.grad(solve(None, None, reg=0.5, x=points[0], y=points[1], tol=1e-13).value, points,
                                 create_graph=True)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad((gx.sum() + gy.sum()), points)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_value_gradients_under_checkpointing(generator, solve, use_reentrant):
    """The value's backward read its saved tensors twice: under non-reentrant checkpointing
    (which allows one unpack per saved tensor) it raised "Unpack is being triggered for a
    tensor that was already unpacked once"."""
    from torch.utils.checkpoint import checkpoint

    C = torch.rand(5, 4, generator=generator, dtype=F64)
    x, y = torch.randn(5, 2, generator=generator, dtype=F64), torch.randn(4, 2, generator=generator, dtype=F64)
    by_cost = lambda C: solve(None, None, C, 0.5, tol=1e-12).value  # noqa: E731
    by_points = lambda x, y: solve(None, None, reg=0.5, x=x, y=y, tol=1e-12).value  # noqa: E731
    for fn, inputs in ((by_cost, (C,)), (by_points, (x, y))):
        plain = [t.clone().requires_grad_() for t in inputs]
        expected = torch.autograd.grad(fn(*plain), plain)
        leaves = [t.clone().requires_grad_() for t in inputs]
        checkpoint(fn, *leaves, use_reentrant=use_reentrant).backward()  # (reentrant: no autograd.grad)
        for leaf, e in zip(leaves, expected):
            torch.testing.assert_close(leaf.grad, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------- the paper's bar
def test_sns_assignment_problem_in_tens_of_iterations():
    """ALGORITHMS.md section 5's bar on the SNS paper's random assignment problem (n = 500,
    C ~ U[0, 1], eta = 1200, float64): SNS reaches the 1e-8 marginal error in about 29
    iterations where Sinkhorn needs tens of thousands (recorded: 26 against 66,225 in
    bench/results/.../ot/).  Deterministic, so a count bound, not a timing."""
    n = 500
    a = torch.full((n,), 1.0 / n, dtype=F64)
    C = torch.rand(n, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    result = sinkhorn_newton_sparse(a, a.clone(), C, reg=1.0 / 1200, tol=1e-8)
    assert bool(result.converged) and float(result.marginal_error) <= 1e-8
    assert int(result.iterations) <= 40, int(result.iterations)
    plain = sinkhorn(a, a.clone(), C, reg=1.0 / 1200, tol=1e-8, max_iter=1000)
    assert not bool(plain.converged) and float(plain.marginal_error) > 100 * 1e-8


# ---------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("seed", [19, 20])
def test_sns_does_not_stall_on_steps_lost_in_rounding(seed):
    """Near the optimum of these dense plans (reg = 1: the sparsified Hessian is poor) the
    line search used to accept steps of 2^-27 to 2^-31 that changed nothing or too
    little, for 200 iterations, stuck at a marginal error of 2e-9 (> tol) while Sinkhorn
    alone converges in 28.  A Newton step that does not lower the error is now followed
    by a Sinkhorn step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 17, generator=g, dtype=F64) * 0.5
    y = torch.randn(33, 17, generator=g, dtype=F64) * 0.5
    result = sinkhorn_newton_sparse(None, None, x=x, y=y, reg=1.0, tol=1e-9)
    assert bool(result.converged) and float(result.marginal_error) <= 1e-9
    assert int(result.iterations) <= 60, int(result.iterations)


def test_sns_defaults_converge_on_l1_images():
    """L1 ground costs make the plan non-unique and spread out: with the former defaults
    (a fixed top-10-per-row Hessian, fixed CG tolerance, no epsilon scaling) the bench's
    28 x 28 case stalled at a marginal error of 3e-2 after 220 iterations, and this
    14 x 14 one (two blobs, eta = 1000 as in the bench) took 187 (124 Newton steps);
    the adaptive Hessian and epsilon scaling take 25 (13)."""
    side = 14
    grid = torch.stack(torch.meshgrid(torch.arange(side, dtype=F64), torch.arange(side, dtype=F64),
                                      indexing="ij"), -1).reshape(-1, 2)
    C = torch.cdist(grid, grid, p=1.0)
    C = C / C.max()

    def blob(cx, cy, w):
        image = torch.exp(-((grid - torch.tensor([cx, cy], dtype=F64)) ** 2).sum(-1) / (2 * w**2)) + 1e-6
        return image / image.sum()

    a, b = blob(3.0, 4.0, 2.0), blob(9.0, 8.0, 1.5)
    result = sinkhorn_newton_sparse(a, b, C, 1e-3, tol=1e-8)
    assert bool(result.converged) and float(result.marginal_error) <= 1e-8
    assert int(result.newton_steps) >= 1 and int(result.iterations) <= 60, int(result.iterations)


def test_sns_defaults_converge_on_small_reg_points():
    """Points at reg = 1e-2 (costs up to about 40): the former defaults took 131 iterations
    (60 Newton steps damped to small steps far from the optimum), these 32 (17)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 2, generator=g, dtype=F64)
    y = torch.randn(200, 2, generator=g, dtype=F64) + 1.0
    result = sinkhorn_newton_sparse(None, None, x=x, y=y, reg=1e-2, tol=1e-6)
    assert bool(result.converged) and float(result.marginal_error) <= 1e-6
    assert int(result.newton_steps) >= 1 and int(result.iterations) <= 60, int(result.iterations)
    # Too few steps for that problem: reported, not hidden.
    short = sinkhorn_newton_sparse(None, None, x=x, y=y, reg=1e-2, tol=1e-6, max_iter=2)
    assert not bool(short.converged) and float(short.marginal_error) > 1e-6


def test_sns_options_are_checked():
    C = torch.rand(4, 3, dtype=F64)
    for name, value in (("drop_mass", 1.0), ("drop_mass", -0.1), ("armijo", 0.5), ("armijo", True)):
        with pytest.raises(ValueError, match=f"{name} must be a number in"):
            sinkhorn_newton_sparse(None, None, C, 0.1, **{name: value})
    with pytest.raises(ValueError, match="max_halvings must be an integer >= 1"):
        sinkhorn_newton_sparse(None, None, C, 0.1, max_halvings=0)
    with pytest.raises(ValueError, match=r"sinkhorn_newton_sparse: cg_tol must be None or a finite number >= 0; got -1"):
        sinkhorn_newton_sparse(None, None, C, 0.1, cg_tol=-1)  # the message said "tol"


def test_float32_small_reg_no_nan(pot, generator):
    # reg = 1e-4 of a cost in [0, 1]: exp(-C / reg) underflows float32 ~100 times over.
    # Whatever the solvers reach, everything is finite and the report is consistent;
    # converged runs are checked against the exact OT cost (ot.emd2):
    #   -tol max C <= <C, P> - OT <= reg log(n m) + tol max C  (entropy bound, marginal error tol),
    # plus the float32 rounding of the n m-term sum of <C, P> (n m u relative).
    n = 40
    x = torch.rand(n, 1, generator=generator, dtype=F64)
    y = torch.rand(n, 1, generator=generator, dtype=F64)
    C32 = ((x - y.T) ** 2).float()
    exact = float(pot.emd2(torch.full((n,), 1 / n, dtype=F64).numpy(), torch.full((n,), 1 / n, dtype=F64).numpy(),
                           C32.double().numpy()))
    tol, scale = 1e-4, float(C32.max())
    converged = 0
    for reg in (1e-3, 1e-4):
        for solve, options in ((sinkhorn, {}), (sinkhorn_newton_sparse, dict(cg_max_iter=200))):
            result = solve(None, None, C32, reg, tol=tol, max_iter=100, **options)
            assert torch.isfinite(result.f).all() and torch.isfinite(result.g).all()
            assert torch.isfinite(result.cost) and torch.isfinite(result.marginal_error)
            assert all(torch.isfinite(h).all() for h in result.history)
            assert bool(result.converged) == (float(result.marginal_error) <= tol)
            if bool(result.converged):
                converged += 1
                gap = float(result.cost) - exact
                slack = n * n * 2**-24 * float(result.cost)
                assert -tol * scale - slack <= gap <= reg * math.log(n * n) + tol * scale + slack
    assert converged >= 2  # SNS at least (Sinkhorn needs more than 100 iterations at these reg)


def test_top_plan(generator):
    C = torch.rand(20, 15, generator=generator, dtype=F64)
    result = sinkhorn(None, None, C, 0.01, tol=1e-10)
    sparse = result.plan(top=30)
    dense = result.plan()
    values = sparse.values()
    assert values.numel() >= 30
    assert torch.allclose(sparse.to_dense(), torch.where(dense >= values.min(), dense, 0), rtol=1e-13, atol=0)
    top_dense = dense.flatten().sort(descending=True).values[:30]
    assert torch.allclose(values.sort(descending=True).values[:30], top_dense, rtol=1e-13, atol=0)



def test_top_plan_takes_numpy_integers(generator):
    """An np.int64 top was refused ("plan: top must be a positive integer"): the same plan as
    a Python int; a bool stays refused."""
    np = pytest.importorskip("numpy")
    C = torch.rand(20, 15, generator=generator, dtype=F64)
    result = sinkhorn(None, None, C, 0.01, tol=1e-10, max_iter=np.int64(500))
    assert torch.equal(result.plan(top=np.int64(30)).to_dense(), result.plan(top=30).to_dense())
    with pytest.raises(ValueError, match="plan: top must be a positive integer; got True"):
        result.plan(top=True)

def test_non_convergence_reported(generator):
    C = torch.rand(30, 30, generator=generator, dtype=F64)
    result = sinkhorn(None, None, C, 1e-3, tol=1e-12, max_iter=3)
    assert not bool(result.converged) and int(result.iterations) == 3 and len(result.history[0]) == 3
    assert float(result.marginal_error) > 1e-12 and torch.isfinite(result.cost)
    result = sinkhorn_newton_sparse(None, None, C, 1e-3, tol=1e-14, warmup=2, max_iter=1, epsilon_scaling=False)
    assert not bool(result.converged) and int(result.iterations) == 3
    result = sinkhorn_newton_sparse(None, None, C, 1e-3, tol=1e-14, max_iter=1)  # with the default epsilon scaling
    assert not bool(result.converged) and float(result.marginal_error) > 1e-14


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
def test_bad_inputs(solve):
    C = torch.rand(4, 3, dtype=F64)
    a, b = torch.full((4,), 0.25, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)
    with pytest.raises(ValueError, match=r"a\[2\] = -0.1; expected positive finite masses"):
        solve(torch.tensor([0.5, 0.6, -0.1, 0.0], dtype=F64), b, C, 0.1)
    with pytest.raises(ValueError, match=r"b\[1, 0\] = inf; expected positive finite"):  # named the min, 0.0169
        solve(a.expand(2, 4), torch.tensor([[0.2, 0.3, 0.5], [math.inf, 0.5, 0.5]], dtype=F64), C.expand(2, 4, 3), 0.1)
    with pytest.raises(ValueError, match="b sums to 1.5"):
        solve(a, b * 1.5, C, 0.1)
    with pytest.raises(ValueError, match=r"a has shape \(5,\); expected \(4,\)"):
        solve(torch.full((5,), 0.2, dtype=F64), b, C, 0.1)
    bad = C.clone()
    bad[1, 2] = math.inf
    with pytest.raises(ValueError, match="C has a non-finite entry"):
        solve(a, b, bad, 0.1)
    for reg in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="reg must be a finite number > 0"):
            solve(a, b, C, reg)
    with pytest.raises(ValueError, match="either a cost matrix C or point clouds"):
        solve(a, b, C, 0.1, x=torch.rand(4, 2, dtype=F64), y=torch.rand(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="expected \\(..., n, d\\) and \\(..., m, d\\)"):
        solve(a, b, reg=0.1, x=torch.rand(4, 2, dtype=F64), y=torch.rand(3, 5, dtype=F64))
    with pytest.raises(TypeError, match="expected float32 or float64"):
        solve(a, b, C.half(), 0.1)
    with pytest.raises(ValueError, match="tol must be"):
        solve(a, b, C, 0.1, tol=-1.0)
    # NumPy scalars are numbers (np.float32 tol or reg was refused, as the Krylov solvers take it);
    # bools are not.
    import numpy as np
    assert bool(solve(a, b, C, np.float32(0.1), tol=np.float64(1e-8)).converged)
    with pytest.raises(ValueError, match="reg must be a finite number > 0; got True"):
        solve(a, b, C, True)


@pytest.mark.parametrize("solve", [sinkhorn, sinkhorn_newton_sparse])
def test_empty_side_is_rejected_with_or_without_masses(solve, generator):
    # An empty side has no coupling: the default masses (None) used to give 1 / max(0, 1)
    # and an infinite "converged" result instead of the error explicit masses give.
    for n, m in ((0, 4), (3, 0)):
        C = torch.rand(n, m, generator=generator, dtype=F64)
        side = "a" if n == 0 else "b"
        a, b = _masses((), max(n, 1), generator)[:n], _masses((), max(m, 1), generator)[:m]
        for masses in ((None, None), (a, b)):
            with pytest.raises(ValueError, match=f"{side} is empty; expected at least one point on each side"):
                solve(*masses, C, 0.1)
        x, y = torch.randn(n, 2, generator=generator, dtype=F64), torch.randn(m, 2, generator=generator, dtype=F64)
        with pytest.raises(ValueError, match=f"{side} is empty"):
            solve(None, None, reg=0.1, x=x, y=y)
    with pytest.raises(ValueError, match="a is empty"):  # batched
        solve(None, None, torch.rand(2, 0, 4, generator=generator, dtype=F64), 0.1)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_solvers_match_cpu(cuda_device, generator, dtype):
    C = torch.rand(2, 64, 48, generator=generator, dtype=F64).to(dtype)
    for solve in (sinkhorn, sinkhorn_newton_sparse):
        cpu = solve(None, None, C, 0.01, tol=1e-6 if dtype == torch.float32 else 1e-10)
        gpu = solve(None, None, C.to(cuda_device), 0.01, tol=1e-6 if dtype == torch.float32 else 1e-10)
        assert bool(gpu.converged.all())
        rel = 1e-4 if dtype == torch.float32 else 1e-9
        assert torch.allclose(gpu.cost.cpu(), cpu.cost, rtol=rel, atol=0)


@pytest.mark.parametrize("solver", [sinkhorn, sinkhorn_newton_sparse])
def test_default_tolerance_follows_the_dtype(solver, generator):
    """tol=None: 1e-9 in float64, 1e-5 in float32 (DEFAULT_TOL).  float32 rounding levels
    the marginal error off near 1e-6, so under the former fixed 1e-9 a float32 solve ran
    to max_iter and reported converged = False."""
    from lowrank_ops.ot.sinkhorn import DEFAULT_TOL

    C = torch.rand(60, 50, generator=generator, dtype=F64)
    for dtype in (torch.float64, torch.float32):
        result = solver(None, None, C.to(dtype), 0.05)
        explicit = solver(None, None, C.to(dtype), 0.05, tol=DEFAULT_TOL[dtype])
        assert bool(result.converged), dtype
        # The reported error is recomputed from the final potentials, column marginals
        # included (exact in the loop's own test up to rounding): float32 adds its
        # rounding floor, 2e-7 to 9e-7 measured (DEFAULT_TOL's comment).
        assert float(result.marginal_error) <= DEFAULT_TOL[dtype] + (1e-6 if dtype == torch.float32 else 0.0)
        assert torch.equal(result.f, explicit.f) and int(result.iterations) == int(explicit.iterations)
    with pytest.raises(ValueError, match=r"tol must be None or a finite number >= 0; got -1\.0"):
        solver(None, None, C, 0.05, tol=-1.0)


def test_sparsify_fill_refuses_a_row_ptr_that_disagrees_with_the_entries():
    """The registered op trusted row_ptr where no kernel call compared it with the entries:
    entries given to an inactive problem came back as column 0, value 0 (not a CSR), and a
    row_ptr of zeros returned an empty pattern while entries passed the threshold."""
    ops = torch.ops.lowrank_ops
    B, n, m = 2, 5, 4
    C = torch.rand(B, n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f, g = torch.zeros(B, n, dtype=torch.float64), torch.zeros(B, m, dtype=torch.float64)
    threshold = torch.full((B,), -3.0, dtype=torch.float64)
    counts = ops.ot_sparsify_count(C, None, None, f, g, 0.1, 0, None, False, threshold)
    row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with pytest.raises(ValueError, match="row_ptr gives the inactive problems .* entries; expected 0"):
        ops.ot_sparsify_fill(C, None, None, f, g, 0.1, 0, torch.tensor([True, False]), False, threshold, row_ptr)
    with pytest.raises(ValueError, match=f"row_ptr gives 0 entries; {int(counts.sum())} pass the threshold"):
        ops.ot_sparsify_fill(C, None, None, f, g, 0.1, 0, None, False, threshold, torch.zeros(B * n + 1,
                                                                                              dtype=torch.int64))
    active = torch.tensor([True, False])
    counts = ops.ot_sparsify_count(C, None, None, f, g, 0.1, 0, active, False, threshold)
    row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    col_idx, values = ops.ot_sparsify_fill(C, None, None, f, g, 0.1, 0, active, False, threshold, row_ptr)
    assert col_idx.numel() == int(counts.sum()) == int(counts[:n].sum())


def test_value_backward_inside_autocast(generator):
    """The value's envelope gradients are formed with the caller's autocast region off."""
    C = torch.rand(5, 4, generator=generator, requires_grad=True)
    assert_backward_ignores_autocast(lambda C: sinkhorn(None, None, C, 0.3, tol=1e-6).value, [C])


def test_epsilon_scaling_has_at_most_64_stages():
    """The stage count is log(spread / reg) / log(factor): a factor of 1.000000001 built a
    Python list of 4.6e9 regs (the process killed for memory), and one finite cost of
    1e300 ~500 stages (SNS: 115 s on an 8 x 6 problem).  The factor grows past 64 stages."""
    from lowrank_ops.ot.sinkhorn import reg_schedule

    class Spread:
        def __init__(self, spread, reg):
            self.spread, self.reg = spread, reg

        def cost_spread(self):
            return self.spread

    for spread, factor in ((1.0, 1.000000001), (1e300, True), (1e300, 2.0)):
        regs = reg_schedule("sinkhorn", Spread(spread, 0.01), factor)
        assert 1 < len(regs) <= 65 and regs[-1] == 0.01 and regs[0] <= spread * (1 + 1e-9), (spread, factor)
    assert reg_schedule("sinkhorn", Spread(1.0, 0.01), True) == [0.64, 0.16, 0.04, 0.01]  # 0.01 * 4^k <= 1
    for reg in (1e-9, 1e-300):  # spread / reg overflows: the stages through logs (a NaN count raised before)
        regs = reg_schedule("sinkhorn", Spread(1e300, reg), True)
        assert len(regs) == 65 and regs[-1] == reg and all(math.isfinite(r) for r in regs)

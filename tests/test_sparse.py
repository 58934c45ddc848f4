"""Fixed-support sparse ops: FixedSupport, fixed_sparse_matmul, spmv, csr_spmm, csr_sddmm.

Every numerical check compares against the float64 reference on fresh random data with
the rigorous summation bound of helpers.summation_bound; half types are additionally
held to at most 2x the error of torch's own matmul at that precision.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

from lowrank_ops import reference
from lowrank_ops.ops import fixed_sparse_matmul, spmv
from lowrank_ops.sparse import _BUFFERS, FixedSupport

from helpers import FLOAT_DTYPES, assert_backward_ignores_autocast, assert_within, randn, summation_bound

# (out_features, in_features, density): tall, wide, full, tiny, nnz = 0.
PATTERNS = [(37, 53, 0.2), (96, 300, 0.05), (24, 24, 1.0), (1, 1, 1.0), (20, 30, 0.0)]
# Leading shapes of x: SpMV-like (< 4 rows), partial tiles, several tiles, nested, empty.
BATCH_SHAPES = [(), (3,), (16,), (41,), (2, 19), (0,)]


def make_support(pattern, generator, device, index_dtype=None) -> FixedSupport:
    out_features, in_features, density = pattern
    return FixedSupport.random(out_features, in_features, density, generator=generator, index_dtype=index_dtype).to(device)


def products_abs_sum(x: torch.Tensor, values: torch.Tensor, support: FixedSupport) -> torch.Tensor:
    """|x| |S|^T in float64: the scale of every output's summation error."""
    return x.abs().double() @ support.to_dense(values.abs().double()).T


def max_row_nnz(support: FixedSupport) -> int:
    counts = support.row_ptr[1:] - support.row_ptr[:-1]
    return int(counts.max()) if counts.numel() else 0


def max_col_nnz(support: FixedSupport) -> int:
    counts = support.col_ptr[1:] - support.col_ptr[:-1]
    return int(counts.max()) if counts.numel() else 0


# --------------------------------------------------------------------------- FixedSupport
class TestFixedSupport:
    def test_random_is_uniform_without_replacement_and_deterministic(self, generator):
        first = FixedSupport.random(50, 80, 0.1, generator=torch.Generator().manual_seed(7))
        again = FixedSupport.random(50, 80, 0.1, generator=torch.Generator().manual_seed(7))
        other = FixedSupport.random(50, 80, 0.1, generator=torch.Generator().manual_seed(8))
        assert first.nnz == 400 and first.density == pytest.approx(0.1)
        assert torch.equal(first.col_idx, again.col_idx) and torch.equal(first.row_ptr, again.row_ptr)
        assert not torch.equal(first.col_idx, other.col_idx)
        keys = first.rows() * 80 + first.col_idx.long()
        assert torch.unique(keys).numel() == first.nnz, "entries must be distinct"
        assert bool((keys[1:] > keys[:-1]).all()), "CSR order: sorted by (row, col)"

    def test_random_marginals_are_uniform(self):
        # 200 patterns of 10 entries among 100 positions: each position is hit 20 times
        # on average; a chi-square statistic far above its 99 degrees of freedom would
        # reveal a biased sampler (p < 1e-6 at 180).
        hits = torch.zeros(100)
        g = torch.Generator().manual_seed(3)
        for _ in range(200):
            support = FixedSupport.random(10, 10, 0.1, generator=g)
            hits[support.rows() * 10 + support.col_idx.long()] += 1
        chi_square = ((hits - 20) ** 2 / 20).sum().item()
        assert chi_square < 180, chi_square

    @pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
    def test_random_densities(self, density):
        support = FixedSupport.random(33, 17, density, generator=torch.Generator().manual_seed(1))
        assert support.nnz == round(density * 33 * 17)
        assert support.row_ptr[-1].item() == support.nnz and support.col_ptr[-1].item() == support.nnz

    def test_csc_map_is_the_transpose(self, generator):
        support = FixedSupport.random(40, 25, 0.2, generator=generator)
        values = torch.randn(support.nnz, generator=generator, dtype=torch.float64)
        dense = support.to_dense(values)
        csc_values = values[support.csc_to_csr.long()]
        rebuilt = torch.zeros(25, 40, dtype=torch.float64)
        cols = torch.repeat_interleave(torch.arange(25), (support.col_ptr[1:] - support.col_ptr[:-1]).long())
        rebuilt[cols, support.row_idx.long()] = csc_values
        assert torch.equal(rebuilt, dense.T)
        lengths = (support.row_ptr[1:] - support.row_ptr[:-1])[support.row_order.long()]
        assert bool((lengths[:-1] >= lengths[1:]).all()), "row_order: longest rows first"

    def test_from_indices_sorts_and_returns_matching_values(self, generator):
        rows = torch.tensor([3, 0, 2, 0])
        cols = torch.tensor([1, 4, 0, 2])
        values = torch.tensor([1.0, 2.0, 3.0, 4.0])
        support, ordered = FixedSupport.from_indices(rows, cols, (4, 5), values)
        assert support.col_idx.tolist() == [2, 4, 0, 1]
        assert support.row_ptr.tolist() == [0, 2, 2, 3, 4]
        assert ordered.tolist() == [4.0, 2.0, 3.0, 1.0]
        dense = torch.zeros(4, 5)
        dense[rows, cols] = values
        assert torch.equal(support.to_dense(ordered), dense)
        assert torch.equal(support.values_from_dense(dense), ordered)

    def test_from_csr_round_trip(self, generator):
        support = FixedSupport.random(30, 20, 0.3, generator=generator)
        again = FixedSupport.from_csr(support.row_ptr, support.col_idx, support.shape)
        for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "csc_to_csr"):
            assert torch.equal(getattr(again, name), getattr(support, name))

    def test_index_dtype(self, generator):
        assert FixedSupport.random(10, 10, 0.5, generator=generator).index_dtype == torch.int32
        wide = FixedSupport.random(10, 10, 0.5, generator=generator, index_dtype=torch.int64)
        assert all(getattr(wide, name).dtype == torch.int64 for name in ("row_ptr", "col_idx", "csc_to_csr"))
        with pytest.raises(ValueError, match="index_dtype"):
            FixedSupport.random(10, 10, 0.5, index_dtype=torch.int16)

    def test_state_dict_round_trip_with_another_nnz(self, generator):
        source = torch.nn.Module()
        source.support = FixedSupport.random(12, 9, 0.3, generator=generator)
        target = torch.nn.Module()
        target.support = FixedSupport.random(5, 4, 0.5, generator=generator, index_dtype=torch.int64)
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer))
        assert target.support.shape == (12, 9) and target.support.nnz == source.support.nnz
        for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "csc_to_csr", "row_order", "col_order"):
            assert torch.equal(getattr(target.support, name), getattr(source.support, name)), name

    def test_load_state_dict_rejects_corrupt_buffers(self, generator):
        """The kernels index with the buffers unchecked: a corrupt one is refused, naming it
        (as from_csr refuses bad CSR arrays), and the previous pattern is kept."""
        source = torch.nn.Module()
        source.support = FixedSupport.random(6, 8, 0.3, generator=generator)
        target = torch.nn.Module()
        target.support = FixedSupport.random(5, 4, 0.5, generator=generator)
        before = {name: getattr(target.support, name).clone() for name in _BUFFERS}
        nnz = source.support.nnz

        def set_row_ptr_1(t):
            t[1] = 10**6
            return t

        cases = [
            ("col_idx", lambda t: t.fill_(10**6), r"support.col_idx must lie in \[0, 8\); got 1000000"),
            ("row_ptr", set_row_ptr_1,
             r"support.row_ptr must be non-decreasing; support.row_ptr\[2\] = \d+ < support.row_ptr\[1\] = 1000000"),
            ("csc_to_csr", lambda t: t + nnz, rf"support.csc_to_csr \(torch.int32, {nnz} entries\) does not match"),
            ("row_idx", lambda t: t.flip(0), "support.row_idx .* that support.row_ptr and support.col_idx determine"),
            ("col_order", lambda t: t[:-1], r"col_order \(torch.int32, 7 entries\) .* torch.int32 tensor of 8 entries"),
            ("row_ptr", lambda t: t.long(), r"support.row_ptr \(torch.int64, 7 entries\) does not match the torch.int32"),
        ]
        for name, edit, message in cases:
            state = source.state_dict()
            state["support." + name] = edit(state["support." + name].clone())
            with pytest.raises(RuntimeError, match=message):
                target.load_state_dict(state)
            assert target.support.shape == (5, 4), name
            for kept in _BUFFERS:
                assert torch.equal(getattr(target.support, kept), before[kept]), (name, kept)

    def test_meta_support_holds_no_pattern_until_one_is_loaded(self, generator):
        """to_empty() from meta leaves the index buffers uninitialized: the ops refuse them."""
        source = FixedSupport.random(12, 9, 0.3, generator=generator)
        state = generator.get_state()
        support = FixedSupport.random(12, 9, 0.3, generator=generator, device="meta")
        assert torch.equal(generator.get_state(), state)  # nothing drawn on meta
        assert support.nnz == source.nnz and support.index_dtype == source.index_dtype
        x, values = torch.randn(4, 9), torch.randn(source.nnz)
        for moved in (support.to_empty(device="cpu"), copy.deepcopy(source).to("meta").to_empty(device="cpu")):
            with pytest.raises(ValueError, match="fixed_sparse_matmul: support holds no sparsity pattern"):
                fixed_sparse_matmul(x, values, moved)
            with pytest.raises(ValueError, match="spmv: support holds no sparsity pattern"):
                spmv(moved, values, x[0])
        holder = torch.nn.Module()
        holder.support = support
        holder.load_state_dict({"support." + k: v for k, v in source.state_dict().items()})
        torch.testing.assert_close(fixed_sparse_matmul(x, values, support), fixed_sparse_matmul(x, values, source))

    def test_to_device_and_repr(self, generator):
        support = FixedSupport.random(8, 6, 0.5, generator=generator)
        assert support.to("cpu").device.type == "cpu"
        assert "nnz=24" in repr(support)

    # ---- bad input
    def test_from_indices_rejects_out_of_range(self):
        with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\); got 4"):
            FixedSupport.from_indices(torch.tensor([0, 4]), torch.tensor([0, 1]), (4, 5))
        with pytest.raises(ValueError, match=r"cols must lie in \[0, 5\); got -1"):
            FixedSupport.from_indices(torch.tensor([0, 1]), torch.tensor([-1, 1]), (4, 5))

    def test_from_indices_rejects_duplicates(self):
        with pytest.raises(ValueError, match=r"1 duplicate coordinate\(s\).*\(1, 2\)"):
            FixedSupport.from_indices(torch.tensor([1, 0, 1]), torch.tensor([2, 0, 2]), (3, 3))

    def test_from_indices_rejects_mismatched_lengths_and_types(self):
        with pytest.raises(ValueError, match="rows has shape"):
            FixedSupport.from_indices(torch.tensor([0, 1]), torch.tensor([0]), (3, 3))
        with pytest.raises(ValueError, match="1-D integer tensor"):
            FixedSupport.from_indices(torch.tensor([0.5]), torch.tensor([0]), (3, 3))
        with pytest.raises(ValueError, match=r"values has shape \(3,\); expected \(nnz,\) = \(2,\)"):
            FixedSupport.from_indices(torch.tensor([0, 1]), torch.tensor([0, 1]), (3, 3), torch.zeros(3))

    def test_from_csr_rejects_unsorted_duplicate_and_bad_pointers(self):
        with pytest.raises(ValueError, match="strictly increasing within each row.*row 0"):
            FixedSupport.from_csr(torch.tensor([0, 2, 3]), torch.tensor([3, 1, 0]), (2, 4))
        with pytest.raises(ValueError, match="strictly increasing"):
            FixedSupport.from_csr(torch.tensor([0, 2, 2]), torch.tensor([1, 1]), (2, 4))
        with pytest.raises(ValueError, match="non-decreasing"):
            FixedSupport.from_csr(torch.tensor([0, 3, 2, 3]), torch.tensor([0, 1, 2]), (3, 4))
        with pytest.raises(ValueError, match="end at nnz = 2"):
            FixedSupport.from_csr(torch.tensor([0, 1, 3]), torch.tensor([0, 1]), (2, 4))
        with pytest.raises(ValueError, match=r"expected out_features \+ 1 = 3"):
            FixedSupport.from_csr(torch.tensor([0, 2]), torch.tensor([0, 1]), (2, 4))
        with pytest.raises(ValueError, match=r"col_idx must lie in \[0, 4\); got 7"):
            FixedSupport.from_csr(torch.tensor([0, 1, 2]), torch.tensor([0, 7]), (2, 4))

    def test_random_rejects_bad_density_and_shape(self):
        with pytest.raises(ValueError, match=r"density must be a number in \[0, 1\]; got 1.5"):
            FixedSupport.random(4, 4, 1.5)
        with pytest.raises(ValueError, match=r"density must be a number in \[0, 1\]; got 'x'"):  # was float()'s
            FixedSupport.random(4, 4, "x")
        with pytest.raises(ValueError, match="non-negative"):
            FixedSupport.random(-1, 4, 0.5)
        with pytest.raises(ValueError, match=r"shape must be two integers .*got \(3.9, 4\)"):  # was truncated to 3
            FixedSupport.random(3.9, 4, 0.5)

    def test_empty_index_sequences(self):
        # [] became a float32 tensor: "must be a 1-D integer tensor".
        assert FixedSupport.from_indices([], [], (3, 4)).nnz == 0
        assert FixedSupport.from_csr([0, 0, 0], [], (2, 3)).nnz == 0


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_forward_matches_float64_reference(device, dtype, pattern, generator):
    support = make_support(pattern, generator, device)
    values = randn(support.nnz, dtype=dtype, device=device, generator=generator)
    for batch_shape in BATCH_SHAPES:
        x = randn(*batch_shape, support.in_features, dtype=dtype, device=device, generator=generator)
        y = fixed_sparse_matmul(x, values, support)
        assert y.shape == (*batch_shape, support.out_features) and y.dtype == dtype and y.device == x.device
        expected = reference.fixed_sparse_matmul(x.double(), values.double(), support)
        bound = summation_bound(products_abs_sum(x, values, support), expected, max_row_nnz(support), dtype)
        assert_within(y, expected, bound, f"y {batch_shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_error_at_most_twice_torch(device, dtype, generator):
    support = make_support((128, 512, 0.1), generator, device)
    values = randn(support.nnz, dtype=dtype, device=device, generator=generator)
    x = randn(64, 512, dtype=dtype, device=device, generator=generator)
    expected = reference.fixed_sparse_matmul(x.double(), values.double(), support)
    ours = (fixed_sparse_matmul(x, values, support).double() - expected).abs().max()
    torch_same_dtype = (x @ support.to_dense(values).T).double()
    theirs = (torch_same_dtype - expected).abs().max()
    assert ours <= 2 * theirs, (ours.item(), theirs.item())


def test_non_contiguous_inputs(device, generator):
    support = make_support((45, 70, 0.15), generator, device)
    values_storage = randn(2 * support.nnz, dtype=torch.float32, device=device, generator=generator)
    values = values_storage[::2]  # strided values
    wide = randn(33, 140, device=device, generator=generator)
    transposed = randn(70, 21, device=device, generator=generator).T  # column-major x
    for x in (wide[:, ::2], transposed, wide[::3, :70]):
        assert not x.is_contiguous()
        y = fixed_sparse_matmul(x, values, support)
        expected = reference.fixed_sparse_matmul(x.double(), values.double(), support)
        bound = summation_bound(products_abs_sum(x, values, support), expected, max_row_nnz(support), torch.float32)
        assert_within(y, expected, bound, f"strides {x.stride()}")


def test_empty_rows_and_columns(device, generator):
    # Rows 0, 2, 5 and columns 1, 3 hold nothing: their outputs and gradients are exactly 0.
    rows = torch.tensor([1, 1, 3, 4, 4, 4])
    cols = torch.tensor([0, 2, 4, 0, 2, 5])
    support = FixedSupport.from_indices(rows, cols, (6, 6)).to(device)
    values = randn(6, dtype=torch.float64, device=device, generator=generator).requires_grad_()
    x = randn(20, 6, dtype=torch.float64, device=device, generator=generator).requires_grad_()
    y = fixed_sparse_matmul(x, values, support)
    assert torch.equal(y[:, [0, 2, 5]], torch.zeros(20, 3, dtype=torch.float64, device=device))
    y.sum().backward()
    assert torch.equal(x.grad[:, [1, 3]], torch.zeros(20, 2, dtype=torch.float64, device=device))
    expected = reference.fixed_sparse_matmul(x.detach(), values.detach(), support)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-13)


def test_int64_indices_match_int32(device, generator):
    pattern = (50, 64, 0.1)
    narrow = make_support(pattern, torch.Generator().manual_seed(5), device)
    wide = make_support(pattern, torch.Generator().manual_seed(5), device, index_dtype=torch.int64)
    values = randn(narrow.nnz, device=device, generator=generator)
    for rows in (2, 40):
        x = randn(rows, 64, device=device, generator=generator)
        assert torch.equal(fixed_sparse_matmul(x, values, narrow), fixed_sparse_matmul(x, values, wide))


def test_spmv(device, generator):
    support = make_support((80, 60, 0.1), generator, device)
    values = randn(support.nnz, dtype=torch.float64, device=device, generator=generator)
    v = randn(60, dtype=torch.float64, device=device, generator=generator)
    expected = support.to_dense(values) @ v
    torch.testing.assert_close(spmv(support, values, v), expected, rtol=1e-13, atol=1e-13)
    block = randn(4, 60, dtype=torch.float64, device=device, generator=generator)
    torch.testing.assert_close(spmv(support, values, block), block @ support.to_dense(values).T, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match=r"spmv: v has shape \(2, 3, 60\)"):
        spmv(support, values, torch.zeros(2, 3, 60, dtype=torch.float64, device=device))
    # spmv's vector is named v in every message, as in its signature
    with pytest.raises(ValueError, match=r"spmv: v has shape \(59,\); expected \(\.\.\., in_features\) = \(\.\.\., 60\)"):
        spmv(support, values, v[:59])
    with pytest.raises(TypeError, match="spmv: v must be a tensor; got list"):
        spmv(support, values, v.tolist())
    with pytest.raises(TypeError, match="spmv: values has dtype torch.float32; expected the dtype of v, torch.float64"):
        spmv(support, values.float(), v)


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_float64_reference(device, dtype, generator):
    for pattern in [(37, 53, 0.2), (64, 200, 0.05), (20, 30, 0.0)]:
        support = make_support(pattern, generator, device)
        for batch_shape in [(2,), (41,), (3, 12), (0,)]:
            values = randn(support.nnz, dtype=dtype, device=device, generator=generator).requires_grad_()
            x = randn(*batch_shape, support.in_features, dtype=dtype, device=device, generator=generator).requires_grad_()
            grad_y = randn(*batch_shape, support.out_features, dtype=dtype, device=device, generator=generator)
            fixed_sparse_matmul(x, values, support).backward(grad_y)

            dense = support.to_dense(values.detach().double())
            g2 = grad_y.double().reshape(-1, support.out_features)
            x2 = x.detach().double().reshape(-1, support.in_features)
            expected_dx = (g2 @ dense).reshape(x.shape)
            bound_dx = summation_bound(
                (g2.abs() @ dense.abs()).reshape(x.shape), expected_dx, max_col_nnz(support), dtype
            )
            assert_within(x.grad, expected_dx, bound_dx, f"dx {pattern} {batch_shape}")

            rows, cols = support.rows(), support.col_idx.long()
            expected_dv = (g2.T @ x2)[rows, cols]
            bound_dv = summation_bound((g2.abs().T @ x2.abs())[rows, cols], expected_dv, g2.shape[0], dtype)
            assert_within(values.grad, expected_dv, bound_dv, f"dvalues {pattern} {batch_shape}")


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_gradcheck(device, rows, generator):
    support = make_support((13, 17, 0.3), generator, device)
    values = randn(support.nnz, dtype=torch.float64, device=device, generator=generator).requires_grad_()
    x = randn(rows, 17, dtype=torch.float64, device=device, generator=generator).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v: fixed_sparse_matmul(x, v, support), (x, values))
    batched = randn(2, rows, 17, dtype=torch.float64, device=device, generator=generator)[:, :, :].transpose(0, 1)
    batched.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v: fixed_sparse_matmul(x, v, support), (batched, values))


def test_gradient_only_for_what_is_asked(device, generator):
    support = make_support((10, 12, 0.4), generator, device)
    values = randn(support.nnz, device=device, generator=generator).requires_grad_()
    x = randn(6, 12, device=device, generator=generator)
    fixed_sparse_matmul(x, values, support).sum().backward()
    assert values.grad is not None and values.grad.shape == values.shape
    frozen = values.detach()
    x.requires_grad_()
    fixed_sparse_matmul(x, frozen, support).sum().backward()
    assert x.grad is not None and frozen.grad is None


# --------------------------------------------------------------------------- op contracts
def test_opcheck(device, generator):
    support = make_support((19, 23, 0.25), generator, device)
    values = randn(support.nnz, device=device, generator=generator)
    for rows in (3, 20):
        x = randn(rows, 23, device=device, generator=generator)
        grad_y = randn(rows, 19, device=device, generator=generator)
        torch.library.opcheck(
            torch.ops.lowrank_ops.csr_spmm.default,
            (support.row_ptr, support.col_idx, values, support.row_order, x, 19),
        )
        torch.library.opcheck(
            torch.ops.lowrank_ops.csr_sddmm.default,
            (support.row_ptr, support.col_idx, support.row_order, grad_y, x),
        )
        addend = randn(rows, 19, device=device, generator=generator)
        torch.library.opcheck(
            torch.ops.lowrank_ops.csr_spmm.default,
            (support.row_ptr, support.col_idx, values, support.row_order, x, 19, addend),
        )


def test_raw_ops_match_reference(device, generator):
    support = make_support((31, 29, 0.2), generator, device)
    values = randn(support.nnz, dtype=torch.float64, device=device, generator=generator)
    x = randn(9, 29, dtype=torch.float64, device=device, generator=generator)
    left = randn(9, 31, dtype=torch.float64, device=device, generator=generator)
    out = torch.ops.lowrank_ops.csr_spmm(support.row_ptr, support.col_idx, values, None, x, 31)
    torch.testing.assert_close(out, reference.csr_spmm(support.row_ptr, support.col_idx, values, x, 31), rtol=1e-13, atol=1e-13)
    dv = torch.ops.lowrank_ops.csr_sddmm(support.row_ptr, support.col_idx, None, left, x)
    torch.testing.assert_close(dv, reference.csr_sddmm(support.row_ptr, support.col_idx, left, x), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [3, 40])  # both CUDA kernels: lanes over nnz, lanes over the batch
def test_spmm_addend_is_added_before_the_one_rounding(device, dtype, rows, generator):
    support = make_support((31, 29, 0.2), generator, device)
    values = randn(support.nnz, dtype=dtype, device=device, generator=generator)
    x = randn(rows, 29, dtype=dtype, device=device, generator=generator)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    # A transposed (non-contiguous) addend of the accumulation dtype, larger than one half ulp.
    addend = randn(31, rows, dtype=accumulate, device=device, generator=generator).T * 1000
    out = torch.ops.lowrank_ops.csr_spmm(support.row_ptr, support.col_idx, values, support.row_order, x, 31, addend)
    exact = addend.double() + reference.csr_spmm(support.row_ptr, support.col_idx, values.double(), x.double(), 31)
    # One rounding of the float32 (float64) sum to dtype: within one ulp of the exact value
    # plus the accumulation's own error (|terms| * row length * u_acc).
    u_acc = torch.finfo(accumulate).eps
    terms = reference.csr_spmm(support.row_ptr, support.col_idx, values.double().abs(), x.double().abs(), 31)
    bound = exact.abs() * torch.finfo(dtype).eps + (terms + addend.double().abs()) * 29 * u_acc
    assert out.dtype == dtype
    assert ((out.double() - exact).abs() <= bound).all()
    with pytest.raises(TypeError, match="addend has dtype"):
        torch.ops.lowrank_ops.csr_spmm(support.row_ptr, support.col_idx, values, None, x, 31,
                                       addend.to(torch.float16))
    with pytest.raises(ValueError, match=r"addend has shape \(31, %d\); expected \(batch, n_rows\)" % rows):
        torch.ops.lowrank_ops.csr_spmm(support.row_ptr, support.col_idx, values, None, x, 31, addend.T)


class SparseLinear(torch.nn.Module):
    """The smallest module using the op: y = x S^T + b with trainable values and bias."""

    def __init__(self, in_features, out_features, density, generator):
        super().__init__()
        self.support = FixedSupport.random(out_features, in_features, density, generator=generator)
        self.values = torch.nn.Parameter(torch.randn(self.support.nnz, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator))

    def forward(self, x):
        return fixed_sparse_matmul(x, self.values, self.support) + self.bias


def test_torch_compile_fullgraph(device, generator):
    model = SparseLinear(24, 16, 0.25, generator).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = randn(5, 7, 24, device=device, generator=generator).requires_grad_()
    eager_y = model(x)
    eager_y.square().sum().backward()
    eager_grads = [x.grad.clone(), model.values.grad.clone(), model.bias.grad.clone()]
    x.grad = None
    model.zero_grad()
    compiled_y = compiled(x)
    compiled_y.square().sum().backward()
    torch.testing.assert_close(compiled_y, eager_y)
    for eager, now in zip(eager_grads, [x.grad, model.values.grad, model.bias.grad]):
        torch.testing.assert_close(now, eager)


def test_torch_compile_inductor(device, generator):
    model = SparseLinear(24, 16, 0.25, generator).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = randn(9, 24, device=device, generator=generator)
    torch.testing.assert_close(compiled(x), model(x))


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_argument_expected_and_actual(device, generator):
    support = make_support((8, 10, 0.5), generator, device)
    values = randn(support.nnz, device=device, generator=generator)
    x = randn(4, 10, device=device, generator=generator)
    with pytest.raises(ValueError, match=r"x has shape \(4, 9\); expected \(\.\.\., in_features\) = \(\.\.\., 10\)"):
        fixed_sparse_matmul(x[:, :9], values, support)
    with pytest.raises(ValueError, match=rf"values has shape \({support.nnz - 1},\); expected \(nnz,\) = \({support.nnz},\)"):
        fixed_sparse_matmul(x, values[:-1], support)
    with pytest.raises(TypeError, match="values has dtype torch.float64; expected the dtype of x, torch.float32"):
        fixed_sparse_matmul(x, values.double(), support)
    with pytest.raises(TypeError, match="x has dtype torch.int64; expected one of float32"):
        fixed_sparse_matmul(x.long(), values, support)
    with pytest.raises(TypeError, match="support must be a lowrank_ops.sparse.FixedSupport"):
        fixed_sparse_matmul(x, values, support.to_dense(values))
    with pytest.raises(ValueError, match="values is on meta"):
        fixed_sparse_matmul(x, values.to("meta"), support)
    with pytest.raises(ValueError, match="support is on .*; expected the device of x, meta"):
        fixed_sparse_matmul(x.to("meta"), values.to("meta"), support)


def test_raw_op_rejects_bad_arguments(generator):
    support = make_support((8, 10, 0.5), generator, "cpu")
    values = randn(support.nnz, generator=generator)
    x = randn(4, 10, generator=generator)
    with pytest.raises(ValueError, match=r"row_ptr has shape \(9,\); expected \(n_rows \+ 1,\) = \(8,\)"):
        torch.ops.lowrank_ops.csr_spmm(support.row_ptr, support.col_idx, values, None, x, 7)
    with pytest.raises(TypeError, match="col_idx has dtype torch.int64; expected the dtype of row_ptr"):
        torch.ops.lowrank_ops.csr_spmm(support.row_ptr, support.col_idx.long(), values, None, x, 8)
    with pytest.raises(ValueError, match=r"dense has shape \(10,\); expected 2-D"):
        torch.ops.lowrank_ops.csr_spmm(support.row_ptr, support.col_idx, values, None, x[0], 8)
    with pytest.raises(ValueError, match="expected 2-D .* with the same batch"):
        torch.ops.lowrank_ops.csr_sddmm(support.row_ptr, support.col_idx, None, randn(3, 8), x)


def test_raw_ops_reject_bad_index_arrays(generator):
    # The pattern checks shared with the Krylov ops (lowrank_ops._csr), reached through both raw ops.
    support = make_support((8, 10, 0.5), generator, "cpu")
    row_ptr, col_idx, row_order = support.row_ptr, support.col_idx, support.row_order
    values = randn(support.nnz, generator=generator)
    x, left = randn(4, 10, generator=generator), randn(4, 8, generator=generator)
    spmm, sddmm = torch.ops.lowrank_ops.csr_spmm, torch.ops.lowrank_ops.csr_sddmm
    with pytest.raises(ValueError, match=r"csr_spmm: row_ptr has shape \(1, 9\); expected \(n_rows \+ 1,\) = \(9,\)"):
        spmm(row_ptr[None], col_idx, values, None, x, 8)
    with pytest.raises(ValueError, match=r"csr_sddmm: row_ptr has shape \(8,\); expected \(n_rows \+ 1,\) = \(9,\)"):
        sddmm(row_ptr[:-1], col_idx, None, left, x)
    with pytest.raises(ValueError, match=r"csr_spmm: col_idx has shape \(1, \d+\); expected 1-D \(nnz,\)"):
        spmm(row_ptr, col_idx[None], values, None, x, 8)
    with pytest.raises(TypeError, match="csr_spmm: row_ptr has dtype torch.int16; expected int32 or int64"):
        spmm(row_ptr.short(), col_idx.short(), values, None, x, 8)
    with pytest.raises(TypeError, match="csr_sddmm: col_idx has dtype torch.int64; expected the dtype of row_ptr"):
        sddmm(row_ptr, col_idx.long(), None, left, x)
    with pytest.raises(TypeError, match="csr_spmm: row_order has dtype torch.int64; expected the dtype of row_ptr"):
        spmm(row_ptr, col_idx, values, row_order.long(), x, 8)
    with pytest.raises(ValueError, match=r"csr_sddmm: row_order has shape \(7,\); expected \(8,\)"):
        sddmm(row_ptr, col_idx, row_order[:-1], left, x)


def test_corrupt_pattern_never_reads_or_writes_out_of_bounds(device, generator):
    # Raw ops bypass FixedSupport's validation; out-of-range columns and row pointers
    # must be skipped (clamped), never dereferenced; what sparse.h promises for the
    # outputs holds on both back ends (on CUDA, sddmm left entries no row covers
    # uninitialized).
    ops = torch.ops.lowrank_ops
    row_ptr = torch.tensor([0, 2, 2, 9], dtype=torch.int32, device=device)  # last pointer past nnz = 4
    col_idx = torch.tensor([1, 1_000_000, -5, 2], dtype=torch.int32, device=device)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    x = randn(20, 3, generator=generator, device=device)
    out = ops.csr_spmm(row_ptr, col_idx, values, None, x, 3)
    expected = torch.zeros(20, 3, device=device)
    expected[:, 0] = x[:, 1]
    expected[:, 2] = 4.0 * x[:, 2]
    torch.testing.assert_close(out, expected)
    left = randn(20, 3, generator=generator, device=device)
    dv = ops.csr_sddmm(row_ptr, col_idx, None, left, x)
    assert dv[1].item() == 0 and dv[2].item() == 0
    torch.testing.assert_close(dv[3], (left[:, 2] * x[:, 2]).sum())
    # Entries no row covers (row_ptr starting past 0): 0.
    starts_late = torch.tensor([1, 2], dtype=torch.int32, device=device)
    dv = ops.csr_sddmm(starts_late, torch.zeros(3, dtype=torch.int32, device=device), None, left[:, :1], x[:, :1])
    torch.testing.assert_close(dv, torch.stack([torch.zeros((), device=device), (left[:, 0] * x[:, 0]).sum(),
                                                torch.zeros((), device=device)]))
    # A row_order that is not a permutation (sparse.h: spmm leaves the rows it skips
    # unwritten on CUDA): rows it visits are right, nothing is written out of bounds.
    repeated = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)
    out = ops.csr_spmm(row_ptr, col_idx, values, repeated, x, 3)
    torch.testing.assert_close(out[:, 0], expected[:, 0])
    if device == "cpu":  # ignored there
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_skewed_rows_split_across_threads(threads, generator):
    """Enough work for several row blocks (the CPU kernels split rows by nnz + rows): one
    row holding every column, long empty stretches, and the SpMV, SpMM and SDDMM paths."""
    out_features, in_features = 3000, 400
    rows = [torch.full((in_features,), 7), torch.randint(1500, 3000, (6000,), generator=generator)]
    cols = [torch.arange(in_features), torch.randint(0, in_features, (6000,), generator=generator)]
    pairs = torch.unique(torch.stack([torch.cat(rows), torch.cat(cols)]), dim=1)
    support = FixedSupport.from_indices(pairs[0], pairs[1], (out_features, in_features))
    values = randn(support.nnz, generator=generator)
    dense = support.to_dense(values).double()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 40):
            x = randn(batch, in_features, generator=generator)
            torch.testing.assert_close(fixed_sparse_matmul(x, values, support), (x.double() @ dense.T).float(),
                                       rtol=1e-5, atol=1e-4)
            grad_y = randn(batch, out_features, generator=generator)
            dv = torch.ops.lowrank_ops.csr_sddmm(support.row_ptr, support.col_idx, None, grad_y, x)
            expected = (grad_y.double().T @ x.double())[support.rows(), support.col_idx.long()]
            torch.testing.assert_close(dv, expected.float(), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


def test_non_monotone_row_pointers_at_threaded_sizes(generator):
    """A decreasing stretch of row_ptr (raw op, no FixedSupport check) at a size that splits
    rows across threads: every row still sums entries [clamp(row_ptr[r]), max(that,
    clamp(row_ptr[r + 1]))) and nothing is read or written out of bounds."""
    n_rows, n_cols, nnz = 4000, 64, 40000
    row_ptr = torch.arange(0, 10 * (n_rows + 1), 10, dtype=torch.int32)
    row_ptr[1000:1500] = 5  # decreasing, then jumping back up
    row_ptr[-1] = nnz + 999  # past nnz: clamped
    col_idx = torch.randint(0, n_cols, (nnz,), dtype=torch.int32, generator=generator)
    values = randn(nnz, generator=generator)
    x = randn(1, n_cols, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.ops.lowrank_ops.csr_spmm(row_ptr, col_idx, values, None, x, n_rows)
    finally:
        torch.set_num_threads(previous)
    products = values.double() * x[0, col_idx.long()].double()
    expected = torch.empty(n_rows, dtype=torch.float64)
    for r in range(n_rows):
        begin = min(max(int(row_ptr[r]), 0), nnz)
        end = max(begin, min(max(int(row_ptr[r + 1]), 0), nnz))
        expected[r] = products[begin:end].sum()
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_cuda_tensor_on_cpu_only_build_names_the_fix(cpu_only_build):
    from lowrank_ops.ops import sparse as sparse_ops

    support = FixedSupport.random(4, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels; rebuild with nvcc on PATH"):
        sparse_ops._csr_spmm_cuda(support.row_ptr, support.col_idx, torch.ones(8), None, torch.ones(2, 4), 4)
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels"):
        sparse_ops._csr_sddmm_cuda(support.row_ptr, support.col_idx, None, torch.ones(2, 4), torch.ones(2, 4))


# --------------------------------------------------------------------------- CUDA specifics
@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream(cuda_device, generator):
    support = make_support((256, 512, 0.05), generator, "cuda")
    values = randn(support.nnz, device="cuda", generator=generator)
    x = randn(300, 512, device="cuda", generator=generator)
    expected = fixed_sparse_matmul(x, values, support)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # keep the stream busy: a kernel on the wrong stream would race ahead
        y = fixed_sparse_matmul(x, values, support)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_graph_capture(cuda_device, generator):
    support = make_support((128, 256, 0.05), generator, "cuda")
    values = randn(support.nnz, device="cuda", generator=generator)
    x = randn(64, 256, device="cuda", generator=generator)
    expected = fixed_sparse_matmul(x, values, support)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fixed_sparse_matmul(x, values, support)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fixed_sparse_matmul(x, values, support)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_inference_fast_path_rejects_a_replaced_pattern(generator):
    # Eager CPU inference skips csr_spmm's argument checks (the support was validated when
    # built); buffers replaced afterwards must still give an error, not a wild read.
    support = make_support((8, 10, 0.5), generator, "cpu")
    values = randn(support.nnz, generator=generator)
    x = randn(4, 10, generator=generator)
    support.row_ptr = support.row_ptr[:-2].clone()
    with pytest.raises(ValueError, match=r"row_ptr has shape \(7,\); expected \(n_rows \+ 1,\) = \(9,\)"):
        fixed_sparse_matmul(x, values, support)
    with pytest.raises(ValueError, match=r"row_ptr has shape \(7,\)"):
        spmv(support, values, x[0])


def test_backward_inside_autocast(generator):
    """fixed_sparse_matmul's backward is run with the caller's autocast region off, as its forward."""
    support = FixedSupport.random(12, 20, 0.3, generator=generator)
    values = randn(support.nnz, generator=generator).requires_grad_()
    x = randn(5, 20, generator=generator).requires_grad_()
    assert_backward_ignores_autocast(lambda x, values: fixed_sparse_matmul(x, values, support), [x, values])


def test_a_shape_too_large_for_memory_is_refused_before_allocating():
    """Two entries in a 2^31 + 1 row pattern allocated ~32 GB of per-row arrays and the
    process was killed for memory; the per-row and per-column arrays are sized first now."""
    from lowrank_ops.sparse import FixedSupport

    with pytest.raises(MemoryError, match=r"FixedSupport: out_features \+ in_features = 2147483653 rows and columns"):
        FixedSupport.from_indices(torch.tensor([0, 2**31]), torch.tensor([0, 1]), (2**31 + 1, 4))
    with pytest.raises(MemoryError, match="FixedSupport: out_features"):
        FixedSupport.random(2**31, 2**31, 1e-18)

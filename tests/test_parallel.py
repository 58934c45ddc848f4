"""The shared CPU thread pool (csrc/cpu/parallel.cpp), through a threaded kernel.

The pool's threaded kernels share the cores with torch's OpenMP team.  These tests run
a parallel torch op right before each threaded pass (the OpenMP workers then keep
spinning on the cores our workers need, which once made the pool's caller wait for a
worker that had not started) and use the pool from several Python threads at once (the
pool runs one region at a time; a caller that finds it busy runs its tasks serially).
Results are checked against float64 products with Higham's summation bound, on every
iteration, so a lost, repeated or half-run task fails.
"""
from __future__ import annotations

import threading

import torch

from lowrank_ops.ops.mfac import mfac_combine, mfac_dots

from helpers import assert_within, randn, summation_bound

# Large enough for the passes to split their columns over every torch thread
# (csrc/cpu/mfac_cpu.cpp: >= 2^17 elements and >= 16384 columns per extra thread).
ROWS, DIM = 6, 3 * 16384 + 123


def _problem(generator):
    G = randn(ROWS, DIM, generator=generator)
    x = randn(2, DIM, generator=generator)
    coef = randn(2, ROWS, generator=generator)
    G64, x64, c64 = G.double(), x.double(), coef.double()
    dots_ref = x64 @ G64.T
    dots_bound = summation_bound(x64.abs() @ G64.abs().T, dots_ref, DIM, torch.float32)
    comb_ref = x64 - c64 @ G64
    comb_bound = summation_bound(x64.abs() + c64.abs() @ G64.abs(), comb_ref, ROWS + 1, torch.float32)
    return G, x, coef, (dots_ref, dots_bound), (comb_ref, comb_bound)


def _check(G, x, coef, dots, comb, what):
    assert_within(mfac_dots(G, x, ROWS), *dots, f"{what}: mfac_dots")
    assert_within(mfac_combine(G, coef, x, 1.0, -1.0, ROWS), *comb, f"{what}: mfac_combine")


def test_threaded_kernel_after_torch_parallel_op(generator):
    G, x, coef, dots, comb = _problem(generator)
    big = randn(1 << 20, generator=generator)
    A = randn(256, 256, generator=generator)
    for i in range(40):
        # Alternate a parallel reduction and a GEMM: both wake torch's OpenMP team.
        if i % 2:
            assert torch.isfinite(big.sum())
        else:
            assert torch.isfinite(A @ A).all()
        _check(G, x, coef, dots, comb, f"iteration {i}")


def test_pool_from_two_python_threads(generator):
    G, x, coef, dots, comb = _problem(generator)
    errors = []
    start = threading.Barrier(3)

    def worker(name):
        try:
            start.wait()
            for i in range(25):
                _check(G, x, coef, dots, comb, f"{name} iteration {i}")
        except BaseException as error:  # reported to the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(f"thread {t}",)) for t in range(2)]
    for thread in threads:
        thread.start()
    start.wait()
    # The main thread keeps torch's OpenMP team busy meanwhile.
    big = randn(1 << 20, generator=generator)
    for _ in range(25):
        big.sum()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]

"""The CPU kernels' parallel regions (csrc/cpu/parallel.cpp), through threaded kernels.

Regions run on torch's OpenMP team when the process has one (``cpu_threading ==
"openmp"``), else (``LOWRANK_OPS_THREADS=pool``, a forked child, no OpenMP runtime) on
our own pool.  These tests run a parallel torch op right before each threaded pass (the
OpenMP workers then keep spinning on the cores, which once made the pool's caller wait
for a worker that had not started), use the regions from several Python threads at once
(one region at a time; a caller that finds them busy runs its tasks serially), and run
the same kernels on the pool in a subprocess and in a forked child.  Results are checked
against float64 products with Higham's summation bound, on every iteration, so a lost,
repeated or half-run task fails; the two threading modes must agree bit for bit (the
tasks partition the outputs, whichever thread runs them).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import lowrank_ops

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


_POOL_SCRIPT = """
import sys, torch, lowrank_ops
from lowrank_ops.ops.mfac import mfac_combine, mfac_dots
assert lowrank_ops.info()["cpu_threading"] == "pool", lowrank_ops.info()["cpu_threading"]
G, x, coef = torch.load(sys.argv[1])
torch.save((mfac_dots(G, x, G.shape[0]), mfac_combine(G, coef, x, 1.0, -1.0, G.shape[0])), sys.argv[2])
"""


def test_threading_mode_reported():
    expected = "openmp" if "OpenMP" in torch.__config__.parallel_info() else None
    mode = lowrank_ops.info()["cpu_threading"]
    assert mode in ("openmp", "pool")
    if expected and os.environ.get("LOWRANK_OPS_THREADS") != "pool":
        assert mode == expected, "torch runs on OpenMP but our kernels do not use its team"


def test_pool_and_openmp_agree_bit_for_bit(tmp_path, generator):
    G, x, coef, dots, comb = _problem(generator)
    torch.save((G, x, coef), tmp_path / "inputs.pt")
    env = dict(os.environ, LOWRANK_OPS_THREADS="pool")
    subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=120)
    pool_dots, pool_comb = torch.load(tmp_path / "out.pt")
    assert_within(pool_dots, *dots, "pool: mfac_dots")
    assert_within(pool_comb, *comb, "pool: mfac_combine")
    assert torch.equal(pool_dots, mfac_dots(G, x, ROWS)) and torch.equal(pool_comb, mfac_combine(G, coef, x, 1.0, -1.0, ROWS))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_in_a_forked_child(tmp_path, generator):
    """After the parent used the OpenMP team, a forked child (its team threads were not
    forked) runs the kernels on its own fresh pool, without hanging."""
    G, x, coef, dots, comb = _problem(generator)
    _check(G, x, coef, dots, comb, "parent")
    out = tmp_path / "child.pt"
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, leave through os._exit only
        code = 1
        try:
            torch.save((lowrank_ops.info()["cpu_threading"], mfac_dots(G, x, ROWS),
                        mfac_combine(G, coef, x, 1.0, -1.0, ROWS)), out)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
    mode, child_dots, child_comb = torch.load(out)
    assert mode == "pool"
    assert_within(child_dots, *dots, "forked child: mfac_dots")
    assert_within(child_comb, *comb, "forked child: mfac_combine")


_FORK_CHILD = """
import sys, torch, multiprocessing as mp
from lowrank_ops.linalg import batched_svd
torch.set_num_threads(2)
A = torch.randn(8, 64, 64)
torch.randn(512, 512) @ torch.randn(512, 512)  # the parent uses torch's OpenMP team, not ours
def child():
    batched_svd(A)
if __name__ == "__main__":
    process = mp.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    if process.is_alive():
        process.kill()
        sys.exit("the forked child hung")
    sys.exit(process.exitcode)
"""


def test_forked_child_whose_parent_never_ran_a_region_does_not_hang(tmp_path):
    """A child forked after the parent used torch's OpenMP team, but before any region of
    ours, entered GOMP_parallel on the team that did not fork and waited at its barrier
    forever (the pid that marks a child was recorded at the first region, in the child)."""
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]


def test_unknown_threads_setting_is_reported():
    """LOWRANK_OPS_THREADS has one value ('pool'); another was ignored silently."""
    for value, warned in (("bogus", True), ("pool", False)):
        result = subprocess.run([sys.executable, "-c", "import lowrank_ops"], capture_output=True, text=True,
                                env=dict(os.environ, LOWRANK_OPS_THREADS=value), timeout=120)
        assert result.returncode == 0
        assert ("LOWRANK_OPS_THREADS='bogus' is ignored: its only value is 'pool'" in result.stderr) == warned

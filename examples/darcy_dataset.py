"""Generate a small Darcy data set with SKR and compare with independent GMRES solves.

    python examples/darcy_dataset.py            # 40 systems at 48 x 48
The same job from the command line (resumable, with a progress bar):
    lowrank-ops generate darcy --grid 128 --num 1000 --out darcy.npz
"""
import time

from lowrank_ops import pde
from lowrank_ops.krylov import solve_sequence

problems = pde.generate("darcy", 48, 40, seed=0)
for method, order in (("gmres", "given"), ("gcrodr", "given"), ("gcrodr", "skr")):
    start = time.perf_counter()
    result = solve_sequence(problems, method=method, order=order, m=40, k=10, tol=1e-8)
    worst = max(info.true_residual for info in result.infos)
    print(f"{method:6s} {order:5s}: {result.matvecs:6d} matvecs, {time.perf_counter() - start:5.2f} s, "
          f"max residual {worst:.1e}, all converged: {result.converged}")

"""Points n = 10,000, d = 2, reg = 1, to ||grad||_1 <= 1e-6 (bench_ot's FULL points case).

Ours (on-the-fly cost) end to end; POT's ``sinkhorn_log``: the dense ``ot.dist`` plus its
time per iteration over 5 iterations times our iteration count (the same log-domain
iteration from zero potentials, so the same count): the pytest suite cannot afford POT's
~3 minutes.  Usage: ``python bench/ot_points_10k.py``; prints JSON.
"""
import json
import time

import ot as pot
import torch

from lowrank_ops.ot import sinkhorn

N, REG, TOL = 10_000, 1.0, 1e-6


def main() -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(N, 2, generator=generator, dtype=torch.float64) + 1.0
    a = torch.full((N,), 1.0 / N, dtype=torch.float64)
    b = a.clone()

    start = time.perf_counter()
    result = sinkhorn(a, b, reg=REG, x=x, y=y, tol=TOL, max_iter=100_000)
    ours_seconds = time.perf_counter() - start
    out = {"ours": dict(seconds=ours_seconds, iterations=int(result.iterations), converged=bool(result.converged),
                        err=float(result.marginal_error), cost=float(result.cost))}
    print(out, flush=True)

    start = time.perf_counter()
    M = pot.dist(x.numpy(), y.numpy())
    dist_seconds = time.perf_counter() - start
    pot.sinkhorn(a.numpy(), b.numpy(), M, REG, method="sinkhorn_log", stopThr=0, numItermax=1, warn=False)  # warm-up
    start = time.perf_counter()
    pot.sinkhorn(a.numpy(), b.numpy(), M, REG, method="sinkhorn_log", stopThr=0, numItermax=5, warn=False)
    per_iteration = (time.perf_counter() - start) / 5
    out["pot"] = dict(dist_seconds=dist_seconds, per_iteration_s=per_iteration,
                      to_tol_estimate_s=dist_seconds + per_iteration * out["ours"]["iterations"],
                      cost_matrix_MB=M.nbytes / 1e6)
    out["ratio_time_pot_over_ours"] = out["pot"]["to_tol_estimate_s"] / ours_seconds
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))

"""Every solver to ||grad||_1 <= 1e-8 on the SNS paper's assignment problem (n = 500,
C ~ U[0, 1], eta = 1200, float64): the run behind the SNS bars, which the pytest suite
cannot afford (Sinkhorn needs tens of thousands of iterations; POT's log-domain
Sinkhorn about 20 minutes).  Usage: ``python bench/ot_assignment_to_tolerance.py``
(about 70 s); prints JSON.  POT's time to the tolerance is its measured time per
iteration times our Sinkhorn's iteration count: both run the same log-domain iteration
from zero potentials, so they need the same number of iterations."""
import json
import time

import ot as pot
import torch

from lowrank_ops.ot import sinkhorn, sinkhorn_newton_sparse
g = torch.Generator().manual_seed(0)
n = 500; reg = 1 / 1200; tol = 1e-8
C = torch.rand(n, n, generator=g, dtype=torch.float64)
a = torch.full((n,), 1 / n, dtype=torch.float64); b = a.clone()
out = {}
t = time.perf_counter(); r = sinkhorn_newton_sparse(a, b, C, reg, tol=tol); t_sns = time.perf_counter() - t
t = time.perf_counter(); r = sinkhorn_newton_sparse(a, b, C, reg, tol=tol); t_sns = min(t_sns, time.perf_counter() - t)
out["sns"] = dict(seconds=t_sns, iterations=int(r.iterations), converged=bool(r.converged), err=float(r.marginal_error), cost=float(r.cost))
print(out, flush=True)
t = time.perf_counter(); r = sinkhorn(a, b, C, reg, tol=tol, max_iter=200_000); t_sk = time.perf_counter() - t
out["sinkhorn"] = dict(seconds=t_sk, iterations=int(r.iterations), converged=bool(r.converged), err=float(r.marginal_error), cost=float(r.cost))
print(out, flush=True)
# POT sinkhorn_log: the same log-domain iteration; timed per iteration over 300 iterations
# (stopThr=0 so it never stops early), then its time to the tolerance = Sinkhorn's count x that.
M = C.numpy(); an = a.numpy(); bn = b.numpy()
pot.sinkhorn(an, bn, M, reg, method="sinkhorn_log", stopThr=0, numItermax=20, warn=False)
t = time.perf_counter(); P = pot.sinkhorn(an, bn, M, reg, method="sinkhorn_log", stopThr=0, numItermax=300, warn=False); t_pot = time.perf_counter() - t
out["pot_per_iteration_s"] = t_pot / 300
out["pot_to_tol_estimate_s"] = t_pot / 300 * out["sinkhorn"]["iterations"]
out["ratio_iterations_sinkhorn_over_sns"] = out["sinkhorn"]["iterations"] / out["sns"]["iterations"]
out["ratio_time_pot_over_sns"] = out["pot_to_tol_estimate_s"] / t_sns
out["ratio_time_oursinkhorn_over_sns"] = t_sk / t_sns
print(json.dumps(out, indent=1))

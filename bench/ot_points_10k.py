"""Points n = 10,000, d = 2, reg = 1, to ||grad||_1 <= 1e-6 (bench_ot's FULL points case):
ours (on-the-fly cost) end to end; POT's sinkhorn_log: dense ot.dist plus its time per
iteration over 5 iterations times our iteration count (same log-domain iteration): the
pytest suite cannot afford POT's ~3 minutes.  Usage: ``python bench/ot_points_10k.py``."""
import json
import time

import ot as pot
import torch

from lowrank_ops.ot import sinkhorn
g = torch.Generator().manual_seed(0)
n = 10_000
x = torch.randn(n, 2, generator=g, dtype=torch.float64); y = torch.randn(n, 2, generator=g, dtype=torch.float64) + 1.0
a = torch.full((n,), 1.0 / n, dtype=torch.float64); b = a.clone()
t = time.perf_counter(); r = sinkhorn(a, b, reg=1.0, x=x, y=y, tol=1e-6, max_iter=100_000); t_ours = time.perf_counter() - t
out = dict(ours=dict(seconds=t_ours, iterations=int(r.iterations), converged=bool(r.converged), err=float(r.marginal_error), cost=float(r.cost)))
print(out, flush=True)
t = time.perf_counter(); M = pot.dist(x.numpy(), y.numpy()); t_dist = time.perf_counter() - t
pot.sinkhorn(a.numpy(), b.numpy(), M, 1.0, method="sinkhorn_log", stopThr=0, numItermax=1, warn=False)
t = time.perf_counter(); pot.sinkhorn(a.numpy(), b.numpy(), M, 1.0, method="sinkhorn_log", stopThr=0, numItermax=5, warn=False); per = (time.perf_counter() - t) / 5
out["pot"] = dict(dist_seconds=t_dist, per_iteration_s=per, to_tol_estimate_s=t_dist + per * out["ours"]["iterations"], cost_matrix_MB=M.nbytes / 1e6)
out["ratio_time_pot_over_ours"] = out["pot"]["to_tol_estimate_s"] / t_ours
print(json.dumps(out, indent=1))

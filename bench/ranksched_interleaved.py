"""Interleaved single-thread timing of the increlora and maestro suites' impls, for a
shared machine: the impls run in turn (A B C A B C ...) and each call is timed in the
thread's CPU time, so that other processes' load shifts all of them alike; prints the
medians and the median per-round ratio (peer / ours, > 1: ours faster) with quartiles.

    python bench/ranksched_interleaved.py maestro 25
    python bench/ranksched_interleaved.py increlora 200

The same builds and inputs as bench/bench_increlora.py and bench/bench_maestro.py.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_increlora  # noqa: E402
from lowrank_ops.methods.maestro import OrderedLowRankLinear  # noqa: E402


def maestro_fns(b: int, r: int = 256, d: int = 1024, n: int = 512):
    layer = OrderedLowRankLinear(d, d, r, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=generator).requires_grad_()
    grad_y = torch.randn(n, d, generator=generator)
    down, up, dense = torch.nn.Linear(d, b, bias=False), torch.nn.Linear(b, d), torch.nn.Linear(d, d)
    with torch.no_grad():
        down.weight.copy_(layer.V[:b])
        up.weight.copy_(layer.U[:, :b])
        up.bias.copy_(layer.bias)
        dense.weight.copy_(layer.U[:, :b] @ layer.V[:b])
        dense.bias.copy_(layer.bias)

    def step(forward, leaves):
        return lambda: torch.autograd.grad(forward(), leaves, grad_y)

    return {"ours": step(lambda: layer(x, rank=b), (x, layer.U_t, layer.V, layer.bias)),
            "linear_pair": step(lambda: up(F.linear(x, down.weight)), (x, down.weight, up.weight, up.bias)),
            "full_rank": step(lambda: dense(x), (x, dense.weight, dense.bias))}


def increlora_fns():
    fns = {}
    for impl, make in (("ours", bench_increlora._ours), ("peft_adalora", bench_increlora._peft)):
        for allocate in (False, True):
            fns[f"{impl}.{'allocate' if allocate else 'step'}"] = make((8, 1024, 16), "cpu", allocate)[0]
    return fns


def interleave(fns, rounds: int):
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
    return times


def report(times, ours: str, peers) -> None:
    print("  medians ms:", {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()})
    for peer in peers:
        ratios = sorted(p / o for p, o in zip(times[peer], times[ours]))
        quantile = lambda f: ratios[int(f * (len(ratios) - 1))]  # noqa: E731
        print(f"  {peer} / {ours}: median {quantile(0.5):.2f}x (quartiles {quantile(0.25):.2f}-{quantile(0.75):.2f})")


def main() -> None:
    torch.set_num_threads(1)
    which, rounds = sys.argv[1], int(sys.argv[2])
    if which == "maestro":
        for b in (256, 64):
            print(f"maestro 1024x1024 r=256 b={b} N=512")
            report(interleave(maestro_fns(b), rounds), "ours", ["linear_pair", "full_rank"])
    else:
        times = interleave(increlora_fns(), rounds)
        for op in ("step", "allocate"):
            print(f"increlora 8x(1024x1024) r_max=16 update_and_allocate.{op}")
            report({k: v for k, v in times.items() if k.endswith(op)}, f"ours.{op}", [f"peft_adalora.{op}"])


if __name__ == "__main__":
    main()

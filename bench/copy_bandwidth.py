"""Device-to-device copy bandwidth of the current GPU (or host memory copy on the CPU).

The roof that memory-bound kernels are compared with (bench/README.md): bytes read plus
bytes written per second by ``dst.copy_(src)`` on a 1 GiB buffer, median of 10 copies
after 3 warm-ups.  ``python bench/copy_bandwidth.py [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def copy_bandwidth(device: str, n_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """GB/s (1e9 bytes) of ``dst.copy_(src)``, counting the bytes read and the bytes written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(3 + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "host memory"
    print(f"{name}: copy bandwidth {copy_bandwidth(args.device):.0f} GB/s (read + write, 1 GiB, median of 10)")


if __name__ == "__main__":
    main()

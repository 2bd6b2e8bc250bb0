"""Throughput accounting: the measured matmul peak of this machine and model FLOPs utilisation.

MFU here = model FLOPs per second / the peak matmul FLOP/s of the same dtype on the same device, measured in the
same process (a square matmul, best of a few runs). On a shared CPU, quote ratios measured in one run.
"""

from __future__ import annotations

import functools
import time

import torch


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 1024,
                        seconds: float = 0.5) -> float:
    """Best observed FLOP/s of an n×n @ n×n matmul in `dtype` on `device` (cached per process)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size**3

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: thread pools, kernels, caches
        a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def mfu(model_flops_per_s: float, peak_flops_per_s: float) -> float:
    return model_flops_per_s / peak_flops_per_s if peak_flops_per_s > 0 else float("nan")

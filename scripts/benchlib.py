"""Helpers shared by the benchmark scripts (scripts/bench_*.py): the machine's matmul FLOP/s for MFU."""

from __future__ import annotations

import time


def matmul_flops_per_s(n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an n x n fp32 matmul with the current torch threads (the MFU denominator)."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best

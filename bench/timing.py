"""Timing: median seconds per call of a function, done right for the device.

GPU: ``triton.testing.do_bench`` (warm-up, L2 flush before every run, CUDA
events), or CUDA events with our own L2 flush when Triton is missing.
CPU: median of repeated wall-clock runs after warm-up calls.
"""
from __future__ import annotations

import statistics
import time

import torch

# Seconds per measurement: (warm-up, timed) on a GPU; timed on a CPU, at least CPU_MIN_RUNS runs.
GPU_BUDGETS = {"smoke": (0.002, 0.005), "quick": (0.02, 0.08), "full": (0.05, 0.25)}
CPU_BUDGETS = {"smoke": 0.005, "quick": 0.1, "full": 0.5}
CPU_MIN_RUNS = {"smoke": 3, "quick": 3, "full": 5}
L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of A100 (40 MB), H100 and H200 (50 MB; 60 MB on the die)


def median_seconds(fn, device: torch.device, preset: str = "quick", warmup_calls: int = 1) -> float:
    """Median seconds of one ``fn()`` call on ``device``, after ``warmup_calls`` untimed calls
    (compilation, lazy state, CUDA-graph recording)."""
    for _ in range(warmup_calls):
        fn()
    if device.type == "cuda":
        warmup, rep = GPU_BUDGETS[preset]
        with torch.cuda.device(device):  # events and the flush on the device that runs fn
            try:
                from triton.testing import do_bench
            except Exception:  # Triton missing or broken
                return _cuda_events(fn, warmup, rep)
            return do_bench(fn, warmup=warmup * 1e3, rep=rep * 1e3, return_mode="median") / 1e3
    return _wall_clock(fn, CPU_BUDGETS[preset], CPU_MIN_RUNS[preset])


def _wall_clock(fn, budget: float, min_runs: int, max_runs: int = 100) -> float:
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cuda_events(fn, warmup: float, budget: float) -> float:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = max(time.perf_counter() - t0, 1e-6)
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    runs = max(3, min(1000, int(budget / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3

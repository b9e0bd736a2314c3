"""Timing: seconds per call of functions, done right for the device, with their spread.

``interleaved(fns)`` times several implementations of one case alternately: after their warm-up calls,
rounds of one burst of calls per implementation, the order flipping every round, so the drift of a shared,
noisy machine (other jobs, clocks, heat) falls on all of them alike. Every call is timed: on a CPU by the
wall clock, on a GPU by CUDA events with an L2 flush before each call. ``percentiles`` gives p20/p50/p80
of those times (the median is the headline; ``spread`` = (p80 - p20) / p50, and a row past
``NOISY_SPREAD`` is flagged noisy). ``median_seconds``: one function alone, its median (GPU:
``triton.testing.do_bench`` where Triton is there).
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
ROUNDS = 6           # bursts per implementation a case's timing budget aims at (an even count: both orders)
NOISY_SPREAD = 0.10  # (p80 - p20) / p50 above this: the row is flagged noisy


def percentiles(xs: list[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``xs`` (inclusive quantiles: ordered, and each one a sample or between two)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=5, method="inclusive")
    return q[0], statistics.median(xs), q[3]


def spread(p20: float, p50: float, p80: float) -> float:
    """The relative spread of a row's times, (p80 - p20) / p50."""
    return (p80 - p20) / p50 if p50 > 0 else 0.0


def interleaved(fns: list, device: torch.device, preset: str = "quick", warmups: list[int] | None = None,
                clock=time.perf_counter) -> list[list[float]]:
    """Seconds of every timed call of each of ``fns``, timed alternately (module doc): each gets
    ``warmups[i]`` untimed calls first, then rounds of a burst each (forward order, then reversed) until every
    one has its minimum runs and the budget (the preset's per-implementation budget times their number) is
    spent, in an even number of rounds, or each has ``max_runs`` calls."""
    warmups = warmups or [1] * len(fns)
    cuda = device.type == "cuda"
    if cuda:
        _, budget = GPU_BUDGETS[preset]
        min_runs, max_runs = 3, 1000
    else:
        budget, min_runs, max_runs = CPU_BUDGETS[preset], CPU_MIN_RUNS[preset], 100
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if cuda else None
    estimate = []
    for fn, n in zip(fns, warmups):
        for _ in range(max(1, n) - 1):
            fn()
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        estimate.append(max(clock() - t0, 1e-7))
    bursts = [max(1, min(max_runs, int(budget / ROUNDS / e))) for e in estimate]
    times: list[list[float]] = [[] for _ in fns]
    start, rounds = clock(), 0
    while True:
        done = all(len(t) >= max_runs for t in times)
        enough = all(len(t) >= min_runs for t in times) and clock() - start >= budget * len(fns)
        if done or (enough and rounds % 2 == 0):
            return times
        order = range(len(fns)) if rounds % 2 == 0 else range(len(fns) - 1, -1, -1)
        for i in order:
            n = min(bursts[i], max_runs - len(times[i]))
            times[i] += _cuda_burst(fns[i], n, flush) if cuda else _wall_burst(fns[i], n, clock)
        rounds += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_burst(fn, n: int, clock) -> list[float]:
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def _cuda_burst(fn, n: int, flush) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


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
    return statistics.median(_cuda_burst(fn, max(3, min(1000, int(budget / estimate))), flush))

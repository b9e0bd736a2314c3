"""Peak extra memory of one call: the most bytes a call holds at once beyond what was allocated before it.

For an optimizer step measured after warm-up (params, grads and optimizer state already exist), this is
the step's own working memory: its temporaries (Newton-Schulz iterates, batched copies, norms) at their
highest point. It is measured once per benchmark row, outside the timed loop, on one extra call.

- CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated() - memory_allocated()``
  around the synchronised call: exact for every tensor of the caching allocator on that device
  (not counted: cuBLAS / cuDNN workspaces and other memory the libraries take outside it, and the
  allocator's cached-but-free blocks and rounding, which ``memory_reserved`` would show).
- CPU: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free of
  c10's CPU allocator (every tensor's storage, including the temporaries inside an op) as an event
  with a time stamp and a signed size; the peak is the maximum of their running sum in time order,
  counted from 0 before the call (frees of memory older than the call only lower the sum).
  Its limits: only allocations on the threads the profiler watches are seen (ATen's intra-op worker
  threads allocate rarely; their allocations would be missed), memory that libraries allocate without
  c10 (MKL or oneDNN scratch space, Python objects) is not seen, and the profiler adds its own
  overhead to the call (irrelevant here: the call is not timed).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated during one ``fn()`` beyond those allocated before it (see the module doc)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_extra_bytes(fn)


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints two lines on every start and stop
    (``profiler_start`` / ``profiler_stop``) that no setting turns off. Only start and stop are wrapped."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _cpu_peak_extra_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    return running_peak((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)


def running_peak(events) -> int:
    """max(0, highest running sum of the signed sizes of ``events`` [(time, bytes)] in time order)."""
    peak = total = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        total += nbytes
        peak = max(peak, total)
    return peak

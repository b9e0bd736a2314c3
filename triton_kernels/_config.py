"""Launch settings shared by the Triton kernels: interpreter detection, autotuning, grid sizes."""
from __future__ import annotations

import functools

import torch
import triton

from disco_kernels._backend import triton_interpreted as interpreted


def autotune(configs, key, **kwargs):
    """``triton.autotune`` over a small explicit config list, its choice cached on disk so
    that a new process skips the benchmark (one config, no benchmark, under the interpreter)."""
    return triton.autotune(configs, key=key, cache_results=True, **kwargs)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (2 under the interpreter, to exercise multi-program paths)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


# Grid axes 1 and 2 take at most 65535 programs: batches beyond that run in chunks.
MAX_GRID_Y = 65535


def num_partials(rows: int) -> int:
    """How many programs split a per-matrix reduction over ``rows`` rows (partial sums, no atomics)."""
    return max(1, min(rows, 4 if interpreted() else 64))

"""Run a job in ``world`` processes with a hard timeout and collect what each rank saved."""
from __future__ import annotations

import contextlib
import time
import traceback

import torch
import torch.distributed as dist


@contextlib.contextmanager
def results(world: int, rank: int, root: str):
    """A rank's results dict: saved on exit to where ``run_world`` reads it (with the traceback of an
    exception as "error", so that the test shows it), then the process group is left."""
    out = {}
    try:
        yield out
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        torch.save(out, f"{root}/out{world}_{rank}.pt")
        dist.destroy_process_group()


def run_world(job, world: int, root: str, timeout_s: float, spawn: bool = False) -> list[dict]:
    """Start ``job(rank, world, root)`` on ``world`` processes; each saves its dict with ``results``. ``spawn`` for CUDA; fork otherwise (it skips re-importing torch:
    seconds per process on a small CPU). Kills every process and raises TimeoutError past ``timeout_s``."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(job, args=(world, root), nprocs=world, join=False,
                             start_method="spawn" if spawn else "fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"world {world}: job did not finish in {timeout_s} s")
    return [torch.load(f"{root}/out{world}_{r}.pt", weights_only=False) for r in range(world)]

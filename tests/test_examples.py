"""The layout examples run under torchrun (gloo, CPU) and say what their layout costs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180

pytestmark = pytest.mark.distributed


def _torchrun(script: str, nproc: int, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "examples" / script), "--steps", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _steps(out: str) -> list[dict]:
    return [{k: float(v) for k, v in zip(("loss", "bytes", "collectives"), m)}
            for m in re.findall(r"loss ([\d.]+)\s+bytes in (\d+)\s+collectives (\d+)", out)]


def test_fsdp_over_tp():  # (TP alone, on 2 ranks, runs in test_layouts.py)
    out = _torchrun("tp.py", 4, "--tp", "2")
    assert "0.up.weight: (256, 64) placed (_StridedShard(dim=0, sf=2), Shard(dim=0))" in out
    steps = _steps(out)
    assert len(steps) == 2 and all(s["bytes"] > 0 for s in steps)


def test_hsdp():
    out = _torchrun("hsdp.py", 4)
    assert "(Replicate(), Shard(dim=0))" in out and len(_steps(out)) == 2


def test_moe_experts_stay_on_their_rank():
    out = _torchrun("moe.py", 2, "--experts", "4")
    assert "['experts']: Spectral {'batch_dims': 1}" in out
    steps = _steps(out)
    assert len(steps) == 2 and all(s["bytes"] == 0 for s in steps)

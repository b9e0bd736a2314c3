"""Every Triton kernel compiles for real GPU targets (sm_80, sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, set for the other tests) never lowers a kernel, so a kernel that
runs interpreted may still fail to compile for a GPU. Here one subprocess, with TRITON_INTERPRET unset
and no visible GPU, compiles each kernel to PTX and a cubin (compile_triton_kernels.py; Triton's
bundled ptxas does the last step). Every autotuning config, in bf16 and fp32 too, takes minutes:
``env -u TRITON_INTERPRET python tests/compile_triton_kernels.py --all`` (run when changing configs).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("compile_triton_kernels.py")
ARCHS = (80, 90)


def compile_all(tmp_path, *flags):
    """Run the compile script in a fresh process; return (header, results)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_CACHE_DIR=str(tmp_path))  # a fresh cache: really compile
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags, *map(str, ARCHS)], env=env, capture_output=True,
                          text=True, timeout=1800)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"compile script failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    header, results = lines[0], lines[1:]
    if not header["ptxas"]:
        pytest.fail("ptxas is missing (Triton bundles it under triton/backends/nvidia/bin; or set "
                    "TRITON_PTXAS_PATH): cubins cannot be built. A missing tool, not a kernel bug.")
    return header, results


def check(header, results):
    failed = [r for r in results if not r["ok"]]
    tool = [r for r in failed if "ptxas" in r["error"] and ("No such file" in r["error"] or "not found" in r["error"])]
    assert not tool, "a tool is missing, not a kernel bug:\n" + "\n".join(r["error"] for r in tool)
    assert not failed, "kernels that do not compile:\n" + "\n\n".join(
        f"{r['kernel']} for sm_{r['arch']}:\n{r['error']}" for r in failed)
    assert all(r["ptx"] > 0 and r["cubin"] > 0 for r in results)
    for arch in ARCHS:  # every kernel of triton_kernels/ is compiled, for every target
        assert {r["kernel"].split("[")[0] for r in results if r["arch"] == arch} == set(header["kernels"])
    groups = {}
    for r in results:  # configs of one autotuned kernel are alternatives: one must fit in shared memory
        groups.setdefault((r["group"], r["arch"]), []).append(r)
    too_big = [f"{g} on sm_{a}: {[r['shared'] for r in rs]} bytes" for (g, a), rs in groups.items()
               if not any(r["fits"] for r in rs)]
    assert not too_big, "no config fits in shared memory:\n" + "\n".join(too_big)


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    check(*compile_all(tmp_path))

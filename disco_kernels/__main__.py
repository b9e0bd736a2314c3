"""``python -m disco_kernels``: versions, available backends and a self-check."""
from __future__ import annotations

import platform
import sys

import torch

import disco_kernels as dk
from disco_kernels import _backend, reference


def self_check() -> list[tuple[str, bool, str]]:
    """Each available backend of each op against the fp64 reference on a small case."""
    results = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 33, 65, generator=gen, dtype=torch.float64)
    ref = reference.newton_schulz(G, 5)
    sigma = reference.power_iteration(G, iters=8)[0]  # the same 8 iterations in fp64
    for backend in _backend.available_backends(device):
        for name, fn in (("newton_schulz", lambda b: dk.ops.newton_schulz(G.float().to(device), 5, backend=b)),
                         ("power_iteration", lambda b: dk.ops.power_iteration(G.float().to(device), iters=8, backend=b)[0])):
            try:
                out = fn(backend).double().cpu()
            except RuntimeError as e:  # this op has no kernel for this backend
                if "unavailable" in str(e):
                    continue
                raise
            want = ref if name == "newton_schulz" else sigma
            err = ((out - want).norm() / want.norm()).item()
            results.append((f"{name}[{backend}]", err < 1e-3, f"rel err {err:.1e}"))
    return results


def main() -> int:
    print(f"disco-kernels {dk.__version__} | python {platform.python_version()} | torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except Exception as e:
        print(f"triton: not available ({type(e).__name__})")
    ext = _backend.cuda_extension()
    if ext is None:
        print("CUDA extension: not built")
    else:
        v = ext.cuda_runtime_version
        print(f"CUDA extension: runtime {v // 1000}.{v % 1000 // 10}, archs {ext.cuda_archs}; "
              f"kernels: {', '.join(ext.kernels) or '-'}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}); backends: {', '.join(_backend.available_backends(device))}")
    for backend in ("triton", "cuda"):
        if (why := _backend.backend_unavailable(backend, torch.device(device))) is not None:
            print(f"  {backend} unavailable: {why}")
    ok = True
    for what, passed, detail in self_check():
        ok &= passed
        print(f"  self-check {what:28s} {'ok' if passed else 'FAIL'}  {detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

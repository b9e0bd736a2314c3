"""``python -m disco_kernels``: versions, available backends, which ones a GPU run has verified,
what "auto" takes on this machine's GPU, and a self-check."""
from __future__ import annotations

import importlib
import platform
import sys
import warnings

import torch

import disco_kernels as dk
from disco_kernels import _backend, _verified, reference

OPS = {op: importlib.import_module(f"disco_kernels.ops.{op}").KERNELS
       for op in ("newton_schulz", "power_iteration", "fused_update")}  # (the modules, not the ops of those names)


def self_check() -> list[tuple[str, bool, str]]:
    """Each available backend of each op against the fp64 reference on a small case (verified or not:
    each backend is forced)."""
    results = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 33, 65, generator=gen, dtype=torch.float64).float().to(device)
    ref = reference.newton_schulz(G.double().cpu(), 5)
    sigma = reference.power_iteration(G.double().cpu(), iters=8)[0]  # the same 8 iterations in fp64
    P, D = G[0], G[1]  # a RowNorm step of P along D: P (1 - 0.1) - 0.1 lmo(D)
    step = P.double().cpu() * 0.9 - 0.1 * dk.lmo.RowNorm().lmo(D.double().cpu())

    def fused(backend):
        p = P.clone()
        dk.ops.fused_update([p], [D.clone()], lmo="RowNorm", lr=0.1, backend=backend)
        return p

    checks = (("newton_schulz", ref, lambda b: dk.ops.newton_schulz(G, 5, backend=b)),
              ("power_iteration", sigma, lambda b: dk.ops.power_iteration(G, iters=8, backend=b)[0]),
              ("fused_update", step, fused))
    for backend in _backend.available_backends(device):
        for name, want, fn in checks:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", _backend.UnverifiedBackendWarning)
                    out = fn(backend).double().cpu()
            except RuntimeError as e:  # this op has no kernel for this backend
                if "unavailable" in str(e):
                    continue
                raise
            err = ((out - want).norm() / want.norm()).item()
            results.append((f"{name}[{backend}]", err < 1e-3, f"rel err {err:.1e}"))
    return results


def _versions_note(record: _verified.Record, triton_version: str) -> str:
    """How the running torch/Triton differ from the record's (information: the rule matches the capability)."""
    def minor(v):
        return ".".join(v.split("+")[0].split(".")[:2])
    diffs = [f"{what} {now} (recorded {then})" for what, then, now in
             (("torch", record.torch, torch.__version__), ("triton", record.triton, triton_version))
             if minor(then) != minor(now)]
    return f"; now {', '.join(diffs)}" if diffs else ""


def verification_lines(device: torch.device, triton_version: str) -> list[str]:
    """Each kernel backend's verification records, and which backend auto takes per op on ``device``."""
    lines = ["verified by a GPU run (disco_kernels/_verified.py; auto takes cuda, then triton, only on a GPU whose"
             " compute capability a run verified):"]
    for backend in _backend.AUTO_ORDER:
        records = _verified.VERIFIED.get(backend, ())
        if not records:
            lines.append(f"  {backend}: not verified on any GPU yet")
        for r in records:
            lines.append(f"  {backend}: verified on {r.describe()}{_versions_note(r, triton_version)}")
    if _backend.trust_unverified():
        lines.append(f"  {_backend.TRUST_ENV}=1: auto takes unverified backends too")
    if device.type != "cuda":
        lines.append("auto on this machine's GPU: no GPU here (torch.cuda.is_available() is False); auto runs torch")
        return lines
    cc = _backend.capability(device)
    lines.append(f"auto on {device} ({torch.cuda.get_device_name(device)}, compute capability {cc[0]}.{cc[1]}):")
    for op, kernels in OPS.items():
        skipped = []
        for cand in _backend.AUTO_ORDER:
            if (why := _backend.auto_skip_reason(cand, device, op, kernels)) is None:
                break
            skipped.append(f"{cand}: {why}")
        else:
            cand = "torch"
        note = "" if cand == "torch" else " (where its kernel takes the input, else the next)"
        lines.append(f"  {op}: {cand}{note}" + "".join(f"\n    passes over {s}" for s in skipped))
    return lines


def _current(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


def main() -> int:
    print(f"disco-kernels {dk.__version__} | python {platform.python_version()} | torch {torch.__version__}")
    try:
        import triton
        triton_version = triton.__version__
        print(f"triton {triton_version}")
    except Exception as e:
        triton_version = "-"
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
    device = _current(device)
    for line in verification_lines(device, triton_version):
        print(line)
    ok = True
    for what, passed, detail in self_check():
        ok &= passed
        print(f"  self-check {what:28s} {'ok' if passed else 'FAIL'}  {detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Backend discovery and dispatch: which of torch / Triton / CUDA runs an op.

Nothing here touches a GPU at import. Triton and the compiled extension are
imported lazily, the first time a backend is asked for.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# The Triton kernels use bf16 tensor-core dots and cp.async pipelining: Ampere (8.0) or newer.
MIN_TRITON_CAPABILITY = (8, 0)


@functools.cache
def triton_error() -> str | None:
    """None when Triton imports, else why not."""
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install
        return f"Triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def cuda_extension():
    """The compiled ``disco_kernels._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("disco_kernels._C")
    except ImportError:
        return None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of the CUDA ``device``, asked once per device."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def arch_runs(arch: str, cc: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` ("sm_80", "sm_90a", "compute_90 (PTX)") runs on compute capability
    ``cc``: a cubin on the same major and a minor at least its own (exactly its own for an "a" cubin),
    PTX on any later capability (the driver compiles it)."""
    found = re.fullmatch(r"(sm|compute)_(\d+)(a?)(?: \(PTX\))?", arch.strip())
    if found is None:
        return False
    kind, number, specific = found.groups()
    built = divmod(int(number), 10)
    if kind == "compute":
        return cc >= built
    return cc[0] == built[0] and (cc[1] == built[1] if specific else cc[1] >= built[1])


def on_device(device: torch.device):
    """Launch guard: kernels run on ``device``'s GPU whatever the current device is (no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def runtime_status() -> str:
    """"" when the extension's CUDA runtime works with this machine's driver, else why not (asked once)."""
    return cuda_extension().runtime_status()


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run kernels on ``device`` at all (None when it can)."""
    if backend == "triton":
        if (err := triton_error()) is not None:
            return err
        if device.type != "cuda":
            return None if triton_interpreted() else (
                f"Triton kernels need a CUDA tensor (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)")
        if (cc := capability(device)) < MIN_TRITON_CAPABILITY:
            return f"the Triton kernels need compute capability >= 8.0, {device} has {cc[0]}.{cc[1]}"
    elif backend == "cuda":
        ext = cuda_extension()
        if ext is None:
            return "the CUDA extension disco_kernels._C was not built (install with nvcc available)"
        if device.type != "cuda":
            return f"CUDA kernels need a CUDA tensor (got {device.type})"
        if status := runtime_status():
            version = ext.cuda_runtime_version
            return (f"the CUDA extension's runtime (CUDA {version // 1000}.{version % 1000 // 10}, linked statically) "
                    f"cannot run here: {status}; rebuild it with a CUDA toolkit that this driver supports")
        cc = capability(device)
        if not any(arch_runs(a, cc) for a in ext.cuda_archs.split(",")):
            return (f"the CUDA extension was built for {ext.cuda_archs}, none of which runs on {device} "
                    f"(compute capability {cc[0]}.{cc[1]}); rebuild with DISCO_CUDA_ARCHS including {cc[0]}{cc[1]}")
    return None


def unavailable_reason(backend: str, device: torch.device, op: str, kernels: tuple[str, ...]) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (None when it can)."""
    if backend not in kernels:
        return f"{op} has no {backend} kernel"
    if (why := backend_unavailable(backend, device)) is not None:
        return why
    if backend == "cuda" and op not in cuda_extension().kernels:
        return f"the CUDA extension has no {op} kernel"
    return None


def resolve(backend: str, device: torch.device, op: str, kernels: tuple[str, ...], cuda_unsupported=None,
            subject: str = "") -> str:
    """Pick the backend that runs ``op``: forced ones must be available; "auto" takes
    the CUDA kernel, then Triton, then torch, on CUDA tensors, and torch elsewhere.
    ``cuda_unsupported()``, when given, says why the CUDA kernel cannot take this input
    (None when it can): "auto" then passes it over, a forced "cuda" raises ValueError
    naming ``subject`` (e.g. "G of shape (4, 5)")."""
    check_backend(backend)

    def input_fits(cand):
        return cand != "cuda" or cuda_unsupported is None or cuda_unsupported() is None

    if backend == "auto":
        if device.type == "cuda":
            for cand in ("cuda", "triton"):
                if unavailable_reason(cand, device, op, kernels) is None and input_fits(cand):
                    return cand
        return "torch"
    reason = unavailable_reason(backend, device, op, kernels)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {reason}")
    if not input_fits(backend):
        raise ValueError(f"backend='cuda' cannot run {op}{' on ' + subject if subject else ''}: {cuda_unsupported()}")
    return backend


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run kernels on ``device`` (whatever the op)."""
    device = torch.device(device)
    return [b for b in ("torch", "triton", "cuda") if backend_unavailable(b, device) is None]

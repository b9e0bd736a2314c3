"""Backend discovery and dispatch: which of torch / Triton / CUDA runs an op.

Nothing here touches a GPU at import. Triton and the compiled extension are
imported lazily, the first time a backend is asked for.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


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


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def unavailable_reason(backend: str, device: torch.device, op: str, kernels: tuple[str, ...]) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (None when it can)."""
    if backend == "torch":
        return None if "torch" in kernels else f"{op} has no torch implementation"
    if backend == "triton":
        if (err := triton_error()) is not None:
            return err
        if device.type != "cuda" and not triton_interpreted():
            return f"Triton kernels need a CUDA tensor (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)"
    else:
        ext = cuda_extension()
        if ext is None:
            return "the CUDA extension disco_kernels._C was not built (install with nvcc available)"
        if device.type != "cuda":
            return f"CUDA kernels need a CUDA tensor (got {device.type})"
        if op not in ext.kernels:
            return f"the CUDA extension has no {op} kernel"
    return None if backend in kernels else f"{op} has no {backend} kernel"


def resolve(backend: str, device: torch.device, op: str, kernels: tuple[str, ...], cuda_unsupported=None,
            subject: str = "") -> str:
    """Pick the backend that runs ``op``: forced ones must be available; "auto" takes
    the CUDA kernel, then Triton, then torch, on CUDA tensors, and torch elsewhere.
    ``cuda_unsupported()``, when given, says why the CUDA kernel cannot take this input
    (None when it can): "auto" then passes it over, a forced "cuda" raises ValueError
    naming ``subject`` (e.g. "G of shape (4, 5)")."""
    check_backend(backend)
    if (cuda_unsupported is not None and backend in ("auto", "cuda") and device.type == "cuda"
            and cuda_extension() is not None):
        why = cuda_unsupported()
        if why is not None and backend == "cuda":
            raise ValueError(f"backend='cuda' cannot run {op}{' on ' + subject if subject else ''}: {why}")
        if why is not None:
            kernels = tuple(k for k in kernels if k != "cuda")
    if backend == "auto":
        if device.type == "cuda":
            for cand in ("cuda", "triton"):
                if unavailable_reason(cand, device, op, kernels) is None:
                    return cand
        return "torch"
    reason = unavailable_reason(backend, device, op, kernels)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {reason}")
    return backend


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run kernels on ``device`` (whatever the op)."""
    device = torch.device(device)
    found = ["torch"]
    if triton_error() is None and (device.type == "cuda" or triton_interpreted()):
        found.append("triton")
    if cuda_extension() is not None and device.type == "cuda":
        found.append("cuda")
    return found

"""Backend discovery and dispatch: which of torch / Triton / CUDA runs an op.

Nothing here touches a GPU at import. Triton and the compiled extension are
imported lazily, the first time a backend is asked for.

On a GPU, "auto" takes only backends that a GPU run has verified on that GPU's compute
capability (``_verified.VERIFIED``; ``DISCO_TRUST_UNVERIFIED=1`` trusts them all).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import warnings

import torch

from . import _verified

BACKENDS = ("auto", "torch", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton")  # what "auto" tries on a CUDA tensor, in this order, before torch
TRUST_ENV = "DISCO_TRUST_UNVERIFIED"
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


class UnverifiedBackendWarning(UserWarning):
    """A forced backend runs on a GPU where no GPU run has verified it."""


def trust_unverified() -> bool:
    """True when DISCO_TRUST_UNVERIFIED=1: "auto" takes unverified backends too (GPU test sessions)."""
    return os.environ.get(TRUST_ENV) == "1"


def unverified_reason(backend: str, device: torch.device) -> str | None:
    """Why "auto" passes over ``backend`` on ``device`` although it may run there: no GPU run has
    passed its GPU tests on this compute capability (None when one has, off CUDA, for torch, or trusted)."""
    if backend == "torch" or device.type != "cuda" or trust_unverified():
        return None
    cc = capability(device)
    if _verified.record_for(backend, cc) is not None:
        return None
    return (f"{backend} is not verified on compute capability {cc[0]}.{cc[1]}: no GPU run has passed its GPU tests "
            f"there (disco_kernels/_verified.py; {TRUST_ENV}=1 lets auto take it anyway)")


_warned: set[tuple[str, tuple[int, int]]] = set()


def _warn_unverified(backend: str, device: torch.device) -> None:
    why = unverified_reason(backend, device)
    if why is not None and (key := (backend, capability(device))) not in _warned:
        _warned.add(key)
        warnings.warn(f"backend={backend!r} forced: {why}", UnverifiedBackendWarning, stacklevel=3)


def auto_skip_reason(backend: str, device: torch.device, op: str, kernels: tuple[str, ...]) -> str | None:
    """Why "auto" does not take ``backend`` for ``op`` on ``device`` whatever the input (None when it may)."""
    return unavailable_reason(backend, device, op, kernels) or unverified_reason(backend, device)


def resolve(backend: str, device: torch.device, op: str, kernels: tuple[str, ...], cuda_unsupported=None,
            subject: str = "") -> str:
    """Pick the backend that runs ``op``: forced ones must be available (an unverified one runs,
    with one ``UnverifiedBackendWarning`` per backend and compute capability); "auto" takes the
    CUDA kernel, then Triton, then torch, on CUDA tensors, each only where available and verified
    (``unverified_reason``), and torch elsewhere.
    ``cuda_unsupported()``, when given, says why the CUDA kernel cannot take this input
    (None when it can): "auto" then passes it over, a forced "cuda" raises ValueError
    naming ``subject`` (e.g. "G of shape (4, 5)")."""
    check_backend(backend)

    def input_fits(cand):
        return cand != "cuda" or cuda_unsupported is None or cuda_unsupported() is None

    if backend == "auto":
        if device.type == "cuda":
            for cand in AUTO_ORDER:
                if auto_skip_reason(cand, device, op, kernels) is None and input_fits(cand):
                    return cand
        return "torch"
    reason = unavailable_reason(backend, device, op, kernels)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {reason}")
    if not input_fits(backend):
        raise ValueError(f"backend='cuda' cannot run {op}{' on ' + subject if subject else ''}: {cuda_unsupported()}")
    _warn_unverified(backend, device)
    return backend


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run kernels on ``device`` (whatever the op), verified or not: a forced
    one runs; "auto" takes only verified ones (``unverified_reason``)."""
    device = torch.device(device)
    return [b for b in ("torch", "triton", "cuda") if backend_unavailable(b, device) is None]

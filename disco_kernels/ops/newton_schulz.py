"""Batched Newton-Schulz orthogonalisation (the Spectral LMO's core).

    X0 = G / (mult * ||G||_F + eps)          (per matrix; tall G is transposed)
    per step (a, b, c):  A = X Xᵀ;  X = a X + (b A + c A A) X

``coefficients`` picks (a, b, c) per step: "jordan", "polar_express" or a list
of triples (see ``reference.ns_schedule``). The result is always contiguous,
in ``dtype`` (default G.dtype), shape of G.
"""
from __future__ import annotations

import torch

from .. import _backend
from .._validate import as_dtype
from ..reference import norm2, ns_schedule

# Backends with a kernel for this op; "auto" takes cuda, then triton, then torch.
KERNELS = ("torch", "triton", "cuda")
# The CUDA kernel keeps a whole matrix on chip: min(m, n) <= 128, 16-bit compute, at most 64 steps.
CUDA_COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
CUDA_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="jordan", *, dtype: torch.dtype | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Orthogonalise (m, n) or (..., m, n) ``G`` with ``steps`` Newton-Schulz steps, per matrix.

    coefficients: "jordan" (3.4445, -4.7750, 2.0315 every step), "polar_express" (Amsel et al. 2025,
    the last triple repeating past 5 steps) or a list of (a, b, c) triples, one per step.
    dtype: the dtype (or its name) the iteration runs and returns in (default G's; ``Spectral`` uses bfloat16,
    as the reference); products accumulate in fp32 (fp64 for fp64). The result has G's shape,
    is contiguous, and is 0 where G is 0. backend: "auto", "torch", "triton" or "cuda".

    Example::

        X = newton_schulz(torch.randn(8, 256, 512), steps=5, dtype=torch.bfloat16)
    """
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"G must be (m, n) or (b, m, n), got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")
    dtype = G.dtype if dtype is None else as_dtype(dtype)
    triples, mult, eps = ns_schedule(coefficients, steps)
    _backend.check_backend(backend)
    flat = [x for t in triples for x in t]
    return torch.ops.disco_kernels.newton_schulz(G, flat, mult, eps, dtype, backend)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, else the dtype itself (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _torch(G, triples, mult, eps, dtype):
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    acc = torch.promote_types(accumulate_dtype(dtype), X.dtype)  # fp64 G keeps its norm in fp64
    X = (X.to(acc) / (mult * norm2(X, (-2, -1), acc) + eps).to(acc)).to(dtype)  # (norm2: no overflow)
    for a, b, c in triples:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    X = X.reshape(shape)
    return (X.mT if tall else X).contiguous()


def cuda_unsupported(G: torch.Tensor, dtype: torch.dtype, steps: int) -> str | None:
    """Why the fused small-matrix CUDA kernel cannot take G (None when it can)."""
    ext = _backend.cuda_extension()
    m, n = G.shape[-2:]
    if dtype not in CUDA_COMPUTE_DTYPES:
        return f"the fused small-matrix kernel computes in bfloat16 or float16, got dtype={dtype}"
    if G.dtype not in CUDA_INPUT_DTYPES:
        return f"the fused small-matrix kernel reads float32, bfloat16 or float16, got {G.dtype}"
    if steps > ext.newton_schulz_max_steps:
        return f"the fused small-matrix kernel takes at most {ext.newton_schulz_max_steps} steps, got {steps}"
    if G.numel() == 0:
        return "G is empty"
    if min(m, n) > ext.newton_schulz_max_small:
        return f"the fused small-matrix kernel needs min(m, n) <= {ext.newton_schulz_max_small}, got ({m}, {n})"
    device = G.device.index if G.device.index is not None else torch.cuda.current_device()
    if not ext.newton_schulz_small_fits(int(m), int(n), device):
        return (f"a {min(m, n)} x {max(m, n)} matrix needs {ext.newton_schulz_small_smem(m, n)} bytes of shared memory, "
                f"more than the device gives one block")
    return None


def choose_backend(backend: str, G: torch.Tensor, dtype: torch.dtype, steps: int, subject: str = "") -> str:
    """The backend that runs ``steps`` steps on G in ``dtype`` (``_backend.resolve``; raises as a forced
    one that cannot would), the error naming ``subject`` (default: G's shape)."""
    return _backend.resolve(backend, G.device, "newton_schulz", KERNELS, lambda: cuda_unsupported(G, dtype, steps),
                            subject or f"G of shape {tuple(G.shape)}")


def _cuda(G, triples, mult, eps, dtype):
    ext = _backend.cuda_extension()
    m, n = G.shape[-2:]
    X = G.reshape(-1, m, n).contiguous()
    out = torch.empty(X.shape, dtype=dtype, device=G.device)
    codes = ext.DTYPES
    ext.newton_schulz_small(codes[str(X.dtype).removeprefix("torch.")], codes[str(dtype).removeprefix("torch.")],
                            X.data_ptr(), out.data_ptr(), X.size(0), m, n, [x for t in triples for x in t], mult, eps,
                            torch.cuda.current_stream(G.device).cuda_stream)
    return out.reshape(G.shape)


def _triton(G, triples, mult, eps, dtype):
    from ..triton_kernels import newton_schulz as kernels
    return kernels.newton_schulz(G, triples, mult, eps, dtype)


_IMPLS = {"torch": _torch, "triton": _triton, "cuda": _cuda}


@torch.library.custom_op("disco_kernels::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, coefficients: list[float], norm_mult: float, norm_eps: float,
                      dtype: torch.dtype, backend: str) -> torch.Tensor:
    triples = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]
    impl = choose_backend(backend, G, dtype, len(triples))
    with _backend.on_device(G.device):
        return _IMPLS[impl](G, triples, norm_mult, norm_eps, dtype)


@_newton_schulz_op.register_fake
def _(G, coefficients, norm_mult, norm_eps, dtype, backend):
    return torch.empty(G.shape, dtype=dtype, device=G.device)

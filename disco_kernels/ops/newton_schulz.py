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
from ..reference import ns_schedule

# Backends with a kernel for this op; "auto" takes cuda, then triton, then torch.
KERNELS = ("torch",)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="jordan", *, dtype: torch.dtype | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Orthogonalise (m, n) or (..., m, n) ``G`` with ``steps`` Newton-Schulz steps."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"G must be (m, n) or (b, m, n), got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")
    dtype = dtype or G.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    triples, mult, eps = ns_schedule(coefficients, steps)
    impl = _backend.resolve(backend, G.device, "newton_schulz", KERNELS)
    flat = [x for t in triples for x in t]
    return torch.ops.disco_kernels.newton_schulz(G, flat, mult, eps, dtype, impl)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, else the dtype itself (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _torch(G, triples, mult, eps, dtype):
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    acc = accumulate_dtype(dtype)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc)
    X = (X.to(acc) / (mult * norm + eps)).to(dtype)
    for a, b, c in triples:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    X = X.reshape(shape)
    return (X.mT if tall else X).contiguous()


_IMPLS = {"torch": _torch}


@torch.library.custom_op("disco_kernels::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, coefficients: list[float], norm_mult: float, norm_eps: float,
                      dtype: torch.dtype, backend: str) -> torch.Tensor:
    triples = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]
    return _IMPLS[backend](G, triples, norm_mult, norm_eps, dtype)


@_newton_schulz_op.register_fake
def _(G, coefficients, norm_mult, norm_eps, dtype, backend):
    return torch.empty(G.shape, dtype=dtype, device=G.device)

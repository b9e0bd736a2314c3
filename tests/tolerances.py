"""Tolerances derived from the dtype, never tuned by trial and error.

``unit(dtype)`` is the unit roundoff u = eps / 2. An op whose output entries are
O(1) and whose computation has depth k (sums of k terms, k chained steps)
carries an error of about k·u; the helpers below state that bound.
"""
import math

import torch


def unit(dtype: torch.dtype) -> float:
    """Unit roundoff of ``dtype`` (2^-8 for bf16, 2^-11 for fp16, 2^-24 for fp32, 2^-53 for fp64)."""
    return torch.finfo(dtype).eps / 2


def elementwise_tol(dtype: torch.dtype, depth: int = 1) -> float:
    """Relative tolerance for results of O(depth) roundings in ``dtype`` (plus fp32 math inside)."""
    return 4 * depth * unit(dtype) + 8 * unit(torch.float32)


def reduction_tol(dtype: torch.dtype, n: int) -> float:
    """Relative tolerance for a reduction of n terms in ``dtype`` (pairwise sums: log2 n depth)."""
    return elementwise_tol(dtype, 2 + math.ceil(math.log2(max(n, 2))))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / max(||ref||, tiny), in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()

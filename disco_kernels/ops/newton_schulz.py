"""Batched Newton-Schulz orthogonalisation (the Spectral LMO's core).

    X0 = G / (mult * ||G||_F + eps)          (per matrix, m x n with m <= n; tall G is transposed)
    standard, per step (a, b, c):  A = X Xᵀ;  X = a X + (b A + c A A) X
    Gram, the same X in the m x m space:  X_k = Q_k X0,  R_k = X_k X_kᵀ;
          per step W = a I + b R + c R R;  Q <- W Q;  R <- W R W;  at the end X = Q X0

``coefficients`` picks (a, b, c) per step: "jordan", "polar_express" or a list
of triples (see ``reference.ns_schedule``). The result is always contiguous,
in ``dtype`` (default G.dtype), shape of G.

The standard iteration costs 4m²n + 2m³ flops per step; the Gram one 4m²n in all
(R0 = X0 X0ᵀ and Q X0) plus 8m³ per step (R R, W Q, R W, W (R W)), so it pays
off on wide matrices. R's eigenvalues are the squared singular values, so an error
e in R moves a singular value s by e / 2s: R, W and Q are kept in ``gram_dtype``
(one size up from the iteration dtype), the two big products take operands in
the iteration dtype (X0, and Q rounded to it) and accumulate in ``gram_dtype``.
``method="auto"`` takes Gram where it was measured faster (``GRAM_MIN_ASPECT``).
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _backend
from .._validate import as_dtype
from ..reference import norm2, ns_schedule

# Backends with a kernel for this op; "auto" takes cuda, then triton, then torch.
KERNELS = ("torch", "triton", "cuda")
# The CUDA kernel keeps a whole matrix on chip: min(m, n) <= 128, 16-bit compute, at most 64 steps.
CUDA_COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
CUDA_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

METHODS = ("auto", "standard", "gram")
# The Gram form has no CUDA kernel: "auto" and forced "gram" run it on Triton or torch.
GRAM_KERNELS = ("torch", "triton")
# Where method="auto" takes Gram: at max(m, n) / min(m, n) >= GRAM_MIN_ASPECT[device kind, iteration dtype's bytes].
#  "cpu" (no 16-bit matmul units), measured with the torch path on a 2-core AVX2 CPU (README "Ops"):
#   16-bit: Gram is faster at every aspect (5-20x at 1:1, 20-130x at 1:4 to 1:16 for m = 64..256; even at
#   m <= 16): its polynomial runs in fp32 and its two products as fp32 GEMMs of the 16-bit values, while the
#   standard iteration's 16-bit GEMMs are emulated. fp32 (fp64 polynomial, ~2x fp32's time per flop): even at
#   1:8 (0.98-1.02x), faster from 1:16 (1.06-1.7x).
#  "cpu16" (oneDNN multiplies the 16-bit dtype natively: AVX512-BF16, AMX): not measured; the bench machine of
#   bench/results/cpu-2026-12-02-quick ran bf16 at 6.7x its fp32 peak, where Gram's fp32 work never catches up.
#  "gpu" (CUDA, and Triton wherever it runs): not measured, a conservative guess from peaks: the fp32 polynomial
#   (IEEE dots) runs ~15x slower than bf16 tensor cores on an H100, so by the flops of 5 steps with symmetric
#   tiles Gram only wins beyond ~1:20; an fp32 iteration needs an fp64 polynomial (1/64 rate on consumer GPUs).
GRAM_MIN_ASPECT = {("cpu", 2): 1.0, ("cpu", 4): 16.0, ("cpu16", 2): math.inf, ("cpu16", 4): 16.0,
                   ("gpu", 2): 32.0, ("gpu", 4): math.inf}


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="jordan", *, dtype: torch.dtype | None = None,
                  backend: str = "auto", method: str = "auto") -> torch.Tensor:
    """Orthogonalise (m, n) or (..., m, n) ``G`` with ``steps`` Newton-Schulz steps, per matrix.

    coefficients: "jordan" (3.4445, -4.7750, 2.0315 every step), "polar_express" (Amsel et al. 2025,
    the last triple repeating past 5 steps) or a list of (a, b, c) triples, one per step.
    dtype: the dtype (or its name) the iteration runs and returns in (default G's; ``Spectral`` uses bfloat16,
    as the reference); products accumulate in fp32 (fp64 for fp64). The result has G's shape,
    is contiguous, and is 0 where G is 0. backend: "auto", "torch", "triton" or "cuda".
    method: "standard" (X Xᵀ each step), "gram" (the polynomial on the m x m Gram matrix in ``gram_dtype``,
    torch or Triton; not for float64, which has no wider dtype) or "auto" (Gram where ``GRAM_MIN_ASPECT`` says
    it is faster on the device; never on the fused small-matrix kernels). Both are within the tolerance rule
    of the plain standard iteration in ``dtype`` (tests/test_gram_newton_schulz.py).

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
    check_method(method, dtype)
    flat = [x for t in triples for x in t]
    return torch.ops.disco_kernels.newton_schulz(G, flat, mult, eps, dtype, backend, method)


def check_method(method, dtype: torch.dtype) -> None:
    """ValueError unless ``method`` is one of METHODS and, for "gram", ``dtype`` has a ``gram_dtype``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method == "gram" and gram_dtype(dtype) is None:
        raise ValueError(f"method='gram' needs a dtype wider than the iteration's for its polynomial; {dtype} has "
                         "none (use method='standard' or 'auto')")


def gram_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the Gram form's R, W and Q (and its products' accumulation): fp32 for 16-bit iterations,
    fp64 for fp32 (fp32 accumulation of Q X0 and an fp32 R were measured up to 150x less exact than the
    standard fp32 iteration on ill-conditioned G); None for fp64."""
    return {2: torch.float32, 4: torch.float64}.get(dtype.itemsize)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, else the dtype itself (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _x0(G, mult, eps, dtype):
    """(X0 as (b, m, n) in ``dtype``, m <= n; the shape to restore; whether G is tall)."""
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    shape = X.shape
    X = X.reshape(shape[:-2].numel(), *shape[-2:])  # (not -1: ambiguous for an empty G)
    acc = torch.promote_types(accumulate_dtype(dtype), X.dtype)  # fp64 G keeps its norm in fp64
    X = (X.to(acc) / (mult * norm2(X, (-2, -1), acc) + eps).to(acc)).to(dtype)  # (norm2: no overflow)
    return X, shape, tall


def _restore(X, shape, tall):
    X = X.reshape(shape)
    return (X.mT if tall else X).contiguous()


def _torch(G, triples, mult, eps, dtype):
    X, shape, tall = _x0(G, mult, eps, dtype)
    for a, b, c in triples:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return _restore(X, shape, tall)


def _torch_gram(G, triples, mult, eps, dtype):
    """The Gram form: R = X0 X0ᵀ; per step W = a I + b R + c R R, Q <- W Q, R <- W R W (all symmetric, in
    ``gram_dtype``); X = Q X0. The two big products take dtype-valued operands and accumulate in gram_dtype
    (as fp32 GEMMs of 16-bit values: what a 16-bit GEMM with fp32 accumulation computes)."""
    X, shape, tall = _x0(G, mult, eps, dtype)
    if triples:
        P = gram_dtype(dtype)
        Xp = X.to(P)
        R = torch.bmm(Xp, Xp.mT)
        Q = None
        for k, (a, b, c) in enumerate(triples):
            W = torch.baddbmm(R, R, R, beta=b, alpha=c)
            W.diagonal(dim1=-2, dim2=-1).add_(a)
            Q = W if Q is None else torch.bmm(W, Q)
            if k + 1 < len(triples):
                R = torch.bmm(W, torch.bmm(R, W))
        X = torch.bmm(Q.to(dtype).to(P), Xp).to(dtype)
    return _restore(X, shape, tall)


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


def _triton_gram(G, triples, mult, eps, dtype):
    from ..triton_kernels import newton_schulz as kernels
    return kernels.newton_schulz_gram(G, triples, mult, eps, dtype)


_IMPLS = {("torch", "standard"): _torch, ("triton", "standard"): _triton, ("cuda", "standard"): _cuda,
          ("torch", "gram"): _torch_gram, ("triton", "gram"): _triton_gram}


def gram_is_faster(impl: str, G: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``impl`` runs the Gram form faster than the standard one on G (``GRAM_MIN_ASPECT``): never on the
    fused small-matrix kernels (one launch keeps the matrix on chip) nor for fp64."""
    m, n = sorted(G.shape[-2:])
    if impl == "cuda" or gram_dtype(dtype) is None or G.numel() == 0:
        return False
    if impl == "triton":
        from ..triton_kernels.newton_schulz import _small_tile
        if _small_tile(m, n, dtype) is not None:
            return False
    if impl != "torch" or G.device.type != "cpu":
        kind = "gpu"
    else:
        kind = "cpu16" if dtype.itemsize == 2 and cpu_multiplies(dtype) else "cpu"
    return n >= GRAM_MIN_ASPECT[kind, min(dtype.itemsize, 4)] * m


@functools.cache
def cpu_multiplies(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies 16-bit ``dtype`` natively on this CPU (AVX512-BF16, AVX512-FP16, AMX)."""
    try:
        native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                  torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
        return bool(native())
    except (AttributeError, RuntimeError):  # a build without oneDNN: emulated
        return False


def choose_method(method: str, impl: str, G: torch.Tensor, dtype: torch.dtype) -> str:
    """"standard" or "gram" for ``method`` on the backend ``impl`` chose."""
    if method == "auto":
        return "gram" if gram_is_faster(impl, G, dtype) else "standard"
    return method


@torch.library.custom_op("disco_kernels::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, coefficients: list[float], norm_mult: float, norm_eps: float,
                      dtype: torch.dtype, backend: str, method: str = "auto") -> torch.Tensor:
    triples = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]
    if method == "gram":
        impl = _backend.resolve(backend, G.device, "newton_schulz (method='gram')", GRAM_KERNELS)
    else:
        impl = choose_backend(backend, G, dtype, len(triples))
    with _backend.on_device(G.device):
        return _IMPLS[impl, choose_method(method, impl, G, dtype)](G, triples, norm_mult, norm_eps, dtype)


@_newton_schulz_op.register_fake
def _(G, coefficients, norm_mult, norm_eps, dtype, backend, method="auto"):
    return torch.empty(G.shape, dtype=dtype, device=G.device)

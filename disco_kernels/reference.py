"""Plain-torch reference math for every op and LMO.

Every backend (torch, Triton, CUDA) is tested against these functions run in
float64. They follow LIONS-EPFL/scion ``scion.py`` (see DESIGN.md), written as
batched, dtype-agnostic functions: ``G`` may be (m, n) or (..., m, n).
Nothing here is tuned for speed.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

Triple = tuple[float, float, float]

JORDAN: Triple = (3.4445, -4.7750, 2.0315)

# Amsel, Persson, Musco, Gower (2025), "The Polar Express", 5 steps,
# safety factor 2e-2, cushion 2; X normalised by 1.02 * ||X||_F + 1e-6.
POLAR_EXPRESS: tuple[Triple, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# name -> (triples, frobenius multiplier, eps): X0 = G / (mult * ||G||_F + eps)
_SCHEDULES = {
    "jordan": ((JORDAN,), 1.0, 1e-7),
    "polar_express": (POLAR_EXPRESS, 1.02, 1e-6),
}


def ns_schedule(coefficients="jordan", steps: int = 5) -> tuple[list[Triple], float, float]:
    """Resolve a coefficient schedule into (per-step triples, norm multiplier, norm eps).

    ``coefficients`` is ``"jordan"``, ``"polar_express"`` or a sequence of at most ``steps``
    (a, b, c) triples; a schedule shorter than ``steps`` repeats its last triple (a named one
    longer than ``steps`` is cut: its triples are tuned per step; with ``steps=0`` none is used).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients not in _SCHEDULES:
            raise ValueError(f"coefficients must be one of {sorted(_SCHEDULES)} or a list of (a, b, c), got {coefficients!r}")
        triples, mult, eps = _SCHEDULES[coefficients]
    else:
        triples, mult, eps = _coefficient_triples(coefficients), 1.0, 1e-7
        if steps and len(triples) > steps:
            raise ValueError(f"coefficients lists {len(triples)} (a, b, c) triples for steps={steps}: give one triple "
                             "per step, or fewer (the last repeats); extra triples would be silently dropped")
    per_step = [tuple(triples[min(i, len(triples) - 1)]) for i in range(steps)]
    return per_step, mult, eps


def _coefficient_triples(coefficients) -> tuple[Triple, ...]:
    """A non-empty list of (a, b, c) triples of finite real numbers, as floats."""
    bad = ValueError(f"coefficients must be a name ({sorted(_SCHEDULES)}) or a non-empty list of (a, b, c) triples "
                     f"of finite real numbers, got {coefficients!r}")
    if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__iter__"):
        raise bad
    triples = []
    for t in coefficients:
        if isinstance(t, (str, bytes)) or not hasattr(t, "__len__") or len(t) != 3:
            raise bad
        if any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) for x in t):
            raise bad
        triples.append(tuple(float(x) for x in t))
    if not triples:
        raise bad
    return tuple(triples)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="jordan", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of the last two dims of ``G``.

    X0 = G / (mult * ||G||_F + eps) (tall matrices transposed first); per step
    A = X Xᵀ, X = a X + (b A + c A A) X. Runs in ``dtype`` (default G.dtype).
    """
    triples, mult, eps = ns_schedule(coefficients, steps)
    dtype = dtype or G.dtype
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = (X / (mult * norm2(X, (-2, -1), torch.promote_types(dtype, torch.float32)) + eps)).to(dtype)
    for a, b, c in triples:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """Exact orthogonal polar factor U Vᵀ of G = U S Vᵀ in float64 (zero where G is zero)."""
    G64 = G.double()
    U, S, Vh = torch.linalg.svd(G64, full_matrices=False)
    # Singular directions with zero singular value carry no information: drop them.
    keep = (S > S.amax(dim=-1, keepdim=True) * max(G64.shape[-2:]) * torch.finfo(torch.float64).eps).to(G64.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def spectral_scale(d_out: int, d_in: int, normalized: bool = True, max: bool = False) -> float:
    """Scale of the Spectral LMO: sqrt(d_out / d_in) (normalized) or sqrt(d_out); max(1, .) if ``max``."""
    s = math.sqrt(d_out / d_in) if normalized else math.sqrt(d_out)
    return 1.0 if max and s < 1.0 else s


def spectral_conv_scale(shape: Sequence[int]) -> float:
    """Scale of the SpectralConv LMO: sqrt(c_out / c_in) / k (3-D) or / k² (4-D)."""
    c_out, c_in, k = shape[0], shape[1], shape[2]
    return math.sqrt(c_out / c_in) / (k if len(shape) == 3 else k * k)


def lmo_spectral(g, steps=5, coefficients="jordan", normalized=True, max=False, dtype=None, exact=False):
    """Spectral LMO: NS(g) (or the exact polar factor) times ``spectral_scale``."""
    d_out, d_in = g.shape[-2:]
    X = polar_factor(g) if exact else newton_schulz(g, steps, coefficients, dtype)
    return X * spectral_scale(d_out, d_in, normalized, max)


def lmo_spectral_conv(g, steps=5, coefficients="jordan", dtype=None, exact=False):
    """SpectralConv LMO: NS of g reshaped to (c_out, -1), times ``spectral_conv_scale``."""
    g2 = g.reshape(g.size(0), -1)
    X = polar_factor(g2) if exact else newton_schulz(g2, steps, coefficients, dtype)
    return X.reshape(g.shape) * spectral_conv_scale(g.shape)


def norm2(x: torch.Tensor, dim, dtype: torch.dtype | None = None) -> torch.Tensor:
    """||x||_2 over ``dim`` (kept), as fp64, without overflow for any finite x (nor underflow, for fp64 x);
    ``dtype``: the precision it is used in (default x's, at least fp32).

    16/32-bit x: summed in fp64, whose range no square of theirs leaves; on CPU (eagerly), where an fp64
    reduction of fp32 data is several times slower, a norm used in fp32 is first summed in fp32 and kept
    unless it overflowed (a host check, free on CPU); by torch.sum, whose cascade keeps the sum's error
    near u (vector_norm's CPU reduction is off by 1.7e-6 over 2^18 entries, more than the whole error
    of a 5-step fp32 Newton-Schulz). fp64 x whose plain norm overflows or underflows (inf, or 0 for a
    non-zero line) is scaled by its largest |x| first."""
    if x.dtype != torch.float64:
        fp32_is_enough = dtype is None or dtype != torch.float64
        if fp32_is_enough and x.device.type == "cpu" and not torch.compiler.is_compiling():
            direct = x.float().square().sum(dim=dim, keepdim=True).sqrt()
            if not direct.isinf().any():
                return direct.double()
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float64)
    direct = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    if x.numel() == 0:
        return direct
    big = x.abs().amax(dim=dim, keepdim=True)
    scaled = torch.linalg.vector_norm(x / torch.where(big > 0, big, 1), dim=dim, keepdim=True) * big
    overflowed = direct.isinf() & big.isfinite()  # (an inf entry's norm is inf: its own)
    return torch.where(overflowed | ((direct == 0) & (big > 0)), scaled, direct)


# The line LMOs' guard (reference Scion): a zero line maps to 0, not 0 / 0. Every backend takes it from here.
LINE_EPS = 1e-8


def divide(g: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """g / denom in g's dtype, the division in at least fp32 (denom, from ``norm2``, is fp64: dividing by
    it directly would make an fp64 copy of g)."""
    work = torch.promote_types(g.dtype, torch.float32)
    return (g.to(work) / denom.to(work)).to(g.dtype)


def line_lmo(g: torch.Tensor, dim: int, alpha: float, norm: torch.Tensor | None = None) -> torch.Tensor:
    """The line-wise LMO: g / (||line||_2 * alpha + LINE_EPS), lines running along ``dim`` (-1: rows, -2:
    columns; a 0-D g is its own line). Norms in fp64 (``norm2``; or ``norm``, the lines' norms where they
    are known, e.g. summed across shards), the division in at least fp32."""
    if norm is None:
        norm = g.abs().double() if g.dim() == 0 else norm2(g, dim)
    return divide(g, norm * alpha + LINE_EPS)


def sign_lmo(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """The element-wise LMO: sign(g) * alpha (NaN kept)."""
    return torch.sign(g) * alpha


def scion_update(p, g, buf, lmo, lr, momentum, scale, unconstrained):
    """One reference Scion step for one parameter, returning (new p, new buf)."""
    if momentum != 1:
        buf = buf * (1 - momentum) + g * momentum
        g = buf
    u = scale * lmo(g)
    if not unconstrained:
        p = p * (1 - lr)
    return p - lr * u, buf


def power_iteration(W: torch.Tensor, v: torch.Tensor | None = None, iters: int = 1):
    """Estimate sigma_max(W) for (m, n) or (b, m, n) W.

    v is a unit vector of size n per matrix. Each iteration: u = W v,
    v' = Wᵀ u, sigma = ||v'|| / ||u||, v = v' / ||v'|| (sigma = 0 and v kept where v' = 0;
    a non-finite W gives a non-finite sigma).
    Returns (sigma, v) with sigma of shape W.shape[:-2].
    """
    if v is None:
        v = default_start_vector(W)
    v = v.to(W.dtype)
    sigma = torch.zeros(W.shape[:-2], dtype=W.dtype, device=W.device)
    for _ in range(iters):
        u = matvec(W, v)
        w = matvec(W.mT, u)
        nu = torch.linalg.vector_norm(u, dim=-1)
        nw = torch.linalg.vector_norm(w, dim=-1)
        ok = nw != 0  # not "> 0": NaN must reach sigma
        sigma = torch.where(ok, nw / torch.where(ok, nu, 1), 0)
        v = torch.where(ok.unsqueeze(-1), w / torch.where(ok, nw, 1).unsqueeze(-1), v)
    return sigma, v


def matvec(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W v per matrix of (..., m, n) W, as ``torch.mv`` sums it (on some CPUs a batched matmul with one
    column sums about twice less exactly than mv's dot products)."""
    if W.dim() == 2:
        return torch.mv(W, v)
    b = math.prod(W.shape[:-2])
    if b == 0:
        return W.new_zeros(W.shape[:-1])
    flat, vs = W.reshape(b, *W.shape[-2:]), v.reshape(b, v.size(-1))
    return torch.stack([torch.mv(a, x) for a, x in zip(flat, vs)]).reshape(W.shape[:-1])


def default_start_vector(W: torch.Tensor) -> torch.Tensor:
    """Deterministic unit start vector(s) for power iteration: v_j ∝ sin(1 + j·golden angle).

    A fixed, aperiodic vector (no RNG, so it traces under torch.compile); it is
    orthogonal to a top singular vector only by accident of measure zero.
    """
    n = W.size(-1)
    v = torch.sin(1.0 + 2.399963229728653 * torch.arange(n, device=W.device, dtype=torch.float32))
    v = v / torch.linalg.vector_norm(v)
    return v.expand(*W.shape[:-2], n).contiguous()


# Operator norms of a weight W stored (d_out, d_in), exact, in float64.

def sigma_max(W):
    """Largest singular value, from the fp64 SVD."""
    return torch.linalg.matrix_norm(W.double(), ord=2)


def rms_to_rms(W):
    """RMS -> RMS norm: sqrt(d_in / d_out) * sigma_max(W)."""
    d_out, d_in = W.shape[-2:]
    return math.sqrt(d_in / d_out) * sigma_max(W)


def rms_to_inf(W):
    """RMS -> inf norm: sqrt(d_in) * max_i ||W[i, :]||_2 (the paper's output-layer norm)."""
    return math.sqrt(W.size(-1)) * max_line_norm(W, -1)


def l1_to_rms(W):
    """l1 -> RMS norm: max_j ||W[:, j]||_2 / sqrt(d_out)."""
    return max_line_norm(W, -2) / math.sqrt(W.size(-2))


def supremum(W):
    """Largest absolute entry: max |W_ij| (exact in W's dtype; no copy of W)."""
    dims = (-2, -1)
    return torch.maximum(W.amax(dim=dims), -W.amin(dim=dims)).double()


FP64_CHUNK = 1 << 24  # elements of W copied to fp64 at a time (128 MiB), however large W is


def max_line_norm(W, dim):
    """max ||line||_2 over the rows (dim=-1) or columns (dim=-2) of (..., m, n) W, in fp64, taken
    FP64_CHUNK elements at a time so that a large weight never has a whole fp64 copy."""
    lines = W.size(-2 if dim == -1 else -1)
    per_chunk = max(1, FP64_CHUNK // (W.numel() // lines))
    chunks = W.split(per_chunk, dim=-2 if dim == -1 else -1)
    return torch.stack([torch.linalg.vector_norm(c.double(), dim=dim).amax(dim=-1) for c in chunks]).amax(dim=0)


def condition_number(W):
    """sigma_max / sigma_min over the min(d_out, d_in) singular values (inf if singular)."""
    s = torch.linalg.svdvals(W.double())
    return s[..., 0] / s[..., -1]

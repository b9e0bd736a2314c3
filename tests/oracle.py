"""The test oracle: an independent restatement of Scion's math, written from ../shared/DESIGN.md.

Nothing here imports ``disco_kernels``: the package's code (its ``reference.py`` included) is
checked against these functions, never against itself. Every function computes in the dtype
of its input (so ``f(x.double())`` is the exact answer and ``f(x.to(d))`` is the plain torch
computation in d that a fast path's error is measured against, see ``tolerances.py``);
Newton-Schulz takes the iteration dtype as an argument.

Norm names and keyword arguments are those of the reference Scion (LIONS-EPFL/scion):
``lmo("Spectral", g, max=True)`` is ``Spectral(max=True).lmo(g)`` with an fp64 iteration.
"""
from __future__ import annotations

import itertools
import math

import torch

# -- Newton-Schulz -----------------------------------------------------------------------

JORDAN = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = (  # Amsel, Persson, Musco, Gower (2025): 5 steps, safety factor 2e-2, cushion 2
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
EPS = 1e-8  # the line-wise LMOs' and BiasRMS's epsilon


def schedule(coefficients="jordan", steps=5):
    """(triples per step, Frobenius multiplier, eps) with X0 = G / (mult * ||G||_F + eps)."""
    if coefficients == "jordan":
        listed, mult, eps = [JORDAN], 1.0, 1e-7
    elif coefficients == "polar_express":
        listed, mult, eps = list(POLAR_EXPRESS), 1.02, 1e-6
    else:
        listed, mult, eps = [tuple(map(float, t)) for t in coefficients], 1.0, 1e-7
    return [listed[min(k, len(listed) - 1)] for k in range(steps)], mult, eps


def newton_schulz(G, steps=5, coefficients="jordan", dtype=None):
    """Newton-Schulz on each (m, n) matrix of G (tall ones transposed), iterating in ``dtype``
    (default G's) after normalising in at least fp32; returns ``dtype``."""
    dtype = dtype or G.dtype
    triples, mult, eps = schedule(coefficients, steps)
    if G.size(-2) > G.size(-1):
        return newton_schulz(G.mT, steps, coefficients, dtype).mT
    wide = G.to(torch.promote_types(dtype, torch.float32))
    frob = wide.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
    X = (wide / (mult * frob + eps)).to(dtype)
    for a, b, c in triples:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X


def polar(G):
    """The exact orthogonal polar factor U Vᵀ of G = U S Vᵀ (fp64 SVD; zero singular directions dropped)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    keep = S > S.amax(-1, keepdim=True) * max(G.shape[-2:]) * 2.2e-16
    return (U * keep.unsqueeze(-2)) @ Vh


# -- LMOs ------------------------------------------------------------------------------------

_larger = max  # ``max`` is also the name of the Spectral flag


def spectral_scale(d_out, d_in, normalized=True, max=False):
    """sqrt(d_out / d_in) (normalized) or sqrt(d_out); at least 1 when ``max``."""
    s = math.sqrt(d_out / d_in) if normalized else math.sqrt(d_out)
    return _larger(1.0, s) if max else s


def spectral(g, max=False, normalized=True, steps=5, coefficients="jordan", dtype=None):
    """NS of g reshaped to (len(g), -1), times sqrt(d_out / d_in) (normalized) or sqrt(d_out); max(1, .) if max."""
    X = newton_schulz(g.reshape(g.size(0), -1), steps, coefficients, dtype).reshape(g.shape)
    return X * spectral_scale(g.size(0), g.size(1), normalized, max)


def spectral_conv_scale(shape):
    """sqrt(c_out / c_in) / k (3-D) or / k² (4-D), k = shape[2] (the reference reads k from dim 2 alone)."""
    k = shape[2] if len(shape) == 3 else shape[2] ** 2
    return math.sqrt(shape[0] / shape[1]) / k


def spectral_conv(g, steps=5, coefficients="jordan", dtype=None):
    """NS of (c_out, c_in, k[, k]) g reshaped to (c_out, -1), times ``spectral_conv_scale``."""
    X = newton_schulz(g.reshape(g.size(0), -1), steps, coefficients, dtype).reshape(g.shape)
    return X * spectral_conv_scale(g.shape)


def colnorm(g, normalized=False, transpose=False):
    """Each column over ||col||_2 / sqrt(d_out) (times d_in when normalized) + EPS; transpose swaps the axes."""
    if transpose:
        return colnorm(g.mT, normalized).mT
    d_out, d_in = g.shape
    rms = g.pow(2).sum(0, keepdim=True).sqrt() / math.sqrt(d_out)
    return g / (rms * (d_in if normalized else 1) + EPS)


def rownorm(g, normalized=True, transpose=False):
    """Each row over ||row||_2 (times sqrt(d_in) when normalized) + EPS; transpose swaps the axes."""
    if transpose:
        return rownorm(g.mT, normalized).mT
    norm = g.pow(2).sum(1, keepdim=True).sqrt()
    return g / (norm * (math.sqrt(g.size(1)) if normalized else 1) + EPS)


def sign(g, zero_init=False, normalized=True):
    """sign(g), over d_in when normalized (zero_init only changes init)."""
    return torch.sign(g) / g.size(1) if normalized else torch.sign(g)


def bias_rms(g):
    """g / (sqrt(mean of g² over dim 0) + EPS); a 0-d g over |g| + EPS."""
    rms = g.abs() if g.dim() == 0 else g.pow(2).mean(0, keepdim=True).sqrt()
    return g / (rms + EPS)


def auto(g, **ns_kwargs):
    """Spectral for 2-D, SpectralConv for 3-D/4-D, BiasRMS for 0-D/1-D."""
    if g.dim() == 2:
        return spectral(g, **ns_kwargs)
    return spectral_conv(g, **ns_kwargs) if g.dim() > 2 else bias_rms(g)


LMOS = {"Spectral": spectral, "SpectralConv": spectral_conv, "ColNorm": colnorm, "RowNorm": rownorm,
        "Sign": sign, "BiasRMS": bias_rms, "Auto": auto}


def lmo(norm, g, **kwargs):
    """The LMO of reference norm ``norm`` (a name) with its constructor ``kwargs``; an unset ``dtype``
    iterates Newton-Schulz in g's dtype (the package's own default is bfloat16)."""
    if "dtype" in kwargs and isinstance(kwargs["dtype"], str):
        kwargs = {**kwargs, "dtype": getattr(torch, kwargs["dtype"])}
    return LMOS[norm](g, **kwargs)


# -- Scion / ScionLight --------------------------------------------------------------------

def scion_step(p, d, *, lr, scale=1.0, unconstrained=False, norm="Auto", norm_kwargs=None):
    """p (1 - lr) [unless unconstrained] - lr * scale * lmo(d), as the reference writes it."""
    u = scale * lmo(norm, d, **(norm_kwargs or {}))
    return (p if unconstrained else p * (1 - lr)) - lr * u


def scion_run(params, grads_per_step, groups, light=False):
    """Run Scion (or ScionLight) on copies of ``params`` for each step's grads (None: no grad that step).

    ``groups[i]`` is param i's group: lr, momentum, scale, unconstrained, norm, norm_kwargs.
    Scion: buf = (1 - momentum) buf + momentum g (no buffer when momentum == 1), step along buf.
    ScionLight: the carried p.grad accumulates g (as a backward does), the step goes along it, then it
    is scaled by (1 - momentum) unless momentum == 1; a step without grad drops it. Returns the final params."""
    ps = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            grp = groups[i]
            m = grp.get("momentum", 1.0)
            if g is None:
                bufs[i] = torch.zeros_like(ps[i]) if light else bufs[i]
                continue
            if light:
                bufs[i] = bufs[i] + g
                d = bufs[i]
            elif m != 1:
                bufs[i] = bufs[i] * (1 - m) + g * m
                d = bufs[i]
            else:
                d = g
            ps[i] = scion_step(ps[i], d, lr=grp["lr"], scale=grp.get("scale", 1.0),
                               unconstrained=grp.get("unconstrained", False), norm=grp.get("norm", "Auto"),
                               norm_kwargs=grp.get("norm_kwargs"))
            if light and m != 1:  # (with momentum 1 the reference leaves p.grad as it is)
                bufs[i] = bufs[i] * (1 - m)
    return ps


# -- init ---------------------------------------------------------------------------------------

def init_line_norm(norm, shape, **kwargs):
    """The l2 norm that init gives each line (before the group scale): ColNorm's columns (rows of the
    stored weight when transposed), RowNorm's rows; None for the other norms."""
    if norm not in ("ColNorm", "RowNorm"):
        return None
    d_out, d_in = shape[::-1] if kwargs.get("transpose") else shape
    if norm == "ColNorm":
        return math.sqrt(d_out) / (d_in if kwargs.get("normalized", False) else 1)
    return 1 / math.sqrt(d_in) if kwargs.get("normalized", True) else 1.0


def init(norm, shape, dtype=torch.float32, compute=torch.float64, **kwargs):
    """The reference's init of a ``dtype`` weight of ``shape`` (before the group scale), drawing the same
    random numbers in the same order from torch's generator, with the arithmetic in ``compute``:
    Spectral / SpectralConv orthogonal (fp64 draw, each tap of a conv) times the LMO's scale;
    ColNorm / RowNorm Gaussian (drawn in ``dtype``) with each column (row) of the (transposed) weight
    scaled to sqrt(d_out) (/ d_in when normalized) or 1 (/ sqrt(d_in) when normalized); Sign ±1
    (/ d_in when normalized; zeros when zero_init); BiasRMS zeros. Auto picks by rank as ``auto``."""
    if norm == "Auto":
        norm = {0: "BiasRMS", 1: "BiasRMS", 2: "Spectral"}.get(len(shape), "SpectralConv")
        kwargs = {k: v for k, v in kwargs.items() if k in ("max", "normalized")}
    if norm == "BiasRMS" or (norm == "Sign" and kwargs.get("zero_init")):
        return torch.zeros(shape, dtype=compute)
    if norm == "Spectral":
        w = torch.nn.init.orthogonal_(torch.empty(shape, dtype=torch.float64)).to(compute)
        return w * spectral_scale(*shape, kwargs.get("normalized", True), kwargs.get("max", False))
    if norm == "SpectralConv":
        w = torch.empty(shape, dtype=torch.float64)
        for tap in itertools.product(*map(range, shape[2:])):
            torch.nn.init.orthogonal_(w[(slice(None), slice(None), *tap)])
        return w.to(compute) * spectral_conv_scale(shape)
    if norm == "Sign":
        w = (2 * torch.randint(0, 2, shape, dtype=dtype) - 1).to(compute)
        return w / shape[1] if kwargs.get("normalized", True) else w
    transpose = kwargs.get("transpose", False)
    w = torch.empty(shape, dtype=dtype)
    w = torch.nn.init.normal_(w.mT if transpose else w).to(compute)  # drawn into the transposed view
    d_out, d_in = w.shape
    if norm == "ColNorm":
        w = w / w.pow(2).sum(0, keepdim=True).sqrt() * (math.sqrt(d_out) / (d_in if kwargs.get("normalized") else 1))
    else:
        w = w / w.pow(2).sum(1, keepdim=True).sqrt() / (math.sqrt(d_in) if kwargs.get("normalized", True) else 1)
    return w.mT if transpose else w


# -- power iteration ---------------------------------------------------------------------------

def start_vector(n, dtype=torch.float64):
    """The documented deterministic start: v_j ∝ sin(1 + j · 2.399963229728653) (the golden angle)."""
    v = torch.sin(1.0 + 2.399963229728653 * torch.arange(n, dtype=dtype))
    return v / v.norm()


def power_iteration(W, v, iters):
    """Per matrix of W: u = W v; v' = Wᵀ u; sigma = ||v'|| / ||u||; v = v' / ||v'|| (v kept, sigma 0 when v' = 0)."""
    if W.dim() == 3:
        pairs = [power_iteration(w, x, iters) for w, x in zip(W, v)]
        return torch.stack([s for s, _ in pairs]), torch.stack([x for _, x in pairs])
    sigma = torch.zeros((), dtype=W.dtype)
    for _ in range(iters):
        u = W @ v
        w = W.T @ u
        if w.norm() == 0:
            sigma = torch.zeros((), dtype=W.dtype)
            continue
        sigma = w.norm() / u.norm()
        v = w / w.norm()
    return sigma, v


# -- operator norms of a weight stored (d_out, d_in) ----------------------------------------------

def singular_values(W):
    return torch.linalg.svdvals(W.double())


def rms_to_rms(W):
    """sqrt(d_in / d_out) sigma_max(W)."""
    return math.sqrt(W.size(-1) / W.size(-2)) * singular_values(W)[..., 0]


def rms_to_inf(W):
    """sqrt(d_in) max_i ||W[i, :]||_2."""
    return math.sqrt(W.size(-1)) * W.double().pow(2).sum(-1).sqrt().amax(-1)


def l1_to_rms(W):
    """max_j ||W[:, j]||_2 / sqrt(d_out)."""
    return W.double().pow(2).sum(-2).sqrt().amax(-1) / math.sqrt(W.size(-2))


def supremum(W):
    """max_ij |W_ij|."""
    return W.double().abs().flatten(-2).amax(-1)


def condition_number(W):
    """sigma_max / sigma_min over the min(d_out, d_in) singular values."""
    s = singular_values(W)
    return s[..., 0] / s[..., -1]

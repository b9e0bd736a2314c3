"""Baselines timed in the same run as our kernels.

- ``reference_ns`` / ``ReferenceScion``: the reference Scion (LIONS-EPFL/scion)
  restated as a plain per-parameter torch loop, its Newton-Schulz in bf16.
- ``ns_baselines``: ``reference_ns``, the orthogonalisation of ``torch.optim.Muon``
  where torch has it, and those of the peer packages when installed (optional,
  never required): gram-newton-schulz, emerging-optimizers, dion.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from disco_kernels import reference
from disco_kernels.lmo import make_norm

JORDAN = reference.JORDAN


def reference_ns(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Newton-Schulz as the reference computes it, one matrix at a time (a batch is looped)."""
    if G.dim() > 2:
        return torch.stack([reference_ns(g, steps, dtype) for g in G])
    a, b, c = JORDAN
    X = G.to(dtype)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if tall else X


def reference_lmo(norm: str, kwargs: dict, ns_dtype: torch.dtype = torch.bfloat16, compile_ns: bool = False):
    """g -> lmo(g) of the reference norm ``norm`` with its constructor ``kwargs``; ``compile_ns``: its
    Newton-Schulz torch.compile'd (one graph per shape, shared by every caller: bench.case.compiled)."""
    if norm == "Spectral":
        if compile_ns:
            from .case import compiled
            ns = compiled(reference_ns)
        else:
            ns = reference_ns

        def spectral(g):
            d_out, d_in = g.shape
            s = reference.spectral_scale(d_out, d_in, kwargs.get("normalized", True), kwargs.get("max", False))
            return ns(g, kwargs.get("steps", 5), ns_dtype) * s
        return spectral
    if norm in ("ColNorm", "RowNorm", "Sign", "BiasRMS"):  # (their torch LMOs are the reference's math)
        return make_norm(norm, kwargs).lmo
    raise ValueError(f"no reference LMO for norm {norm!r}")


def reference_update_(p, g, buf, lmo, lr: float, momentum: float, scale: float, unconstrained: bool) -> None:
    """One parameter's reference Scion step, in place on ``p`` (and ``buf`` when momentum != 1)."""
    if momentum != 1:
        buf.mul_(1 - momentum).add_(g, alpha=momentum)
        g = buf
    update = scale * lmo(g)
    if not unconstrained:
        p.mul_(1 - lr)
    p.add_(update, alpha=-lr)


def reference_update_all_(params, grads, bufs, lmo, lr, momentum, scale, unconstrained) -> None:
    """``reference_update_`` over lists (the per-parameter loop; also what torch.compile is given)."""
    for p, g, buf in zip(params, grads, bufs):
        reference_update_(p, g, buf, lmo, lr, momentum, scale, unconstrained)


class ReferenceScion:
    """The reference Scion step as a per-parameter loop over groups of
    {"params", "norm", "norm_kwargs", "scale"} (the keys dk.Scion takes); ``compile_ns``: its
    Newton-Schulz torch.compile'd (the reference update rule with a compiled bf16 NS, issue 16)."""

    def __init__(self, groups: list[dict], lr: float, momentum: float, unconstrained: bool = False,
                 ns_dtype: torch.dtype = torch.bfloat16, compile_ns: bool = False):
        self.groups = groups
        self.lr, self.momentum, self.unconstrained = lr, momentum, unconstrained
        self.lmos = [reference_lmo(g["norm"], g.get("norm_kwargs", {}), ns_dtype, compile_ns) for g in groups]
        self.bufs = {}

    @torch.no_grad()
    def step(self) -> None:
        for group, lmo in zip(self.groups, self.lmos):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.momentum != 1 and p not in self.bufs:
                    self.bufs[p] = torch.zeros_like(p.grad)
                reference_update_(p, p.grad, self.bufs.get(p), lmo, self.lr, self.momentum, group.get("scale", 1.0),
                                  self.unconstrained)


def _per_matrix(fn):
    """Lift a 2-D-only orthogonaliser to (b, m, n) by looping over the batch."""
    return lambda G: torch.stack([fn(g) for g in G]) if G.dim() > 2 else fn(G)


class Orthogonaliser(NamedTuple):
    """A baseline G -> NS(G): the dtype its matmuls run in, the coefficients it iterates with (its error
    is measured against fp64 NS with those), and whether it compiles itself (seconds per shape)."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    compute_dtype: torch.dtype
    coefficients: object = "jordan"
    compiles: bool = False


# Keller Jordan's tuned quintic schedule, the 5 steps microsoft/dion's Triton NS runs.
QUINTIC = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))


def ns_baselines(device: torch.device) -> dict[str, Orthogonaliser]:
    """The reference, torch.optim.Muon's NS where torch has it, and the peer packages that import here."""
    out = {"reference": Orthogonaliser(reference_ns, torch.bfloat16)}
    try:  # torch >= 2.9: jordan coefficients, 5 steps, bf16, 2-D only
        from torch.optim._muon import _zeropower_via_newtonschulz
        out["torch-muon"] = Orthogonaliser(_per_matrix(lambda g: _zeropower_via_newtonschulz(g, JORDAN, 5, 1e-7)),
                                           torch.bfloat16)
    except ImportError:
        pass
    try:  # Dao-AILab/gram-newton-schulz: Gram NS in fp16, torch.compile'd, CuTeDSL kernels (quack) on a GPU
        from gram_newton_schulz import GramNewtonSchulz
        out["gram-newton-schulz"] = Orthogonaliser(_gram_ns(GramNewtonSchulz, device), torch.float16, compiles=True)
    except Exception:
        pass
    try:  # NVIDIA-NeMo/Emerging-Optimizers: fp32 in and out, "simple" = jordan coefficients, 2-D only
        from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz as eo_ns
        out["emerging-optimizers"] = Orthogonaliser(
            _per_matrix(lambda g: eo_ns(g.float(), 5, coefficient_type="simple")), torch.float32)
    except Exception:
        pass
    if device.type == "cuda":
        try:  # microsoft/dion: Triton NS, bf16, its own quintic schedule
            from dion.newton_schulz_triton import newton_schulz_triton
            out["dion"] = Orthogonaliser(newton_schulz_triton, torch.bfloat16, coefficients=QUINTIC)
        except Exception:
            pass
    return out


def _gram_ns(cls, device: torch.device):
    kw = {"ns_coefficients": [list(JORDAN)] * 5}
    if device.type == "cuda":
        try:
            return cls(**kw, ns_use_kernels=True)
        except ImportError:  # quack missing: its torch path
            pass
    return cls(**kw, ns_use_kernels=False)

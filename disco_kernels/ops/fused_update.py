"""Fused Scion update for the element-, row- and column-wise LMOs, many tensors at once.

For every (p, g, buf) of a group, in one pass where the backend allows:

    d = g                                   momentum == 1
    buf = (1 - momentum) buf + momentum g;  d = buf     (Scion)
    d = g; afterwards g *= (1 - momentum)               (ScionLight, ``light=True``)
    p = p (1 - lr) [unless unconstrained] - lr * scale * lmo(d)

with lmo one of "Sign", "RowNorm", "ColNorm", "BiasRMS" (math in reference.py).
``params``, ``bufs`` (and ``grads`` when light) are updated in place.
"""
from __future__ import annotations

import torch

from .. import _backend, reference

KERNELS = ("torch",)
LMOS = ("Sign", "RowNorm", "ColNorm", "BiasRMS")


def fused_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor] | None = None, *,
                 lmo: str, lr: float, momentum: float = 1.0, scale: float = 1.0, unconstrained: bool = False,
                 normalized: bool = True, transpose: bool = False, light: bool = False, backend: str = "auto") -> None:
    """Apply one Scion step in place to ``params`` (see the module docstring)."""
    if lmo not in LMOS:
        raise ValueError(f"lmo must be one of {LMOS}, got {lmo!r}")
    if len(grads) != len(params) or (bufs is not None and len(bufs) != len(params)):
        raise ValueError(f"params, grads and bufs must have equal lengths, got {len(params)}, {len(grads)}, "
                         f"{None if bufs is None else len(bufs)}")
    if not params:
        return
    impl = _backend.resolve(backend, params[0].device, "fused_update", KERNELS)
    torch.ops.disco_kernels.fused_update(params, grads, [] if bufs is None else bufs, lmo, float(lr), float(momentum),
                                         float(scale), bool(unconstrained), bool(normalized), bool(transpose),
                                         bool(light), impl)


def lmo_fn(lmo: str, normalized: bool, transpose: bool):
    """The reference LMO ``lmo`` with its flags bound: g -> direction."""
    if lmo == "Sign":
        return lambda g: reference.lmo_sign(g, normalized)
    if lmo == "RowNorm":
        return lambda g: reference.lmo_rownorm(g, normalized, transpose)
    if lmo == "ColNorm":
        return lambda g: reference.lmo_colnorm(g, normalized, transpose)
    return reference.lmo_bias_rms


def momentum_(bufs, grads, momentum):
    """buf = (1 - momentum) buf + momentum g, as the reference computes it."""
    torch._foreach_mul_(bufs, 1 - momentum)
    torch._foreach_add_(bufs, grads, alpha=momentum)


def apply_update_(params, updates, lr, scale, unconstrained):
    """p = p (1 - lr) [unless unconstrained] - lr * (scale * u), as the reference computes it."""
    updates = torch._foreach_mul(updates, scale)
    if not unconstrained:
        torch._foreach_mul_(params, 1 - lr)
    torch._foreach_add_(params, updates, alpha=-lr)


def _torch(params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light):
    dirs = grads
    if bufs and not light:
        momentum_(bufs, grads, momentum)
        dirs = bufs
    fn = lmo_fn(lmo, normalized, transpose)
    apply_update_(params, [fn(d) for d in dirs], lr, scale, unconstrained)
    if light and momentum != 1:
        torch._foreach_mul_(grads, 1 - momentum)


_IMPLS = {"torch": _torch}


@torch.library.custom_op("disco_kernels::fused_update", mutates_args=("params", "grads", "bufs"))
def _fused_update_op(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lmo: str,
                     lr: float, momentum: float, scale: float, unconstrained: bool, normalized: bool,
                     transpose: bool, light: bool, backend: str) -> None:
    _IMPLS[backend](params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light)


@_fused_update_op.register_fake
def _(params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light, backend):
    return None

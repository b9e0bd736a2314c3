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
from .._validate import flag, like, number, real_tensor, tensor_list

KERNELS = ("torch", "triton", "cuda")
LMOS = ("Sign", "RowNorm", "ColNorm", "BiasRMS")



def fused_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor] | None = None, *,
                 lmo: str, lr: float, momentum: float = 1.0, scale: float = 1.0, unconstrained: bool = False,
                 normalized: bool = True, transpose: bool = False, light: bool = False, backend: str = "auto") -> None:
    """Apply one Scion step in place to ``params`` (see the module docstring). ``normalized`` and
    ``transpose`` are the LMO's flags; note that ``normalized`` defaults to True here for every lmo,
    while the ``ColNorm`` norm class defaults to False (pass it explicitly for ColNorm)."""
    if lmo not in LMOS:
        raise ValueError(f"lmo must be one of {LMOS}, got {lmo!r}")
    params, grads = tensor_list(params, "params"), tensor_list(grads, "grads")
    bufs = None if bufs is None else tensor_list(bufs, "bufs")
    if len(grads) != len(params) or (bufs is not None and len(bufs) != len(params)):
        raise ValueError(f"params, grads and bufs must have equal lengths, got {len(params)}, {len(grads)}, "
                         f"{None if bufs is None else len(bufs)}")
    lr, momentum = number(lr, "lr", 0.0), number(momentum, "momentum", 0.0, 1.0)
    scale = number(scale, "scale")
    flags = {name: flag(value, name) for name, value in (("unconstrained", unconstrained), ("normalized", normalized),
                                                         ("transpose", transpose), ("light", light))}
    _backend.check_backend(backend)
    need = min_dims(lmo, flags["normalized"], flags["transpose"])
    for i, p in enumerate(params):
        real_tensor(p, f"params[{i}]")
        if p.dim() < need:
            raise ValueError(f"{lmo} needs tensors of at least {need} dims, got params[{i}] of shape {tuple(p.shape)}")
        like(grads[i], p, f"grads[{i}]", f"params[{i}]")
        if bufs is not None:
            like(bufs[i], p, f"bufs[{i}]", f"params[{i}]")
    if not params:
        return
    torch.ops.disco_kernels.fused_update(params, grads, [] if bufs is None else bufs, lmo, lr, momentum, scale,
                                         flags["unconstrained"], flags["normalized"], flags["transpose"],
                                         flags["light"], backend)


def lmo_fn(lmo: str, normalized: bool, transpose: bool):
    """The reference LMO ``lmo`` with its flags bound: g -> direction in g's dtype. The line norms are
    taken in fp32 for 16-bit g, as the kernels do: in fp16 the 1e-8 rounds to 0 (a zero line would
    give 0 / 0) and BiasRMS's g² overflows from |g| = 256."""
    if lmo == "Sign":
        return lambda g: reference.lmo_sign(g, normalized)
    if lmo == "RowNorm":
        fn = lambda g: reference.lmo_rownorm(g, normalized, transpose)  # noqa: E731
    elif lmo == "ColNorm":
        fn = lambda g: reference.lmo_colnorm(g, normalized, transpose)  # noqa: E731
    else:
        fn = reference.lmo_bias_rms
    return lambda g: fn(g.to(torch.promote_types(g.dtype, torch.float32))).to(g.dtype)


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


CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def min_dims(lmo: str, normalized: bool, transpose: bool) -> int:
    """The fewest dims ``lmo`` reads: columns need a matrix, a row a vector, normalized Sign d_in = size(-1)."""
    if lmo == "Sign":
        return int(normalized)
    if lmo == "BiasRMS":
        return 0
    return 2 if lmo == "ColNorm" or transpose else 1


def cuda_unsupported(params, grads, bufs, lmo, transpose, normalized, light) -> str | None:
    """Why the CUDA kernel cannot take this group (None when it can)."""
    need = min_dims(lmo, normalized, transpose)
    for i, (p, g) in enumerate(zip(params, grads)):
        b = bufs[i] if bufs and not light else None
        if p.dtype not in CUDA_DTYPES:
            return f"params[{i}] has dtype {p.dtype}; the CUDA kernel takes float32, bfloat16 or float16"
        if p.device != params[0].device:
            return f"params[{i}] is on {p.device}, params[0] on {params[0].device}: one launch runs on one device"
        for name, t in (("grads", g), ("bufs", b)):
            if t is not None and (t.dtype != p.dtype or t.shape != p.shape or t.device != p.device):
                return (f"{name}[{i}] ({t.dtype}, {tuple(t.shape)}, {t.device}) must match params[{i}] "
                        f"({p.dtype}, {tuple(p.shape)}, {p.device})")
        if p.dim() < need:
            return f"{lmo} needs tensors of at least {need} dims, got params[{i}] of shape {tuple(p.shape)}"
    return None


def choose_backend(backend, params, grads, bufs, lmo, transpose, normalized, light, subject="") -> str:
    """The backend that runs this group's update (``_backend.resolve``; raises as a forced one that
    cannot would, the error naming ``subject``)."""
    return _backend.resolve(backend, params[0].device, "fused_update", KERNELS,
                            lambda: cuda_unsupported(params, grads, bufs, lmo, transpose, normalized, light), subject)


def _cuda(params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light):
    ext = _backend.cuda_extension()
    has_buf = bool(bufs) and not light
    # The kernel takes contiguous tensors; others go through a copy (kept alive until the launch),
    # written back when the kernel mutates it.
    copies = []

    def contiguous(t, mutated):
        if t.is_contiguous():
            return t
        copies.append((t, t.contiguous(), mutated))
        return copies[-1][1]

    by_dtype = {}
    for i, p in enumerate(params):
        ps, gs, bs, shapes = by_dtype.setdefault(p.dtype, ([], [], [], []))
        ps.append(contiguous(p, True).data_ptr())
        gs.append(contiguous(grads[i], light and momentum != 1).data_ptr())
        bs.append(contiguous(bufs[i], True).data_ptr() if has_buf else 0)
        shapes.append(list(p.shape))
    stream = torch.cuda.current_stream(params[0].device).cuda_stream
    for dtype, (ps, gs, bs, shapes) in by_dtype.items():
        ext.fused_update(ext.DTYPES[str(dtype).removeprefix("torch.")], ext.LMOS[lmo], normalized, transpose,
                         unconstrained, light, has_buf, lr, momentum, scale, ps, gs, bs, shapes, stream)
    for t, c, mutated in copies:
        if mutated:
            t.copy_(c)


def _triton(params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light):
    from ..triton_kernels import fused_update as kernels
    return kernels.fused_update(params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light)


_IMPLS = {"torch": _torch, "triton": _triton, "cuda": _cuda}


@torch.library.custom_op("disco_kernels::fused_update", mutates_args=("params", "grads", "bufs"))
def _fused_update_op(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lmo: str,
                     lr: float, momentum: float, scale: float, unconstrained: bool, normalized: bool,
                     transpose: bool, light: bool, backend: str) -> None:
    if not params:
        return
    impl = choose_backend(backend, params, grads, bufs, lmo, transpose, normalized, light)
    with _backend.on_device(params[0].device):
        _IMPLS[impl](params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light)


@_fused_update_op.register_fake
def _(params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light, backend):
    return None

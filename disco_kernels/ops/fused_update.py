"""Fused Scion update for the element- and line-wise LMOs, many tensors at once.

The op knows no norm by name: per tensor it takes a ``kind``, a line dim and a factor ``alpha``, as
each norm of ``disco_kernels.lmo`` declares them. For every (p, g, buf) of a list, in one pass where
the backend allows:

    d = g                                   no bufs
    buf = (1 - momentum) buf + momentum g;  d = buf (as stored)     (Scion, bufs given)
    d = g; afterwards g *= (1 - momentum)                           (ScionLight, ``light=True``)
    u = sign(d) alpha                       kind "sign"   (NaN kept)
    u = d alpha                             kind "scaled" (the Newton-Schulz apply pass: d is X)
    u = d / (||line||_2 alpha + LINE_EPS)   kind "line", lines along dims[i]: -1 rows (a 0-D or 1-D
                                            tensor is one line), -2 columns; sums of squares in fp64
    p = p (1 - lr) [unless unconstrained] - lr scale u

``params``, ``bufs`` (and ``grads`` when light) are updated in place. lr, momentum and scale may be
0-d tensors: the kernels then read them from the device (``hyper``), so that a schedule writing into
them changes a compiled or CUDA-graph-captured step without a recompilation or a host sync.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, reference
from . import fused_update_cuda
from .._validate import flag, hyper as check_hyper, like, number, real_tensor, tensor_list

KERNELS = ("torch", "triton", "cuda")
LMOS = ("Sign", "RowNorm", "ColNorm", "BiasRMS")  # the names ``lmo`` takes (else a ``lmo.Norm`` instance)
KINDS = ("sign", "scaled", "line")
LINE_DIMS = (-1, -2)


def fused_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor] | None = None, *,
                 lmo, lr, momentum=1.0, scale=1.0, unconstrained: bool = False, normalized: bool = True,
                 transpose: bool = False, light: bool = False, backend: str = "auto", shapes=None) -> None:
    """Apply one Scion step in place to ``params`` (see the module docstring).

    ``lmo``: a ``disco_kernels.lmo.Norm`` of kind "sign" or "line" (Sign, RowNorm, ColNorm, BiasRMS or
    any ``LineNorm`` subclass), or one of the names in ``LMOS`` with the flags ``normalized`` and
    ``transpose`` (note that ``normalized`` defaults to True here for every name, while the ``ColNorm``
    class defaults to False). With a Norm instance the flags are its own: passing ``normalized=False``
    or ``transpose=True`` beside one is an error (they would be silently ignored).
    ``lr``, ``momentum``, ``scale``: numbers or 0-d floating-point tensors (on the CPU or the params'
    device; taken in fp32, in fp64 for fp64 params). A tensor momentum always decays ScionLight's g (even at
    value 1, to 0), a number only when it is not 1. (Tensors on the params' device keep a step capturable in
    a CUDA graph; a CPU tensor is copied to the device on each call.)
    ``shapes``: the full shape of each param (default its own), from which the norm's line dim and
    alpha are taken; the optimizer passes a DTensor's full shape for its local shard."""
    norm = _as_norm(lmo, normalized, transpose)
    params, grads = tensor_list(params, "params"), tensor_list(grads, "grads")
    bufs = None if bufs is None else tensor_list(bufs, "bufs")
    if len(grads) != len(params) or (bufs is not None and len(bufs) != len(params)):
        raise ValueError(f"params, grads and bufs must have equal lengths, got {len(params)}, {len(grads)}, "
                         f"{None if bufs is None else len(bufs)}")
    lr, momentum = check_hyper(lr, "lr", 0.0), check_hyper(momentum, "momentum", 0.0, 1.0)
    scale = check_hyper(scale, "scale")
    unconstrained, light = flag(unconstrained, "unconstrained"), flag(light, "light")
    _backend.check_backend(backend)
    shapes = _shapes(shapes, params)
    for i, p in enumerate(params):
        real_tensor(p, f"params[{i}]")
        norm.check(shapes[i], f"params[{i}]")
        like(grads[i], p, f"grads[{i}]", f"params[{i}]")
        if bufs is not None:
            like(bufs[i], p, f"bufs[{i}]", f"params[{i}]")
    dims = [_line_dim(norm, s) for s in shapes]
    alphas = [_alpha(norm, s) for s in shapes]
    if not params:
        return
    if light and not isinstance(momentum, torch.Tensor) and momentum == 1:
        bufs, light = None, False  # the same step (d = g, no buffer, g kept), whatever else comes from hyper
    values, hyper_t = _hyper(params[0].device, params[0].dtype, lr, momentum, scale)
    torch.ops.disco_kernels.fused_update(params, grads, [] if bufs is None else bufs, norm.kind, dims, alphas,
                                         *values, hyper_t, unconstrained, light, backend)


def apply_update(params: list[torch.Tensor], updates: list[torch.Tensor], alphas, *, lr, scale=1.0,
                 unconstrained: bool = False, backend: str = "auto") -> None:
    """The Newton-Schulz apply pass, in place and in one pass over memory:

        p_i = p_i (1 - lr) [unless unconstrained] - lr scale alphas[i] updates[i]

    ``updates[i]`` has p_i's shape and device but may have another dtype (e.g. a view of a batched bf16
    Newton-Schulz result for fp32 params); it is only read. ``lr`` and ``scale``: numbers or 0-d tensors."""
    params, updates = tensor_list(params, "params"), tensor_list(updates, "updates")
    if isinstance(alphas, torch.Tensor) or not isinstance(alphas, (list, tuple)):
        raise TypeError(f"alphas must be a list of numbers, got {type(alphas).__name__}")
    if not len(updates) == len(alphas) == len(params):
        raise ValueError(f"params, updates and alphas must have equal lengths, got {len(params)}, {len(updates)}, "
                         f"{len(alphas)}")
    alphas = [number(a, f"alphas[{i}]") for i, a in enumerate(alphas)]
    lr, scale = check_hyper(lr, "lr", 0.0), check_hyper(scale, "scale")
    unconstrained = flag(unconstrained, "unconstrained")
    _backend.check_backend(backend)
    for i, p in enumerate(params):
        real_tensor(p, f"params[{i}]")
        like(updates[i], p, f"updates[{i}]", f"params[{i}]")
    if not params:
        return
    (lr_f, _, scale_f), hyper_t = _hyper(params[0].device, params[0].dtype, lr, 1.0, scale)
    torch.ops.disco_kernels.fused_update(params, updates, [], "scaled", [-1] * len(params), alphas, lr_f, 1.0,
                                         scale_f, hyper_t, unconstrained, False, backend)


def _as_norm(lmo, normalized, transpose):
    """The ``lmo.Norm`` that ``lmo`` names or is (lazy import: lmo.py imports the ops)."""
    from .. import lmo as norms
    if isinstance(lmo, norms.Norm):
        if lmo.kind not in ("sign", "line"):
            raise ValueError(f"lmo must be a norm of kind 'sign' or 'line' (a fused LMO), got {type(lmo).__name__} "
                             f"of kind {lmo.kind!r} (its LMO needs Newton-Schulz: newton_schulz, then apply_update)")
        if normalized is not True or transpose is not False:
            raise ValueError(f"normalized and transpose are flags of a named lmo; {type(lmo).__name__} carries its "
                             f"own (got normalized={normalized!r}, transpose={transpose!r})")
        return lmo
    if not isinstance(lmo, str) or lmo not in LMOS:
        raise ValueError(f"lmo must be one of {LMOS}, got {lmo!r}")
    normalized, transpose = flag(normalized, "normalized"), flag(transpose, "transpose")
    if lmo == "Sign":
        return norms.Sign(normalized=normalized)
    if lmo == "BiasRMS":
        return norms.BiasRMS()
    return getattr(norms, lmo)(normalized=normalized, transpose=transpose)


def _shapes(shapes, params) -> list[tuple[int, ...]]:
    """Each param's full shape: its own, or ``shapes[i]`` (a sequence of ints of the param's rank)."""
    if shapes is None:
        return [tuple(p.shape) for p in params]
    if isinstance(shapes, torch.Tensor) or not isinstance(shapes, (list, tuple)) or len(shapes) != len(params):
        raise ValueError(f"shapes must be None or a list of one shape per param ({len(params)}), got {shapes!r}")
    out = []
    for i, (s, p) in enumerate(zip(shapes, params)):
        ok = isinstance(s, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in s)
        if not ok or (isinstance(p, torch.Tensor) and len(s) != p.dim()):
            raise ValueError(f"shapes[{i}] must be a shape (ints >= 0) of the rank of params[{i}] "
                             f"({tuple(p.shape) if isinstance(p, torch.Tensor) else p!r}), got {s!r}")
        out.append(tuple(s))
    return out


def _line_dim(norm, shape) -> int:
    dim = norm.line_dim(shape) if norm.kind == "line" else -1
    if dim not in LINE_DIMS or (dim == -2 and len(shape) < 2):
        raise ValueError(f"{type(norm).__name__}.line_dim({tuple(shape)}) must be -1 (rows) or -2 (columns, of a "
                         f"tensor of at least 2 dims), got {dim!r}")
    return dim


def _alpha(norm, shape) -> float:
    """The norm's alpha for ``shape`` (an empty tensor has nothing to scale: 0, as its alpha may divide by 0)."""
    if 0 in shape:
        return 0.0
    return number(norm.alpha(shape), f"{type(norm).__name__}.alpha({tuple(shape)})")


def _hyper(device, dtype, lr, momentum, scale):
    """(lr, momentum, scale) as floats for the op, and ``hyper``: None when all three are numbers, else the
    tensor [lr, momentum, scale] on ``device`` that the kernels read (fp32; fp64 for fp64 params, which
    only the torch path takes); a tensor's float is then NaN (its
    value is in hyper; a NaN momentum reads as != 1: ScionLight decays g)."""
    values = (lr, momentum, scale)
    if not any(isinstance(v, torch.Tensor) for v in values):
        return values, None
    dtype = torch.float64 if dtype == torch.float64 else torch.float32  # (the kernels take no fp64 params)
    hyper = torch.stack([v.to(device, dtype) if isinstance(v, torch.Tensor)
                         else torch.full((), v, dtype=dtype, device=device) for v in values])
    return tuple(math.nan if isinstance(v, torch.Tensor) else v for v in values), hyper


def read_hyper(lr, momentum, scale, hyper):
    """The step's (lr, momentum, scale): the floats, or hyper's entries, as floats when hyper is on the CPU
    (free to read) and as 0-d tensors on a device (no host sync)."""
    if hyper is None:
        return lr, momentum, scale
    if hyper.device.type == "cpu":
        return tuple(hyper.tolist())
    return hyper[0], hyper[1], hyper[2]


def momentum_(bufs, grads, momentum):
    """buf = (1 - momentum) buf + momentum g, as the reference computes it (momentum a number or 0-d tensor)."""
    torch._foreach_mul_(bufs, 1 - momentum)
    if isinstance(momentum, torch.Tensor):
        torch._foreach_add_(bufs, torch._foreach_mul(grads, momentum))
    else:
        torch._foreach_add_(bufs, grads, alpha=momentum)


def apply_update_(params, updates, lr, scale, unconstrained):
    """p = p (1 - lr) [unless unconstrained] - lr * (scale * u), as the reference computes it (lr and scale
    numbers or 0-d tensors); ``updates`` are not modified."""
    if not unconstrained:
        torch._foreach_mul_(params, 1 - lr)
    if isinstance(lr, torch.Tensor) or isinstance(scale, torch.Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(updates, lr * scale))
    else:  # (numbers: one pass, the factor folded into the add)
        torch._foreach_add_(params, updates, alpha=-lr * scale)


def direction(kind: str, d: torch.Tensor, dim: int, alpha: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """u of the module docstring for one tensor, from the reference's LMOs, in the wider of d's dtype and
    ``dtype`` (the param's: fp32 params updated along bf16 d get an fp32 u)."""
    if dtype is not None and dtype != d.dtype:
        d = d.to(torch.promote_types(d.dtype, dtype))
    if kind == "sign":
        return reference.sign_lmo(d, alpha)
    if kind == "scaled":
        return d * alpha
    return reference.line_lmo(d, dim, alpha)


def _torch(params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light):
    lr_, momentum_v, scale_ = read_hyper(lr, momentum, scale, hyper)
    dirs = grads
    if bufs and not light:
        momentum_(bufs, grads, momentum_v)
        dirs = bufs
    if kind == "scaled" and not any(isinstance(x, torch.Tensor) for x in (lr_, scale_)) and len(set(alphas)) == 1:
        # the Newton-Schulz apply pass: after the decay, one read of d per param, alpha folded into the add
        apply_update_(params, dirs, lr_, scale_ * alphas[0], unconstrained)
    else:
        updates = [direction(kind, d, dim, alpha, p.dtype) for p, d, dim, alpha in zip(params, dirs, dims, alphas)]
        apply_update_(params, updates, lr_, scale_, unconstrained)
    if light and momentum != 1:
        torch._foreach_mul_(grads, 1 - momentum_v)


# -- CUDA: ops/fused_update_cuda.py launches the extension's kernel from the same kind, dims and alphas ----

def cuda_unsupported(params, grads, bufs, kind, dims, light) -> str | None:
    """Why the CUDA kernel cannot take this group (None when it can)."""
    return fused_update_cuda.unsupported(params, grads, bufs, kind, dims, light)


def choose_backend(backend, params, grads, bufs, kind, dims, light, subject="") -> str:
    """The backend that runs this group's update (``_backend.resolve``; raises as a forced one that
    cannot would, the error naming ``subject``)."""
    return _backend.resolve(backend, params[0].device, "fused_update", KERNELS,
                            lambda: cuda_unsupported(params, grads, bufs, kind, dims, light), subject)


def _cuda(params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light):
    fused_update_cuda.launch(params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained,
                             light, reference.LINE_EPS)


def _triton(params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light):
    from ..triton_kernels import fused_update as kernels
    kernels.fused_update(params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light)


_IMPLS = {"torch": _torch, "triton": _triton, "cuda": _cuda}


@torch.library.custom_op("disco_kernels::fused_update", mutates_args=("params", "grads", "bufs"))
def _fused_update_op(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], kind: str,
                     dims: list[int], alphas: list[float], lr: float, momentum: float, scale: float,
                     hyper: torch.Tensor | None, unconstrained: bool, light: bool, backend: str) -> None:
    if not params:
        return
    if kind not in KINDS or not len(dims) == len(alphas) == len(params):
        raise ValueError(f"fused_update: kind must be one of {KINDS} with one line dim and alpha per param, got "
                         f"{kind!r}, {len(dims)} dims and {len(alphas)} alphas for {len(params)} params")
    impl = choose_backend(backend, params, grads, bufs, kind, dims, light)
    with _backend.on_device(params[0].device):
        _IMPLS[impl](params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light)


@_fused_update_op.register_fake
def _(params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light, backend):
    return None

"""Launch of the CUDA fused update (csrc/fused_update.cu) from a norm's kind, line dims and factors.

The kernel knows no norm: per tensor i it is told a kind, a line dim and a factor ``alpha_i`` (computed in
Python from the param's full shape, disco_kernels/lmo.py), and does in place, with d = g, or buf' =
(1 - momentum) buf + momentum g stored in buf's dtype and d = buf' as stored (Scion with bufs):

    kind "sign":    u = sign(d) alpha_i                  (NaN stays NaN)
    kind "scaled":  u = d alpha_i                        (e.g. a Newton-Schulz result X passed as g)
    kind "line":    u = d / (||line(d)||_2 alpha_i + eps)    lines along dims[i]: -1 the rows of the tensor seen
                    as (numel / size(-1), size(-1)) (a 0-D or 1-D tensor is one line), -2 the columns of each
                    matrix of the last two dims; sums of squares in fp64
    p' = decay p - lr scale u,  decay = 1 - lr (1 when unconstrained)
    light (ScionLight, bufs ignored): afterwards g' = (1 - momentum) g; a plain momentum == 1 leaves g as it is
    (the reference's ScionLight), a ``hyper`` momentum always scales it (by 0 at 1, as the torch path does)

lr, momentum and scale are plain numbers, or read by the kernel from ``hyper`` (a float32 tensor [lr, momentum,
scale] on the params' device): no host sync, so the launch can be captured in a CUDA graph and a schedule can
change them without recompiling. Importing this module needs neither a GPU nor the extension.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend

KINDS = ("sign", "scaled", "line")
LINE_DIMS = (-1, -2)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (param dtype, grad and buf dtype) pairs the kernel is built for (the extension's FUSED_UPDATE_PAIRS).
PAIRS = frozenset({(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                   (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32)})


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(t: torch.Tensor) -> str:
    return f"{_name(t.dtype)}, {tuple(t.shape)}, {t.device}"


def unsupported(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                bufs: Sequence[torch.Tensor] | None, kind: str, dims: Sequence[int] | None,
                light: bool) -> str | None:
    """Why the CUDA kernel cannot take this list (None when it can). ``dims``: per tensor its line dim (read
    for kind "line" only; may be None otherwise). Bufs are not read under ``light``. Availability of the
    extension and the device is ``_backend``'s business, not this function's."""
    if kind not in KINDS:
        return f"the CUDA kernel has no kind {kind!r} (it has {', '.join(KINDS)})"
    if len(grads) != len(params):
        return f"{len(params)} params but {len(grads)} grads"
    use_bufs = bool(bufs) and not light
    if use_bufs and len(bufs) != len(params):
        return f"{len(params)} params but {len(bufs)} bufs"
    if kind == "line" and (dims is None or len(dims) != len(params)):
        return f"kind 'line' needs one line dim per param ({len(params)}), got {None if dims is None else len(dims)}"
    pairs = ", ".join(f"({_name(p)}, {_name(g)})" for p, g in sorted(PAIRS, key=str))
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.device != params[0].device:
            return f"params[{i}] is on {p.device}, params[0] on {params[0].device}: one launch runs on one device"
        if (p.dtype, g.dtype) not in PAIRS:
            return (f"params[{i}] ({_name(p.dtype)}) with grads[{i}] ({_name(g.dtype)}): the CUDA kernel takes "
                    f"(param, grad) dtypes {pairs}")
        if g.shape != p.shape or g.device != p.device:
            return f"grads[{i}] ({_describe(g)}) must have the shape and device of params[{i}] ({_describe(p)})"
        if use_bufs:
            b = bufs[i]
            if b.dtype != g.dtype or b.shape != p.shape or b.device != p.device:
                return (f"bufs[{i}] ({_describe(b)}) must have grads[{i}]'s dtype ({_name(g.dtype)}) and the shape "
                        f"and device of params[{i}] ({tuple(p.shape)}, {p.device})")
        if kind == "line":
            dim = dims[i]
            if dim not in LINE_DIMS:
                return f"dims[{i}] is {dim!r}: the CUDA kernel takes lines along dim -1 or -2"
            if dim == -2 and p.dim() < 2:
                return f"lines along dim -2 need a tensor of at least 2 dims, got params[{i}] of shape {tuple(p.shape)}"
    return None


def _check_hyper(hyper: torch.Tensor, device: torch.device) -> None:
    if not isinstance(hyper, torch.Tensor) or hyper.dtype != torch.float32 or hyper.numel() != 3 or (
            hyper.device != device):
        what = (f"{_name(hyper.dtype)} of shape {tuple(hyper.shape)} on {hyper.device}"
                if isinstance(hyper, torch.Tensor) else type(hyper).__name__)
        raise ValueError(f"hyper must be a float32 tensor [lr, momentum, scale] on {device}, got {what}")


def launch(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor] | None,
           kind: str, dims: Sequence[int] | None, alphas: Sequence[float], lr: float | None,
           momentum: float | None, scale: float | None, hyper: torch.Tensor | None, unconstrained: bool,
           light: bool, eps: float) -> None:
    """One fused update of ``params`` in place (bufs too; grads under ``light``), on the current stream of the
    params' device, one kernel launch per (param dtype, grad dtype) pair (and per 128 tensors). ``hyper``: None
    (then lr, momentum and scale are numbers) or a float32 tensor [lr, momentum, scale] on the params' device
    (then lr, momentum and scale are not read). ``eps``: the line kind's guard (``reference.LINE_EPS``).
    The caller checks ``unsupported`` first (not repeated here: the launch is on every step's path);
    non-contiguous tensors go through contiguous copies that are written back when the kernel mutated them."""
    if not params:
        return
    if len(alphas) != len(params) or (kind == "line" and len(dims) != len(params)):
        raise ValueError(f"fused_update (CUDA): {len(params)} params but {len(alphas)} alphas and "
                         f"{None if dims is None else len(dims)} dims")
    ext = _backend.cuda_extension()
    if ext is None:
        raise RuntimeError("the CUDA extension disco_kernels._C was not built (install with nvcc available)")
    device = params[0].device
    if hyper is None:
        lr, momentum, scale, hyper_ptr = float(lr), float(momentum), float(scale), 0
    else:
        _check_hyper(hyper, device)
        hyper = hyper.contiguous()
        lr = momentum = scale = 0.0  # not read: the kernel reads hyper
        hyper_ptr = hyper.data_ptr()
    has_buf = bool(bufs) and not light
    # The kernel takes contiguous tensors; others go through a copy (kept alive until the launch), written back
    # when the kernel mutates it (g only under light, and with a plain momentum only when it is not 1).
    copies = []

    def contiguous(t, mutated):
        if t.is_contiguous():
            return t
        copies.append((t, t.contiguous(), mutated))
        return copies[-1][1]

    mutates_g = light and (hyper_ptr != 0 or momentum != 1)
    groups = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        ps, gs, bs, shapes, ds, als = groups.setdefault((p.dtype, g.dtype), ([], [], [], [], [], []))
        ps.append(contiguous(p, True).data_ptr())
        gs.append(contiguous(g, mutates_g).data_ptr())
        bs.append(contiguous(bufs[i], True).data_ptr() if has_buf else 0)
        shapes.append(list(p.shape))
        ds.append(int(dims[i]) if kind == "line" else -1)
        als.append(float(alphas[i]))
    with _backend.on_device(device):  # the kernel runs on the params' GPU whatever the current device is
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        for (p_dtype, g_dtype), (ps, gs, bs, shapes, ds, als) in groups.items():
            ext.fused_update(ext.DTYPES[_name(p_dtype)], ext.DTYPES[_name(g_dtype)], ext.KINDS[kind],
                             bool(unconstrained), bool(light), has_buf, lr, momentum, scale, hyper_ptr, float(eps), ps,
                             gs, bs, shapes, ds, als, stream)
    for t, c, mutated in copies:
        if mutated:
            t.copy_(c)

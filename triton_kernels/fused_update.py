"""Fused multi-tensor Scion updates in Triton (the math of ``ops.fused_update``).

The kernels know no norm: per tensor they take a kind, a line dim and a factor alpha (see
``disco_kernels.lmo``). Every tensor is seen as 2-D (R, C) (1-D as (1, n), 0-D as (1, 1)), addressed
through a table of element offsets from one base pointer per role (p, g, buf), per-role strides and
alpha, so one launch serves many tensors; programs find their tensor by binary search over the table's
tile starts. The roles may have different dtypes (e.g. bf16 g for fp32 p): a launch serves one tuple
of dtypes. All math is fp32, sums of squares fp64:

    d = g | (1 - momentum) buf + momentum g (stored to buf) | g, then g *= 1 - momentum (light)
    p = decay p - lr scale u,   decay = 1 - lr (1 when unconstrained)

    kind "sign", "scaled"    one pass, _tile_kernel (MODE 0), u = sign(d) alpha or d alpha
    "line" along rows (-1)   one pass, _row_kernel: a program owns whole rows (kept in registers up
                             to BC = next_pow2(C) <= CMAX; wider rows are re-read from cache)
    "line" along columns     two passes: _tile_kernel MODE 1 adds column sums of d² (fp64 atomics,
    (-2)                     one per column per program), MODE 2 applies u = d / (||col|| alpha + EPS)

lr, momentum and scale come as numbers, or (HYPER) from an fp32 tensor [lr, momentum, scale] on the
device; decay, lr scale and 1 - momentum are computed in the kernel from those three either way, so a
number and a tensor holding it give the same bits. The kernels update tensors in place through the
table, so they are not autotuned (a benchmark run would apply the step again): launch settings are
fixed per kernel below.
"""
from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from disco_kernels import reference
from disco_kernels._backend import on_device

from ._config import interpreted

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = tl.constexpr(reference.LINE_EPS)  # the line LMOs' epsilon, from the one definition
# table columns: element offsets from the base pointers, the 2-D view, strides, first tile, column-sum
# offset, alpha (fp64 bits)
(P_OFF, G_OFF, B_OFF, ROWS, COLS, SP_R, SP_C, SG_R, SG_C, SB_R, SB_C, START, TILES_C, COL_OFF, ALPHA, NF) = (
    tl.constexpr(i) for i in range(16))

if interpreted():
    TILE_BR, TILE_BC, TILE_LOOP, TILE_WARPS = 4, 16, 2, 4
    ROW_ELEMS, CMAX, ROW_WARPS = 64, 32, 4
else:
    TILE_BR, TILE_BC, TILE_LOOP, TILE_WARPS = 16, 256, 4, 4  # 64 x 256 elements per program
    ROW_ELEMS, CMAX, ROW_WARPS = 4096, 8192, 8  # rows up to 8192 wide stay in registers


@triton.jit
def _find(tab, pid, T, LOG_T: tl.constexpr, NF: tl.constexpr, START: tl.constexpr):
    """Index of the table row whose tiles contain program ``pid`` (binary search on the starts)."""
    lo = 0
    hi = T - 1
    for _ in tl.static_range(LOG_T):
        mid = (lo + hi + 1) // 2
        go = tl.load(tab + mid * NF + START) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return tab + lo * NF


@triton.jit
def _ptrs(base, ent, OFF: tl.constexpr, S_R: tl.constexpr, rows, cols, UNIT_C: tl.constexpr, ALIGN: tl.constexpr):
    """(rows, cols) pointers of one role of the tensor at table row ``ent``."""
    start = tl.load(ent + OFF) + rows.to(tl.int64) * tl.load(ent + S_R)
    if UNIT_C:
        return base + tl.multiple_of(start, ALIGN)[:, None] + cols[None, :]
    return base + start[:, None] + cols.to(tl.int64)[None, :] * tl.load(ent + S_R + 1)


@triton.jit
def _alpha(ent):
    """The tensor's alpha, stored in the int64 table as the bits of an fp64."""
    return tl.load(ent + ALPHA).to(tl.float64, bitcast=True)


@triton.jit
def _scalars(hyper, lr, momentum, scale, HYPER: tl.constexpr):
    """(decay, step = lr scale, momentum, gdecay = 1 - momentum) in fp32, from the numbers or from hyper."""
    if HYPER:
        lr = tl.load(hyper)
        momentum = tl.load(hyper + 1)
        scale = tl.load(hyper + 2)
    return 1 - lr, lr * scale, momentum, 1 - momentum


@triton.jit
def _direction(g_ptrs, b_ptrs, mask, momentum, HAS_BUF: tl.constexpr):
    """d in fp32; with a buffer, buf = (1 - momentum) buf + momentum g is stored and d is the stored value."""
    d = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BUF:
        buf = (1 - momentum) * tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32) + momentum * d
        buf = buf.to(b_ptrs.dtype.element_ty)
        tl.store(b_ptrs, buf, mask=mask)
        d = buf.to(tl.float32)
    return d


@triton.jit
def _finish(p_ptrs, g_ptrs, mask, d, u, decay, step, gdecay, UNCONSTRAINED: tl.constexpr,
            LIGHT_DECAY: tl.constexpr):
    """p = decay p - step u (step = lr scale; no decay when unconstrained); ScionLight then scales g (= d)
    by gdecay."""
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    if not UNCONSTRAINED:
        p = decay * p
    tl.store(p_ptrs, (p - step * u).to(p_ptrs.dtype.element_ty), mask=mask)
    if LIGHT_DECAY:
        tl.store(g_ptrs, (d * gdecay).to(g_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _squares(d, AXIS: tl.constexpr):
    """Sum of d² along AXIS in fp64: a huge but finite d (|d| > 2^64) would overflow fp32's sum."""
    d = d.to(tl.float64)
    return tl.sum(d * d, AXIS)


@triton.jit
def _inv_norm(ss, alpha):
    """1 / (sqrt(ss) alpha + EPS) from an fp64 sum of squares and fp64 alpha, as fp32."""
    return (1.0 / (tl.sqrt(ss) * alpha + EPS)).to(tl.float32)


@triton.jit
def _sign(d):
    """sign(d), NaN kept."""
    s = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
    return tl.where(d == d, s, d)


@triton.jit
def _tile_kernel(tab, colsq_ptr, p_base, g_base, b_base, hyper, T, lr, momentum, scale,
                 MODE: tl.constexpr, KIND: tl.constexpr, HAS_BUF: tl.constexpr, LIGHT_DECAY: tl.constexpr,
                 UNCONSTRAINED: tl.constexpr, HYPER: tl.constexpr, UNIT_C: tl.constexpr, P_ALIGN: tl.constexpr,
                 G_ALIGN: tl.constexpr, B_ALIGN: tl.constexpr, C_ALIGN: tl.constexpr, LOG_T: tl.constexpr,
                 BR: tl.constexpr, BC: tl.constexpr, LOOP: tl.constexpr):
    """One (BR * LOOP, BC) tile of one tensor. MODE 0: u = sign(d) alpha (KIND "sign") or d alpha ("scaled");
    1: d (and buf), column sums of d² into colsq; 2: update with u = d / (||col|| alpha + EPS), d read back
    from buf (or g)."""
    pid = tl.program_id(0)
    ent = _find(tab, pid, T, LOG_T, NF, START)
    decay, step, momentum, gdecay = _scalars(hyper, lr, momentum, scale, HYPER)
    R = tl.load(ent + ROWS)
    C = tl.multiple_of(tl.load(ent + COLS), C_ALIGN)
    t = pid - tl.load(ent + START)
    tiles_c = tl.load(ent + TILES_C)
    r0 = (t // tiles_c) * (BR * LOOP)
    cols = (t % tiles_c) * BC + tl.arange(0, BC)
    if MODE == 0:
        alpha = _alpha(ent).to(tl.float32)
    if MODE == 1:
        colsq = tl.zeros((BC,), tl.float64)
    if MODE == 2:
        ss = tl.load(colsq_ptr + tl.load(ent + COL_OFF) + cols, mask=cols < C, other=0.0)
        inv = _inv_norm(ss, _alpha(ent))
    for i in tl.static_range(LOOP):
        rows = r0 + i * BR + tl.arange(0, BR)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        g_ptrs = _ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, G_ALIGN)
        b_ptrs = _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, B_ALIGN)
        if MODE == 1:
            d = _direction(g_ptrs, b_ptrs, mask, momentum, HAS_BUF)
            colsq += _squares(d, 0)
        else:
            if MODE == 0:
                d = _direction(g_ptrs, b_ptrs, mask, momentum, HAS_BUF)
                if KIND == "sign":
                    u = _sign(d) * alpha
                else:
                    u = d * alpha
            else:
                d = tl.load(b_ptrs if HAS_BUF else g_ptrs, mask=mask, other=0.0).to(tl.float32)
                u = d * inv[None, :]
            _finish(_ptrs(p_base, ent, P_OFF, SP_R, rows, cols, UNIT_C, P_ALIGN), g_ptrs, mask, d, u, decay, step,
                    gdecay, UNCONSTRAINED, LIGHT_DECAY)
    if MODE == 1:
        tl.atomic_add(colsq_ptr + tl.load(ent + COL_OFF) + cols, colsq, mask=cols < C)


@triton.jit
def _row_kernel(tab, p_base, g_base, b_base, hyper, T, lr, momentum, scale,
                HAS_BUF: tl.constexpr, LIGHT_DECAY: tl.constexpr, UNCONSTRAINED: tl.constexpr, HYPER: tl.constexpr,
                ONE_PASS: tl.constexpr, UNIT_C: tl.constexpr, P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr,
                B_ALIGN: tl.constexpr, C_ALIGN: tl.constexpr, LOG_T: tl.constexpr, BR: tl.constexpr,
                BC: tl.constexpr):
    """BR whole rows of one tensor: u = d / (||row|| alpha + EPS)."""
    pid = tl.program_id(0)
    ent = _find(tab, pid, T, LOG_T, NF, START)
    decay, step, momentum, gdecay = _scalars(hyper, lr, momentum, scale, HYPER)
    R = tl.load(ent + ROWS)
    C = tl.multiple_of(tl.load(ent + COLS), C_ALIGN)
    rows = (pid - tl.load(ent + START)) * BR + tl.arange(0, BR)
    alpha = _alpha(ent)
    if ONE_PASS:  # the rows fit in registers (C <= BC)
        cols = tl.arange(0, BC)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        g_ptrs = _ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, G_ALIGN)
        d = _direction(g_ptrs, _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, B_ALIGN), mask, momentum, HAS_BUF)
        inv = _inv_norm(_squares(d, 1), alpha)
        _finish(_ptrs(p_base, ent, P_OFF, SP_R, rows, cols, UNIT_C, P_ALIGN), g_ptrs, mask, d, d * inv[:, None],
                decay, step, gdecay, UNCONSTRAINED, LIGHT_DECAY)
    else:  # sweep 1: d (stored to buf) and ||row||²; sweep 2 reads d back (from cache) and updates p
        ss = tl.zeros((BR,), tl.float64)
        for c in range(0, C, BC):
            cols = c + tl.arange(0, BC)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            d = _direction(_ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, G_ALIGN),
                           _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, B_ALIGN), mask, momentum, HAS_BUF)
            ss += _squares(d, 1)
        inv = _inv_norm(ss, alpha)
        for c in range(0, C, BC):
            cols = c + tl.arange(0, BC)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            g_ptrs = _ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, G_ALIGN)
            if HAS_BUF:
                d_ptrs = _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, B_ALIGN)
            else:
                d_ptrs = g_ptrs
            d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
            _finish(_ptrs(p_base, ent, P_OFF, SP_R, rows, cols, UNIT_C, P_ALIGN), g_ptrs, mask, d, d * inv[:, None],
                    decay, step, gdecay, UNCONSTRAINED, LIGHT_DECAY)


def _view2d(t: torch.Tensor, kind: str, dim: int):
    """(R, C, row stride, col stride) of t seen as 2-D for ``kind`` and line ``dim`` (strides of size-1 dims
    normalised to 0 and 1), or None when the kernels cannot address it so: more than 2 dims are merged into
    (size(0), rest) for the element-wise kinds and into (rest, size(-1)) for rows, where t's strides allow."""
    if t.dim() > 2:
        if kind == "line" and dim != -1:
            return None
        try:
            t = t.view(t.size(0), -1) if kind != "line" else t.view(-1, t.size(-1))
        except RuntimeError:  # strides that do not merge
            return None
    R, C = (1, 1) if t.dim() == 0 else (1, t.size(0)) if t.dim() == 1 else tuple(t.shape)
    s_r, s_c = (0, 1) if t.dim() == 0 else (0, t.stride(0)) if t.dim() == 1 else t.stride()
    return R, C, 0 if R == 1 else s_r, 1 if C == 1 else s_c


def _route(kind: str, dim: int, rank: int) -> str | None:
    """The kernel that takes a tensor: "tile" (element-wise), "row" or "col" (line sums); None: torch."""
    if kind != "line":
        return "tile"
    if dim == -1:
        return "row"
    return "col" if rank == 2 else None


@functools.lru_cache(maxsize=64)
def _table(rows: tuple, device: torch.device) -> torch.Tensor:
    """The launch table on ``device``, cached: the same tensors give the same table every step."""
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _alpha_bits(alpha: float) -> int:
    """alpha's fp64 bits as an int64 (the table's ALPHA column)."""
    return struct.unpack("<q", struct.pack("<d", alpha))[0]


def _launch(route, idx, views, params, grads, bufs, has_buf, kind, alphas, lr, momentum, scale, hyper,
            unconstrained, light):
    """One launch (two for column sums) over the tensors ``idx`` of one dtype tuple and route."""
    p0, g0 = params[idx[0]], grads[idx[0]]
    b0 = bufs[idx[0]] if has_buf else p0
    sizes = [t.element_size() for t in (p0, g0, b0)]
    rows, start, col_off, max_c = [], 0, 0, 0
    unit_c = aligned = True
    BC = TILE_BC if route != "row" else min(CMAX, max(triton.next_power_of_2(views[i][0][1]) for i in idx))
    BR = TILE_BR if route != "row" else max(1, ROW_ELEMS // BC)
    for i in idx:
        (R, C, sp_r, sp_c), (_, _, sg_r, sg_c), (_, _, sb_r, sb_c) = views[i]
        offs = [(t.data_ptr() - base.data_ptr()) // size
                for t, base, size in zip((params[i], grads[i], bufs[i] if has_buf else params[i]), (p0, g0, b0), sizes)]
        tiles_c = 1 if route == "row" else triton.cdiv(C, BC)
        tiles = triton.cdiv(R, BR if route == "row" else BR * TILE_LOOP) * tiles_c
        rows.append((*offs, R, C, sp_r, sp_c, sg_r, sg_c, sb_r, sb_c, start, tiles_c, col_off,
                     _alpha_bits(alphas[i])))
        unit_c &= sp_c == sg_c == sb_c == 1
        aligned &= all(off % (16 // size) == 0 and s_r % (16 // size) == 0
                       for off, size, s_r in zip(offs, sizes, (sp_r, sg_r, sb_r))) and C % (16 // min(sizes)) == 0
        start += tiles
        col_off += C
        max_c = max(max_c, C)
    tab = _table(tuple(x for row in rows for x in row), p0.device)
    vec = unit_c and aligned
    p_align, g_align, b_align = (16 // s if vec else 1 for s in sizes)
    common = dict(T=len(idx), lr=_f32(lr), momentum=_f32(momentum), scale=_f32(scale), HAS_BUF=has_buf,
                  LIGHT_DECAY=light and momentum != 1, UNCONSTRAINED=unconstrained, HYPER=hyper is not None,
                  UNIT_C=unit_c, P_ALIGN=p_align, G_ALIGN=g_align, B_ALIGN=b_align,
                  C_ALIGN=16 // min(sizes) if vec else 1, LOG_T=max(1, math.ceil(math.log2(len(idx)))) + 1,
                  BR=BR, BC=BC)
    hyper = p0 if hyper is None else hyper  # (unread without HYPER)
    if route == "row":
        _row_kernel[(start,)](tab, p0, g0, b0, hyper, ONE_PASS=BC >= max_c, num_warps=ROW_WARPS, **common)
    elif route == "col":
        colsq = torch.zeros(col_off, dtype=torch.float64, device=p0.device)
        for mode in (1, 2):
            _tile_kernel[(start,)](tab, colsq, p0, g0, b0, hyper, MODE=mode, KIND=kind, LOOP=TILE_LOOP,
                                   num_warps=TILE_WARPS, **common)
    else:
        _tile_kernel[(start,)](tab, p0, p0, g0, b0, hyper, MODE=0, KIND=kind, LOOP=TILE_LOOP, num_warps=TILE_WARPS,
                               **common)


def _f32(x: float) -> float:
    """A number as the kernels' fp32 argument (NaN, the placeholder of a value in hyper, as 0)."""
    return 0.0 if math.isnan(x) else x


def fused_update(params, grads, bufs, kind, dims, alphas, lr, momentum, scale, hyper, unconstrained, light) -> None:
    """``ops.fused_update``'s step in place; tensors the kernels do not take (float64, column lines of
    more than 2 dims, strides that do not merge into 2-D) go through the torch path."""
    has_buf = bool(bufs) and not light
    if hyper is not None:
        hyper = hyper.to(params[0].device, torch.float32)
    groups, views, rest = {}, {}, []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = bufs[i] if has_buf else None
        route = _route(kind, dims[i], p.dim())
        dtypes = (p.dtype, g.dtype, None if b is None else b.dtype)
        view = [None if t is None else _view2d(t, kind, dims[i]) for t in (p, g, b)] if route else None
        if route is None or any(d is not None and d not in DTYPES for d in dtypes) or None in view[:2] or (
                b is not None and view[2] is None):
            rest.append(i)
        elif p.numel():
            views[i] = view if b is not None else view[:2] + [(0, 0, 0, 1)]
            bucket = min(CMAX, triton.next_power_of_2(view[0][1])) if route == "row" else 0
            groups.setdefault((p.device, dtypes, route, bucket), []).append(i)
    for (device, _, route, _), idx in groups.items():
        with on_device(device):  # a list may span GPUs: each launch runs on its tensors' device
            _launch(route, idx, views, params, grads, bufs, has_buf, kind, alphas, lr, momentum, scale,
                    None if hyper is None else hyper.to(device), unconstrained, light)
    if rest:
        from disco_kernels.ops.fused_update import _torch
        _torch([params[i] for i in rest], [grads[i] for i in rest], [bufs[i] for i in rest] if bufs else [], kind,
               [dims[i] for i in rest], [alphas[i] for i in rest], lr, momentum, scale, hyper, unconstrained, light)

"""Fused multi-tensor Scion updates in Triton (the math of ``ops.fused_update``).

Every tensor is seen as 2-D (R, C) (1-D as (1, n), 0-D as (1, 1)), addressed
through a table of element offsets from one base pointer per role (p, g, buf)
and per-role strides, so one launch serves many tensors; programs find their
tensor by binary search over the table's tile starts. All math is fp32:

    d = g | (1 - momentum) buf + momentum g (stored to buf) | g, then g *= 1 - momentum (light)
    p = decay p - lr scale lmo(d),   decay = 1 - lr (1 when unconstrained)

    Sign:                 one pass, _tile_kernel (MODE 0), u = sign(d) f
    reduce along a row    one pass, _row_kernel: a program owns whole rows (kept in registers
    (RowNorm, ColNorm     up to BC = next_pow2(C) <= CMAX; wider rows are re-read from cache)
    transposed, BiasRMS)
    reduce along a column two passes: _tile_kernel MODE 1 adds column sums of d² (fp32 atomics,
    (ColNorm, RowNorm     one per column per program), MODE 2 applies u = d / (||col|| f + 1e-8)
    transposed)

with the LMO factor f computed in the kernel from the reduced length L and the
other length O. The kernels update tensors in place through the table, so they
are not autotuned (a benchmark run would apply the step again): launch settings
are fixed per kernel below.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from disco_kernels._backend import on_device

from ._config import interpreted

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# table columns: element offsets from the base pointers, the 2-D view, strides, first tile, column-sum offset
(P_OFF, G_OFF, B_OFF, ROWS, COLS, SP_R, SP_C, SG_R, SG_C, SB_R, SB_C, START, TILES_C, COL_OFF, NF) = (
    tl.constexpr(i) for i in range(15))

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
def _factor(L, O, LMO: tl.constexpr, NORMALIZED: tl.constexpr):
    """LMO scale f for a reduced length L and other length O (u = sign(d) f, or d / (||d|| f + 1e-8))."""
    L = L.to(tl.float32)
    O = O.to(tl.float32)
    if LMO == "Sign":
        f = 1.0 / O if NORMALIZED else O * 0 + 1
    elif LMO == "RowNorm":
        f = tl.sqrt(L) if NORMALIZED else L * 0 + 1
    elif LMO == "ColNorm":
        f = (O if NORMALIZED else O * 0 + 1) / tl.sqrt(L)
    else:  # BiasRMS
        f = 1.0 / tl.sqrt(L)
    return f


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
def _finish(p_ptrs, g_ptrs, mask, d, u, decay, step, gdecay, LIGHT_DECAY: tl.constexpr):
    """p = decay p - step u (step = lr scale); ScionLight then scales g (= d) by gdecay."""
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptrs, (decay * p - step * u).to(p_ptrs.dtype.element_ty), mask=mask)
    if LIGHT_DECAY:
        tl.store(g_ptrs, (d * gdecay).to(g_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _squares(d, AXIS: tl.constexpr):
    """Sum of d² along AXIS in fp64: a huge but finite d (|d| > 2^64) would overflow fp32's sum."""
    d = d.to(tl.float64)
    return tl.sum(d * d, AXIS)


@triton.jit
def _inv_norm(ss, f):
    """1 / (sqrt(ss) f + 1e-8) from an fp64 sum of squares, as fp32."""
    return (1.0 / (tl.sqrt(ss) * f + 1e-8)).to(tl.float32)


@triton.jit
def _sign(d):
    """sign(d), NaN kept."""
    s = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
    return tl.where(d == d, s, d)


@triton.jit
def _tile_kernel(tab, colsq_ptr, p_base, g_base, b_base, T, decay, step, momentum, gdecay,
                 MODE: tl.constexpr, LMO: tl.constexpr, NORMALIZED: tl.constexpr, HAS_BUF: tl.constexpr,
                 LIGHT_DECAY: tl.constexpr, UNIT_C: tl.constexpr, ALIGN: tl.constexpr, LOG_T: tl.constexpr,
                 BR: tl.constexpr, BC: tl.constexpr, LOOP: tl.constexpr):
    """One (BR * LOOP, BC) tile of one tensor. MODE 0: Sign update; 1: d (and buf), column sums of d²
    into colsq; 2: update with u = d / (||col|| f + 1e-8), d read back from buf (or g)."""
    pid = tl.program_id(0)
    ent = _find(tab, pid, T, LOG_T, NF, START)
    R = tl.load(ent + ROWS)
    C = tl.multiple_of(tl.load(ent + COLS), ALIGN)
    t = pid - tl.load(ent + START)
    tiles_c = tl.load(ent + TILES_C)
    r0 = (t // tiles_c) * (BR * LOOP)
    cols = (t % tiles_c) * BC + tl.arange(0, BC)
    if MODE == 0:
        f = _factor(C, C, LMO, NORMALIZED)
    if MODE == 1:
        colsq = tl.zeros((BC,), tl.float64)
    if MODE == 2:
        ss = tl.load(colsq_ptr + tl.load(ent + COL_OFF) + cols, mask=cols < C, other=0.0)
        inv = _inv_norm(ss, _factor(R, C, LMO, NORMALIZED))
    for i in tl.static_range(LOOP):
        rows = r0 + i * BR + tl.arange(0, BR)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        g_ptrs = _ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, ALIGN)
        b_ptrs = _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, ALIGN)
        if MODE == 1:
            d = _direction(g_ptrs, b_ptrs, mask, momentum, HAS_BUF)
            colsq += _squares(d, 0)
        else:
            if MODE == 0:
                d = _direction(g_ptrs, b_ptrs, mask, momentum, HAS_BUF)
                u = _sign(d) * f
            else:
                d = tl.load(b_ptrs if HAS_BUF else g_ptrs, mask=mask, other=0.0).to(tl.float32)
                u = d * inv[None, :]
            _finish(_ptrs(p_base, ent, P_OFF, SP_R, rows, cols, UNIT_C, ALIGN), g_ptrs, mask, d, u, decay, step,
                    gdecay, LIGHT_DECAY)
    if MODE == 1:
        tl.atomic_add(colsq_ptr + tl.load(ent + COL_OFF) + cols, colsq, mask=cols < C)


@triton.jit
def _row_kernel(tab, p_base, g_base, b_base, T, decay, step, momentum, gdecay,
                LMO: tl.constexpr, NORMALIZED: tl.constexpr, HAS_BUF: tl.constexpr, LIGHT_DECAY: tl.constexpr,
                ONE_PASS: tl.constexpr, UNIT_C: tl.constexpr, ALIGN: tl.constexpr, LOG_T: tl.constexpr,
                BR: tl.constexpr, BC: tl.constexpr):
    """BR whole rows of one tensor: u = d / (||row|| f + 1e-8)."""
    pid = tl.program_id(0)
    ent = _find(tab, pid, T, LOG_T, NF, START)
    R = tl.load(ent + ROWS)
    C = tl.multiple_of(tl.load(ent + COLS), ALIGN)
    rows = (pid - tl.load(ent + START)) * BR + tl.arange(0, BR)
    f = _factor(C, R, LMO, NORMALIZED)
    if ONE_PASS:  # the rows fit in registers (C <= BC)
        cols = tl.arange(0, BC)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        g_ptrs = _ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, ALIGN)
        d = _direction(g_ptrs, _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, ALIGN), mask, momentum, HAS_BUF)
        inv = _inv_norm(_squares(d, 1), f)
        _finish(_ptrs(p_base, ent, P_OFF, SP_R, rows, cols, UNIT_C, ALIGN), g_ptrs, mask, d, d * inv[:, None],
                decay, step, gdecay, LIGHT_DECAY)
    else:  # sweep 1: d (stored to buf) and ||row||²; sweep 2 reads d back (from cache) and updates p
        ss = tl.zeros((BR,), tl.float64)
        for c in range(0, C, BC):
            cols = c + tl.arange(0, BC)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            d = _direction(_ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, ALIGN),
                           _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, ALIGN), mask, momentum, HAS_BUF)
            ss += _squares(d, 1)
        inv = _inv_norm(ss, f)
        for c in range(0, C, BC):
            cols = c + tl.arange(0, BC)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            g_ptrs = _ptrs(g_base, ent, G_OFF, SG_R, rows, cols, UNIT_C, ALIGN)
            d_ptrs = _ptrs(b_base, ent, B_OFF, SB_R, rows, cols, UNIT_C, ALIGN) if HAS_BUF else g_ptrs
            d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
            _finish(_ptrs(p_base, ent, P_OFF, SP_R, rows, cols, UNIT_C, ALIGN), g_ptrs, mask, d, d * inv[:, None],
                    decay, step, gdecay, LIGHT_DECAY)


def _view2d(t: torch.Tensor):
    """(R, C, row stride, col stride) of t seen as 2-D; strides of size-1 dims normalised (0 and 1)."""
    R, C = (1, 1) if t.dim() == 0 else (1, t.size(0)) if t.dim() == 1 else tuple(t.shape)
    s_r, s_c = (0, 1) if t.dim() == 0 else (0, t.stride(0)) if t.dim() == 1 else t.stride()
    return R, C, 0 if R == 1 else s_r, 1 if C == 1 else s_c


def _reduce_axis(lmo: str, transpose: bool, dim: int) -> int | None:
    """Axis of the 2-D view that the LMO reduces over (None for Sign)."""
    if lmo == "Sign":
        return None
    if lmo == "BiasRMS":
        return 1
    return int(transpose) if lmo == "ColNorm" else 1 - int(transpose)


@functools.lru_cache(maxsize=64)
def _table(rows: tuple, device: torch.device) -> torch.Tensor:
    """The launch table on ``device``, cached: the same tensors give the same table every step."""
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _launch(kind, idx, params, grads, bufs, has_buf, lmo, lr, momentum, scale, unconstrained, normalized, light):
    """One launch (two for column reductions) over the tensors ``idx`` of one dtype and kind."""
    p0, g0 = params[idx[0]], grads[idx[0]]
    b0 = bufs[idx[0]] if has_buf else p0
    elsize = p0.element_size()
    align = 16 // elsize
    rows, start, col_off, max_c = [], 0, 0, 0
    unit_c = aligned = True
    BC = TILE_BC if kind != "row" else min(CMAX, max(triton.next_power_of_2(_view2d(params[i])[1]) for i in idx))
    BR = TILE_BR if kind != "row" else max(1, ROW_ELEMS // BC)
    for i in idx:
        R, C, sp_r, sp_c = _view2d(params[i])
        _, _, sg_r, sg_c = _view2d(grads[i])
        _, _, sb_r, sb_c = _view2d(bufs[i]) if has_buf else (0, 0, 0, 1)
        offs = [(t.data_ptr() - base.data_ptr()) // elsize
                for t, base in ((params[i], p0), (grads[i], g0), (bufs[i] if has_buf else params[i], b0))]
        tiles_c = 1 if kind == "row" else triton.cdiv(C, BC)
        tiles = triton.cdiv(R, BR if kind == "row" else BR * TILE_LOOP) * tiles_c
        rows.append((*offs, R, C, sp_r, sp_c, sg_r, sg_c, sb_r, sb_c, start, tiles_c, col_off))
        unit_c &= sp_c == sg_c == sb_c == 1
        aligned &= all(x % align == 0 for x in (*offs, C, sp_r, sg_r, sb_r))
        start += tiles
        col_off += C
        max_c = max(max_c, C)
    tab = _table(tuple(x for row in rows for x in row), p0.device)
    common = dict(T=len(idx), decay=1.0 if unconstrained else 1 - lr, step=lr * scale, momentum=momentum,
                  gdecay=1 - momentum, LMO=lmo, NORMALIZED=normalized, HAS_BUF=has_buf,
                  LIGHT_DECAY=light and momentum != 1, UNIT_C=unit_c, ALIGN=align if unit_c and aligned else 1,
                  LOG_T=max(1, math.ceil(math.log2(len(idx)))) + 1, BR=BR, BC=BC)
    if kind == "row":
        _row_kernel[(start,)](tab, p0, g0, b0, ONE_PASS=BC >= max_c, num_warps=ROW_WARPS,
                              **common)
    elif kind == "col":
        colsq = torch.zeros(col_off, dtype=torch.float64, device=p0.device)
        _tile_kernel[(start,)](tab, colsq, p0, g0, b0, MODE=1, LOOP=TILE_LOOP, num_warps=TILE_WARPS, **common)
        _tile_kernel[(start,)](tab, colsq, p0, g0, b0, MODE=2, LOOP=TILE_LOOP, num_warps=TILE_WARPS, **common)
    else:
        _tile_kernel[(start,)](tab, p0, p0, g0, b0, MODE=0, LOOP=TILE_LOOP, num_warps=TILE_WARPS, **common)


def fused_update(params, grads, bufs, lmo, lr, momentum, scale, unconstrained, normalized, transpose, light) -> None:
    """``ops.fused_update``'s step in place; tensors the kernels do not take (float64, dtypes that differ
    between p, g and buf, ranks other than 2, or 0/1 for BiasRMS) go through the torch path."""
    has_buf = bool(bufs) and not light
    groups, rest = {}, []
    for i, (p, g) in enumerate(zip(params, grads)):
        same = g.dtype == p.dtype and (not has_buf or bufs[i].dtype == p.dtype)
        rank_ok = p.dim() <= 1 if lmo == "BiasRMS" else p.dim() == 2
        if p.dtype not in DTYPES or not same or not rank_ok:
            rest.append(i)
        elif p.numel():
            axis = _reduce_axis(lmo, transpose, p.dim())
            kind = "tile" if axis is None else "row" if axis == 1 else "col"
            bucket = min(CMAX, triton.next_power_of_2(_view2d(p)[1])) if kind == "row" else 0
            groups.setdefault((p.device, p.dtype, kind, bucket), []).append(i)
    for (device, _, kind, _), idx in groups.items():
        with on_device(device):  # a list may span GPUs: each launch runs on its tensors' device
            _launch(kind, idx, params, grads, bufs, has_buf, lmo, lr, momentum, scale, unconstrained, normalized,
                    light)
    if rest:
        from disco_kernels.ops.fused_update import _torch
        _torch([params[i] for i in rest], [grads[i] for i in rest], [bufs[i] for i in rest] if bufs else [], lmo,
               lr, momentum, scale, unconstrained, normalized, transpose, light)

"""Batched Newton-Schulz in Triton, exploiting the symmetry of X Xᵀ.

For X of shape (b, m, n), m <= n (a tall G is read transposed through its
strides, never copied), each step (a, b, c) runs three kernels:

    A = X Xᵀ             _gram_kernel:   upper tiles only, each mirrored below
    B = b A + c A A      _sym_kernel:    upper tiles only (A A is symmetric), b A in the epilogue
    X = a X + B X        _update_kernel: a X in the epilogue, grouped (L2-friendly) tile order

The Gram form (``newton_schulz_gram``) runs the same kernels: R = X0 Xᵀ0 once
(_gram_kernel, fp32 out), per step W = a I + b R + c R R, Q <- W Q, R <- W (R W)
(_sym_kernel: every product is of commuting symmetric matrices, so symmetric),
and X = Q X0 at the end (_update_kernel with a = 0).

The first step reads G itself: X0 = G / (mult ||G||_F + eps) is formed as the
tiles are loaded (rounded to ``dtype`` where the torch path rounds X0), with
||G||_F² summed from the per-block partials of one _sumsq_kernel pass. The last
step writes straight into the result (transposed back through strides when
tall). Accumulation is fp32; A, B and X are rounded to ``dtype`` as in the torch
path, so the error matches it. fp32 products use IEEE fp32 (no TF32).

Small matrices (padded m x n within SMALL_LIMITS) take one launch for
the whole iteration instead: _small_kernel keeps one matrix in registers from the
load of G to the store of the result, every step in between (grid: the batch).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._config import MAX_GRID_Y, autotune, interpreted, num_partials

_PREC = {torch.float16: "tf32", torch.bfloat16: "tf32", torch.float32: "ieee"}  # (tf32 is ignored for 16-bit)
DTYPES = tuple(_PREC)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# The Gram form's iteration dtypes here: its R, W and Q are fp32 (IEEE dots). An fp32 iteration needs them in
# fp64 (ops.newton_schulz.gram_dtype) and takes the torch path.
GRAM_DTYPES = (torch.float16, torch.bfloat16)
# The interpreter's bf16 tl.dot is wrong; there bf16 tiles are multiplied in fp32, which is exact for their
# products and accumulates in fp32 like the tensor cores (a compile-time branch: GPU code is unchanged).
_BF16_DOT_IN_FP32 = tl.constexpr(interpreted())


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """a @ b (+ acc) with fp32 accumulation."""
    if _BF16_DOT_IN_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _sumsq_kernel(g_ptr, part_ptr, rows, cols, s_b, s_r, s_c, rows_per_part, P,
                  BR: tl.constexpr, BC: tl.constexpr):
    """part[b, p] = sum of g² over rows [p * rows_per_part, (p + 1) * rows_per_part) of matrix b, in fp64
    (a huge but finite g, |g| > 2^64, would overflow an fp32 sum)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    g = g_ptr + bid * s_b
    r0 = pid * rows_per_part
    r_end = tl.minimum(r0 + rows_per_part, rows)
    acc = tl.zeros((BR, BC), tl.float64)
    for r in range(r0, r_end, BR):
        rr = r + tl.arange(0, BR)
        for c in range(0, cols, BC):
            cc = c + tl.arange(0, BC)
            x = tl.load(g + rr[:, None].to(tl.int64) * s_r + cc.to(tl.int64)[None, :] * s_c,
                        mask=(rr[:, None] < r_end) & (cc[None, :] < cols), other=0.0).to(tl.float64)
            acc += x * x
    tl.store(part_ptr + bid * P + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _x0_scale(part_ptr, bid, P, mult, eps, SCALED: tl.constexpr, PB: tl.constexpr):
    """The factor tiles of X are multiplied by as they load: on the first step (SCALED, X = G)
    1 / (mult * ||G_b||_F + eps) from the P partial sums of squares of matrix b, else 1."""
    if SCALED:
        p = tl.arange(0, PB)
        ss = tl.sum(tl.load(part_ptr + bid * P + p, mask=p < P, other=0.0), 0)
        return (1.0 / (mult * tl.sqrt(ss) + eps)).to(tl.float32)
    return 1.0


@triton.jit
def _load_x(ptrs, mask, s, DT: tl.constexpr, SCALED: tl.constexpr):
    """A tile of X in DT; on the first step X = G * s rounded to DT (as the torch path rounds X0)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if SCALED:
        x = x.to(tl.float32) * s
    return x.to(DT)


@triton.jit
def _upper_tile(k, t):
    """The k-th tile (i, j), j >= i, of a t x t tile grid, row by row: row i starts at i t - i (i - 1) / 2."""
    tf = tl.cast(t, tl.float32)  # t is a constexpr when Triton specialises m == 1
    i = ((2 * tf + 1 - tl.sqrt((2 * tf + 1) * (2 * tf + 1) - 8 * k.to(tl.float32))) * 0.5).to(tl.int32)
    i = tl.where(i * t - i * (i - 1) // 2 > k, i - 1, i)  # fix the float estimate by one either way
    i = tl.where((i + 1) * t - (i + 1) * i // 2 <= k, i + 1, i)
    return i, i + k - (i * t - i * (i - 1) // 2)


@triton.jit
def _store_sym(out_ptr, tile, ri, rj, m, i, j):
    """Store an (i, j) tile of a symmetric (m, m) matrix and, off the diagonal, its mirror (j, i)."""
    mask = (ri[:, None] < m) & (rj[None, :] < m)
    ri64 = ri.to(tl.int64)
    rj64 = rj.to(tl.int64)
    tl.store(out_ptr + ri64[:, None] * m + rj64[None, :], tile, mask=mask)
    if i != j:
        tl.store(out_ptr + rj64[None, :] * m + ri64[:, None], tile, mask=mask)


@triton.jit
def _gram_kernel(x_ptr, a_ptr, part_ptr, m, n, sx_b, sx_m, sx_n, P, mult, eps,
                 SCALED: tl.constexpr, PB: tl.constexpr, PREC: tl.constexpr, XDT: tl.constexpr,
                 BLOCK: tl.constexpr, BK: tl.constexpr):
    """A = X Xᵀ for the upper tiles of A (b, m, m), mirrored; X's tiles in XDT, A in its own dtype."""
    i, j = _upper_tile(tl.program_id(0), tl.cdiv(m, BLOCK))
    bid = tl.program_id(1).to(tl.int64)
    DT = XDT
    s = _x0_scale(part_ptr, bid, P, mult, eps, SCALED, PB)
    x = x_ptr + bid * sx_b
    ri = i * BLOCK + tl.arange(0, BLOCK)
    rj = j * BLOCK + tl.arange(0, BLOCK)
    ri64 = ri.to(tl.int64)
    rj64 = rj.to(tl.int64)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, n, BK):
        kk = k + tl.arange(0, BK)
        kk64 = kk.to(tl.int64)
        xi = _load_x(x + ri64[:, None] * sx_m + kk64[None, :] * sx_n, (ri[:, None] < m) & (kk[None, :] < n), s, DT,
                     SCALED)
        xj = _load_x(x + rj64[None, :] * sx_m + kk64[:, None] * sx_n, (rj[None, :] < m) & (kk[:, None] < n), s, DT,
                     SCALED)
        acc = _dot(xi, xj, acc, PREC)
    _store_sym(a_ptr + bid * m * m, acc.to(a_ptr.dtype.element_ty), ri, rj, m, i, j)


@triton.jit
def _sym_kernel(a_ptr, b_ptr, c_ptr, out_ptr, m, coef_i, coef_c, coef_ab, PREC: tl.constexpr, BLOCK: tl.constexpr,
                BK: tl.constexpr):
    """out = coef_i I + coef_c C + coef_ab A B for the upper tiles of out (b, m, m), mirrored: A B must be
    symmetric (A A, or commuting symmetric A and B). A, B, C and out are (b, m, m) and may alias, but out
    none of them."""
    i, j = _upper_tile(tl.program_id(0), tl.cdiv(m, BLOCK))
    bid = tl.program_id(1).to(tl.int64)
    a = a_ptr + bid * m * m
    bm = b_ptr + bid * m * m
    ri = i * BLOCK + tl.arange(0, BLOCK)
    rj = j * BLOCK + tl.arange(0, BLOCK)
    ri64 = ri.to(tl.int64)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, m, BK):
        kk = k + tl.arange(0, BK)
        kk64 = kk.to(tl.int64)
        ai = tl.load(a + ri64[:, None] * m + kk[None, :], mask=(ri[:, None] < m) & (kk[None, :] < m), other=0.0)
        bj = tl.load(bm + kk64[:, None] * m + rj[None, :], mask=(kk[:, None] < m) & (rj[None, :] < m), other=0.0)
        acc = _dot(ai, bj, acc, PREC)
    cij = tl.load(c_ptr + bid * m * m + ri64[:, None] * m + rj[None, :], mask=(ri[:, None] < m) & (rj[None, :] < m),
                  other=0.0)
    out = coef_c * cij.to(tl.float32) + coef_ab * acc + tl.where(ri[:, None] == rj[None, :], coef_i, 0.0)
    _store_sym(out_ptr + bid * m * m, out.to(out_ptr.dtype.element_ty), ri, rj, m, i, j)


@triton.jit
def _update_kernel(x_ptr, bm_ptr, out_ptr, part_ptr, m, n, sx_b, sx_m, sx_n, so_b, so_m, so_n, P, mult, eps, coef_a,
                   SCALED: tl.constexpr, PB: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """out = coef_a X + B X, B (b, m, m) symmetric, X and out (b, m, n) through their strides."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    DT = out_ptr.dtype.element_ty
    # grouped order: GROUP row tiles sweep the column tiles together, so B and X tiles stay in L2
    tiles_m = tl.cdiv(m, BM)
    per_group = GROUP * tl.cdiv(n, BN)
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    s = _x0_scale(part_ptr, bid, P, mult, eps, SCALED, PB)
    x = x_ptr + bid * sx_b
    bm = bm_ptr + bid * m * m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, m, BK):
        kk = k + tl.arange(0, BK)
        bt = tl.load(bm + rm64[:, None] * m + kk[None, :], mask=(rm[:, None] < m) & (kk[None, :] < m), other=0.0)
        xt = _load_x(x + kk.to(tl.int64)[:, None] * sx_m + rn64[None, :] * sx_n, (kk[:, None] < m) & (rn[None, :] < n),
                     s, DT, SCALED)
        acc = _dot(bt, xt, acc, PREC)
    mask = (rm[:, None] < m) & (rn[None, :] < n)
    xij = _load_x(x + rm64[:, None] * sx_m + rn64[None, :] * sx_n, mask, s, DT, SCALED)
    out = coef_a * xij.to(tl.float32) + acc
    tl.store(out_ptr + bid * so_b + rm64[:, None] * so_m + rn64[None, :] * so_n, out.to(DT), mask=mask)


@triton.jit
def _small_kernel(g_ptr, out_ptr, coef_ptr, steps, m, n, sg_b, sg_m, sg_n, so_b, so_m, so_n, mult, eps,
                  PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Every step for one (m, n) matrix, m <= BM, n <= BN, on chip: X = G / (mult ||G||_F + eps);
    per step A = X Xᵀ, B = b A + c A A, X = a X + B X (each rounded to the output dtype);
    coefficients (a, b, c) per step from coef_ptr. Padding rows and columns stay zero."""
    bid = tl.program_id(0).to(tl.int64)
    DT = out_ptr.dtype.element_ty
    rm = tl.arange(0, BM).to(tl.int64)
    rn = tl.arange(0, BN).to(tl.int64)
    mask = (rm[:, None] < m) & (rn[None, :] < n)
    g = tl.load(g_ptr + bid * sg_b + rm[:, None] * sg_m + rn[None, :] * sg_n, mask=mask, other=0.0).to(tl.float32)
    g64 = g.to(tl.float64)  # the sum of squares in fp64: no overflow for a huge but finite g
    x = (g / (mult * tl.sqrt(tl.sum(tl.sum(g64 * g64, 1), 0)) + eps).to(tl.float32)).to(DT)
    for k in range(steps):
        a = tl.load(coef_ptr + 3 * k)
        b = tl.load(coef_ptr + 3 * k + 1)
        c = tl.load(coef_ptr + 3 * k + 2)
        A = _dot(x, tl.trans(x), None, PREC).to(DT)
        B = (b * A.to(tl.float32) + c * _dot(A, A, None, PREC)).to(DT)
        x = (a * x.to(tl.float32) + _dot(B, x, None, PREC)).to(DT)
    tl.store(out_ptr + bid * so_b + rm[:, None] * so_m + rn[None, :] * so_n, x, mask=mask)


def _sym_configs():
    if interpreted():
        return [triton.Config({"BLOCK": 16, "BK": 16}, num_warps=4)]
    return [triton.Config({"BLOCK": 128, "BK": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK": 128, "BK": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK": 64, "BK": 64}, num_warps=4, num_stages=4)]


def _update_configs():
    if interpreted():
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP": 2}, num_warps=4)]
    return [triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP": 8}, num_warps=8, num_stages=3),
            triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP": 8}, num_warps=8, num_stages=3),
            triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP": 8}, num_warps=4, num_stages=4)]


gram_kernel = autotune(_sym_configs(), ["m", "n", "SCALED"])(_gram_kernel)
sym_kernel = autotune(_sym_configs(), ["m"])(_sym_kernel)
update_kernel = autotune(_update_configs(), ["m", "n", "SCALED"])(_update_kernel)


def _tri(m, meta):
    t = triton.cdiv(m, meta["BLOCK"])
    return t * (t + 1) // 2


# The fused small-matrix path: a padded (BM, BN) tile per matrix held in registers. Limits per compute
# dtype, from ptxas register counts for sm_90a (no spills): 16-bit up to 64 x 256, fp32 (IEEE dots) 32 x 256.
SMALL_LIMITS = {2: (64, 16384), 4: (32, 8192)}  # itemsize: (largest BM, largest BM * BN)


def _small_tile(m: int, n: int, dtype: torch.dtype) -> tuple[int, int] | None:
    """(BM, BN) of the fused kernel for X of (m, n), m <= n, in ``dtype``; None when it is too large."""
    bm, bn = max(16, triton.next_power_of_2(m)), max(16, triton.next_power_of_2(n))
    max_m, max_elems = SMALL_LIMITS[dtype.itemsize]
    return (bm, bn) if bm <= max_m and bm * bn <= max_elems else None


@functools.lru_cache(maxsize=32)
def _coefficients(flat: tuple, device: torch.device) -> torch.Tensor:
    """The schedule on ``device``, cached: no host-to-device copy after the first step (CUDA-graph safe)."""
    return torch.tensor(flat, dtype=torch.float32).to(device)


def _views(G: torch.Tensor, out: torch.Tensor):
    """(G3, out3, tall, m, n) of non-empty G and out: both as (b, M, N), and X's sizes m <= n (X = G, or Gᵀ
    per matrix when tall)."""
    G3 = G.reshape(-1, *G.shape[-2:])
    b, M, N = G3.shape
    tall = M > N
    return G3, out.view(b, M, N), tall, *((N, M) if tall else (M, N))


def _x_strides(t: torch.Tensor, tall: bool) -> tuple:
    """(batch, row, col) strides of X = t (or tᵀ when tall)."""
    return (t.stride(0), t.stride(2), t.stride(1)) if tall else t.stride()


def newton_schulz(G: torch.Tensor, triples, mult: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """NS of (..., M, N) ``G``: contiguous, shape of G, in ``dtype``. float64 and zero steps (no matmul to
    fuse into) take the torch path."""
    if dtype not in DTYPES or not triples:
        from disco_kernels.ops.newton_schulz import _torch
        return _torch(G, triples, mult, eps, dtype)
    out = torch.empty(G.shape, dtype=dtype, device=G.device)
    if out.numel() == 0:
        return out
    G3, out3, tall, m, n = _views(G, out)
    b, M, N = G3.shape
    tile = _small_tile(m, n, dtype)
    if tile is not None:
        coef = _coefficients(tuple(x for t in triples for x in t), G.device)
        _small_kernel[(b,)](G3, out3, coef, len(triples), m, n, *_x_strides(G3, tall), *_x_strides(out3, tall), mult, eps,
                            PREC=_PREC[dtype], BM=tile[0], BN=tile[1], num_warps=4 if tile[0] * tile[1] <= 4096 else 8)
        return out
    if b > MAX_GRID_Y:  # the tiled kernels' batch is grid axis 1
        for s in range(0, b, MAX_GRID_Y):
            out3[s:s + MAX_GRID_Y] = newton_schulz(G3[s:s + MAX_GRID_Y], triples, mult, eps, dtype)
        return out

    P = num_partials(M)
    part = torch.empty((b, P), dtype=torch.float64, device=G.device)
    rows_per_part = triton.cdiv(M, P)
    _sumsq_kernel[(P, b)](G3, part, M, N, *G3.stride(), rows_per_part, P, BR=8, BC=64)
    norm = dict(part_ptr=part, P=P, mult=mult, eps=eps, PB=triton.next_power_of_2(P), PREC=_PREC[dtype])
    A = torch.empty((b, m, m), dtype=dtype, device=G.device)
    B = torch.empty_like(A)
    bufs = [torch.empty((b, m, n), dtype=dtype, device=G.device) for _ in range(min(2, len(triples) - 1))]
    X, sx = G3, _x_strides(G3, tall)
    for k, (a, cb, cc) in enumerate(triples):
        first, last = k == 0, k == len(triples) - 1
        gram_kernel[lambda meta: (_tri(m, meta), b)](X, A, m=m, n=n, sx_b=sx[0], sx_m=sx[1], sx_n=sx[2],
                                                      SCALED=first, XDT=_TL[dtype], **norm)
        sym_kernel[lambda meta: (_tri(m, meta), b)](A, A, A, B, m, 0.0, cb, cc, PREC=_PREC[dtype])
        Y = out3 if last else bufs[k % 2]
        sy = _x_strides(out3, tall) if last else Y.stride()
        update_kernel[lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), b)](
            X, B, Y, m=m, n=n, sx_b=sx[0], sx_m=sx[1], sx_n=sx[2], so_b=sy[0], so_m=sy[1], so_n=sy[2], coef_a=a,
            SCALED=first, **norm)
        X, sx = Y, sy
    return out


def newton_schulz_gram(G: torch.Tensor, triples, mult: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The Gram form of NS of (..., M, N) ``G`` (see ops.newton_schulz): contiguous, shape of G, in ``dtype``.
    X0 is rounded to ``dtype`` as it loads; R, W and Q are fp32; Q is rounded to ``dtype`` for X = Q X0.
    Iterations in other dtypes, and zero steps, take the torch path."""
    if dtype not in GRAM_DTYPES or not triples:
        from disco_kernels.ops.newton_schulz import _torch_gram
        return _torch_gram(G, triples, mult, eps, dtype)
    out = torch.empty(G.shape, dtype=dtype, device=G.device)
    if out.numel() == 0:
        return out
    G3, out3, tall, m, n = _views(G, out)
    b, M, N = G3.shape
    if b > MAX_GRID_Y:  # the kernels' batch is grid axis 1
        for s in range(0, b, MAX_GRID_Y):
            out3[s:s + MAX_GRID_Y] = newton_schulz_gram(G3[s:s + MAX_GRID_Y], triples, mult, eps, dtype)
        return out

    P = num_partials(M)
    part = torch.empty((b, P), dtype=torch.float64, device=G.device)
    _sumsq_kernel[(P, b)](G3, part, M, N, *G3.stride(), triton.cdiv(M, P), P, BR=8, BC=64)
    norm = dict(part_ptr=part, P=P, mult=mult, eps=eps, PB=triton.next_power_of_2(P))
    sg = _x_strides(G3, tall)
    R, W, Q, T = (torch.empty((b, m, m), dtype=torch.float32, device=G.device) for _ in range(4))
    grid = lambda meta: (_tri(m, meta), b)  # noqa: E731
    gram_kernel[grid](G3, R, m=m, n=n, sx_b=sg[0], sx_m=sg[1], sx_n=sg[2], SCALED=True, XDT=_TL[dtype],
                      PREC=_PREC[dtype], **norm)
    for k, (a, cb, cc) in enumerate(triples):
        Wk = W
        sym_kernel[grid](R, R, R, Wk, m, a, cb, cc, PREC="ieee")  # W = a I + b R + c R R
        if k == 0:  # Q = W: the buffers trade names, Wk stays W
            Q, W = W, Q
        else:
            sym_kernel[grid](Wk, Q, Q, T, m, 0.0, 0.0, 1.0, PREC="ieee")  # Q <- W Q
            Q, T = T, Q
        if k + 1 < len(triples):
            sym_kernel[grid](R, Wk, R, T, m, 0.0, 0.0, 1.0, PREC="ieee")  # T = R W
            sym_kernel[grid](Wk, T, T, R, m, 0.0, 0.0, 1.0, PREC="ieee")  # R <- W T
    so = _x_strides(out3, tall)
    update_kernel[lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), b)](
        G3, Q.to(dtype), out3, m=m, n=n, sx_b=sg[0], sx_m=sg[1], sx_n=sg[2], so_b=so[0], so_m=so[1], so_n=so[2],
        coef_a=0.0, SCALED=True, PREC=_PREC[dtype], **norm)
    return out

"""Power iteration in Triton: one read of W per iteration.

Per iteration, for (b, m, n) W and unit v:

    _sweep_kernel:  u_r = W_r v for a block of rows r, then v' += W_rᵀ u_r and ||u||² += ||u_r||²,
                    from the same tile of W (rows up to BN = next_pow2(n) <= NMAX wide stay in
                    registers; wider rows are re-read from cache in a second sweep). Persistent
                    programs walk the row blocks and add their v' and ||u||² once (fp32 atomics).
    _finish_kernel: sigma = ||v'|| / ||u||, v = v' / ||v'|| (v and sigma = 0 kept where v' = 0; NaN stays NaN),
                    then zero the accumulators for the next iteration.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import MAX_GRID_Y, autotune, interpreted, num_sms

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NMAX = 64 if interpreted() else 16384  # widest row kept in registers


@triton.jit
def _sweep_kernel(w_ptr, v_ptr, acc_ptr, usq_ptr, m, n, s_b, s_m, s_n,
                  ONE_PASS: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr, BM: tl.constexpr):
    """acc[b] += Wᵀ (W v) and usq[b] += ||W v||² over this program's row blocks of BM = TILE // BN rows."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    w = w_ptr + bid * s_b
    v = v_ptr + bid * n
    acc = acc_ptr + bid * n
    cols = tl.arange(0, BN)
    usq = 0.0
    if ONE_PASS:  # the whole row fits (BN >= n): one load of each W tile serves u and v'
        vv = tl.load(v + cols, mask=cols < n, other=0.0)
        vacc = tl.zeros((BN,), tl.float32)
        for r in range(pid * BM, m, tl.num_programs(0) * BM):
            rows = r + tl.arange(0, BM)
            wt = tl.load(w + rows.to(tl.int64)[:, None] * s_m + cols.to(tl.int64)[None, :] * s_n,
                         mask=(rows[:, None] < m) & (cols[None, :] < n), other=0.0).to(tl.float32)
            u = tl.sum(wt * vv[None, :], 1)
            usq += tl.sum(u * u, 0)
            vacc += tl.sum(wt * u[:, None], 0)
        tl.atomic_add(acc + cols, vacc, mask=cols < n)
    else:
        for r in range(pid * BM, m, tl.num_programs(0) * BM):
            rows = r + tl.arange(0, BM)
            wr = w + rows.to(tl.int64)[:, None] * s_m
            u = tl.zeros((BM,), tl.float32)
            for c in range(0, n, BN):
                cc = c + cols
                wt = tl.load(wr + cc.to(tl.int64)[None, :] * s_n, mask=(rows[:, None] < m) & (cc[None, :] < n),
                             other=0.0)
                u += tl.sum(wt.to(tl.float32) * tl.load(v + cc, mask=cc < n, other=0.0)[None, :], 1)
            usq += tl.sum(u * u, 0)
            for c in range(0, n, BN):
                cc = c + cols
                wt = tl.load(wr + cc.to(tl.int64)[None, :] * s_n, mask=(rows[:, None] < m) & (cc[None, :] < n),
                             other=0.0)
                tl.atomic_add(acc + cc, tl.sum(wt.to(tl.float32) * u[:, None], 0), mask=cc < n)
    tl.atomic_add(usq_ptr + bid, usq)


@triton.jit
def _finish_kernel(v_ptr, acc_ptr, usq_ptr, sigma_ptr, n, BN: tl.constexpr):
    """sigma = ||v'|| / ||u||, v = v' / ||v'|| where v' != 0; zero acc and usq."""
    bid = tl.program_id(0).to(tl.int64)
    v = v_ptr + bid * n
    acc = acc_ptr + bid * n
    ss = tl.zeros((BN,), tl.float32)
    for c in range(0, n, BN):
        cc = c + tl.arange(0, BN)
        a = tl.load(acc + cc, mask=cc < n, other=0.0)
        ss += a * a
    nw = tl.sqrt_rn(tl.sum(ss, 0))  # IEEE: tl.sqrt flushes subnormal sums of squares to 0 on GPUs
    nu = tl.sqrt_rn(tl.load(usq_ptr + bid))
    ok = nw != 0  # not "> 0": NaN must reach sigma
    tl.store(sigma_ptr + bid, tl.where(ok, nw / tl.where(ok, nu, 1.0), 0.0))
    for c in range(0, n, BN):
        cc = c + tl.arange(0, BN)
        a = tl.load(acc + cc, mask=cc < n, other=0.0)
        old = tl.load(v + cc, mask=cc < n, other=0.0)
        tl.store(v + cc, tl.where(ok, a / tl.where(ok, nw, 1.0), old), mask=cc < n)
        tl.store(acc + cc, tl.zeros((BN,), tl.float32), mask=cc < n)
    tl.store(usq_ptr + bid, 0.0)


def _configs():
    if interpreted():
        return [triton.Config({"TILE": 256}, num_warps=4)]
    return [triton.Config({"TILE": 16384}, num_warps=8, num_stages=2),
            triton.Config({"TILE": 16384}, num_warps=16, num_stages=2),
            triton.Config({"TILE": 32768}, num_warps=16, num_stages=2)]


sweep_kernel = autotune(_configs(), ["m", "n"], reset_to_zero=["acc_ptr", "usq_ptr"])(
    triton.heuristics({"BM": lambda args: args["TILE"] // args["BN"]})(_sweep_kernel))


def power_iteration(W: torch.Tensor, v: torch.Tensor, iters: int):
    """(sigma, v) after ``iters`` iterations from unit ``v`` (float32, contiguous, shape W.shape[:-1] without m)."""
    if W.dtype not in DTYPES:
        from disco_kernels.ops.power_iteration import _torch
        return _torch(W, v, iters)
    if W.numel() == 0:  # W v = 0: sigma 0, v kept
        return v.new_zeros(W.shape[:-2]), v.clone()
    W3 = W.reshape(-1, *W.shape[-2:])
    b, m, n = W3.shape
    if b > MAX_GRID_Y:  # the batch is grid axis 1
        v2 = v.reshape(b, n)
        parts = [power_iteration(W3[s:s + MAX_GRID_Y], v2[s:s + MAX_GRID_Y], iters) for s in range(0, b, MAX_GRID_Y)]
        return (torch.cat([p[0] for p in parts]).reshape(W.shape[:-2]),
                torch.cat([p[1] for p in parts]).reshape(W.shape[:-2] + (n,)))
    v = v.reshape(b, n).clone()
    sigma = v.new_zeros(b)
    acc = torch.zeros_like(v)
    usq = torch.zeros_like(sigma)
    BN = min(triton.next_power_of_2(n), NMAX)
    per_matrix = triton.cdiv(2 * num_sms(W.device), b)  # about two programs per SM in all
    for _ in range(iters):
        sweep_kernel[lambda meta: (min(triton.cdiv(m, meta["TILE"] // BN), per_matrix), b)](
            W3, v, acc, usq, m, n, *W3.stride(), ONE_PASS=BN >= n, BN=BN)
        _finish_kernel[(b,)](v, acc, usq, sigma, n, BN=min(BN, 1024))
    return sigma.reshape(W.shape[:-2]), v.reshape(W.shape[:-2] + (n,))

"""Zero and tiny lines on every fused route: ``ops.fused_update`` for each fused LMO and flag, on each
CPU backend (and each GPU one where there is a GPU) and dtype, against the oracle (tests/oracle.py)
under the tolerance rule, line by line.

A zero line must take no step (the 1e-8 keeps 0 / 0 away); on a tiny line (entries 1e-9 down to
1e-30) the 1e-8 is as large as, or dominates, the line's norm, so the LMO is g / (alpha ||g|| + 1e-8)
only where the epsilon sits exactly there. The params start at 0, so the step shows -lr·scale·lmo(d)
itself. The distributed reduce route runs the same lines in test_distributed.py (these helpers).
"""
from __future__ import annotations

import pytest
import torch

import disco_kernels as dk
import oracle
from tolerances import assert_close, plain_dtype

LR, SCALE = 0.1, 2.0
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (momentum, light) per dtype: each LMO and backend sees the no-buffer, momentum-buffer and ScionLight paths
MODES = {torch.float32: (1.0, False), torch.bfloat16: (0.5, False), torch.float16: (0.5, True),
         torch.float64: (0.5, False)}
CASES = ([("Sign", {"normalized": n}) for n in (True, False)]
         + [(lmo, {"normalized": n, "transpose": t}) for lmo in ("RowNorm", "ColNorm") for n in (True, False)
            for t in (False, True)]
         + [("BiasRMS", {})])
# (device, backend): every CPU backend (Triton interpreted); on a GPU every backend there (not run without one)
ROUTES = ([("cpu", b) for b in dk.available_backends("cpu")]
          + [pytest.param("cuda", b, marks=pytest.mark.gpu)
             for b in (dk.available_backends("cuda") if torch.cuda.is_available() else ["torch", "triton", "cuda"])])
# 2-D: rows past one Triton tile (8 interpreted) and wider than a register row (32 interpreted: the two-sweep
# row kernel), and a small one; BiasRMS: 1-D and 0-D tensors, each one line
SHAPES_2D = [(11, 36), (5, 7)]


def case_id(case):
    lmo, kw = case
    return "-".join([lmo] + [k for k, v in kw.items() if v] + [f"not_{k}" for k, v in kw.items() if not v])


def line_dim(lmo: str, kw: dict) -> int | None:
    """The dim a 2-D tensor's LMO sums over (a line runs along it); None for Sign (elementwise)."""
    if lmo == "RowNorm":
        return 0 if kw.get("transpose") else 1
    if lmo == "ColNorm":
        return 1 if kw.get("transpose") else 0
    return 0 if lmo == "BiasRMS" else None


def tiny(n: int) -> torch.Tensor:
    """n entries from 1e-9 down to 1e-30, alternating signs (fp64)."""
    return torch.logspace(-9, -30, n, dtype=torch.float64) * (-1.0) ** torch.arange(n)


def lined(shape, dim, gen) -> torch.Tensor:
    """An fp64 gradient of ``shape`` whose lines (along ``dim``; rows for None) are: 0 all zero, 1 tiny,
    2 zero but for one tiny last entry (on the last row shard for column lines), the others Gaussian."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    h = g.T if dim == 0 else g  # rows of h are the lines (a view)
    for i, line in enumerate([torch.zeros(h.size(1)), tiny(h.size(1)), torch.zeros(h.size(1))][:h.size(0)]):
        h[i] = line
    if h.size(0) > 2:
        h[2, -1] = 1e-9
    return g


def lined_biases(gen) -> list[torch.Tensor]:
    """1-D and 0-D BiasRMS gradients, each one line: zero, tiny, one tiny last entry, Gaussian."""
    last = torch.zeros(7, dtype=torch.float64)
    last[-1] = 1e-9
    return [torch.zeros(7, dtype=torch.float64), tiny(36), last, torch.randn(36, generator=gen, dtype=torch.float64),
            torch.zeros((), dtype=torch.float64), torch.tensor(-3e-20, dtype=torch.float64),
            torch.randn((), generator=gen, dtype=torch.float64)]


def lines(t: torch.Tensor, dim):
    """(index, line) of t: the lines along ``dim`` of a 2-D t (rows for None), else t itself."""
    if t.dim() < 2:
        return [(None, t)]
    h = t.T if dim == 0 else t
    return list(enumerate(h))


def assert_lines_close(got, exact, plain, dtype, dim, what):
    """The rule on each line. A line whose exact answer is all zero must come out exactly zero: no
    tolerance applies there (and none could: plain fp16 takes 0 / 0 where 1e-8 rounds to 0)."""
    for (i, g), (_, e), (_, p) in zip(lines(got, dim), lines(exact, dim), lines(plain, dim)):
        if not e.any():
            assert torch.equal(g, torch.zeros_like(g)), f"{what}, line {i}: a zero line moved: {g.tolist()}"
        else:
            assert_close(g, e, p, dtype, what=f"{what}, line {i}")


def oracle_step(p, g, lmo, kw, momentum, light, dtype=None, lr=LR, scale=SCALE):
    """The oracle's one step from zero buffers: (param, buffer or carried grad after the step), computed
    in ``dtype`` (default the inputs')."""
    p, g = (p, g) if dtype is None else (p.to(dtype), g.to(dtype))
    group = dict(lr=lr, momentum=momentum, scale=scale, norm=lmo, norm_kwargs=kw)
    new_p = oracle.scion_run([p], [[g]], [group], light=light)[0]
    if light:
        return new_p, g * (1 - momentum)
    return new_p, torch.zeros_like(g) * (1 - momentum) + g * momentum


@pytest.mark.parametrize("device,backend", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_update_zero_and_tiny_lines(case, dtype, device, backend):
    lmo, kw = case
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernel takes float32, bfloat16 and float16")
    momentum, light = MODES[dtype]
    gen = torch.Generator().manual_seed(7)
    dim = line_dim(lmo, kw)
    full = lined_biases(gen) if lmo == "BiasRMS" else [lined(s, dim, gen) for s in SHAPES_2D]
    grads = [g.to(device, dtype) for g in full]  # fp16 flushes the tiny entries to 0: zero lines there
    params = [torch.zeros_like(g) for g in grads]
    bufs = [torch.zeros_like(g) for g in grads] if momentum != 1 and not light else None
    flags = {"normalized": kw.get("normalized", True), "transpose": kw.get("transpose", False)}
    dk.ops.fused_update(params, grads, bufs, lmo=lmo, lr=LR, momentum=momentum, scale=SCALE, light=light,
                        backend=backend, **flags)
    params, grads, bufs = ([t.cpu() for t in ts] if ts is not None else None for ts in (params, grads, bufs))
    for k, g in enumerate(full):
        g_d = g.to(dtype)
        exact_p, exact_b = oracle_step(torch.zeros_like(g_d).double(), g_d.double(), lmo, kw, momentum, light)
        plain_p, plain_b = oracle_step(torch.zeros_like(g_d), g_d, lmo, kw, momentum, light, plain_dtype(dtype))
        what = f"{lmo} {kw} {device} {backend} {dtype} tensor {k} {tuple(g.shape)}"
        assert params[k].dtype == dtype
        assert_lines_close(params[k], exact_p, plain_p, dtype, dim, what + " param")
        if light:
            assert_lines_close(grads[k], exact_b, plain_b, dtype, dim, what + " carried grad")
        elif bufs is not None:
            assert_lines_close(bufs[k], exact_b, plain_b, dtype, dim, what + " buffer")
        else:
            assert torch.equal(grads[k], g_d)  # momentum 1: the gradient is only read


def test_lines_are_degenerate():
    """The tiny lines are ones the epsilon governs: 1e-8 is at least a third of alpha ||line|| + 1e-8 for
    every line-norm LMO (so leaving it out, or moving it, takes the answer far past the rule)."""
    for lmo, kw in CASES[2:-1]:
        for shape in SHAPES_2D:
            g = lined(shape, line_dim(lmo, kw), torch.Generator().manual_seed(7))
            u = oracle.lmo(lmo, g, **kw)
            line = lines(g, line_dim(lmo, kw))[1][1]
            ratio = (line / lines(u, line_dim(lmo, kw))[1][1])[0].item()  # alpha ||line|| + 1e-8
            assert 1e-8 <= ratio <= 3e-8, (lmo, kw, shape, ratio)

"""CUDA kernels on a GPU vs the independent oracle (tests/oracle.py) under the tolerance rule
(tests/tolerances.py): odd shapes, batches, unaligned (offset) and non-contiguous storage, bf16/fp16/fp32,
>2^31 elements (``huge``). ``exact`` is the oracle in fp64 and ``plain`` the oracle in the storage (or
iteration) dtype, both from the same rounded inputs and on CPU copies; the fused-update helpers (and why
single-entry tensors are measured together, and Sign ties untied) are in test_cuda_build.py.
Run under compute-sanitizer with scripts/cuda_sanitizer.sh (see csrc/README.md)."""
import importlib

import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend
import oracle
from test_cuda_build import TINY, check_update, oracle_lmo, oracle_update, untie
from tolerances import assert_close, rel_err

fu_mod = importlib.import_module("disco_kernels.ops.fused_update")

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _needs_extension():
    if _backend.cuda_extension() is None:
        pytest.fail("a GPU run needs disco_kernels._C: install with nvcc available")


def offset(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose storage starts one element past a 16-byte boundary (scalar-load path)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view(t.shape).copy_(t)


# ---------------------------------------------------------------- fused_update

UPDATE_CASES = [  # lmo, normalized, transpose, shape
    ("Sign", True, False, (7, 129)), ("Sign", True, False, (1, 1)), ("Sign", False, False, (40000,)),
    ("RowNorm", True, False, (7, 129)), ("RowNorm", True, False, (129, 7)), ("RowNorm", False, False, (3, 64, 1024)),
    ("RowNorm", True, True, (129, 7)), ("RowNorm", True, True, (64, 40)),
    ("ColNorm", False, False, (129, 7)), ("ColNorm", True, False, (7, 129)), ("ColNorm", True, False, (300, 256)),
    ("ColNorm", False, True, (1000, 64)), ("ColNorm", True, True, (7, 129)), ("ColNorm", True, False, (2, 9, 16)),
    ("BiasRMS", True, False, (129,)), ("BiasRMS", True, False, (6, 10)), ("BiasRMS", True, False, (3, 4, 16)),
]
STATES = [  # momentum, use_buf, light, unconstrained
    (1.0, False, False, False), (0.1, True, False, False), (0.1, True, False, True), (0.3, False, True, False)]


def make_case(shape, dtype, lmo, normalized, transpose, lr, scale, layout="contiguous"):
    """p, g, buf with the update as large as p itself (so a wrong step factor shows in any dtype)."""
    g = torch.randn(shape, dtype=torch.float64)
    u = oracle_lmo(g, lmo, normalized, transpose)
    p = torch.randn(shape, dtype=torch.float64) * (lr * scale * u.abs().mean().clamp_min(1e-30))
    buf = torch.randn(shape, dtype=torch.float64)
    cast = lambda t: t.to(device="cuda", dtype=dtype)
    p, g, buf = cast(p), cast(g), cast(buf)
    if layout == "offset":
        p, g, buf = offset(p), offset(g), offset(buf)
    elif layout == "noncontiguous" and g.dim() >= 2:
        p, g, buf = (t.mT.contiguous().mT for t in (p, g, buf))
    return p, g, buf


def run_update(cases, *, lmo, normalized=True, transpose=False, lr, momentum, scale, unconstrained=False,
               light=False, use_buf):
    """One CUDA fused_update over the (p, g, buf) ``cases`` (bufs passed when ``use_buf``), checked by
    check_update (Sign's exact ties in buf untied first)."""
    ps, gs, bs = (list(x) for x in zip(*cases))
    if lmo == "Sign" and use_buf and not light:
        untie(gs, bs, momentum)
    before = [(p.clone(), g.clone(), b.clone() if use_buf else None) for p, g, b in zip(ps, gs, bs)]
    dk.ops.fused_update(ps, gs, bs if use_buf else None, lmo=lmo, lr=lr, momentum=momentum, scale=scale,
                        unconstrained=unconstrained, normalized=normalized, transpose=transpose, light=light,
                        backend="cuda")
    check_update(before, [(p, g, b if use_buf else None) for p, g, b in zip(ps, gs, bs)], lmo=lmo,
                 normalized=normalized, transpose=transpose, lr=lr, momentum=momentum, scale=scale,
                 unconstrained=unconstrained, light=light)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lmo,normalized,transpose,shape", UPDATE_CASES)
@pytest.mark.parametrize("momentum,use_buf,light,unconstrained", STATES)
def test_fused_update_vs_fp64(dtype, lmo, normalized, transpose, shape, momentum, use_buf, light, unconstrained):
    """One tensor per call (a single-entry shape: TINY of them in one call, measured together)."""
    lr, scale = 0.2, 1.5
    n = TINY if torch.Size(shape).numel() == 1 else 1
    cases = [make_case(shape, dtype, lmo, normalized, transpose, lr, scale) for _ in range(n)]
    run_update(cases, lmo=lmo, normalized=normalized, transpose=transpose, lr=lr, momentum=momentum, scale=scale,
               unconstrained=unconstrained, light=light, use_buf=use_buf)


@pytest.mark.parametrize("layout", ["offset", "noncontiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lmo,normalized,transpose", [("Sign", True, False), ("RowNorm", True, False),
                                                      ("RowNorm", True, True), ("ColNorm", True, False),
                                                      ("ColNorm", True, True), ("BiasRMS", True, False)])
@pytest.mark.parametrize("momentum,use_buf,light", [(0.1, True, False), (0.3, False, True)])
def test_fused_update_layouts(layout, dtype, lmo, normalized, transpose, momentum, use_buf, light):
    """One group of tensors, each one element past a 16-byte boundary or transposed in memory
    (p, g and buf; the mutated ones are written back)."""
    lr, scale = 0.2, 1.5
    shapes = [(64, 128), (7, 129), (129, 8), (2, 9, 16)] + [(1, 1)] * TINY
    cases = [make_case(s, dtype, lmo, normalized, transpose, lr, scale, layout) for s in shapes]
    run_update(cases, lmo=lmo, normalized=normalized, transpose=transpose, lr=lr, momentum=momentum, scale=scale,
               light=light, use_buf=use_buf)


def test_fused_update_mixed_dtypes():
    """A group with tensors of every dtype: one launch per dtype, each tensor updated once."""
    lr, scale = 0.2, 1.5
    cases = [make_case(s, dt, "ColNorm", True, False, lr, scale) for s in ((33, 20), (8, 64)) for dt in DTYPES]
    run_update(cases, lmo="ColNorm", lr=lr, momentum=0.1, scale=scale, use_buf=True)


def test_fused_update_many_tensors_and_empty():
    """More tensors than one launch's table (128), empty tensors among them, one dtype per launch."""
    lr, scale = 0.1, 2.0
    cases = [make_case((3 + i % 5, 8 + i % 17), torch.bfloat16, "RowNorm", True, False, lr, scale) for i in range(300)]
    cases.insert(5, tuple(torch.empty(0, 7, dtype=torch.bfloat16, device="cuda") for _ in range(3)))
    run_update(cases, lmo="RowNorm", lr=lr, momentum=0.5, scale=scale, use_buf=True)


def test_fused_update_auto_picks_cuda():
    """backend="auto" takes the CUDA kernel for a CUDA group it can run, with its result; a group it cannot
    run, forced, is a ValueError."""
    p, g, buf = make_case((256, 768), torch.bfloat16, "ColNorm", True, True, 0.1, 1.0)
    assert _backend.resolve("auto", p.device, "fused_update", fu_mod.KERNELS) == "cuda"
    before = [(p.clone(), g.clone(), buf.clone())]
    dk.ops.fused_update([p], [g], [buf], lmo="ColNorm", lr=0.1, momentum=0.2, transpose=True)
    check_update(before, [(p, g, buf)], lmo="ColNorm", normalized=True, transpose=True, lr=0.1, momentum=0.2,
                 scale=1.0, unconstrained=False, light=False)
    with pytest.raises(ValueError, match="must match"):
        dk.ops.fused_update([p.float()], [g], None, lmo="Sign", lr=0.1, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lmo,transpose,line", [("RowNorm", False, "row"), ("ColNorm", True, "row"),
                                                ("ColNorm", False, "col"), ("RowNorm", True, "col"),
                                                ("BiasRMS", False, "col")])
def test_fused_update_nonfinite_stays_in_its_line(dtype, lmo, transpose, line):
    """NaN in g poisons its own line (row-mode warp or column-mode strip) and nothing else; inf
    gives NaN at its own entry and a zero update on the rest of its line, as the oracle."""
    step = dict(lmo=lmo, normalized=True, transpose=transpose, lr=0.1, momentum=1.0, scale=1.0, unconstrained=False,
                light=False)
    for bad in (float("nan"), float("inf")):
        p, g, _ = make_case((40, 64), dtype, lmo, True, transpose, 0.1, 1.0)
        g[1, 3] = bad
        p0, g0 = p.cpu().clone(), g.cpu().clone()
        dk.ops.fused_update([p], [g], None, lmo=lmo, lr=0.1, transpose=transpose, backend="cuda")
        want = oracle_update(p0, g0, None, **step, dtype=torch.float64)[0]
        plain = oracle_update(p0, g0, None, **step, dtype=dtype)[0]
        assert torch.equal(p.isnan().cpu(), want.isnan())
        assert want.isnan()[1, 3] and (want.isnan().sum() == (1 if bad > 0 else 64 if line == "row" else 40))
        ok = want.isfinite()
        assert_close(p.cpu()[ok], want[ok], plain[ok], dtype, what=f"the finite entries ({bad} in g)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
def test_fused_update_zero_grad_only_decays(dtype, lmo):
    """g = 0: every LMO gives 0 (d / (0 + 1e-8) = 0 for the line LMOs), so p' = (1 - lr) p once rounded.
    plain is that decay alone: plain fp16 cannot take the line LMOs of 0 (its 1e-8 rounds to 0: 0 / 0)."""
    p = torch.randn(33, 72, device="cuda").to(dtype)
    p0 = p.cpu().clone()
    dk.ops.fused_update([p], [torch.zeros_like(p)], None, lmo=lmo, lr=0.1, backend="cuda")
    exact = oracle_update(p0, torch.zeros_like(p0), None, lmo=lmo, normalized=True, transpose=False, lr=0.1,
                          momentum=1.0, scale=1.0, unconstrained=False, light=False, dtype=torch.float64)[0]
    assert_close(p.cpu(), exact, p0 * (1 - 0.1), what="p after a zero gradient")


@pytest.mark.parametrize("lmo", ["RowNorm", "ColNorm", "BiasRMS"])
@pytest.mark.parametrize("transpose", [False, True])
def test_fused_update_tiny_grads_see_the_eps(lmo, transpose):
    """Line norms of about 1e-8, the size of the LMO's eps: d / (||d|| f + 1e-8) must add exactly that eps,
    which at ordinary sizes is invisible (fp32; see also test_lines.py)."""
    if lmo == "BiasRMS" and transpose:
        pytest.skip("BiasRMS has no transpose")
    lr, scale = 0.2, 1.5
    shapes = [(129,), (7,)] if lmo == "BiasRMS" else [(7, 129), (129, 7), (40, 33)]
    cases = []
    for s in shapes:
        p, g, buf = make_case(s, torch.float32, lmo, True, transpose, lr, scale)
        cases.append((p, g * 1e-9, buf * 1e-9))
    run_update(cases, lmo=lmo, transpose=transpose, lr=lr, momentum=0.1, scale=scale, use_buf=True)


def needs_free_gpu_memory(gib):
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


HUGE_ROWS, HUGE_COLS = 2**31 // 4096 + 3, 4096  # 2^31 + 3 * 4096 elements


@pytest.mark.slow
@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm"])
def test_fused_update_huge(lmo):
    """Past 2^31 elements (64-bit offsets): g = 1 except its last row (-2), p = 0, so every element of p'
    is one of two values (a first row's, the last row's), written once (a second write would scale it by
    1 - lr). The lines are independent, so the oracle's step on a stand-in with the same lines gives both:
    for Sign and RowNorm the (2, C) matrix of a first and the last row; for ColNorm one (R, 1) column, not
    normalized, with scale / C: the same arithmetic in bf16, as C is a power of two (dividing by it commutes
    with rounding) and 1e-8 is below bf16's resolution of the column's rms (in fp64 the stand-in's eps
    weighs C times more: a 1e-8 relative change, invisible against bf16's bound)."""
    needs_free_gpu_memory(12)
    lr, scale = 0.5, 1.0
    R, C = HUGE_ROWS, HUGE_COLS
    p = torch.zeros(R, C, dtype=torch.bfloat16, device="cuda")
    g = torch.ones_like(p)
    g[-1] = -2
    dk.ops.fused_update([p], [g], None, lmo=lmo, lr=lr, scale=scale, backend="cuda")
    assert (p[:-1] == p[0, 0]).all() and (p[-1] == p[-1, 0]).all()
    step = dict(lmo=lmo, normalized=True, transpose=False, lr=lr, momentum=1.0, scale=scale, unconstrained=False,
                light=False)
    if lmo == "ColNorm":
        assert C & (C - 1) == 0
        line = torch.ones(R, 1, dtype=torch.float64)
        line[-1] = -2
        step.update(normalized=False, scale=scale / C)
        pick = lambda t: t[[0, -1], 0]  # noqa: E731
    else:
        line = torch.tensor([[1.0] * C, [-2.0] * C], dtype=torch.float64)
        pick = lambda t: t[:, 0]  # noqa: E731
    exact, plain = (pick(oracle_update(torch.zeros_like(line), line, None, **step, dtype=d)[0])
                    for d in (torch.float64, torch.bfloat16))
    assert_close(torch.stack([p[0, 0], p[-1, 0]]).cpu(), exact, plain, what="p' of the first rows and the last")


# ---------------------------------------------------------------- power_iteration

def start(W):
    """The documented start vector rounded to fp32, one per matrix of W."""
    n = W.size(-1)
    return oracle.start_vector(n).float().expand(*W.shape[:-2], n).contiguous().to(W.device)


def check_power_iteration(W, v0, iters, sigma, v):
    """(sigma, v) from ``iters`` iterations from v0 within the rule: the kernels read W exactly and compute
    in fp32, so plain is the oracle's iteration in fp32 on the same W and start."""
    W, v0 = W.cpu(), v0.cpu()
    (s64, v64), (s32, v32) = (oracle.power_iteration(W.to(d), v0.to(d), iters) for d in (torch.float64, torch.float32))
    assert_close(sigma.cpu(), s64, s32, what=f"sigma of {tuple(W.shape)} {W.dtype}")
    assert_close(v.cpu(), v64, v32, what=f"v of {tuple(W.shape)} {W.dtype}")


@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 300, 1000), (1, 20, 16384),
                                   (5, 64, 4000), (3, 50, 5001), (2, 33, 16383)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "noncontiguous"])
def test_power_iteration_vs_fp64(shape, dtype, layout):
    W = torch.randn(shape, dtype=torch.float64).to(device="cuda", dtype=dtype)
    if layout == "offset":
        W = offset(W)
    elif layout == "noncontiguous":
        W = W.mT.contiguous().mT
    sigma, v = dk.ops.power_iteration(W, start(W), iters=4, backend="cuda")
    assert sigma.dtype == torch.float32 and sigma.shape == shape[:-2] and v.shape == shape[:-2] + shape[-1:]
    check_power_iteration(W, start(W), 4, sigma, v)


def test_power_iteration_converges_and_warm_starts():
    W = torch.randn(3, 40, 60, device="cuda")
    sigma, v = dk.ops.power_iteration(W, iters=200, backend="cuda")
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    sigma2, _ = dk.ops.power_iteration(W, v, iters=1, backend="cuda")
    assert rel_err(sigma, exact) < 1e-3 and rel_err(sigma2, exact) < 1e-3
    zero_sigma, zero_v = dk.ops.power_iteration(torch.zeros(2, 5, 6, device="cuda"), v[:2, :6].contiguous(), iters=2,
                                                backend="cuda")
    assert (zero_sigma == 0).all() and torch.equal(zero_v, v[:2, :6])


def test_power_iteration_limits():
    with pytest.raises(ValueError, match="n <= 16384"):
        dk.ops.power_iteration(torch.randn(2, 16385, device="cuda"), backend="cuda")
    sigma, _ = dk.ops.power_iteration(torch.randn(2, 16385, device="cuda"))  # auto: another backend
    assert sigma.isfinite()


@pytest.mark.slow
def test_power_iteration_huge():
    """Past 2^31 elements: W = a 1ᵀ with a = (1, ..., 1, 1000) (last row past 2^31), so one iteration
    from any start with 1ᵀ v > 0 gives sigma = sqrt(n) ||a|| and v = 1 / sqrt(n) exactly; a wrapped offset
    would miss the 1000s. plain is the oracle's fp32 iteration on the same W (on the host, 8 GiB)."""
    needs_free_gpu_memory(6)
    W = torch.ones(1, HUGE_ROWS, HUGE_COLS, dtype=torch.bfloat16, device="cuda")
    W[0, -1] = 1000
    v0 = start(W)
    assert v0.sum() > 0
    sigma, v = dk.ops.power_iteration(W, v0, iters=1, backend="cuda")
    exact_sigma = torch.tensor([(HUGE_COLS * (HUGE_ROWS - 1 + 1000.0 ** 2)) ** 0.5], dtype=torch.float64)
    exact_v = torch.full((1, HUGE_COLS), HUGE_COLS ** -0.5, dtype=torch.float64)
    s32, v32 = oracle.power_iteration(W.cpu().float(), v0.cpu(), 1)
    assert_close(sigma.cpu(), exact_sigma, s32, what="sigma")
    assert_close(v.cpu(), exact_v, v32, what="v")


# ---------------------------------------------------------------- newton_schulz (fused small)

NS_SHAPES = [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 16, 16), (4, 128, 128), (2, 100, 300), (2, 300, 100),
             (3, 48, 80), (2, 2, 5, 9)]


def check_newton_schulz(out, G, steps=5, coefficients="jordan", dtype=torch.bfloat16):
    """``out`` (NS of G in ``dtype``) within the rule: exact the oracle's fp64 iteration of G, plain the
    oracle iterating in ``dtype`` (on CPU)."""
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    G = G.cpu()
    assert_close(out.cpu(), oracle.newton_schulz(G.double(), steps, coefficients),
                 oracle.newton_schulz(G, steps, coefficients, dtype), dtype, what=f"NS of {tuple(G.shape)} {G.dtype}")


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                            (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2)]])
def test_newton_schulz_small_vs_fp64(shape, in_dtype, dtype, coefficients):
    """Error vs the fp64 iteration within the rule against the plain iteration in ``dtype``."""
    Gd = torch.randn(shape, dtype=torch.float64).to(in_dtype)
    check_newton_schulz(dk.ops.newton_schulz(Gd.cuda(), 5, coefficients, dtype=dtype, backend="cuda"), Gd, 5,
                        coefficients, dtype)


@pytest.mark.parametrize("layout", ["offset", "noncontiguous"])
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 37, 90), (2, 90, 37)])
def test_newton_schulz_small_layouts(layout, in_dtype, dtype, shape):
    Gd = torch.randn(shape, dtype=torch.float64).to(device="cuda", dtype=in_dtype)
    Gd = offset(Gd) if layout == "offset" else Gd.mT.contiguous().mT
    check_newton_schulz(dk.ops.newton_schulz(Gd, 5, dtype=dtype, backend="cuda"), Gd, dtype=dtype)


@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_newton_schulz_small_norm_eps_of_a_tiny_g(coefficients):
    """||G||_F of 1e-6, the size of the schedule's eps (1e-7 jordan, 1e-6 polar_express): X0 = G / (mult ||G||_F
    + eps) must take the schedule's eps, which at ordinary sizes is invisible (fp32 G, bf16 iteration)."""
    G = torch.randn(2, 20, 33, device="cuda")
    G = G * (1e-6 / G.norm(dim=(-2, -1), keepdim=True))
    check_newton_schulz(dk.ops.newton_schulz(G, 5, coefficients, dtype=torch.bfloat16, backend="cuda"), G, 5,
                        coefficients)


def test_newton_schulz_small_special_values():
    assert dk.ops.newton_schulz(torch.zeros(2, 6, 9, device="cuda", dtype=torch.bfloat16), backend="cuda").abs().max() == 0
    G = torch.randn(5, 8, device="cuda", dtype=torch.bfloat16)
    G[1, 2] = float("nan")
    assert torch.isnan(dk.ops.newton_schulz(G, backend="cuda")).all()
    G = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    check_newton_schulz(dk.ops.newton_schulz(G, steps=0, backend="cuda"), G, steps=0)  # X0 only


@pytest.mark.parametrize("s", [17, 65, 128])
def test_newton_schulz_small_largest_fitting(s):
    """The widest matrix the device's shared memory takes (odd width), wide and tall."""
    ext = _backend.cuda_extension()
    l = max(x for x in range(s, 4097) if ext.newton_schulz_small_fits(s, x, torch.cuda.current_device()))
    l -= (l + 1) % 2
    for shape in ((2, s, l), (2, l, s)):
        G = torch.randn(shape, dtype=torch.float64).to(torch.bfloat16)
        check_newton_schulz(dk.ops.newton_schulz(G.cuda(), 5, backend="cuda"), G)


@pytest.mark.slow
def test_newton_schulz_small_huge():
    """A batch of more than 2^31 elements: the last matrix is read and written at 64-bit offsets."""
    needs_free_gpu_memory(12)
    one = torch.randn(1, 128, 512, device="cuda", dtype=torch.bfloat16)
    G = one.expand(2**31 // (128 * 512) + 1, 128, 512).contiguous()
    G[-1] = -one[0]
    out = dk.ops.newton_schulz(G, 5, backend="cuda")
    first = dk.ops.newton_schulz(one, 5, backend="cuda")[0]
    assert torch.equal(out[0], first) and torch.equal(out[-2], first) and torch.equal(out[-1], -first)


def test_newton_schulz_dispatch_by_shape():
    big = torch.randn(129, 200, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"min\(m, n\) <= 128"):
        dk.ops.newton_schulz(big, backend="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        dk.ops.newton_schulz(torch.randn(128, 4000, device="cuda", dtype=torch.bfloat16), backend="cuda")
    # auto takes another backend for big or fp32 problems, and still gets them right
    for G, dtype in ((big, torch.bfloat16), (torch.randn(64, 64, device="cuda"), torch.float32)):
        check_newton_schulz(dk.ops.newton_schulz(G, dtype=dtype), G, dtype=dtype)


def test_kernels_run_on_the_current_stream():
    s = torch.cuda.Stream()
    G = torch.randn(64, 32, 32, device="cuda", dtype=torch.bfloat16)
    s.wait_stream(torch.cuda.current_stream())  # G is written on the default stream
    v0 = start(G)
    with torch.cuda.stream(s):
        out = dk.ops.newton_schulz(G, backend="cuda")
        sigma, v = dk.ops.power_iteration(G.float(), v0, iters=3, backend="cuda")
    s.synchronize()
    check_newton_schulz(out, G)
    check_power_iteration(G.float(), v0, 3, sigma, v)

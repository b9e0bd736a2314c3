"""CUDA kernels on a GPU vs the fp64 reference: odd shapes, batches, unaligned (offset) and
non-contiguous storage, bf16/fp16/fp32, >2^31 elements (``huge``). Run under compute-sanitizer
with scripts/cuda_sanitizer.sh (see csrc/README.md)."""
import importlib

import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend
from disco_kernels import reference as ref
from tolerances import elementwise_tol, reduction_tol, rel_err, unit

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


def reference_update(p, g, buf, lmo, normalized, transpose, lr, momentum, scale, unconstrained, light):
    """fp64 reference of one step from the same (rounded) inputs: (p, buf, g)."""
    p, g = p.double(), g.double()
    buf = None if buf is None else buf.double()
    fn = fu_mod.lmo_fn(lmo, normalized, transpose)
    use_buf = buf is not None and not light
    p_new, buf_new = ref.scion_update(p, g, buf if use_buf else None, fn, lr, momentum if use_buf else 1.0, scale,
                                      unconstrained)
    return p_new, buf_new, (g * (1 - momentum) if light and momentum != 1 else g)


def make_case(shape, dtype, lmo, normalized, transpose, lr, scale, layout="contiguous"):
    """p, g, buf with the update as large as p itself (so a wrong step factor shows in any dtype)."""
    g = torch.randn(shape, dtype=torch.float64)
    u = fu_mod.lmo_fn(lmo, normalized, transpose)(g)
    p = torch.randn(shape, dtype=torch.float64) * (lr * scale * u.abs().mean().clamp_min(1e-30))
    buf = torch.randn(shape, dtype=torch.float64)
    cast = lambda t: t.to(device="cuda", dtype=dtype)
    p, g, buf = cast(p), cast(g), cast(buf)
    if layout == "offset":
        p, g, buf = offset(p), offset(g), offset(buf)
    elif layout == "noncontiguous" and g.dim() >= 2:
        p, g, buf = (t.mT.contiguous().mT for t in (p, g, buf))
    return p, g, buf


def check_update(before, after, case, dtype):
    p0, g0, b0 = before
    p1, g1, b1 = after
    lmo, normalized, transpose, lr, momentum, scale, unconstrained, light, use_buf = case
    p_ref, b_ref, g_ref = reference_update(p0, g0, b0 if use_buf else None, lmo, normalized, transpose, lr, momentum,
                                           scale, unconstrained, light)
    tol = reduction_tol(dtype, max(p0.shape, default=1)) + 4 * unit(dtype)  # + the rounding of the momentum buffer
    assert rel_err(p1, p_ref) < tol
    if use_buf and not light:
        assert rel_err(b1, b_ref) < elementwise_tol(dtype, 2)
    else:
        assert torch.equal(b1, b0)  # untouched
    assert rel_err(g1, g_ref) < elementwise_tol(dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lmo,normalized,transpose,shape", UPDATE_CASES)
@pytest.mark.parametrize("momentum,use_buf,light,unconstrained", STATES)
def test_fused_update_vs_fp64(dtype, lmo, normalized, transpose, shape, momentum, use_buf, light, unconstrained):
    lr, scale = 0.2, 1.5
    p, g, buf = make_case(shape, dtype, lmo, normalized, transpose, lr, scale)
    before = (p.clone(), g.clone(), buf.clone())
    dk.ops.fused_update([p], [g], [buf] if use_buf else None, lmo=lmo, lr=lr, momentum=momentum, scale=scale,
                        unconstrained=unconstrained, normalized=normalized, transpose=transpose, light=light,
                        backend="cuda")
    check_update(before, (p, g, buf), (lmo, normalized, transpose, lr, momentum, scale, unconstrained, light, use_buf),
                 dtype)


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
    shapes = [(64, 128), (7, 129), (129, 8), (2, 9, 16), (1, 1)]
    cases = [make_case(s, dtype, lmo, normalized, transpose, lr, scale, layout) for s in shapes]
    ps, gs, bs = (list(x) for x in zip(*cases))
    before = [(p.clone(), g.clone(), b.clone()) for p, g, b in cases]
    dk.ops.fused_update(ps, gs, bs if use_buf else None, lmo=lmo, lr=lr, momentum=momentum, scale=scale,
                        normalized=normalized, transpose=transpose, light=light, backend="cuda")
    for b4, p, g, b in zip(before, ps, gs, bs):
        check_update(b4, (p, g, b), (lmo, normalized, transpose, lr, momentum, scale, False, light, use_buf), dtype)


def test_fused_update_mixed_dtypes():
    """A group with tensors of every dtype: one launch per dtype, each tensor updated once."""
    lr, scale = 0.2, 1.5
    cases = [(make_case(s, dt, "ColNorm", True, False, lr, scale), dt) for s in ((33, 20), (8, 64)) for dt in DTYPES]
    ps, gs, bs = (list(x) for x in zip(*(c for c, _ in cases)))
    before = [tuple(t.clone() for t in c) for c, _ in cases]
    dk.ops.fused_update(ps, gs, bs, lmo="ColNorm", lr=lr, momentum=0.1, scale=scale, backend="cuda")
    for b4, p, g, b, (_, dt) in zip(before, ps, gs, bs, cases):
        check_update(b4, (p, g, b), ("ColNorm", True, False, lr, 0.1, scale, False, False, True), dt)


def test_fused_update_many_tensors_and_empty():
    """More tensors than one launch's table (128), empty tensors among them, one dtype per launch."""
    lr, scale = 0.1, 2.0
    cases = [make_case((3 + i % 5, 8 + i % 17), torch.bfloat16, "RowNorm", True, False, lr, scale) for i in range(300)]
    cases.insert(5, tuple(torch.empty(0, 7, dtype=torch.bfloat16, device="cuda") for _ in range(3)))
    ps, gs, bs = (list(x) for x in zip(*cases))
    before = [(p.clone(), g.clone(), b.clone()) for p, g, b in cases]
    dk.ops.fused_update(ps, gs, bs, lmo="RowNorm", lr=lr, momentum=0.5, scale=scale, backend="cuda")
    for b4, p, g, b in zip(before, ps, gs, bs):
        if p.numel():
            check_update(b4, (p, g, b), ("RowNorm", True, False, lr, 0.5, scale, False, False, True), torch.bfloat16)


def test_fused_update_auto_picks_cuda_and_matches_torch():
    p, g, buf = make_case((256, 768), torch.bfloat16, "ColNorm", True, True, 0.1, 1.0)
    p2, g2, b2 = p.clone(), g.clone(), buf.clone()
    assert _backend.resolve("auto", p.device, "fused_update", fu_mod.KERNELS) == "cuda"
    dk.ops.fused_update([p], [g], [buf], lmo="ColNorm", lr=0.1, momentum=0.2, transpose=True)
    dk.ops.fused_update([p2], [g2], [b2], lmo="ColNorm", lr=0.1, momentum=0.2, transpose=True, backend="torch")
    assert rel_err(p, p2) < 4 * elementwise_tol(torch.bfloat16, 4)
    with pytest.raises(ValueError, match="must match"):
        dk.ops.fused_update([p.float()], [g], None, lmo="Sign", lr=0.1, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lmo,transpose,line", [("RowNorm", False, "row"), ("ColNorm", True, "row"),
                                                ("ColNorm", False, "col"), ("RowNorm", True, "col"),
                                                ("BiasRMS", False, "col")])
def test_fused_update_nonfinite_stays_in_its_line(dtype, lmo, transpose, line):
    """NaN in g poisons its own line (row-mode warp or column-mode strip) and nothing else; inf
    gives NaN at its own entry and a zero update on the rest of its line, as the reference."""
    for bad in (float("nan"), float("inf")):
        p, g, _ = make_case((40, 64), dtype, lmo, True, transpose, 0.1, 1.0)
        g[1, 3] = bad
        p0, g0 = p.clone(), g.clone()
        dk.ops.fused_update([p], [g], None, lmo=lmo, lr=0.1, transpose=transpose, backend="cuda")
        want = ref.scion_update(p0.double(), g0.double(), None, fu_mod.lmo_fn(lmo, True, transpose), 0.1, 1.0, 1.0,
                                False)[0]
        assert torch.equal(p.isnan(), want.isnan().cuda())
        assert want.isnan()[1, 3] and (want.isnan().sum() == (1 if bad > 0 else 64 if line == "row" else 40))
        ok = want.isfinite().cuda()
        assert rel_err(p[ok], want.cuda()[ok]) < reduction_tol(dtype, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
def test_fused_update_zero_grad_only_decays(dtype, lmo):
    """g = 0: every LMO gives 0 (step = coef / 1e-8 times d = 0), so p' = (1 - lr) p exactly once rounded."""
    p = torch.randn(33, 72, device="cuda").to(dtype)
    want = (p.float() * 0.9).to(dtype)
    dk.ops.fused_update([p], [torch.zeros_like(p)], None, lmo=lmo, lr=0.1, backend="cuda")
    assert rel_err(p, want) <= unit(dtype)


def needs_free_gpu_memory(gib):
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


HUGE_ROWS, HUGE_COLS = 2**31 // 4096 + 3, 4096  # 2^31 + 3 * 4096 elements


@pytest.mark.slow
@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm"])
def test_fused_update_huge(lmo):
    """Past 2^31 elements (64-bit offsets): g = 1 except its last row (-2), p = 0, so every
    element of p' is -step or 2 step, written once (a second write would scale it by 1 - lr)."""
    needs_free_gpu_memory(12)
    lr, scale = 0.5, 1.0
    p = torch.zeros(HUGE_ROWS, HUGE_COLS, dtype=torch.bfloat16, device="cuda")
    g = torch.ones_like(p)
    g[-1] = -2
    dk.ops.fused_update([p], [g], None, lmo=lmo, lr=lr, scale=scale, backend="cuda")
    R, C = HUGE_ROWS, HUGE_COLS
    first, last = {  # p' of the first rows and of the last one, from the reference LMOs
        "Sign": (-lr * scale / C, lr * scale / C),
        "RowNorm": (-lr * scale / C, lr * scale / C),
        "ColNorm": (-lr * scale / (C * (R + 3) ** 0.5 / R ** 0.5), 2 * lr * scale / (C * (R + 3) ** 0.5 / R ** 0.5)),
    }[lmo]
    assert (p[:-1] == p[0, 0]).all() and (p[-1] == p[-1, 0]).all()
    assert abs(p[0, 0].item() / first - 1) <= 2 * unit(torch.bfloat16)
    assert abs(p[-1, 0].item() / last - 1) <= 2 * unit(torch.bfloat16)


# ---------------------------------------------------------------- power_iteration

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
    sigma, v = dk.ops.power_iteration(W, iters=4, backend="cuda")
    sigma_ref, v_ref = ref.power_iteration(W.double(), iters=4)
    assert sigma.dtype == torch.float32 and sigma.shape == shape[:-2] and v.shape == shape[:-2] + shape[-1:]
    tol = elementwise_tol(torch.float32, 4 * shape[-1])
    assert rel_err(sigma, sigma_ref) < tol and rel_err(v, v_ref) < 16 * tol


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
    """Past 2^31 elements: W = a 1ᵀ with a = (1, ..., 1, 1000) (last row past 2^31), so one
    iteration gives sigma = sqrt(n) ||a|| exactly; a wrapped offset would miss the 1000s."""
    needs_free_gpu_memory(6)
    W = torch.ones(1, HUGE_ROWS, HUGE_COLS, dtype=torch.bfloat16, device="cuda")
    W[0, -1] = 1000
    sigma, v = dk.ops.power_iteration(W, iters=1, backend="cuda")
    exact = (HUGE_COLS * (HUGE_ROWS - 1 + 1000.0 ** 2)) ** 0.5
    tol = elementwise_tol(torch.float32, HUGE_ROWS // 64)  # fp32 sums over one of 64 row splits
    assert abs(sigma.item() / exact - 1) < tol
    assert rel_err(v, torch.full_like(v, HUGE_COLS ** -0.5)) < tol


# ---------------------------------------------------------------- newton_schulz (fused small)

NS_SHAPES = [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 16, 16), (4, 128, 128), (2, 100, 300), (2, 300, 100),
             (3, 48, 80), (2, 2, 5, 9)]


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                            (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2)]])
def test_newton_schulz_small_vs_fp64(shape, in_dtype, dtype, coefficients):
    """Error vs the fp64 iteration no worse than the torch reference's own error in that dtype."""
    G = torch.randn(shape, dtype=torch.float64)
    exact = ref.newton_schulz(G, 5, coefficients)
    Gd = G.to(in_dtype)
    out = dk.ops.newton_schulz(Gd.cuda(), 5, coefficients, dtype=dtype, backend="cuda")
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    ref_err = rel_err(ref.newton_schulz(Gd.cuda(), 5, coefficients, dtype=dtype).cpu(), exact)
    assert rel_err(out.cpu(), exact) <= 1.5 * ref_err + 64 * unit(dtype)


@pytest.mark.parametrize("layout", ["offset", "noncontiguous"])
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 37, 90), (2, 90, 37)])
def test_newton_schulz_small_layouts(layout, in_dtype, dtype, shape):
    G = torch.randn(shape, dtype=torch.float64)
    Gd = G.to(device="cuda", dtype=in_dtype)
    Gd = offset(Gd) if layout == "offset" else Gd.mT.contiguous().mT
    out = dk.ops.newton_schulz(Gd, 5, dtype=dtype, backend="cuda")
    exact = ref.newton_schulz(G, 5)
    assert rel_err(out.cpu(), exact) <= 1.5 * rel_err(ref.newton_schulz(Gd, 5, dtype=dtype).cpu(), exact) + 64 * unit(dtype)


def test_newton_schulz_small_special_values():
    assert dk.ops.newton_schulz(torch.zeros(2, 6, 9, device="cuda", dtype=torch.bfloat16), backend="cuda").abs().max() == 0
    G = torch.randn(5, 8, device="cuda", dtype=torch.bfloat16)
    G[1, 2] = float("nan")
    assert torch.isnan(dk.ops.newton_schulz(G, backend="cuda")).all()
    out = dk.ops.newton_schulz(torch.randn(4, 8, device="cuda", dtype=torch.bfloat16), steps=0, backend="cuda")
    assert out.float().norm().item() == pytest.approx(1.0, rel=8 * unit(torch.bfloat16))  # X0 only


@pytest.mark.parametrize("s", [17, 65, 128])
def test_newton_schulz_small_largest_fitting(s):
    """The widest matrix the device's shared memory takes (odd width), wide and tall."""
    ext = _backend.cuda_extension()
    l = max(x for x in range(s, 4097) if ext.newton_schulz_small_fits(s, x, torch.cuda.current_device()))
    l -= (l + 1) % 2
    for shape in ((2, s, l), (2, l, s)):
        G = torch.randn(shape, dtype=torch.float64)
        out = dk.ops.newton_schulz(G.to(device="cuda", dtype=torch.bfloat16), 5, backend="cuda")
        exact = ref.newton_schulz(G, 5)
        ref_err = rel_err(ref.newton_schulz(G.to(device="cuda", dtype=torch.bfloat16), 5).cpu(), exact)
        assert rel_err(out.cpu(), exact) <= 1.5 * ref_err + 64 * unit(torch.bfloat16)


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
        exact = ref.newton_schulz(G.double().cpu())
        ref_err = rel_err(ref.newton_schulz(G, dtype=dtype).cpu(), exact)
        assert rel_err(dk.ops.newton_schulz(G, dtype=dtype).cpu(), exact) <= 1.5 * ref_err + 64 * unit(dtype)


def test_kernels_run_on_the_current_stream():
    s = torch.cuda.Stream()
    G = torch.randn(64, 32, 32, device="cuda", dtype=torch.bfloat16)
    s.wait_stream(torch.cuda.current_stream())  # G is written on the default stream
    with torch.cuda.stream(s):
        out = dk.ops.newton_schulz(G, backend="cuda")
        sigma, _ = dk.ops.power_iteration(G.float(), iters=3, backend="cuda")
    s.synchronize()
    exact = ref.newton_schulz(G.double().cpu())
    assert rel_err(out.cpu(), exact) <= 1.5 * rel_err(ref.newton_schulz(G).cpu(), exact) + 64 * unit(torch.bfloat16)
    assert rel_err(sigma.cpu(), ref.power_iteration(G.double().cpu(), iters=3)[0]) < 1e-5

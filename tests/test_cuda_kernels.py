"""CUDA kernels on a GPU vs the fp64 reference: odd shapes, batches, unaligned (offset) and
non-contiguous storage, bf16/fp16/fp32. Run under compute-sanitizer as csrc/README.md shows."""
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
        g = g.mT.contiguous().mT
        p = p.mT.contiguous().mT
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
                                                      ("ColNorm", True, False), ("ColNorm", True, True),
                                                      ("BiasRMS", True, False)])
def test_fused_update_layouts(layout, dtype, lmo, normalized, transpose):
    lr, scale, momentum = 0.2, 1.5, 0.1
    shapes = [(64, 128), (7, 129), (129, 8), (1, 1)]
    cases = [make_case(s, dtype, lmo, normalized, transpose, lr, scale, layout) for s in shapes]
    ps, gs, bs = (list(x) for x in zip(*cases))
    before = [(p.clone(), g.clone(), b.clone()) for p, g, b in cases]
    dk.ops.fused_update(ps, gs, bs, lmo=lmo, lr=lr, momentum=momentum, scale=scale, normalized=normalized,
                        transpose=transpose, backend="cuda")
    for b4, p, g, b in zip(before, ps, gs, bs):
        check_update(b4, (p, g, b), (lmo, normalized, transpose, lr, momentum, scale, False, False, True), dtype)


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


def test_fused_update_nonfinite_stays_in_its_row():
    p, g, buf = make_case((4, 64), torch.float32, "RowNorm", True, False, 0.1, 1.0)
    g[1, 3] = float("nan")
    dk.ops.fused_update([p], [g], None, lmo="RowNorm", lr=0.1, backend="cuda")
    assert p[1].isnan().all() and p[[0, 2, 3]].isfinite().all()


# ---------------------------------------------------------------- power_iteration

@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 300, 1000), (1, 20, 16384),
                                   (5, 64, 4000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "noncontiguous"])
def test_power_iteration_vs_fp64(shape, dtype, layout):
    W = torch.randn(shape, dtype=torch.float64).to(device="cuda", dtype=dtype)
    if layout == "offset":
        W = offset(W)
    elif layout == "noncontiguous":
        W = W.mT.contiguous().mT
    sigma, v = dk.ops.power_iteration(W, iters=4, backend="cuda")
    sigma_ref, v_ref = ref.power_iteration(W.double().cpu(), iters=4)
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


# ---------------------------------------------------------------- newton_schulz (fused small)

NS_SHAPES = [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 16, 16), (4, 128, 128), (2, 100, 300), (2, 300, 100),
             (3, 48, 80), (2, 2, 5, 9)]


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
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
def test_newton_schulz_small_layouts(layout):
    G = torch.randn(3, 37, 90, dtype=torch.float64)
    Gd = G.to(device="cuda", dtype=torch.bfloat16)
    Gd = offset(Gd) if layout == "offset" else Gd.mT.contiguous().mT
    out = dk.ops.newton_schulz(Gd, 5, backend="cuda")
    exact = ref.newton_schulz(G, 5)
    assert rel_err(out.cpu(), exact) <= 1.5 * rel_err(ref.newton_schulz(Gd, 5).cpu(), exact) + 64 * unit(torch.bfloat16)


def test_newton_schulz_small_special_values():
    assert dk.ops.newton_schulz(torch.zeros(2, 6, 9, device="cuda", dtype=torch.bfloat16), backend="cuda").abs().max() == 0
    G = torch.randn(5, 8, device="cuda", dtype=torch.bfloat16)
    G[1, 2] = float("nan")
    assert torch.isnan(dk.ops.newton_schulz(G, backend="cuda")).all()
    out = dk.ops.newton_schulz(torch.randn(4, 8, device="cuda", dtype=torch.bfloat16), steps=0, backend="cuda")
    assert out.float().norm().item() == pytest.approx(1.0, rel=8 * unit(torch.bfloat16))  # X0 only


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
    with torch.cuda.stream(s):
        out = dk.ops.newton_schulz(G, backend="cuda")
        sigma, _ = dk.ops.power_iteration(G.float(), iters=3, backend="cuda")
    s.synchronize()
    exact = ref.newton_schulz(G.double().cpu())
    assert rel_err(out.cpu(), exact) <= 1.5 * rel_err(ref.newton_schulz(G).cpu(), exact) + 64 * unit(torch.bfloat16)
    assert rel_err(sigma.cpu(), ref.power_iteration(G.double().cpu(), iters=3)[0]) < 1e-5

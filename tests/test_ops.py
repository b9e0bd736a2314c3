"""Ops through their public functions and custom ops: torch backend vs the fp64 reference,
dispatch errors, and torch.compile(fullgraph=True) over the custom ops."""
import importlib

import pytest
import torch

import disco_kernels as dk
from disco_kernels import _backend
from disco_kernels import reference as ref
from tolerances import elementwise_tol, rel_err, unit

SHAPES = [(1, 1), (7, 129), (129, 7), (3, 7, 129), (2, 16, 16)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BACKENDS = ["auto"] + dk.available_backends("cpu")  # + "triton" where it is interpreted


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2)]])
def test_newton_schulz_vs_fp64(shape, dtype, coefficients):
    """Error vs the fp64 iteration is no worse than the reference's own error in that dtype
    (plus a dtype-derived slack for the reordered arithmetic)."""
    G = torch.randn(shape, dtype=torch.float64)
    exact = ref.newton_schulz(G, 5, coefficients)
    out = dk.ops.newton_schulz(G.to(dtype), 5, coefficients, backend="torch")
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    ref_err = rel_err(ref.newton_schulz(G.to(dtype), 5, coefficients), exact)
    assert rel_err(out, exact) <= 1.5 * ref_err + 64 * unit(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_any_input_dtype(backend, in_dtype, dtype):
    """G of any float dtype iterates in ``dtype`` (e.g. fp64 params under the default bf16 Spectral)."""
    G = torch.randn(24, 40, dtype=torch.float64)
    exact = ref.newton_schulz(G, 5)
    out = dk.ops.newton_schulz(G.to(in_dtype), dtype=dtype, backend=backend)
    assert out.dtype == dtype
    ref_err = rel_err(ref.newton_schulz(G.to(in_dtype), 5, dtype=dtype), exact)
    assert rel_err(out, exact) <= 1.5 * ref_err + 64 * unit(dtype)


def test_newton_schulz_output_dtype_and_noncontiguous():
    G = torch.randn(40, 30, dtype=torch.float64)
    out = dk.ops.newton_schulz(G.float().T, dtype=torch.float64)  # non-contiguous (30, 40), computed in fp64
    assert out.dtype == torch.float64
    assert rel_err(out, ref.newton_schulz(G.T)) < 1e-6  # input rounded to fp32 once


def test_newton_schulz_zero_and_empty():
    assert dk.ops.newton_schulz(torch.zeros(4, 6)).abs().max() == 0
    assert dk.ops.newton_schulz(torch.zeros(0, 5, 6)).shape == (0, 5, 6)


def test_newton_schulz_nonfinite_propagates():
    G = torch.randn(5, 8)
    G[1, 2] = float("nan")
    assert torch.isnan(dk.ops.newton_schulz(G)).all()


@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (129, 7), (3, 7, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_power_iteration_vs_reference(shape, dtype):
    W = torch.randn(shape, dtype=torch.float64)
    sigma, v = dk.ops.power_iteration(W.to(dtype), iters=4, backend="torch")
    sigma_ref, v_ref = ref.power_iteration(W.to(dtype).double(), iters=4)
    assert sigma.dtype == torch.promote_types(dtype, torch.float32) and sigma.shape == shape[:-2]
    tol = elementwise_tol(sigma.dtype, 4 * shape[-1])
    assert rel_err(sigma, sigma_ref) < tol and rel_err(v, v_ref) < 16 * tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_iteration_nonfinite_and_zero(backend):
    """A diverged (NaN) matrix reads as sigma = NaN, never as a healthy 0; a zero one as 0 with v kept;
    neighbours in the batch are unaffected."""
    W = torch.randn(3, 6, 20)
    W[0, 2, 3] = float("nan")
    W[1] = 0
    v0 = ref.default_start_vector(W)
    sigma, v = dk.ops.power_iteration(W, v0, iters=2, backend=backend)
    want, _ = ref.power_iteration(W.double(), v0.double(), 2)
    assert sigma[0].isnan() and want[0].isnan()
    assert sigma[1] == 0 and torch.equal(v[1], v0[1])
    assert rel_err(sigma[2], want[2]) < elementwise_tol(torch.float32, 2 * 20)


def test_power_iteration_warm_start():
    W = torch.randn(3, 40, 60)
    sigma, v = dk.ops.power_iteration(W, iters=200)
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    sigma2, _ = dk.ops.power_iteration(W, v, iters=1)  # warm start: one more pass stays converged
    assert rel_err(sigma, exact) < 1e-3 and rel_err(sigma2, exact) < 1e-3
    assert (sigma <= exact * (1 + 1e-5)).all()  # a Rayleigh-type estimate never overshoots


def test_power_iteration_errors():
    with pytest.raises(ValueError, match="W must be"):
        dk.ops.power_iteration(torch.randn(5))
    with pytest.raises(ValueError, match="iters"):
        dk.ops.power_iteration(torch.randn(3, 3), iters=0)
    with pytest.raises(ValueError, match="v must have shape"):
        dk.ops.power_iteration(torch.randn(3, 4), torch.randn(3))


def test_newton_schulz_errors():
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        dk.ops.newton_schulz(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        dk.ops.newton_schulz(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dk.ops.newton_schulz([[1.0]])
    with pytest.raises(ValueError, match="backend"):
        dk.ops.newton_schulz(torch.randn(3, 3), backend="tpu")
    with pytest.raises(ValueError, match="coefficients"):
        dk.ops.newton_schulz(torch.randn(3, 3), coefficients="newton")


def test_forced_backend_unavailable_is_clear():
    if _backend.cuda_extension() is None or not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            dk.ops.newton_schulz(torch.randn(3, 3), backend="cuda")


def test_auto_on_cpu_is_torch():
    assert _backend.resolve("auto", torch.device("cpu"), "newton_schulz", ("torch", "triton", "cuda")) == "torch"


@pytest.mark.parametrize("lmo", ["Sign", "RowNorm", "ColNorm", "BiasRMS"])
@pytest.mark.parametrize("momentum,light", [(1.0, False), (0.1, False), (0.1, True)])
def test_fused_update_torch_vs_reference(lmo, momentum, light):
    shapes = [(7,), (1,), (33,)] if lmo == "BiasRMS" else [(7, 129), (1, 1), (129, 7)]
    ps = [torch.randn(s, dtype=torch.float64) for s in shapes]
    gs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    bufs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    fn = {"Sign": ref.lmo_sign, "RowNorm": lambda g: ref.lmo_rownorm(g, True, True),
          "ColNorm": lambda g: ref.lmo_colnorm(g, True, True), "BiasRMS": ref.lmo_bias_rms}[lmo]
    expected = []
    for p, g, b in zip(ps, gs, bufs):
        new_p, new_b = ref.scion_update(p, g, None if light else b, fn, 0.1, 1 if light else momentum, 2.0, False)
        expected.append((new_p, new_b, g * (1 - momentum) if light else g))
    p2, g2, b2 = [x.clone() for x in ps], [x.clone() for x in gs], [x.clone() for x in bufs]
    flags = {} if lmo in ("Sign", "BiasRMS") else {"transpose": True}
    dk.ops.fused_update(p2, g2, None if momentum == 1 or light else b2, lmo=lmo, lr=0.1, momentum=momentum,
                        scale=2.0, light=light, normalized=True, backend="torch", **flags)
    for (ep, eb, eg), p, b, g in zip(expected, p2, b2, g2):
        torch.testing.assert_close(p, ep)
        torch.testing.assert_close(g, eg)
        if momentum != 1 and not light:
            torch.testing.assert_close(b, eb)


@pytest.mark.parametrize("lmo", ["RowNorm", "ColNorm", "BiasRMS"])
@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
def test_fused_update_fp16_zero_and_large_lines(lmo, backend):
    """fp16 g with a zero line and entries past sqrt(fp16 max): line norms in fp32 (as the kernels take
    them) keep the update finite where fp16 math gives 0 / 0 (1e-8 rounds to 0) or g² = inf."""
    fu = importlib.import_module("disco_kernels.ops.fused_update")
    p = torch.randn(9, 16).half()
    g = torch.randn(9, 16).half()
    g[:, 2] = g[4] = 0  # a zero column and a zero row
    g[1, 5] = 300.0
    want = ref.scion_update(p.double(), g.double(), None, fu.lmo_fn(lmo, True, False), 0.1, 1.0, 1.0, False)[0]
    dk.ops.fused_update([p], [g], None, lmo=lmo, lr=0.1, backend=backend)
    assert p.isfinite().all()
    assert rel_err(p, want) < elementwise_tol(torch.float16, 2)


def test_fused_update_errors():
    p = [torch.zeros(3, 3)]
    with pytest.raises(ValueError, match="lmo must be"):
        dk.ops.fused_update(p, p, lmo="Spectral", lr=0.1)
    with pytest.raises(ValueError, match="equal lengths"):
        dk.ops.fused_update(p, [], lmo="Sign", lr=0.1)


def test_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(G, W):
        X = dk.ops.newton_schulz(G, 3, "polar_express")
        sigma, v = dk.ops.power_iteration(W, iters=2)
        return X * 2, sigma, v

    G, W = torch.randn(2, 5, 9), torch.randn(6, 4)
    X, sigma, v = f(G, W)
    torch.testing.assert_close(X, 2 * dk.ops.newton_schulz(G, 3, "polar_express"))
    torch.testing.assert_close(sigma, dk.ops.power_iteration(W, iters=2)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_every_backend(backend):
    """Backend choice runs inside the custom ops, so tracing never probes Triton or the extension
    (importlib would break the graph); a forced backend traces as well as "auto"."""
    @torch.compile(fullgraph=True, backend="eager")
    def f(G, p, g):
        dk.ops.fused_update([p], [g], lmo="RowNorm", lr=0.1, backend=backend)
        return dk.ops.newton_schulz(G, backend=backend), dk.ops.power_iteration(G, backend=backend)[0]

    G, p, g = torch.randn(2, 24, 40), torch.randn(5, 6), torch.randn(5, 6)
    p_eager = p.clone()
    X, sigma = f(G, p, g)
    dk.ops.fused_update([p_eager], [g], lmo="RowNorm", lr=0.1, backend=backend)
    torch.testing.assert_close(X, dk.ops.newton_schulz(G, backend=backend))
    torch.testing.assert_close(sigma, dk.ops.power_iteration(G, backend=backend)[0])
    torch.testing.assert_close(p, p_eager)


def test_compile_inductor():
    f = torch.compile(lambda G: dk.ops.newton_schulz(G) + 1, fullgraph=True)
    G = torch.randn(4, 8, 12)
    torch.testing.assert_close(f(G), dk.ops.newton_schulz(G) + 1)


def test_custom_op_opcheck():
    G = torch.randn(2, 5, 7)
    torch.library.opcheck(torch.ops.disco_kernels.newton_schulz.default, (G, [3.4445, -4.775, 2.0315], 1.0, 1e-7,
                                                                             torch.float32, "torch"))
    torch.library.opcheck(torch.ops.disco_kernels.power_iteration.default, (G, torch.ones(2, 7) / 7 ** 0.5, 2, "torch"))

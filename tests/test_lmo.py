"""LMO classes vs the fp64 reference, batching, init, rank errors."""
import math

import pytest
import torch

import disco_kernels as dk
from disco_kernels import lmo as L
from disco_kernels import reference as ref
from tolerances import elementwise_tol, rel_err, unit

MATRICES = [(1, 1), (7, 129), (129, 7), (16, 24)]


@pytest.mark.parametrize("shape", MATRICES)
@pytest.mark.parametrize("kwargs", [{}, {"normalized": False}, {"max": True}, {"coefficients": "polar_express", "steps": 7}])
def test_spectral_fp64_matches_reference(shape, kwargs):
    g = torch.randn(shape, dtype=torch.float64)
    out = L.Spectral(dtype=torch.float64, **kwargs).lmo(g)
    ns = {k: v for k, v in kwargs.items() if k in ("coefficients", "steps")}
    flags = {k: v for k, v in kwargs.items() if k in ("normalized", "max")}
    expected = ref.lmo_spectral(g, **ns, **flags)
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("shape", MATRICES)
def test_spectral_bf16_default_within_reference_error(shape):
    """Default (bf16 iteration, as the reference Scion) is as close to fp64 as the reference in bf16."""
    g = torch.randn(shape, dtype=torch.float64)
    exact = ref.lmo_spectral(g)
    ref_err = rel_err(ref.lmo_spectral(g, dtype=torch.bfloat16), exact)
    assert rel_err(L.Spectral().lmo(g.float()), exact) <= 1.5 * ref_err + 64 * unit(torch.bfloat16)


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (6, 2, 3), (1, 1, 1, 1)])
def test_spectral_conv(shape):
    g = torch.randn(shape, dtype=torch.float64)
    out = L.SpectralConv(dtype=torch.float64).lmo(g)
    assert rel_err(out, ref.lmo_spectral_conv(g)) < 1e-12
    assert out.shape == g.shape


@pytest.mark.parametrize("shape", MATRICES)
@pytest.mark.parametrize("norm,fn", [
    (L.ColNorm(), ref.lmo_colnorm),
    (L.ColNorm(normalized=True, transpose=True), lambda g: ref.lmo_colnorm(g, True, True)),
    (L.RowNorm(), ref.lmo_rownorm),
    (L.RowNorm(normalized=False, transpose=True), lambda g: ref.lmo_rownorm(g, False, True)),
    (L.Sign(), ref.lmo_sign),
    (L.Sign(normalized=False), lambda g: torch.sign(g)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_elementwise_norms(shape, norm, fn, dtype):
    g = torch.randn(shape, dtype=torch.float64)
    out = norm.lmo(g.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, fn(g.to(dtype).double())) < elementwise_tol(dtype, 2 + max(shape))


def test_bias_rms_and_auto():
    b = torch.randn(17, dtype=torch.float64)
    assert rel_err(L.BiasRMS().lmo(b), ref.lmo_bias_rms(b)) < 1e-15
    auto = L.Auto(dtype="float64")
    assert rel_err(auto.lmo(b), ref.lmo_bias_rms(b)) < 1e-15
    W = torch.randn(5, 9, dtype=torch.float64)
    assert rel_err(auto.lmo(W), ref.lmo_spectral(W)) < 1e-12
    C = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert rel_err(auto.lmo(C), ref.lmo_spectral_conv(C)) < 1e-12


def test_lmo_many_batches_same_shapes(monkeypatch):
    calls = []
    real = L.newton_schulz
    monkeypatch.setattr(L, "newton_schulz", lambda G, *a, **k: calls.append(tuple(G.shape)) or real(G, *a, **k))
    gs = [torch.randn(8, 12, dtype=torch.float64) for _ in range(4)] + [torch.randn(12, 8, dtype=torch.float64)]
    out = L.Spectral(dtype=torch.float64).lmo_many(gs)
    assert sorted(calls) == [(4, 8, 12), (12, 8)]
    for g, u in zip(gs, out):
        assert rel_err(u, ref.lmo_spectral(g)) < 1e-12


def test_auto_lmo_many_mixed():
    gs = [torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
          torch.randn(6, 4, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)]
    out = L.Auto(dtype="float64").lmo_many(gs)
    for g, u in zip(gs, out):
        assert rel_err(u, L.Auto(dtype="float64").lmo(g)) < 1e-12


@pytest.mark.parametrize("norm,shape", [(L.Spectral(), (5,)), (L.Sign(), (2, 3, 4)), (L.BiasRMS(), (3, 3)),
                                        (L.SpectralConv(), (3, 3)), (L.ColNorm(), (4,))])
def test_rank_errors_name_shape(norm, shape):
    with pytest.raises(ValueError, match=rf"{type(norm).__name__} needs .* shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
        norm.lmo(torch.randn(shape))


def test_make_norm_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        L.make_norm("Frobenius")
    with pytest.raises(ValueError, match="norm_kwargs"):
        L.make_norm("Sign", {"steps": 5})
    with pytest.raises(ValueError, match="dtype"):
        L.make_norm("Spectral", {"dtype": "int8"})


def test_init_values():
    torch.manual_seed(1)
    w = torch.empty(8, 12)
    L.Spectral().init(w)
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(s, torch.full_like(s, math.sqrt(8 / 12)), rtol=1e-6, atol=0)
    e = torch.empty(50, 16)
    L.ColNorm(transpose=True).init(e)
    torch.testing.assert_close(e.pow(2).mean(dim=1), torch.ones(50), rtol=1e-5, atol=0)  # vocab rows RMS 1
    o = torch.empty(10, 16)
    L.RowNorm().init(o)
    torch.testing.assert_close(o.norm(dim=1), torch.full((10,), 1 / 4.0), rtol=1e-6, atol=0)
    s = torch.empty(3, 4)
    L.Sign().init(s)
    assert set(s.abs().unique().tolist()) == {0.25}
    b = torch.ones(5)
    L.BiasRMS().init(b)
    assert b.abs().max() == 0
    c = torch.empty(4, 2, 3, 3)
    L.SpectralConv().init(c)
    torch.testing.assert_close(torch.linalg.svdvals(c[:, :, 1, 2].double()), torch.full((2,), math.sqrt(2) / 9, dtype=torch.float64))


def test_init_same_random_stream_as_reference():
    """Our init draws the same numbers as the reference's (same RNG calls)."""
    torch.manual_seed(3)
    w = torch.empty(6, 9)
    L.Spectral().init(w)
    torch.manual_seed(3)
    expected = torch.nn.init.orthogonal_(torch.empty(6, 9, dtype=torch.float64)) * math.sqrt(6 / 9)
    torch.testing.assert_close(w, expected.float())
    torch.manual_seed(4)
    e = torch.empty(7, 5)
    L.ColNorm(transpose=True).init(e)
    torch.manual_seed(4)
    v = torch.nn.init.normal_(torch.empty(7, 5).T)
    torch.testing.assert_close(e, (v / v.norm(dim=0, keepdim=True) * math.sqrt(5)).T)


def test_norm_dict_names():
    assert set(dk.norm_dict) == {"Spectral", "SpectralConv", "ColNorm", "RowNorm", "Sign", "BiasRMS", "Auto"}


@pytest.mark.parametrize("kernel", [(3, 1), (1, 3), (2, 5)])
def test_spectral_conv_init_non_square_kernel(kernel):
    """Every tap of a (k1, k2) kernel is orthogonal (times the reference's sqrt(c_out/c_in)/k1²); none is left
    uninitialised or indexed out of range."""
    c = torch.full((4, 2, *kernel), float("nan"))
    L.SpectralConv().init(c)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            torch.testing.assert_close(torch.linalg.svdvals(c[:, :, i, j].double()),
                                       torch.full((2,), math.sqrt(2) / kernel[0] ** 2, dtype=torch.float64))

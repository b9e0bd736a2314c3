"""The norm classes of ``disco_kernels.lmo`` against the independent oracle, flag by flag.

Every constructor argument of every norm changes the answer in some case here, so a class that drops
or misreads one fails: LMOs (single and batched), init, the rank checks and their messages, and the
arguments that ``check_backend`` hands to the ops' backend choosers (the check a forced backend gets
before a step modifies anything).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import oracle
import tolerances
from disco_kernels import lmo as L
from tolerances import assert_close, assert_oracle



def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# -- LMOs ----------------------------------------------------------------------------------------

SPECTRAL_KWARGS = [{}, {"max": True}, {"normalized": False}, {"max": True, "normalized": False}, {"steps": 2},
                   {"coefficients": "polar_express", "steps": 6}, {"coefficients": [(2.0, -1.5, 0.5)], "steps": 3}]


@pytest.mark.parametrize("shape", [(3, 12), (12, 3), (5, 5)])
@pytest.mark.parametrize("kwargs", SPECTRAL_KWARGS)
def test_spectral(shape, kwargs):
    g = randn(*shape)
    norm = L.Spectral(**kwargs, dtype=torch.float64)
    assert_oracle(norm.lmo(g), oracle.lmo, "Spectral", g, **kwargs)


def test_spectral_positional_arguments_are_the_references():
    """Spectral(max, normalized, steps) in the reference's order."""
    g = randn(3, 12)
    norm = L.Spectral(True, False, 2, dtype="float64")
    assert (norm.max, norm.normalized, norm.steps) == (True, False, 2)
    assert_oracle(norm.lmo(g), oracle.spectral, g, max=True, normalized=False, steps=2)


def test_spectral_defaults_iterate_in_bf16():
    norm = L.Spectral()
    assert (norm.max, norm.normalized, norm.steps, norm.coefficients, norm.dtype) == (
        False, True, 5, "jordan", torch.bfloat16)
    g = randn(8, 16)
    out = norm.lmo(g)
    assert out.dtype == torch.bfloat16
    assert_close(out, oracle.spectral(g), oracle.spectral(g, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float32", torch.float32, "float16", "bfloat16", "float64"])
def test_spectral_dtype_names(dtype):
    norm = L.Spectral(dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert norm.dtype is want
    assert norm.lmo(randn(4, 6)).dtype is want


@pytest.mark.parametrize("bad", ["int8", "fp32", None, 3, torch.int32, torch.complex64])
def test_bad_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"^dtype must be one of \['bfloat16', 'float16', 'float32', 'float64'\] "
                                         r"or a floating-point torch\.dtype, got " + re.escape(repr(bad)) + "$"):
        L.Spectral(dtype=bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": -1}, r"^steps must be an int >= 0, got -1$"),
    ({"coefficients": "newton"}, r"^coefficients must be one of \['jordan', 'polar_express'\] or a list of \(a, b, c\), "
                                 r"got 'newton'$"),
    ({"steps": 1.5}, r"^steps must be an int >= 0, got 1\.5$")])
def test_newton_schulz_norms_validate_their_schedule(kwargs, match):
    for cls in (L.Spectral, L.SpectralConv):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


@pytest.mark.parametrize("shape", [(6, 2, 3), (4, 3, 2, 2), (3, 6, 1)])
@pytest.mark.parametrize("kwargs", [{}, {"steps": 2}, {"coefficients": "polar_express"}])
def test_spectral_conv(shape, kwargs):
    g = randn(*shape)
    out = L.SpectralConv(**kwargs, dtype="float64").lmo(g)
    assert out.shape == g.shape
    assert_oracle(out, oracle.lmo, "SpectralConv", g, **kwargs)


def test_spectral_conv_positional_steps():
    norm = L.SpectralConv(3)
    assert norm.steps == 3 and norm.coefficients == "jordan" and norm.dtype is torch.bfloat16


LINE_SHAPES = [(6, 10), (10, 6), (1, 4)]


@pytest.mark.parametrize("shape", LINE_SHAPES)
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("name", ["ColNorm", "RowNorm"])
def test_line_norms(shape, normalized, transpose, name):
    g = randn(*shape)
    g[0] = 0
    cls = getattr(L, name)
    for norm in (cls(normalized, transpose), cls(normalized=normalized, transpose=transpose)):
        assert (norm.normalized, norm.transpose) == (normalized, transpose)
        assert_oracle(norm.lmo(g), oracle.lmo, name, g, normalized=normalized, transpose=transpose)


def test_line_norm_defaults():
    g = randn(6, 10)
    assert_oracle(L.ColNorm().lmo(g), oracle.colnorm, g, normalized=False, transpose=False)
    assert_oracle(L.RowNorm().lmo(g), oracle.rownorm, g, normalized=True, transpose=False)
    assert (L.ColNorm.kind, L.RowNorm.kind, L.Sign.kind, L.BiasRMS.kind) == ("line", "line", "sign", "line")
    assert L.Spectral.kind is None and L.SpectralConv.kind is None and L.Auto.kind is None


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("zero_init", [True, False])
def test_sign(normalized, zero_init):
    g = randn(6, 10)
    g[0, 0] = 0
    norm = L.Sign(zero_init, normalized)
    assert (norm.zero_init, norm.normalized) == (zero_init, normalized)
    assert norm.alpha((6, 10)) == (1 / 10 if normalized else 1.0)
    assert torch.equal(norm.lmo(g), oracle.sign(g, normalized=normalized))


def test_sign_defaults():
    norm = L.Sign()
    assert (norm.zero_init, norm.normalized) == (False, True)


@pytest.mark.parametrize("shape", [(9,), (1,), ()])
def test_bias_rms(shape):
    g = randn(*shape) if shape else torch.tensor(0.7, dtype=torch.float64)
    assert_oracle(L.BiasRMS().lmo(g), oracle.bias_rms, g)


def test_auto_routes_by_rank_and_passes_its_kwargs():
    kwargs = {"steps": 2, "coefficients": "polar_express", "dtype": "float64"}
    auto = L.Auto(**kwargs)
    for shape in [(7,), (), (4, 9), (9, 4), (5, 2, 3), (4, 2, 2, 2)]:
        g = randn(*shape) if shape else torch.tensor(2.0, dtype=torch.float64)
        assert_oracle(auto.lmo(g), oracle.auto, g, steps=2, coefficients="polar_express", what=str(shape))
    assert type(auto.resolve((3,))) is L.BiasRMS and type(auto.resolve(())) is L.BiasRMS
    assert type(auto.resolve((3, 4))) is L.Spectral
    assert type(auto.resolve((3, 4, 5))) is L.SpectralConv and type(auto.resolve((3, 4, 5, 5))) is L.SpectralConv
    assert auto.resolve((2, 3)).steps == 2 and auto.resolve((2, 3, 3)).coefficients == "polar_express"
    assert auto.resolve((2, 3)) is auto.resolve((5, 6))  # one norm per rank, so that lmo_many batches
    with pytest.raises(ValueError, match=r"Auto needs a 0-D or 1-D or 2-D or 3-D or 4-D tensor, but g has shape "
                                         r"\(1, 1, 1, 1, 1\)"):
        auto.resolve((1, 1, 1, 1, 1))


def test_auto_default_is_bf16_spectral():
    spectral = L.Auto().resolve((3, 4))
    assert spectral.dtype is torch.bfloat16 and spectral.steps == 5 and not spectral.max


@pytest.mark.parametrize("backend", ["tpu", "cuda"])
def test_backend_reaches_the_newton_schulz_op(backend):
    """A forced backend is passed on (so an impossible one fails), also through Auto and lmo_many."""
    err = ValueError if backend == "tpu" else RuntimeError
    g2, g4 = randn(4, 6), randn(4, 2, 2, 2)
    for norm, g in ((L.Spectral(), g2), (L.SpectralConv(), g4), (L.Auto(), g2), (L.Auto(), g4)):
        with pytest.raises(err, match="backend"):
            norm.lmo(g, backend=backend)
        with pytest.raises(err, match="backend"):
            norm.lmo_many([g, g], backend=backend)
        with pytest.raises(err, match="backend"):
            norm.lmo_many([g], backend=backend)
    assert_oracle(L.Auto(dtype="float64").lmo(g2, backend="torch"), oracle.spectral, g2)


# -- batched LMOs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"max": True, "normalized": False, "steps": 3}])
def test_spectral_lmo_many(kwargs, monkeypatch):
    """Same shapes go through one batched call, each result in its place and scaled by its shape."""
    calls = []
    real = L.newton_schulz
    monkeypatch.setattr(L, "newton_schulz", lambda G, *a, **k: calls.append(tuple(G.shape)) or real(G, *a, **k))
    shapes = [(3, 12), (12, 3), (3, 12), (5, 5), (3, 12), (12, 3)]
    gs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    out = L.Spectral(**kwargs, dtype="float64").lmo_many(gs)
    assert sorted(calls) == sorted([(3, 3, 12), (2, 12, 3), (1, 5, 5)])
    assert len(out) == len(gs)
    for g, u in zip(gs, out):
        assert u.shape == g.shape
        assert_oracle(u, oracle.spectral, g, **kwargs)


def test_spectral_conv_lmo_many():
    shapes = [(4, 2, 3), (4, 2, 3), (3, 2, 2, 2), (6, 1, 3)]
    gs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    out = L.SpectralConv(steps=4, dtype="float64").lmo_many(gs)
    for g, u in zip(gs, out):
        assert u.shape == g.shape
        assert_oracle(u, oracle.spectral_conv, g, steps=4)
    assert L.SpectralConv().lmo_many([]) == []


def test_lmo_many_checks_every_rank():
    with pytest.raises(ValueError, match=r"Spectral needs a 2-D tensor, but g has shape \(3,\)"):
        L.Spectral().lmo_many([randn(2, 3), randn(3)])
    with pytest.raises(ValueError, match=r"RowNorm needs a 2-D tensor, but g has shape \(3,\)"):
        L.RowNorm().lmo_many([randn(2, 3), randn(3)])


@pytest.mark.parametrize("norm,name,kwargs", [(L.ColNorm(True, True), "ColNorm", {"normalized": True, "transpose": True}),
                                              (L.RowNorm(False), "RowNorm", {"normalized": False}),
                                              (L.Sign(normalized=False), "Sign", {"normalized": False}),
                                              (L.BiasRMS(), "BiasRMS", {})])
def test_fused_norms_lmo_many(norm, name, kwargs):
    shapes = [(7,), (3,)] if name == "BiasRMS" else [(6, 10), (10, 6), (6, 10)]
    gs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    out = norm.lmo_many(gs, backend="torch")
    assert len(out) == len(gs)
    for g, u in zip(gs, out):
        assert_oracle(u, oracle.lmo, name, g, **kwargs)


def test_auto_lmo_many_keeps_order_and_batches():
    shapes = [(6, 4), (4,), (6, 4), (2, 3, 3, 3), (), (4, 6), (2, 3, 3, 3)]
    gs = [randn(*s, seed=i) if s else torch.tensor(1.5, dtype=torch.float64) for i, s in enumerate(shapes)]
    out = L.Auto(dtype="float64", steps=3).lmo_many(gs)
    assert len(out) == len(gs)
    for g, u in zip(gs, out):
        assert_oracle(u, oracle.auto, g, steps=3)


# -- rank checks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,shape,ranks", [
    (L.Spectral(), (5,), "2-D"), (L.SpectralConv(), (3, 3), "3-D or 4-D"), (L.ColNorm(), (2, 3, 4), "2-D"),
    (L.RowNorm(), (4,), "2-D"), (L.Sign(), (), "2-D"), (L.BiasRMS(), (3, 3), "0-D or 1-D"),
])
def test_rank_check_message(norm, shape, ranks):
    name = type(norm).__name__
    want = "^" + re.escape(f"{name} needs a {ranks} tensor, but g has shape {tuple(shape)} (norm='Auto' picks the "
                           "norm by rank; disco_kernels.param_groups(model) groups a model)") + "$"
    with pytest.raises(ValueError, match=want):
        norm.lmo(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"but w has shape"):
        norm.init(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"but my_param has shape"):
        norm.check(shape, "my_param")
    norm.check((2, 3, 4) if name == "SpectralConv" else (3,) if name == "BiasRMS" else (2, 3))  # fits: no error


def test_base_norm_is_abstract():
    norm = L.Norm()
    with pytest.raises(NotImplementedError):
        norm.lmo(torch.zeros(2, 2))
    with pytest.raises(NotImplementedError):
        norm.init(torch.zeros(2, 2))
    with pytest.raises(NotImplementedError):
        norm.alpha((2, 2))
    with pytest.raises(NotImplementedError):
        L._NewtonSchulzNorm().alpha((2, 2))
    with pytest.raises(NotImplementedError):
        L.LineNorm().line_dim((2, 2))
    assert norm.kind is None and norm.resolve((2, 2)) is norm and norm.ndims == (2,)


# -- init ---------------------------------------------------------------------------------------------

def _assert_init(w, norm, seed, dtype=None, **kwargs):
    """The rule for an init drawn after manual_seed(seed): exact = the oracle's init with fp64 arithmetic,
    plain = with the arithmetic in w's (plain) dtype, both drawing the same numbers."""
    dtype = dtype or w.dtype
    torch.manual_seed(seed)
    exact = oracle.init(norm, tuple(w.shape), dtype, torch.float64, **kwargs)
    torch.manual_seed(seed)
    plain = oracle.init(norm, tuple(w.shape), dtype, tolerances.plain_dtype(dtype), **kwargs)
    assert_close(w, exact, plain, dtype, f"{norm} init")


@pytest.mark.parametrize("shape", [(4, 10), (10, 4)])
@pytest.mark.parametrize("kwargs", [{}, {"max": True}, {"normalized": False}])
def test_spectral_init(shape, kwargs):
    w = torch.empty(shape)
    torch.manual_seed(3)
    out = L.Spectral(**kwargs).init(w)
    _assert_init(w, "Spectral", 3, **kwargs)
    assert out is w
    s = torch.linalg.svdvals(w.double())
    scale = oracle.spectral_scale(*shape, kwargs.get("normalized", True), kwargs.get("max", False))
    # and so, by Weyl's inequality, every singular value is the scale up to one fp32 rounding of w
    assert (s - scale).abs().max() <= tolerances.unit(torch.float32) * scale * min(shape) ** 0.5


@pytest.mark.parametrize("shape", [(4, 2, 3), (4, 2, 3, 3), (3, 6, 2)])
def test_spectral_conv_init(shape):
    w = torch.full(shape, float("nan"))
    torch.manual_seed(4)
    assert L.SpectralConv().init(w) is w
    _assert_init(w, "SpectralConv", 4)
    k = shape[2] if len(shape) == 3 else shape[2] * shape[3]
    scale = math.sqrt(shape[0] / shape[1]) / k
    for tap in w.reshape(*shape[:2], -1).unbind(-1):
        s = torch.linalg.svdvals(tap.double())
        assert (s - scale).abs().max() <= tolerances.unit(torch.float32) * scale * min(shape[:2]) ** 0.5  # Weyl


@pytest.mark.parametrize("name", ["ColNorm", "RowNorm"])
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_line_norm_init(name, normalized, transpose, shape):
    w = torch.zeros(shape, dtype=torch.float64)
    torch.manual_seed(5)
    assert getattr(L, name)(normalized, transpose).init(w) is w
    _assert_init(w, name, 5, normalized=normalized, transpose=transpose)
    want = oracle.init_line_norm(name, shape, normalized=normalized, transpose=transpose)
    lines = w.T if transpose else w
    got = lines.norm(dim=0) if name == "ColNorm" else lines.norm(dim=1)
    torch.manual_seed(5)  # plain: the same lines' norms of the oracle's init with fp32 arithmetic
    plain = oracle.init(name, shape, torch.float64, torch.float32, normalized=normalized, transpose=transpose)
    plain = (plain.T if transpose else plain).norm(dim=0 if name == "ColNorm" else 1)
    assert_close(got, torch.full_like(got, want), plain)
    assert w.std() > 0  # Gaussian directions, not a constant


@pytest.mark.parametrize("normalized", [True, False])
def test_sign_init(normalized):
    w = torch.zeros(20, 8)
    assert L.Sign(normalized=normalized).init(w) is w
    want = 1 / 8 if normalized else 1.0
    assert set(w.unique().tolist()) == {-want, want}
    w = torch.ones(3, 4)
    L.Sign(zero_init=True).init(w)
    assert w.abs().max() == 0


def test_sign_init_draws_on_ws_device():
    """The ±1 draw comes from w's device (its generator): a meta w leaves the CPU generator untouched."""
    torch.manual_seed(0)
    L.Sign().init(torch.empty(3, 4, device="meta"))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_bias_rms_and_auto_init():
    b = torch.ones(5)
    assert L.BiasRMS().init(b) is b and b.abs().max() == 0
    w, c, v = torch.zeros(4, 6), torch.zeros(4, 2, 3), torch.ones(6)
    auto = L.Auto(steps=3)
    torch.manual_seed(6)
    auto.init(w)
    _assert_init(w, "Spectral", 6)
    torch.manual_seed(7)
    auto.init(c)
    _assert_init(c, "SpectralConv", 7)
    auto.init(v)
    assert v.abs().max() == 0


def test_init_keeps_dtype_and_writes_in_place():
    w = torch.zeros(4, 6, dtype=torch.bfloat16)
    L.Spectral().init(w)
    assert w.dtype == torch.bfloat16 and w.abs().max() > 0


# -- check_backend: what the backend choosers are asked -------------------------------------------------

def test_fused_check_backend_asks_about_the_update(monkeypatch):
    seen = []
    monkeypatch.setattr(L, "fused_backend", lambda *args: seen.append(args))
    p, g = torch.zeros(3, 4), torch.ones(3, 4)
    cases = [(L.ColNorm(), ("line", -2)), (L.ColNorm(True, True), ("line", -1)), (L.RowNorm(), ("line", -1)),
             (L.RowNorm(False, True), ("line", -2)), (L.Sign(normalized=False), ("sign", -1)),
             (L.Sign(), ("sign", -1)), (L.BiasRMS(), ("line", -1))]
    for norm, (kind, dim) in cases:
        seen.clear()
        norm.check_backend("triton", (3, 4), p, g, "the param")
        (args,) = seen
        assert args[0] == "triton" and args[1][0] is p and args[2][0] is g and len(args[1]) == len(args[2]) == 1
        assert args[3:] == (None, kind, [dim], False, "the param"), type(norm).__name__
    seen.clear()
    L.RowNorm().check_backend("auto", (3, 4), p, g)
    assert seen[0][-1] == "g"


def test_newton_schulz_check_backend_asks_about_the_whole_matrix(monkeypatch):
    seen = []
    monkeypatch.setattr(L, "ns_backend", lambda *args: seen.append(args))
    g = torch.zeros(2, 5, 3, dtype=torch.float16)  # a local shard of a (4, 5, 3) conv weight
    L.SpectralConv(steps=7, dtype="float32").check_backend("cuda", (4, 5, 3), g, g, "conv.weight")
    backend, G, dtype, steps, name = seen.pop()
    assert (backend, tuple(G.shape), G.dtype, dtype, steps, name) == (
        "cuda", (4, 15), torch.float16, torch.float32, 7, "conv.weight")
    L.Spectral().check_backend("torch", (6, 2), g, g)
    backend, G, dtype, steps, name = seen.pop()
    assert (backend, tuple(G.shape), dtype, steps, name) == ("torch", (6, 2), torch.bfloat16, 5, "g")


def test_check_backend_raises_for_an_impossible_backend():
    p = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        L.RowNorm().check_backend("cuda", (3, 4), p, p)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        L.Spectral().check_backend("cuda", (3, 4), p, p)


# -- make_norm ------------------------------------------------------------------------------------------

def test_make_norm():
    norm = L.make_norm("RowNorm", {"normalized": False, "transpose": True})
    assert type(norm) is L.RowNorm and (norm.normalized, norm.transpose) == (False, True)
    assert type(L.make_norm("Sign")) is L.Sign and type(L.make_norm("Sign", {})) is L.Sign
    assert set(L.norm_dict) == {"ColNorm", "RowNorm", "BiasRMS", "SpectralConv", "Spectral", "Sign", "Auto"}
    for name, cls in L.norm_dict.items():
        assert cls.__name__ == name


def test_make_norm_errors():
    with pytest.raises(ValueError, match=r"^norm must be one of \['Auto', 'BiasRMS', 'ColNorm', 'RowNorm', 'Sign', "
                                         r"'Spectral', 'SpectralConv'\], got 'Frobenius'$"):
        L.make_norm("Frobenius")
    with pytest.raises(TypeError, match=r"^norm_kwargs must be a dict or None, got list$"):
        L.make_norm("Sign", [("normalized", False)])
    with pytest.raises(ValueError, match=r"^norm_kwargs \{'steps': 5\} do not fit norm 'Sign': .*steps"):
        L.make_norm("Sign", {"steps": 5})

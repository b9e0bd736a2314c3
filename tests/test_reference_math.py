"""``disco_kernels.reference`` against the independent oracle (tests/oracle.py), flag by flag.

The reference is what every backend is tested against, so each of its knobs (schedules, steps, the
normalisation's multiplier and eps, ``exact``, ``dtype``, ``normalized``, ``transpose``, ``max``, the
1e-8 of the line norms, the rank cut of the polar factor, the fp64 chunking of the line norms) has a
case here whose answer changes when the knob does. fp64 results must agree to a few ulps of fp64 (the
same math in another order); results in a 16-bit dtype follow the rule of tests/tolerances.py.
"""
from __future__ import annotations

import math

import re

import pytest
import torch

import oracle
from disco_kernels import lmo as L
from disco_kernels import reference as ref
from tolerances import assert_close, assert_oracle, rel_err



def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- schedules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(2.0, -1.5, 0.5)],
                                          [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]])
@pytest.mark.parametrize("steps", [0, 1, 5, 7])
def test_ns_schedule_is_the_oracles(coefficients, steps):
    if not isinstance(coefficients, str) and 0 < steps < len(coefficients):  # extra triples would be dropped
        with pytest.raises(ValueError, match=rf"^coefficients lists {len(coefficients)} \(a, b, c\) triples for "
                                             rf"steps={steps}: give one triple per step, or fewer \(the last "
                                             r"repeats\); extra triples would be silently dropped$"):
            ref.ns_schedule(coefficients, steps)
        return
    triples, mult, eps = ref.ns_schedule(coefficients, steps)
    want, want_mult, want_eps = oracle.schedule(coefficients, steps)
    assert [tuple(t) for t in triples] == [tuple(t) for t in want]
    assert (mult, eps) == (want_mult, want_eps)
    assert all(isinstance(x, float) for t in triples for x in t)


def test_ns_schedule_defaults_and_constants():
    assert ref.ns_schedule() == ([oracle.JORDAN] * 5, 1.0, 1e-7)
    assert ref.JORDAN == oracle.JORDAN and ref.POLAR_EXPRESS == oracle.POLAR_EXPRESS


@pytest.mark.parametrize("steps", [-1, 2.5, True, False, "5", None])
def test_ns_schedule_bad_steps(steps):
    with pytest.raises(ValueError, match=r"^steps must be a non-negative int, got " + repr(steps).replace(".", r"\.")):
        ref.ns_schedule("jordan", steps)


def _bad_coefficients(bad):
    return (r"^coefficients must be a name \(\['jordan', 'polar_express'\]\) or a non-empty list of \(a, b, c\) "
            r"triples of finite real numbers, got " + re.escape(repr(bad)) + "$")


@pytest.mark.parametrize("bad,match", [
    ("nope", r"^coefficients must be one of \['jordan', 'polar_express'\] or a list of \(a, b, c\), got 'nope'$"),
    *[(bad, _bad_coefficients(bad)) for bad in [
        3, [1.0, 2.0, 3.0], [], [(1, 2, 3), (1, 2)], [(1, 2, 3, 4)], [(1, 2, float("inf"))], [(1, 2, float("nan"))],
        [(1, True, 3)], [(1, "2", 3)], ["abc"], b"abc", [(1, 2, 3), 4]]],
])
def test_ns_schedule_bad_coefficients(bad, match):
    with pytest.raises(ValueError, match=match):
        ref.ns_schedule(bad, 5)


# -- Newton-Schulz ----------------------------------------------------------------------------------

NS_SHAPES = [(1, 1), (5, 9), (9, 5), (6, 6), (3, 4, 7), (2, 7, 4)]


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("coefficients,steps", [("jordan", 5), ("jordan", 1), ("polar_express", 7),
                                                ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], 3)])
def test_newton_schulz_fp64_is_the_oracles(shape, coefficients, steps):
    G = randn(*shape)
    got = ref.newton_schulz(G, steps, coefficients)
    assert got.dtype == torch.float64 and got.shape == G.shape
    assert_oracle(got, oracle.newton_schulz, G, steps, coefficients)


def test_newton_schulz_defaults_are_five_jordan_steps():
    G = randn(6, 10)
    assert_oracle(ref.newton_schulz(G), oracle.newton_schulz, G, 5, "jordan")
    assert rel_err(ref.newton_schulz(G), oracle.newton_schulz(G, 4, "jordan")) > 1e-3


def test_newton_schulz_normalisation_eps_matters_for_tiny_g():
    """X0 = G / (mult ||G|| + eps): for ||G|| ~ eps the eps halves X0, which many steps cannot undo."""
    for coefficients, eps in (("jordan", 1e-7), ("polar_express", 1e-6), ([(2.0, -1.5, 0.5)], 1e-7)):
        G = randn(4, 6)
        G = G / G.norm() * eps
        got = ref.newton_schulz(G, 1, coefficients)
        assert_oracle(got, oracle.newton_schulz, G, 1, coefficients)
        assert rel_err(got, oracle.newton_schulz(G / 2, 1, coefficients)) > 1e-3  # eps really is eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (2, 16, 16)])
def test_newton_schulz_in_dtype(dtype, shape):
    """dtype= iterates in dtype (the input is read in at least fp32): within the rule of the oracle in dtype."""
    G = randn(*shape)
    got = ref.newton_schulz(G, 5, "jordan", dtype=dtype)
    assert got.dtype == dtype
    assert_close(got, oracle.newton_schulz(G, 5), oracle.newton_schulz(G, 5, dtype=dtype), dtype)
    assert rel_err(got, oracle.newton_schulz(G, 5)) > 0  # really in dtype, not fp64
    assert ref.newton_schulz(G.to(dtype)).dtype == dtype  # default: G's dtype


def _fp16_past_its_norm():
    """An fp16 G whose entries fit fp16 but whose Frobenius norm (~2e5) does not."""
    G = randn(8, 12)
    return (G / G.abs().max() * 3e4).half()


def test_newton_schulz_normalises_before_rounding():
    """The norm is taken in at least fp32, then X0 rounded to the iteration dtype: an fp16 G whose norm
    overflows fp16 still gives the answer."""
    G = _fp16_past_its_norm()
    assert torch.linalg.vector_norm(G).isinf()  # in fp16 it would be inf
    got = ref.newton_schulz(G)
    assert got.dtype == torch.float16
    assert_close(got, oracle.newton_schulz(G.double()), oracle.newton_schulz(G, dtype=torch.float16), torch.float16)


def test_newton_schulz_zero_and_nan():
    assert ref.newton_schulz(torch.zeros(3, 5, dtype=torch.float64)).abs().max() == 0
    G = randn(3, 5)
    G[1, 1] = float("nan")
    assert ref.newton_schulz(G).isnan().all()


# -- polar factor ---------------------------------------------------------------------------------

def _diag(values, m, n):
    G = torch.zeros(m, n, dtype=torch.float64)
    for i, v in enumerate(values):
        G[i, i] = v
    return G


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6), (3, 4, 7)])
def test_polar_factor_is_the_oracles(shape):
    G = randn(*shape)
    assert_oracle(ref.polar_factor(G), oracle.polar, G)


def test_polar_factor_drops_directions_below_the_rank_cut():
    """Singular values at most max(m, n) * eps * sigma_max carry no direction (diagonal G: exact SVD)."""
    eps = torch.finfo(torch.float64).eps
    G = _diag([1.0, 0.1 * eps, 2.0 * eps], 10, 12)  # cut 12 eps: both small ones dropped
    assert torch.equal(ref.polar_factor(G), _diag([1.0], 10, 12))
    G = _diag([1.0, 14 * eps], 10, 12)  # above the cut: a direction
    assert torch.equal(ref.polar_factor(G), _diag([1.0, 1.0], 10, 12))
    G = _diag([1.0, 3 * eps], 2, 2).expand(5, 2, 2)  # batch of 5 2x2 matrices: cut 2 eps, not 5 eps
    assert torch.equal(ref.polar_factor(G), _diag([1.0, 1.0], 2, 2).expand(5, 2, 2))
    assert rel_err(ref.polar_factor(G), oracle.polar(G)) == 0


def test_polar_factor_cuts_each_matrix_by_its_own_largest_value():
    G = torch.stack([_diag([1.0, 0.5, 0.25, 0.125], 4, 6), 1e-20 * randn(4, 6)])
    P = ref.polar_factor(G)
    assert_oracle(P, oracle.polar, G)
    assert torch.equal(P[0], _diag([1.0] * 4, 4, 6))
    assert_oracle(torch.linalg.svdvals(P[1]), lambda p: torch.linalg.svdvals(p), oracle.polar(G[1]))  # orthonormal rows


def test_polar_factor_of_other_dtypes_is_fp64():
    G = randn(4, 6).float()
    assert ref.polar_factor(G).dtype == torch.float64
    assert_oracle(ref.polar_factor(G), oracle.polar, G)


# -- Spectral and SpectralConv -----------------------------------------------------------------------

@pytest.mark.parametrize("d_out,d_in", [(3, 12), (12, 3), (5, 5), (1, 7)])
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("max_", [True, False])
def test_spectral_scale(d_out, d_in, normalized, max_):
    got = ref.spectral_scale(d_out, d_in, normalized, max_)
    assert got == oracle.spectral_scale(d_out, d_in, normalized, max_)  # the same formula on the same ints


def test_spectral_scale_defaults():
    assert ref.spectral_scale(3, 12) == 0.5  # normalized, no max
    assert ref.spectral_scale(3, 12, max=True) == 1.0
    assert ref.spectral_scale(12, 3, max=True) == 2.0
    assert ref.spectral_scale(4, 100, normalized=False) == 2.0


@pytest.mark.parametrize("shape,want", [((6, 2, 3), math.sqrt(3) / 3), ((6, 2, 3, 3), math.sqrt(3) / 9),
                                        ((2, 8, 5), 0.5 / 5), ((2, 8, 2, 2), 0.5 / 4)])
def test_spectral_conv_scale(shape, want):
    assert ref.spectral_conv_scale(shape) == oracle.spectral_conv_scale(shape)  # the same formula on the same ints
    assert ref.spectral_conv_scale(list(shape)) == oracle.spectral_conv_scale(shape)
    assert_close(torch.tensor(ref.spectral_conv_scale(shape)), torch.tensor(want), torch.tensor(want, dtype=torch.float32))


@pytest.mark.parametrize("shape", [(3, 12), (12, 3), (2, 6, 9)])
@pytest.mark.parametrize("kwargs", [{}, {"normalized": False}, {"max": True}, {"max": True, "normalized": False},
                                    {"steps": 2}, {"coefficients": "polar_express", "steps": 6}])
def test_lmo_spectral_fp64(shape, kwargs):
    g = randn(*shape)
    got = ref.lmo_spectral(g, **kwargs)
    if len(shape) == 2:
        assert_oracle(got, oracle.lmo, "Spectral", g, **kwargs)
    else:  # batched: the reference scales by the last two dims
        ns = {k: v for k, v in kwargs.items() if k in ("steps", "coefficients")}
        scale = oracle.spectral_scale(*shape[-2:], kwargs.get("normalized", True), kwargs.get("max", False))
        assert_oracle(got, lambda g: oracle.newton_schulz(g, **ns) * scale, g)


@pytest.mark.parametrize("shape", [(3, 12), (12, 3)])
@pytest.mark.parametrize("flags", [{}, {"normalized": False}, {"max": True}])
def test_lmo_spectral_exact(shape, flags):
    g = randn(*shape)
    got = ref.lmo_spectral(g, exact=True, **flags)
    scale = oracle.spectral_scale(*shape, flags.get("normalized", True), flags.get("max", False))
    assert_oracle(got, lambda g: oracle.polar(g) * scale, g)
    assert rel_err(got, ref.lmo_spectral(g, **flags)) > 1e-3  # five steps are not the polar factor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lmo_spectral_in_dtype(dtype):
    g = randn(12, 20)
    got = ref.lmo_spectral(g, dtype=dtype)
    assert got.dtype == dtype
    assert_close(got, oracle.spectral(g), oracle.spectral(g, dtype=dtype), dtype)


@pytest.mark.parametrize("shape", [(6, 2, 3), (4, 3, 2, 2), (2, 5, 3, 3)])  # square kernels: see the note below
@pytest.mark.parametrize("kwargs", [{}, {"steps": 2}, {"coefficients": "polar_express"}])
def test_lmo_spectral_conv(shape, kwargs):
    """(A (k1, k2) kernel with k1 != k2 is left out: the reference divides by k1², the oracle by k1 k2.)"""
    g = randn(*shape)
    got = ref.lmo_spectral_conv(g, **kwargs)
    assert got.shape == g.shape
    assert_oracle(got, oracle.lmo, "SpectralConv", g, **kwargs)


@pytest.mark.parametrize("shape", [(6, 2, 3), (4, 3, 2, 2)])
def test_lmo_spectral_conv_exact_and_dtype(shape):
    g = randn(*shape)
    k = shape[2] if len(shape) == 3 else shape[2] * shape[3]
    scale = math.sqrt(shape[0] / shape[1]) / k
    exact = ref.lmo_spectral_conv(g, exact=True)
    assert_oracle(exact, lambda g: (oracle.polar(g.reshape(shape[0], -1)) * scale).reshape(shape), g)
    got = ref.lmo_spectral_conv(g, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert_close(got, oracle.spectral_conv(g), oracle.spectral_conv(g, dtype=torch.bfloat16), torch.bfloat16)


# -- line-wise, sign and bias LMOs ---------------------------------------------------------------------

LINE_SHAPES = [(6, 10), (10, 6), (1, 5), (5, 1), (3, 6, 10)]


def _with_zero_lines(shape):
    g = randn(*shape)
    g[..., 0, :] = 0  # a zero row
    g[..., :, -1] = 0  # a zero column
    return g


@pytest.mark.parametrize("shape", LINE_SHAPES)
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("ours,exact", [(L.ColNorm, oracle.colnorm), (L.RowNorm, oracle.rownorm)],
                         ids=["colnorm", "rownorm"])
def test_line_lmos(ours, exact, shape, normalized, transpose):
    """reference.line_lmo with each norm's declared dim and alpha, on each matrix of a batch, zero lines
    included."""
    g = _with_zero_lines(shape)
    norm = ours(normalized, transpose)
    got = ref.line_lmo(g, norm.line_dim(shape), norm.alpha(shape))
    assert_oracle(got, lambda g: torch.stack(
        [exact(x, normalized, transpose) for x in g.reshape(-1, *shape[-2:])]).reshape(shape), g)


def test_line_norm_defaults():
    g = randn(6, 10)
    assert_oracle(L.ColNorm().lmo(g), oracle.colnorm, g, normalized=False, transpose=False)
    assert_oracle(L.RowNorm().lmo(g), oracle.rownorm, g, normalized=True, transpose=False)


def test_line_eps_is_1e_minus_8():
    """The reference's epsilon, in one place."""
    assert ref.LINE_EPS == 1e-8


@pytest.mark.parametrize("norm,exact", [(L.ColNorm(), oracle.colnorm), (L.RowNorm(), oracle.rownorm)])
def test_line_norm_eps_acts(norm, exact):
    """Lines of norm ~1e-8: the result is g / (norm + 1e-8), about half of a unit line."""
    g = randn(4, 4)
    g = g / g.norm(dim=0, keepdim=True) / g.norm(dim=1, keepdim=True) * 1e-8
    assert_oracle(norm.lmo(g), exact, g)


def test_line_lmo_takes_known_norms():
    """``norm``: the lines' norms when known (summed across shards) are used instead of g's own."""
    g = randn(3, 5)
    assert torch.equal(ref.line_lmo(g, -1, 2.0, torch.full((3, 1), 4.0, dtype=torch.float64)), g / (8 + 1e-8))


@pytest.mark.parametrize("shape", [(6, 10), (1, 1), (3, 2, 5)])
def test_lmo_sign(shape):
    g = randn(*shape)
    g[..., 0, 0] = 0
    assert torch.equal(ref.sign_lmo(g, 1 / shape[-1]), torch.sign(g) / shape[-1])
    assert torch.equal(ref.sign_lmo(g, 1.0), torch.sign(g))
    matrix = g if len(shape) == 2 else g[0]
    assert torch.equal(L.Sign().lmo(matrix), oracle.sign(matrix, normalized=True))


@pytest.mark.parametrize("shape", [(9,), (1,), ()])
def test_lmo_bias_rms(shape):
    g = randn(*shape) if shape else torch.tensor(-0.3, dtype=torch.float64)
    bias_rms = L.BiasRMS().lmo
    assert_oracle(bias_rms(g), oracle.bias_rms, g)
    tiny = g * 1e-9  # the 1e-8 is comparable
    assert_oracle(bias_rms(tiny), oracle.bias_rms, tiny)
    assert bias_rms(torch.zeros(shape, dtype=torch.float64)).abs().max() == 0


# -- the update -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [1.0, 0.25])
@pytest.mark.parametrize("unconstrained", [False, True])
def test_scion_update(momentum, unconstrained):
    p, g, buf = randn(5, 7, seed=1), randn(5, 7, seed=2), randn(5, 7, seed=3)
    new_p, new_buf = ref.scion_update(p, g, buf, oracle.rownorm, 0.1, momentum, 3.0, unconstrained)
    assert_oracle(new_p, lambda p, buf, g: oracle.scion_step(
        p, buf * (1 - momentum) + g * momentum if momentum != 1 else g, lr=0.1, scale=3.0,
        unconstrained=unconstrained, norm="RowNorm"), p, buf, g)
    if momentum == 1:
        assert new_buf is buf
    else:
        assert_oracle(new_buf, lambda buf, g: buf * (1 - momentum) + g * momentum, buf, g)


# -- power iteration -----------------------------------------------------------------------------------------

def test_default_start_vector_follows_w_and_not_the_default_dtype():
    """The start vector lives on W's device and is computed in fp32 whatever torch's default dtype."""
    assert ref.default_start_vector(torch.empty(2, 3, 5, device="meta")).device.type == "meta"
    want = ref.default_start_vector(torch.empty(3, 5))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = ref.default_start_vector(torch.empty(3, 5))
    finally:
        torch.set_default_dtype(old)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_default_start_vector():
    W = randn(3, 4, 9)
    v = ref.default_start_vector(W)
    assert v.shape == (3, 9) and v.dtype == torch.float32 and v.is_contiguous()
    for row in v:
        assert_close(row, oracle.start_vector(9), oracle.start_vector(9, torch.float32))
    assert_close(ref.default_start_vector(randn(4, 9)), oracle.start_vector(9), oracle.start_vector(9, torch.float32))


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (3, 6, 4)])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_power_iteration_is_the_oracles(shape, iters):
    W = randn(*shape)
    v0 = torch.nn.functional.normalize(randn(*shape[:-2], shape[-1], seed=1), dim=-1)
    sigma, v = ref.power_iteration(W, v0, iters)
    want_sigma, want_v = oracle.power_iteration(W, v0, iters)
    assert sigma.shape == shape[:-2] and v.shape == v0.shape
    assert_oracle([sigma, v], oracle.power_iteration, W, v0, iters)


def test_power_iteration_defaults():
    W = randn(6, 8)
    sigma, v = ref.power_iteration(W)
    # the default start vector is made in fp32 (as the reference's): the oracle starts from that same vector
    assert_oracle([sigma, v], oracle.power_iteration, W, oracle.start_vector(8, torch.float32), 1,
                  dtype=torch.float64)
    assert sigma.dtype == torch.float64 and v.dtype == torch.float64


@pytest.mark.parametrize("shape", [(5, 9), (3, 6, 4)])
def test_power_iteration_without_iterations(shape):
    """iters=0: sigma 0 of W's batch shape, dtype and device, and the start vector."""
    W = randn(*shape)
    sigma, v = ref.power_iteration(W, iters=0)
    assert sigma.shape == shape[:-2] and sigma.dtype == torch.float64 and (sigma == 0).all()
    assert torch.equal(v, ref.default_start_vector(W).double())
    sigma, _ = ref.power_iteration(torch.empty(*shape, device="meta", dtype=torch.float16), iters=0)
    assert sigma.device.type == "meta" and sigma.dtype == torch.float16 and sigma.shape == shape[:-2]


def test_power_iteration_zero_and_nan_matrices():
    W = randn(3, 4, 6)
    W[0] = 0
    W[1, 2, 3] = float("nan")
    v0 = torch.nn.functional.normalize(randn(3, 6, seed=1), dim=-1)
    sigma, v = ref.power_iteration(W, v0, 2)
    assert sigma[0] == 0 and torch.equal(v[0], v0[0])
    assert sigma[1].isnan()
    assert_oracle([sigma[2], v[2]], oracle.power_iteration, W[2], v0[2], 2)


# -- operator norms ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (1, 4), (2, 5, 3)])
def test_operator_norms_are_the_oracles(shape):
    W = randn(*shape)
    assert_oracle(ref.sigma_max(W), lambda W: oracle.singular_values(W)[..., 0], W)
    assert_oracle(ref.rms_to_rms(W), oracle.rms_to_rms, W)
    assert_oracle(ref.rms_to_inf(W), oracle.rms_to_inf, W)
    assert_oracle(ref.l1_to_rms(W), oracle.l1_to_rms, W)
    assert_oracle(ref.condition_number(W), oracle.condition_number, W)
    for sign in (1, -1):  # the largest magnitude may be a positive or a negative entry
        assert torch.equal(ref.supremum(sign * W), oracle.supremum(W))
    assert ref.supremum(W.float()).dtype == torch.float64


@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("shape", [(3, 40), (40, 3), (2, 5, 12), (2, 12, 5)])
def test_max_line_norm_chunks_fp64_copies(monkeypatch, dim, shape):
    """With a small FP64_CHUNK, no fp64 copy holds more than max(FP64_CHUNK, one line) elements,
    and the result is the same as in one piece."""
    W = randn(*shape).float()
    line = shape[-1] if dim == -1 else shape[-2]
    batch = math.prod(shape[:-2])
    for chunk in (1, 2 * line * batch, 5 * line * batch):
        monkeypatch.setattr(ref, "FP64_CHUNK", chunk)
        sizes = []
        real = torch.Tensor.double

        def double(t):
            sizes.append(t.numel())
            return real(t)

        monkeypatch.setattr(torch.Tensor, "double", double)
        got = ref.max_line_norm(W, dim)
        monkeypatch.setattr(torch.Tensor, "double", real)
        assert_oracle(got, lambda W: W.pow(2).sum(dim).sqrt().amax(-1), W.double())
        assert max(sizes) <= max(chunk, line * batch), (chunk, sizes)
        lines = shape[-2] if dim == -1 else shape[-1]
        assert sum(sizes) == W.numel() and len(sizes) == -(-lines // max(1, chunk // (line * batch)))


# -- norm2: line and Frobenius norms without overflow or underflow ---------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [-1, -2, 0, (-2, -1)])
def test_norm2_vs_oracle(dtype, dim):
    """An fp64 result with dim kept, within the rule of sqrt(sum x²) in the precision it is used in: at least
    fp32 by default (x's own for fp64), fp64 when asked."""
    x = randn(3, 6, 9).to(dtype)
    norm = lambda x: x.pow(2).sum(dim, keepdim=True).sqrt()  # noqa: E731
    got = ref.norm2(x, dim)
    assert got.dtype == torch.float64 and got.shape == x.double().sum(dim, keepdim=True).shape
    assert_oracle(got, norm, x, dtype=torch.promote_types(dtype, torch.float32))
    assert_oracle(ref.norm2(x, dim, torch.float64), norm, x, dtype=torch.float64)


@pytest.mark.parametrize("scale", [2.0 ** 600, 2.0 ** -600, 2.0 ** 1000, 2.0 ** -1000])
def test_norm2_fp64_beyond_the_squares_range(scale):
    """fp64 lines whose squares overflow (2^600: 2^1200 > fp64's max) or underflow (2^-600) are scaled by
    their largest entry first: the norm of (power-of-two) scaled lines is the scaled norm."""
    x = randn(4, 7)
    got = ref.norm2(x * scale, -1) / scale
    assert got.isfinite().all() and (got > 0).all()
    assert_oracle(got, lambda x: x.pow(2).sum(-1, keepdim=True).sqrt(), x, dtype=torch.float64)


def test_norm2_special_lines():
    x = torch.tensor([[0.0, 0.0, 0.0], [1e-300, 0.0, 0.0], [float("inf"), 1.0, 0.0], [float("nan"), 1.0, 0.0],
                      [3.0, 4.0, 0.0]], dtype=torch.float64)
    got = ref.norm2(x, -1).squeeze(-1)
    assert got[0] == 0 and got[1] == 1e-300 and got[2] == float("inf") and got[3].isnan() and got[4] == 5.0
    for dtype in (torch.float32, torch.float16):
        assert ref.norm2(torch.zeros(2, 3, dtype=dtype), -1).abs().max() == 0
    assert ref.norm2(torch.ones(3, 4, dtype=torch.float16) * 60000, -1).squeeze(-1).tolist() == [120000.0] * 3
    assert ref.norm2(torch.empty(0, 5, dtype=torch.float64), -1).shape == (0, 1)
    assert ref.norm2(torch.empty(4, 0, dtype=torch.float64), -1).abs().max() == 0


def test_newton_schulz_fp64_iteration_of_fp32_g_normalises_in_fp64():
    """An fp64 iteration of fp32 G takes G's norm in fp64 too (an fp32 norm would cost 1e-7 of accuracy)."""
    G = randn(6, 10).float()
    assert_oracle(ref.newton_schulz(G, 5, dtype=torch.float64), lambda G: oracle.newton_schulz(G, 5), G,
                  dtype=torch.float64)

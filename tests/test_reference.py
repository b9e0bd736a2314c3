"""The package's reference math (disco_kernels/reference.py) against the independent oracle under the
tolerance rule, and the mathematical properties the oracle itself must have."""
import math

import pytest
import torch

import oracle
from disco_kernels import reference as ref
from disco_kernels.lmo import make_norm
from tolerances import assert_close, plain_dtype, rel_err, unit

SHAPES = [(1, 1), (7, 129), (129, 7), (16, 16), (6, 3, 5)]  # small matrices batched (see tolerances.py)
MATRICES = [(1, 1), (7, 129), (129, 7), (16, 16), (12, 20)]
SCHEDULES = [("jordan", 0), ("jordan", 3), ("polar_express", 5), ("polar_express", 7),
             ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], 3)]


@pytest.mark.parametrize("coefficients,steps", SCHEDULES)
def test_schedules(coefficients, steps):
    assert ref.ns_schedule(coefficients, steps) == tuple(oracle.schedule(coefficients, steps))
    assert ref.ns_schedule([(1, 2, 3), (4, 5, 6)], 3)[0] == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0)]
    assert ref.JORDAN == oracle.JORDAN and ref.POLAR_EXPRESS == oracle.POLAR_EXPRESS


@pytest.mark.parametrize("bad", ["nope", [(1, 2)], [], 3])
def test_schedule_errors(bad):
    with pytest.raises(ValueError, match="coefficients"):
        ref.ns_schedule(bad, 5)


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_schedule_steps_errors(steps):
    with pytest.raises(ValueError, match="steps"):
        ref.ns_schedule("jordan", steps)


@pytest.mark.parametrize("shape", SHAPES + [(3, 9, 4)])
@pytest.mark.parametrize("coefficients,steps", SCHEDULES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_newton_schulz_vs_oracle(shape, coefficients, steps, dtype):
    G = torch.randn(shape, dtype=torch.float64).to(dtype)
    exact = oracle.newton_schulz(G.double(), steps, coefficients)
    assert_close(ref.newton_schulz(G, steps, coefficients), exact,
                 oracle.newton_schulz(G.to(plain_dtype(dtype)), steps, coefficients))


def test_newton_schulz_iteration_dtype():
    G = torch.randn(24, 40, dtype=torch.float64)
    out = ref.newton_schulz(G, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close(out, oracle.newton_schulz(G), oracle.newton_schulz(G, dtype=torch.bfloat16))


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_converges_to_the_polar_factor(shape):
    """A convergence property of the oracle and the reference alike (not a rounding bound): 60 steps of the
    convergent cubic schedule (a = 1.5, b = -0.5) take every singular value from ~1e-2 to 1 to 1e-8."""
    G = torch.randn(shape, dtype=torch.float64)
    for X in (ref.newton_schulz(G, steps=60, coefficients=[(1.5, -0.5, 0.0)]),
              oracle.newton_schulz(G, steps=60, coefficients=[(1.5, -0.5, 0.0)])):
        assert rel_err(X, oracle.polar(G)) < 1e-8


def test_newton_schulz_singular_values():
    """5 steps land singular values in a band around 1 (jordan ~[0.68, 1.13]); polar_express's smallest
    singular value is closer to 1 than jordan's (the schedules' published behaviour)."""
    G = torch.randn(64, 96, dtype=torch.float64)
    s_j = torch.linalg.svdvals(oracle.newton_schulz(G, 5, "jordan"))
    s_p = torch.linalg.svdvals(oracle.newton_schulz(G, 5, "polar_express"))
    assert 0.6 < s_j.min() and s_j.max() < 1.2
    assert 0.8 < s_p.min() and s_p.max() < 1.2 and s_p.min() > s_j.min()


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_factor(shape):
    G = torch.randn(shape, dtype=torch.float64)
    assert_close(ref.polar_factor(G), oracle.polar(G), oracle.polar(G.float()))
    assert ref.polar_factor(torch.zeros(4, 6)).abs().max() == 0


def _declared(name):
    """g, **kwargs -> the LMO of norm ``name`` as lmo.py declares it (reference.line_lmo / sign_lmo)."""
    def lmo(g, **kwargs):
        return make_norm(name, kwargs).lmo(g)
    lmo.__name__ = name
    return lmo


LMO_CASES = [
    (_declared("ColNorm"), "ColNorm", {"normalized": False, "transpose": False}),
    (_declared("ColNorm"), "ColNorm", {"normalized": True, "transpose": False}),
    (_declared("ColNorm"), "ColNorm", {"normalized": False, "transpose": True}),
    (_declared("RowNorm"), "RowNorm", {"normalized": True, "transpose": False}),
    (_declared("RowNorm"), "RowNorm", {"normalized": False, "transpose": True}),
    (_declared("Sign"), "Sign", {"normalized": True}),
    (_declared("Sign"), "Sign", {"normalized": False}),
    (ref.lmo_spectral, "Spectral", {"normalized": True, "max": True}),
    (ref.lmo_spectral, "Spectral", {"normalized": False}),
    (ref.lmo_spectral, "Spectral", {"coefficients": "polar_express", "steps": 6}),
]


@pytest.mark.parametrize("fn,norm,kwargs", LMO_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("shape", MATRICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lmo_vs_oracle(fn, norm, kwargs, shape, dtype):
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    if dtype == torch.bfloat16 and norm == "Spectral" and min(shape) == 1:
        dtype = torch.float32  # one scalar trajectory in bf16 (see test_ops); its fp32 run is checked instead
        g = g.float()
    exact = oracle.lmo(norm, g.double(), **kwargs)
    assert_close(fn(g, **kwargs), exact, oracle.lmo(norm, g.to(plain_dtype(dtype)), **kwargs))


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (6, 2, 3), (4, 2, 1, 3)])
def test_spectral_conv_vs_oracle(shape):
    g = torch.randn(shape, dtype=torch.float64)
    assert ref.spectral_conv_scale(shape) == oracle.spectral_conv_scale(shape)
    assert_close(ref.lmo_spectral_conv(g), oracle.spectral_conv(g), oracle.spectral_conv(g.float()))


@pytest.mark.parametrize("shape", [(), (1,), (11,)])
def test_bias_rms_vs_oracle(shape):
    b = torch.randn(shape, dtype=torch.float64)
    bias_rms = make_norm("BiasRMS").lmo
    assert_close(bias_rms(b), oracle.bias_rms(b), oracle.bias_rms(b.float()))
    zero = torch.zeros(shape, dtype=torch.float64)
    assert torch.equal(bias_rms(zero), zero)  # the epsilon keeps 0 / 0 away


@pytest.mark.parametrize("momentum,unconstrained", [(1.0, False), (0.3, True), (0.3, False)])
def test_scion_update_vs_oracle(momentum, unconstrained):
    p, g, buf = (torch.randn(6, 9, dtype=torch.float64) for _ in range(3))
    new_p, new_buf = ref.scion_update(p, g, buf, make_norm("RowNorm").lmo, 0.1, momentum, 2.0, unconstrained)
    d = buf * (1 - momentum) + g * momentum if momentum != 1 else g
    step = dict(lr=0.1, scale=2.0, unconstrained=unconstrained, norm="RowNorm")
    assert_close(new_p, oracle.scion_step(p, d, **step), oracle.scion_step(p.float(), d.float(), **step))
    if momentum != 1:
        assert_close(new_buf, d, d.float())


@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 30, 50)])
@pytest.mark.parametrize("iters", [1, 6])
def test_power_iteration_vs_oracle(shape, iters):
    W = torch.randn(shape, dtype=torch.float64)
    v0 = oracle.start_vector(shape[-1]).expand(*shape[:-2], shape[-1])
    sigma, v = ref.power_iteration(W, v0, iters)
    s64, v64 = oracle.power_iteration(W, v0, iters)
    s32, v32 = oracle.power_iteration(W.float(), v0.float(), iters)
    assert_close(sigma, s64, s32, what="sigma")
    assert_close(v, v64, v32, what="v")


def test_power_iteration_converges():
    """A property: 500 iterations reach sigma_max, and v stays a unit vector."""
    W = torch.randn(2, 30, 50, dtype=torch.float64)
    sigma, v = ref.power_iteration(W, iters=500)
    s = oracle.singular_values(W)[..., 0]
    assert rel_err(sigma, s) < 1e-9
    assert_close(v.norm(dim=-1), torch.ones(2, dtype=W.dtype), torch.ones(2))


def test_power_iteration_zero_matrix():
    v0 = oracle.start_vector(3).float()
    sigma, v = ref.power_iteration(torch.zeros(5, 3), v0, iters=3)
    assert sigma.item() == 0 and torch.equal(v, v0)


@pytest.mark.parametrize("name", ["rms_to_rms", "rms_to_inf", "l1_to_rms", "supremum", "condition_number"])
@pytest.mark.parametrize("shape", SHAPES)
def test_operator_norms_vs_oracle(name, shape):
    W = torch.randn(shape, dtype=torch.float64)
    exact, plain = getattr(oracle, name)(W), getattr(oracle, name)(W.float())
    assert_close(getattr(ref, name)(W), exact, plain, torch.float64)


@pytest.mark.parametrize("dim", [-1, -2])
def test_max_line_norm_in_chunks(monkeypatch, dim):
    """Chunked fp64 line norms equal the unchunked ones, for a chunk of a few lines and of one line."""
    W = torch.randn(37, 23)
    want = (oracle.rms_to_inf(W) / math.sqrt(23) if dim == -1 else oracle.l1_to_rms(W) * math.sqrt(37))
    for chunk in (50, 1):
        monkeypatch.setattr(ref, "FP64_CHUNK", chunk)
        assert_close(ref.max_line_norm(W, dim), want, want.float())


def test_unit_roundoff():
    assert unit(torch.bfloat16) == 2.0 ** -8 and unit(torch.float32) == 2.0 ** -24
